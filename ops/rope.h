// Rotary position embedding in the Hugging Face LLaMA convention ("rotate_half": the two halves of
// the head dim form the pairs (i, i + D/2), not adjacent elements).
//
// x is (B, T, H, D). For position p = pos_offset + t and i < D/2:
//   inv_freq_i = 1 / theta^(2i/D)            computed in fp32 exactly as HF does:
//                                            1.0 / (theta ** (arange(0, D, 2).float() / D))
//   angle      = float(p) * inv_freq_i       fp32 product, as HF's fp32 position @ inv_freq
//   c, s       = cos(angle), sin(angle)      the fp32 value nearest the exact cos/sin of the fp32
//                                            angle (evaluated in double, then rounded)
//   out_i       = x_i * c - x_{i+D/2} * s
//   out_{i+D/2} = x_{i+D/2} * c + x_i * s
// HF then casts cos/sin to the activation dtype before multiplying (cos.to(x.dtype)); we do the
// same: for bf16 (and f16) inputs c and s are rounded to that dtype first. The rotation itself is
// fp32 with one rounding at the end, where HF rounds each product and the sum to bf16: the two can
// differ by one bf16 ulp in some elements.
//
// rope_backward applies the inverse (transposed) rotation with the same c, s, so it is the exact
// gradient of rope_forward as implemented (including the bf16 rounding of c, s).
//
// On CUDA the (c, s) table is computed once per (device, D, theta, dtype) for positions [0, P) and
// kept for the process (a few MB; it grows geometrically when a call needs later positions). After
// the first call with a key, calls within the cached positions launch only the apply kernel: no
// table work, no allocation besides the output, no host synchronisation. So run one call eagerly
// before capturing a CUDA graph; a call captured while the table would have to be (re)built uses a
// per-call table inside the graph instead (correct, just the old cost).
#pragma once
#include <cstdint>
#include <vector>

#include "runtime/tensor.h"

namespace omniq {

constexpr int64_t kRopeMaxHeadDim = 1024;  // the CUDA table kernel takes the D/2 frequencies as a kernel parameter

Tensor rope_forward(const Tensor& x, float theta, int64_t pos_offset = 0);
Tensor rope_backward(const Tensor& dy, float theta, int64_t pos_offset = 0);

// q and k of one attention rotated together: q (B, T, Hq, D) and k (B, T, Hk, D) with the same B, T,
// D, dtype and device (the head counts may differ: GQA). Bitwise the same as rope_forward(q) and
// rope_forward(k) (resp. rope_backward) — the per-element math is identical — but on CUDA one
// launch covers both tensors when both take the vectorised kernel (else it makes the two calls).
struct RopeQk {
  Tensor q, k;
};
RopeQk rope_forward_qk(const Tensor& q, const Tensor& k, float theta, int64_t pos_offset = 0);
RopeQk rope_backward_qk(const Tensor& dq, const Tensor& dk, float theta, int64_t pos_offset = 0);

// The D/2 fp32 inverse frequencies exactly as HF's LlamaRotaryEmbedding computes them.
std::vector<float> rope_inv_freq(int64_t D, float theta);

namespace cpu {
Tensor rope(const Tensor& x, float theta, int64_t pos_offset, bool inverse);
}  // namespace cpu

#ifdef OMNIQ_HAS_CUDA
namespace cuda {
Tensor rope(const Tensor& x, float theta, int64_t pos_offset, bool inverse);
RopeQk rope_qk(const Tensor& q, const Tensor& k, float theta, int64_t pos_offset, bool inverse);
}  // namespace cuda
#endif

}  // namespace omniq
