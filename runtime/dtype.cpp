#include "runtime/dtype.h"

#include "runtime/error.h"

namespace omniq {

size_t dtype_size(DType dt) {
  switch (dt) {
    case DType::f32: case DType::i32: return 4;
    case DType::f16: case DType::bf16: return 2;
    case DType::i8: case DType::u8: return 1;
    default: OMNIQ_FAIL("unknown dtype %d", static_cast<int>(dt));
  }
}

const char* dtype_name(DType dt) {
  static const char* names[] = {"f32", "f16", "bf16", "i32", "i8", "u8"};
  static_assert(sizeof(names) / sizeof(names[0]) == static_cast<size_t>(DType::kCount), "dtype names out of sync");
  return static_cast<size_t>(dt) < static_cast<size_t>(DType::kCount) ? names[static_cast<int>(dt)] : "?";
}

bool dtype_is_float(DType dt) { return dt == DType::f32 || dt == DType::f16 || dt == DType::bf16; }

float f16_to_f32(uint16_t h) {
  uint32_t sign = (h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1f;
  uint32_t mant = h & 0x3ffu;
  uint32_t u;
  if (exp == 0) {
    if (mant == 0) {
      u = sign;
    } else {  // subnormal: normalise
      int e = -1;
      do { mant <<= 1; ++e; } while ((mant & 0x400u) == 0);
      u = sign | static_cast<uint32_t>(127 - 15 - e) << 23 | (mant & 0x3ffu) << 13;
    }
  } else if (exp == 31) {
    u = sign | 0x7f800000u | (mant << 13);
  } else {
    u = sign | (exp + 127 - 15) << 23 | (mant << 13);
  }
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

uint16_t f32_to_f16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  uint32_t sign = (u >> 16) & 0x8000u;
  uint32_t absu = u & 0x7fffffffu;
  if (absu > 0x7f800000u) return static_cast<uint16_t>(sign | 0x7e00u);  // NaN
  if (absu >= 0x477ff000u) return static_cast<uint16_t>(sign | 0x7c00u);  // overflow -> inf
  if (absu < 0x38800000u) {  // subnormal or zero in half
    if (absu < 0x33000000u) return static_cast<uint16_t>(sign);
    // value = mant24 * 2^(e-150); a half subnormal is q * 2^-24, so q = mant24 >> (126 - e).
    uint32_t e = absu >> 23;
    uint32_t mant = (absu & 0x7fffffu) | 0x800000u;
    uint32_t dropped_bits = 126 - e;
    uint32_t q = mant >> dropped_bits;
    uint32_t rem = mant & ((1u << dropped_bits) - 1);
    uint32_t halfway = 1u << (dropped_bits - 1);
    if (rem > halfway || (rem == halfway && (q & 1u))) ++q;  // round to nearest even
    return static_cast<uint16_t>(sign | q);
  }
  uint32_t h = ((absu - 0x38000000u) >> 13);
  uint32_t rem = absu & 0x1fffu;
  if (rem > 0x1000u || (rem == 0x1000u && (h & 1u))) ++h;
  return static_cast<uint16_t>(sign | h);
}

}  // namespace omniq
