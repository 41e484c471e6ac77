#include "autograd/tape.h"

#include "ops/elementwise.h"
#include "runtime/error.h"

namespace omniq::ag {

Var constant(Tensor value, std::string name) {
  auto v = std::make_shared<VarData>();
  v->value = std::move(value);
  v->name = std::move(name);
  return v;
}

Var parameter(Tensor value, std::string name) {
  auto v = constant(std::move(value), std::move(name));
  v->requires_grad = true;
  v->is_parameter = true;
  return v;
}

void accumulate_grad(VarData& v, Tensor g) {
  if (!v.requires_grad || !g.defined()) return;
  OMNIQ_CHECK(g.numel() == v.value.numel(), "gradient %s does not match value %s of '%s'", g.str().c_str(),
              v.value.str().c_str(), v.name.c_str());
  if (g.shape() != v.value.shape()) g = g.reshape(v.value.shape());
  DType want = v.is_parameter || v.f32_grad ? DType::f32 : v.value.dtype();
  if (!v.grad.defined()) {
    v.grad = g.dtype() == want ? std::move(g) : g.to(want);
    return;
  }
  add_inplace(v.grad, g, 1.0f);
}

void zero_grad(const std::vector<Var>& params) {
  for (const Var& p : params)
    if (p->grad.defined()) p->grad.zero();
}

void Tape::record(const std::vector<Var>& inputs, const Var& output, BackwardFn backward) {
  bool any = false;
  for (const Var& in : inputs) any = any || in->requires_grad;
  if (!any) return;
  output->requires_grad = true;
  nodes_.push_back(Node{inputs, output, std::move(backward)});
}

void Tape::backward(const Var& loss) {
  OMNIQ_CHECK(loss->value.numel() == 1, "backward() needs a scalar loss, got %s", loss->value.str().c_str());
  OMNIQ_CHECK(loss->requires_grad, "backward(): the loss does not depend on any parameter");
  accumulate_grad(*loss, Tensor::full(loss->value.shape(), 1.0f, loss->value.dtype(), loss->value.device()));
  for (auto it = nodes_.rbegin(); it != nodes_.rend(); ++it) {
    VarData& out = *it->output;
    if (!out.grad.defined()) continue;  // this node does not reach the loss
    it->backward(out.grad);
    if (!out.is_parameter) out.grad = Tensor();  // intermediate gradients are not kept
  }
}

}  // namespace omniq::ag
