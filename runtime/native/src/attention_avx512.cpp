// Fused attention, AVX-512 path (16 fp32 lanes; bf16 widened by shifts, rounded by integer
// arithmetic to nearest even, so no AVX512-BF16 instruction is needed).
#include <immintrin.h>

#include "attention_internal.h"
#include "bf16.h"

namespace lowbit::attn {
namespace {

inline __m512 load_bf16(const uint16_t* p) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p)), 16));
}
inline __m512 load_bf16_mask(const uint16_t* p, __mmask16 k) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(k, p)), 16));
}
inline __m256i round_bf16(__m512 x) {
  const __m512i u = _mm512_castps_si512(x);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff))), 16);
  const __mmask16 nan = _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q);
  r = _mm512_mask_or_epi32(r, nan, _mm512_srli_epi32(u, 16), _mm512_set1_epi32(0x40));
  return _mm512_cvtepi32_epi16(r);
}
inline __mmask16 tail(int64_t r) { return __mmask16((1u << r) - 1); }

// exp(x) for x <= 0 (scores minus their max): Cody-Waite reduction, Cephes' degree-7 polynomial,
// 2^n by scalef (underflows to 0 for very negative x). Relative error ~2e-7.
inline __m512 exp512(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-104.f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500E-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507E-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073E-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894E-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459E-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201E-1f));
  p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.f)));
  return _mm512_scalef_ps(p, n);
}

// Row loaders for dots / pv: element d.. d + 15 of a K or V row as fp32.
struct RowF32 {
  static __m512 load(const char* r, int64_t d) { return _mm512_loadu_ps(reinterpret_cast<const float*>(r) + d); }
  static __m512 load(const char* r, int64_t d, __mmask16 m) {
    return _mm512_maskz_loadu_ps(m, reinterpret_cast<const float*>(r) + d);
  }
};
struct RowBf16 {
  static __m512 load(const char* r, int64_t d) { return load_bf16(reinterpret_cast<const uint16_t*>(r) + d); }
  static __m512 load(const char* r, int64_t d, __mmask16 m) {
    return load_bf16_mask(reinterpret_cast<const uint16_t*>(r) + d, m);
  }
};

