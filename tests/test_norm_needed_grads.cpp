// RMSNorm / LayerNorm backward with need flags: a gradient that is not needed is left undefined,
// and the ones computed are bitwise those of the full backward (same kernels, same reduction order),
// on the CPU and on CUDA. Autograd passes requires_grad as the flags, so a constant norm weight
// (LWC-only training) gets no gradient work.
#include <string>
#include <vector>

#include "autograd/functions.h"
#include "ops/norm.h"
#include "tests/support/test_support.h"

using namespace omniq;
using omniq::test::all_close;

namespace {

constexpr float kEps = 1e-5f;

struct Inputs {
  Tensor x, w, b, dy, mean, rstd;
};

Inputs make_inputs(bool layer, DType dt, int64_t rows, int64_t C, uint64_t seed, Device dev) {
  Inputs in;
  in.x = Tensor::uniform({rows, C}, -2.0f, 2.5f, seed, dt, dev);
  in.w = Tensor::uniform({C}, 0.5f, 1.5f, seed + 1, DType::f32, dev);
  in.b = Tensor::uniform({C}, -0.5f, 0.5f, seed + 2, DType::f32, dev);
  in.dy = Tensor::uniform({rows, C}, -1.0f, 1.0f, seed + 3, dt, dev);
  if (layer) layernorm_forward(in.x, in.w, in.b, kEps, &in.mean, &in.rstd);
  else rmsnorm_forward(in.x, in.w, kEps, &in.rstd);
  return in;
}

NormGrads backward(bool layer, const Inputs& in, bool dx, bool dw, bool db) {
  return layer ? layernorm_backward(in.dy, in.x, in.w, in.mean, in.rstd, dx, dw, db)
               : rmsnorm_backward(in.dy, in.x, in.w, in.rstd, dx, dw);
}

// Bitwise equality of a gradient with the full backward's, or undefined when not needed.
void expect_part(const Tensor& got, const Tensor& full, bool needed, const std::string& what) {
  if (!needed) {
    EXPECT_FALSE(got.defined()) << what << " was not needed but computed";
    return;
  }
  ASSERT_TRUE(got.defined()) << what << " was needed";
  EXPECT_EQ(got.dtype(), full.dtype()) << what;
  EXPECT_EQ(got.shape(), full.shape()) << what;
  EXPECT_TRUE(all_close(got, full, 0, 0)) << what;
}

void check_subsets(bool layer, DType dt, int64_t rows, int64_t C, uint64_t seed, Device dev) {
  const std::string name = std::string(layer ? "layernorm " : "rmsnorm ") + dtype_name(dt) + " [" +
                           std::to_string(rows) + ", " + std::to_string(C) + "] on " + dev.str();
  SCOPED_TRACE(name);
  Inputs in = make_inputs(layer, dt, rows, C, seed, dev);
  NormGrads full = backward(layer, in, true, true, true);
  for (int mask = 0; mask < (layer ? 8 : 4); ++mask) {
    const bool dx = mask & 1, dw = mask & 2, db = layer && (mask & 4);
    NormGrads g = backward(layer, in, dx, dw, db);
    const std::string what = " (need dx " + std::to_string(dx) + " dw " + std::to_string(dw) + " db " +
                             std::to_string(db) + ")";
    expect_part(g.dx, full.dx, dx, "dx" + what);
    expect_part(g.dw, full.dw, dw, "dw" + what);
    if (layer) expect_part(g.db, full.db, db, "db" + what);
    else EXPECT_FALSE(g.db.defined());
  }
}

// ag::rmsnorm / ag::layernorm: only inputs that require grad get one, bitwise equal to what they
// get when every input requires grad (the same dy reaches the norm in every run).
struct AgGrads {
  Tensor dx, dw, db;
};

AgGrads run_autograd(bool layer, const Inputs& in, bool px, bool pw, bool pb) {
  ag::Tape t;
  ag::Var x = px ? ag::parameter(in.x.clone(), "x") : ag::constant(in.x.alias());
  ag::Var w = pw ? ag::parameter(in.w.clone(), "w") : ag::constant(in.w.alias());
  ag::Var b = pb ? ag::parameter(in.b.clone(), "b") : ag::constant(in.b.alias());
  ag::Var y = layer ? ag::layernorm(t, x, w, b, kEps) : ag::rmsnorm(t, x, w, kEps);
  t.backward(ag::mse_loss(t, y, ag::constant(in.dy.alias())));
  return AgGrads{std::move(x->grad), std::move(w->grad), layer ? std::move(b->grad) : Tensor()};
}

void check_autograd(bool layer, Device dev) {
  SCOPED_TRACE(std::string(layer ? "layernorm on " : "rmsnorm on ") + dev.str());
  Inputs in = make_inputs(layer, DType::f32, 12, 64, 81, dev);
  AgGrads full = run_autograd(layer, in, true, true, layer);
  for (int mask = 1; mask < (layer ? 8 : 4); ++mask) {
    const bool px = mask & 1, pw = mask & 2, pb = mask & 4;
    AgGrads g = run_autograd(layer, in, px, pw, pb);
    const std::string what = " (x " + std::to_string(px) + " w " + std::to_string(pw) + " b " + std::to_string(pb) + ")";
    expect_part(g.dx, full.dx, px, "dx" + what);
    expect_part(g.dw, full.dw, pw, "dw" + what);
    if (layer) expect_part(g.db, full.db, pb, "db" + what);
  }
}

}  // namespace

