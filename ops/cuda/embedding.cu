// CUDA embedding gather and scatter-add gradient (see embedding.h for the handling of bad ids).
//
// Forward: grid-stride over the N*C output elements (4 at a time when C % 4 == 0 and aligned): a
// warp copies 32 (or 128) consecutive elements of one table row, coalesced on both sides.
// Backward: zero the (V, C) gradient, then atomicAdd every dy element into its token's row. Ids
// repeat (common tokens), so the adds must be atomic; the summation order, and therefore the last
// bits, may vary between runs.
#include <vector>

#include "ops/cuda/elementwise_util.cuh"
#include "ops/embedding.h"

namespace omniq::cuda {

namespace {

using ew::from_f32;
using ew::to_f32;

// ---------------------------------------------------------------------------------------------
// CUDA kernels

// Remembers the smallest bad position: flag holds max(N - n) over bad positions n, 0 if none.
__device__ __forceinline__ void flag_bad(int* flag, int64_t n, int64_t N) {
  atomicMax(flag, static_cast<int>(N - n));
}

template <typename T>
__global__ void embedding_forward_kernel(const int32_t* ids, const T* table, T* out, int64_t N, int64_t C, int64_t V,
                                         int* flag, bool vec) {
  if (vec) {
    const int64_t C4 = C / 4;
    for (int64_t k = ew::thread_index(); k < N * C4; k += ew::thread_count()) {
      const int64_t n = k / C4, c = 4 * (k % C4);
      const int32_t id = ids[n];
      float v[4] = {0.0f, 0.0f, 0.0f, 0.0f};
      if (id >= 0 && id < V) ew::load4(table, id * C + c, v);
      else if (c == 0) flag_bad(flag, n, N);  // one report per row
      ew::store4(out, n * C + c, v);
    }
  } else {
    for (int64_t i = ew::thread_index(); i < N * C; i += ew::thread_count()) {
      const int64_t n = i / C, c = i % C;
      const int32_t id = ids[n];
      if (id >= 0 && id < V) {
        out[i] = table[id * C + c];
      } else {
        out[i] = from_f32<T>(0.0f);
        if (c == 0) flag_bad(flag, n, N);
      }
    }
  }
}

template <typename T>
__global__ void embedding_backward_kernel(const T* dy, const int32_t* ids, float* dtable, int64_t N, int64_t C,
                                          int64_t V, int* flag) {
  for (int64_t i = ew::thread_index(); i < N * C; i += ew::thread_count()) {
    const int64_t n = i / C, c = i % C;
    const int32_t id = ids[n];
    if (id >= 0 && id < V) atomicAdd(dtable + id * C + c, to_f32(dy[i]));
    else if (c == 0) flag_bad(flag, n, N);
  }
}

// One column (ag::gather's vector scatter-add): table row v sums dy[n] over the positions with
// ids[n] == v in ascending n, from 0: the CPU reference's order, so the same bits, and the same every
// run (fp32 atomics would add a GQA group's 3+ contributions in scheduling order). One warp per row:
// the lanes read 32 ids at a time (coalesced), a ballot marks the matches, and every lane adds them
// in ascending n (the same adds on all lanes, lane 0 stores). V·N/32 warp steps: a few µs for LET's
// per-channel vectors (V, N ≤ 8192). Warp 0 flags out-of-range ids.
template <typename T>
__global__ void gather_backward_scan_kernel(const T* dy, const int32_t* ids, float* dtable, int64_t N, int64_t V,
                                            int* flag) {
  const int64_t v = (blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x) / 32;
  const int lane = static_cast<int>(threadIdx.x % 32);
  if (v >= V) return;  // whole warps: v is the same on all 32 lanes
  float acc = 0.0f;
  for (int64_t base = 0; base < N; base += 32) {
    const int64_t n = base + lane;
    const int32_t id = n < N ? ids[n] : -1;
    if (v == 0 && n < N && (id < 0 || id >= V)) flag_bad(flag, n, N);
    unsigned int match = __ballot_sync(0xffffffffu, n < N && id == v);
    while (match) {
      const int b = __ffs(match) - 1;
      acc += to_f32(dy[base + b]);
      match &= match - 1;
    }
  }
  if (lane == 0) dtable[v] = acc;
}

// ---------------------------------------------------------------------------------------------
// kernel launchers

Shape with_last_dim(const Shape& s, int64_t C) {
  std::vector<int64_t> d(s.dims, s.dims + s.ndim);
  d.push_back(C);
  return Shape(d);
}

// Reads the flag back (synchronises the stream) and throws naming the first bad id.
void throw_if_flagged(const Tensor& flag, const Tensor& ids, int64_t V, const char* op) {
  const int32_t marker = flag.to_i32_vector()[0];
  if (marker == 0) return;
  const int64_t N = ids.numel();
  const int64_t pos = N - marker;
  const int32_t id = ids.reshape(Shape{N}).view_rows(pos, 1).to_i32_vector()[0];
  OMNIQ_FAIL("%s: token id %d at position %lld is out of range for vocabulary size V=%lld", op, id,
             static_cast<long long>(pos), static_cast<long long>(V));
}

}  // namespace

Tensor embedding_forward(const Tensor& ids, const Tensor& table, bool check_ids) {
  const int64_t N = ids.numel(), V = table.size(0), C = table.size(1);
  Tensor out = Tensor::empty(with_last_dim(ids.shape(), C), table.dtype(), table.device());
  if (N * C == 0) return out;
  CudaContext& ctx = cuda_context(table.device());
  Tensor flag = Tensor::zeros(Shape{1}, DType::i32, table.device());
  const bool vec = C % 4 == 0 && ew::pack4_aligned(table.data(), table.dtype()) &&
                   ew::pack4_aligned(out.data(), table.dtype());
  ew::dispatch_f32_bf16(table.dtype(), "embedding_forward", [&](auto tt) {
    using T = typename decltype(tt)::type;
    embedding_forward_kernel<T><<<ew::stride_grid(vec ? N * C / 4 : N * C, ctx), ew::kBlock, 0, ctx.stream>>>(
        ids.data_as<int32_t>(), static_cast<const T*>(table.data()), out.data_as<T>(), N, C, V, flag.data_as<int>(),
        vec);
    CUDA_CHECK_LAUNCH();
  });
  if (check_ids) throw_if_flagged(flag, ids, V, "embedding_forward");
  return out;
}

Tensor embedding_backward(const Tensor& dy, const Tensor& ids, int64_t vocab, bool check_ids) {
  const int64_t N = ids.numel(), C = dy.cols();
  Tensor dtable = Tensor::zeros(Shape{vocab, C}, DType::f32, dy.device());
  if (N * C == 0) return dtable;
  CudaContext& ctx = cuda_context(dy.device());
  Tensor flag = Tensor::zeros(Shape{1}, DType::i32, dy.device());
  // Vector gathers (C == 1) of moderate size take the deterministic scan; embedding tables keep
  // the atomic scatter (V·N would be far too much work there, and nothing trains them).
  const bool scan = C == 1 && static_cast<double>(vocab) * static_cast<double>(N) <= 1e8;
  ew::dispatch_f32_bf16(dy.dtype(), "embedding_backward", [&](auto tt) {
    using T = typename decltype(tt)::type;
    if (scan) {
      gather_backward_scan_kernel<T><<<grid_for(vocab * 32, 256), 256, 0, ctx.stream>>>(
          static_cast<const T*>(dy.data()), ids.data_as<int32_t>(), dtable.data_as<float>(), N, vocab,
          flag.data_as<int>());
      CUDA_CHECK_LAUNCH();
      return;
    }
    embedding_backward_kernel<T><<<ew::stride_grid(N * C, ctx), ew::kBlock, 0, ctx.stream>>>(
        static_cast<const T*>(dy.data()), ids.data_as<int32_t>(), dtable.data_as<float>(), N, C, vocab,
        flag.data_as<int>());
    CUDA_CHECK_LAUNCH();
  });
  if (check_ids) throw_if_flagged(flag, ids, vocab, "embedding_backward");
  return dtable;
}

}  // namespace omniq::cuda
