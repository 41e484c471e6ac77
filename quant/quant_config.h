// The settings of one quantization run (method, bit widths, OmniQuant training recipe), validated
// up front, and serialised to/from JSON so a run directory and an exported model record exactly
// what produced them.
#pragma once
#include <cstdint>
#include <string>

namespace omniq {

struct QuantConfig {
  std::string method = "omniquant";  // rtn | omniquant | gptq | awq | smoothquant
  int wbits = 4;                     // 2..8, 16 = weights not quantized
  int abits = 16;                    // 2..8, 16 = activations not quantized
  int group_size = 0;                // 0 = per output channel
  bool symmetric = false;
  bool lwc = true;                   // learnable weight clipping (omniquant)
  bool let = false;                  // learnable equivalent transformation (omniquant)
  bool aug_loss = false;             // + MSE(block_q(q_in), block_fp(q_in))
  bool gptq = false;                 // omniquant: then GPTQ the LET-fused weights within the learned clipping
  int epochs = 20;
  int nsamples = 128;
  int seqlen = 2048;                 // clipped to the model's max_position_embeddings
  uint64_t seed = 2;
  float lwc_lr = 1e-2f;
  float let_lr = 5e-3f;
  float weight_decay = 0.0f;
  float let_alpha = 0.5f;            // LET scale init exponent (0.75 for W4A4 recipes)
  float let_scale_floor = 1e-2f;     // |s| floor during training
  int max_nan_retries = 3;           // a non-finite loss restores the epoch, halves the lrs, retries
  std::string calib_text;            // file path; empty = the bundled WikiText-2 valid split

  bool weight_quant() const { return wbits < 16; }
  bool act_quant() const { return abits < 16; }
  bool trains() const { return method == "omniquant" && epochs > 0 && (lwc || let); }
  std::string setting_name() const;  // "W3A16g128", "W4A4"

  // Throws omniq::Error naming the field and the allowed values.
  void validate() const;
  std::string to_json() const;
  static QuantConfig from_json(const std::string& text, const std::string& source);
};

}  // namespace omniq
