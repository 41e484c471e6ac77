// Fake quantizers on the CPU: hand-computed values, the scalar oracle (bit for bit) over bits /
// group sizes / symmetric / LWC, the backward against a double chain rule and against finite
// differences of the STE-defined function, errors, and the PyTorch fixtures of
// tests/reference/make_quant_fixtures.py (skipped when absent). CUDA: test_fake_quant_cuda.cpp.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("fp-contract=off")  // the fp32 oracle must round like the op
#endif
#include <cmath>
#include <cstdio>
#include <fstream>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "ops/fake_quant.h"
#include "runtime/error.h"
#include "tests/fake_quant_test_util.h"
#include "tests/support/test_support.h"

using namespace omniq;
using namespace omniq::test;

namespace {

struct Case {
  int bits;
  int group;  // 0 = per channel
  bool symmetric;
  bool lwc;
};

std::vector<Case> all_cases() {
  std::vector<Case> cs;
  for (int bits : {2, 3, 4, 8})
    for (int group : {0, 32, 64, 128})
      for (bool sym : {false, true})
        for (bool lwc : {false, true}) cs.push_back({bits, group, sym, lwc});
  return cs;
}

std::string name(const Case& c) {
  return "W" + std::to_string(c.bits) + (c.group ? " g" + std::to_string(c.group) : " per-channel") +
         (c.symmetric ? " sym" : " asym") + (c.lwc ? " lwc" : "");
}

Tensor f32(const std::vector<float>& v, const Shape& s) { return Tensor::from_f32(v, s); }

}  // namespace

// ---------------------------------------------------------------------------------------------
// Values

TEST(FakeQuantCpu, HandComputedGroups) {
  // g = 4, 2 bits (levels 0..3). Row 0: xmax 1.5, xmin 0 -> scale 0.5, zp 0; 0.25/0.5 = 0.5 rounds to
  // 0 (half to even). Row 1: all positive 1..4 -> scale 1, zp = round(-1) = -1, the range [1, 4] does
  // not contain 0 and is represented exactly. Row 2: constant 0.7 -> range 0, scale clamps to 1e-5,
  // zp = round(clamp(-70000)) = -1e4, q = clamp(70000 - 1e4, 0, 3) = 3 -> x̂ = 10003·1e-5 (the
  // reference code's behaviour on a constant group). Row 3: all zeros stay zero.
  Tensor w = f32({0, 0.25f, 0.5f, 1.5f, 1, 2, 3, 4, 0.7f, 0.7f, 0.7f, 0.7f, 0, 0, 0, 0}, {4, 4});
  const std::vector<float> y = fake_quant_weight_forward(w, {2, 4}, nullptr, nullptr).to_f32_vector();
  const float c = 10003.0f * 1e-5f;
  EXPECT_TRUE(bit_equal(y, {0, 0, 0.5f, 1.5f, 1, 2, 3, 4, c, c, c, c, 0, 0, 0, 0}));
  // Symmetric 3 bits: scale = 1.4/3, levels -4..3; -1.4/scale = -3 and 1.4/scale = 3 (exact ends).
  Tensor s = f32({-1.4f, 0.1f, 0.3f, 1.4f}, {1, 4});
  const float sc = 1.4f / 3.0f;
  const std::vector<float> ys = fake_quant_weight_forward(s, {3, 0, true}, nullptr, nullptr).to_f32_vector();
  EXPECT_TRUE(bit_equal(ys, {-3 * sc, 0, 1 * sc, 3 * sc}));
}

