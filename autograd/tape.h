// Reverse-mode autograd on a tape.
//
// A `Var` is a shared handle to a value tensor and (optionally) its gradient. Differentiable
// functions (autograd/functions.h) run an op's forward and, when any input requires a gradient,
// record a Node on the tape holding what the forward saved and a backward closure.
// `Tape::backward(loss)` seeds d(loss) = 1 and runs the nodes in reverse order of recording.
//
// Gradient accumulation rule:
//  * Only Vars that require grad ever get a gradient buffer. Frozen weights and inputs never do.
//  * A Var's gradient is the SUM over all its uses: each backward adds (+=) into it.
//  * Parameters (Var::parameter) keep their f32 gradient across backward() calls until
//    zero_grad() is called, so several samples can be accumulated before an optimizer step.
//  * Intermediate Vars get their gradient during a backward() and release it once their own
//    node has run; Tape::clear() drops all nodes and the tensors they saved.
#pragma once
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "runtime/tensor.h"

namespace omniq::ag {

struct VarData {
  Tensor value;
  Tensor grad;                 // undefined until a gradient arrives
  bool requires_grad = false;  // true for parameters and anything computed from them
  bool is_parameter = false;   // a leaf the user trains; its grad is f32 and persists
  bool f32_grad = false;       // keep this intermediate's gradient in f32 whatever its value's dtype
                               // (a bf16 ŵ whose dW comes from the GEMM in f32 and is read as such)
  std::string name;
};
using Var = std::shared_ptr<VarData>;

// A constant: never gets a gradient.
Var constant(Tensor value, std::string name = "");
// A trainable leaf: value should be f32; its gradient is f32 and accumulates across backward().
Var parameter(Tensor value, std::string name = "");

// Adds `g` into v->grad (allocating it on first use: in f32 for parameters and f32_grad Vars, in
// the value's dtype otherwise). No-op when v does not require grad.
void accumulate_grad(VarData& v, Tensor g);
void zero_grad(const std::vector<Var>& params);

class Tape {
 public:
  using BackwardFn = std::function<void(const Tensor& dout)>;

  // Records that `output` was computed from `inputs`; `backward` receives d(output) and must call
  // accumulate_grad on the inputs that require grad. Nothing is recorded when no input requires grad.
  void record(const std::vector<Var>& inputs, const Var& output, BackwardFn backward);

  // Runs every recorded node in reverse. `loss` must be a single-element tensor.
  void backward(const Var& loss);
  void clear() { nodes_.clear(); }
  size_t size() const { return nodes_.size(); }

 private:
  struct Node {
    std::vector<Var> inputs;
    Var output;
    BackwardFn backward;
  };
  std::vector<Node> nodes_;
};

}  // namespace omniq::ag
