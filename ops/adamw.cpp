// Argument checks and device dispatch for AdamW (the update itself is detail::adamw_update in adamw.h).
#include "ops/adamw.h"

#include <cmath>

#include "runtime/error.h"

namespace omniq {

namespace {

void check_args(const Tensor& param, const Tensor& grad, const Tensor& m, const Tensor& v, const AdamWConfig& cfg,
                int64_t step, const char* op) {
  OMNIQ_CHECK(param.defined() && grad.defined() && m.defined() && v.defined(),
              "%s: param, grad, m and v must all be defined", op);
  check_dtype(param, DType::f32, op, "param");
  check_dtype(grad, DType::f32, op, "grad");
  check_dtype(m, DType::f32, op, "m");
  check_dtype(v, DType::f32, op, "v");
  OMNIQ_CHECK(grad.numel() == param.numel() && m.numel() == param.numel() && v.numel() == param.numel(),
              "%s: param %s, grad %s, m %s and v %s must have the same number of elements", op, param.str().c_str(),
              grad.str().c_str(), m.str().c_str(), v.str().c_str());
  check_same_device(param, grad, op);
  check_same_device(param, m, op);
  check_same_device(param, v, op);
  OMNIQ_CHECK(step >= 1, "%s: step is 1-based (the count of this update), got %lld", op, static_cast<long long>(step));
  OMNIQ_CHECK(std::isfinite(cfg.lr) && cfg.lr >= 0.0f, "%s: lr must be finite and >= 0, got %g", op, cfg.lr);
  OMNIQ_CHECK(cfg.beta1 >= 0.0f && cfg.beta1 < 1.0f && cfg.beta2 >= 0.0f && cfg.beta2 < 1.0f,
              "%s: betas must lie in [0, 1), got (%g, %g)", op, cfg.beta1, cfg.beta2);
  OMNIQ_CHECK(cfg.eps > 0.0f, "%s: eps must be > 0, got %g", op, cfg.eps);
  OMNIQ_CHECK(std::isfinite(cfg.weight_decay) && cfg.weight_decay >= 0.0f, "%s: weight_decay must be >= 0, got %g",
              op, cfg.weight_decay);
}

}  // namespace

void adamw_step(Tensor& param, const Tensor& grad, Tensor& m, Tensor& v, const AdamWConfig& cfg, int64_t step) {
  const char* op = "adamw_step";
  check_args(param, grad, m, v, cfg, step, op);
  if (param.numel() == 0) return;
  const detail::AdamWScalars s = detail::adamw_scalars(cfg, step);
  if (param.device().is_cuda()) {
#ifdef OMNIQ_HAS_CUDA
    cuda::adamw_step(param, grad, m, v, s);
#else
    OMNIQ_FAIL("%s: this omniq was built without CUDA, but the tensors are on a CUDA device", op);
#endif
  } else {
    cpu::adamw_step(param, grad, m, v, s);
  }
}

void adamw_step_many(const std::vector<AdamWParam>& ps, int64_t step) {
  const char* op = "adamw_step_many";
  std::vector<AdamWParam> live;
  std::vector<detail::AdamWScalars> scalars;
  for (const AdamWParam& p : ps) {
    OMNIQ_CHECK(p.param && p.grad && p.m && p.v, "%s: null tensor pointer", op);
    check_args(*p.param, *p.grad, *p.m, *p.v, p.cfg, step, op);
    check_same_device(*p.param, *ps[0].param, op);
    if (p.param->numel() == 0) continue;
    live.push_back(p);
    scalars.push_back(detail::adamw_scalars(p.cfg, step));
  }
  if (live.empty()) return;
  if (live[0].param->device().is_cuda()) {
#ifdef OMNIQ_HAS_CUDA
    cuda::adamw_step_many(live, scalars);
#else
    OMNIQ_FAIL("%s: this omniq was built without CUDA, but the tensors are on a CUDA device", op);
#endif
  } else {
    for (size_t i = 0; i < live.size(); ++i) cpu::adamw_step(*live[i].param, *live[i].grad, *live[i].m, *live[i].v, scalars[i]);
  }
}

std::vector<float> adamw_scalar_floats(const std::vector<AdamWConfig>& cfgs, int64_t step) {
  std::vector<float> out;
  out.reserve(cfgs.size() * 7);
  for (const AdamWConfig& c : cfgs) {
    const detail::AdamWScalars s = detail::adamw_scalars(c, step);
    const float* f = reinterpret_cast<const float*>(&s);
    out.insert(out.end(), f, f + 7);
  }
  return out;
}

void adamw_step_many_indirect(const std::vector<AdamWParam>& ps, const Tensor& scalars) {
  const char* op = "adamw_step_many_indirect";
  OMNIQ_CHECK(scalars.defined(), "%s: scalars is undefined", op);
  check_dtype(scalars, DType::f32, op, "scalars");
  OMNIQ_CHECK(scalars.numel() == static_cast<int64_t>(ps.size()) * 7,
              "%s: scalars %s must hold 7 floats for each of the %zu tensors", op, scalars.str().c_str(), ps.size());
  OMNIQ_CHECK(scalars.device().is_cuda(), "%s: scalars must be on the CUDA device (use adamw_step_many on the CPU)", op);
  std::vector<AdamWParam> live;
  std::vector<int> index;
  for (size_t i = 0; i < ps.size(); ++i) {
    const AdamWParam& p = ps[i];
    if (!p.grad) continue;
    OMNIQ_CHECK(p.param && p.m && p.v, "%s: null tensor pointer", op);
    check_args(*p.param, *p.grad, *p.m, *p.v, p.cfg, 1, op);  // the step is in the scalars
    check_same_device(*p.param, scalars, op);
    if (p.param->numel() == 0) continue;
    live.push_back(p);
    index.push_back(static_cast<int>(i));
  }
  if (live.empty()) return;
#ifdef OMNIQ_HAS_CUDA
  cuda::adamw_step_many_indirect(live, reinterpret_cast<const detail::AdamWScalars*>(scalars.data()), index);
#else
  OMNIQ_FAIL("%s: this omniq was built without CUDA, but the tensors are on a CUDA device", op);
#endif
}

}  // namespace omniq
