// The kernel table behind every *_dispatch / *_invoke pair: dispatch turns a description (a
// fixed-size key of int64 fields) into a handle, invoke turns a handle back into the entry.
//
// Compiled code dispatches at run time (the token count M of a call picks the tile shape),
// from several threads, so a repeated description must be a cheap, lock-free lookup:
//  - entries live in chunks that are allocated once and never move or change after they
//    are published, so invoke reads `handle -> entry` with two acquire loads;
//  - an open-addressing hash index (linear probing, never resized, never deleted from) maps
//    key -> handle; a reader probes it without a lock and only compares published entries;
//  - inserts take a mutex, re-probe, append the entry, then publish the handle in its slot
//    with a release store (entry writes happen-before any reader that sees the handle).
// Equal descriptions always get the same handle; only distinct descriptions consume entries.
#ifndef LOWBIT_HANDLE_TABLE_H
#define LOWBIT_HANDLE_TABLE_H

#include <stdint.h>
#include <string.h>

#include <atomic>
#include <mutex>

namespace lowbit {

template <class Entry, int KeyWords>
class HandleTable {
 public:
  using Key = int64_t[KeyWords];
  static constexpr int64_t kChunkBits = 10, kChunkSize = int64_t(1) << kChunkBits;
  static constexpr int64_t kChunks = 256;                       // 262144 distinct kernels
  static constexpr int64_t kCapacity = kChunkSize * kChunks;
  static constexpr int64_t kSlots = int64_t(1) << 19;           // 2x capacity, power of 2

  static uint64_t hash(const Key& key) {
    uint64_t h = 0x9e3779b97f4a7c15ull;
    for (int i = 0; i < KeyWords; ++i) {
      h ^= uint64_t(key[i]) + 0x9e3779b97f4a7c15ull + (h << 6) + (h >> 2);
      h *= 0xff51afd7ed558ccdull;
    }
    return h ^ (h >> 29);
  }

  // The entry of a handle, or nullptr (lock-free).
  const Entry* get(int64_t handle) const {
    if (handle < 1 || handle > count_.load(std::memory_order_acquire)) return nullptr;
    const int64_t i = handle - 1;
    return &chunks_[i >> kChunkBits].load(std::memory_order_acquire)[i & (kChunkSize - 1)];
  }

  // The handle of an already published key, or 0 (lock-free).
  int64_t find(const Key& key) const {
    const uint64_t h = hash(key);
    for (uint64_t s = h & (kSlots - 1);; s = (s + 1) & (kSlots - 1)) {
      const int32_t v = slots_[s].load(std::memory_order_acquire);
      if (v == 0) return 0;
      if (!memcmp(get_unchecked(v).key, key, sizeof(Key))) return v;
    }
  }

  // The handle of `key`, making `make()` its entry if it is new (make() returns the Entry,
  // whose `key` member must equal `key`). -full_error when the table is full.
  template <class Make>
  int64_t find_or_insert(const Key& key, Make make, int64_t full_error) {
    if (const int64_t v = find(key)) return v;
    std::lock_guard<std::mutex> lock(mutex_);
    const uint64_t h = hash(key);
    uint64_t s = h & (kSlots - 1);
    for (;; s = (s + 1) & (kSlots - 1)) {
      const int32_t v = slots_[s].load(std::memory_order_relaxed);
      if (v == 0) break;
      if (!memcmp(get_unchecked(v).key, key, sizeof(Key))) return v;
    }
    const int64_t count = count_.load(std::memory_order_relaxed);
    if (count >= kCapacity) return -full_error;
    Entry* chunk = chunks_[count >> kChunkBits].load(std::memory_order_relaxed);
    if (!chunk) {
      chunk = new Entry[kChunkSize];
      chunks_[count >> kChunkBits].store(chunk, std::memory_order_release);
    }
    chunk[count & (kChunkSize - 1)] = make();
    count_.store(count + 1, std::memory_order_release);
    slots_[s].store(int32_t(count + 1), std::memory_order_release);
    return count + 1;
  }

  int64_t size() const { return count_.load(std::memory_order_acquire); }

 private:
  const Entry& get_unchecked(int64_t handle) const {
    const int64_t i = handle - 1;
    return chunks_[i >> kChunkBits].load(std::memory_order_acquire)[i & (kChunkSize - 1)];
  }

  std::atomic<Entry*> chunks_[kChunks] = {};
  std::atomic<int64_t> count_{0};
  std::atomic<int32_t> slots_[kSlots] = {};
  std::mutex mutex_;
};

}  // namespace lowbit

#endif
