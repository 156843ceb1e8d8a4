// pybind11 bindings of kvsched._C: the only file that knows about Python.
//
// Arrays cross as raw data pointers (torch's tensor.data_ptr()) plus shapes and strides, so the extension does not
// link libtorch; kvsched/ops/ validates dtypes, shapes, devices and contiguity before calling in. The GIL is
// released around every kernel.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <string>

#include "kvsched/fp8_quant.h"
#include "kvsched/score_select.h"

namespace py = pybind11;

namespace {

template <typename T>
T* ptr(std::uintptr_t p) {
  return reinterpret_cast<T*>(p);
}

kvsched::CandidateColumns columns(std::uintptr_t tokens, std::uintptr_t bytes_per_token, std::uintptr_t idle_s,
                                  std::uintptr_t next_use_s, std::uintptr_t role_weight, std::uintptr_t reuse_count) {
  return {ptr<const double>(tokens),     ptr<const double>(bytes_per_token), ptr<const double>(idle_s),
          ptr<const double>(next_use_s), ptr<const double>(role_weight),     ptr<const double>(reuse_count)};
}

kvsched::KvView kv_view(std::uintptr_t data, int dtype, int64_t num_blocks, int64_t num_heads, int64_t rows,
                        int64_t cols, int64_t stride_block, int64_t stride_head, int64_t stride_row) {
  if (dtype < 0 || dtype > 2) throw py::value_error("dtype code must be 0 (float32), 1 (float16) or 2 (bfloat16)");
  return {ptr<void>(data), static_cast<kvsched::KvDtype>(dtype), num_blocks, num_heads, rows, cols,
          stride_block,    stride_head,                          stride_row};
}

constexpr const char* kIsaNames[] = {"scalar", "avx2", "avx512"};

const char* isa_name(kvsched::Isa isa) { return kIsaNames[static_cast<int>(isa)]; }

kvsched::Isa isa_of(const std::string& name) {
  for (int i = 0; i < 3; ++i)
    if (name == kIsaNames[i]) return static_cast<kvsched::Isa>(i);
  throw py::value_error("unknown instruction set '" + name + "'; choose scalar, avx2 or avx512");
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "kvsched C++ kernels (retention scoring/selection, FP8 KV quantization); arrays as data pointers.";

  m.def(
      "retention_values",
      [](std::uintptr_t tokens, std::uintptr_t bytes_per_token, std::uintptr_t idle_s, std::uintptr_t next_use_s,
         std::uintptr_t role_weight, std::uintptr_t reuse_count, int64_t n, std::uintptr_t out) {
        const auto c = columns(tokens, bytes_per_token, idle_s, next_use_s, role_weight, reuse_count);
        py::gil_scoped_release release;
        kvsched::retention_values(c, n, ptr<double>(out));
      },
      py::arg("tokens"), py::arg("bytes_per_token"), py::arg("idle_s"), py::arg("next_use_s"), py::arg("role_weight"),
      py::arg("reuse_count"), py::arg("n"), py::arg("out"),
      "Write the float64 retention value of n candidates to `out`. Every argument but n is the address of a "
      "contiguous float64 array of length n (kvsched.core.scoring formula).");

  m.def(
      "score_select",
      [](std::uintptr_t tokens, std::uintptr_t bytes_per_token, std::uintptr_t idle_s, std::uintptr_t next_use_s,
         std::uintptr_t role_weight, std::uintptr_t reuse_count, std::uintptr_t pinned, int64_t n, int64_t k,
         std::uintptr_t out) {
        const auto c = columns(tokens, bytes_per_token, idle_s, next_use_s, role_weight, reuse_count);
        py::gil_scoped_release release;
        return kvsched::score_select(c, ptr<const uint8_t>(pinned), n, k, ptr<int64_t>(out));
      },
      py::arg("tokens"), py::arg("bytes_per_token"), py::arg("idle_s"), py::arg("next_use_s"), py::arg("role_weight"),
      py::arg("reuse_count"), py::arg("pinned"), py::arg("n"), py::arg("k"), py::arg("out"),
      "Write to `out` (int64, room for k) the indices of the k lowest-value candidates whose `pinned` byte is 0, "
      "lowest first, ties by index, NaN last; return how many were written. Columns are float64[n] addresses.");

  m.def(
      "gather_quantize_fp8",
      [](std::uintptr_t cache, int dtype, int64_t num_blocks, int64_t num_heads, int64_t rows, int64_t cols,
         int64_t stride_block, int64_t stride_head, int64_t stride_row, std::uintptr_t block_ids, int64_t num_ids,
         std::uintptr_t q, std::uintptr_t scales) {
        const auto view = kv_view(cache, dtype, num_blocks, num_heads, rows, cols, stride_block, stride_head, stride_row);
        py::gil_scoped_release release;
        kvsched::gather_quantize_fp8(view, ptr<const int64_t>(block_ids), num_ids, ptr<uint8_t>(q), ptr<float>(scales));
      },
      py::arg("cache"), py::arg("dtype"), py::arg("num_blocks"), py::arg("num_heads"), py::arg("rows"), py::arg("cols"),
      py::arg("stride_block"), py::arg("stride_head"), py::arg("stride_row"), py::arg("block_ids"), py::arg("num_ids"),
      py::arg("q"), py::arg("scales"),
      "Quantize pages cache[block_ids[i], h] (a [num_blocks, num_heads, rows, cols] view, element strides, cols "
      "contiguous; dtype 0 float32, 1 float16, 2 bfloat16) to e4m3 bytes q[num_ids, num_heads, rows, cols] with "
      "float32 scales[num_ids, num_heads]. Raises IndexError on an out-of-range block id.");

  m.def(
      "scatter_dequantize_fp8",
      [](std::uintptr_t q, std::uintptr_t scales, std::uintptr_t cache, int dtype, int64_t num_blocks,
         int64_t num_heads, int64_t rows, int64_t cols, int64_t stride_block, int64_t stride_head, int64_t stride_row,
         std::uintptr_t block_ids, int64_t num_ids) {
        const auto view = kv_view(cache, dtype, num_blocks, num_heads, rows, cols, stride_block, stride_head, stride_row);
        py::gil_scoped_release release;
        kvsched::scatter_dequantize_fp8(ptr<const uint8_t>(q), ptr<const float>(scales), view,
                                        ptr<const int64_t>(block_ids), num_ids);
      },
      py::arg("q"), py::arg("scales"), py::arg("cache"), py::arg("dtype"), py::arg("num_blocks"), py::arg("num_heads"),
      py::arg("rows"), py::arg("cols"), py::arg("stride_block"), py::arg("stride_head"), py::arg("stride_row"),
      py::arg("block_ids"), py::arg("num_ids"),
      "Write float(q[i, h]) * scales[i, h], rounded to the cache dtype, into pages cache[block_ids[i], h] (same view "
      "arguments as gather_quantize_fp8; block ids must be unique).");

  m.def(
      "fp32_to_e4m3",
      [](std::uintptr_t src, std::uintptr_t dst, int64_t n) {
        py::gil_scoped_release release;
        kvsched::fp32_to_e4m3_array(ptr<const float>(src), ptr<uint8_t>(dst), n);
      },
      py::arg("src"), py::arg("dst"), py::arg("n"),
      "Convert n float32 values to e4m3fn bytes exactly as torch>=2.13 .to(torch.float8_e4m3fn) (RNE, saturating).");

  m.def(
      "e4m3_to_fp32",
      [](std::uintptr_t src, std::uintptr_t dst, int64_t n) {
        py::gil_scoped_release release;
        kvsched::e4m3_to_fp32_array(ptr<const uint8_t>(src), ptr<float>(dst), n);
      },
      py::arg("src"), py::arg("dst"), py::arg("n"), "Convert n e4m3fn bytes to float32 (exact).");

  m.def(
      "fp8_best_isa", [] { return isa_name(kvsched::fp8_best_isa()); },
      "The best FP8 kernel path this CPU supports: 'avx512', 'avx2' or 'scalar'.");
  m.def(
      "fp8_active_isa", [] { return isa_name(kvsched::fp8_active_isa()); },
      "The FP8 kernel path that runs now: the CPU's best, at most the cap set by fp8_set_max_isa.");
  m.def(
      "fp8_set_max_isa", [](const std::string& name) { kvsched::fp8_set_max_isa(isa_of(name)); }, py::arg("name"),
      "Cap the FP8 kernel path at 'avx512' (default: the CPU's best), 'avx2' or 'scalar' (process-wide; for tests and "
      "benchmarks of the slower paths). Raises ValueError on another name.");
}
