#include "models/decoder_block.h"

#include <cmath>
#include <tuple>

#include "autograd/functions.h"
#include "runtime/error.h"

namespace omniq {

namespace {

struct BlockCtx {
  ag::Tape& t;
  const std::map<std::string, ag::Var>& params;
  BlockHooks* hooks;

  // The parameter `key`, through the hook; nullptr when the block has no such tensor (optional bias).
  ag::Var p(const std::string& key) const {
    auto it = params.find(key);
    if (it == params.end()) return nullptr;
    return hooks ? hooks->param(t, key, it->second) : it->second;
  }
  ag::Var req(const std::string& key) const {
    ag::Var v = p(key);
    OMNIQ_CHECK(v != nullptr, "decoder block: missing parameter '%s'", key.c_str());
    return v;
  }
  ag::Var act(const std::string& site, const ag::Var& x) const { return hooks ? hooks->activation(t, site, x) : x; }
  ag::Var linear(const std::string& site, const ag::Var& x) const {
    return ag::linear(t, act(site, x), req(site + ".weight"), p(site + ".bias"));
  }
  // residual + Linear(x), the add folded into the GEMM epilogue (ag::linear_residual; the unfused
  // add with OMNIQ_NO_GEMM_FUSION=1). Hooks see exactly what they see in linear(): the activation
  // hook the Linear's input, the param hooks its weight and bias; the residual joins the output.
  ag::Var linear_residual(const std::string& site, const ag::Var& x, const ag::Var& residual) const {
    return ag::linear_residual(t, act(site, x), req(site + ".weight"), p(site + ".bias"), residual);
  }
};

// Self-attention shared by both architectures: q/k/v projections, optional RoPE, causal GQA
// attention, output projection. `x` is the normalised block input [B, T, C].
// The output projection adds `residual` in its epilogue (x + attn(...) of the block).
ag::Var self_attention(const BlockCtx& c, const ModelConfig& cfg, const ag::Var& x, const char* out_site,
                       const ag::Var& residual) {
  const Shape& s = x->value.shape();
  int64_t B = s[0], T = s[1], H = cfg.num_heads, Hkv = cfg.num_kv_heads, D = cfg.head_dim;
  ag::Var q = ag::reshape(c.t, c.linear("q_proj", x), {B, T, H, D});
  ag::Var k = ag::reshape(c.t, c.linear("k_proj", x), {B, T, Hkv, D});
  ag::Var v = ag::reshape(c.t, c.linear("v_proj", x), {B, T, Hkv, D});
  if (cfg.is_llama()) {
    std::tie(q, k) = ag::rope_qk(c.t, q, k, static_cast<float>(cfg.rope_theta));  // one launch for both
  }
  q = c.act("q", q);
  k = c.act("k", k);
  v = c.act("v", v);
  ag::Var o = ag::attention(c.t, q, k, v, 1.0f / std::sqrt(static_cast<float>(D)), /*causal=*/true);
  return c.linear_residual(out_site, ag::reshape(c.t, o, {B, T, H * D}), residual);
}

// HF LlamaDecoderLayer: h = x + attn(rmsnorm(x)); out = h + down(silu(gate(n)) * up(n)), n = rmsnorm(h)
ag::Var llama_block(const BlockCtx& c, const ModelConfig& cfg, const ag::Var& x) {
  float eps = cfg.norm_eps;
  ag::Var n1 = ag::rmsnorm(c.t, x, c.req("input_layernorm.weight"), eps);
  ag::Var h = self_attention(c, cfg, n1, "o_proj", x);
  ag::Var n2 = ag::rmsnorm(c.t, h, c.req("post_attention_layernorm.weight"), eps);
  ag::Var m = ag::swiglu(c.t, c.linear("gate_proj", n2), c.linear("up_proj", n2));
  return c.linear_residual("down_proj", m, h);
}

// HF OPTDecoderLayer. Pre-LN (do_layer_norm_before): h = x + attn(ln1(x)); out = h + fc2(relu(fc1(ln2(h)))).
// Post-LN (OPT-350m): h = ln1(x + attn(x)); out = ln2(h + fc2(relu(fc1(h)))).
ag::Var opt_block(const BlockCtx& c, const ModelConfig& cfg, const ag::Var& x) {
  float eps = cfg.norm_eps;
  auto ln = [&](const char* name, const ag::Var& v) {
    std::string n = name;
    return ag::layernorm(c.t, v, c.req(n + ".weight"), c.req(n + ".bias"), eps);
  };
  if (cfg.do_layer_norm_before) {
    ag::Var h = self_attention(c, cfg, ln("self_attn_layer_norm", x), "out_proj", x);
    ag::Var m = ag::relu(c.t, c.linear("fc1", ln("final_layer_norm", h)));
    return c.linear_residual("fc2", m, h);
  }
  ag::Var h = ln("self_attn_layer_norm", self_attention(c, cfg, x, "out_proj", x));
  ag::Var m = ag::relu(c.t, c.linear("fc1", h));
  return ln("final_layer_norm", c.linear_residual("fc2", m, h));
}

}  // namespace

std::vector<std::string> block_linear_sites(const ModelConfig& cfg) {
  if (cfg.is_llama()) return {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"};
  return {"q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"};
}

std::vector<TransformPair> block_transform_pairs(const ModelConfig& cfg) {
  using K = TransformPair::Kind;
  int64_t C = cfg.hidden_size, kv = cfg.kv_dim();
  if (cfg.is_llama()) {
    return {
        {"qkv", K::norm_to_linears, "input_layernorm", {"q_proj", "k_proj", "v_proj"}, C, false},
        {"out", K::rows_to_columns, "v_proj", {"o_proj"}, kv, cfg.attention_bias},
        {"fc1", K::norm_to_linears, "post_attention_layernorm", {"gate_proj", "up_proj"}, C, false},
        {"qkt", K::q_rows_to_k_rows, "q_proj", {"k_proj"}, kv, cfg.attention_bias},
    };
  }
  // OPT (pre-LN only: with post-LN the norm is not the consumers' producer).
  if (!cfg.do_layer_norm_before) return {};
  bool affine = cfg.layer_norm_elementwise_affine;
  return {
      {"qkv", K::norm_to_linears, "self_attn_layer_norm", {"q_proj", "k_proj", "v_proj"}, C, affine},
      {"out", K::rows_to_columns, "v_proj", {"out_proj"}, kv, cfg.enable_bias},
      {"fc1", K::norm_to_linears, "final_layer_norm", {"fc1"}, C, affine},
      {"qkt", K::q_rows_to_k_rows, "q_proj", {"k_proj"}, kv, cfg.enable_bias},
  };
}

std::map<std::string, ag::Var> block_params(const BlockWeights& w) {
  std::map<std::string, ag::Var> out;
  for (const auto& [key, tensor] : w.tensors) out[key] = ag::constant(tensor.alias(), key);
  return out;
}

ag::Var decoder_block_forward(ag::Tape& t, const ModelConfig& cfg, const std::map<std::string, ag::Var>& params,
                              const ag::Var& x, BlockHooks* hooks) {
  OMNIQ_CHECK(x->value.ndim() == 3 && x->value.size(2) == cfg.hidden_size,
              "decoder block: input must be [B, T, %lld], got %s", static_cast<long long>(cfg.hidden_size),
              x->value.str().c_str());
  BlockCtx c{t, params, hooks};
  return cfg.is_llama() ? llama_block(c, cfg, x) : opt_block(c, cfg, x);
}

Tensor decoder_block_forward(const ModelConfig& cfg, const BlockWeights& w, const Tensor& x) {
  ag::Tape t;
  ag::Var y = decoder_block_forward(t, cfg, block_params(w), ag::constant(x.alias()), nullptr);
  return std::move(y->value);
}

}  // namespace omniq
