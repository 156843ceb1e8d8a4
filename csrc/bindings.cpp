// pybind11 bindings of kvsched._C: the only file that knows about Python.
//
// Arrays cross as raw data pointers (torch's tensor.data_ptr()) plus shapes and strides, so the extension does not
// link libtorch; kvsched/ops/ validates dtypes, shapes, devices and contiguity before calling in. The GIL is
// released around every kernel.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "kvsched/crc32c.h"
#include "kvsched/fp8_quant.h"
#include "kvsched/ghost_lru.h"
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

// One binding for both CRC32C entry points (the SSE4.2 one and the table path): the same checks, the GIL released.
template <uint32_t (*Fn)(const void*, size_t, uint32_t)>
auto crc32c_binding(const char* name) {
  return [name](std::uintptr_t data, int64_t n, uint32_t crc) {
    if (n < 0) throw py::value_error(std::string(name) + ": n must be >= 0");
    py::gil_scoped_release release;
    return Fn(ptr<const void>(data), static_cast<size_t>(n), crc);
  };
}

constexpr const char* kIsaNames[] = {"scalar", "avx2", "avx512"};

const char* isa_name(kvsched::Isa isa) { return kIsaNames[static_cast<int>(isa)]; }

kvsched::Isa isa_of(const std::string& name) {
  for (int i = 0; i < 3; ++i)
    if (name == kIsaNames[i]) return static_cast<kvsched::Isa>(i);
  throw py::value_error("unknown instruction set '" + name + "'; choose scalar, avx2 or avx512");
}

// kvsched.core.ghost_lru.LruGhost's interface over the compiled ghost: the sampling of Python keys happens here, the
// ghost sees 64-bit keys (a key's Python hash: the int itself for ints below 2^61 - 1, SipHash for bytes).
class Ghost {
 public:
  explicit Ghost(int64_t rate) {
    if (rate < 1) throw py::value_error("the ghost's sampling rate must be >= 1");
    all_ = rate == 1;
    threshold_ = all_ ? 0 : static_cast<uint64_t>((static_cast<unsigned __int128>(1) << 64) / rate);
    byte_limit_ = 256 % rate == 0 ? static_cast<int>(256 / rate) : 0;
  }

  py::tuple observe(py::handle keys, int64_t cached, int64_t hittable, int64_t cap) {
    sample(keys);
    const auto c = lru_.observe(keys_.data(), pos_.data(), keys_.size(), cached, hittable, cap);
    return py::make_tuple(c.real, c.most, c.lru, c.full);
  }

  void cached(py::handle keys, int64_t cap) {
    sample(keys);
    lru_.cached(keys_.data(), keys_.size(), cap);
  }

  size_t size() const { return lru_.size(); }
  size_t held() const { return lru_.held(); }

  py::list keys() const {
    py::list out;
    for (uint64_t k : lru_.keys()) out.append(py::int_(static_cast<int64_t>(k)));
    return out;
  }

  py::dict running() const {
    py::dict out;
    for (const auto& [k, n] : lru_.running()) out[py::int_(static_cast<int64_t>(k))] = n;
    return out;
  }

 private:
  // kvsched.core.ghost_lru's rule: bytes keys by their first byte when the rate divides 256, others by their mixed hash.
  void sample(py::handle obj) {
    keys_.clear();
    pos_.clear();
    PyObject* seq = PySequence_Fast(obj.ptr(), "the ghost's keys must be a sequence");
    if (seq == nullptr) throw py::error_already_set();
    py::object hold = py::reinterpret_steal<py::object>(seq);
    if (PyList_CheckExact(seq) && !hashes_in_c(seq)) {  // the caller's own list, and a key's __hash__ could change it
      seq = PySequence_Tuple(seq);  // under the loop below (found by review: a use after free): read a copy then
      if (seq == nullptr) throw py::error_already_set();
      hold = py::reinterpret_steal<py::object>(seq);
    }
    const Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    PyObject** items = PySequence_Fast_ITEMS(seq);
    for (Py_ssize_t i = 0; i < n; ++i) {
      PyObject* k = items[i];
      const bool by_byte = byte_limit_ && PyBytes_CheckExact(k) && PyBytes_GET_SIZE(k) > 0;
      if (by_byte && static_cast<unsigned char>(PyBytes_AS_STRING(k)[0]) >= byte_limit_) continue;
      const Py_hash_t h = PyObject_Hash(k);
      if (h == -1 && PyErr_Occurred()) throw py::error_already_set();
      const uint64_t key = static_cast<uint64_t>(h);
      if (!by_byte && !all_ && key * kMix >= threshold_) continue;
      keys_.push_back(key);
      pos_.push_back(i);
    }
  }

