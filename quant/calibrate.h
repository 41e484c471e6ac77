// A whole calibration run (spec §5): calibration windows → embeddings → for each decoder block:
// fp targets, quantizer init, training, fusion → propagate both streams → export.
//
// Every finished block is written to the state folder as `block_NNN.safetensors` (learned
// parameters in f32, fused fake-quantized weights in f16, the block's metrics as metadata),
// atomically, before the next block starts. A rerun with the same settings reuses finished blocks
// (resume), and `epochs = 0` with an existing state re-fuses and re-exports without training.
// The Hugging Face folder is written only at the end, atomically (models/hf_export.h).
//
// The per-block work is `calibrate_block`, which needs no checkpoint: `omniq bench calibrate` runs
// the same function on random weights of real shapes to measure throughput and memory.
#pragma once
#include <functional>
#include <map>
#include <string>
#include <vector>

#include "models/decoder_block.h"
#include "quant/quant_config.h"
#include "runtime/tensor.h"

namespace omniq {

struct BlockReport {
  int64_t block = 0;
  std::vector<double> epoch_loss;
  double final_loss = 0;     // MSE of the fused quantized block vs the fp target, over all samples
  double seconds = 0;
  int64_t peak_bytes = 0;    // device peak during this block
  // Where the time went (device-synchronised phase boundaries), for benchmarks and logs.
  double fp_seconds = 0;         // fp targets (+ input statistics, + aug-loss targets)
  double init_seconds = 0;       // quantizer init: SmoothQuant / AWQ searches, state restore
  double train_seconds = 0;      // OmniQuant training steps
  double gptq_seconds = 0;
  double propagate_seconds = 0;  // fuse + quantized-stream propagation + final loss
  int64_t train_steps = 0;       // optimizer steps run (incl. NaN retries)
  int nan_retries = 0;
  int64_t graph_steps = 0;    // of train_steps, those replayed as a CUDA graph
  bool resumed = false;      // taken from the state folder
  std::map<std::string, double> search;  // searched settings (AWQ: "<pair>.alpha")
};

class BlockQuantizer;

// The two activation streams of a calibration run: [N, T, C] in the compute dtype on the device.
// calibrate_block replaces both in place, so a block holds 2 stream buffers (3 with aug_loss).
struct CalibStreams {
  Tensor fp;  // in: the full-precision model's inputs to this block; out: its outputs (fp targets)
  Tensor q;   // in: the quantized model's inputs; out: the fused quantized block's outputs
};

// Hooks calibrate_model uses for its state folder; all optional.
struct BlockCallbacks {
  // After the quantizer is initialised, before training: restore a finished result into bq's learned
  // parameters (and, when `gptq` is non-null, GPTQ's f32 block weights into *gptq); fill
  // rep.epoch_loss; return true if restored (training and GPTQ are then skipped, rep.resumed set).
  std::function<bool(BlockQuantizer& bq, BlockWeights* gptq, BlockReport& rep)> restore;
  std::function<void(int epoch, double loss)> on_epoch;
  // At the end, with the report complete and bq still alive (gptq: GPTQ's f32 weights, else null).
  // May amend rep (calibrate_model adds its weight-loading time to rep.seconds).
  std::function<void(BlockQuantizer& bq, const BlockWeights* gptq, BlockReport& rep)> on_done;
};

// One block of a calibration run (spec §5, step 4), with no checkpoint involved:
//   1. fp targets, in place over streams.fp sample by sample (+ Linear input statistics when LET,
//      SmoothQuant or AWQ need them); AWQ keeps a clone of the first ≤ 32 fp input windows;
//   2. quantizer init (LET / SmoothQuant / AWQ), or callbacks.restore;
//   3. OmniQuant training (aug_loss: block_fp(q inputs) is a third buffer while training) or GPTQ;
//   4. fuse, check finite, and propagate streams.q in place through the fused block, with the
//      final loss MSE(q_out_j, fp_out_j) per sample.
// w_compute: the block's weights in the compute dtype (= streams' dtype); w_f32: the same with f32
// Linear weights (pass w_compute again when computing in f32). The caller resets the device's peak
// memory counter before loading the weights; rep.peak_bytes is read at the end.
BlockReport calibrate_block(const ModelConfig& cfg, const QuantConfig& qc, const BlockWeights& w_compute,
                            const BlockWeights& w_f32, CalibStreams& streams, int64_t index,
                            const BlockCallbacks& callbacks = {});

struct CalibrationOptions {
  std::string model_dir;
  std::string out_dir;       // the Hugging Face folder written at the end
  std::string state_dir;     // "" = <out_dir>.state
  QuantConfig qc;
  Device device = Device::cpu();
  DType compute = DType::f32;  // f32 on the CPU; bf16 on CUDA by default
  bool export_model = true;
  std::string windows_out;     // if set: the calibration windows' token ids as JSON (for references)
  std::function<void(const BlockReport&)> on_block;                // after each block
  std::function<void(int64_t block, int epoch, double loss)> on_epoch;
};

struct CalibrationResult {
  std::vector<BlockReport> blocks;
  double seconds = 0;
  int64_t peak_bytes = 0;
  int64_t calib_tokens = 0;
  std::string out_dir, state_dir;
};

CalibrationResult calibrate_model(const CalibrationOptions& opt);

// The metadata file written into exported folders: the QuantConfig as JSON (omniq eval reads its
// abits to quantize activations of weight-activation models).
constexpr const char* kQuantConfigFile = "omniq_quant.json";

}  // namespace omniq
