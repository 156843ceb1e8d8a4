// A hash map from 64-bit keys to a small value, open addressing with linear probing and backward-shift deletion (no
// tombstones): one flat array, no allocation per entry. std::unordered_map's node per entry cost the ghost LRU ~80 ns
// per sampled key and operation, most of a turn's ~10 us on 375-block prompts. `kEmpty` marks a free slot, so it is
// never a stored value.
#pragma once

#include <cstddef>
#include <cstdint>
#include <utility>
#include <vector>

namespace kvsched {

template <typename V, V kEmpty>
class FlatMap {
 public:
  FlatMap() { rehash(16); }

  size_t size() const { return size_; }

  V* find(uint64_t key) {
    for (size_t i = ideal(key);; i = (i + 1) & mask_) {
      Slot& s = slots_[i];
      if (s.value == kEmpty) return nullptr;
      if (s.key == key) return &s.value;
    }
  }

  // `key` must not be present; `value` != kEmpty.
  void insert(uint64_t key, V value) {
    if (2 * (size_ + 1) > slots_.size()) rehash(2 * slots_.size());
    place(key, value);
    ++size_;
  }

  bool erase(uint64_t key) {
    size_t i = ideal(key);
    for (;; i = (i + 1) & mask_) {
      if (slots_[i].value == kEmpty) return false;
      if (slots_[i].key == key) break;
    }
    // Backward shift: an entry further along the run moves into the hole when its ideal slot is not after the hole.
    for (size_t j = (i + 1) & mask_;; j = (j + 1) & mask_) {
      const Slot& s = slots_[j];
      if (s.value == kEmpty) break;
      const size_t k = ideal(s.key);
      const bool stays = i <= j ? (i < k && k <= j) : (i < k || k <= j);
      if (!stays) {
        slots_[i] = s;
        i = j;
      }
    }
    slots_[i].value = kEmpty;
    --size_;
    return true;
  }

  template <typename F>
  void for_each(F&& f) const {
    for (const Slot& s : slots_)
      if (s.value != kEmpty) f(s.key, s.value);
  }

 private:
  struct Slot {
    uint64_t key;
    V value;
  };

  // MurmurHash3's finalizer: the ghost's keys are sampled by their Fibonacci-mixed value, so that mix would crowd them.
  size_t ideal(uint64_t key) const {
    key ^= key >> 33;
    key *= UINT64_C(0xFF51AFD7ED558CCD);
    key ^= key >> 33;
    key *= UINT64_C(0xC4CEB9FE1A85EC53);
    key ^= key >> 33;
    return static_cast<size_t>(key) & mask_;
  }

  void place(uint64_t key, V value) {
    size_t i = ideal(key);
    while (slots_[i].value != kEmpty) i = (i + 1) & mask_;
    slots_[i] = {key, value};
  }

  void rehash(size_t capacity) {  // a power of two
    std::vector<Slot> old(capacity, Slot{0, kEmpty});
    old.swap(slots_);
    mask_ = capacity - 1;
    for (const Slot& s : old)
      if (s.value != kEmpty) place(s.key, s.value);
  }

  std::vector<Slot> slots_;
  size_t size_ = 0, mask_ = 0;
};

}  // namespace kvsched
