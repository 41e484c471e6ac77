// AdamW, exactly as torch.optim.AdamW (default, non-amsgrad, non-maximize), in place on f32 tensors.
//
// The algorithm from the PyTorch documentation (γ = lr, λ = weight_decay, t = step, 1-based):
//   θ_t ← θ_{t−1} − γ·λ·θ_{t−1}                      (decoupled weight decay, applied first)
//   m_t ← β1·m_{t−1} + (1 − β1)·g_t
//   v_t ← β2·v_{t−1} + (1 − β2)·g_t²
//   m̂_t ← m_t / (1 − β1^t)
//   v̂_t ← v_t / (1 − β2^t)
//   θ_t ← θ_t − γ·m̂_t / (√v̂_t + ε)
// Arranged as PyTorch's single-tensor implementation computes it (same operation order; PyTorch's
// own rounding may still differ in the last bit where its compiler contracts a multiply-add):
//   p *= 1 − lr·wd;  m.lerp_(g, 1 − β1);  v = v·β2 + (1 − β2)·g²;
//   denom = √v / √(1 − β2^t) + ε;  p −= (lr / (1 − β1^t)) · m / denom
// The bias corrections and step size are computed on the host in double (as Python floats are).
// m and v start at zero (the caller allocates them with Tensor::zeros) and are owned by the caller.
#pragma once
#include <cmath>
#include <cstdint>
#include <vector>

#include "runtime/tensor.h"

namespace omniq {

struct AdamWConfig {
  float lr;
  float beta1 = 0.9f;
  float beta2 = 0.999f;
  float eps = 1e-8f;
  float weight_decay = 0.f;
};

// One AdamW step on param with gradient grad; m and v (first/second moments) are updated in place.
// All four are f32 with the same number of elements, on one device. step is the 1-based count of
// this update (bias corrections use it). One fused kernel on CUDA; no host sync.
void adamw_step(Tensor& param, const Tensor& grad, Tensor& m, Tensor& v, const AdamWConfig& cfg, int64_t step);

// One AdamW step for several tensors at once (each with its own config, e.g. LWC and LET learning
// rates): the same bits as adamw_step on each, in one kernel launch on CUDA (a block's calibration
// step updates ~20 small tensors; one launch instead of ~20 keeps launch latency off the step).
struct AdamWParam {
  Tensor* param;
  const Tensor* grad;
  Tensor* m;
  Tensor* v;
  AdamWConfig cfg;
};
void adamw_step_many(const std::vector<AdamWParam>& ps, int64_t step);

// The CUDA-graph-replayable form of adamw_step_many (all tensors on one CUDA device): the scalars
// are not kernel arguments but read on the device from `scalars` (f32 [ps.size() · 7], ps[i]'s
// detail::AdamWScalars at floats 7i..7i+6, as adamw_scalar_floats writes them). A captured launch is
// then replayed for later steps after the caller rewrites that buffer (stream-ordered), instead of
// baking one step's bias corrections into the graph. Same bits as adamw_step_many with the same
// configs and step. An entry with grad == nullptr is skipped (a parameter that got no gradient this
// step), so the rows keep their positions.
void adamw_step_many_indirect(const std::vector<AdamWParam>& ps, const Tensor& scalars);
// The scalars of cfgs[i] at `step` (1-based), in the layout adamw_step_many_indirect reads.
std::vector<float> adamw_scalar_floats(const std::vector<AdamWConfig>& cfgs, int64_t step);

// ---- shared by the CPU reference and the CUDA kernel ----------------------------------------------
namespace detail {

#if defined(__CUDACC__)
#define OMNIQ_HOST_DEVICE __host__ __device__
#else
#define OMNIQ_HOST_DEVICE
#endif

// Per-step scalars, computed once on the host (in double, then rounded to f32).
struct AdamWScalars {
  float decay;          // 1 − lr·wd
  float one_minus_b1;   // lerp weight
  float beta2, one_minus_b2;
  float step_size;      // lr / (1 − β1^t)
  float bc2_sqrt;       // √(1 − β2^t)
  float eps;
};
static_assert(sizeof(AdamWScalars) == 7 * sizeof(float), "adamw_step_many_indirect reads 7 floats per tensor");

inline AdamWScalars adamw_scalars(const AdamWConfig& c, int64_t step) {
  const double t = static_cast<double>(step);
  AdamWScalars s;
  s.decay = static_cast<float>(1.0 - static_cast<double>(c.lr) * c.weight_decay);
  s.one_minus_b1 = static_cast<float>(1.0 - c.beta1);
  s.beta2 = c.beta2;
  s.one_minus_b2 = static_cast<float>(1.0 - c.beta2);
  s.step_size = static_cast<float>(c.lr / (1.0 - std::pow(static_cast<double>(c.beta1), t)));
  s.bc2_sqrt = static_cast<float>(std::sqrt(1.0 - std::pow(static_cast<double>(c.beta2), t)));
  s.eps = c.eps;
  return s;
}

// The element update. Every multiply-add is an explicit fmaf, so no compiler is free to contract
// differently: the CPU reference and the CUDA kernel produce the same bits (sqrtf and '/' are
// correctly rounded on both sides; nvcc keeps them IEEE unless built with --use_fast_math).
OMNIQ_HOST_DEVICE inline void adamw_update(float& p, float& m, float& v, float g, const AdamWScalars& s) {
  p = p * s.decay;
  m = fmaf(s.one_minus_b1, g - m, m);                // torch lerp_(g, w) for w < 0.5: m + w·(g − m)
  v = fmaf(s.beta2, v, s.one_minus_b2 * (g * g));    // v·β2 + (1 − β2)·g²
  const float denom = sqrtf(v) / s.bc2_sqrt + s.eps;
  p = fmaf(-s.step_size, m / denom, p);
}
#undef OMNIQ_HOST_DEVICE

}  // namespace detail

// ---- backends (arguments already validated by adamw_step; call that instead) ----
namespace cpu {
void adamw_step(Tensor& param, const Tensor& grad, Tensor& m, Tensor& v, const detail::AdamWScalars& s);
}
#ifdef OMNIQ_HAS_CUDA
namespace cuda {
void adamw_step(Tensor& param, const Tensor& grad, Tensor& m, Tensor& v, const detail::AdamWScalars& s);
// ps on one device; scalars[i] belongs to ps[i].
void adamw_step_many(const std::vector<AdamWParam>& ps, const std::vector<detail::AdamWScalars>& scalars);
// scalars_dev: device array of AdamWScalars; ps[i] uses scalars_dev[index[i]].
void adamw_step_many_indirect(const std::vector<AdamWParam>& ps, const detail::AdamWScalars* scalars_dev,
                              const std::vector<int>& index);
}
#endif

}  // namespace omniq
