// AVX-512 BRGEMM register tiles: fp32 with vfmadd231ps, bf16 with vdpbf16ps (AVX512_BF16).
//
// A tile keeps MR x NV zmm accumulators (16 fp32 columns each) for the whole chunk; per k
// (fp32) or k pair (bf16) it loads NV vectors of B and broadcasts one A value (pair) per
// row. N tails use masked loads/stores on the last vector, so nothing is read or written
// past the described matrices.
#include <immintrin.h>

#include "brgemm_internal.h"
#include "stream_prefetch.h"

namespace {

inline __mmask16 tail_mask(int tail) { return __mmask16((1u << tail) - 1u); }

// Accumulator arrays must be fully unrolled to stay in registers (else gcc keeps a
// stack copy and stores it every k step), hence the pragmas on every loop over them.
template <int MR, int NV>
inline void load_acc(__m512 (&acc)[MR][NV], const Tile& t, __mmask16 tm) {
  if (!t.load_c) {
#pragma GCC unroll 16
    for (int r = 0; r < MR; ++r)
#pragma GCC unroll 16
      for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_setzero_ps();
    return;
  }
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 16
    for (int v = 0; v < NV; ++v)
      acc[r][v] = v == NV - 1 ? _mm512_maskz_loadu_ps(tm, t.c + r * t.ldc + v * 16) : _mm512_loadu_ps(t.c + r * t.ldc + v * 16);
}

template <int MR, int NV>
inline void store_acc(const __m512 (&acc)[MR][NV], const Tile& t, __mmask16 tm) {
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 16
    for (int v = 0; v < NV; ++v) {
      if (v == NV - 1) _mm512_mask_storeu_ps(t.c + r * t.ldc + v * 16, tm, acc[r][v]);
      else _mm512_storeu_ps(t.c + r * t.ldc + v * 16, acc[r][v]);
    }
}

struct F32Kernel {
  template <int MR, int NV>
  static void run(const Tile& t) {
    const __mmask16 tm = tail_mask(t.tail);
    __m512 acc[MR][NV];
    load_acc<MR, NV>(acc, t, tm);
    for (int64_t i = t.ib; i < t.ie; ++i) {
      const float* a = static_cast<const float*>(t.a) + i * t.stride_a;
      const float* b[NV];
#pragma GCC unroll 16
      for (int v = 0; v < NV; ++v) b[v] = static_cast<const float*>(t.bv[v]) + i * t.stride_b;
      const int64_t step = t.b_row_step;
      // One-row tiles (GEMV: decode) read a packed panel (NB = 32 columns, 128 bytes per k)
      // once, front to back: prefetched ahead (stream_prefetch.h). bf16 panels stream at the
      // read probe's rate without it (0.92x with it): not prefetched.
      const bool stream = MR == 1 && NV == 2 && step == 32;
      for (int64_t kk = 0; kk < t.klen; ++kk) {
        if (stream) lowbit::prefetch_ahead<2>(b[0] + kk * step);
        __m512 bv[NV];
#pragma GCC unroll 16
        for (int v = 0; v < NV; ++v)
          bv[v] = v == NV - 1 ? _mm512_maskz_loadu_ps(tm, b[v] + kk * step) : _mm512_loadu_ps(b[v] + kk * step);
#pragma GCC unroll 16
        for (int r = 0; r < MR; ++r) {
          const __m512 av = _mm512_set1_ps(a[r * t.lda + kk]);
#pragma GCC unroll 16
          for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_fmadd_ps(av, bv[v], acc[r][v]);
        }
      }
    }
    store_acc<MR, NV>(acc, t, tm);
  }
};

// bf16: A pairs (a[k], a[k+1]) are broadcast as one 32-bit value; B vectors hold 16
// columns x 2 k in VNNI2 order. Packed B is already in that order; row-major B is
// interleaved on the fly (INTERLEAVE) from rows k and k+1.
template <bool INTERLEAVE>
struct Bf16Kernel {
  static inline __m512i load_b(const uint16_t* b, int64_t kk, int64_t step, int64_t ldb,
                               bool last, __mmask16 tm, bool pair_valid, __m512i idx) {
    if (!INTERLEAVE) return _mm512_loadu_si512(b + (kk / 2) * step);
    const __mmask16 m = last ? tm : __mmask16(0xffff);
    const __m256i r0 = _mm256_maskz_loadu_epi16(m, b + kk * ldb);
    const __m256i r1 = pair_valid ? _mm256_maskz_loadu_epi16(m, b + (kk + 1) * ldb) : _mm256_setzero_si256();
    return _mm512_permutex2var_epi16(_mm512_castsi256_si512(r0), idx, _mm512_castsi256_si512(r1));
  }