TEST(FakeQuantCpu, WeightMatchesScalarFormulaBitForBit) {
  const int64_t out = 8, in = 256;
  for (const Case& c : all_cases()) {
    SCOPED_TRACE(name(c));
    const WeightQuantSpec spec{c.bits, c.group, c.symmetric};
    const int64_t n = spec.group_len(in), groups = spec.num_groups(out, in);
    const std::vector<float> wv = make_groups(groups, n, 11);
    std::vector<float> gv = Tensor::uniform({groups}, -1.0f, 5.0f, 12).to_f32_vector();
    std::vector<float> bv = Tensor::uniform({groups}, -1.0f, 5.0f, 13).to_f32_vector();
    Tensor w = f32(wv, {out, in}), gamma = f32(gv, {groups}), beta = f32(bv, {groups, 1});
    Tensor y = fake_quant_weight_forward(w, spec, c.lwc ? &gamma : nullptr, c.lwc ? &beta : nullptr);
    ASSERT_EQ(y.shape(), w.shape());
    const RefQuant r = ref_forward(wv, {n, c.bits, c.symmetric}, c.lwc ? &gv : nullptr, c.lwc ? &bv : nullptr);
    EXPECT_TRUE(bit_equal(y.to_f32_vector(), r.y));
    if (!c.symmetric && c.group) EXPECT_LT(r.zp[1], 0.0f) << "the all-positive group should have zp < 0";
    // bf16 data: the same math on the bf16 values, the result rounded once to bf16.
    Tensor wb = w.to(DType::bf16);
    const std::vector<float> wbv = wb.to_f32_vector();
    Tensor yb = fake_quant_weight_forward(wb, spec, c.lwc ? &gamma : nullptr, c.lwc ? &beta : nullptr);
    ASSERT_EQ(yb.dtype(), DType::bf16);
    std::vector<float> rb = ref_forward(wbv, {n, c.bits, c.symmetric}, c.lwc ? &gv : nullptr, c.lwc ? &bv : nullptr).y;
    for (float& e : rb) e = round_bf16(e);
    EXPECT_TRUE(bit_equal(yb.to_f32_vector(), rb));
  }
}

TEST(FakeQuantCpu, SixteenBitsIsIdentity) {
  Tensor w = Tensor::uniform({4, 64}, -1, 1, 3);
  EXPECT_TRUE(bit_equal(fake_quant_weight_forward(w, {16, 32}, nullptr, nullptr).to_f32_vector(), w.to_f32_vector()));
  Tensor dy = Tensor::uniform({4, 64}, -1, 1, 4);
  Tensor g = Tensor::full({8}, 4.0f, DType::f32), b = Tensor::full({8}, 4.0f, DType::f32);
  FakeQuantWeightGrads gr = fake_quant_weight_backward(dy, w, {16, 32}, &g, &b, true);
  EXPECT_TRUE(bit_equal(gr.dw.to_f32_vector(), dy.to_f32_vector()));
  EXPECT_TRUE(bit_equal(gr.dgamma.to_f32_vector(), std::vector<float>(8, 0.0f)));
  Tensor x = Tensor::uniform({3, 10}, -1, 1, 5);
  EXPECT_TRUE(bit_equal(fake_quant_act_forward(x, 16).to_f32_vector(), x.to_f32_vector()));
  EXPECT_TRUE(bit_equal(fake_quant_act_backward(dy.reshape({8, 32}), dy.reshape({8, 32}), 32).to_f32_vector(),
                        dy.to_f32_vector()));
}

TEST(FakeQuantCpu, ActivationIsPerRowOfLastDim) {
  // [B, T, H, D]: each (token, head) row of D is its own group (how Q/K/V are quantized).
  const int64_t B = 2, T = 3, H = 4, D = 16;
  std::vector<float> xv = make_groups(B * T * H, D, 21);
  Tensor x = f32(xv, {B, T, H, D});
  for (int bits : {4, 8}) {
    Tensor y = fake_quant_act_forward(x, bits);
    ASSERT_EQ(y.shape(), x.shape());
    EXPECT_TRUE(bit_equal(y.to_f32_vector(), ref_forward(xv, {D, bits}, nullptr, nullptr).y)) << bits;
  }
  // Odd row length.
  std::vector<float> ov = make_groups(7, 33, 22);
  EXPECT_TRUE(bit_equal(fake_quant_act_forward(f32(ov, {7, 33}), 3).to_f32_vector(),
                        ref_forward(ov, {33, 3}, nullptr, nullptr).y));
}

