// The AVX-512 path of the FP8 page kernels (16 float lanes; bf16/fp16 amax scanned 32 lanes at a time; bf16/fp16
// dequantization through a per-page table of the 256 possible outputs). Bit-identical with the scalar reference.
//
// Speed (Zen 5, 128 MiB bf16, measured with kvsched bench kernels): the vector loops use full-width loads and stores
// and keep masked ones for the tail of a run only (masked loads in the body made the kernel 2.4x slower: ~8 GB/s per
// thread, far below the memory); contiguous rows form one run; bf16/fp16 amax is an integer max over 32 half-width
// lanes, unconverted; the next page is prefetched while this one converts; large outputs use non-temporal stores.
#include "kvsched/fp8_pages.h"

#ifdef KVSCHED_X86
#include <immintrin.h>
#if defined(__GNUC__) && !defined(__clang__)
// GCC 12 flags the self-initialised `_mm512_undefined_*` placeholders inside its own intrinsics (false positive).
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#endif

namespace kvsched {
namespace pages {
namespace {

// Loads and stores come in two kinds: full 16-lane ones for the body of a run and masked ones for its tail only.
// (Masked loads in the body ran the page at a third of the memory bandwidth on Zen 5: measured, see git log.)
template <KvDtype D>
KV_AVX512 inline __m512 load16(const typename Elem<D>::T* p) {
  if constexpr (D == KvDtype::kFloat32) {
    return _mm512_loadu_ps(p);
  } else if constexpr (D == KvDtype::kFloat16) {
    return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  } else {
    const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  }
}

template <KvDtype D>
KV_AVX512 inline __m512 load16(const typename Elem<D>::T* p, __mmask16 m) {
  if constexpr (D == KvDtype::kFloat32) {
    return _mm512_maskz_loadu_ps(m, p);
  } else if constexpr (D == KvDtype::kFloat16) {
    return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, p));
  } else {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p)), 16));
  }
}

template <KvDtype D>
KV_AVX512 inline __m256i to_half_bits(__m512 v) {
  if constexpr (D == KvDtype::kFloat16) {
    return _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  } else {  // bf16, round to nearest even, NaN -> 0x7FC0 (as c10::BFloat16)
    const __m512i u = _mm512_castps_si512(v);
    const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    __m512i r = _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7FFF)), odd), 16);
    r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7FC0));
    return _mm512_cvtepi32_epi16(r);
  }
}

template <KvDtype D>
KV_AVX512 inline void store16(typename Elem<D>::T* p, __m512 v) {
  if constexpr (D == KvDtype::kFloat32) {
    _mm512_storeu_ps(p, v);
  } else {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), to_half_bits<D>(v));
  }
}

template <KvDtype D>
KV_AVX512 inline void store16(typename Elem<D>::T* p, __m512 v, __mmask16 m) {
  if constexpr (D == KvDtype::kFloat32) {
    _mm512_mask_storeu_ps(p, m, v);
  } else {
    _mm256_mask_storeu_epi16(p, m, to_half_bits<D>(v));
  }
}

// e4m3 codes of 16 finite floats with |v| < 464 (so no clamp is needed; see quantize_page_avx512). Rounds |v| to
// e4m3 precision by adding c = 2^(e+20), whose float32 ulp is e4m3's ulp 2^(e-3) at v's exponent e (e >= -6 covers
// subnormals): the hardware add rounds to nearest even with a correct sticky bit. The code is then
// mantissa steps (s - c) plus the biased exponent ((e + 6) << 3).
KV_AVX512 inline __m512i e4m3_codes(__m512 v) {
  const __m512i vb = _mm512_castps_si512(v);
  const __m512i a = _mm512_and_si512(vb, _mm512_set1_epi32(0x7FFFFFFF));
  __m512i e = _mm512_and_si512(vb, _mm512_set1_epi32(0x7F800000));
  e = _mm512_max_epu32(e, _mm512_set1_epi32(121 << 23));
  const __m512i c = _mm512_add_epi32(e, _mm512_set1_epi32(20 << 23));
  const __m512i s = _mm512_castps_si512(_mm512_add_ps(_mm512_castsi512_ps(a), _mm512_castsi512_ps(c)));
  __m512i code = _mm512_add_epi32(_mm512_sub_epi32(s, c), _mm512_srli_epi32(e, 20));
  code = _mm512_sub_epi32(code, _mm512_set1_epi32(121 << 3));
  // code | (sign bit >> 24)
  return _mm512_ternarylogic_epi32(code, _mm512_srli_epi32(vb, 24), _mm512_set1_epi32(0x80), 0xF8);
}

