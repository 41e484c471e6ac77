// Shared helpers of the GPTQ tests (tests/test_gptq.cpp, tests/test_gptq_cuda.cpp): real nano
// block inputs, per-Linear input capture, the layer objective, Hessians, RTN with GPTQ's quantizer,
// an independent implementation of the original GPTQ quantizer, random LWC clip factors.
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <map>

#include "autograd/tape.h"
#include "models/causal_lm.h"
#include "models/checkpoint.h"
#include "models/datasets.h"
#include "models/tokenizer.h"
#include "ops/fake_quant.h"
#include "ops/matmul.h"
#include "quant/gptq.h"
#include "runtime/error.h"
#include "tests/support/test_support.h"

namespace gptq_test {

using namespace omniq;


inline std::string nano(const char* arch) { return test::source_path(std::string("data/models/") + arch + "-nano"); }

// Block-0 hidden states of N consecutive T-token windows of WikiText: [N, T, C].
inline Tensor block_inputs(const ModelCheckpoint& ck, int64_t N, int64_t T) {
  Tokenizer tok = Tokenizer::from_model_dir(ck.dir());
  std::vector<int32_t> ids = tok.encode(read_text_file(dataset_path("wikitext2")));
  NamedWeights emb = ck.load_embeddings(DType::f32, Device::cpu());
  Tensor out = Tensor::empty({N, T, ck.config().hidden_size}, DType::f32);
  for (int64_t j = 0; j < N; ++j) {
    std::vector<int32_t> w(ids.begin() + j * T, ids.begin() + (j + 1) * T);
    out.view_rows(j, 1).copy_from(embed_tokens(ck.config(), emb, Tensor::from_i32(w, {1, T}), Device::cpu()));
  }
  return out;
}

// Captures every Linear's input ([rows, in], all samples concatenated, on the CPU).
struct InputCapture : BlockHooks {
  std::map<std::string, std::vector<float>> xs;
  std::map<std::string, int64_t> cols;
  ag::Var activation(ag::Tape&, const std::string& s, const ag::Var& x) override {
    if (s == "q" || s == "k" || s == "v") return x;
    std::vector<float> v = x->value.to_f32_vector();
    xs[s].insert(xs[s].end(), v.begin(), v.end());
    cols[s] = x->value.cols();
    return x;
  }
  Tensor x(const std::string& s) const {
    int64_t c = cols.at(s);
    return Tensor::from_f32(xs.at(s), {static_cast<int64_t>(xs.at(s).size()) / c, c});
  }
};

inline InputCapture capture_inputs(const ModelConfig& cfg, const BlockWeights& w, const Tensor& inps) {
  InputCapture cap;
  auto params = block_params(w);
  for (int64_t j = 0; j < inps.size(0); ++j) {
    ag::Tape t;
    decoder_block_forward(t, cfg, params, ag::constant(inps.view_rows(j, 1)), &cap);
  }
  return cap;
}

// ‖X Wᵀ − X Ŵᵀ‖² (all on the CPU, accumulated in double).
inline double layer_error(const Tensor& X, const Tensor& W, const Tensor& Wq) {
  std::vector<float> a = W.to_f32_vector(), b = Wq.to_f32_vector();
  for (size_t i = 0; i < a.size(); ++i) a[i] -= b[i];
  Tensor y = linear_forward(X, Tensor::from_f32(a, W.shape()));
  double s = 0;
  for (float v : y.to_f32_vector()) s += static_cast<double>(v) * v;
  return s;
}

inline Tensor hessian_of(const Tensor& X) {
  Tensor H;
  int64_t n = 0;
  gptq_accumulate_hessian(H, n, X);
  return H;
}

inline Tensor rtn(const Tensor& w, const WeightQuantSpec& s) { return fake_quant_weight_forward(w, s, nullptr, nullptr); }

inline Tensor eye(int64_t n, Device dev = Device::cpu()) {
  std::vector<float> e(static_cast<size_t>(n * n), 0.f);
  for (int64_t i = 0; i < n; ++i) e[static_cast<size_t>(i * n + i)] = 1.f;
  return Tensor::from_f32(e, {n, n}, DType::f32, dev);
}

// RTN with GPTQ's quantizer (opt's range rule, optional clip): GPTQ with H = I has no error feedback.
// Checked against independent implementations in DiagonalHessianEqualsRtnExactly.
inline Tensor rtn_gptq(const Tensor& w, const WeightQuantSpec& s, const GptqOptions& opt, const GptqClip* clip = nullptr) {
  return gptq_quantize_linear(w, eye(w.size(1), w.device()), s, opt, clip);
}

// The original GPTQ quantizer (quant.py Quantizer.find_params + quantize, mse off), written
// independently of quant/gptq.cpp, applied per group of g columns (g = 0: per row).
inline std::vector<float> rtn_original(const std::vector<float>& w, int64_t out, int64_t in, int bits, int g, bool sym) {
  const int64_t len = g > 0 ? g : in;
  const float maxq = static_cast<float>((1 << bits) - 1);
  std::vector<float> y(w.size());
  for (int64_t r = 0; r < out; ++r)
    for (int64_t c0 = 0; c0 < in; c0 += len) {
      const float* x = &w[static_cast<size_t>(r * in + c0)];
      float xmin = std::min(0.f, *std::min_element(x, x + len)), xmax = std::max(0.f, *std::max_element(x, x + len));
      if (sym) {
        xmax = std::max(std::fabs(xmin), xmax);
        xmin = -xmax;  // (the original only mirrors a negative xmin: quant/gptq.h (*))
      }
      if (xmin == 0.f && xmax == 0.f) {
        xmin = -1.f;
        xmax = 1.f;
      }
      const float scale = (xmax - xmin) / maxq;
      const float zero = sym ? (maxq + 1) / 2 : std::rint(-xmin / scale);
      for (int64_t i = 0; i < len; ++i) {
        const float q = std::min(std::max(std::rint(x[i] / scale) + zero, 0.f), maxq);
        y[static_cast<size_t>(r * in + c0 + i)] = scale * (q - zero);
      }
    }
  return y;
}

// Clip factors in [lo, 1] for every quantization group of w (and the LWC γ/β that give them).
inline GptqClip random_clip(const Tensor& w, const WeightQuantSpec& spec, float lo, uint64_t seed) {
  const int64_t n = spec.num_groups(w.size(0), w.size(1));
  return gptq_clip_from_factors(Tensor::uniform({n}, lo, 1.f, seed), Tensor::uniform({n}, lo, 1.f, seed + 1));
}

inline WeightQuantSpec spec_of(int bits, int group, bool sym = false) {
  WeightQuantSpec s;
  s.bits = bits;
  s.group_size = group;
  s.symmetric = sym;
  return s;
}

// Every Linear of block 1, quantized on its own fp input: GPTQ must beat RTN on that input.
inline void check_per_layer(const char* arch, const WeightQuantSpec& spec, const GptqOptions& opt) {
  ModelCheckpoint ck(nano(arch));
  const ModelConfig& cfg = ck.config();
  BlockWeights w = ck.load_block(1, DType::f32, Device::cpu());
  InputCapture cap = capture_inputs(cfg, w, block_inputs(ck, 4, 128));
  for (const std::string& s : block_linear_sites(cfg)) {
    Tensor X = cap.x(s);
    const Tensor& W = w.get(s + ".weight");
    double eg = layer_error(X, W, gptq_quantize_linear(W, hessian_of(X), spec, opt));
    double er = layer_error(X, W, rtn_gptq(W, spec, opt));
    std::printf("%s W%dg%d act_order=%d static=%d %-9s gptq/rtn = %.3f\n", arch, spec.bits, spec.group_size,
                opt.act_order, opt.static_groups, s.c_str(), eg / er);
    EXPECT_LT(eg, er) << arch << " " << s;
  }
}

// The sequential driver: after gptq_quantize_block, each Linear's input in the quantized block is
// exactly what its Hessian was built from; on that input GPTQ must beat RTN of the same weight.
inline void check_block(const char* arch, const WeightQuantSpec& spec) {
  ModelCheckpoint ck(nano(arch));
  const ModelConfig& cfg = ck.config();
  BlockWeights w = ck.load_block(1, DType::f32, Device::cpu());
  BlockWeights q = ck.load_block(1, DType::f32, Device::cpu());
  Tensor inps = block_inputs(ck, 4, 128);
  gptq_quantize_block(cfg, q, inps, spec, GptqOptions{});
  InputCapture cap = capture_inputs(cfg, q, inps);
  for (const std::string& s : block_linear_sites(cfg)) {
    Tensor X = cap.x(s);
    const Tensor& W = w.get(s + ".weight");
    double eg = layer_error(X, W, q.get(s + ".weight"));
    double er = layer_error(X, W, rtn_gptq(W, spec, GptqOptions{}));
    std::printf("%s block W%dg%d %-9s gptq/rtn = %.3f\n", arch, spec.bits, spec.group_size, s.c_str(), eg / er);
    EXPECT_LT(eg, er) << arch << " " << s;
  }
}


// Clip factors per site of a block (every Linear), all `one` or random in [lo, 1].
inline std::map<std::string, GptqClip> block_clip(const ModelConfig& cfg, const BlockWeights& w, const WeightQuantSpec& spec,
                                           float lo, bool one) {
  std::map<std::string, GptqClip> m;
  uint64_t seed = 80;
  for (const std::string& s : block_linear_sites(cfg)) {
    const Tensor& W = w.get(s + ".weight");
    GptqClip c = random_clip(W, spec, lo, seed += 2);
    if (one) std::fill(c.hi.begin(), c.hi.end(), 1.f), std::fill(c.lo.begin(), c.lo.end(), 1.f);
    m[s] = c;
  }
  return m;
}

}  // namespace gptq_test