TEST(FakeQuantCpu, AbsFloorSte) {
  Tensor s = f32({-0.5f, -0.005f, 0.0f, 0.003f, 0.02f, -0.0f, 1e-2f}, {7});
  EXPECT_TRUE(bit_equal(abs_floor_ste(s, 1e-2f).to_f32_vector(), {-0.5f, -1e-2f, 1e-2f, 1e-2f, 0.02f, 1e-2f, 1e-2f}));
  Tensor dy = Tensor::uniform({7}, -1, 1, 9);
  EXPECT_TRUE(bit_equal(abs_floor_ste_backward(dy).to_f32_vector(), dy.to_f32_vector()));
  EXPECT_THROW(abs_floor_ste(s, 0.0f), Error);
}

// ---------------------------------------------------------------------------------------------
// Gradients

// The op's backward against the double chain rule (ties, constant groups, clamps included).
TEST(FakeQuantCpu, BackwardMatchesDoubleChainRule) {
  const int64_t out = 8, in = 256;
  for (const Case& c : all_cases()) {
    SCOPED_TRACE(name(c));
    const WeightQuantSpec spec{c.bits, c.group, c.symmetric};
    const int64_t n = spec.group_len(in), groups = spec.num_groups(out, in);
    const std::vector<float> wv = make_groups(groups, n, 31);
    const std::vector<float> dyv = Tensor::uniform({out * in}, -1.0f, 1.0f, 32).to_f32_vector();
    std::vector<float> gv = Tensor::uniform({groups}, -1.0f, 5.0f, 33).to_f32_vector();
    std::vector<float> bv = Tensor::uniform({groups}, -1.0f, 5.0f, 34).to_f32_vector();
    Tensor w = f32(wv, {out, in}), dy = f32(dyv, {out, in}), gamma = f32(gv, {groups}), beta = f32(bv, {groups});
    FakeQuantWeightGrads g =
        fake_quant_weight_backward(dy, w, spec, c.lwc ? &gamma : nullptr, c.lwc ? &beta : nullptr, true);
    const RefQuant f = ref_forward(wv, {n, c.bits, c.symmetric}, c.lwc ? &gv : nullptr, c.lwc ? &bv : nullptr);
    const RefGrads r = ref_backward(wv, dyv, {n, c.bits, c.symmetric}, f, c.lwc);
    const std::vector<float> rdx = to_float(r.dx);
    EXPECT_TRUE(all_close(g.dw.to_f32_vector(), rdx, 1e-5f * max_abs(rdx), 1e-4f)) << "dw";
    if (c.lwc) {
      const std::vector<float> rdg = to_float(r.dgamma), rdb = to_float(r.dbeta);
      EXPECT_TRUE(all_close(g.dgamma.to_f32_vector(), rdg, 1e-5f * max_abs(rdg), 1e-4f)) << "dgamma";
      EXPECT_TRUE(all_close(g.dbeta.to_f32_vector(), rdb, 1e-5f * max_abs(rdb), 1e-4f)) << "dbeta";
      EXPECT_EQ(g.dbeta.shape(), beta.shape());
      EXPECT_GT(f.clamped, 0) << "random LWC should clip some weights (exercises the clamped branch)";
      // Without dw only the LWC gradients come back, with the same values.
      FakeQuantWeightGrads g2 = fake_quant_weight_backward(dy, w, spec, &gamma, &beta, false);
      EXPECT_FALSE(g2.dw.defined());
      EXPECT_TRUE(bit_equal(g2.dgamma.to_f32_vector(), g.dgamma.to_f32_vector()));
    } else {
      EXPECT_FALSE(g.dgamma.defined());
    }
  }
}

