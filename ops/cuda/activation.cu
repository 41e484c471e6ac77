// CUDA activations (see activation.h): grid-stride loops, fp32 math, 4-wide packs when the element
// count is a multiple of 4 and every pointer is pack-aligned. expf (not __expf): the fast intrinsic
// is off by up to 2 ulp more, and these kernels are bandwidth-bound anyway.
#include "ops/activation.h"
#include "ops/cuda/elementwise_util.cuh"

namespace omniq::cuda {

namespace {

using ew::from_f32;
using ew::to_f32;

// ---------------------------------------------------------------------------------------------
// CUDA kernels

__device__ __forceinline__ float sigmoid(float g) { return 1.0f / (1.0f + expf(-g)); }

__device__ __forceinline__ float swiglu(float g, float u) { return g * sigmoid(g) * u; }

__device__ __forceinline__ void swiglu_grad(float d, float g, float u, float& dg, float& du) {
  const float s = sigmoid(g);
  dg = d * u * s * (1.0f + g * (1.0f - s));
  du = d * g * s;
}

__device__ __forceinline__ float relu(float x) { return (x > 0.0f || x != x) ? x : 0.0f; }  // NaN propagates
__device__ __forceinline__ float relu_grad(float d, float x) { return x <= 0.0f ? 0.0f : d; }

template <typename T>
__global__ void swiglu_forward_kernel(const T* gate, const T* up, T* y, int64_t n, bool vec) {
  if (vec) {
    for (int64_t k = ew::thread_index(); k < n / 4; k += ew::thread_count()) {
      float g[4], u[4];
      ew::load4(gate, 4 * k, g);
      ew::load4(up, 4 * k, u);
#pragma unroll
      for (int q = 0; q < 4; ++q) g[q] = swiglu(g[q], u[q]);
      ew::store4(y, 4 * k, g);
    }
  } else {
    for (int64_t i = ew::thread_index(); i < n; i += ew::thread_count())
      y[i] = from_f32<T>(swiglu(to_f32(gate[i]), to_f32(up[i])));
  }
}

template <typename T>
__global__ void swiglu_backward_kernel(const T* dy, const T* gate, const T* up, T* dgate, T* dup, int64_t n, bool vec) {
  if (vec) {
    for (int64_t k = ew::thread_index(); k < n / 4; k += ew::thread_count()) {
      float d[4], g[4], u[4], dg[4], du[4];
      ew::load4(dy, 4 * k, d);
      ew::load4(gate, 4 * k, g);
      ew::load4(up, 4 * k, u);
#pragma unroll
      for (int q = 0; q < 4; ++q) swiglu_grad(d[q], g[q], u[q], dg[q], du[q]);
      ew::store4(dgate, 4 * k, dg);
      ew::store4(dup, 4 * k, du);
    }
  } else {
    for (int64_t i = ew::thread_index(); i < n; i += ew::thread_count()) {
      float dg, du;
      swiglu_grad(to_f32(dy[i]), to_f32(gate[i]), to_f32(up[i]), dg, du);
      dgate[i] = from_f32<T>(dg);
      dup[i] = from_f32<T>(du);
    }
  }
}

template <typename T>
__global__ void relu_forward_kernel(const T* x, T* y, int64_t n, bool vec) {
  if (vec) {
    for (int64_t k = ew::thread_index(); k < n / 4; k += ew::thread_count()) {
      float v[4];
      ew::load4(x, 4 * k, v);
#pragma unroll
      for (int q = 0; q < 4; ++q) v[q] = relu(v[q]);
      ew::store4(y, 4 * k, v);
    }
  } else {
    for (int64_t i = ew::thread_index(); i < n; i += ew::thread_count()) y[i] = from_f32<T>(relu(to_f32(x[i])));
  }
}

template <typename T>
__global__ void relu_backward_kernel(const T* dy, const T* x, T* dx, int64_t n, bool vec) {
  if (vec) {
    for (int64_t k = ew::thread_index(); k < n / 4; k += ew::thread_count()) {
      float d[4], v[4];
      ew::load4(dy, 4 * k, d);
      ew::load4(x, 4 * k, v);
#pragma unroll
      for (int q = 0; q < 4; ++q) d[q] = relu_grad(d[q], v[q]);
      ew::store4(dx, 4 * k, d);
    }
  } else {
    for (int64_t i = ew::thread_index(); i < n; i += ew::thread_count())
      dx[i] = from_f32<T>(relu_grad(to_f32(dy[i]), to_f32(x[i])));
  }
}

// True when n % 4 == 0 and every tensor may be accessed in packs of 4.
bool can_pack(int64_t n, std::initializer_list<const Tensor*> ts) {
  if (n % 4 != 0) return false;
  for (const Tensor* t : ts)
    if (!ew::pack4_aligned(t->data(), t->dtype())) return false;
  return true;
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// kernel launchers

Tensor swiglu_forward(const Tensor& gate, const Tensor& up) {
  const int64_t n = gate.numel();
  Tensor y = Tensor::empty(gate.shape(), gate.dtype(), gate.device());
  if (n == 0) return y;
  CudaContext& ctx = cuda_context(gate.device());
  const bool vec = can_pack(n, {&gate, &up, &y});
  ew::dispatch_f32_bf16(gate.dtype(), "swiglu_forward", [&](auto tt) {
    using T = typename decltype(tt)::type;
    swiglu_forward_kernel<T><<<ew::stride_grid(vec ? n / 4 : n, ctx), ew::kBlock, 0, ctx.stream>>>(
        static_cast<const T*>(gate.data()), static_cast<const T*>(up.data()), y.data_as<T>(), n, vec);
    CUDA_CHECK_LAUNCH();
  });
  return y;
}

SwigluGrads swiglu_backward(const Tensor& dy, const Tensor& gate, const Tensor& up) {
  const int64_t n = gate.numel();
  SwigluGrads grads{Tensor::empty(gate.shape(), gate.dtype(), gate.device()),
                    Tensor::empty(up.shape(), gate.dtype(), gate.device())};
  if (n == 0) return grads;
  CudaContext& ctx = cuda_context(gate.device());
  const bool vec = can_pack(n, {&dy, &gate, &up, &grads.dgate, &grads.dup});
  ew::dispatch_f32_bf16(gate.dtype(), "swiglu_backward", [&](auto tt) {
    using T = typename decltype(tt)::type;
    swiglu_backward_kernel<T><<<ew::stride_grid(vec ? n / 4 : n, ctx), ew::kBlock, 0, ctx.stream>>>(
        static_cast<const T*>(dy.data()), static_cast<const T*>(gate.data()), static_cast<const T*>(up.data()),
        grads.dgate.data_as<T>(), grads.dup.data_as<T>(), n, vec);
    CUDA_CHECK_LAUNCH();
  });
  return grads;
}

Tensor relu_forward(const Tensor& x) {
  const int64_t n = x.numel();
  Tensor y = Tensor::empty(x.shape(), x.dtype(), x.device());
  if (n == 0) return y;
  CudaContext& ctx = cuda_context(x.device());
  const bool vec = can_pack(n, {&x, &y});
  ew::dispatch_f32_bf16(x.dtype(), "relu_forward", [&](auto tt) {
    using T = typename decltype(tt)::type;
    relu_forward_kernel<T><<<ew::stride_grid(vec ? n / 4 : n, ctx), ew::kBlock, 0, ctx.stream>>>(
        static_cast<const T*>(x.data()), y.data_as<T>(), n, vec);
    CUDA_CHECK_LAUNCH();
  });
  return y;
}

Tensor relu_backward(const Tensor& dy, const Tensor& x) {
  const int64_t n = x.numel();
  Tensor dx = Tensor::empty(x.shape(), x.dtype(), x.device());
  if (n == 0) return dx;
  CudaContext& ctx = cuda_context(x.device());
  const bool vec = can_pack(n, {&dy, &x, &dx});
  ew::dispatch_f32_bf16(x.dtype(), "relu_backward", [&](auto tt) {
    using T = typename decltype(tt)::type;
    relu_backward_kernel<T><<<ew::stride_grid(vec ? n / 4 : n, ctx), ew::kBlock, 0, ctx.stream>>>(
        static_cast<const T*>(dy.data()), static_cast<const T*>(x.data()), dx.data_as<T>(), n, vec);
    CUDA_CHECK_LAUNCH();
  });
  return dx;
}

}  // namespace omniq::cuda
