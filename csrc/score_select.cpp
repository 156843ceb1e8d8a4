// Retention values and k-lowest selection over up to millions of candidates.
//
// Selection is parallel and O(n): each OpenMP thread scans its slice keeping a buffer of (key, index) pairs below a
// running threshold; when the buffer holds 2k (at least kMinBuffer) pairs it is cut to its k smallest with
// nth_element and the threshold drops to the k-th key. The threads' survivors are merged with one more nth_element
// and the final k are sorted. Keys map doubles to uint64 so that integer order = numeric order (NaN last, -0 == +0).
#include "kvsched/score_select.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <exception>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace kvsched {
namespace {

constexpr double kPrefillTokS = 10000.0;    // kvsched.core.scoring.PREFILL_TOK_S
constexpr double kAttnKneeTokens = 32768.0;  // kvsched.core.scoring.ATTN_KNEE_TOKENS
constexpr int64_t kChunk = 2048;
constexpr size_t kMinBuffer = 4096;

// Same operations in the same order as kvsched.core.scoring.retention_value (compiled with -ffp-contract=off).
inline double value_of(const CandidateColumns& c, int64_t i) {
  const double tokens = c.tokens[i], idle = c.idle_s[i], next = c.next_use_s[i], reuse = c.reuse_count[i];
  double p_reuse = (reuse + 1.0) / (reuse + 2.0);
  const double overdue = std::max(idle - 2.0 * next, 0.0);
  // exp(-0.0) == 1 exactly, so skipping the call for sessions that are not overdue changes no bit.
  p_reuse *= overdue > 0.0 || overdue != overdue ? std::exp(-overdue / std::max(next, 1.0)) : 1.0;
  const double wait_s = std::max(next - idle, 0.0) + 1.0;
  const double nbytes = std::max(tokens * c.bytes_per_token[i], 1.0);
  const double cost_s = tokens / kPrefillTokS * (1.0 + tokens / kAttnKneeTokens);
  return c.role_weight[i] * p_reuse * cost_s / (nbytes * wait_s);
}

inline uint64_t order_key(double v) {
  if (std::isnan(v)) return ~UINT64_C(0);
  v += 0.0;  // -0.0 -> +0.0
  uint64_t b;
  std::memcpy(&b, &v, sizeof b);
  return (b >> 63) ? ~b : (b | (UINT64_C(1) << 63));
}

struct Entry {
  uint64_t key;
  int64_t index;
  bool operator<(const Entry& o) const { return key < o.key || (key == o.key && index < o.index); }
};

// Keeps the k smallest entries of `buf` (unordered) and returns the largest kept key.
inline uint64_t cut_to_k(std::vector<Entry>& buf, size_t k) {
  std::nth_element(buf.begin(), buf.begin() + static_cast<std::ptrdiff_t>(k - 1), buf.end());
  buf.resize(k);
  return buf[k - 1].key;
}

void scan_slice(const CandidateColumns& c, const uint8_t* pinned, int64_t lo, int64_t hi, size_t k,
                std::vector<Entry>& buf) {
  const size_t cap = std::max(2 * k, kMinBuffer);
  // Never more entries than the slice has (found by review: reserving 2k of the global k per thread took
  // threads x 2n x 16 bytes when k is near n).
  buf.reserve(std::min(cap + static_cast<size_t>(kChunk), static_cast<size_t>(hi - lo)));
  uint64_t threshold = ~UINT64_C(0);
  bool full = false;  // threshold is meaningful once k entries were kept
  double values[kChunk];
  for (int64_t base = lo; base < hi; base += kChunk) {
    const int64_t m = std::min<int64_t>(kChunk, hi - base);
    for (int64_t j = 0; j < m; ++j) values[j] = value_of(c, base + j);
    for (int64_t j = 0; j < m; ++j) {
      if (pinned[base + j]) continue;
      const uint64_t key = order_key(values[j]);
      // Indices grow within a slice, so a later equal key loses the tie: strict < is exact.
      if (!full || key < threshold) buf.push_back({key, base + j});
    }
    if (buf.size() >= cap) {
      threshold = cut_to_k(buf, k);
      full = true;
    }
  }
  if (buf.size() > k) cut_to_k(buf, k);
}

}  // namespace

void retention_values(const CandidateColumns& c, int64_t n, double* out) {
#pragma omp parallel for schedule(static) if (n >= 4 * kChunk)  // a team for a few sessions costs more than it saves
  for (int64_t i = 0; i < n; ++i) out[i] = value_of(c, i);
}

int64_t score_select(const CandidateColumns& c, const uint8_t* pinned, int64_t n, int64_t k, int64_t* out) {
  if (k <= 0 || n <= 0) return 0;
  const size_t kk = static_cast<size_t>(std::min(k, n));
  int threads = 1;
#ifdef _OPENMP
  threads = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(omp_get_max_threads(), n / (4 * kChunk))));
#endif
  std::vector<std::vector<Entry>> parts(static_cast<size_t>(threads));
  // OpenMP may start a smaller team than asked (OMP_THREAD_LIMIT, OMP_DYNAMIC, a nested region): each thread takes
  // every team-size-th slice, so all `threads` slices are scanned whatever the team (found by review: a short team
  // left the missing threads' slices unscanned). An exception must not leave the parallel region (std::terminate:
  // found by review, a std::bad_alloc there aborted the engine): the first is kept and rethrown after it, which
  // pybind11 turns into MemoryError.
  std::exception_ptr error;
#pragma omp parallel num_threads(threads)
  {
    int first = 0, step = 1;
#ifdef _OPENMP
    first = omp_get_thread_num();
    step = omp_get_num_threads();
#endif
    try {
      for (int t = first; t < threads; t += step) {
        const int64_t lo = n * t / threads, hi = n * (t + 1) / threads;
        scan_slice(c, pinned, lo, hi, kk, parts[static_cast<size_t>(t)]);
      }
    } catch (...) {
#pragma omp critical(kvsched_score_select_error)
      if (!error) error = std::current_exception();
    }
  }
  if (error) std::rethrow_exception(error);
  std::vector<Entry> all;
  for (auto& p : parts) all.insert(all.end(), p.begin(), p.end());
  const size_t got = std::min(kk, all.size());
  if (got == 0) return 0;
  if (all.size() > got) cut_to_k(all, got);
  std::sort(all.begin(), all.end());
  for (size_t i = 0; i < got; ++i) out[i] = all[i].index;
  return static_cast<int64_t>(got);
}

}  // namespace kvsched
