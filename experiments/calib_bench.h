// `omniq bench calibrate`: OmniQuant calibration throughput and memory on real block shapes, with
// random weights and inputs (timing does not depend on their values), through the same
// calibrate_block code path a real run uses. The CLI (experiments/cli/bench.cpp) parses and prints;
// this file generates the data, runs the blocks and counts the FLOPs, so the tests can call it.
//
// FLOP count (also in docs/performance.md). T tokens per sample (one window), P_s = out·in of
// Linear site s, H query heads of width D:
//   attention forward (causal)  A = 2·2·T²·D·H/2 = 2·T²·D·H   (QKᵀ and PV, half the score matrix)
//   forward pass, one sample    F = Σ_s 2·T·P_s + A
//   training step, one sample   S = Σ_s [2·T·P_s (forward) + 2·T·P_s (dX) + 2·T·P_s (dW)] + 3.5·A
//     minus dX of q/k/v when LET is off: their input (the norm of the block input) needs no
//     gradient, so autograd skips that GEMM; minus dW of sites whose weight needs no gradient (no
//     LWC, and LET does not touch the site); attention backward = 2.5 × forward.
//   one block = N·F (fp targets) [+ N·F aug-loss targets] + steps·S + N·F (propagation)
// Elementwise work (fake-quant of every weight each step, norms, RoPE, losses, AdamW) is not
// counted: it is what separates achieved from peak.
#pragma once
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "models/model_config.h"
#include "quant/calibrate.h"
#include "quant/quant_config.h"
#include "runtime/gpu_monitor.h"

namespace omniq {

struct CalibFlops {
  int64_t linear_params = 0;     // Σ_s P_s
  double attention_forward = 0;  // A, one sample
  double forward = 0;            // F, one sample
  double train_step = 0;         // S, one sample (batch 1)
};
CalibFlops calib_flops(const ModelConfig& cfg, const QuantConfig& qc, int64_t T);

struct CalibBenchOptions {
  std::string shape = "llama2-7b";  // models/model_shapes.h
  QuantConfig qc;                   // method, bits, lwc/let/aug, epochs, nsamples, seqlen
  int64_t blocks = 1;               // K blocks run in sequence (block k's quantized stream feeds k+1)
  Device device = Device::cpu();
  DType compute = DType::f32;
  double peak_tflops = 989;         // the device's dense peak in the compute dtype (H100 SXM bf16)
  uint64_t seed = 0;
  std::function<void(int64_t block, int epoch, double loss)> on_epoch;
};

struct CalibBenchBlock {
  BlockReport report;
  double flops = 0;          // the whole block (see above)
  double train_flops = 0;    // steps · S
  double ms_per_step = 0;
  double train_tflops = 0;   // achieved during the training steps
  double block_tflops = 0;   // flops / report.seconds
  GpuMonitorStats gpu;       // SM clock and power over the block (GPU runs with NVML)
};

struct CalibBenchResult {
  ModelConfig cfg;
  int64_t seqlen = 0;        // after clipping to max positions
  CalibFlops flops;
  std::vector<CalibBenchBlock> blocks;
  double block_seconds = 0;  // per block used for the extrapolation (mean over blocks 1.., or block 0 alone)
  double total_minutes = 0;  // block_seconds · num_layers / 60
  std::string summary;       // one line
};

// Random block weights of `cfg` (Linear weights and biases ~ N(0, 0.02²), norm weights 1, norm
// biases 0), deterministic in (seed, layer), in f32 on `dev`; `compute` is the same block with the
// Linear tensors in the compute dtype (as ModelCheckpoint::load_block gives them). With compute f32
// only `compute_weights` is filled (calibrate_block then takes it for both).
void random_block_weights(const ModelConfig& cfg, int64_t layer, uint64_t seed, Device dev, DType compute,
                          BlockWeights& f32, BlockWeights& compute_weights);

// Generates the data, runs the blocks (on_block after each), extrapolates. Throws for bad options.
CalibBenchResult run_calib_bench(const CalibBenchOptions& opt,
                                 const std::function<void(const CalibBenchBlock&)>& on_block = {});

// The options and results as JSON (the fields docs/performance.md lists).
std::string calib_bench_json(const CalibBenchOptions& opt, const CalibBenchResult& r);

}  // namespace omniq
