// The AVX2 path of the FP8 page kernels, for CPUs without AVX-512 (most AMD EPYC before Zen 4, many Intel servers).
//
// The same integer rounding as the AVX-512 path (see e4m3_codes), 8 float lanes wide: bf16/fp16 amax is an integer max
// over 16 half-width lanes, unconverted; 32 codes are packed per 32-byte store; the next page is prefetched while this
// one converts; large outputs use non-temporal stores. AVX2 has no byte or word masks, so the last cols % 8 elements of
// a run go through the scalar reference (the same function, so the result is bit-identical on every element).
#include "kvsched/fp8_pages.h"

#ifdef KVSCHED_X86
#include <immintrin.h>

namespace kvsched {
namespace pages {
namespace {

template <KvDtype D>
KV_AVX2 inline __m256 load8(const typename Elem<D>::T* p) {
  if constexpr (D == KvDtype::kFloat32) {
    return _mm256_loadu_ps(p);
  } else if constexpr (D == KvDtype::kFloat16) {
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  } else {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  }
}

// Eight results rounded to the cache dtype and stored; bf16 rounds to nearest even with NaN -> 0x7FC0 (c10::BFloat16).
template <KvDtype D>
KV_AVX2 inline void store8(typename Elem<D>::T* p, __m256 v) {
  if constexpr (D == KvDtype::kFloat32) {
    _mm256_storeu_ps(p, v);
  } else if constexpr (D == KvDtype::kFloat16) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  } else {
    const __m256i u = _mm256_castps_si256(v);
    const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    __m256i r = _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7FFF)), odd), 16);
    const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
    r = _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7FC0), nan);
    // 8 x u32 (each <= 0xFFFF) -> 8 x u16: the pack works per 128-bit lane, the permute gathers both lanes' halves.
    const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), 0x08);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_castsi256_si128(packed));
  }
}

// e4m3 codes of 8 finite floats with |v| < 464: the AVX-512 path's e4m3_codes, 8 lanes wide (adding c = 2^(e+20)
// rounds |v| to e4m3 precision in the float adder; the code is the mantissa steps plus the biased exponent).
KV_AVX2 inline __m256i e4m3_codes(__m256 v) {
  const __m256i vb = _mm256_castps_si256(v);
  const __m256i a = _mm256_and_si256(vb, _mm256_set1_epi32(0x7FFFFFFF));
  __m256i e = _mm256_and_si256(vb, _mm256_set1_epi32(0x7F800000));
  e = _mm256_max_epu32(e, _mm256_set1_epi32(121 << 23));
  const __m256i c = _mm256_add_epi32(e, _mm256_set1_epi32(20 << 23));
  const __m256i s = _mm256_castps_si256(_mm256_add_ps(_mm256_castsi256_ps(a), _mm256_castsi256_ps(c)));
  __m256i code = _mm256_add_epi32(_mm256_sub_epi32(s, c), _mm256_srli_epi32(e, 20));
  code = _mm256_sub_epi32(code, _mm256_set1_epi32(121 << 3));
  return _mm256_or_si256(code, _mm256_and_si256(_mm256_srli_epi32(vb, 24), _mm256_set1_epi32(0x80)));
}

// float32 values of 8 e4m3 codes (exact; NaN for 0x7F/0xFF).
KV_AVX2 inline __m256 e4m3_values(__m128i bytes) {
  const __m256i b = _mm256_cvtepu8_epi32(bytes);
  const __m256i em = _mm256_and_si256(b, _mm256_set1_epi32(0x7F));
  const __m256 normal =
      _mm256_castsi256_ps(_mm256_add_epi32(_mm256_slli_epi32(em, 20), _mm256_set1_epi32(120 << 23)));
  const __m256 sub = _mm256_mul_ps(_mm256_cvtepi32_ps(em), _mm256_set1_ps(1.0f / 512.0f));
  __m256 v = _mm256_blendv_ps(normal, sub, _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32(8), em)));
  v = _mm256_blendv_ps(v, _mm256_castsi256_ps(_mm256_set1_epi32(0x7FC00000)),
                       _mm256_castsi256_ps(_mm256_cmpeq_epi32(em, _mm256_set1_epi32(0x7F))));
  const __m256i sign = _mm256_and_si256(_mm256_slli_epi32(b, 24), _mm256_set1_epi32(INT32_MIN));
  return _mm256_castsi256_ps(_mm256_or_si256(_mm256_castps_si256(v), sign));
}

