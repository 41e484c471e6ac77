// omniq: post-training quantization of LLMs (OmniQuant and friends) in C++/CUDA.
#include <cstdio>
#include <cstring>
#include <exception>
#include <string>

#include "experiments/cli/commands.h"
#include "runtime/error.h"

namespace {

void print_usage() {
  std::puts(
      "usage: omniq <command> [options]\n"
      "\n"
      "commands:\n"
      "  calibrate  quantize a model (RTN or OmniQuant: LWC, LET) and write a Hugging Face folder\n"
      "  eval       perplexity of a Hugging Face LLaMA/OPT model folder on WikiText-2 or any text file\n"
      "  run        one experiment from a YAML file: calibrate, log to run.h5, evaluate (resumable)\n"
      "  sweep      every point of a YAML sweep (grid and/or runs list), then a summary table\n"
      "  bench      throughput/memory benchmarks (bench calibrate: OmniQuant on real block shapes)\n"
      "\n"
      "Run `omniq <command> --help` for the options of a command.\n"
      "\n"
      "examples:\n"
      "  omniq sweep experiments/configs/quickstart.yaml\n"
      "  omniq calibrate --model data/models/llama-nano --wbits 3 --lwc --epochs 2 --nsamples 16 --seqlen 256 --out out/w3\n"
      "  omniq eval --model out/w3\n"
      "  omniq eval --model data/models/llama-nano --device cpu\n"
      "  omniq eval --model /path/to/Llama-2-7b-hf --device cuda --dtype bf16 --seqlen 2048\n"
      "  omniq bench calibrate --shape llama2-7b --lwc --epochs 20 --json bench-7b.json");
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2 || !std::strcmp(argv[1], "--help") || !std::strcmp(argv[1], "-h") || !std::strcmp(argv[1], "help")) {
    print_usage();
    return argc < 2 ? 2 : 0;
  }
  std::string cmd = argv[1];
  try {
    if (cmd == "eval") return omniq::cli::run_eval(argc - 2, argv + 2);
    if (cmd == "calibrate") return omniq::cli::run_calibrate(argc - 2, argv + 2);
    if (cmd == "sweep") return omniq::cli::run_sweep_command(argc - 2, argv + 2);
    if (cmd == "run") return omniq::cli::run_run_command(argc - 2, argv + 2);
    if (cmd == "bench") return omniq::cli::run_bench(argc - 2, argv + 2);
    std::fprintf(stderr, "omniq: unknown command '%s'\n\n", cmd.c_str());
    print_usage();
    return 2;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "omniq %s: error: %s\n", cmd.c_str(), e.what());
    return 1;
  }
}
