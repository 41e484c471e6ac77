// Element types and host-side conversions for the 16-bit float formats.
#pragma once
#include <cstddef>
#include <cstdint>
#include <cstring>

namespace omniq {

enum class DType : uint8_t { f32 = 0, f16, bf16, i32, i8, u8, kCount };

size_t dtype_size(DType dt);
const char* dtype_name(DType dt);
bool dtype_is_float(DType dt);

// IEEE binary16 <-> fp32 (round to nearest even, handles inf/nan/subnormals).
float f16_to_f32(uint16_t h);
uint16_t f32_to_f16(float f);

// bfloat16 <-> fp32 (round to nearest even; NaN stays NaN).
inline float bf16_to_f32(uint16_t b) {
  uint32_t u = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline uint16_t f32_to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40);  // quiet NaN
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}
// Rounds an fp32 value through bf16 (what a bf16 tensor would store).
inline float round_bf16(float f) { return bf16_to_f32(f32_to_bf16(f)); }

}  // namespace omniq