TEST(NormNeededGrads, SubsetsAreBitwiseTheFullBackward) {
  uint64_t seed = 10;
  for (bool layer : {false, true})
    for (DType dt : {DType::f32, DType::bf16})
      for (int64_t C : {1, 37, 256}) check_subsets(layer, dt, 70, C, seed += 10, Device::cpu());
}

TEST(NormNeededGrads, ZeroRows) {
  Tensor x = Tensor::zeros({0, 8}, DType::f32), w = Tensor::full({8}, 1.0f, DType::f32);
  Tensor rstd = Tensor::zeros({0}, DType::f32);
  NormGrads g = rmsnorm_backward(x, x, w, rstd, false, true);
  EXPECT_FALSE(g.dx.defined());
  ASSERT_TRUE(g.dw.defined());
  EXPECT_EQ(g.dw.to_f32_vector(), std::vector<float>(8, 0.0f));
  g = layernorm_backward(x, x, w, rstd, rstd, true, false, false);
  EXPECT_TRUE(g.dx.defined());
  EXPECT_FALSE(g.dw.defined());
  EXPECT_FALSE(g.db.defined());
}

TEST(NormNeededGrads, AutogradComputesOnlyWhatRequiresGrad) {
  check_autograd(false, Device::cpu());
  check_autograd(true, Device::cpu());
}

// CUDA: the same subsets, over the kernel layouts of test_norm.cpp (warp / block per row, vector /
// scalar access) and the LLaMA-7B shape [2048, 4096]; bitwise against the full CUDA backward.
TEST(NormNeededGradsCuda, SubsetsAreBitwiseTheFullBackward) {
  OMNIQ_REQUIRE_CUDA();
  const struct {
    int64_t rows, C;
  } cases[] = {{37, 129}, {64, 256}, {3, 1}, {5, 1030}, {9, 4100}, {2048, 4096}};
  uint64_t seed = 500;
  for (bool layer : {false, true})
    for (DType dt : {DType::f32, DType::bf16})
      for (const auto& k : cases) check_subsets(layer, dt, k.rows, k.C, seed += 10, Device::cuda());
}

TEST(NormNeededGradsCuda, AutogradComputesOnlyWhatRequiresGrad) {
  OMNIQ_REQUIRE_CUDA();
  check_autograd(false, Device::cuda());
  check_autograd(true, Device::cuda());
}