KV_AVX2 inline uint32_t hmax_epu32(__m256i m) {
  __m128i x = _mm_max_epu32(_mm256_castsi256_si128(m), _mm256_extracti128_si256(m, 1));
  x = _mm_max_epu32(x, _mm_shuffle_epi32(x, 0x4E));
  x = _mm_max_epu32(x, _mm_shuffle_epi32(x, 0xB1));
  return static_cast<uint32_t>(_mm_cvtsi128_si32(x));
}

// Largest |x| of a page as bits of the source dtype (integer order is float order for non-negative floats); NaN and
// inf compare above every finite value.
template <KvDtype D>
KV_AVX2 uint32_t abs_max_bits(const Page<const typename Elem<D>::T>& p) {
  uint32_t tail = 0;
  if constexpr (D == KvDtype::kFloat32) {
    const __m256i abs_mask = _mm256_set1_epi32(0x7FFFFFFF);
    __m256i m0 = _mm256_setzero_si256(), m1 = _mm256_setzero_si256();
    for (int64_t r = 0; r < p.rows; ++r) {
      const float* row = p.row(r);
      int64_t c = 0;
      for (; c + 16 <= p.cols; c += 16) {
        m0 = _mm256_max_epu32(m0, _mm256_and_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + c)),
                                                   abs_mask));
        m1 = _mm256_max_epu32(m1, _mm256_and_si256(
                                      _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + c + 8)), abs_mask));
      }
      for (; c < p.cols; ++c) tail = std::max(tail, f32_bits(row[c]) & UINT32_C(0x7FFFFFFF));
    }
    return std::max(tail, hmax_epu32(_mm256_max_epu32(m0, m1)));
  } else {
    const __m256i abs_mask = _mm256_set1_epi16(0x7FFF);
    __m256i m0 = _mm256_setzero_si256(), m1 = _mm256_setzero_si256();
    for (int64_t r = 0; r < p.rows; ++r) {
      const uint16_t* row = p.row(r);
      int64_t c = 0;
      for (; c + 32 <= p.cols; c += 32) {
        m0 = _mm256_max_epu16(m0, _mm256_and_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + c)),
                                                   abs_mask));
        m1 = _mm256_max_epu16(m1, _mm256_and_si256(
                                      _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + c + 16)), abs_mask));
      }
      for (; c < p.cols; ++c) tail = std::max<uint32_t>(tail, row[c] & 0x7FFFu);
    }
    const __m256i m = _mm256_max_epu16(m0, m1);  // 16-bit maxima, then the larger half of each 32-bit lane
    const __m256i wide = _mm256_max_epu32(_mm256_srli_epi32(m, 16), _mm256_and_si256(m, _mm256_set1_epi32(0xFFFF)));
    return std::max(tail, hmax_epu32(wide));
  }
}

// 32 e4m3 codes of x[0..32) in order: four 8-lane conversions; the two packs interleave the 128-bit lanes in 4-byte
// groups and one dword permute restores the order.
template <KvDtype D>
KV_AVX2 inline __m256i codes32(const typename Elem<D>::T* x, __m256 inv) {
  const __m256i c0 = e4m3_codes(_mm256_mul_ps(load8<D>(x), inv));
  const __m256i c1 = e4m3_codes(_mm256_mul_ps(load8<D>(x + 8), inv));
  const __m256i c2 = e4m3_codes(_mm256_mul_ps(load8<D>(x + 16), inv));
  const __m256i c3 = e4m3_codes(_mm256_mul_ps(load8<D>(x + 24), inv));
  const __m256i b = _mm256_packus_epi16(_mm256_packus_epi32(c0, c1), _mm256_packus_epi32(c2, c3));
  return _mm256_permutevar8x32_epi32(b, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
}

}  // namespace