struct Avx512 {
  static constexpr bool kDirectBf16 = true;  // bf16 rows are widened in registers, not copied
  static void to_f32(const char* src, float* dst, int64_t n, bool bf16) {
    if (!bf16) {
      memcpy(dst, src, size_t(n) * sizeof(float));
      return;
    }
    const uint16_t* s = reinterpret_cast<const uint16_t*>(src);
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) _mm512_storeu_ps(dst + i, load_bf16(s + i));
    if (i < n) _mm512_mask_storeu_ps(dst + i, tail(n - i), load_bf16_mask(s + i, tail(n - i)));
  }
  static void scal(float* y, float c, int64_t n) {
    const __m512 vc = _mm512_set1_ps(c);
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) _mm512_storeu_ps(y + i, _mm512_mul_ps(vc, _mm512_loadu_ps(y + i)));
    if (i < n) {
      const __mmask16 k = tail(n - i);
      _mm512_mask_storeu_ps(y + i, k, _mm512_mul_ps(vc, _mm512_maskz_loadu_ps(k, y + i)));
    }
  }
  static float max(const float* s, int n) {
    __m512 m = _mm512_set1_ps(-INFINITY);
    int i = 0;
    for (; i + 16 <= n; i += 16) m = _mm512_max_ps(m, _mm512_loadu_ps(s + i));
    if (i < n) m = _mm512_mask_max_ps(m, tail(n - i), m, _mm512_maskz_loadu_ps(tail(n - i), s + i));
    return _mm512_reduce_max_ps(m);
  }
  static float exp_sum(float* s, int n, float mx) {
    const __m512 vm = _mm512_set1_ps(mx), ninf = _mm512_set1_ps(-INFINITY);
    __m512 sum = _mm512_setzero_ps();
    for (int i = 0; i < n; i += 16) {
      const __mmask16 k = n - i >= 16 ? __mmask16(0xffff) : tail(n - i);
      const __m512 x = _mm512_mask_loadu_ps(ninf, k, s + i);
      const __mmask16 live = _mm512_cmp_ps_mask(x, ninf, _CMP_NEQ_UQ);
      const __m512 e = _mm512_maskz_mov_ps(live, exp512(_mm512_sub_ps(x, vm)));
      _mm512_mask_storeu_ps(s + i, k, e);
      sum = _mm512_add_ps(sum, e);
    }
    return _mm512_reduce_add_ps(sum);
  }
  // NQ queries x 4 keys into acc[i][c] (reduced by dots_n). Rows streamed from memory
  // (decode: K comes from DRAM) are read one after the other, each front to back, with two
  // accumulator chains per query and key: the hardware prefetchers follow that ascending
  // stream, not four rows read in lockstep (measured 1.2-1.7x faster cold).
  template <int NQ, class R>
  __attribute__((always_inline)) static void accumulate_rows(const float* q, const char* const* k, int64_t n, __m512 acc[NQ][4]) {
#pragma GCC unroll 4
    for (int c = 0; c < 4; ++c) {
      __m512 a0[NQ], a1[NQ];
#pragma GCC unroll 4
      for (int i = 0; i < NQ; ++i) a0[i] = a1[i] = _mm512_setzero_ps();
      const char* kc = k[c];
      int64_t d = 0;
      for (; d + 32 <= n; d += 32) {
        const __m512 k0 = R::load(kc, d), k1 = R::load(kc, d + 16);
#pragma GCC unroll 4
        for (int i = 0; i < NQ; ++i) {
          a0[i] = _mm512_fmadd_ps(_mm512_loadu_ps(q + i * n + d), k0, a0[i]);
          a1[i] = _mm512_fmadd_ps(_mm512_loadu_ps(q + i * n + d + 16), k1, a1[i]);
        }
      }
      for (; d < n; d += 16) {
        const __mmask16 m = n - d >= 16 ? __mmask16(0xffff) : tail(n - d);
        const __m512 k0 = R::load(kc, d, m);
#pragma GCC unroll 4
        for (int i = 0; i < NQ; ++i) a0[i] = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, q + i * n + d), k0, a0[i]);
      }
