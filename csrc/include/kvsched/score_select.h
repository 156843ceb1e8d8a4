// Retention values of eviction candidates and selection of the k lowest; the formula is
// kvsched/core/scoring.py's (float64, same operation order), the specification is kvsched/ops/score.py.
#pragma once

#include <cstdint>

namespace kvsched {

// All columns are contiguous float64 arrays of length n.
struct CandidateColumns {
  const double* tokens;
  const double* bytes_per_token;
  const double* idle_s;
  const double* next_use_s;
  const double* role_weight;
  const double* reuse_count;
};

void retention_values(const CandidateColumns& c, int64_t n, double* out);

// Writes the indices of the k lowest-value candidates with pinned[i] == 0 to out, lowest first, ties by index, NaN
// values last; returns how many were written (min(k, number unpinned)).
int64_t score_select(const CandidateColumns& c, const uint8_t* pinned, int64_t n, int64_t k, int64_t* out);

}  // namespace kvsched
