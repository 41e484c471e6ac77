// Token embedding lookup and its gradient.
//
// ids: i32 (N) or (B, T); table: (V, C) float. Out-of-range ids are an error naming the id and V:
//   - CPU: checked while gathering.
//   - CUDA with ids on the host (the usual case: tokens come from the tokenizer): validated on the
//     host before the upload, no device round trip.
//   - CUDA with ids already on the device: the kernel records the first bad position in a device
//     flag (bad rows are written as zeros) and the launcher reads the flag back right away, which
//     synchronises the stream once per call. Embedding runs once per forward, so this is cheap.
#pragma once
#include <cstdint>

#include "runtime/tensor.h"

namespace omniq {

// -> (..., C) in table's dtype, on table's device. ids may be on the CPU or on table's device.
// check_device_ids = false skips the range check of ids already on the device (its verdict has to be read
// back on the host: a sync, which CUDA-graph capture forbids). Only for index tensors the caller
// built itself and knows to be in range (the LET gathers of quant/block_quantizer.cpp).
Tensor embedding_forward(const Tensor& ids, const Tensor& table, bool check_device_ids = true);

// dtable[v, :] = sum of dy[n, :] over the positions n with ids[n] == v -> f32 (V, C), zeros where a
// token does not occur. dy is (..., C) with one row per id (usually ids' shape followed by C).
// CUDA: one column (C == 1, ag::gather) sums in ascending n like the CPU (same bits, deterministic);
// wider tables accumulate with atomicAdd, so their summation order (last bits) may vary between runs.
Tensor embedding_backward(const Tensor& dy, const Tensor& ids, int64_t vocab, bool check_device_ids = true);

namespace cpu {
Tensor embedding_forward(const Tensor& ids, const Tensor& table);
Tensor embedding_backward(const Tensor& dy, const Tensor& ids, int64_t vocab);
}  // namespace cpu

#ifdef OMNIQ_HAS_CUDA
namespace cuda {
// ids on table's device. check_ids: flag bad ids in the kernel and read the flag back (a stream
// sync); false when the caller has already validated them on the host.
Tensor embedding_forward(const Tensor& ids, const Tensor& table, bool check_ids);
Tensor embedding_backward(const Tensor& dy, const Tensor& ids, int64_t vocab, bool check_ids);
}  // namespace cuda
#endif

}  // namespace omniq
