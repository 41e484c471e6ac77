#include "quant/quant_config.h"

#include <cmath>
#include <nlohmann/json.hpp>

#include "runtime/error.h"

namespace omniq {

std::string QuantConfig::setting_name() const {
  std::string s = "W" + std::to_string(wbits) + "A" + std::to_string(abits);
  if (group_size > 0) s += "g" + std::to_string(group_size);
  return s;
}

void QuantConfig::validate() const {
  OMNIQ_CHECK(method == "rtn" || method == "omniquant" || method == "gptq" || method == "awq" || method == "smoothquant",
              "unknown method '%s': use rtn, omniquant, gptq, awq or smoothquant", method.c_str());
  OMNIQ_CHECK(!(method == "gptq" || method == "awq") || !act_quant(),
              "method %s quantizes weights only: set abits 16 (use smoothquant or omniquant for weight-activation)",
              method.c_str());
  OMNIQ_CHECK(method != "smoothquant" || act_quant(), "smoothquant is a weight-activation method: set abits below 16");
  OMNIQ_CHECK(!gptq || (method == "omniquant" && wbits < 16),
              "gptq: true (OmniQuant-then-GPTQ) needs method omniquant and wbits below 16; for plain GPTQ use method gptq");
  auto bits_ok = [](int b) { return (b >= 2 && b <= 8) || b == 16; };
  OMNIQ_CHECK(bits_ok(wbits), "wbits %d unsupported: use 2..8, or 16 for unquantized weights", wbits);
  OMNIQ_CHECK(bits_ok(abits), "abits %d unsupported: use 2..8, or 16 for unquantized activations", abits);
  OMNIQ_CHECK(group_size == 0 || (group_size >= 8 && group_size % 8 == 0),
              "group size %d unsupported: use 0 (per output channel) or a multiple of 8 such as 64 or 128", group_size);
  OMNIQ_CHECK(epochs >= 0, "epochs must be >= 0, got %d", epochs);
  OMNIQ_CHECK(nsamples >= 1, "nsamples must be >= 1, got %d", nsamples);
  OMNIQ_CHECK(seqlen >= 2, "seqlen must be >= 2, got %d", seqlen);
  OMNIQ_CHECK(std::isfinite(lwc_lr) && lwc_lr > 0, "lwc_lr must be a positive number, got %g", lwc_lr);
  OMNIQ_CHECK(std::isfinite(let_lr) && let_lr > 0, "let_lr must be a positive number, got %g", let_lr);
  OMNIQ_CHECK(std::isfinite(weight_decay) && weight_decay >= 0, "weight decay must be >= 0, got %g", weight_decay);
  OMNIQ_CHECK(let_alpha >= 0 && let_alpha <= 1, "LET alpha must be in [0, 1], got %g", let_alpha);
  OMNIQ_CHECK(max_nan_retries >= 0, "max_nan_retries must be >= 0");
  OMNIQ_CHECK(weight_quant() || act_quant(), "W16A16 quantizes nothing: set wbits or abits below 16");
}

std::string QuantConfig::to_json() const {
  nlohmann::ordered_json j;
  j["method"] = method;
  j["wbits"] = wbits;
  j["abits"] = abits;
  j["group_size"] = group_size;
  j["symmetric"] = symmetric;
  j["lwc"] = lwc;
  j["let"] = let;
  j["aug_loss"] = aug_loss;
  if (gptq) j["gptq"] = gptq;  // written only when on, so older state folders stay valid
  j["epochs"] = epochs;
  j["nsamples"] = nsamples;
  j["seqlen"] = seqlen;
  j["seed"] = seed;
  j["lwc_lr"] = lwc_lr;
  j["let_lr"] = let_lr;
  j["weight_decay"] = weight_decay;
  j["let_alpha"] = let_alpha;
  j["let_scale_floor"] = let_scale_floor;
  j["max_nan_retries"] = max_nan_retries;
  j["calib_text"] = calib_text;
  return j.dump(1);
}

QuantConfig QuantConfig::from_json(const std::string& text, const std::string& source) {
  nlohmann::json j;
  try {
    j = nlohmann::json::parse(text);
  } catch (const std::exception& e) {
    OMNIQ_FAIL("%s: not valid JSON (%s)", source.c_str(), e.what());
  }
  QuantConfig c;
  try {
    c.method = j.value("method", c.method);
    c.wbits = j.value("wbits", c.wbits);
    c.abits = j.value("abits", c.abits);
    c.group_size = j.value("group_size", c.group_size);
    c.symmetric = j.value("symmetric", c.symmetric);
    c.lwc = j.value("lwc", c.lwc);
    c.let = j.value("let", c.let);
    c.aug_loss = j.value("aug_loss", c.aug_loss);
    c.gptq = j.value("gptq", c.gptq);
    c.epochs = j.value("epochs", c.epochs);
    c.nsamples = j.value("nsamples", c.nsamples);
    c.seqlen = j.value("seqlen", c.seqlen);
    c.seed = j.value("seed", c.seed);
    c.lwc_lr = j.value("lwc_lr", c.lwc_lr);
    c.let_lr = j.value("let_lr", c.let_lr);
    c.weight_decay = j.value("weight_decay", c.weight_decay);
    c.let_alpha = j.value("let_alpha", c.let_alpha);
    c.let_scale_floor = j.value("let_scale_floor", c.let_scale_floor);
    c.max_nan_retries = j.value("max_nan_retries", c.max_nan_retries);
    c.calib_text = j.value("calib_text", c.calib_text);
  } catch (const std::exception& e) {
    OMNIQ_FAIL("%s: a quantization setting has the wrong type (%s)", source.c_str(), e.what());
  }
  c.validate();
  return c;
}

}  // namespace omniq
