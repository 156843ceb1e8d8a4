// Portable scalar float16 <-> float32 conversions (round to nearest even), used by the scalar kernels.
#pragma once

#include <cstdint>

#include "kvsched/e4m3.h"

namespace kvsched {

inline float fp16_to_fp32(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000) << 16;
  const uint32_t exp = (h >> 10) & 0x1F, man = h & 0x3FF;
  if (exp == 0x1F) return f32_from_bits(sign | UINT32_C(0x7F800000) | (man << 13));
  if (exp == 0) {  // subnormal: man * 2^-24, exact in float32
    const float v = static_cast<float>(man) * (1.0f / 16777216.0f);
    return sign ? -v : v;
  }
  return f32_from_bits(sign | ((exp + 112) << 23) | (man << 13));
}

inline uint16_t fp32_to_fp16(float f) {
  uint32_t u = f32_bits(f);
  const uint16_t sign = static_cast<uint16_t>((u >> 16) & 0x8000);
  u &= UINT32_C(0x7FFFFFFF);
  if (u > UINT32_C(0x7F800000)) return static_cast<uint16_t>(sign | 0x7E00);   // NaN
  if (u >= UINT32_C(0x477FF000)) return static_cast<uint16_t>(sign | 0x7C00);  // rounds to inf
  if (u < UINT32_C(0x38800000)) {  // below 2^-14: subnormal; 0.5f's ulp is 2^-24, the subnormal step
    const float v = f32_from_bits(u) + 0.5f;
    return static_cast<uint16_t>(sign | (f32_bits(v) - UINT32_C(0x3F000000)));
  }
  const uint32_t mant_odd = (u >> 13) & 1;
  u += (static_cast<uint32_t>(15 - 127) << 23) + 0xFFF + mant_odd;
  return static_cast<uint16_t>(sign | (u >> 13));
}

}  // namespace kvsched