// float32 values of 16 e4m3 codes (exact; NaN for 0x7F/0xFF).
KV_AVX512 inline __m512 e4m3_values(__m128i bytes) {
  const __m512i b = _mm512_cvtepu8_epi32(bytes);
  const __m512i em = _mm512_and_si512(b, _mm512_set1_epi32(0x7F));
  const __m512 normal = _mm512_castsi512_ps(_mm512_add_epi32(_mm512_slli_epi32(em, 20), _mm512_set1_epi32(120 << 23)));
  const __m512 sub = _mm512_mul_ps(_mm512_cvtepi32_ps(em), _mm512_set1_ps(1.0f / 512.0f));
  __m512 v = _mm512_mask_mov_ps(normal, _mm512_cmplt_epi32_mask(em, _mm512_set1_epi32(8)), sub);
  v = _mm512_mask_mov_ps(v, _mm512_cmpeq_epi32_mask(em, _mm512_set1_epi32(0x7F)),
                         _mm512_castsi512_ps(_mm512_set1_epi32(0x7FC00000)));
  const __m512i sign = _mm512_slli_epi32(b, 24);
  return _mm512_castsi512_ps(
      _mm512_ternarylogic_epi32(_mm512_castps_si512(v), sign, _mm512_set1_epi32(INT32_MIN), 0xF8));
}

KV_AVX512 inline __mmask16 tail_mask16(int64_t left) { return static_cast<__mmask16>((1u << left) - 1u); }
KV_AVX512 inline __mmask32 tail_mask32(int64_t left) { return static_cast<__mmask32>((UINT64_C(1) << left) - 1u); }

// Largest |x| of a page as the bits of the source dtype (integer order is float order for non-negative floats), so
// bf16/fp16 pages are scanned 32 lanes at a time without converting; NaN and inf compare above every finite value.
template <KvDtype D>
KV_AVX512 uint32_t abs_max_bits(const Page<const typename Elem<D>::T>& p) {
  if constexpr (D == KvDtype::kFloat32) {
    const __m512i abs_mask = _mm512_set1_epi32(0x7FFFFFFF);
    __m512i m0 = _mm512_setzero_si512(), m1 = _mm512_setzero_si512();
    for (int64_t r = 0; r < p.rows; ++r) {
      const float* row = p.row(r);
      int64_t c = 0;
      for (; c + 32 <= p.cols; c += 32) {
        m0 = _mm512_max_epu32(m0, _mm512_and_si512(_mm512_loadu_si512(row + c), abs_mask));
        m1 = _mm512_max_epu32(m1, _mm512_and_si512(_mm512_loadu_si512(row + c + 16), abs_mask));
      }
      for (; c < p.cols; c += 16) {
        const int64_t left = p.cols - c;
        const __m512i x = left >= 16 ? _mm512_loadu_si512(row + c) : _mm512_maskz_loadu_epi32(tail_mask16(left), row + c);
        m0 = _mm512_max_epu32(m0, _mm512_and_si512(x, abs_mask));
      }
    }
    return static_cast<uint32_t>(_mm512_reduce_max_epu32(_mm512_max_epu32(m0, m1)));
  } else {
    const __m512i abs_mask = _mm512_set1_epi16(0x7FFF);
    __m512i m0 = _mm512_setzero_si512(), m1 = _mm512_setzero_si512();
    for (int64_t r = 0; r < p.rows; ++r) {
      const uint16_t* row = p.row(r);
      int64_t c = 0;
      for (; c + 64 <= p.cols; c += 64) {
        m0 = _mm512_max_epu16(m0, _mm512_and_si512(_mm512_loadu_si512(row + c), abs_mask));
        m1 = _mm512_max_epu16(m1, _mm512_and_si512(_mm512_loadu_si512(row + c + 32), abs_mask));
      }
      for (; c < p.cols; c += 32) {
        const int64_t left = p.cols - c;
        const __m512i x = left >= 32 ? _mm512_loadu_si512(row + c) : _mm512_maskz_loadu_epi16(tail_mask32(left), row + c);
        m0 = _mm512_max_epu16(m0, _mm512_and_si512(x, abs_mask));
      }
    }
    const __m512i m = _mm512_max_epu16(m0, m1);  // 16-bit maxima, then the larger half of each 32-bit lane
    return static_cast<uint32_t>(
        _mm512_reduce_max_epu32(_mm512_max_epu32(_mm512_srli_epi32(m, 16), _mm512_and_si512(m, _mm512_set1_epi32(0xFFFF)))));
  }
}


