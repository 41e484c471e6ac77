// Test helpers for the LET-fused weight fake-quant (ops/fake_quant_let.h): random cases, the op run
// through autograd, and the same math composed from the separate ops (mul, div, fake_quant_weight)
// — the path the fused op replaces, whose gradients are checked against PyTorch autograd by
// tests/test_omniquant_grad_fixture.cpp. The fused op must give the same ŵ bit for bit and the
// same gradients up to fp32 summation order.
#pragma once
#include <random>
#include <vector>

#include "autograd/functions.h"
#include "autograd/quant_functions.h"
#include "runtime/tensor.h"

namespace omniq::test {

enum class RowMode { none, divide, multiply };

struct LetCase {
  int64_t rows, cols;
  int bits = 4;
  bool symmetric = false;
  bool lwc = true;
  bool col = true;
  RowMode row = RowMode::divide;
  DType w_dtype = DType::f32;    // f16: the fp16-exact copy (same values)
  DType out_dtype = DType::f32;  // ŵ
};

struct LetData {
  std::vector<float> w, col, row, gamma, beta, dy;
};

// fp16-exact weights (so an f16 copy holds the same values), scales of both signs away from 0,
// LWC parameters around the init 4, and a few exact ties of the row max / min.
inline LetData make_let_data(const LetCase& c, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> nd(0.0f, 0.02f);
  std::uniform_real_distribution<float> ud(0.5f, 2.0f), gd(1.0f, 6.0f), dd(-1.0f, 1.0f);
  LetData d;
  d.w.resize(static_cast<size_t>(c.rows * c.cols));
  for (float& v : d.w) v = f16_to_f32(f32_to_f16(nd(rng)));
  for (int64_t i = 0; i < c.rows; i += 7) d.w[static_cast<size_t>(i * c.cols + 1)] = d.w[static_cast<size_t>(i * c.cols)];
  auto signed_scale = [&](size_t k) { return (k % 11 == 3 ? -1.0f : 1.0f) * ud(rng); };
  for (int64_t j = 0; j < c.cols; ++j) d.col.push_back(signed_scale(static_cast<size_t>(j)));
  for (int64_t i = 0; i < c.rows; ++i) d.row.push_back(signed_scale(static_cast<size_t>(i)));
  for (int64_t i = 0; i < c.rows; ++i) {
    d.gamma.push_back(gd(rng));
    d.beta.push_back(gd(rng));
  }
  d.dy.resize(d.w.size());
  for (float& v : d.dy) v = dd(rng);
  return d;
}

struct LetOutputs {
  Tensor y;                          // ŵ (out_dtype)
  Tensor dgamma, dbeta, dcol, drow;  // f32, undefined where not applicable
};

// ŵ and the gradients of Σ dy·ŵ, through the fused op (fused = true) or the op chain.
inline LetOutputs run_let(const LetCase& c, const LetData& d, Device dev, bool fused) {
  ag::Tape t;
  ag::Var w = ag::constant(Tensor::from_f32(d.w, {c.rows, c.cols}, fused ? c.w_dtype : DType::f32, dev));
  ag::Var col = c.col ? ag::parameter(Tensor::from_f32(d.col, {c.cols}, DType::f32, dev)) : nullptr;
  ag::Var row = c.row != RowMode::none ? ag::parameter(Tensor::from_f32(d.row, {c.rows}, DType::f32, dev)) : nullptr;
  ag::Var gamma = c.lwc ? ag::parameter(Tensor::from_f32(d.gamma, {c.rows}, DType::f32, dev)) : nullptr;
  ag::Var beta = c.lwc ? ag::parameter(Tensor::from_f32(d.beta, {c.rows}, DType::f32, dev)) : nullptr;
  const WeightQuantSpec spec{c.bits, 0, c.symmetric};
  ag::Var y;
  if (fused) {
    y = ag::fake_quant_weight_let(t, w, spec, gamma, beta, col, row, c.row == RowMode::divide, c.out_dtype);
  } else {
    ag::Var v = w;
    if (col) v = ag::mul(t, v, col);
    if (row) {
      ag::Var r = ag::reshape(t, row, {c.rows, 1});
      v = c.row == RowMode::divide ? ag::div(t, v, r) : ag::mul(t, v, r);
    }
    y = ag::fake_quant_weight(t, v, spec, gamma, beta, c.out_dtype);
  }
  // loss = Σ ŵ·dy as a [1, R·C] × [R·C] linear map, so the gradient reaching ŵ is dy (for a bf16 ŵ:
  // dy rounded to bf16 by the cast's backward, identically on both paths).
  ag::Var yf = ag::cast(t, y, DType::f32);
  ag::Var flat = ag::reshape(t, yf, {1, c.rows * c.cols});
  ag::Var dyv = ag::constant(Tensor::from_f32(d.dy, {1, c.rows * c.cols}, DType::f32, dev));
  ag::Var loss = ag::reshape(t, ag::linear(t, flat, dyv), {1});
  t.backward(loss);
  LetOutputs o;
  o.y = y->value.alias();
  auto grad = [](const ag::Var& v) { return v && v->grad.defined() ? v->grad.alias() : Tensor(); };
  o.dgamma = grad(gamma);
  o.dbeta = grad(beta);
  o.dcol = grad(col);
  o.drow = grad(row);
  return o;
}

}  // namespace omniq::test
