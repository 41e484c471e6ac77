// The GEMM / epilogue fusions at the autograd level (autograd/functions.h): a graph and whole
// decoder blocks (LLaMA, OPT pre-LN, OPT post-LN) give the same outputs and gradients with the
// fusions on and off (set_gemm_fusion_enabled; OMNIQ_NO_GEMM_FUSION=1 in the environment), the fused
// graph is smaller, and its gradients match finite differences. CPU in f32 (the fused and unfused
// f32 paths do the same fp32 operations, so they agree to rounding noise); CUDA in f32 and bf16.
#include <cmath>
#include <cstdlib>
#include <map>
#include <string>
#include <vector>

#include "autograd/functions.h"
#include "models/decoder_block.h"
#include "ops/norm.h"
#include "runtime/error.h"
#include "tests/support/test_support.h"

namespace omniq {
namespace {

using test::all_close;
using test::check_gradient;
using test::max_rel_error;

struct FusionScope {
  unsigned before;
  explicit FusionScope(bool on) : before(ag::gemm_fusion_parts()) { ag::set_gemm_fusion_enabled(on); }
  ~FusionScope() { ag::set_gemm_fusion_parts(before); }
};

// loss = Σ y ⊙ c as a graph (dy of y is exactly c).
ag::Var weighted_sum(ag::Tape& t, const ag::Var& y, const Tensor& c) {
  const int64_t n = y->value.numel();
  ag::Var flat = ag::reshape(t, y, {1, n});
  return ag::reshape(t, ag::linear(t, flat, ag::constant(c.reshape({1, n}))), {1});
}

ag::Var leaf(Tensor v) {  // an activation-like leaf: takes a gradient of its own dtype
  ag::Var x = ag::constant(std::move(v));
  x->requires_grad = true;
  return x;
}

// ---------------------------------------------------------------------------------------------
// A small graph: n = rmsnorm(x); s = n·W1ᵀ + n·W2ᵀ (n's dx accumulated by the second GEMM);
// h = x + s·W3ᵀ + b3 (residual epilogue); out = h + rmsnorm(h)·W4ᵀ (h: residual gradient first,
// then the norm's dx added in place).

struct Graph {
  ag::Var x, g1, g2, w1, w2, w3, b3, w4;
  Tensor c;
};

Graph make_graph(Device d) {
  Graph g;
  g.x = ag::parameter(Tensor::uniform({2, 5, 24}, -1, 1, 1).to(d), "x");
  g.g1 = ag::parameter(Tensor::uniform({24}, 0.8f, 1.2f, 2).to(d), "g1");
  g.g2 = ag::parameter(Tensor::uniform({24}, 0.8f, 1.2f, 3).to(d), "g2");
  g.w1 = ag::parameter(Tensor::uniform({16, 24}, -0.4f, 0.4f, 4).to(d), "w1");
  g.w2 = ag::parameter(Tensor::uniform({16, 24}, -0.4f, 0.4f, 5).to(d), "w2");
  g.w3 = ag::parameter(Tensor::uniform({24, 16}, -0.4f, 0.4f, 6).to(d), "w3");
  g.b3 = ag::parameter(Tensor::uniform({24}, -0.2f, 0.2f, 7).to(d), "b3");
  g.w4 = ag::parameter(Tensor::uniform({24, 24}, -0.4f, 0.4f, 8).to(d), "w4");
  g.c = Tensor::uniform({2, 5, 24}, -1, 1, 9).to(d);
  return g;
}

ag::Var graph_loss(ag::Tape& t, const Graph& g) {
  ag::Var n = ag::rmsnorm(t, g.x, g.g1, 1e-5f);
  ag::Var a = ag::linear(t, n, g.w1);
  ag::Var b = ag::linear(t, n, g.w2);
  ag::Var s = ag::add(t, a, b);
  ag::Var h = ag::linear_residual(t, s, g.w3, g.b3, g.x);
  ag::Var out = ag::linear_residual(t, ag::rmsnorm(t, h, g.g2, 1e-5f), g.w4, nullptr, h);
  return weighted_sum(t, out, g.c);
}

std::vector<ag::Var> graph_params(const Graph& g) { return {g.x, g.g1, g.g2, g.w1, g.w2, g.w3, g.b3, g.w4}; }

// Loss value, every parameter gradient (on the host) and the tape length.
struct Result {
  float loss = 0;
  std::vector<Tensor> grads;
  size_t nodes = 0;
};

Result run_graph(Device d, bool fused) {
  FusionScope scope(fused);
  Graph g = make_graph(d);
  ag::Tape t;
  ag::Var loss = graph_loss(t, g);
  Result r;
  r.nodes = t.size();
  t.backward(loss);
  r.loss = loss->value.to(Device::cpu()).item();
  for (const ag::Var& p : graph_params(g)) r.grads.push_back(p->grad.to(Device::cpu()));
  return r;
}

void expect_same(const Result& got, const Result& ref, float atol, float rtol) {
  EXPECT_NEAR(got.loss, ref.loss, atol + rtol * std::fabs(ref.loss));
  ASSERT_EQ(got.grads.size(), ref.grads.size());
  for (size_t i = 0; i < ref.grads.size(); ++i) EXPECT_TRUE(all_close(got.grads[i], ref.grads[i], atol, rtol)) << i;
}

TEST(GemmFusionAutograd, GraphGradientsEqualUnfusedOnCpu) {
  Result fused = run_graph(Device::cpu(), true), plain = run_graph(Device::cpu(), false);
  EXPECT_EQ(fused.nodes + 2, plain.nodes);  // two residual adds live in GEMM epilogues
  // f32: the same fp32 operations (sum of the GEMM and the residual, old gradient + new) in the
  // same order on the CPU: equal to rounding noise.
  expect_same(fused, plain, 1e-6f, 1e-5f);
}

TEST(GemmFusionAutograd, EachPartAloneGivesTheSameGradients) {
  // The A/B switch can turn parts off one by one (OMNIQ_NO_GEMM_FUSION=dx etc.): every mix is valid.
  Result plain = run_graph(Device::cpu(), false);
  for (unsigned parts = 1; parts < ag::kFuseAll; ++parts) {
    SCOPED_TRACE(testing::Message() << "parts " << parts);
    const unsigned before = ag::gemm_fusion_parts();
    ag::set_gemm_fusion_parts(parts);
    Graph g = make_graph(Device::cpu());
    ag::Tape t;
    ag::Var loss = graph_loss(t, g);
    EXPECT_EQ(t.size() + ((parts & ag::kFuseResidual) ? 2 : 0), plain.nodes);
    t.backward(loss);
    Result r;
    r.loss = loss->value.item();
    for (const ag::Var& p : graph_params(g)) r.grads.push_back(p->grad.to(Device::cpu()));
    ag::set_gemm_fusion_parts(before);
    expect_same(r, plain, 1e-6f, 1e-5f);
  }
}

TEST(GemmFusionAutograd, FusedGraphMatchesFiniteDifferences) {
  FusionScope scope(true);
  Graph g = make_graph(Device::cpu());
  ag::Tape t;
  t.backward(graph_loss(t, g));
  auto f = [&] {
    ag::Tape t2;
    return static_cast<double>(graph_loss(t2, g)->value.item());
  };
  for (const ag::Var& p : graph_params(g))
    EXPECT_TRUE(check_gradient(p->value, f, p->grad, 1e-2, 1e-3, 2e-2)) << p->name;
}

TEST(GemmFusionAutograd, EnvironmentSwitch) {
  const char* saved = std::getenv("OMNIQ_NO_GEMM_FUSION");
  const std::string saved_value = saved ? saved : "";
  ::unsetenv("OMNIQ_NO_GEMM_FUSION");
  EXPECT_TRUE(ag::gemm_fusion_env_default());
  ::setenv("OMNIQ_NO_GEMM_FUSION", "1", 1);
  EXPECT_FALSE(ag::gemm_fusion_env_default());
  ::setenv("OMNIQ_NO_GEMM_FUSION", "0", 1);
  EXPECT_TRUE(ag::gemm_fusion_env_default());
  ::setenv("OMNIQ_NO_GEMM_FUSION", "dx", 1);
  EXPECT_FALSE(ag::gemm_fusion_env_default());
  using ag::gemm_fusion_parts_from_env;
  EXPECT_EQ(gemm_fusion_parts_from_env("all"), 0u);
  EXPECT_EQ(gemm_fusion_parts_from_env(""), unsigned{ag::kFuseAll});
  EXPECT_EQ(gemm_fusion_parts_from_env("dx"), unsigned{ag::kFuseResidual | ag::kFuseNorm});
  EXPECT_EQ(gemm_fusion_parts_from_env("norm,residual"), unsigned{ag::kFuseDx});
  EXPECT_THROW(gemm_fusion_parts_from_env("dx,bogus"), Error);
  if (saved) ::setenv("OMNIQ_NO_GEMM_FUSION", saved_value.c_str(), 1);
  else ::unsetenv("OMNIQ_NO_GEMM_FUSION");
}

// out = norm(x) + x in bf16: x's gradient arrives first from the add (a copy of dy = c), then the
// norm's dx. Fused, the norm's dx kernel adds into it: one rounding of c + dx_f32. Unfused: dx is
// rounded to bf16, then added: two roundings. Over 512 random elements some of the two differ, so
// exact equality with each reference shows which path ran.
TEST(GemmFusionAutograd, NormBackwardAddsIntoTheGradientWithOneRounding) {
  for (bool layer : {false, true}) {
    SCOPED_TRACE(layer ? "layernorm" : "rmsnorm");
    const Tensor x0 = Tensor::uniform({8, 64}, -2, 2, 61, DType::bf16);
    const Tensor w = Tensor::uniform({64}, 0.5f, 1.5f, 62), b = Tensor::uniform({64}, -0.5f, 0.5f, 63);
    const Tensor c = Tensor::uniform({8, 64}, -1, 1, 64, DType::bf16);
    // References from the op API: dx in f32 from the same (bf16-valued) inputs.
    Tensor mean, rstd;
    if (layer) layernorm_forward(x0, w, b, 1e-5f, &mean, &rstd);
    else rmsnorm_forward(x0, w, 1e-5f, &rstd);
    const Tensor x32 = x0.to(DType::f32), c32 = c.to(DType::f32);
    const Tensor dx32 = layer ? layernorm_backward(c32, x32, w, mean, rstd, true, false, false).dx
                              : rmsnorm_backward(c32, x32, w, rstd, true, false).dx;
    const std::vector<float> cv = c32.to_f32_vector(), dv = dx32.to_f32_vector();
    const std::vector<float> dv16 = Tensor::from_f32(dv, {8, 64}, DType::bf16).to_f32_vector();
    std::vector<float> once(cv.size()), twice(cv.size());
    for (size_t i = 0; i < cv.size(); ++i) once[i] = cv[i] + dv[i], twice[i] = cv[i] + dv16[i];
    const Tensor ref_once = Tensor::from_f32(once, {8, 64}, DType::bf16);
    const Tensor ref_twice = Tensor::from_f32(twice, {8, 64}, DType::bf16);
    ASSERT_FALSE(all_close(ref_once, ref_twice, 0, 0)) << "test data should tell the two paths apart";
    for (bool on : {true, false}) {
      FusionScope scope(on);
      ag::Var x = leaf(x0.clone());
      ag::Tape t;
      ag::Var n = layer ? ag::layernorm(t, x, ag::constant(w.alias()), ag::constant(b.alias()), 1e-5f)
                        : ag::rmsnorm(t, x, ag::constant(w.alias()), 1e-5f);
      t.backward(weighted_sum(t, ag::add(t, n, x), c));
      EXPECT_TRUE(all_close(x->grad, on ? ref_once : ref_twice, 0, 0)) << "fusion " << on;
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Decoder blocks

enum class Arch { llama, opt_pre, opt_post };
const char* arch_name(Arch a) { return a == Arch::llama ? "llama" : a == Arch::opt_pre ? "opt pre-LN" : "opt post-LN"; }

ModelConfig tiny_config(Arch a) {
  ModelConfig cfg;
  cfg.arch = a == Arch::llama ? ModelArch::llama : ModelArch::opt;
  cfg.model_type = a == Arch::llama ? "llama" : "opt";
  cfg.hidden_size = 32;
  cfg.intermediate_size = 48;
  cfg.num_layers = 1;
  cfg.num_heads = 4;
  cfg.num_kv_heads = a == Arch::llama ? 2 : 4;
  cfg.head_dim = 8;
  cfg.max_position_embeddings = 64;
  cfg.vocab_size = 64;
  cfg.do_layer_norm_before = a != Arch::opt_post;
  return cfg;
}

// Block parameters: Linear weights (and OPT biases) in `dt` on `d`, trainable either as f32
// parameters (dt f32) or as leaves of dtype dt with their own gradient (bf16, as a fake-quantized
// ŵ); norm weights/biases always f32 parameters.
std::map<std::string, ag::Var> block_vars(const ModelConfig& cfg, DType dt, Device d) {
  std::map<std::string, ag::Var> m;
  uint64_t seed = 100;
  const int64_t C = cfg.hidden_size, F = cfg.intermediate_size, q = cfg.q_dim(), kv = cfg.kv_dim();
  auto lin = [&](const std::string& site, int64_t out, int64_t in, bool bias) {
    Tensor w = Tensor::uniform({out, in}, -0.3f, 0.3f, seed++).to(dt).to(d);
    m[site + ".weight"] = dt == DType::f32 ? ag::parameter(std::move(w), site) : leaf(std::move(w));
    if (bias) {
      Tensor b = Tensor::uniform({out}, -0.1f, 0.1f, seed++).to(dt).to(d);
      m[site + ".bias"] = dt == DType::f32 ? ag::parameter(std::move(b), site + ".b") : leaf(std::move(b));
    }
  };
  auto norm = [&](const std::string& name, bool bias) {
    m[name + ".weight"] = ag::parameter(Tensor::uniform({C}, 0.8f, 1.2f, seed++).to(d), name);
    if (bias) m[name + ".bias"] = ag::parameter(Tensor::uniform({C}, -0.1f, 0.1f, seed++).to(d), name + ".b");
  };
  if (cfg.is_llama()) {
    norm("input_layernorm", false);
    norm("post_attention_layernorm", false);
    lin("q_proj", q, C, false), lin("k_proj", kv, C, false), lin("v_proj", kv, C, false);
    lin("o_proj", C, q, false);
    lin("gate_proj", F, C, false), lin("up_proj", F, C, false), lin("down_proj", C, F, false);
  } else {
    norm("self_attn_layer_norm", true);
    norm("final_layer_norm", true);
    lin("q_proj", q, C, true), lin("k_proj", kv, C, true), lin("v_proj", kv, C, true);
    lin("out_proj", C, q, true);
    lin("fc1", F, C, true), lin("fc2", C, F, true);
  }
  return m;
}

struct BlockResult {
  Tensor out;
  std::map<std::string, Tensor> grads;  // every block tensor and "x"
  size_t nodes = 0;
};

BlockResult run_block(Arch a, DType dt, Device d, bool fused) {
  FusionScope scope(fused);
  const ModelConfig cfg = tiny_config(a);
  std::map<std::string, ag::Var> params = block_vars(cfg, dt, d);
  ag::Var x = leaf(Tensor::uniform({2, 7, cfg.hidden_size}, -1, 1, 7).to(dt).to(d));
  ag::Tape t;
  ag::Var y = decoder_block_forward(t, cfg, params, x);
  BlockResult r;
  r.nodes = t.size();
  t.backward(weighted_sum(t, y, Tensor::uniform({2, 7, cfg.hidden_size}, -1, 1, 8).to(dt).to(d)));
  r.out = y->value.to(Device::cpu()).to(DType::f32);
  for (const auto& [k, v] : params) r.grads[k] = v->grad.to(Device::cpu()).to(DType::f32);
  r.grads["x"] = x->grad.to(Device::cpu()).to(DType::f32);
  return r;
}

// f32: atol/rtol as given. bf16: scaled error max|a−b| / max|ref| <= tol (the fused path drops
// roundings, so single elements move by a few bf16 ulps of the tensor's scale).
void compare_blocks(Arch a, DType dt, Device d, float atol, float rtol) {
  SCOPED_TRACE(testing::Message() << arch_name(a) << " " << dtype_name(dt) << " on " << d.str());
  BlockResult fused = run_block(a, dt, d, true), plain = run_block(a, dt, d, false);
  EXPECT_EQ(fused.nodes + 2, plain.nodes);
  auto check = [&](const Tensor& got, const Tensor& ref, const std::string& what) {
    ASSERT_TRUE(got.defined() && ref.defined()) << what;
    if (dt == DType::f32) EXPECT_TRUE(all_close(got, ref, atol, rtol)) << what;
    else EXPECT_LE(max_rel_error(got.to_f32_vector(), ref.to_f32_vector()), rtol) << what;
  };
  check(fused.out, plain.out, "out");
  ASSERT_EQ(fused.grads.size(), plain.grads.size());
  for (const auto& [k, g] : plain.grads) {
    // d k_proj.bias is zero in exact arithmetic (a key bias adds q·b to a whole score row, which
    // the softmax ignores): in bf16 it is rounding noise, not comparable relative to itself.
    if (dt != DType::f32 && k == "k_proj.bias") continue;
    check(fused.grads.at(k), g, "d " + k);
  }
}

TEST(GemmFusionAutograd, DecoderBlocksEqualUnfusedOnCpu) {
  for (Arch a : {Arch::llama, Arch::opt_pre, Arch::opt_post}) compare_blocks(a, DType::f32, Device::cpu(), 1e-6f, 1e-5f);
}

TEST(GemmFusionAutograd, DecoderBlocksBf16CloseToUnfusedOnCpu) {
  for (Arch a : {Arch::llama, Arch::opt_pre, Arch::opt_post}) compare_blocks(a, DType::bf16, Device::cpu(), 0, 2e-2f);
}

TEST(GemmFusionAutogradCuda, GraphMatchesCpuAndUnfused) {
  OMNIQ_REQUIRE_CUDA();
  Result cpu = run_graph(Device::cpu(), true);
  Result fused = run_graph(Device::cuda(), true), plain = run_graph(Device::cuda(), false);
  // CUDA vs CPU f32: other summation orders through two norms and four GEMMs: 1e-4 / 1e-3. Fused
  // vs unfused on CUDA: fp32 GEMM accumulator + C rounded once either way (f32 output), up to the
  // algorithm cuBLASLt picks with beta = 1: 1e-5 / 1e-4.
  expect_same(fused, cpu, 1e-4f, 1e-3f);
  expect_same(fused, plain, 1e-5f, 1e-4f);
}

TEST(GemmFusionAutogradCuda, DecoderBlocksEqualUnfused) {
  OMNIQ_REQUIRE_CUDA();
  for (Arch a : {Arch::llama, Arch::opt_pre, Arch::opt_post}) {
    compare_blocks(a, DType::f32, Device::cuda(), 1e-4f, 1e-4f);  // attention and softmax amplify GEMM-order noise
    compare_blocks(a, DType::bf16, Device::cuda(), 0, 2e-2f);
  }
}

TEST(GemmFusionAutogradCuda, DecoderBlocksMatchCpuF32) {
  OMNIQ_REQUIRE_CUDA();
  for (Arch a : {Arch::llama, Arch::opt_pre, Arch::opt_post}) {
    SCOPED_TRACE(arch_name(a));
    BlockResult ref = run_block(a, DType::f32, Device::cpu(), true), got = run_block(a, DType::f32, Device::cuda(), true);
    // f32 on both sides, other summation orders: 1e-4 / 1e-3 (a wrong or missing term is O(1)).
    EXPECT_TRUE(all_close(got.out, ref.out, 1e-4f, 1e-3f)) << "out";
    for (const auto& [k, g] : ref.grads) EXPECT_TRUE(all_close(got.grads.at(k), g, 1e-4f, 1e-3f)) << "d " << k;
  }
}

}  // namespace
}  // namespace omniq