// 64 e4m3 codes of x[0..64) in order: four 16-lane conversions packed to bytes (two 32->16 packs, one 16->8 pack
// interleave 128-bit lanes; one dword permute restores the order).
template <KvDtype D>
KV_AVX512 inline __m512i codes64(const typename Elem<D>::T* x, __m512 inv) {
  const __m512i c0 = e4m3_codes(_mm512_mul_ps(load16<D>(x), inv));
  const __m512i c1 = e4m3_codes(_mm512_mul_ps(load16<D>(x + 16), inv));
  const __m512i c2 = e4m3_codes(_mm512_mul_ps(load16<D>(x + 32), inv));
  const __m512i c3 = e4m3_codes(_mm512_mul_ps(load16<D>(x + 48), inv));
  const __m512i b = _mm512_packus_epi16(_mm512_packus_epi32(c0, c1), _mm512_packus_epi32(c2, c3));
  return _mm512_permutexvar_epi32(_mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15), b);
}

}  // namespace

template <KvDtype D>
KV_AVX512 bool quantize_page_avx512(const Page<const typename Elem<D>::T>& p, uint8_t* q, float* scale_out,
                                    const PageIo& io) {
  float amax;
  if (!finite_amax<D>(abs_max_bits<D>(p), &amax)) return false;
  const float scale = page_scale(amax);
  // |x| <= amax, scale >= RN(amax/448), inv <= RN(1/scale): x * inv <= 448 * (1 + 2^-24)^3 / (1 - 2^-24) < 464,
  // and with the 2^-126 floor x * inv < 448; e4m3 rounding then never leaves [-448, 448], so no clamp is needed.
  const __m512 inv = _mm512_set1_ps(1.0f / scale);
  const char* pf = io.next;
  const char* const pf_end = io.next ? io.next + io.next_bytes : nullptr;
  // lines of the next page to prefetch per 64 elements converted, so the whole next page is requested by the end
  const int64_t lines = (io.next_bytes + 63) / 64, chunks = std::max<int64_t>(1, p.rows * p.cols / 64);
  const int64_t per_chunk = (lines + chunks - 1) / chunks;
  for (int64_t r = 0; r < p.rows; ++r) {
    const auto* row = p.row(r);
    int64_t c = 0;
    const bool stream = io.stream && (reinterpret_cast<uintptr_t>(q) & 63) == 0;
    for (; c + 64 <= p.cols; c += 64) {
      for (int64_t k = 0; k < per_chunk && pf < pf_end; ++k, pf += 64) _mm_prefetch(pf, _MM_HINT_T0);
      const __m512i b = codes64<D>(row + c, inv);
      if (stream)
        _mm512_stream_si512(reinterpret_cast<__m512i*>(q + c), b);
      else
        _mm512_storeu_si512(q + c, b);
    }
    for (; c + 16 <= p.cols; c += 16) {
      const __m512i code = e4m3_codes(_mm512_mul_ps(load16<D>(row + c), inv));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(q + c), _mm512_cvtepi32_epi8(code));
    }
    if (c < p.cols) {
      const __mmask16 m = tail_mask16(p.cols - c);
      const __m512i code = e4m3_codes(_mm512_mul_ps(load16<D>(row + c, m), inv));
      _mm_mask_storeu_epi8(q + c, m, _mm512_cvtepi32_epi8(code));
    }
    q += p.cols;
  }
  *scale_out = scale;
  return true;
}

