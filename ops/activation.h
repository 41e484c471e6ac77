// Activations of the decoder MLPs: SwiGLU (LLaMA: down(silu(gate(x)) * up(x))) and ReLU (OPT).
// Outputs and gradients have the dtype of the (first) input; math is fp32 on both backends.
// If up or dy has another float dtype than gate / x, it is converted to that dtype first.
#pragma once
#include "runtime/tensor.h"

namespace omniq {

// y = silu(gate) * up = gate * sigmoid(gate) * up; gate and up have the same shape.
Tensor swiglu_forward(const Tensor& gate, const Tensor& up);

// With s = sigmoid(gate):  dgate = dy * up * s * (1 + gate * (1 - s)),  dup = dy * gate * s.
struct SwigluGrads {
  Tensor dgate, dup;
};
SwigluGrads swiglu_backward(const Tensor& dy, const Tensor& gate, const Tensor& up);

// y = max(x, 0); NaN propagates (as torch.relu).
Tensor relu_forward(const Tensor& x);
// dx = x > 0 ? dy : 0 (gradient 0 at x <= 0, as PyTorch's threshold_backward).
Tensor relu_backward(const Tensor& dy, const Tensor& x);

namespace cpu {
Tensor swiglu_forward(const Tensor& gate, const Tensor& up);
SwigluGrads swiglu_backward(const Tensor& dy, const Tensor& gate, const Tensor& up);
Tensor relu_forward(const Tensor& x);
Tensor relu_backward(const Tensor& dy, const Tensor& x);
}  // namespace cpu

#ifdef OMNIQ_HAS_CUDA
namespace cuda {
Tensor swiglu_forward(const Tensor& gate, const Tensor& up);
SwigluGrads swiglu_backward(const Tensor& dy, const Tensor& gate, const Tensor& up);
Tensor relu_forward(const Tensor& x);
Tensor relu_backward(const Tensor& dy, const Tensor& x);
}  // namespace cuda
#endif

}  // namespace omniq