template <KvDtype D>
KV_AVX2 bool quantize_page_avx2(const Page<const typename Elem<D>::T>& p, uint8_t* q, float* scale_out,
                                const PageIo& io) {
  float amax;
  if (!finite_amax<D>(abs_max_bits<D>(p), &amax)) return false;
  const float scale = page_scale(amax), inv_s = 1.0f / scale;
  // As in the AVX-512 path: every x * inv stays below 464 and rounds into [-448, 448], so no clamp is needed.
  const __m256 inv = _mm256_set1_ps(inv_s);
  const char* pf = io.next;
  const char* const pf_end = io.next ? io.next + io.next_bytes : nullptr;
  const int64_t lines = (io.next_bytes + 63) / 64, chunks = std::max<int64_t>(1, p.rows * p.cols / 32);
  const int64_t per_chunk = (lines + chunks - 1) / chunks;
  for (int64_t r = 0; r < p.rows; ++r) {
    const auto* row = p.row(r);
    int64_t c = 0;
    const bool stream = io.stream && (reinterpret_cast<uintptr_t>(q) & 31) == 0;
    for (; c + 32 <= p.cols; c += 32) {
      for (int64_t k = 0; k < per_chunk && pf < pf_end; ++k, pf += 64) _mm_prefetch(pf, _MM_HINT_T0);
      const __m256i b = codes32<D>(row + c, inv);
      if (stream)
        _mm256_stream_si256(reinterpret_cast<__m256i*>(q + c), b);
      else
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + c), b);
    }
    for (; c + 8 <= p.cols; c += 8) {
      const __m256i code = e4m3_codes(_mm256_mul_ps(load8<D>(row + c), inv));
      const __m256i w = _mm256_packus_epi32(code, code);  // lane-wise: codes 0-3 | 0-3 || 4-7 | 4-7
      const __m128i b = _mm_packus_epi16(_mm256_castsi256_si128(w), _mm256_extracti128_si256(w, 1));
      _mm_storel_epi64(reinterpret_cast<__m128i*>(q + c), _mm_shuffle_epi32(b, 0x08));
    }
    for (; c < p.cols; ++c) q[c] = quantize_one(Elem<D>::load(row + c), inv_s);
    q += p.cols;
  }
  *scale_out = scale;
  return true;
}

template <KvDtype D>
KV_AVX2 void dequantize_page_avx2(const uint8_t* q, float scale, const Page<typename Elem<D>::T>& p, bool stream) {
  const __m256 s = _mm256_set1_ps(scale);
  for (int64_t r = 0; r < p.rows; ++r) {
    auto* row = p.row(r);
    int64_t c = 0;
    if constexpr (D == KvDtype::kFloat32) {
      const bool st = stream && (reinterpret_cast<uintptr_t>(row) & 31) == 0;
      for (; c + 8 <= p.cols; c += 8) {
        const __m256 v = _mm256_mul_ps(e4m3_values(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(q + c))), s);
        if (st)
          _mm256_stream_ps(row + c, v);
        else
          _mm256_storeu_ps(row + c, v);
      }
    } else {
      for (; c + 8 <= p.cols; c += 8)
        store8<D>(row + c, _mm256_mul_ps(e4m3_values(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(q + c))), s));
    }
    for (; c < p.cols; ++c) Elem<D>::store(row + c, e4m3_to_fp32(q[c]) * scale);
    q += p.cols;
  }
}

#define KVSCHED_INSTANTIATE(D)                                                                                    \
  template bool quantize_page_avx2<D>(const Page<const Elem<D>::T>&, uint8_t*, float*, const PageIo&);           \
  template void dequantize_page_avx2<D>(const uint8_t*, float, const Page<Elem<D>::T>&, bool);
KVSCHED_INSTANTIATE(KvDtype::kFloat32)
KVSCHED_INSTANTIATE(KvDtype::kFloat16)
KVSCHED_INSTANTIATE(KvDtype::kBFloat16)
#undef KVSCHED_INSTANTIATE

}  // namespace pages
}  // namespace kvsched
#endif  // KVSCHED_X86