namespace {

// bf16/fp16 results of a page through a table of its 256 possible outputs, dtype(float(code) * scale): the page's
// 4096 elements then cost 256 conversions plus a lookup each (four 64-entry word permutes, three blends per 32
// codes) instead of a conversion each. Every entry is the arithmetic path's own result, so both are bit-identical.
struct HalfTable {
  __m512i part[8];  // entries 32k .. 32k+31 in part[k]
};

template <KvDtype D>
KV_AVX512 inline void build_table(float scale, HalfTable* t) {
  const __m512 s = _mm512_set1_ps(scale);
  const __m128i lane = _mm_setr_epi8(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  for (int k = 0; k < 8; ++k) {
    const __m128i c0 = _mm_add_epi8(lane, _mm_set1_epi8(static_cast<char>(32 * k)));
    const __m128i c1 = _mm_add_epi8(c0, _mm_set1_epi8(16));
    const __m256i lo = to_half_bits<D>(_mm512_mul_ps(e4m3_values(c0), s));
    const __m256i hi = to_half_bits<D>(_mm512_mul_ps(e4m3_values(c1), s));
    t->part[k] = _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1);
  }
}

KV_AVX512 inline __m512i lookup32(const HalfTable& t, __m256i codes) {
  const __m512i idx = _mm512_cvtepu8_epi16(codes);  // permutes read index bits 0..5; bits 6 and 7 pick the pair
  const __m512i r0 = _mm512_permutex2var_epi16(t.part[0], idx, t.part[1]);
  const __m512i r1 = _mm512_permutex2var_epi16(t.part[2], idx, t.part[3]);
  const __m512i r2 = _mm512_permutex2var_epi16(t.part[4], idx, t.part[5]);
  const __m512i r3 = _mm512_permutex2var_epi16(t.part[6], idx, t.part[7]);
  const __mmask32 b6 = _mm512_test_epi16_mask(idx, _mm512_set1_epi16(64));
  const __mmask32 b7 = _mm512_test_epi16_mask(idx, _mm512_set1_epi16(128));
  return _mm512_mask_blend_epi16(b7, _mm512_mask_blend_epi16(b6, r0, r1), _mm512_mask_blend_epi16(b6, r2, r3));
}

// Pages smaller than this convert element by element: building the table costs about 256 conversions.
constexpr int64_t kTableMinElems = 1024;

}  // namespace

template <KvDtype D>
KV_AVX512 void dequantize_page_avx512(const uint8_t* q, float scale, const Page<typename Elem<D>::T>& p, bool stream) {
  const __m512 s = _mm512_set1_ps(scale);
  HalfTable table;
  const bool use_table = D != KvDtype::kFloat32 && p.rows * p.cols >= kTableMinElems;
  if constexpr (D != KvDtype::kFloat32) {
    if (use_table) build_table<D>(scale, &table);
  }
  for (int64_t r = 0; r < p.rows; ++r) {
    auto* row = p.row(r);
    const bool st = stream && (reinterpret_cast<uintptr_t>(row) & 63) == 0;
    int64_t c = 0;
    if constexpr (D != KvDtype::kFloat32) {  // 32 half-width outputs make one 64-byte store
      for (; c + 32 <= p.cols; c += 32) {
        const __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + c));
        __m512i v;
        if (use_table) {
          v = lookup32(table, b);
        } else {
          const __m256i lo = to_half_bits<D>(_mm512_mul_ps(e4m3_values(_mm256_castsi256_si128(b)), s));
          const __m256i hi = to_half_bits<D>(_mm512_mul_ps(e4m3_values(_mm256_extracti128_si256(b, 1)), s));
          v = _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1);
        }
        if (st)
          _mm512_stream_si512(reinterpret_cast<__m512i*>(row + c), v);
        else
          _mm512_storeu_si512(row + c, v);
      }
    }
    for (; c + 16 <= p.cols; c += 16) {
      const __m512 v = _mm512_mul_ps(e4m3_values(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q + c))), s);
      if constexpr (D == KvDtype::kFloat32) {
        if (st) {
          _mm512_stream_ps(row + c, v);
          continue;
        }
      }
      store16<D>(row + c, v);
    }
    if (c < p.cols) {
      const __mmask16 m = tail_mask16(p.cols - c);
      store16<D>(row + c, _mm512_mul_ps(e4m3_values(_mm_maskz_loadu_epi8(m, q + c)), s), m);
    }
    q += p.cols;
  }
}

#define KVSCHED_INSTANTIATE(D)                                                                                    \
  template bool quantize_page_avx512<D>(const Page<const Elem<D>::T>&, uint8_t*, float*, const PageIo&);         \
  template void dequantize_page_avx512<D>(const uint8_t*, float, const Page<Elem<D>::T>&, bool);
KVSCHED_INSTANTIATE(KvDtype::kFloat32)
KVSCHED_INSTANTIATE(KvDtype::kFloat16)
KVSCHED_INSTANTIATE(KvDtype::kBFloat16)
#undef KVSCHED_INSTANTIATE

}  // namespace pages
}  // namespace kvsched
#endif  // KVSCHED_X86
