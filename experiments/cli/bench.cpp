// omniq bench: throughput and memory measurements. `omniq bench calibrate` runs OmniQuant's
// per-block calibration (the same calibrate_block code path as `omniq calibrate`) on random weights
// of a real model shape and reports time, ms per training step, achieved TFLOP/s against the
// device's peak, peak GPU memory, and the extrapolation to the whole model.
#include <cstdio>
#include <cstring>
#include <string>

#include "experiments/calib_bench.h"
#include "experiments/cli/args.h"
#include "experiments/cli/commands.h"
#include "experiments/cli/quant_flags.h"
#include "models/model_config.h"
#include "models/model_shapes.h"
#include "ops/fake_quant.h"
#include "models/safetensors_writer.h"
#include "runtime/error.h"
#include "runtime/tensor.h"

namespace omniq::cli {

namespace {

std::string known_shapes() {
  std::string s;
  for (const std::string& n : model_shape_names()) s += (s.empty() ? "" : " | ") + n;
  return s;
}

void print_bench_usage() {
  std::puts(
      "usage: omniq bench <what> [options]\n"
      "\n"
      "benchmarks:\n"
      "  calibrate  OmniQuant calibration of K blocks of a real model shape with random weights: seconds,\n"
      "             ms per training step, TFLOP/s and % of peak, peak GPU memory, whole-model estimate\n"
      "\n"
      "Run `omniq bench calibrate --help` for its options.");
}

int run_bench_calibrate(int argc, char** argv) {
  Args a("bench calibrate",
         "Time OmniQuant's per-block calibration on the real block shapes of a model, with random weights\n"
         "(Linear ~ N(0, 0.02^2), norms 1) and random block-0 inputs (~ N(0, 1)): no checkpoint needed. The\n"
         "K blocks run through calibrate_block, the code `omniq calibrate` uses (fp targets, quantizer init,\n"
         "training, fuse, propagation); block k's quantized stream feeds block k+1. Prints per block the\n"
         "seconds (and their phases), ms per training step, achieved TFLOP/s and % of --peak, peak GPU\n"
         "memory, then the estimate for all layers of the shape. FLOPs are counted as in\n"
         "docs/performance.md (GEMMs + causal attention; elementwise work not counted).");
  a.option("shape", "NAME", known_shapes(), "llama2-7b");
  a.option("blocks", "K", "blocks to run in sequence (the estimate uses blocks 1.. when K > 1)", "1");
  add_quant_flags(a, "128");
  add_device_flags(a);
  a.option("peak", "TFLOPS", "the device's dense peak in the compute dtype, for % of peak (H100 SXM bf16: 989)", "989");
  a.option("seed", "N", "seed of the random weights and inputs", "0");
  a.option("json", "FILE", "also write the numbers as JSON");
  a.example("omniq bench calibrate --shape llama2-7b --lwc --epochs 20 --json out/bench-7b.json");
  a.example("omniq bench calibrate --shape llama2-7b --blocks 3 --wbits 3 --group-size 128 --lwc --epochs 2");
  a.example("omniq bench calibrate --shape llama2-70b --lwc --epochs 2 --nsamples 128   # 80 layers estimated");
  a.example("omniq bench calibrate --shape opt-6.7b --wbits 4 --abits 4 --group-size 0 --lwc --let --aug-loss --epochs 2");
  a.example("omniq bench calibrate --shape tiny --device cpu --group-size 32 --nsamples 4 --seqlen 64 --lwc --epochs 2   # smoke test");
  if (!a.parse(argc, argv)) return 0;

  CalibBenchOptions o;
  o.shape = a.get("shape");
  OMNIQ_CHECK(has_model_shape(o.shape), "--shape %s: unknown shape (known: %s)", o.shape.c_str(), known_shapes().c_str());
  o.blocks = a.get_int("blocks");
  o.qc = read_quant_flags(a);
  QuantConfig& q = o.qc;
  if (q.method == "omniquant" && !q.lwc && !q.let) q.lwc = true;  // the paper's weight-only recipe
  q.validate();
  DeviceChoice dc = read_device_flags(a);
  o.device = dc.device;
  o.compute = dc.compute;
  o.peak_tflops = a.get_double("peak");
  o.seed = static_cast<uint64_t>(a.get_int("seed"));

  ModelConfig cfg = model_shape(o.shape);
  OMNIQ_CHECK(o.blocks >= 1 && o.blocks <= cfg.num_layers, "--blocks %lld: use 1..%lld (the layers of %s)",
              static_cast<long long>(o.blocks), static_cast<long long>(cfg.num_layers), o.shape.c_str());
  // Fail before allocating the streams when the group size does not fit the shape's Linears.
  if (q.weight_quant())
    for (const WeightSpec& s : block_weight_specs(cfg, 0))
      if (s.role == WeightRole::linear_weight)
        WeightQuantSpec{q.wbits, q.group_size, q.symmetric}.validate(s.shape[1], s.key.c_str());
  std::printf("bench calibrate %s (%s): %s %s%s%s%s, %d x %d tokens, %d epochs, %lld of %lld blocks on %s %s\n",
              o.shape.c_str(), cfg.summary().c_str(), q.method.c_str(), q.setting_name().c_str(), q.lwc ? " lwc" : "",
              q.let ? " let" : "", q.aug_loss ? " aug-loss" : "", q.nsamples, q.seqlen, q.epochs,
              static_cast<long long>(o.blocks), static_cast<long long>(cfg.num_layers), o.device.str().c_str(),
              dtype_name(o.compute));
  std::fflush(stdout);
  CalibBenchResult r = run_calib_bench(o, [&](const CalibBenchBlock& b) {
    const BlockReport& p = b.report;
    std::printf("block %lld: %.2f s (fp %.2f, init %.2f, train %.2f, gptq %.2f, propagate %.2f) | %lld steps (%lld as CUDA graph), %.2f ms/step"
                " | train %.1f TFLOP/s = %.1f%% of %.0f | block %.1f TFLOP/s | peak %.2f GiB | loss %s, final mse %.5g\n",
                static_cast<long long>(p.block), p.seconds, p.fp_seconds, p.init_seconds, p.train_seconds, p.gptq_seconds,
                p.propagate_seconds, static_cast<long long>(p.train_steps), static_cast<long long>(p.graph_steps), b.ms_per_step,
                b.train_tflops, 100 * b.train_tflops / o.peak_tflops, o.peak_tflops, b.block_tflops, p.peak_bytes / 1073741824.0,
                p.epoch_loss.empty() ? "-" : strformat("%.5g -> %.5g", p.epoch_loss.front(), p.epoch_loss.back()).c_str(),
                p.final_loss);
    std::printf("         %s\n", GpuMonitor::describe(b.gpu).c_str());
    std::fflush(stdout);
  });
  std::printf("FLOPs per sample (T = %lld): forward %.4g, training step %.4g (Linear params %.4g, attention fwd %.4g)\n",
              static_cast<long long>(r.seqlen), r.flops.forward, r.flops.train_step,
              static_cast<double>(r.flops.linear_params), r.flops.attention_forward);
  std::printf("estimate: %lld layers x %.2f s = %.1f min\n", static_cast<long long>(r.cfg.num_layers), r.block_seconds,
              r.total_minutes);
  std::printf("summary: %s\n", r.summary.c_str());
  if (a.has("json")) {
    write_file_atomic(a.get("json"), calib_bench_json(o, r));
    std::printf("wrote %s\n", a.get("json").c_str());
  }
  return 0;
}

}  // namespace

int run_bench(int argc, char** argv) {
  if (argc < 1 || !std::strcmp(argv[0], "--help") || !std::strcmp(argv[0], "-h")) {
    print_bench_usage();
    return argc < 1 ? 2 : 0;
  }
  std::string what = argv[0];
  if (what == "calibrate") return run_bench_calibrate(argc - 1, argv + 1);
  OMNIQ_FAIL("omniq bench: unknown benchmark '%s' (known: calibrate; see omniq bench --help)", what.c_str());
}

}  // namespace omniq::cli
