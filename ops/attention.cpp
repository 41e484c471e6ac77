// Argument validation and device dispatch for attention and the causal softmax (see ops/attention.h).
#include "ops/attention.h"

#include <atomic>
#include <cstdlib>
#include <cstring>

#include "ops/op_checks.h"
#include "runtime/error.h"

namespace omniq {

namespace {

bool is_attn_dtype(DType dt) { return dt == DType::f32 || dt == DType::bf16 || dt == DType::f16; }

using detail::check_defined;
#ifndef OMNIQ_HAS_CUDA
using detail::no_cuda;
#endif

// q [B,T,Hq,D], k/v [B,T,Hkv,D], one float dtype, one device, Hq a multiple of Hkv.
void check_qkv(const Tensor& q, const Tensor& k, const Tensor& v, const char* op) {
  check_defined(q, op, "q");
  check_defined(k, op, "k");
  check_defined(v, op, "v");
  OMNIQ_CHECK(q.ndim() == 4 && k.ndim() == 4 && v.ndim() == 4,
              "%s: q %s, k %s, v %s must all be 4-D [B, T, H, D]", op, q.str().c_str(), k.str().c_str(),
              v.str().c_str());
  OMNIQ_CHECK(is_attn_dtype(q.dtype()), "%s: q %s must be f32, bf16 or f16", op, q.str().c_str());
  OMNIQ_CHECK(k.dtype() == q.dtype() && v.dtype() == q.dtype(), "%s: q %s, k %s, v %s must share one dtype", op,
              q.str().c_str(), k.str().c_str(), v.str().c_str());
  check_same_device(q, k, op);
  check_same_device(q, v, op);
  OMNIQ_CHECK(k.shape() == v.shape(), "%s: k %s and v %s must have the same shape", op, k.str().c_str(),
              v.str().c_str());
  OMNIQ_CHECK(q.size(0) == k.size(0) && q.size(1) == k.size(1) && q.size(3) == k.size(3),
              "%s: q %s and k %s must agree on B, T and D", op, q.str().c_str(), k.str().c_str());
  OMNIQ_CHECK(q.size(0) > 0 && q.size(1) > 0 && q.size(3) > 0 && k.size(2) > 0,
              "%s: empty attention input q %s, k %s", op, q.str().c_str(), k.str().c_str());
  OMNIQ_CHECK(q.size(2) % k.size(2) == 0, "%s: %lld query heads (q %s) are not a multiple of %lld kv heads (k %s)",
              op, (long long)q.size(2), q.str().c_str(), (long long)k.size(2), k.str().c_str());
}

void check_square_scores(const Tensor& s, const char* op, const char* name) {
  check_defined(s, op, name);
  OMNIQ_CHECK(s.ndim() >= 2 && s.size(-1) == s.size(-2) && s.size(-1) > 0,
              "%s: %s %s must be [..., T, T] with T > 0", op, name, s.str().c_str());
  OMNIQ_CHECK(is_attn_dtype(s.dtype()), "%s: %s %s must be f32, bf16 or f16", op, name, s.str().c_str());
}

// -1: not decided yet (the environment is read at the first query), else 0/1.
std::atomic<int> g_deterministic{-1};

}  // namespace

void set_attention_deterministic(bool deterministic) { g_deterministic.store(deterministic ? 1 : 0); }

bool attention_deterministic() {
  int v = g_deterministic.load();
  if (v < 0) {
    const char* env = std::getenv("OMNIQ_NONDETERMINISTIC_ATTENTION");
    const int from_env = (env != nullptr && env[0] != '\0' && std::strcmp(env, "0") != 0) ? 0 : 1;
    g_deterministic.compare_exchange_strong(v, from_env);  // loses only to a concurrent explicit set
    v = g_deterministic.load();
  }
  return v != 0;
}

Tensor attention_forward(const Tensor& q, const Tensor& k, const Tensor& v, float scale, bool causal,
                         Tensor* lse_out) {
  const char* op = "attention_forward";
  check_qkv(q, k, v, op);
  if (q.device().is_cuda()) {
#ifdef OMNIQ_HAS_CUDA
    return cuda::attention_forward(q, k, v, scale, causal, lse_out);
#else
    no_cuda(op, q);
#endif
  }
  return cpu::attention_forward(q, k, v, scale, causal, lse_out);
}

AttentionGrads attention_backward(const Tensor& dout, const Tensor& q, const Tensor& k, const Tensor& v,
                                  const Tensor& out, const Tensor& lse, float scale, bool causal) {
  const char* op = "attention_backward";
  check_qkv(q, k, v, op);
  check_defined(dout, op, "dout");
  check_defined(out, op, "out");
  check_defined(lse, op, "lse (pass lse_out to attention_forward)");
  OMNIQ_CHECK(dout.shape() == q.shape() && dout.dtype() == q.dtype(), "%s: dout %s must match q %s", op,
              dout.str().c_str(), q.str().c_str());
  OMNIQ_CHECK(out.shape() == q.shape() && out.dtype() == q.dtype(), "%s: out %s must match q %s", op,
              out.str().c_str(), q.str().c_str());
  const Shape lse_shape{q.size(0), q.size(2), q.size(1)};
  OMNIQ_CHECK(lse.shape() == lse_shape && lse.dtype() == DType::f32,
              "%s: lse %s must be f32 %s = [B, Hq, T] for q %s", op, lse.str().c_str(), lse_shape.str().c_str(),
              q.str().c_str());
  check_same_device(dout, q, op);
  check_same_device(out, q, op);
  check_same_device(lse, q, op);
  if (q.device().is_cuda()) {
#ifdef OMNIQ_HAS_CUDA
    return cuda::attention_backward(dout, q, k, v, out, lse, scale, causal);
#else
    no_cuda(op, q);
#endif
  }
  return cpu::attention_backward(dout, q, k, v, out, lse, scale, causal);
}

Tensor causal_softmax_forward(const Tensor& scores, float scale) {
  const char* op = "causal_softmax_forward";
  check_square_scores(scores, op, "scores");
  if (scores.device().is_cuda()) {
#ifdef OMNIQ_HAS_CUDA
    return cuda::causal_softmax_forward(scores, scale);
#else
    no_cuda(op, scores);
#endif
  }
  return cpu::causal_softmax_forward(scores, scale);
}

Tensor causal_softmax_backward(const Tensor& dprobs, const Tensor& probs, float scale) {
  const char* op = "causal_softmax_backward";
  check_square_scores(probs, op, "probs");
  check_defined(dprobs, op, "dprobs");
  OMNIQ_CHECK(dprobs.shape() == probs.shape() && dprobs.dtype() == probs.dtype(),
              "%s: dprobs %s must match probs %s", op, dprobs.str().c_str(), probs.str().c_str());
  check_same_device(dprobs, probs, op);
  if (probs.device().is_cuda()) {
#ifdef OMNIQ_HAS_CUDA
    return cuda::causal_softmax_backward(dprobs, probs, scale);
#else
    no_cuda(op, probs);
#endif
  }
  return cpu::causal_softmax_backward(dprobs, probs, scale);
}

}  // namespace omniq
