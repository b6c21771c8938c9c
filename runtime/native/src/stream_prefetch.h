// Software prefetch for GEMV tiles (one activation row, decode): they read every weight byte
// once, front to back, from DRAM, and the hardware prefetchers alone keep too few lines in
// flight because they restart at every 4 KiB page. The tiles prefetch (prefetcht0) the line
// kGemvPrefetchAhead bytes past each line they read: later K of the same block, then the
// next block, which follows it in memory. Prefetches past the end of the weights never
// fault. Measured with benchmarks/gemv_stream.py (docs/kernels.md, docs/dense.md): on Zen 5,
// 2 threads, the 1b preset's ternary GEMVs 1.08-1.19x, int1 1.49x, int4 g32 1.05-1.17x, an
// fp32 head 1.23-1.67x; 1 KiB ahead gained nothing, 6-12 KiB about the same as 8 KiB.
// 8-bit codes and AVX-512 bf16 panels keep up without it (0.92-1.0x with it): not used there.
#ifndef LOWBIT_STREAM_PREFETCH_H
#define LOWBIT_STREAM_PREFETCH_H

#include <immintrin.h>
#include <stdint.h>

namespace lowbit {

constexpr int64_t kGemvPrefetchAhead = 8192;

// Prefetch the LINES 64-byte lines that start kGemvPrefetchAhead bytes after `p`.
template <int LINES>
inline __attribute__((always_inline)) void prefetch_ahead(const void* p) {
  const char* q = static_cast<const char*>(p) + kGemvPrefetchAhead;
#pragma GCC unroll 4
  for (int l = 0; l < LINES; ++l) _mm_prefetch(q + 64 * l, _MM_HINT_T0);
}

}  // namespace lowbit

#endif
