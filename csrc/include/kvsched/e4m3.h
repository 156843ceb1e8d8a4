// Scalar float32 <-> float8_e4m3fn conversions, bit-exact with c10::Float8_e4m3fn (PyTorch).
//
// e4m3fn: 1 sign, 4 exponent (bias 7), 3 mantissa bits; no infinities; 0x7F/0xFF are NaN; largest finite 448.
// fp32 -> e4m3 rounds to nearest even and saturates like PyTorch >= 2.13: finite values and infinities beyond the
// range become +-448, NaN stays NaN (0x7F with the input's sign). (Older PyTorch returned NaN past 480; kvsched's
// quantizer clamps to +-448 first, so its output is the same under either rule.)
#pragma once

#include <cstdint>
#include <cstring>

namespace kvsched {

inline uint32_t f32_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}

inline float f32_from_bits(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

// c10's fp8e4m3fn_from_fp32_value (torch/headeronly/util/Float8_e4m3fn.h) with torch's observed saturation: c10's
// scalar helper saturates from 480 up and would round [464, 480) to NaN, but torch's .to(float8_e4m3fn) maps every
// finite value above 448 to 448 (checked exhaustively over all float32 against torch 2.13).
inline uint8_t fp32_to_e4m3(float f) {
  constexpr uint32_t kFp8Max = UINT32_C(0x43E00000);    // 448.0f, the largest finite e4m3fn value
  constexpr uint32_t kDenormMask = UINT32_C(141) << 23;  // 2^14: its ulp is 2^-9, e4m3's subnormal step
  uint32_t bits = f32_bits(f);
  const uint32_t sign = bits & UINT32_C(0x80000000);
  bits ^= sign;
  uint8_t result;
  if (bits > kFp8Max) {
    result = bits > UINT32_C(0x7F800000) ? 0x7F : 0x7E;  // NaN stays NaN; overflow and inf saturate
  } else if (bits < (UINT32_C(121) << 23)) {  // below 2^-6, e4m3's smallest normal
    bits = f32_bits(f32_from_bits(bits) + f32_from_bits(kDenormMask));
    result = static_cast<uint8_t>(bits - kDenormMask);
  } else {
    const uint32_t mant_odd = (bits >> 20) & 1;
    bits += (static_cast<uint32_t>(7 - 127) << 23) + 0x7FFFF;
    bits += mant_odd;
    result = static_cast<uint8_t>(bits >> 20);
  }
  return static_cast<uint8_t>(result | (sign >> 24));
}

inline float e4m3_to_fp32(uint8_t q) {
  const uint32_t sign = static_cast<uint32_t>(q & 0x80) << 24;
  const uint32_t em = q & 0x7F;
  if (em == 0x7F) return f32_from_bits(sign | UINT32_C(0x7FC00000));
  if (em < 8) {  // subnormal: em * 2^-9, exact in float32
    const float v = static_cast<float>(em) * (1.0f / 512.0f);
    return sign ? -v : v;
  }
  return f32_from_bits(sign | ((em << 20) + (UINT32_C(120) << 23)));
}

// float32 -> bfloat16 bits, round to nearest even; NaN -> 0x7FC0 (c10::BFloat16's round_to_nearest_even).
inline uint16_t fp32_to_bf16(float f) {
  const uint32_t u = f32_bits(f);
  if ((u & UINT32_C(0x7FFFFFFF)) > UINT32_C(0x7F800000)) return 0x7FC0;
  return static_cast<uint16_t>((u + UINT32_C(0x7FFF) + ((u >> 16) & 1)) >> 16);
}

inline float bf16_to_fp32(uint16_t h) { return f32_from_bits(static_cast<uint32_t>(h) << 16); }

}  // namespace kvsched