  template <int MR, int NV>
  static void run(const Tile& t) {
    const __mmask16 tm = tail_mask(t.tail);
    // out[2j] = row0[j], out[2j + 1] = row1[j] (index 32 + j selects the second source)
    const __m512i idx = _mm512_set_epi16(47, 15, 46, 14, 45, 13, 44, 12, 43, 11, 42, 10, 41, 9, 40, 8,
                                         39, 7, 38, 6, 37, 5, 36, 4, 35, 3, 34, 2, 33, 1, 32, 0);
    __m512 acc[MR][NV];
    load_acc<MR, NV>(acc, t, tm);
    for (int64_t i = t.ib; i < t.ie; ++i) {
      const uint16_t* a = static_cast<const uint16_t*>(t.a) + i * t.stride_a;
      const uint16_t* b[NV];
#pragma GCC unroll 16
      for (int v = 0; v < NV; ++v) b[v] = static_cast<const uint16_t*>(t.bv[v]) + i * t.stride_b;
      const int64_t kpairs = t.klen / 2;
      for (int64_t p = 0; p < kpairs; ++p) {
        const int64_t kk = 2 * p;
        __m512i bv[NV];
#pragma GCC unroll 16
        for (int v = 0; v < NV; ++v)
          bv[v] = load_b(b[v], kk, t.b_row_step, t.ldb, v == NV - 1, tm, true, idx);
#pragma GCC unroll 16
        for (int r = 0; r < MR; ++r) {
          int32_t pair;
          memcpy(&pair, a + r * t.lda + kk, 4);
          const __m512i av = _mm512_set1_epi32(pair);
#pragma GCC unroll 16
          for (int v = 0; v < NV; ++v)
            acc[r][v] = _mm512_dpbf16_ps(acc[r][v], (__m512bh)av, (__m512bh)bv[v]);
        }
      }
      if (t.klen & 1) {
        // Last k alone: zero the partner halves of A and B (a packed B's partner is the zero
        // pad row only when this block ends the matrix; 0 * inf would be NaN).
        const int64_t kk = t.klen - 1;
        const __m512i lo = _mm512_set1_epi32(0xffff);
        __m512i bv[NV];
#pragma GCC unroll 16
        for (int v = 0; v < NV; ++v)
          bv[v] = _mm512_and_si512(lo, load_b(b[v], kk, t.b_row_step, t.ldb, v == NV - 1, tm, false, idx));
#pragma GCC unroll 16
        for (int r = 0; r < MR; ++r) {
          const __m512i av = _mm512_set1_epi32(int32_t(a[r * t.lda + kk]));
#pragma GCC unroll 16
          for (int v = 0; v < NV; ++v)
            acc[r][v] = _mm512_dpbf16_ps(acc[r][v], (__m512bh)av, (__m512bh)bv[v]);
        }
      }
    }
    store_acc<MR, NV>(acc, t, tm);
  }
};

// 7 rows x 32 columns = 14 accumulators + 2 B vectors + 1 broadcast. Not 14 x 32 (28
// accumulators), which issues fewer loads per FMA but needs 14 A rows at once: with a row
// stride that is a multiple of 4 KiB (K = 2048 fp32 / 4096 bf16) they all sit in one L1
// set, 8-way on Zen 4, and every broadcast missed L1 (14 x 32 ran the 128x32x4096 tile at
// 70-72% of peak unpacked, 82% with the driver copying A to a de-aliased buffer; 7 x 32
// runs it at 95-96% with A read in place). 14 independent accumulators still cover the
// FMA / vdpbf16ps latency (measured at the same rate on an L1-resident 14 x 32 batch).
struct F32Traits {
  using T = float;
  static constexpr int VL = 16, MR = 7, NV = 2, KC = 256;
  static constexpr KernelTable<F32Kernel, MR, NV> table{};
};
template <bool INTERLEAVE>
struct Bf16Traits {
  using T = uint16_t;
  static constexpr int VL = 16, MR = 7, NV = 2, KC = 512;
  static constexpr KernelTable<Bf16Kernel<INTERLEAVE>, MR, NV> table{};
};

}  // namespace

namespace lowbit_brgemm {

KernelFn select_avx512(const Desc& d) {
  if (d.dtype == LOWBIT_DTYPE_F32) return &drive<F32Traits>;
  if (d.dtype == LOWBIT_DTYPE_BF16) return d.packed() ? &drive<Bf16Traits<false>> : &drive<Bf16Traits<true>>;
  return nullptr;
}

}  // namespace lowbit_brgemm
