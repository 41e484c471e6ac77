// A whole calibration run (spec §5): calibration windows → embeddings → for each decoder block:
// fp targets, quantizer init, training, fusion → propagate both streams → export.
//
// Every finished block is written to the state folder as `block_NNN.safetensors` (learned
// parameters in f32, fused fake-quantized weights in f16, the block's metrics as metadata),
// atomically, before the next block starts. A rerun with the same settings reuses finished blocks
// (resume), and `epochs = 0` with an existing state re-fuses and re-exports without training.
// The Hugging Face folder is written only at the end, atomically (models/hf_export.h).
#pragma once
#include <functional>
#include <map>
#include <string>
#include <vector>

#include "quant/quant_config.h"
#include "runtime/tensor.h"

namespace omniq {

struct BlockReport {
  int64_t block = 0;
  std::vector<double> epoch_loss;
  double final_loss = 0;     // MSE of the fused quantized block vs the fp target, over all samples
  double seconds = 0;
  int64_t peak_bytes = 0;    // device peak during this block
  int nan_retries = 0;
  bool resumed = false;      // taken from the state folder
  std::map<std::string, double> search;  // searched settings (AWQ: "<pair>.alpha")
};

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
