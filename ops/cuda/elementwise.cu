// CUDA elementwise ops (see elementwise.h). Grid-stride loops, fp32 math, 4-wide packs when the
// row length is a multiple of 4 and the pointers are aligned (then a pack never straddles two rows,
// so a row/column operand is indexed once per pack).
//
// Napkin math: a same-shape bf16 binary op moves 6 bytes per element; 2048x4096 is 50 MB, about
// 15 us at ~3.3 TB/s (H100 HBM3). These kernels are bandwidth-bound; fp32 math is free.
#include <type_traits>

#include "ops/cuda/elementwise_util.cuh"
#include "ops/elementwise.h"
#include "ops/reduce.h"

namespace omniq::cuda {

namespace {

using ew::from_f32;
using ew::to_f32;

// ---------------------------------------------------------------------------------------------
// CUDA kernels

template <BinaryOp OP>
__device__ __forceinline__ float apply(float x, float y) {
  if constexpr (OP == BinaryOp::add) return x + y;
  if constexpr (OP == BinaryOp::sub) return x - y;
  if constexpr (OP == BinaryOp::mul) return x * y;
  return x / y;  // IEEE division (no fast-math), so CUDA and CPU agree bitwise
}

__device__ __forceinline__ int64_t b_index(Broadcast bc, int64_t i, int64_t C) {
  switch (bc) {
    case Broadcast::same: return i;
    case Broadcast::row: return i % C;
    case Broadcast::col: return i / C;
    default: return 0;
  }
}

// out = a (op) broadcast(b). vec: C % 4 == 0 and a/out (and b for same/row) pack-aligned.
template <BinaryOp OP, typename Ta, typename Tb>
__global__ void binary_kernel(const Ta* a, const Tb* b, Ta* out, int64_t n, int64_t C, Broadcast bc, bool vec) {
  if (vec) {
    const int64_t n4 = n / 4;
    for (int64_t k = ew::thread_index(); k < n4; k += ew::thread_count()) {
      const int64_t i = 4 * k;
      float x[4], y[4];
      ew::load4(a, i, x);
      if (bc == Broadcast::same || bc == Broadcast::row) {
        ew::load4(b, b_index(bc, i, C), y);
      } else {
        const float s = to_f32(b[b_index(bc, i, C)]);
        y[0] = y[1] = y[2] = y[3] = s;
      }
#pragma unroll
      for (int q = 0; q < 4; ++q) x[q] = apply<OP>(x[q], y[q]);
      ew::store4(out, i, x);
    }
  } else {
    for (int64_t i = ew::thread_index(); i < n; i += ew::thread_count())
      out[i] = from_f32<Ta>(apply<OP>(to_f32(a[i]), to_f32(b[b_index(bc, i, C)])));
  }
}

template <typename T>
__global__ void scale_kernel(const T* a, T* out, int64_t n, float s, bool vec) {
  if (vec) {
    for (int64_t k = ew::thread_index(); k < n / 4; k += ew::thread_count()) {
      float x[4];
      ew::load4(a, 4 * k, x);
#pragma unroll
      for (int q = 0; q < 4; ++q) x[q] *= s;
      ew::store4(out, 4 * k, x);
    }
  } else {
    for (int64_t i = ew::thread_index(); i < n; i += ew::thread_count()) out[i] = from_f32<T>(to_f32(a[i]) * s);
  }
}

// a += alpha * b (a and b may have different dtypes).
template <typename Ta, typename Tb>
__global__ void add_inplace_kernel(Ta* a, const Tb* b, int64_t n, float alpha, bool vec) {
  if (vec) {
    for (int64_t k = ew::thread_index(); k < n / 4; k += ew::thread_count()) {
      float x[4], y[4];
      ew::load4(a, 4 * k, x);
      ew::load4(b, 4 * k, y);
#pragma unroll
      for (int q = 0; q < 4; ++q) x[q] = __fadd_rn(x[q], __fmul_rn(alpha, y[q]));  // no FMA: as the CPU
      ew::store4(a, 4 * k, x);
    }
  } else {
    for (int64_t i = ew::thread_index(); i < n; i += ew::thread_count())
      a[i] = from_f32<Ta>(__fadd_rn(to_f32(a[i]), __fmul_rn(alpha, to_f32(b[i]))));
  }
}

// Per-element contribution to db before the broadcast reduction, in f32:
// mul: dy * a;  div: d(a / b)/db * dy = -dy * a / b^2.
template <typename Ta, typename Tb>
__global__ void db_term_kernel(BinaryOp op, const Ta* dy, const Ta* a, const Tb* b, float* term, int64_t n, int64_t C,
                               Broadcast bc) {
  for (int64_t i = ew::thread_index(); i < n; i += ew::thread_count()) {
    const float g = to_f32(dy[i]), x = to_f32(a[i]);
    if (op == BinaryOp::mul) {
      term[i] = g * x;
    } else {
      const float y = to_f32(b[b_index(bc, i, C)]);
      term[i] = -g * x / (y * y);  // same expression as the CPU reference
    }
  }
}

// ---------------------------------------------------------------------------------------------
// kernel launchers

template <typename F>
void dispatch_binary_op(BinaryOp op, F&& f) {
  switch (op) {
    case BinaryOp::add: f(std::integral_constant<BinaryOp, BinaryOp::add>{}); return;
    case BinaryOp::sub: f(std::integral_constant<BinaryOp, BinaryOp::sub>{}); return;
    case BinaryOp::mul: f(std::integral_constant<BinaryOp, BinaryOp::mul>{}); return;
    case BinaryOp::div: f(std::integral_constant<BinaryOp, BinaryOp::div>{}); return;
  }
}

}  // namespace

Tensor binary(BinaryOp op, const Tensor& a, const Tensor& b, Broadcast bc) {
  const int64_t n = a.numel(), C = a.cols();
  Tensor out = Tensor::empty(a.shape(), a.dtype(), a.device());
  if (n == 0) return out;
  CudaContext& ctx = cuda_context(a.device());
  const bool b_packed = bc == Broadcast::same || bc == Broadcast::row;
  const bool vec = C % 4 == 0 && ew::pack4_aligned(a.data(), a.dtype()) && ew::pack4_aligned(out.data(), a.dtype()) &&
                   (!b_packed || ew::pack4_aligned(b.data(), b.dtype()));
  const unsigned int grid = ew::stride_grid(vec ? n / 4 : n, ctx);
  ew::dispatch_f32_bf16(a.dtype(), binary_op_name(op), [&](auto ta) {
    using Ta = typename decltype(ta)::type;
    ew::dispatch_f32_bf16(b.dtype(), binary_op_name(op), [&](auto tb) {
      using Tb = typename decltype(tb)::type;
      dispatch_binary_op(op, [&](auto opc) {
        binary_kernel<decltype(opc)::value, Ta, Tb><<<grid, ew::kBlock, 0, ctx.stream>>>(
            static_cast<const Ta*>(a.data()), static_cast<const Tb*>(b.data()), out.data_as<Ta>(), n, C, bc, vec);
        CUDA_CHECK_LAUNCH();
      });
    });
  });
  return out;
}

Tensor scale(const Tensor& a, float s) {
  const int64_t n = a.numel();
  Tensor out = Tensor::empty(a.shape(), a.dtype(), a.device());
  if (n == 0) return out;
  CudaContext& ctx = cuda_context(a.device());
  const bool vec = n % 4 == 0 && ew::pack4_aligned(a.data(), a.dtype()) && ew::pack4_aligned(out.data(), a.dtype());
  ew::dispatch_f32_bf16(a.dtype(), "scale", [&](auto ta) {
    using T = typename decltype(ta)::type;
    scale_kernel<T><<<ew::stride_grid(vec ? n / 4 : n, ctx), ew::kBlock, 0, ctx.stream>>>(
        static_cast<const T*>(a.data()), out.data_as<T>(), n, s, vec);
    CUDA_CHECK_LAUNCH();
  });
  return out;
}

void add_inplace(Tensor& a, const Tensor& b, float alpha) {
  const int64_t n = a.numel();
  if (n == 0) return;
  CudaContext& ctx = cuda_context(a.device());
  const bool vec = n % 4 == 0 && ew::pack4_aligned(a.data(), a.dtype()) && ew::pack4_aligned(b.data(), b.dtype());
  ew::dispatch_f32_bf16(a.dtype(), "add_inplace", [&](auto ta) {
    using Ta = typename decltype(ta)::type;
    ew::dispatch_f32_bf16(b.dtype(), "add_inplace", [&](auto tb) {
      using Tb = typename decltype(tb)::type;
      add_inplace_kernel<Ta, Tb><<<ew::stride_grid(vec ? n / 4 : n, ctx), ew::kBlock, 0, ctx.stream>>>(
          a.data_as<Ta>(), static_cast<const Tb*>(b.data()), n, alpha, vec);
      CUDA_CHECK_LAUNCH();
    });
  });
}

// Composed from the forward kernels and the deterministic reductions of reduce.cu:
//   da = dy (add/sub), dy * b (mul), dy / b (div)
//   db = reduce_broadcast(+-dy) (add/sub) or reduce_broadcast(term) with term from db_term_kernel;
//        a same-shape add/sub with b in dy's dtype just copies +-dy.
BinaryGrads binary_backward(BinaryOp op, const Tensor& dy, const Tensor& a, const Tensor& b, Broadcast bc,
                            bool need_da, bool need_db) {
  BinaryGrads grads;
  if (need_da) {
    if (op == BinaryOp::add || op == BinaryOp::sub) grads.da = dy.clone();
    else grads.da = cuda::binary(op, dy, b, bc);  // dy * b or dy / b: exactly d(a op b)/da * dy
  }
  if (!need_db) return grads;
  if ((op == BinaryOp::add || op == BinaryOp::sub) && bc == Broadcast::same && b.dtype() == dy.dtype()) {
    // db = ±dy exactly, in b's (= dy's) dtype: one copy, no f32 conversion (see elementwise.h).
    grads.db = op == BinaryOp::sub ? cuda::scale(dy, -1.0f) : dy.clone();
    return grads;
  }

  const int64_t n = a.numel(), C = a.cols();
  Tensor term;  // what gets summed over the broadcast dimension
  if (op == BinaryOp::mul || op == BinaryOp::div) {
    term = Tensor::empty(a.shape(), DType::f32, a.device());
    if (n > 0) {
      CudaContext& ctx = cuda_context(a.device());
      ew::dispatch_f32_bf16(a.dtype(), "binary_backward", [&](auto ta) {
        using Ta = typename decltype(ta)::type;
        ew::dispatch_f32_bf16(b.dtype(), "binary_backward", [&](auto tb) {
          using Tb = typename decltype(tb)::type;
          db_term_kernel<Ta, Tb><<<ew::stride_grid(n, ctx), ew::kBlock, 0, ctx.stream>>>(
              op, static_cast<const Ta*>(dy.data()), static_cast<const Ta*>(a.data()),
              static_cast<const Tb*>(b.data()), term.data_as<float>(), n, C, bc);
          CUDA_CHECK_LAUNCH();
        });
      });
    }
  }
  const Tensor& src = term.defined() ? term : dy;
  Tensor db;
  switch (bc) {
    case Broadcast::same: db = src.to(DType::f32); break;  // always a fresh tensor
    case Broadcast::row: db = cuda::col_reduce(ReduceOp::sum, src); break;
    case Broadcast::col: db = cuda::row_reduce(ReduceOp::sum, src); break;
    case Broadcast::scalar: db = cuda::sum_all(src, false); break;
  }
  // -sum(dy) == sum(-dy) exactly (rounding is symmetric), so negating after the reduction is exact.
  if (op == BinaryOp::sub) db = cuda::scale(db, -1.0f);
  grads.db = db.reshape(b.shape());
  return grads;
}

}  // namespace omniq::cuda
