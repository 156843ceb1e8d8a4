// The pin payback tracker's ghost LRU (kvsched/core/ghost_lru.py is the reference): the sampled block keys a plain LRU
// pool of the same size would hold, as 64-bit keys. Compiled because the tracker runs on every request (the engine's
// scheduler thread, the simulator's replay loop) and its Python form cost ~0.4x of an LRU replay's whole time.
#pragma once

#include <cstddef>
#include <cstdint>
#include <utility>
#include <vector>

#include "kvsched/flat_map.h"

namespace kvsched {

struct GhostCounts {
  int64_t real;  // sampled keys at a position < cached: the real pool's hits on the sample
  int64_t most;  // sampled keys a hit may cover (position < hittable; all when hittable < 0)
  int64_t lru;   // the ghost's prefix hit on the sample
  bool full;     // the ghost holds as many keys as it may (room)
};

class GhostLru {
 public:
  // A request started with the sampled keys `keys` of its prompt (prefix order), `pos` their positions in the prompt;
  // it holds them (not evictable) until `cached` gets them back. `cap`: the pool's sampled blocks less what running
  // requests hold beyond their prompts; the ghost keeps at most max(cap - held keys, 1) evictable keys.
  GhostCounts observe(const uint64_t* keys, const int64_t* pos, size_t n, int64_t cached, int64_t hittable,
                      int64_t cap);
  // A request finished: its sampled keys become evictable, most recent, tail first.
  void cached(const uint64_t* keys, size_t n, int64_t cap);

  size_t size() const { return index_.size(); }
  size_t held() const { return running_.size(); }
  std::vector<uint64_t> keys() const;  // evictable keys, least recently used first
  std::vector<std::pair<uint64_t, int64_t>> running() const;

 private:
  struct Node {
    uint64_t key;
    int32_t prev, next;
  };
  void push_mru(uint64_t key);
  bool erase(uint64_t key);
  void unlink(int32_t i);
  void trim(int64_t cap);

  std::vector<Node> nodes_;
  std::vector<int32_t> free_;
  int32_t head_ = -1, tail_ = -1;  // least and most recently used
  FlatMap<int32_t, -1> index_;   // evictable key -> its node
  FlatMap<int64_t, 0> running_;  // held key -> how many running requests hold it
};

}  // namespace kvsched