  // Whether every key hashes without running Python code (exact bytes, int or str: vLLM's and the simulator's keys).
  static bool hashes_in_c(PyObject* list) {
    const Py_ssize_t n = PyList_GET_SIZE(list);
    for (Py_ssize_t i = 0; i < n; ++i) {
      PyObject* k = PyList_GET_ITEM(list, i);
      if (!PyBytes_CheckExact(k) && !PyLong_CheckExact(k) && !PyUnicode_CheckExact(k)) return false;
    }
    return true;
  }

  static constexpr uint64_t kMix = UINT64_C(0x9E3779B97F4A7C15);  // kvsched.core.ghost_lru.MIX
  kvsched::GhostLru lru_;
  bool all_ = false;
  uint64_t threshold_ = 0;
  int byte_limit_ = 0;
  std::vector<uint64_t> keys_;
  std::vector<int64_t> pos_;
};

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "kvsched C++ kernels (retention scoring/selection, FP8 KV quantization, CRC32C); arrays as data pointers.";

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

  m.def("crc32c", crc32c_binding<kvsched::crc32c>("crc32c"), py::arg("data"), py::arg("n"), py::arg("crc") = 0,
        "CRC32C (Castagnoli) of n bytes at address `data`, continuing `crc` as zlib.crc32's second argument does; the "
        "SSE4.2 crc32 instruction where the CPU has it, else a table.");
  m.def("crc32c_portable", crc32c_binding<kvsched::crc32c_portable>("crc32c_portable"), py::arg("data"), py::arg("n"),
        py::arg("crc") = 0, "crc32c through the table path whatever the CPU (tests).");
  m.def("crc32c_hardware", &kvsched::crc32c_hardware, "Whether crc32c runs on the SSE4.2 crc32 instruction here.");
  m.def(
      "crc32c_segments",
      [](std::uintptr_t addrs, std::uintptr_t lens, int64_t items, int64_t per_item, std::uintptr_t out) {
        if (items < 0 || per_item < 0) throw py::value_error("crc32c_segments: items and per_item must be >= 0");
        py::gil_scoped_release release;
        kvsched::crc32c_segments(ptr<const uint64_t>(addrs), ptr<const int64_t>(lens), items, per_item,
                                 ptr<uint32_t>(out));
      },
      py::arg("addrs"), py::arg("lens"), py::arg("items"), py::arg("per_item"), py::arg("out"),
      "Write to `out` (uint32[items]) the CRC32C of each item, item i being the segments i * per_item .. (i + 1) * "
      "per_item - 1 in order: `addrs` (uint64) and `lens` (int64, bytes) are contiguous arrays of items * per_item.");

  py::class_<Ghost>(m, "GhostLru",
                    "The pin payback tracker's ghost LRU (kvsched.core.ghost_lru.LruGhost's interface), compiled.")
      .def(py::init<int64_t>(), py::arg("rate"))
      .def("observe", &Ghost::observe, py::arg("keys"), py::arg("cached_blocks"), py::arg("hittable"), py::arg("cap"),
           "A request started with prompt keys `keys` (a sequence, prefix order): (real, most, lru, full).")
      .def("cached", &Ghost::cached, py::arg("keys"), py::arg("cap"),
           "A request finished: its keys become evictable, most recent, tail first.")
      .def("__len__", &Ghost::size)
      .def("held", &Ghost::held, "Distinct sampled keys running requests hold.")
      .def("keys", &Ghost::keys, "Evictable keys (their Python hashes), least recently used first.")
      .def("running", &Ghost::running, "Held keys (their Python hashes) -> how many running requests hold each.");
}
