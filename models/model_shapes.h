// Named decoder shapes of real models as ModelConfig presets, so throughput and memory can be
// measured on the real block sizes without a checkpoint on disk (omniq bench calibrate).
//
// Each preset is written as the Hugging Face config.json the model ships with (the fields that
// change the block: widths, heads, norm, activation, biases) and parsed by ModelConfig::parse, so a
// preset is exactly what loading that model's config would give. The shapes match
// tests/reference/make_random_model.py (max positions 2048, untied lm_head).
//
//   llama2-7b   C 4096, MLP 11008, 32 layers, 32 heads
//   llama2-13b  C 5120, MLP 13824, 40 layers, 40 heads
//   llama2-70b  C 8192, MLP 28672, 80 layers, 64 heads, 8 kv heads (GQA)
//   opt-6.7b    C 4096, ffn 16384, 32 layers, 32 heads, LayerNorm, ReLU, biases, vocab 50272
//   tiny, tiny-opt: CI-sized LLaMA (GQA) / OPT shapes for CPU tests (C 64, 2 layers).
#pragma once
#include <string>
#include <vector>

#include "models/model_config.h"

namespace omniq {

// Known names in the order above.
std::vector<std::string> model_shape_names();
bool has_model_shape(const std::string& name);
// The preset; throws omniq::Error listing the known names for an unknown one.
ModelConfig model_shape(const std::string& name);
// Σ out·in over the block's Linear weights (biases and norms excluded).
int64_t block_linear_params(const ModelConfig& cfg);

}  // namespace omniq