TEST(FakeQuantCpu, TiesShareTheMaxGradientEvenly) {
  // One group of 4 with two maxima and two minima, per-channel 4 bits, no LWC: the gradient through
  // xmax (= dscale/15) is split in half between the two 2.0 entries, as torch.amax's backward.
  Tensor w = f32({2.0f, -1.0f, 2.0f, -1.0f}, {1, 4});
  Tensor dy = f32({0.3f, -0.2f, 0.5f, 0.7f}, {1, 4});
  const std::vector<float> dx = fake_quant_weight_backward(dy, w, {4, 0}, nullptr, nullptr, true).dw.to_f32_vector();
  // scale = 3/15 = 0.2, every x/scale is an integer (in range, round(u) − u = 0): dscale = 0, dx = dy.
  EXPECT_TRUE(all_close(dx, {0.3f, -0.2f, 0.5f, 0.7f}, 1e-6f, 1e-6f));
  Tensor w2 = f32({2.0f, -1.0f, 2.0f, 0.13f}, {1, 4});
  const RefQuant f = ref_forward(w2.to_f32_vector(), {4, 4}, nullptr, nullptr);
  const float dscale = 0.7f * (f.t[3] - 0.13f / f.scale[0]);  // only x = 0.13 has a rounding residual
  const std::vector<float> dx2 = fake_quant_weight_backward(dy, w2, {4, 0}, nullptr, nullptr, true).dw.to_f32_vector();
  EXPECT_NEAR(dx2[0], 0.3f + dscale / 15 / 2, 1e-6f);
  EXPECT_NEAR(dx2[2], 0.5f + dscale / 15 / 2, 1e-6f);
  EXPECT_NEAR(dx2[1], -0.2f - dscale / 15, 1e-6f);
  EXPECT_NEAR(dx2[3], 0.7f, 1e-6f);
}

// Finite differences of the STE-defined function (rounding offsets, clamp decisions and zero
// points frozen at the unperturbed point) against the op's dγ, dβ and dw.
TEST(FakeQuantCpu, GradientsMatchFiniteDifferencesOfSteFunction) {
  const int64_t out = 4, in = 64;
  struct Fd { int bits, group; bool sym, lwc; };
  for (const Fd& c : {Fd{4, 0, false, true}, Fd{3, 32, false, true}, Fd{2, 16, false, true}, Fd{4, 32, true, true},
                      Fd{3, 0, false, false}, Fd{4, 16, true, false}}) {
    SCOPED_TRACE("W" + std::to_string(c.bits) + " g" + std::to_string(c.group) + (c.sym ? " sym" : "") +
                 (c.lwc ? " lwc" : ""));
    const WeightQuantSpec spec{c.bits, c.group, c.sym};
    const int64_t n = spec.group_len(in), groups = spec.num_groups(out, in);
    const QuantCfg qc{n, c.bits, c.sym};
    Tensor w = f32(make_groups(groups, n, 41, /*plant=*/false), {out, in});
    Tensor dy = Tensor::uniform({out, in}, -1.0f, 1.0f, 42);
    Tensor gamma = Tensor::uniform({groups}, 0.0f, 3.0f, 43), beta = Tensor::uniform({groups}, 0.0f, 3.0f, 44);
    const std::vector<float> wv = w.to_f32_vector(), dyv = dy.to_f32_vector();
    const std::vector<float> gv = gamma.to_f32_vector(), bv = beta.to_f32_vector();
    const RefQuant f = ref_forward(wv, qc, c.lwc ? &gv : nullptr, c.lwc ? &bv : nullptr);
    const std::vector<double> off = frozen_offsets(wv, qc, f);
    if (c.lwc) EXPECT_GT(f.clamped, 0);
    auto loss = [&] {
      return ste_surrogate(w.to_f32_vector(), dyv, qc, f, off, c.lwc ? gamma.data_as<float>() : nullptr,
                           c.lwc ? beta.data_as<float>() : nullptr);
    };
    FakeQuantWeightGrads g =
        fake_quant_weight_backward(dy, w, spec, c.lwc ? &gamma : nullptr, c.lwc ? &beta : nullptr, true);
    if (c.lwc) {
      const double tol = 1e-4 * max_abs(g.dgamma.to_f32_vector());
      EXPECT_TRUE(check_gradient(gamma, loss, g.dgamma, 1e-3, tol, 2e-3, 1000)) << "dgamma";
      const double tolb = 1e-4 * max_abs(g.dbeta.to_f32_vector());
      EXPECT_TRUE(check_gradient(beta, loss, g.dbeta, 1e-3, tolb, 2e-3, 1000)) << "dbeta";
    }
    EXPECT_TRUE(check_gradient(w, loss, g.dw, 1e-4, 1e-5, 2e-3, 1000)) << "dw";
  }
}