#pragma GCC unroll 4
      for (int i = 0; i < NQ; ++i) acc[i][c] = _mm512_add_ps(a0[i], a1[i]);
    }
  }
  // The same over rows already in cache (a block widened from bf16, or rows a previous query
  // block read): the four rows in lockstep, each q and k vector load feeding 4 and NQ FMAs
  // (fewer loads: 1.3-1.5x faster hot for 4 queries).
  template <int NQ>
  __attribute__((always_inline)) static void accumulate_lockstep(const float* q, const char* const* k, int64_t n, __m512 acc[NQ][4]) {
#pragma GCC unroll 4
    for (int i = 0; i < NQ; ++i)
#pragma GCC unroll 4
      for (int c = 0; c < 4; ++c) acc[i][c] = _mm512_setzero_ps();
    for (int64_t d = 0; d < n; d += 16) {
      const __mmask16 m = n - d >= 16 ? __mmask16(0xffff) : tail(n - d);
      __m512 kv[4];
#pragma GCC unroll 4
      for (int c = 0; c < 4; ++c) kv[c] = RowF32::load(k[c], d, m);
#pragma GCC unroll 4
      for (int i = 0; i < NQ; ++i) {
        const __m512 qv = _mm512_maskz_loadu_ps(m, q + i * n + d);
#pragma GCC unroll 4
        for (int c = 0; c < 4; ++c) acc[i][c] = _mm512_fmadd_ps(qv, kv[c], acc[i][c]);
      }
    }
  }
  template <int NQ, class R, bool Lockstep>
  __attribute__((always_inline)) static void dots_n(const float* q, const char* const* k, int64_t n, float out[kQB][4]) {
    __m512 acc[NQ][4];
    if (Lockstep) accumulate_lockstep<NQ>(q, k, n, acc);
    else accumulate_rows<NQ, R>(q, k, n, acc);
    // Per query, the 4 accumulators reduce together: interleave-add pairs, then the four
    // 128-bit lanes; 12 instructions instead of four separate horizontal sums.
#pragma GCC unroll 4
    for (int i = 0; i < NQ; ++i) {
      const __m512 t0 = _mm512_add_ps(_mm512_unpacklo_ps(acc[i][0], acc[i][1]), _mm512_unpackhi_ps(acc[i][0], acc[i][1]));
      const __m512 t1 = _mm512_add_ps(_mm512_unpacklo_ps(acc[i][2], acc[i][3]), _mm512_unpackhi_ps(acc[i][2], acc[i][3]));
      const __m512 u = _mm512_add_ps(_mm512_shuffle_ps(t0, t1, 0x44), _mm512_shuffle_ps(t0, t1, 0xEE));
      const __m256 h = _mm256_add_ps(_mm512_castps512_ps256(u), _mm512_extractf32x8_ps(u, 1));
      _mm_storeu_ps(out[i], _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1)));
    }
  }
  // One function per (queries, row form) for a whole key block: the stores unroll around the
  // dots and the dispatch happens once per block. Inlined into run_heads (12 copies of the
  // dots), gcc spilled run_heads' loop state to the stack; with that and the per-row address
  // arithmetic there, fp32 causal prefill ran at 0.84-0.91x of the pre-decode-rework kernel.
  template <int NQ, class R, bool Lockstep>
  __attribute__((noinline)) static void scores_n(const float* q, int64_t n, const char* const* rows, const int* cols, int nc,
                                                 const uint64_t* allow, float scale, float* s) {
    block_scores<NQ>([&](const char* const* k, float out[kQB][4]) __attribute__((always_inline)) { dots_n<NQ, R, Lockstep>(q, k, n, out); },
                     rows, cols, nc, allow, scale, s);
  }
  template <class R, bool Lockstep>
  static void scores_r(const float* q, int nq, int64_t n, const char* const* rows, const int* cols, int nc,
                       const uint64_t* allow, float scale, float* s) {
    switch (nq) {
      case 1: scores_n<1, R, Lockstep>(q, n, rows, cols, nc, allow, scale, s); break;
      case 2: scores_n<2, R, Lockstep>(q, n, rows, cols, nc, allow, scale, s); break;
      case 3: scores_n<3, R, Lockstep>(q, n, rows, cols, nc, allow, scale, s); break;
      default: scores_n<4, R, Lockstep>(q, n, rows, cols, nc, allow, scale, s); break;
    }
  }
  static void scores(const float* q, int nq, int64_t n, const char* const* rows, const int* cols, int nc,
                     const uint64_t* allow, float scale, float* s, bool bf16, bool resident) {
    if (bf16) scores_r<RowBf16, false>(q, nq, n, rows, cols, nc, allow, scale, s);
    else if (resident) scores_r<RowF32, true>(q, nq, n, rows, cols, nc, allow, scale, s);
    else scores_r<RowF32, false>(q, nq, n, rows, cols, nc, allow, scale, s);
  }
  // acc[i] += sum_c p[i][cols[c]] * v[c] for NQ queries, 16 * W columns of D at a time kept
  // in registers (NQ x W accumulators) over all visible keys of the block. Out of line for
  // the same reason as scores_n.
  template <int NQ, int W, class R>
  __attribute__((noinline)) static void pv_n(float* acc, int64_t n, const float* p, const int* cols, int nc, const char* const* v) {
    for (int64_t d0 = 0; d0 < n; d0 += 16 * W) {
      __mmask16 m[W];
#pragma GCC unroll 8
      for (int u = 0; u < W; ++u) {
        const int64_t r = n - d0 - 16 * u;
        m[u] = r >= 16 ? __mmask16(0xffff) : r > 0 ? tail(r) : __mmask16(0);
      }
      __m512 a[NQ][W];
#pragma GCC unroll 4
      for (int i = 0; i < NQ; ++i)
#pragma GCC unroll 8
        for (int u = 0; u < W; ++u) a[i][u] = _mm512_maskz_loadu_ps(m[u], acc + i * n + d0 + 16 * u);
      for (int c = 0; c < nc; ++c) {
        __m512 vv[W];
#pragma GCC unroll 8
        for (int u = 0; u < W; ++u) vv[u] = R::load(v[c], d0 + 16 * u, m[u]);
#pragma GCC unroll 4
        for (int i = 0; i < NQ; ++i) {
          const __m512 w = _mm512_set1_ps(p[i * kKB + cols[c]]);
#pragma GCC unroll 8
          for (int u = 0; u < W; ++u) a[i][u] = _mm512_fmadd_ps(w, vv[u], a[i][u]);
        }
      }
#pragma GCC unroll 4
      for (int i = 0; i < NQ; ++i)
#pragma GCC unroll 8
        for (int u = 0; u < W; ++u) _mm512_mask_storeu_ps(acc + i * n + d0 + 16 * u, m[u], a[i][u]);
    }
  }
  template <class R>
  static void pv_r(float* acc, int nq, int64_t n, const float* p, const int* cols, int nc, const char* const* v) {
    switch (nq) {  // 8 (W) x 16 columns per pass for 1-2 queries: a 128-wide head reads each V row once
      case 1: pv_n<1, 8, R>(acc, n, p, cols, nc, v); break;
      case 2: pv_n<2, 8, R>(acc, n, p, cols, nc, v); break;
      case 3: pv_n<3, 4, R>(acc, n, p, cols, nc, v); break;
      default: pv_n<4, 4, R>(acc, n, p, cols, nc, v); break;
    }
  }
  static void pv(float* acc, int nq, int64_t n, const float* p, const int* cols, int nc, const char* const* v,
                 bool bf16, bool resident) {
    if (bf16) {
      pv_r<RowBf16>(acc, nq, n, p, cols, nc, v);
    } else if (!resident && nq > 2 && n > 64) {
      // fp32 rows streamed from memory (GQA decode groups, T = 3-4): 3-4 queries keep only 64
      // columns in registers, so each V row would be read in 64-column pieces, one pass per
      // piece over all rows, which streams poorly from DRAM (grouped f32 decode measured 0.85x
      // of one head per call, cold). Two passes of <= 2 queries read every row front to back;
      // the second finds the rows in L1/L2.
      pv_r<RowF32>(acc, 2, n, p, cols, nc, v);
      pv_r<RowF32>(acc + 2 * n, nq - 2, n, p + 2 * kKB, cols, nc, v);
    } else {
      pv_r<RowF32>(acc, nq, n, p, cols, nc, v);
    }
  }
  static uint64_t nonzero_bits(const uint8_t* m, int64_t step, int n) {
    const uint64_t all = n == 64 ? ~uint64_t(0) : (uint64_t(1) << n) - 1;
    if (step == 0) return m[0] ? all : 0;  // one mask value broadcast over the keys
    const __m512i v = _mm512_maskz_loadu_epi8(__mmask64(all), m);
    return uint64_t(_mm512_test_epi8_mask(v, v)) & all;
  }
  static void store(const float* acc, float c, char* dst, int64_t n, bool bf16) {
    const __m512 vc = _mm512_set1_ps(c);
    int64_t i = 0;
    if (!bf16) {
      float* d = reinterpret_cast<float*>(dst);
      for (; i + 16 <= n; i += 16) _mm512_storeu_ps(d + i, _mm512_mul_ps(vc, _mm512_loadu_ps(acc + i)));
      if (i < n) _mm512_mask_storeu_ps(d + i, tail(n - i), _mm512_mul_ps(vc, _mm512_maskz_loadu_ps(tail(n - i), acc + i)));
      return;
    }
    uint16_t* d = reinterpret_cast<uint16_t*>(dst);
    for (; i + 16 <= n; i += 16)
      _mm256_storeu_si256((__m256i*)(d + i), round_bf16(_mm512_mul_ps(vc, _mm512_loadu_ps(acc + i))));
    if (i < n)
      _mm256_mask_storeu_epi16(d + i, tail(n - i), round_bf16(_mm512_mul_ps(vc, _mm512_maskz_loadu_ps(tail(n - i), acc + i))));
  }
};

}  // namespace

void heads_avx512(const Args& a) { run_heads<Avx512>(a); }

}  // namespace lowbit::attn
