// What the FP8 page kernels of every instruction set share: element access per KV dtype, the page view, the scale
// rule, the scalar reference kernels (bit-identical with kvsched/ops/fp8.py's torch reference) and the entry points of
// the vector paths (one file per instruction set, compiled with per-function target attributes and chosen at run time,
// so the module loads on any x86-64 CPU).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "kvsched/e4m3.h"
#include "kvsched/fp8_quant.h"
#include "kvsched/half.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define KVSCHED_X86 1
#define KV_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq")))
#define KV_AVX2 __attribute__((target("avx2,f16c")))
#endif

namespace kvsched {
namespace pages {

constexpr float kFp8Max = 448.0f;
constexpr float kScaleMin = 0x1p-126f;  // keeps 1/scale finite

inline float page_scale(float amax) { return std::max(amax / kFp8Max, kScaleMin); }

template <KvDtype D>
struct Elem;
template <>
struct Elem<KvDtype::kFloat32> {
  using T = float;
  static float load(const T* p) { return *p; }
  static void store(T* p, float v) { *p = v; }
};
template <>
struct Elem<KvDtype::kFloat16> {
  using T = uint16_t;
  static float load(const T* p) { return fp16_to_fp32(*p); }
  static void store(T* p, float v) { *p = fp32_to_fp16(v); }
};
template <>
struct Elem<KvDtype::kBFloat16> {
  using T = uint16_t;
  static float load(const T* p) { return bf16_to_fp32(*p); }
  static void store(T* p, float v) { *p = fp32_to_bf16(v); }
};

// A page: `rows` runs of `cols` contiguous elements, `stride_row` apart.
template <typename T>
struct Page {
  T* base;
  int64_t rows, cols, stride_row;
  T* row(int64_t r) const { return base + r * stride_row; }
};

// Where a page's codes go and what to fetch meanwhile: `next` (the next page's first `next_bytes`, or null) is
// prefetched while this page converts, so memory and arithmetic overlap; `stream` writes with non-temporal stores
// (no read-for-ownership of the output lines) when the caller's output is too large to stay in cache.
struct PageIo {
  const char* next;
  int64_t next_bytes;
  bool stream;
};

// The element the quantizer stores for x: e4m3(clamp(x * inv, +-448)); NaN passes through.
inline uint8_t quantize_one(float x, float inv) {
  float v = x * inv;
  v = v > kFp8Max ? kFp8Max : (v < -kFp8Max ? -kFp8Max : v);
  return fp32_to_e4m3(v);
}

// The reference algorithm, element by element: the path for pages holding NaN/inf and for CPUs without a vector path.
template <KvDtype D>
float quantize_page_scalar(const Page<const typename Elem<D>::T>& p, uint8_t* q) {
  float amax = 0.0f;
  for (int64_t r = 0; r < p.rows; ++r)
    for (int64_t c = 0; c < p.cols; ++c) {
      const float a = std::fabs(Elem<D>::load(p.row(r) + c));
      if (a < INFINITY) amax = std::max(amax, a);  // false for NaN and inf
    }
  const float scale = page_scale(amax), inv = 1.0f / scale;
  for (int64_t r = 0; r < p.rows; ++r)
    for (int64_t c = 0; c < p.cols; ++c) *q++ = quantize_one(Elem<D>::load(p.row(r) + c), inv);
  return scale;
}

template <KvDtype D>
void dequantize_page_scalar(const uint8_t* q, float scale, const Page<typename Elem<D>::T>& p) {
  for (int64_t r = 0; r < p.rows; ++r)
    for (int64_t c = 0; c < p.cols; ++c) Elem<D>::store(p.row(r) + c, e4m3_to_fp32(*q++) * scale);
}

// The float amax of a page from the largest |x| as bits of the source dtype, or false when the page holds NaN or inf.
template <KvDtype D>
inline bool finite_amax(uint32_t bits, float* amax) {
  if constexpr (D == KvDtype::kFloat32) {
    *amax = f32_from_bits(bits);
    return bits < UINT32_C(0x7F800000);
  } else if constexpr (D == KvDtype::kFloat16) {
    *amax = fp16_to_fp32(static_cast<uint16_t>(bits));
    return bits < 0x7C00u;
  } else {
    *amax = bf16_to_fp32(static_cast<uint16_t>(bits));
    return bits < 0x7F80u;
  }
}

// Vector paths. quantize_* return false (and write nothing) when the page holds NaN or inf: the caller then runs the
// scalar path, which defines the result for those pages.
#ifdef KVSCHED_X86
template <KvDtype D>
KV_AVX512 bool quantize_page_avx512(const Page<const typename Elem<D>::T>& p, uint8_t* q, float* scale_out,
                                    const PageIo& io);
template <KvDtype D>
KV_AVX512 void dequantize_page_avx512(const uint8_t* q, float scale, const Page<typename Elem<D>::T>& p, bool stream);
template <KvDtype D>
KV_AVX2 bool quantize_page_avx2(const Page<const typename Elem<D>::T>& p, uint8_t* q, float* scale_out,
                                const PageIo& io);
template <KvDtype D>
KV_AVX2 void dequantize_page_avx2(const uint8_t* q, float scale, const Page<typename Elem<D>::T>& p, bool stream);
#endif

}  // namespace pages
}  // namespace kvsched
