// The ghost LRU of kvsched/core/ghost_lru.py over 64-bit keys: an intrusive doubly linked list in one vector (freed
// nodes reused) and a flat hash index (kvsched/flat_map.h), so a touch, an insert and an eviction are O(1) without an
// allocation each.
#include "kvsched/ghost_lru.h"

#include <algorithm>

namespace kvsched {

GhostCounts GhostLru::observe(const uint64_t* keys, const int64_t* pos, size_t n, int64_t cached, int64_t hittable,
                              int64_t cap) {
  GhostCounts c{0, 0, 0, false};
  bool prefix = true;
  for (size_t i = 0; i < n; ++i) {
    const uint64_t k = keys[i];
    c.real += pos[i] < cached;
    c.most += hittable < 0 || pos[i] < hittable;
    int64_t* held = running_.find(k);
    if (erase(k) || held) {
      c.lru += prefix;
    } else {
      prefix = false;
    }
    if (held)
      ++*held;
    else
      running_.insert(k, 1);
  }
  trim(cap);
  c.full = static_cast<int64_t>(index_.size()) >= std::max<int64_t>(cap - static_cast<int64_t>(running_.size()), 1);
  return c;
}

void GhostLru::cached(const uint64_t* keys, size_t n, int64_t cap) {
  for (size_t i = n; i-- > 0;) {
    const uint64_t k = keys[i];
    if (int64_t* held = running_.find(k)) {
      if (*held > 1) {
        --*held;
        continue;
      }
      running_.erase(k);
    }
    erase(k);
    push_mru(k);
  }
  trim(cap);
}

std::vector<uint64_t> GhostLru::keys() const {
  std::vector<uint64_t> out;
  out.reserve(index_.size());
  for (int32_t i = head_; i >= 0; i = nodes_[i].next) out.push_back(nodes_[i].key);
  return out;
}

std::vector<std::pair<uint64_t, int64_t>> GhostLru::running() const {
  std::vector<std::pair<uint64_t, int64_t>> out;
  running_.for_each([&out](uint64_t k, int64_t n) { out.emplace_back(k, n); });
  return out;
}

void GhostLru::push_mru(uint64_t key) {
  int32_t i;
  if (!free_.empty()) {
    i = free_.back();
    free_.pop_back();
  } else {
    i = static_cast<int32_t>(nodes_.size());
    nodes_.push_back({});
  }
  nodes_[i] = {key, tail_, -1};
  if (tail_ >= 0)
    nodes_[tail_].next = i;
  else
    head_ = i;
  tail_ = i;
  index_.insert(key, i);
}

bool GhostLru::erase(uint64_t key) {
  const int32_t* i = index_.find(key);
  if (i == nullptr) return false;
  unlink(*i);
  index_.erase(key);
  return true;
}

void GhostLru::unlink(int32_t i) {
  const Node& node = nodes_[i];
  if (node.prev >= 0)
    nodes_[node.prev].next = node.next;
  else
    head_ = node.next;
  if (node.next >= 0)
    nodes_[node.next].prev = node.prev;
  else
    tail_ = node.prev;
  free_.push_back(i);
}

void GhostLru::trim(int64_t cap) {
  const int64_t room = std::max<int64_t>(cap - static_cast<int64_t>(running_.size()), 1);
  while (static_cast<int64_t>(index_.size()) > room) {
    const int32_t i = head_;
    index_.erase(nodes_[i].key);
    unlink(i);
  }
}

}  // namespace kvsched
