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
//  * Ownership: the first gradient to arrive is moved in as v.grad (no copy), later ones are added
//    into it in place. A backward may therefore hand an input a view of its own dy (reshape, the
//    same-shape add/sub): dy is dropped right after the node. The rule that keeps the in-place
//    adds safe: no two live gradient buffers share storage, so a node hands one dy's storage to at
//    most one input whose buffer keeps it (see same_shape_add_backward in functions.cpp).
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

// Adds `g` into v->grad (on first use v->grad becomes g itself, converted to f32 for parameters and
// f32_grad Vars, to the value's dtype otherwise: a view of g when no conversion is needed). No-op
// when v does not require grad.
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
