// AVX2 + FMA BRGEMM register tiles. fp32 uses vfmadd231ps on ymm; bf16 is widened to fp32
// in registers (a bf16 is the top half of an fp32), so the same packed VNNI2 layout serves:
// one 32-bit lane of a packed B vector holds (B[k][j], B[k+1][j]); `<< 16` gives B[k][j]
// and `& 0xffff0000` gives B[k+1][j].
#include <immintrin.h>

#include "brgemm_internal.h"
#include "stream_prefetch.h"

namespace {

inline __m256i tail_mask(int tail) {
  const __m256i lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(tail), lanes);
}

// Accumulator arrays must be fully unrolled to stay in registers (else gcc keeps a
// stack copy and stores it every k step), hence the pragmas on every loop over them.
template <int MR, int NV>
inline void load_acc(__m256 (&acc)[MR][NV], const Tile& t, __m256i tm) {
  if (!t.load_c) {
#pragma GCC unroll 16
    for (int r = 0; r < MR; ++r)
#pragma GCC unroll 16
      for (int v = 0; v < NV; ++v) acc[r][v] = _mm256_setzero_ps();
    return;
  }
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 16
    for (int v = 0; v < NV; ++v)
      acc[r][v] = v == NV - 1 ? _mm256_maskload_ps(t.c + r * t.ldc + v * 8, tm) : _mm256_loadu_ps(t.c + r * t.ldc + v * 8);
}

template <int MR, int NV>
inline void store_acc(const __m256 (&acc)[MR][NV], const Tile& t, __m256i tm) {
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 16
    for (int v = 0; v < NV; ++v) {
      if (v == NV - 1) _mm256_maskstore_ps(t.c + r * t.ldc + v * 8, tm, acc[r][v]);
      else _mm256_storeu_ps(t.c + r * t.ldc + v * 8, acc[r][v]);
    }
}

// One-row tiles (GEMV: decode) stream their part of a packed B panel from DRAM and
// prefetch ahead (stream_prefetch.h). A tile here is 16 of the panel's 32 columns, i.e. one
// 64-byte line per k of the 128-byte packed rows.
struct F32Kernel {
  template <int MR, int NV>
  static void run(const Tile& t) {
    const __m256i tm = tail_mask(t.tail);
    __m256 acc[MR][NV];
    load_acc<MR, NV>(acc, t, tm);
    for (int64_t i = t.ib; i < t.ie; ++i) {
      const float* a = static_cast<const float*>(t.a) + i * t.stride_a;
      const float* b[NV];
#pragma GCC unroll 16
      for (int v = 0; v < NV; ++v) b[v] = static_cast<const float*>(t.bv[v]) + i * t.stride_b;
      const int64_t step = t.b_row_step;
      const bool stream = MR == 1 && step == 32;  // a packed panel
      for (int64_t kk = 0; kk < t.klen; ++kk) {
        if (stream) lowbit::prefetch_ahead<1>(b[0] + kk * step);
        __m256 bv[NV];
#pragma GCC unroll 16
        for (int v = 0; v < NV; ++v)
          bv[v] = v == NV - 1 ? _mm256_maskload_ps(b[v] + kk * step, tm) : _mm256_loadu_ps(b[v] + kk * step);
#pragma GCC unroll 16
        for (int r = 0; r < MR; ++r) {
          const __m256 av = _mm256_broadcast_ss(a + r * t.lda + kk);
#pragma GCC unroll 16
          for (int v = 0; v < NV; ++v) acc[r][v] = _mm256_fmadd_ps(av, bv[v], acc[r][v]);
        }
      }
    }
    store_acc<MR, NV>(acc, t, tm);
  }
};

