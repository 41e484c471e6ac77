// Measured choice among cuBLASLt's candidate algorithms for one GEMM plan (used by ops/cuda/matmul.cu
// when a plan is built). Internal to the CUDA backend; include only from .cu files.
//
// Why: cuBLASLt's heuristic ranks algorithms by a model, not by measurement; at the LLaMA-7B block
// shapes its first choice is not always the fastest. A calibration runs the same ~18 GEMM shapes for
// hours, so timing a handful of candidates once per shape is cheap.
//
// Results stay exactly what they were: a candidate is only eligible when its output on the call's
// own operands is bit-identical to the heuristic's first choice (algorithms that split K or reduce
// in another order fail that test), so turning autotuning on or off, or a different timing-based
// winner on another run, never changes a single bit. Turned on by default; OMNIQ_GEMM_AUTOTUNE=0
// switches it off (set_gemm_autotune overrides the environment, for A/B benchmarks).
#pragma once
#include <cublasLt.h>

#include <cstddef>

#include "runtime/cuda_context.h"

namespace omniq::cuda {

bool gemm_autotune();               // the process-wide switch (default: the environment, else on)
void set_gemm_autotune(bool on);    // override for this process

// One cuBLASLt launch as matmul.cu issues it (operands already in cuBLASLt's order).
struct LtCall {
  cublasLtMatmulDesc_t desc;
  cublasLtMatrixLayout_t lay_a, lay_b, lay_c;  // C and D share lay_c
  const void* A;
  const void* B;
  const void* C;  // read when beta != 0 (else ignored)
  float alpha, beta;
  size_t out_bytes;  // bytes spanned by D (batches and leading-dimension padding included)
};

// Index into cands[0..n) of the fastest candidate whose output equals cands[0]'s bit for bit, timed on
// scratch outputs (the real output is not touched; C is only read). Returns 0 without timing when
// the stream is being captured into a CUDA graph (timing needs host synchronisation), when the
// scratch would exceed the budget, or when allocating it fails. `log` prints one stderr line per
// candidate (time, bit-identical or not) and the choice.
int autotune_gemm(CudaContext& ctx, const LtCall& call, const cublasLtMatmulHeuristicResult_t* cands, int n,
                  bool log);

}  // namespace omniq::cuda
