// FP8 e4m3 quantization of KV pages: which instruction set runs, the page loop, and the public entry points.
//
// Pages are (block, head) planes of rows x cols elements (4096 for block 16, head_dim 128), small enough that a page's
// second pass reads from L1. OpenMP splits the pages across threads. Each page runs the best vector path this CPU has
// and the caller allows (AVX-512 in fp8_avx512.cpp, AVX2 in fp8_avx2.cpp; both bit-identical with the scalar c10
// algorithm in e4m3.h), or the scalar reference in fp8_pages.h, which also takes every page holding NaN/inf. The
// module itself is compiled for baseline x86-64, so it loads on any x86-64 CPU.
#include "kvsched/fp8_quant.h"

#include <atomic>
#include <stdexcept>
#include <string>

#include "kvsched/fp8_pages.h"

#ifdef KVSCHED_X86
#include <immintrin.h>
#endif

namespace kvsched {
namespace {

using pages::Elem;
using pages::Page;
using pages::PageIo;

// Outputs at least this large are written with non-temporal stores: they cannot stay in the caches anyway (a 2-core
// share of a 32 MiB L3), and skipping the read-for-ownership of every output line saves a third of a quantize's
// memory traffic.
constexpr int64_t kStreamMinBytes = int64_t{8} << 20;
// Below this many bytes of KV a call runs on the calling thread. A vLLM CPU worker's cores are busy with the model's
// own threads (another OpenMP runtime): an OpenMP team for a few blocks then waits for cores and spins against them,
// measured at 30-60 ms for a one-block store with 2 threads on 2 busy cores against 0.9 ms on one thread. The tier
// moves a turn's blocks per layer per step (tens to hundreds of KiB), far below this; large copies still fan out.
constexpr int64_t kParallelMinBytes = int64_t{4} << 20;

Isa best_supported_isa() {
#ifdef KVSCHED_X86
  static const Isa best = [] {
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq"))
      return Isa::kAvx512;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c")) return Isa::kAvx2;
    return Isa::kScalar;
  }();
  return best;
#else
  return Isa::kScalar;
#endif
}

std::atomic<Isa> g_max_isa{Isa::kAvx512};

Isa active() { return std::min(g_max_isa.load(std::memory_order_relaxed), best_supported_isa()); }

// Page (blk, h) of the view; rows that follow each other in memory (vLLM's contiguous layout) become one run, so the
// vector loops see one long run with at most one tail.
template <typename T>
Page<T> page_of(const KvView& v, T* data, int64_t blk, int64_t h) {
  T* base = data + blk * v.stride_block + h * v.stride_head;
  if (v.stride_row == v.cols || v.rows == 1) return {base, 1, v.rows * v.cols, v.rows * v.cols};
  return {base, v.rows, v.cols, v.stride_row};
}

template <KvDtype D>
bool quantize_page_vector(Isa isa, const Page<const typename Elem<D>::T>& p, uint8_t* q, float* scale,
                          const PageIo& io) {
#ifdef KVSCHED_X86
  if (isa == Isa::kAvx512) return pages::quantize_page_avx512<D>(p, q, scale, io);
  if (isa == Isa::kAvx2) return pages::quantize_page_avx2<D>(p, q, scale, io);
#else
  (void)isa, (void)p, (void)q, (void)scale, (void)io;
#endif
  return false;
}

template <KvDtype D>
void dequantize_page(Isa isa, const uint8_t* q, float scale, const Page<typename Elem<D>::T>& p, bool stream) {
#ifdef KVSCHED_X86
  if (isa == Isa::kAvx512) return pages::dequantize_page_avx512<D>(q, scale, p, stream);
  if (isa == Isa::kAvx2) return pages::dequantize_page_avx2<D>(q, scale, p, stream);
#else
  (void)stream;
#endif
  pages::dequantize_page_scalar<D>(q, scale, p);
}

inline void publish_streamed_stores(bool stream) {
#ifdef KVSCHED_X86
  if (stream) _mm_sfence();  // non-temporal stores are weakly ordered: publish them before the call returns
#else
  (void)stream;
#endif
}

void check_ids(const KvView& cache, const int64_t* ids, int64_t num_ids) {
  for (int64_t i = 0; i < num_ids; ++i)
    if (ids[i] < 0 || ids[i] >= cache.num_blocks)
      throw std::out_of_range("block id " + std::to_string(ids[i]) + " outside [0, " +
                              std::to_string(cache.num_blocks) + ")");
}

template <KvDtype D>
void gather_quantize_impl(const KvView& cache, const int64_t* ids, int64_t num_ids, uint8_t* q, float* scales) {
  using T = typename Elem<D>::T;
  const int64_t heads = cache.num_heads, page = cache.rows * cache.cols, pages = num_ids * heads;
  const Isa isa = active();
  const bool stream = pages * page >= kStreamMinBytes;
  const bool parallel = pages * page * int64_t{sizeof(T)} >= kParallelMinBytes;
  const T* data = static_cast<const T*>(cache.data);
#pragma omp parallel if (parallel)
  {
#pragma omp for schedule(static) nowait
    for (int64_t i = 0; i < pages; ++i) {
      const Page<const T> p = page_of(cache, data, ids[i / heads], i % heads);
      uint8_t* out = q + i * page;
      PageIo io{nullptr, 0, stream};
      if (i + 1 < pages) {
        const Page<const T> next = page_of(cache, data, ids[(i + 1) / heads], (i + 1) % heads);
        if (next.rows == 1) io = {reinterpret_cast<const char*>(next.base), next.cols * int64_t{sizeof(T)}, stream};
      }
      if (quantize_page_vector<D>(isa, p, out, &scales[i], io)) continue;
      scales[i] = pages::quantize_page_scalar<D>(p, out);
    }
    publish_streamed_stores(stream);
  }
}

template <KvDtype D>
void scatter_dequantize_impl(const uint8_t* q, const float* scales, const KvView& cache, const int64_t* ids,
                             int64_t num_ids) {
  using T = typename Elem<D>::T;
  const int64_t heads = cache.num_heads, page = cache.rows * cache.cols, pages = num_ids * heads;
  const Isa isa = active();
  const bool stream = pages * page * int64_t{sizeof(T)} >= kStreamMinBytes;
  const bool parallel = pages * page * int64_t{sizeof(T)} >= kParallelMinBytes;
  T* data = static_cast<T*>(cache.data);
#pragma omp parallel if (parallel)
  {
#pragma omp for schedule(static) nowait
    for (int64_t i = 0; i < pages; ++i) {
      dequantize_page<D>(isa, q + i * page, scales[i], page_of(cache, data, ids[i / heads], i % heads), stream);
    }
    publish_streamed_stores(stream);
  }
}

}  // namespace

void gather_quantize_fp8(const KvView& cache, const int64_t* block_ids, int64_t num_ids, uint8_t* q, float* scales) {
  check_ids(cache, block_ids, num_ids);
  switch (cache.dtype) {
    case KvDtype::kFloat32: return gather_quantize_impl<KvDtype::kFloat32>(cache, block_ids, num_ids, q, scales);
    case KvDtype::kFloat16: return gather_quantize_impl<KvDtype::kFloat16>(cache, block_ids, num_ids, q, scales);
    case KvDtype::kBFloat16: return gather_quantize_impl<KvDtype::kBFloat16>(cache, block_ids, num_ids, q, scales);
  }
  throw std::invalid_argument("unknown KV dtype code");
}

void scatter_dequantize_fp8(const uint8_t* q, const float* scales, const KvView& cache, const int64_t* block_ids,
                            int64_t num_ids) {
  check_ids(cache, block_ids, num_ids);
  switch (cache.dtype) {
    case KvDtype::kFloat32: return scatter_dequantize_impl<KvDtype::kFloat32>(q, scales, cache, block_ids, num_ids);
    case KvDtype::kFloat16: return scatter_dequantize_impl<KvDtype::kFloat16>(q, scales, cache, block_ids, num_ids);
    case KvDtype::kBFloat16: return scatter_dequantize_impl<KvDtype::kBFloat16>(q, scales, cache, block_ids, num_ids);
  }
  throw std::invalid_argument("unknown KV dtype code");
}

void fp32_to_e4m3_array(const float* src, uint8_t* dst, int64_t n) {
#pragma omp parallel for schedule(static) if (n * int64_t{sizeof(float)} >= kParallelMinBytes)
  for (int64_t i = 0; i < n; ++i) dst[i] = fp32_to_e4m3(src[i]);
}

void e4m3_to_fp32_array(const uint8_t* src, float* dst, int64_t n) {
#pragma omp parallel for schedule(static) if (n * int64_t{sizeof(float)} >= kParallelMinBytes)
  for (int64_t i = 0; i < n; ++i) dst[i] = e4m3_to_fp32(src[i]);
}

Isa fp8_best_isa() { return best_supported_isa(); }

Isa fp8_active_isa() { return active(); }

void fp8_set_max_isa(Isa isa) { g_max_isa.store(isa, std::memory_order_relaxed); }

}  // namespace kvsched
