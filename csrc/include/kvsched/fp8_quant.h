// FP8 (e4m3fn) quantization of KV-cache pages with one float32 scale per (block, KV head); see kvsched/ops/fp8.py
// for the specification (its torch reference) and the layout.
#pragma once

#include <cstddef>
#include <cstdint>

namespace kvsched {

enum class KvDtype : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// Instruction sets of the page kernels, ordered: a cap of kAvx2 runs AVX2 on an AVX-512 CPU (tests and benchmarks
// of the slower paths), a cap of kScalar runs the reference loops everywhere.
enum class Isa : int { kScalar = 0, kAvx2 = 1, kAvx512 = 2 };

// One layer's KV cache view [num_blocks, num_heads, rows, cols]; strides in elements, cols contiguous.
struct KvView {
  void* data;
  KvDtype dtype;
  int64_t num_blocks, num_heads, rows, cols;
  int64_t stride_block, stride_head, stride_row;
};

// q[i, h] = e4m3(clamp(cache[block_ids[i], h] / scale[i, h])), scales[i, h] = max(amax / 448, 2^-126).
// q is contiguous [num_ids, num_heads, rows, cols] bytes, scales contiguous [num_ids, num_heads]. Throws
// std::out_of_range on a block id outside [0, num_blocks).
void gather_quantize_fp8(const KvView& cache, const int64_t* block_ids, int64_t num_ids, uint8_t* q, float* scales);

// cache[block_ids[i], h] = dtype(float(q[i, h]) * scales[i, h]); block ids must be unique.
void scatter_dequantize_fp8(const uint8_t* q, const float* scales, const KvView& cache, const int64_t* block_ids,
                            int64_t num_ids);

// Element-wise conversions (bit-exact with torch's .to(float8_e4m3fn) / .float()), for tests and tools.
void fp32_to_e4m3_array(const float* src, uint8_t* dst, int64_t n);
void e4m3_to_fp32_array(const uint8_t* src, float* dst, int64_t n);

// The best path this CPU supports, the path that runs now (the better of the two, at most the cap), and the cap
// (process-wide; default kAvx512, i.e. the best the CPU has).
Isa fp8_best_isa();
Isa fp8_active_isa();
void fp8_set_max_isa(Isa isa);

}  // namespace kvsched
