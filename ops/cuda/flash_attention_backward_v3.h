// Internal to ops/cuda: the wgmma backward kernel (flash_attention_backward_v3.cu) runs inside
// variant 2's launch frame (flash_attention_backward_v2.cu: scratch, turn counters, converts), which
// passes it the same arguments as its own kernel.
#pragma once
#include <cuda_runtime.h>

#include <cstddef>

#include "runtime/dtype.h"
#include "runtime/tensor.h"

namespace omniq::cuda {

struct FlashBwdArgs {
  const void *q, *k, *v, *dout;
  const float *lse, *delta;
  float* dq_acc;
  void *dq, *dk, *dv;
  float *dk32, *dv32;
  int *dq_ctr, *kv_ctr;
  int seq, Hq, Hkv, splits;
  float scale, scale_log2;
  bool thread_fences;
};

// True where the v3 kernel exists and runs: D = 128, an sm_90 GPU, a build for sm_90a.
bool flash_backward_v3_available(const Tensor& q);
// The warp-specialised form (flash_attention_backward_v3ws.cu) unless OMNIQ_FLASH_BWD_V3_WS=0 picks
// the plain one (read per launch) or the GPU lacks the shared memory it needs (214 KiB per block; the
// plain form needs 162 KiB).
void launch_flash_bwd_v3(const FlashBwdArgs& a, bool causal, DType dt, dim3 grid, cudaStream_t stream);
bool flash_bwd_v3ws_fits();
void launch_flash_bwd_v3ws(const FlashBwdArgs& a, bool causal, DType dt, dim3 grid, cudaStream_t stream);

}  // namespace omniq::cuda
