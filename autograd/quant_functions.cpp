#include "autograd/quant_functions.h"

#include <cstdlib>

#include "ops/embedding.h"
#include "ops/fake_quant_lwc_update.h"
#include "runtime/error.h"

namespace omniq::ag {

namespace {
// A bf16 ŵ's gradient comes out of the dW GEMM in bf16 (as under PyTorch autocast, where the grad of
// the bf16 weight copy is bf16): half the bytes of f32 written by the GEMM and read by the quantizer's
// backward, which accumulates in fp32 anyway. OMNIQ_F32_WEIGHT_GRADS=1 keeps it in f32 (A/B switch).
bool f32_weight_grads() {
  static const bool on = std::getenv("OMNIQ_F32_WEIGHT_GRADS") != nullptr;
  return on;
}
}  // namespace

Var fake_quant_weight(Tape& t, const Var& w, const WeightQuantSpec& spec, const Var& gamma, const Var& beta,
                      DType out_dtype) {
  OMNIQ_CHECK((gamma == nullptr) == (beta == nullptr), "fake_quant_weight: give both LWC gamma and beta, or neither");
  const Tensor* g = gamma ? &gamma->value : nullptr;
  const Tensor* b = beta ? &beta->value : nullptr;
  Var y = constant(fake_quant_weight_forward(w->value, spec, g, b, out_dtype));
  std::vector<Var> inputs{w};
  if (gamma) {
    inputs.push_back(gamma);
    inputs.push_back(beta);
  }
  t.record(inputs, y, [w, spec, gamma, beta](const Tensor& dy) {
    // dy is handed to the op in whatever dtype it arrived (f32 from the dW GEMM, or bf16).
    FakeQuantWeightGrads gr = fake_quant_weight_backward(dy, w->value, spec, gamma ? &gamma->value : nullptr,
                                                         beta ? &beta->value : nullptr, w->requires_grad);
    accumulate_grad(*w, std::move(gr.dw));
    if (gamma) {
      accumulate_grad(*gamma, std::move(gr.dgamma));
      accumulate_grad(*beta, std::move(gr.dbeta));
    }
  });
  y->f32_grad = f32_weight_grads();
  return y;
}

Var fake_quant_weight(Tape& t, const Var& w, const WeightQuantSpec& spec, const Var& gamma, const Var& beta) {
  return fake_quant_weight(t, w, spec, gamma, beta, w->value.dtype());
}

Var fake_quant_weight_cached(Tape& t, const Var& w, const Var& gamma, const Var& beta,
                             const std::shared_ptr<FusedLwcWeight>& state) {
  OMNIQ_CHECK(gamma && beta && state && state->w_hat.defined(),
              "fake_quant_weight_cached: needs LWC gamma, beta and an initialised ŵ cache");
  OMNIQ_CHECK(!w->requires_grad, "fake_quant_weight_cached: w must be frozen (the fused step computes no dw)");
  Var y = constant(state->w_hat.alias());
  t.record({w, gamma, beta}, y, [w, gamma, beta, state](const Tensor& dy) {
    FusedLwcWeight& s = *state;
    fake_quant_lwc_update(dy, w->value, s.spec, gamma->value, beta->value, s.m_gamma, s.v_gamma, s.m_beta, s.v_beta,
                          s.scalars, s.slot_gamma, s.slot_beta, s.w_hat);
  });
  y->f32_grad = f32_weight_grads();
  return y;
}

Var fake_quant_weight_let(Tape& t, const Var& w, const WeightQuantSpec& spec, const Var& gamma, const Var& beta,
                          const Var& col, const Var& row, bool row_divide, DType out_dtype) {
  OMNIQ_CHECK((gamma == nullptr) == (beta == nullptr),
              "fake_quant_weight_let: give both LWC gamma and beta, or neither");
  auto scales = [col, row, row_divide] {
    LetScales s;
    s.col = col ? &col->value : nullptr;
    s.row = row ? &row->value : nullptr;
    s.row_divide = row_divide;
    return s;
  };
  Var y = constant(fake_quant_let_forward(w->value, spec, gamma ? &gamma->value : nullptr,
                                          beta ? &beta->value : nullptr, scales(), out_dtype));
  std::vector<Var> inputs;
  for (const Var& v : {gamma, beta, col, row})
    if (v) inputs.push_back(v);
  t.record(inputs, y, [w, spec, gamma, beta, col, row, scales](const Tensor& dy) {
    FakeQuantLetGrads gr = fake_quant_let_backward(dy, w->value, spec, gamma ? &gamma->value : nullptr,
                                                   beta ? &beta->value : nullptr, scales());
    if (gamma) {
      accumulate_grad(*gamma, std::move(gr.dgamma));
      accumulate_grad(*beta, std::move(gr.dbeta));
    }
    if (col) accumulate_grad(*col, std::move(gr.dcol));
    if (row) accumulate_grad(*row, std::move(gr.drow));
  });
  y->f32_grad = f32_weight_grads();
  return y;
}

Var fake_quant_act(Tape& t, const Var& x, int bits) {
  if (bits >= 16) return x;
  Var y = constant(fake_quant_act_forward(x->value, bits));
  t.record({x}, y, [x, bits](const Tensor& dy) { accumulate_grad(*x, fake_quant_act_backward(dy, x->value, bits)); });
  return y;
}

Var abs_floor_ste(Tape& t, const Var& s, float floor) {
  Var y = constant(omniq::abs_floor_ste(s->value, floor));
  t.record({s}, y, [s](const Tensor& dy) { accumulate_grad(*s, abs_floor_ste_backward(dy)); });
  return y;
}

Var cast(Tape& t, const Var& x, DType dtype) {
  if (x->value.dtype() == dtype) return x;
  Var y = constant(x->value.to(dtype));
  t.record({x}, y, [x](const Tensor& dy) { accumulate_grad(*x, dy.to(x->value.dtype())); });
  return y;
}

Var gather(Tape& t, const Var& v, const Tensor& idx) {
  OMNIQ_CHECK(v->value.ndim() == 1, "gather: v must be a vector, got %s", v->value.str().c_str());
  int64_t n = v->value.numel();
  // A vector is an embedding table with one column: reuse the embedding gather and its scatter-add.
  Tensor table = v->value.reshape({n, 1});
  // Unchecked: gather's indices are built by the quantizer (in range by construction), and the
  // device-side check would cost a host sync per call (and rule out CUDA-graph capture).
  Var y = constant(embedding_forward(idx, table, /*check_ids=*/false).reshape({idx.numel()}));
  auto saved_idx = std::make_shared<Tensor>(idx.alias());
  t.record({v}, y, [v, saved_idx, n](const Tensor& dy) {
    Tensor g = embedding_backward(dy.reshape({dy.numel(), 1}), *saved_idx, n, /*check_ids=*/false);
    accumulate_grad(*v, g.reshape({n}));
  });
  return y;
}

}  // namespace omniq::ag