TEST(FakeQuantCpu, ActivationBackwardMatchesFiniteDifferences) {
  const int64_t R = 6, C = 40;
  Tensor x = f32(make_groups(R, C, 51, false), {2, 3, C});
  Tensor dy = Tensor::uniform({2, 3, C}, -1.0f, 1.0f, 52);
  const std::vector<float> dyv = dy.to_f32_vector();
  for (int bits : {2, 4, 8}) {
    SCOPED_TRACE(bits);
    const QuantCfg qc{C, bits};
    const RefQuant f = ref_forward(x.to_f32_vector(), qc, nullptr, nullptr);
    const std::vector<double> off = frozen_offsets(x.to_f32_vector(), qc, f);
    Tensor dx = fake_quant_act_backward(dy, x, bits);
    ASSERT_EQ(dx.shape(), x.shape());
    auto loss = [&] { return ste_surrogate(x.to_f32_vector(), dyv, qc, f, off, nullptr, nullptr); };
    EXPECT_TRUE(check_gradient(x, loss, dx, 1e-4, 1e-5, 2e-3, 1000));
    const RefGrads r = ref_backward(x.to_f32_vector(), dyv, qc, f, false);
    EXPECT_TRUE(all_close(dx.to_f32_vector(), to_float(r.dx), 1e-6f, 1e-5f));
  }
}

// ---------------------------------------------------------------------------------------------
// Errors

TEST(FakeQuantCpu, ClearErrors) {
  auto message = [](auto&& f) {
    try {
      f();
    } catch (const Error& e) {
      return std::string(e.what());
    }
    return std::string("(no error)");
  };
  EXPECT_NE(message([] { WeightQuantSpec{4, 48}.validate(256, "q_proj"); })
                .find("group size 48 does not divide in_features 256 of q_proj"),
            std::string::npos);
  EXPECT_NE(message([] { WeightQuantSpec{9, 0}.validate(256, "q_proj"); })
                .find("wbits 9 unsupported: use 2..8, or 16 for no quantization"),
            std::string::npos);
  EXPECT_THROW(WeightQuantSpec({1, 0}).validate(256, "x"), Error);
  EXPECT_NO_THROW(WeightQuantSpec({16, 0}).validate(256, "x"));
  Tensor w = Tensor::uniform({4, 64}, -1, 1, 1);
  Tensor g = Tensor::full({8}, 4.0f, DType::f32), wrong = Tensor::full({4}, 4.0f, DType::f32);
  EXPECT_NE(message([&] { fake_quant_weight_forward(w, {4, 48}, nullptr, nullptr); }).find("does not divide"),
            std::string::npos);
  EXPECT_NE(message([&] { fake_quant_weight_forward(w, {4, 32}, &g, nullptr); }).find("both gamma"),
            std::string::npos);
  EXPECT_NE(message([&] { fake_quant_weight_forward(w, {4, 32}, &wrong, &wrong); }).find("one value per"),
            std::string::npos);
  EXPECT_THROW(fake_quant_act_forward(w, 1), Error);
  EXPECT_THROW(fake_quant_act_forward(w, 12), Error);
  EXPECT_THROW(fake_quant_act_backward(Tensor::uniform({4, 32}, -1, 1, 2), w, 4), Error);  // dy shape
}

// ---------------------------------------------------------------------------------------------
// PyTorch fixtures (tests/reference/make_quant_fixtures.py, written on the GPU machine)