// bf16, B packed VNNI2 (rows in pairs; the pad row of an odd K is zero).
struct Bf16PackedKernel {
  template <int MR, int NV>
  static void run(const Tile& t) {
    const __m256i tm = tail_mask(t.tail);
    const __m256i hi = _mm256_set1_epi32(int32_t(0xffff0000u));
    __m256 acc[MR][NV];
    load_acc<MR, NV>(acc, t, tm);
    for (int64_t i = t.ib; i < t.ie; ++i) {
      const uint16_t* a = static_cast<const uint16_t*>(t.a) + i * t.stride_a;
      const uint16_t* b[NV];
#pragma GCC unroll 16
      for (int v = 0; v < NV; ++v) b[v] = static_cast<const uint16_t*>(t.bv[v]) + i * t.stride_b;
      const int64_t kpairs = (t.klen + 1) / 2;
      const bool stream = MR == 1;  // packed rows are 128 bytes per k pair
      for (int64_t p = 0; p < kpairs; ++p) {
        const int64_t kk = 2 * p;
        const bool pair = kk + 1 < t.klen;
        if (stream) lowbit::prefetch_ahead<1>(b[0] + p * t.b_row_step);
        __m256 b0[NV], b1[NV];
#pragma GCC unroll 16
        for (int v = 0; v < NV; ++v) {
          const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b[v] + p * t.b_row_step));
          b0[v] = _mm256_castsi256_ps(_mm256_slli_epi32(raw, 16));
          b1[v] = _mm256_castsi256_ps(_mm256_and_si256(raw, hi));
        }
#pragma GCC unroll 16
        for (int r = 0; r < MR; ++r) {
          const uint16_t* ar = a + r * t.lda + kk;
          const __m256 a0 = _mm256_set1_ps(lowbit_brgemm::bf16_to_f32(ar[0]));
#pragma GCC unroll 16
          for (int v = 0; v < NV; ++v) acc[r][v] = _mm256_fmadd_ps(a0, b0[v], acc[r][v]);
          if (pair) {
            const __m256 a1 = _mm256_set1_ps(lowbit_brgemm::bf16_to_f32(ar[1]));
#pragma GCC unroll 16
            for (int v = 0; v < NV; ++v) acc[r][v] = _mm256_fmadd_ps(a1, b1[v], acc[r][v]);
          }
        }
      }
    }
    store_acc<MR, NV>(acc, t, tm);
  }
};

// bf16, B row-major: each row of 8 bf16 is widened with vpmovzxwd + shift.
struct Bf16RowKernel {
  static inline __m256 load_row(const uint16_t* p, bool last, int tail) {
    __m128i raw;
    if (last && tail < 8) {
      uint16_t tmp[8] = {0, 0, 0, 0, 0, 0, 0, 0};
      memcpy(tmp, p, size_t(tail) * 2);
      raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(tmp));
    } else {
      raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    }
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(raw), 16));
  }

  template <int MR, int NV>
  static void run(const Tile& t) {
    const __m256i tm = tail_mask(t.tail);
    __m256 acc[MR][NV];
    load_acc<MR, NV>(acc, t, tm);
    for (int64_t i = t.ib; i < t.ie; ++i) {
      const uint16_t* a = static_cast<const uint16_t*>(t.a) + i * t.stride_a;
      const uint16_t* b[NV];
#pragma GCC unroll 16
      for (int v = 0; v < NV; ++v) b[v] = static_cast<const uint16_t*>(t.bv[v]) + i * t.stride_b;
      for (int64_t kk = 0; kk < t.klen; ++kk) {
        __m256 bv[NV];
#pragma GCC unroll 16
        for (int v = 0; v < NV; ++v) bv[v] = load_row(b[v] + kk * t.ldb, v == NV - 1, t.tail);
#pragma GCC unroll 16
        for (int r = 0; r < MR; ++r) {
          const __m256 av = _mm256_set1_ps(lowbit_brgemm::bf16_to_f32(a[r * t.lda + kk]));
#pragma GCC unroll 16
          for (int v = 0; v < NV; ++v) acc[r][v] = _mm256_fmadd_ps(av, bv[v], acc[r][v]);
        }
      }
    }
    store_acc<MR, NV>(acc, t, tm);
  }
};

// 6 rows x 16 columns = 12 accumulators (+ 2 B + 1 broadcast of the 16 ymm registers).
struct F32Traits {
  using T = float;
  static constexpr int VL = 8, MR = 6, NV = 2, KC = 256;
  static constexpr KernelTable<F32Kernel, MR, NV> table{};
};
struct Bf16PackedTraits {
  using T = uint16_t;
  static constexpr int VL = 8, MR = 4, NV = 2, KC = 512;
  static constexpr KernelTable<Bf16PackedKernel, MR, NV> table{};
};
struct Bf16RowTraits {
  using T = uint16_t;
  static constexpr int VL = 8, MR = 6, NV = 2, KC = 512;
  static constexpr KernelTable<Bf16RowKernel, MR, NV> table{};
};

}  // namespace

namespace lowbit_brgemm {

KernelFn select_avx2(const Desc& d) {
  if (d.dtype == LOWBIT_DTYPE_F32) return &drive<F32Traits>;
  if (d.dtype == LOWBIT_DTYPE_BF16) return d.packed() ? &drive<Bf16PackedTraits> : &drive<Bf16RowTraits>;
  return nullptr;
}

}  // namespace lowbit_brgemm
