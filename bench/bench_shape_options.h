// Command-line options shared by the GEMM micro-benchmarks at LLaMA block shapes (bench_gemm_fusion,
// bench_gemm_merge): tokens T, hidden C, MLP width F, timing repetitions, and the peak used for "% of
// peak" lines. Defaults are LLaMA-2-7B at T = 2048 on an H100 (989 dense bf16 TFLOP/s).
#pragma once
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>

namespace omniq::bench {

struct ShapeOptions {
  int64_t T = 2048, C = 4096, F = 11008;
  int reps = 50, warmup = 5;
  double peak = 989.0;
};

// Exits with a usage line (status 2) on an unknown option or a missing value; reps are raised to
// min_reps so that event timing is not dominated by the first launches.
inline ShapeOptions parse_shape_options(int argc, char** argv, int min_reps) {
  ShapeOptions o;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (i + 1 >= argc) {
      std::fprintf(stderr, "usage: %s [--tokens T] [--hidden C] [--mlp F] [--reps N] [--warmup N] [--peak TFLOPS]\n",
                   argv[0]);
      std::exit(2);
    }
    const char* v = argv[++i];
    if (a == "--tokens") o.T = std::atoll(v);
    else if (a == "--hidden") o.C = std::atoll(v);
    else if (a == "--mlp") o.F = std::atoll(v);
    else if (a == "--reps") o.reps = std::atoi(v);
    else if (a == "--warmup") o.warmup = std::atoi(v);
    else if (a == "--peak") o.peak = std::atof(v);
    else {
      std::fprintf(stderr, "%s: unknown option %s\n", argv[0], a.c_str());
      std::exit(2);
    }
  }
  if (o.reps < min_reps) o.reps = min_reps;
  return o;
}

}  // namespace omniq::bench