namespace {

struct Fixtures {
  std::string dir;
  nlohmann::json index;
  Tensor load(const std::string& key) const {
    const auto& t = index.at("tensors").at(key);
    std::vector<int64_t> dims = t.at("shape").get<std::vector<int64_t>>();
    Shape shape(dims);
    std::vector<float> v(static_cast<size_t>(shape.numel()));
    std::ifstream in(dir + "/" + t.at("file").get<std::string>(), std::ios::binary);
    in.read(reinterpret_cast<char*>(v.data()), static_cast<std::streamsize>(v.size() * sizeof(float)));
    EXPECT_TRUE(in.good()) << "short fixture file for " << key;
    return Tensor::from_f32(v, shape);
  }
  Tensor get(const nlohmann::json& c, const char* field) const { return load(c.at(field).get<std::string>()); }
};

bool load_fixtures(Fixtures& f) {
  f.dir = source_path("tests/fixtures/quant");
  std::ifstream in(f.dir + "/index.json");
  if (!in.good()) return false;
  f.index = nlohmann::json::parse(in);
  return true;
}

// Gradients: PyTorch sums in another order; compare relative to the largest entry.
::testing::AssertionResult grad_close(const Tensor& got, const Tensor& ref) {
  return all_close(got.to_f32_vector(), ref.to_f32_vector(), 2e-5f * max_abs(ref.to_f32_vector()), 1e-4f);
}

}  // namespace

TEST(FakeQuantFixtures, WeightsMatchPyTorch) {
  Fixtures fx;
  if (!load_fixtures(fx)) GTEST_SKIP() << "no tests/fixtures/quant/index.json: run tests/reference/make_quant_fixtures.py";
  int checked = 0;
  for (const auto& c : fx.index.at("weight_cases")) {
    SCOPED_TRACE(c.at("name").get<std::string>());
    Tensor w = fx.get(c, "weight");
    const WeightQuantSpec spec{c.at("bits").get<int>(), c.at("group_size").get<int>()};
    const bool lwc = c.contains("gamma");
    Tensor gamma = lwc ? fx.get(c, "gamma") : Tensor();
    Tensor beta = lwc ? fx.get(c, "beta") : Tensor();
    Tensor y = fake_quant_weight_forward(w, spec, lwc ? &gamma : nullptr, lwc ? &beta : nullptr);
    // Same fp32 operations in the same order (σ in fp64 in both): equal up to the last bit.
    EXPECT_TRUE(all_close(y, fx.get(c, "y"), 0.0f, 1e-6f)) << "y";
    if (lwc) {
      Tensor dy = fx.get(c, "dy");
      FakeQuantWeightGrads g = fake_quant_weight_backward(dy, w, spec, &gamma, &beta, c.contains("dw"));
      EXPECT_TRUE(grad_close(g.dgamma, fx.get(c, "dgamma"))) << "dgamma";
      EXPECT_TRUE(grad_close(g.dbeta, fx.get(c, "dbeta"))) << "dbeta";
      if (c.contains("dw")) EXPECT_TRUE(grad_close(g.dw, fx.get(c, "dw"))) << "dw";
    }
    ++checked;
  }
  EXPECT_GT(checked, 0);
}

TEST(FakeQuantFixtures, ActivationsMatchPyTorch) {
  Fixtures fx;
  if (!load_fixtures(fx)) GTEST_SKIP() << "no tests/fixtures/quant/index.json: run tests/reference/make_quant_fixtures.py";
  int checked = 0;
  for (const auto& c : fx.index.at("act_cases")) {
    SCOPED_TRACE(c.at("name").get<std::string>());
    Tensor x = fx.get(c, "x"), dy = fx.get(c, "dy");
    const int bits = c.at("bits").get<int>();
    EXPECT_TRUE(all_close(fake_quant_act_forward(x, bits), fx.get(c, "y"), 0.0f, 1e-6f)) << "y";
    EXPECT_TRUE(grad_close(fake_quant_act_backward(dy, x, bits), fx.get(c, "dx"))) << "dx";
    ++checked;
  }
  EXPECT_GT(checked, 0);
}
