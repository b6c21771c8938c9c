// Buffer allocation for compiled code (`memref.alloc` / `memref.dealloc`, lowered with
// finalize-memref-to-llvm{use-generic-functions=1} to the `_mlir_memref_to_llvm_*` entry
// points below).
//
// A compiled graph allocates the same intermediate buffers on every call. With plain
// malloc, buffers of a few MB are mmap'ed and unmapped (or trimmed from the heap) each
// time, so every call pays page faults and page clearing for them (~15% of an attention
// block's time). Large blocks are therefore kept on free lists keyed by (size class,
// alignment) and reused. The cache is bounded (LOWBIT_ALLOC_CACHE_MB, default 1024; 0
// disables it) and lowbit_rt_release_cached_memory() returns it to the system.
//
// Small blocks are many: a 1B model's decode step allocates and frees ~600 of them (one
// token's activations, RoPE and attention temporaries), serially, while the other threads
// wait; through malloc (and glibc's consolidation of its free chunks) that was ~1% of the
// step. They are kept per thread instead, a few per power-of-two class up to 32 KiB (at most
// ~1 MiB per thread, outside LOWBIT_ALLOC_CACHE_MB's count), without a lock.
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <map>
#include <mutex>
#include <utility>
#include <vector>

#include "lowbit/runtime.h"

namespace {

constexpr size_t kCachedMin = 64 * 1024;  // smaller blocks: plain malloc/free
constexpr size_t kPage = 4096;
constexpr size_t kMinAlign = 64;
constexpr int kSmallClasses = 10;        // 64 B << c, c < 10: up to 32 KiB
constexpr int kSmallPerClass = 16;
constexpr size_t kSmallMax = kMinAlign << (kSmallClasses - 1);

// Stored just below the pointer handed out.
struct Header {
  void* raw;
  size_t size_class;  // usable bytes (0: not cacheable)
  size_t align;
  size_t magic;
};
constexpr size_t kMagic = 0x6c6f77626974ULL;  // "lowbit"

struct Cache {
  std::mutex mu;
  std::map<std::pair<size_t, size_t>, std::vector<void*>> free_lists;  // -> user pointers
  size_t cached_bytes = 0;
  size_t limit = 0;

  Cache() {
    const char* env = getenv("LOWBIT_ALLOC_CACHE_MB");
    long mb = env ? atol(env) : 1024;
    limit = mb > 0 ? size_t(mb) << 20 : 0;
  }
};

Cache& cache() {
  static Cache* c = new Cache();  // never destroyed: compiled code may free at exit
  return *c;
}

Header* header_of(void* user) { return reinterpret_cast<Header*>(static_cast<char*>(user) - sizeof(Header)); }

// `cacheable`: the block returns to the free lists when freed (else straight to the system).
void* fresh(size_t size_class, size_t align, bool cacheable) {
  // The header sits in the `align` bytes before the user pointer (align >= sizeof(Header)).
  void* raw = aligned_alloc(align, align + size_class);
  if (!raw) return nullptr;
  void* user = static_cast<char*>(raw) + align;
  Header* h = header_of(user);
  h->raw = raw;
  h->size_class = cacheable ? size_class : 0;
  h->align = align;
  h->magic = kMagic;
  return user;
}

void release(Header* h) {
  h->magic = 0;
  free(h->raw);
}

// The calling thread's small blocks, by class; created on first use, freed at thread exit.
struct SmallCache {
  void* blocks[kSmallClasses][kSmallPerClass];
  int count[kSmallClasses] = {};
};
thread_local SmallCache* t_small = nullptr;

void release_small(SmallCache* sc) {
  for (int c = 0; c < kSmallClasses; ++c)
    for (int i = 0; i < sc->count[c]; ++i) release(header_of(sc->blocks[c][i]));
  delete sc;
}

void small_cache_exit(void* sc) {
  t_small = nullptr;  // a free later in this thread's exit goes to the system
  release_small(static_cast<SmallCache*>(sc));
}

pthread_key_t small_key() {
  static pthread_key_t key = [] {
    pthread_key_t k;
    pthread_key_create(&k, small_cache_exit);
    return k;
  }();
  return key;
}

SmallCache* small_cache() {
  if (!t_small) {
    t_small = new SmallCache();
    pthread_setspecific(small_key(), t_small);
  }
  return t_small;
}

int small_class(size_t size) {
  int c = 0;
  while ((kMinAlign << c) < size) ++c;
  return c;
}

void* allocate(size_t align, size_t size) {
  if (align < kMinAlign) align = kMinAlign;
  if (align & (align - 1)) return nullptr;
  if (size == 0) size = 1;
  Cache& c = cache();
  if (c.limit > 0 && size <= kSmallMax && align == kMinAlign) {
    const int k = small_class(size);
    SmallCache* sc = small_cache();
    if (sc->count[k] > 0) return sc->blocks[k][--sc->count[k]];
    return fresh(kMinAlign << k, align, true);
  }
  const bool cacheable = c.limit > 0 && size >= kCachedMin;
  const size_t size_class = cacheable ? (size + kPage - 1) / kPage * kPage : (size + align - 1) / align * align;
  if (cacheable) {
    std::lock_guard<std::mutex> lock(c.mu);
    auto it = c.free_lists.find({size_class, align});
    if (it != c.free_lists.end() && !it->second.empty()) {
      void* user = it->second.back();
      it->second.pop_back();
      c.cached_bytes -= size_class;
      return user;
    }
  }
  return fresh(size_class, align, cacheable);
}

}  // namespace

extern "C" {

LOWBIT_API void* _mlir_memref_to_llvm_alloc(size_t size) { return allocate(kMinAlign, size); }

LOWBIT_API void* _mlir_memref_to_llvm_aligned_alloc(size_t alignment, size_t size) {
  return allocate(alignment, size);
}

LOWBIT_API void _mlir_memref_to_llvm_free(void* user) {
  if (!user) return;
  Header* h = header_of(user);
  if (h->magic != kMagic) abort();  // not ours: a double free or a foreign pointer
  if (h->size_class && h->size_class <= kSmallMax) {
    SmallCache* sc = small_cache();
    const int k = small_class(h->size_class);
    if (sc->count[k] < kSmallPerClass) {
      sc->blocks[k][sc->count[k]++] = user;
      return;
    }
    release(h);
    return;
  }
  if (h->size_class) {
    Cache& c = cache();
    std::lock_guard<std::mutex> lock(c.mu);
    if (c.cached_bytes + h->size_class <= c.limit) {
      c.free_lists[{h->size_class, h->align}].push_back(user);
      c.cached_bytes += h->size_class;
      return;
    }
  }
  release(h);
}

LOWBIT_API int64_t lowbit_rt_cached_memory(void) {
  Cache& c = cache();
  std::lock_guard<std::mutex> lock(c.mu);
  return int64_t(c.cached_bytes);
}

LOWBIT_API void lowbit_rt_release_cached_memory(void) {
  if (t_small) {
    release_small(t_small);
    t_small = nullptr;
    pthread_setspecific(small_key(), nullptr);
  }
  Cache& c = cache();
  std::lock_guard<std::mutex> lock(c.mu);
  for (auto& entry : c.free_lists)
    for (void* user : entry.second) release(header_of(user));
  c.free_lists.clear();
  c.cached_bytes = 0;
}

}  // extern "C"
