#include "autograd/functions.h"

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <string>

#include "ops/activation.h"
#include "ops/attention.h"
#include "ops/loss.h"
#include "ops/matmul.h"
#include "ops/norm.h"
#include "ops/reduce.h"
#include "ops/rope.h"
#include "runtime/error.h"

namespace omniq::ag {

namespace {
// -1: not read yet; else the mask of enabled parts. Read once from the environment (an A/B switch).
std::atomic<int> g_gemm_fusion{-1};
}  // namespace

unsigned gemm_fusion_parts_from_env(const char* value) {
  if (value == nullptr) return kFuseAll;
  const std::string v = value;
  if (v.empty() || v == "0") return kFuseAll;
  if (v == "1" || v == "all") return 0;
  unsigned on = kFuseAll;
  size_t start = 0;
  while (start <= v.size()) {
    const size_t end = std::min(v.find(',', start), v.size());
    const std::string part = v.substr(start, end - start);
    if (part == "residual") on &= ~static_cast<unsigned>(kFuseResidual);
    else if (part == "dx") on &= ~static_cast<unsigned>(kFuseDx);
    else if (part == "norm") on &= ~static_cast<unsigned>(kFuseNorm);
    else OMNIQ_FAIL("OMNIQ_NO_GEMM_FUSION='%s': unknown part '%s' (use 1, all, or a comma list of residual, dx, norm)",
                    value, part.c_str());
    start = end + 1;
  }
  return on;
}

bool gemm_fusion_env_default() { return gemm_fusion_parts_from_env(std::getenv("OMNIQ_NO_GEMM_FUSION")) == kFuseAll; }

unsigned gemm_fusion_parts() {
  int s = g_gemm_fusion.load(std::memory_order_relaxed);
  if (s < 0) {
    s = static_cast<int>(gemm_fusion_parts_from_env(std::getenv("OMNIQ_NO_GEMM_FUSION")));
    g_gemm_fusion.store(s, std::memory_order_relaxed);
  }
  return static_cast<unsigned>(s);
}

void set_gemm_fusion_parts(unsigned parts) { g_gemm_fusion.store(static_cast<int>(parts & kFuseAll)); }
bool gemm_fusion_enabled(unsigned parts) { return (gemm_fusion_parts() & parts) == parts; }
void set_gemm_fusion_enabled(bool on) { set_gemm_fusion_parts(on ? kFuseAll : 0u); }

namespace {
Var result(Tensor value) { return constant(std::move(value)); }

// Same-shape add/sub (the residual adds of every block): d(a ± b)/da = dy and d/db = ±dy, so the
// gradients need no kernel at all. dy is the output's gradient, which Tape::backward drops right
// after this node runs, and an op's output is never a parameter, so the first input may take dy's
// storage itself (an alias). Why that is safe: the only in-place write to a gradient buffer is
// accumulate_grad's `add_inplace(v.grad, g)` into the buffer v.grad owns, and after this node
// nothing else refers to dy's storage -- except the other input's gradient if it were handed the
// same storage. So the second input gets dy's storage only when the first did not keep it (its
// gradient already existed and dy was just added into it, or it was converted to another dtype);
// otherwise it gets a copy (sub: -dy, a fresh tensor anyway). That also covers add(x, x): x keeps
// dy, then a copy is added into it. The values are those binary_backward returns (±dy exactly; a
// dtype conversion of ±dy is exact or the same single rounding accumulate_grad applied before), so
// gradients are bitwise unchanged; only the clone and the f32 round trip of db are gone.
void same_shape_add_backward(BinaryOp op, const Tensor& dy, VarData& a, VarData& b) {
  bool dy_taken = false;
  if (a.requires_grad) {
    accumulate_grad(a, dy.alias());
    dy_taken = a.grad.defined() && a.grad.shares_storage_with(dy);
  }
  if (!b.requires_grad) return;
  if (op == BinaryOp::sub) accumulate_grad(b, omniq::scale(dy, -1.0f));
  else accumulate_grad(b, dy_taken ? dy.clone() : dy.alias());
}

// May a kernel add x's new gradient straight into x.grad (GEMM β = 1, a norm's dx pass) instead of
// returning a fresh tensor for accumulate_grad to add in place? The only in-place write the tape
// ever makes is accumulate_grad's add_inplace into the buffer x.grad owns, and by the ownership
// rule (autograd/tape.h) no other live gradient shares that storage; so writing old + new into it
// from the kernel touches exactly the memory add_inplace would have touched, one pass earlier.
// What must also hold: the buffer has the dtype the kernel writes (x's value dtype: an f32 gradient
// of a bf16 value goes through accumulate_grad as before) and x's shape, and it shares no storage
// with what the kernel reads while writing it (`reads`: dy, by the rule impossible, and values,
// which never hold gradients, checked anyway since it costs a pointer compare).
bool can_accumulate_in_place(const VarData& x, unsigned part, std::initializer_list<const Tensor*> reads) {
  if (!x.requires_grad || !x.grad.defined() || !gemm_fusion_enabled(part)) return false;
  if (x.grad.dtype() != x.value.dtype() || x.grad.shape() != x.value.shape()) return false;
  for (const Tensor* r : reads)
    if (x.grad.shares_storage_with(*r)) return false;
  return true;
}

// The backward of Y = X·Wᵀ (+ b): dx (into x's existing gradient by the GEMM when allowed), dw, db.
// None of these hands dy's storage to anyone.
void linear_grads(const Tensor& dy, VarData& x, VarData& w, VarData* b) {
  const bool need_db = b && b->requires_grad;
  // A compute-dtype weight that is not a parameter (a fake-quantized ŵ) takes its gradient in its
  // own dtype, as PyTorch autocast does, unless it asks for f32 (f32_grad).
  const DType dw_dtype = w.is_parameter || w.f32_grad ? DType::f32 : w.value.dtype();
  // A Linear input read by several Linears (LLaMA's n2 by gate_proj and up_proj; q/k/v's input):
  // the tape runs the later-recorded one first, which creates x.grad; the next one's GEMM adds into
  // it (β = 1) instead of writing a fresh dx for an add_inplace pass.
  const bool dx_in_place = can_accumulate_in_place(x, kFuseDx, {&dy, &w.value, &x.value});
  if (dx_in_place) linear_backward_dx_accumulate(dy, w.value, x.grad);
  LinearGrads g = linear_backward(dy, x.value, w.value, x.requires_grad && !dx_in_place, w.requires_grad, need_db,
                                  dw_dtype);
  accumulate_grad(x, std::move(g.dx));
  accumulate_grad(w, std::move(g.dw));
  if (need_db) accumulate_grad(*b, std::move(g.db));
}
}  // namespace

Var linear(Tape& t, const Var& x, const Var& w, const Var& b) {
  Var y = result(linear_forward(x->value, w->value, b ? &b->value : nullptr));
  t.record(b ? std::vector<Var>{x, w, b} : std::vector<Var>{x, w}, y,
           [x, w, b](const Tensor& dy) { linear_grads(dy, *x, *w, b.get()); });
  return y;
}

Var linear_residual(Tape& t, const Var& x, const Var& w, const Var& b, const Var& residual) {
  OMNIQ_CHECK(residual != nullptr, "linear_residual: the residual is null (use linear)");
  if (!gemm_fusion_enabled(kFuseResidual)) return add(t, residual, linear(t, x, w, b));  // the unfused graph, node for node
  Var y = result(linear_forward(x->value, w->value, b ? &b->value : nullptr, &residual->value));
  t.record(b ? std::vector<Var>{x, w, b, residual} : std::vector<Var>{x, w, residual}, y,
           [x, w, b, residual](const Tensor& dy) {
             linear_grads(dy, *x, *w, b.get());
             // d(residual) = dy, handed over without a copy as same_shape_add_backward does for its
             // first input: dy is dropped right after this node, and linear_grads gave no other
             // input dy's storage (fresh dx/dw/db, or sums into their own buffers), so the residual
             // is the only one that may keep it. Last, so that an in-place dx of x == residual
             // never writes into dy while its GEMM reads dy.
             accumulate_grad(*residual, dy.alias());
           });
  return y;
}

Var binary(Tape& t, BinaryOp op, const Var& a, const Var& b) {
  Var y = result(omniq::binary(op, a->value, b->value));
  t.record({a, b}, y, [op, a, b](const Tensor& dy) {
    const bool additive = op == BinaryOp::add || op == BinaryOp::sub;
    // dy in a's dtype: binary_backward would convert it first (a rounding), so keep that path then.
    if (additive && a->value.shape() == b->value.shape() && dy.shape() == a->value.shape() &&
        dy.dtype() == a->value.dtype()) {
      same_shape_add_backward(op, dy, *a, *b);
      return;
    }
    BinaryGrads g = binary_backward(op, dy, a->value, b->value, a->requires_grad, b->requires_grad);
    accumulate_grad(*a, std::move(g.da));
    accumulate_grad(*b, std::move(g.db));
  });
  return y;
}

Var scale(Tape& t, const Var& x, float s) {
  Var y = result(omniq::scale(x->value, s));
  t.record({x}, y, [x, s](const Tensor& dy) { accumulate_grad(*x, omniq::scale(dy, s)); });
  return y;
}

Var reshape(Tape& t, const Var& x, const Shape& shape) {
  Var y = result(x->value.reshape(shape));
  t.record({x}, y, [x](const Tensor& dy) { accumulate_grad(*x, dy.reshape(x->value.shape())); });
  return y;
}

Var rmsnorm(Tape& t, const Var& x, const Var& w, float eps) {
  Tensor rstd;
  Var y = result(rmsnorm_forward(x->value, w->value, eps, &rstd));
  auto rstd_saved = std::make_shared<Tensor>(std::move(rstd));
  t.record({x, w}, y, [x, w, rstd_saved](const Tensor& dy) {
    // A constant norm weight (LWC-only training) skips the dw column sums. When x already holds a
    // gradient (the block's h: the residual path's arrives first), the dx kernel adds into it.
    const bool dx_in_place = can_accumulate_in_place(*x, kFuseNorm, {&dy, &x->value});
    NormGrads g = rmsnorm_backward(dy, x->value, w->value, *rstd_saved, x->requires_grad, w->requires_grad,
                                   dx_in_place ? &x->grad : nullptr);
    accumulate_grad(*x, std::move(g.dx));
    accumulate_grad(*w, std::move(g.dw));
  });
  return y;
}

Var layernorm(Tape& t, const Var& x, const Var& w, const Var& b, float eps) {
  Tensor mean, rstd;
  Var y = result(layernorm_forward(x->value, w->value, b->value, eps, &mean, &rstd));
  auto stats = std::make_shared<std::pair<Tensor, Tensor>>(std::move(mean), std::move(rstd));
  t.record({x, w, b}, y, [x, w, b, stats](const Tensor& dy) {
    const bool dx_in_place = can_accumulate_in_place(*x, kFuseNorm, {&dy, &x->value});
    NormGrads g = layernorm_backward(dy, x->value, w->value, stats->first, stats->second, x->requires_grad,
                                     w->requires_grad, b->requires_grad, dx_in_place ? &x->grad : nullptr);
    accumulate_grad(*x, std::move(g.dx));
    accumulate_grad(*w, std::move(g.dw));
    accumulate_grad(*b, std::move(g.db));
  });
  return y;
}

Var rope(Tape& t, const Var& x, float theta, int64_t pos_offset) {
  Var y = result(rope_forward(x->value, theta, pos_offset));
  t.record({x}, y, [x, theta, pos_offset](const Tensor& dy) {
    accumulate_grad(*x, rope_backward(dy, theta, pos_offset));
  });
  return y;
}

std::pair<Var, Var> rope_qk(Tape& t, const Var& q, const Var& k, float theta, int64_t pos_offset) {
  RopeQk r = rope_forward_qk(q->value, k->value, theta, pos_offset);
  Var qo = result(std::move(r.q)), ko = result(std::move(r.k));
  // q's own node: runs only when k's node did not take q's gradient (k' does not reach the loss).
  t.record({q}, qo, [q, theta, pos_offset](const Tensor& dqo) {
    accumulate_grad(*q, rope_backward(dqo, theta, pos_offset));
  });
  // qo is held by its own node anyway (no cycle: a Var never refers to the tape).
  t.record({k}, ko, [q, k, qo, theta, pos_offset](const Tensor& dko) {
    // q's rotated gradient, taken over (so q's node is skipped); a parameter's gradient is never
    // taken (an op output is not one; checked because taking it would lose the parameter's grad).
    Tensor dqo;
    if (qo->grad.defined() && !qo->is_parameter) dqo = std::move(qo->grad);
    if (!dqo.defined()) {
      accumulate_grad(*k, rope_backward(dko, theta, pos_offset));
      return;
    }
    RopeQk g = rope_backward_qk(dqo, dko, theta, pos_offset);
    accumulate_grad(*q, std::move(g.q));
    accumulate_grad(*k, std::move(g.k));
  });
  return {std::move(qo), std::move(ko)};
}

Var swiglu(Tape& t, const Var& gate, const Var& up) {
  Var y = result(swiglu_forward(gate->value, up->value));
  t.record({gate, up}, y, [gate, up](const Tensor& dy) {
    SwigluGrads g = swiglu_backward(dy, gate->value, up->value);
    accumulate_grad(*gate, std::move(g.dgate));
    accumulate_grad(*up, std::move(g.dup));
  });
  return y;
}

Var relu(Tape& t, const Var& x) {
  Var y = result(relu_forward(x->value));
  t.record({x}, y, [x](const Tensor& dy) { accumulate_grad(*x, relu_backward(dy, x->value)); });
  return y;
}

Var attention(Tape& t, const Var& q, const Var& k, const Var& v, float scale, bool causal) {
  auto lse = std::make_shared<Tensor>();
  Var y = result(attention_forward(q->value, k->value, v->value, scale, causal, lse.get()));
  // The output value is needed by the backward; hold a view of it (not the Var, to avoid a cycle).
  auto out = std::make_shared<Tensor>(y->value.alias());
  t.record({q, k, v}, y, [q, k, v, scale, causal, lse, out](const Tensor& dy) {
    AttentionGrads g = attention_backward(dy, q->value, k->value, v->value, *out, *lse, scale, causal);
    accumulate_grad(*q, std::move(g.dq));
    accumulate_grad(*k, std::move(g.dk));
    accumulate_grad(*v, std::move(g.dv));
  });
  return y;
}

Var mse_loss(Tape& t, const Var& a, const Var& b) {
  Var y = result(mse_loss_forward(a->value, b->value));
  t.record({a, b}, y, [a, b](const Tensor& dloss) {
    Tensor da = mse_loss_backward(dloss, a->value, b->value);
    if (b->requires_grad) accumulate_grad(*b, omniq::scale(da, -1.0f));
    accumulate_grad(*a, std::move(da));
  });
  return y;
}

Var mse_loss_rows(Tape& t, const Var& y, const std::vector<const Tensor*>& tables, const Tensor& row,
                  const Tensor* loss_into) {
  MseLossGrad r = mse_loss_rows_with_grad(y->value, tables, row, loss_into);
  Var loss = result(std::move(r.loss));
  // Saved until the backward moves it into y's gradient (as a fresh backward tensor would be).
  auto dy = std::make_shared<Tensor>(std::move(r.dy));
  const Tape* tape = &t;
  const size_t index = t.size();  // this node's position on the tape, if recorded
  t.record({y}, loss, [y, dy, tape, index](const Tensor& dloss) {
    // dy was computed for d(loss) = 1: valid only for the tape's root. Any consumer of the loss that
    // needs a gradient records a node after this one, so "last node" means nothing but the seed
    // reaches it (its value is not read: that would be a host sync).
    OMNIQ_CHECK(tape->size() == index + 1,
                "mse_loss_rows: its loss must be the one Tape::backward starts from, but %zu node(s) were recorded "
                "after it (use mse_loss for a loss that is combined further)",
                tape->size() - index - 1);
    OMNIQ_CHECK(dloss.numel() == 1 && dloss.dtype() == DType::f32, "mse_loss_rows: d(loss) %s is not an f32 scalar",
                dloss.str().c_str());
    OMNIQ_CHECK(dy->defined(), "mse_loss_rows: backward ran twice on the same tape (the gradient was handed over)");
    accumulate_grad(*y, std::move(*dy));
  });
  return loss;
}

Var cross_entropy_mean(Tape& t, const Var& logits, const Tensor& targets) {
  Tensor nll = cross_entropy_forward(logits->value, targets);
  int64_t n = nll.numel();
  Var y = result(mean_all(nll));
  auto tg = std::make_shared<Tensor>(targets.alias());
  t.record({logits}, y, [logits, tg, n](const Tensor& dloss) {
    // d(mean)/d(nll_i) = 1/N; broadcast the device scalar without reading it on the host.
    Tensor ones = Tensor::full({n}, 1.0f / static_cast<float>(n), DType::f32, dloss.device());
    Tensor dnll = omniq::binary(BinaryOp::mul, ones, dloss.to(DType::f32));
    accumulate_grad(*logits, cross_entropy_backward(dnll, logits->value, *tg));
  });
  return y;
}

}  // namespace omniq::ag
