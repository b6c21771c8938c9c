// AVX-512 low-bit tiles (F/BW/VL/VNNI): register-blocked BRGEMM over packed 1/2/4/8-bit
// weights. One n-block (64 output rows = 4 zmm of int32 lanes) x MB activation rows per
// register tile; each 4-k sub-step decodes 4 weight vectors (shift + AND, no shuffles: the
// packer put every vector's codes at a fixed bit position of the same 64 bytes) and issues
// 4*MB vpdpbusd with the activations' 4 bytes broadcast from memory.
#include <immintrin.h>

#include <algorithm>

#include "qgemm_decode_avx512.h"
#include "qgemm_internal.h"
#include "stream_prefetch.h"

// gcc 12's AVX-512 intrinsics pass _mm512_undefined_*() as the masked-off source and then
// warn about it once inlined into loops (a known false positive).
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

namespace lowbit {
namespace q {

namespace {

// The int8 path's GEMV-shaped decode skips the shifts: vector j keeps its codes at their
// bit position, u * 2^shift, and its accumulators are shifted back (exactly) at the flush.
// One vector per 64 packed bytes is not decoded at all: the raw bytes are fed to vpdpbusd
// and that accumulator, holding the sum of all fields of those bytes, has the others
// subtracted at the flush (`derive_fields`). Zen 4 issues two zmm vector ops per cycle and
// vpdpbusd takes one of them, so a 2-bit step of 4 vpdpbusd + 4 ANDs filled every slot
// (measured: 16 vpdpbusd + 16 vpandd still run at 1 vpdpbusd/cycle, + 32 vpandd at 2/3 of
// it); 3 ANDs leave a spare slot per step for the broadcast, flush and loop work.
// |sum| stays below 2^31 for kblock <= 65536 (255 * 128 * 65536 < 2^31; dispatch enforces
// the K-block bound), and the subtraction is exact in wrapping int32 anyway.
template <int BITS>
LB_INLINE void decode_scaled(const uint8_t* p, int h, __m512i v[4]) {
  if constexpr (BITS == 1) {
    __m512i x = _mm512_loadu_si512(p);
    if (h) x = _mm512_srli_epi16(x, 4);
#pragma GCC unroll 4
    for (int j = 0; j < 4; ++j) v[j] = _mm512_and_si512(x, _mm512_set1_epi8(char(1 << j)));
  } else if constexpr (BITS == 2) {
    const __m512i x = _mm512_loadu_si512(p);
#pragma GCC unroll 3
    for (int j = 0; j < 3; ++j) v[j] = _mm512_and_si512(x, _mm512_set1_epi8(char(3 << (2 * j))));
    v[3] = x;  // all four fields: derive_fields subtracts v0..v2's sums
  } else if constexpr (BITS == 4) {
    const __m512i x0 = _mm512_loadu_si512(p), x1 = _mm512_loadu_si512(p + 64);
    const __m512i lo = _mm512_set1_epi8(0x0f);
    v[0] = _mm512_and_si512(x0, lo);
    v[1] = x0;  // low + high nibble: derive_fields subtracts v0's sum
    v[2] = _mm512_and_si512(x1, lo);
    v[3] = x1;
  } else {
    decode<BITS>(p, h, v);
  }
}

// Turns the accumulators of decode_scaled's raw vectors into their own field's sum.
template <int BITS>
LB_INLINE void derive_fields(__m512i t[4]) {
  if constexpr (BITS == 2) {
    t[3] = _mm512_sub_epi32(t[3], _mm512_add_epi32(_mm512_add_epi32(t[0], t[1]), t[2]));
  } else if constexpr (BITS == 4) {
    t[1] = _mm512_sub_epi32(t[1], t[0]);
    t[3] = _mm512_sub_epi32(t[3], t[2]);
  }
}

template <int BITS, bool SCALED>
LB_INLINE void decode_int8(const uint8_t* p, int h, __m512i v[4]) {
  if constexpr (SCALED) decode_scaled<BITS>(p, h, v);
  else decode<BITS>(p, h, v);
}

LB_INLINE __mmask16 lane_mask(int64_t valid) {
  if (valid >= 16) return 0xffff;
  if (valid <= 0) return 0;
  return __mmask16((1u << valid) - 1);
}

// exp(x) for the SiLU epilogue, ~1 ulp: x = n*ln2 + r (Cody-Waite, |r| <= ln2/2), Cephes'
// minimax polynomial for exp(r), and 2^n by vscalefps, which gives inf / 0 (gradual
// underflow) at the ends. The clamp keeps r finite for +-inf inputs; NaN stays NaN.
LB_INLINE __m512 exp_ps(__m512 x) {
  x = _mm512_max_ps(_mm512_set1_ps(-104.0f), _mm512_min_ps(_mm512_set1_ps(89.0f), x));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  return _mm512_scalef_ps(p, n);
}

// The epilogue's activation (order and definitions in lowbit/qgemm.h).
// ReLU is max(0, v) with v as the SECOND operand: vmaxps returns its second operand when
// either is NaN (and for 0 vs -0), so NaN and -0 pass through as in torch.relu.
LB_INLINE __m512 apply_act(int32_t flags, __m512 v) {
  if (flags & LOWBIT_QF_ACT_RELU) return _mm512_max_ps(_mm512_setzero_ps(), v);
  if (flags & LOWBIT_QF_ACT_RELU2) {
    const __m512 r = _mm512_max_ps(_mm512_setzero_ps(), v);
    return _mm512_mul_ps(r, r);
  }
  if (flags & LOWBIT_QF_ACT_SILU) {
    const __m512 e = exp_ps(_mm512_sub_ps(_mm512_setzero_ps(), v));
    return _mm512_div_ps(v, _mm512_add_ps(_mm512_set1_ps(1.0f), e));
  }
  return v;
}

// Final store of an fp32 register tile row: scale, bias, activation, beta (C_in + v),
// type conversion (rounded once), n tail.
LB_INLINE void store_row(const Desc& d, const Args& g, int64_t row, int64_t n0, float inv,
                         const float* tile_row) {
  const int64_t nvalid = std::min<int64_t>(NB, d.n - n0);
  const __m512 vinv = _mm512_set1_ps(inv);
#pragma GCC unroll 4
  for (int j = 0; j < 4; ++j) {
    const __mmask16 mk = lane_mask(nvalid - 16 * j);
    if (!mk) break;
    __m512 v = _mm512_mul_ps(_mm512_loadu_ps(tile_row + 16 * j), vinv);
    if (d.flags & LOWBIT_QF_BIAS)
      v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(mk, g.bias + n0 + 16 * j));
    if (d.flags & LOWBIT_QF_ACT_MASK) v = apply_act(d.flags, v);
    const int64_t ci = row * d.ldc + n0 + 16 * j;
    if (d.ctype == LOWBIT_QT_F32) {
      float* c = static_cast<float*>(g.c) + ci;
      if (d.flags & LOWBIT_QF_BETA1) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(mk, c));
      _mm512_mask_storeu_ps(c, mk, v);
    } else {
      uint16_t* c = static_cast<uint16_t*>(g.c) + ci;
      if (d.flags & LOWBIT_QF_BETA1) {
        const __m512i cin = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(mk, c));
        v = _mm512_add_ps(v, _mm512_castsi512_ps(_mm512_slli_epi32(cin, 16)));
      }
      const __m256i h = (__m256i)_mm512_cvtneps_pbh(v);
      _mm256_mask_storeu_epi16(c, mk, h);
    }
  }
}

// GEMV tiles prefetch their codes ahead (stream_prefetch.h); 8-bit codes (4 lines per step)
// keep up without it.
template <int BITS>
LB_INLINE void prefetch_step_ahead(const uint8_t* step) {
  if constexpr (BITS != 8) prefetch_ahead<kStepBytes<BITS> / 64>(step);
}

// The GEMV tile's 2-bit inner loop (one activation row, the 4 accumulators of decode_scaled's
// fields), `quads` >= 1 groups of four 64-byte steps. Written in asm because the order
// matters and gcc does not keep it: a step's 3 ANDs issued together, the raw-byte vpdpbusd
// first and the next step's load in between (Zen 4, one vpdpbusd pipe: 98-99% of the peak as
// a bare loop; gcc's own schedule ran at 83-95%). Four accumulator sets, one per step of a
// quad (set 0 in a[], sets 1-3 in zmm0-11, added into a[] at the end): with two vpdpbusd
// pipes (Zen 5, recent Intel) the former 2 sets x 4 chains were bound by vpdpbusd latency.
// Reads 64 bytes past the last step: the next step or the K-block's scales.
// Each step prefetches the line kGemvPrefetchAhead bytes on.
LB_INLINE void gemv_2bit_quads(const uint8_t* w, const int8_t* x, int64_t quads, __m512i (&a)[4]) {
  const __m512i m0 = _mm512_set1_epi8(0x03), m1 = _mm512_set1_epi8(0x0c),
                m2 = _mm512_set1_epi8(0x30);
  // zmm26/27: current and next step's bytes, zmm28: broadcast activations, zmm29-31: fields.
  __asm__(
      "vpxord %%zmm0, %%zmm0, %%zmm0\n\t"
      ".irp r,1,2,3,4,5,6,7,8,9,10,11\n\t"
      "vmovdqa64 %%zmm0, %%zmm\\r\n\t"
      ".endr\n\t"
      "vmovdqu64 (%[w]), %%zmm26\n\t"
      ".p2align 6\n\t"
      "1:\n\t"
      "prefetcht0 %c[pf0](%[w])\n\t"
      "vpbroadcastd 0(%[x]), %%zmm28\n\t"
      "vpandd %[m0], %%zmm26, %%zmm29\n\t"
      "vpandd %[m1], %%zmm26, %%zmm30\n\t"
      "vpandd %[m2], %%zmm26, %%zmm31\n\t"
      "vpdpbusd %%zmm28, %%zmm26, %[a3]\n\t"
      "vmovdqu64 64(%[w]), %%zmm27\n\t"
      "vpdpbusd %%zmm28, %%zmm29, %[a0]\n\t"
      "vpdpbusd %%zmm28, %%zmm30, %[a1]\n\t"
      "vpdpbusd %%zmm28, %%zmm31, %[a2]\n\t"
      "prefetcht0 %c[pf1](%[w])\n\t"
      "vpbroadcastd 4(%[x]), %%zmm28\n\t"
      "vpandd %[m0], %%zmm27, %%zmm29\n\t"
      "vpandd %[m1], %%zmm27, %%zmm30\n\t"
      "vpandd %[m2], %%zmm27, %%zmm31\n\t"
      "vpdpbusd %%zmm28, %%zmm27, %%zmm3\n\t"
      "vmovdqu64 128(%[w]), %%zmm26\n\t"
      "vpdpbusd %%zmm28, %%zmm29, %%zmm0\n\t"
      "vpdpbusd %%zmm28, %%zmm30, %%zmm1\n\t"
      "vpdpbusd %%zmm28, %%zmm31, %%zmm2\n\t"
      "prefetcht0 %c[pf2](%[w])\n\t"
      "vpbroadcastd 8(%[x]), %%zmm28\n\t"
      "vpandd %[m0], %%zmm26, %%zmm29\n\t"
      "vpandd %[m1], %%zmm26, %%zmm30\n\t"
      "vpandd %[m2], %%zmm26, %%zmm31\n\t"
      "vpdpbusd %%zmm28, %%zmm26, %%zmm7\n\t"
      "vmovdqu64 192(%[w]), %%zmm27\n\t"
      "vpdpbusd %%zmm28, %%zmm29, %%zmm4\n\t"
      "vpdpbusd %%zmm28, %%zmm30, %%zmm5\n\t"
      "vpdpbusd %%zmm28, %%zmm31, %%zmm6\n\t"
      "prefetcht0 %c[pf3](%[w])\n\t"
      "vpbroadcastd 12(%[x]), %%zmm28\n\t"
      "vpandd %[m0], %%zmm27, %%zmm29\n\t"
      "vpandd %[m1], %%zmm27, %%zmm30\n\t"
      "vpandd %[m2], %%zmm27, %%zmm31\n\t"
      "vpdpbusd %%zmm28, %%zmm27, %%zmm11\n\t"
      "vmovdqu64 256(%[w]), %%zmm26\n\t"
      "vpdpbusd %%zmm28, %%zmm29, %%zmm8\n\t"
      "vpdpbusd %%zmm28, %%zmm30, %%zmm9\n\t"
      "vpdpbusd %%zmm28, %%zmm31, %%zmm10\n\t"
      "add $256, %[w]\n\t"
      "add $16, %[x]\n\t"
      "dec %[n]\n\t"
      "jnz 1b\n\t"
      "vpaddd %%zmm0, %%zmm4, %%zmm0\n\t"
      "vpaddd %%zmm8, %[a0], %[a0]\n\t"
      "vpaddd %%zmm0, %[a0], %[a0]\n\t"
      "vpaddd %%zmm1, %%zmm5, %%zmm1\n\t"
      "vpaddd %%zmm9, %[a1], %[a1]\n\t"
      "vpaddd %%zmm1, %[a1], %[a1]\n\t"
      "vpaddd %%zmm2, %%zmm6, %%zmm2\n\t"
      "vpaddd %%zmm10, %[a2], %[a2]\n\t"
      "vpaddd %%zmm2, %[a2], %[a2]\n\t"
      "vpaddd %%zmm3, %%zmm7, %%zmm3\n\t"
      "vpaddd %%zmm11, %[a3], %[a3]\n\t"
      "vpaddd %%zmm3, %[a3], %[a3]\n\t"
      : [w] "+r"(w), [x] "+r"(x), [n] "+r"(quads), [a0] "+v"(a[0]), [a1] "+v"(a[1]),
        [a2] "+v"(a[2]), [a3] "+v"(a[3])
      : [m0] "v"(m0), [m1] "v"(m1), [m2] "v"(m2), [pf0] "i"(kGemvPrefetchAhead),
        [pf1] "i"(kGemvPrefetchAhead + 64), [pf2] "i"(kGemvPrefetchAhead + 128),
        [pf3] "i"(kGemvPrefetchAhead + 192)
      : "cc", "memory", "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6", "xmm7", "xmm8",
        "xmm9", "xmm10", "xmm11", "xmm26", "xmm27", "xmm28", "xmm29", "xmm30", "xmm31");
}

// int8 activations: MB rows x 64 columns of one n-block, all `count` K-blocks. With PF, the
// same K range of the NEXT n-block's codes is prefetched into L2, one line per line read.
template <int BITS, int MB, bool PF = false>
void mblock_int8(const Desc& d, const Args& g, int64_t m0, int64_t n0) {
  // Independent accumulator sets to hide vpdpbusd latency (two vpdpbusd pipes on Zen 5 and
  // recent Intel need ~10 chains in flight): 4 x 4 chains for one row of 1-/2-bit codes (the
  // 2-bit one-row loop keeps them itself, gemv_2bit_quads; 1-bit: 57% -> 83-85% of the peak
  // on Zen 5), 2 x 4 for one row of 4-/8-bit codes (4 sets measured 3-6% slower: their loop
  // is bound by decode and loads, not latency), 2 x 8 for two rows, one set from three rows.
  constexpr int U = MB == 1 ? (BITS <= 2 ? 4 : 2) : MB == 2 ? 2 : 1;
  // Scaled decode needs a mask register per field; with 6 rows the 24 accumulators leave
  // no room for them, and GEMM-shaped tiles amortize the decode anyway. For 3-5 rows gcc 12
  // spilled the accumulators of the scaled decode inside the loop (Zen 5: 76% of the
  // vpdpbusd peak at M = 3-4 vs ~100% with the shift decode, which has 2 spare vector pipes).
  constexpr bool kScaled = MB <= 2;
  const Format& f = d.f;
  const int64_t kb = d.kblock, cb = codes_bytes(f, kb), steps = kb / f.kg;
  const int64_t lda = d.lda;
  const bool per_block = d.flags & LOWBIT_QF_ASCALE_PER_BLOCK;
  const uint8_t* nblock = g.b + (n0 / NB) * d.ldb;
  alignas(64) float tile[MB][NB];
#pragma GCC unroll 8
  for (int r = 0; r < MB; ++r)
#pragma GCC unroll 4
    for (int j = 0; j < 4; ++j) _mm512_store_ps(&tile[r][16 * j], _mm512_setzero_ps());

  for (int64_t i = 0; i < g.count; ++i) {
    const uint8_t* w = nblock + i * d.stride_b;
    const int8_t* x = static_cast<const int8_t*>(g.a) + m0 * lda + i * d.stride_a;
    // Every loop touching acc is fully unrolled so the accumulators live in registers.
    __m512i acc[U][MB][4];
#pragma GCC unroll 2
    for (int u = 0; u < U; ++u)
#pragma GCC unroll 8
      for (int r = 0; r < MB; ++r)
#pragma GCC unroll 4
        for (int j = 0; j < 4; ++j) acc[u][r][j] = _mm512_setzero_si512();

    // One 4-k sub-step: broadcast 4 activation bytes per row, 4 vpdpbusd per row.
#define LB_SUBSTEP(V, K, SET)                                                          \
  _Pragma("GCC unroll 8") for (int r = 0; r < MB; ++r) {                               \
    int32_t xs;                                                                        \
    memcpy(&xs, x + r * lda + (K), 4);                                                 \
    const __m512i xb = _mm512_set1_epi32(xs);                                          \
    _Pragma("GCC unroll 4") for (int j = 0; j < 4; ++j) acc[SET][r][j] =               \
        _mm512_dpbusd_epi32(acc[SET][r][j], V[j], xb);                                 \
  }
    int64_t s = 0;
    if constexpr (BITS == 1) {
      // Two 4-k halves per step go to sets 0 and 1; with 4 sets, odd steps use sets 2 and 3.
      if constexpr (U == 4) {
        for (; s + 2 <= steps; s += 2) {
#pragma GCC unroll 2
          for (int e = 0; e < 2; ++e) {
            __m512i v0[4], v1[4];
            const uint8_t* p = w + (s + e) * kStepBytes<BITS>;
            prefetch_step_ahead<BITS>(p);
            decode_int8<BITS, kScaled>(p, 0, v0);
            decode_int8<BITS, kScaled>(p, 1, v1);
            LB_SUBSTEP(v0, (s + e) * 8, 2 * e)
            LB_SUBSTEP(v1, (s + e) * 8 + 4, 2 * e + 1)
          }
        }
      }
      for (; s < steps; ++s) {
        __m512i v0[4], v1[4];
        const uint8_t* p = w + s * kStepBytes<BITS>;
        if constexpr (MB == 1) prefetch_step_ahead<BITS>(p);
        decode_int8<BITS, kScaled>(p, 0, v0);
        decode_int8<BITS, kScaled>(p, 1, v1);
        LB_SUBSTEP(v0, s * 8, 0)
        LB_SUBSTEP(v1, s * 8 + 4, U - 1)
      }
    } else if constexpr (BITS == 2 && MB == 1) {
      if (steps >= 4) gemv_2bit_quads(w, x, steps / 4, acc[0][0]);
      s = steps / 4 * 4;
    } else if constexpr (U > 1) {
      for (; s + U <= steps; s += U) {
#pragma GCC unroll 4
        for (int u = 0; u < U; ++u) {
          __m512i v[4];
          if constexpr (MB == 1) prefetch_step_ahead<BITS>(w + (s + u) * kStepBytes<BITS>);
          decode_int8<BITS, kScaled>(w + (s + u) * kStepBytes<BITS>, 0, v);
          LB_SUBSTEP(v, (s + u) * 4, u)
        }
      }
    }
    if constexpr (BITS != 1) {
      for (; s < steps; ++s) {
        __m512i v0[4];
        if constexpr (PF) {
#pragma GCC unroll 4
          for (int l = 0; l < kStepBytes<BITS> / 64; ++l)
            _mm_prefetch(reinterpret_cast<const char*>(w + d.ldb + s * kStepBytes<BITS> + 64 * l),
                         _MM_HINT_T1);
        }
        if constexpr (MB == 1) prefetch_step_ahead<BITS>(w + s * kStepBytes<BITS>);
        decode_int8<BITS, kScaled>(w + s * kStepBytes<BITS>, 0, v0);
        LB_SUBSTEP(v0, s * 4, 0)
      }
    }
#undef LB_SUBSTEP

    // Flush: t = a*acc - (offset + z)*rowsum exactly in int32, then scale into the fp32 tile.
    const float* scale = reinterpret_cast<const float*>(w + cb);
    const int32_t* off = kblock_offsets(f, w, cb);
    const __m512i coff = _mm512_set1_epi32(f.offset);
#pragma GCC unroll 8
    for (int r = 0; r < MB; ++r) {
      __m512i t[4];
#pragma GCC unroll 4
      for (int j = 0; j < 4; ++j) {
        t[j] = acc[0][r][j];
#pragma GCC unroll 4
        for (int u = 1; u < U; ++u) t[j] = _mm512_add_epi32(t[j], acc[u][r][j]);
      }
      if constexpr (kScaled) derive_fields<BITS>(t);
      const int64_t ai = (m0 + r) * d.ld_aux + i;
      const __m512i rsum = _mm512_set1_epi32(g.a_sum[ai]);
      const __m512 ascale = _mm512_set1_ps(per_block ? 1.0f / g.a_scale[ai] : 1.0f);
#pragma GCC unroll 4
      for (int j = 0; j < 4; ++j) {
        if (kScaled && field_shift<BITS>(j)) t[j] = _mm512_srai_epi32(t[j], field_shift<BITS>(j));
        if (f.a == 2) t[j] = _mm512_slli_epi32(t[j], 1);
        t[j] = _mm512_sub_epi32(t[j], _mm512_mullo_epi32(off ? _mm512_loadu_si512(off + 16 * j) : coff, rsum));
        __m512 sr = _mm512_loadu_ps(scale + 16 * j);
        if (per_block) sr = _mm512_mul_ps(sr, ascale);
        _mm512_store_ps(&tile[r][16 * j],
                        _mm512_fmadd_ps(_mm512_cvtepi32_ps(t[j]), sr, _mm512_load_ps(&tile[r][16 * j])));
      }
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < MB; ++r)
    store_row(d, g, m0 + r, n0, per_block ? 1.0f : 1.0f / g.a_scale[m0 + r], tile[r]);
}

template <bool BF16>
LB_INLINE float act_at(const void* a, int64_t i) {
  if constexpr (BF16) return bf16_to_f32(static_cast<const uint16_t*>(a)[i]);
  else return static_cast<const float*>(a)[i];
}

// fp32 / bf16 activations (weight-only): decode codes to fp32 weights w = a*u - (offset + z)
// per k and accumulate with FMA; the K-block's scale is applied at the flush.
template <int BITS, int MB, bool BF16>
void mblock_fp(const Desc& d, const Args& g, int64_t m0, int64_t n0) {
  const Format& f = d.f;
  const int64_t kb = d.kblock, cb = codes_bytes(f, kb), steps = kb / f.kg;
  const int64_t lda = d.lda;
  const uint8_t* nblock = g.b + (n0 / NB) * d.ldb;
  const __m512 va = _mm512_set1_ps(float(f.a));
  const __m512i m255 = _mm512_set1_epi32(255);
  alignas(64) float tile[MB][NB];
#pragma GCC unroll 8
  for (int r = 0; r < MB; ++r)
#pragma GCC unroll 4
    for (int j = 0; j < 4; ++j) _mm512_store_ps(&tile[r][16 * j], _mm512_setzero_ps());

  for (int64_t i = 0; i < g.count; ++i) {
    const uint8_t* w = nblock + i * d.stride_b;
    const int64_t x0 = m0 * lda + i * d.stride_a;
    const float* scale = reinterpret_cast<const float*>(w + cb);
    const int32_t* off = kblock_offsets(f, w, cb);
    __m512 corr[4], acc[MB][4];
#pragma GCC unroll 4
    for (int j = 0; j < 4; ++j)
      corr[j] = off ? _mm512_cvtepi32_ps(_mm512_loadu_si512(off + 16 * j)) : _mm512_set1_ps(float(f.offset));
#pragma GCC unroll 8
    for (int r = 0; r < MB; ++r)
#pragma GCC unroll 4
      for (int j = 0; j < 4; ++j) acc[r][j] = _mm512_setzero_ps();

    if constexpr (BITS == 1) {
      for (int64_t s = 0; s < steps; ++s)
#pragma GCC unroll 2
        for (int h = 0; h < kSubSteps<BITS>; ++h) {
          __m512i v[4];
          decode<BITS>(w + s * kStepBytes<BITS>, h, v);
          const int64_t k = s * f.kg + 4 * h;
#pragma GCC unroll 4
          for (int t = 0; t < 4; ++t)
#pragma GCC unroll 4
            for (int j = 0; j < 4; ++j) {
              const __m512i uj = _mm512_and_si512(_mm512_srli_epi32(v[j], 8 * t), m255);
              const __m512 wj = _mm512_fmsub_ps(_mm512_cvtepi32_ps(uj), va, corr[j]);
#pragma GCC unroll 8
              for (int r = 0; r < MB; ++r)
                acc[r][j] = _mm512_fmadd_ps(_mm512_set1_ps(act_at<BF16>(g.a, x0 + r * lda + k + t)),
                                            wj, acc[r][j]);
            }
        }
    } else {
      // Codes with a = 1 (2/4/8-bit) become fp32 without a conversion: the field, masked out of
      // the packed dword and OR'ed into the bits of 2^23 (one vpternlogd), is the float
      // 2^23 + u, and subtracting 2^23 + c (exact: both below 2^24) gives u - c exactly.
      // Per weight vector and k: a shift (none for the lowest field), vpternlogd, vsubps and
      // the row FMAs, instead of decode + shift, AND, vcvtdq2ps and vfmsub.
      constexpr int kFieldMask = (1 << BITS) - 1;
      const __m512i fmask = _mm512_set1_epi32(kFieldMask);
      const __m512i magic = _mm512_set1_epi32(0x4B000000);  // bits of 8388608.0f
      __m512 corr2[4];
#pragma GCC unroll 4
      for (int j = 0; j < 4; ++j) corr2[j] = _mm512_add_ps(corr[j], _mm512_set1_ps(8388608.0f));
      for (int64_t s = 0; s < steps; ++s) {
        const uint8_t* p = w + s * kStepBytes<BITS>;
        __m512i raw[4];
#pragma GCC unroll 4
        for (int q = 0; q < kStepBytes<BITS> / 64; ++q) raw[q] = _mm512_loadu_si512(p + 64 * q);
        const int64_t k = s * 4;
#pragma GCC unroll 4
        for (int t = 0; t < 4; ++t)
#pragma GCC unroll 4
          for (int j = 0; j < 4; ++j) {
            // vector j's field: 2-bit bits 2j of each byte; 4-bit low/high nibble of the
            // 64-byte half j/2; 8-bit the whole byte of the 64 bytes j. Byte t of the dword.
            const __m512i src = raw[BITS == 2 ? 0 : BITS == 4 ? j / 2 : j];
            const int sh = 8 * t + (BITS == 2 ? 2 * j : BITS == 4 ? 4 * (j % 2) : 0);
            const __m512i shifted = sh ? _mm512_srli_epi32(src, unsigned(sh)) : src;
            const __m512i bits = _mm512_ternarylogic_epi32(shifted, fmask, magic, 0xEA);  // A&B|C
            const __m512 wj = _mm512_sub_ps(_mm512_castsi512_ps(bits), corr2[j]);
#pragma GCC unroll 8
            for (int r = 0; r < MB; ++r)
              acc[r][j] = _mm512_fmadd_ps(_mm512_set1_ps(act_at<BF16>(g.a, x0 + r * lda + k + t)),
                                          wj, acc[r][j]);
          }
      }
    }
#pragma GCC unroll 4
    for (int j = 0; j < 4; ++j) {
      const __m512 sc = _mm512_loadu_ps(scale + 16 * j);
#pragma GCC unroll 8
      for (int r = 0; r < MB; ++r)
        _mm512_store_ps(&tile[r][16 * j],
                        _mm512_fmadd_ps(acc[r][j], sc, _mm512_load_ps(&tile[r][16 * j])));
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < MB; ++r) store_row(d, g, m0 + r, n0, 1.0f, tile[r]);
}

template <int BITS>
void tile_bits(const Desc& d, const Args& g) {
  for (int64_t n0 = 0; n0 < d.n; n0 += NB) {
    int64_t m0 = 0;
    if (d.atype == LOWBIT_QT_INT8) {
      // GEMM-shaped tiles read each n-block's codes once per 6 rows: the first 6 rows
      // prefetch the next n-block into L2, so only they wait for L3 / DRAM.
      const bool prefetch = d.m >= 24 && n0 + NB < d.n;
      for (; m0 + 6 <= d.m; m0 += 6) {
        if (prefetch && m0 == 0) mblock_int8<BITS, 6, true>(d, g, m0, n0);
        else mblock_int8<BITS, 6>(d, g, m0, n0);
      }
      switch (d.m - m0) {
        case 5: mblock_int8<BITS, 5>(d, g, m0, n0); break;
        case 4: mblock_int8<BITS, 4>(d, g, m0, n0); break;
        case 3: mblock_int8<BITS, 3>(d, g, m0, n0); break;
        case 2: mblock_int8<BITS, 2>(d, g, m0, n0); break;
        case 1: mblock_int8<BITS, 1>(d, g, m0, n0); break;
        default: break;
      }
    } else if (d.atype == LOWBIT_QT_F32) {
      for (; m0 + 4 <= d.m; m0 += 4) mblock_fp<BITS, 4, false>(d, g, m0, n0);
      switch (d.m - m0) {
        case 3: mblock_fp<BITS, 3, false>(d, g, m0, n0); break;
        case 2: mblock_fp<BITS, 2, false>(d, g, m0, n0); break;
        case 1: mblock_fp<BITS, 1, false>(d, g, m0, n0); break;
        default: break;
      }
    } else {
      for (; m0 + 4 <= d.m; m0 += 4) mblock_fp<BITS, 4, true>(d, g, m0, n0);
      switch (d.m - m0) {
        case 3: mblock_fp<BITS, 3, true>(d, g, m0, n0); break;
        case 2: mblock_fp<BITS, 2, true>(d, g, m0, n0); break;
        case 1: mblock_fp<BITS, 1, true>(d, g, m0, n0); break;
        default: break;
      }
    }
  }
}

// Row `r` of K-block i's exact integer sums acc[r][64] (sum_k x * u, u the stored codes) as
// the fp32 corrected sums and their scales, with the arithmetic of mblock_int8's flush (the
// caller adds x * s to the row so far, or to +0 for K-block 0), so AMX and AVX-512 agree bit
// for bit.
LB_INLINE void flush_row(const KBlockFlush& fl, const Args& g, const int32_t* acc_row, int64_t ai,
                         __m512 x[4], __m512 s[4]) {
  const __m512i rsum = _mm512_set1_epi32(g.a_sum[ai]);
  const __m512 ascale = _mm512_set1_ps(fl.per_block ? 1.0f / g.a_scale[ai] : 1.0f);
  // a symmetric format's offset is one constant: its product with the row sum is one scalar
  // multiply (wrapping like vpmulld's low half) instead of four
  const __m512i csum = _mm512_set1_epi32(int32_t(uint32_t(fl.offset) * uint32_t(g.a_sum[ai])));
#pragma GCC unroll 4
  for (int j = 0; j < 4; ++j) {
    __m512i t = _mm512_load_si512(acc_row + 16 * j);
    if (fl.shifted) t = _mm512_sra_epi32(t, _mm_cvtsi32_si128(fl.shift[j]));  // exact
    if (fl.a == 2) t = _mm512_slli_epi32(t, 1);
    t = _mm512_sub_epi32(t, fl.off ? _mm512_mullo_epi32(_mm512_loadu_si512(fl.off + 16 * j), rsum) : csum);
    s[j] = _mm512_loadu_ps(fl.scale + 16 * j);
    if (fl.per_block) s[j] = _mm512_mul_ps(s[j], ascale);
    x[j] = _mm512_cvtepi32_ps(t);
  }
}

}  // namespace

// K-block i's sums acc[r][64] into the fp32 tile (flush_row).
void flush_block_avx512(const Desc& d, const Args& g, const KBlockFlush& fl, const int32_t* acc,
                        int64_t m0, int64_t rows, int64_t i, float* tile) {
  // K-block 0 writes the tile instead of adding to a zeroed one (the memset of every n-block's
  // tile was ~5% of an AMX tile). x * s + 0 rounds as the FMA onto +0 did, -0 included.
  const bool first = i == 0;
  for (int64_t r = 0; r < rows; ++r) {
    __m512 x[4], s[4];
    flush_row(fl, g, acc + r * NB, (m0 + r) * d.ld_aux + i, x, s);
#pragma GCC unroll 4
    for (int j = 0; j < 4; ++j) {
      float* tr = tile + r * NB + 16 * j;
      _mm512_store_ps(tr, first ? _mm512_add_ps(_mm512_mul_ps(x[j], s[j]), _mm512_setzero_ps())
                                : _mm512_fmadd_ps(x[j], s[j], _mm512_load_ps(tr)));
    }
  }
}

// Row `row` of a single K-block's sums straight to the output (flush_block_avx512, then
// store_rows_avx512, without the fp32 tile between them).
void flush_store_row_avx512(const Desc& d, const Args& g, const KBlockFlush& fl,
                            const int32_t* acc_row, int64_t row, int64_t n0) {
  __m512 x[4], s[4];
  alignas(64) float out[NB];
  flush_row(fl, g, acc_row, row * d.ld_aux, x, s);
#pragma GCC unroll 4
  for (int j = 0; j < 4; ++j)
    _mm512_store_ps(out + 16 * j, _mm512_add_ps(_mm512_mul_ps(x[j], s[j]), _mm512_setzero_ps()));
  store_row(d, g, row, n0, fl.per_block ? 1.0f : 1.0f / g.a_scale[row], out);
}

void store_rows_avx512(const Desc& d, const Args& g, int64_t m0, int64_t rows, int64_t n0,
                       const float* tile) {
  const bool per_block = d.flags & LOWBIT_QF_ASCALE_PER_BLOCK;
  for (int64_t r = 0; r < rows; ++r)
    store_row(d, g, m0 + r, n0, per_block ? 1.0f : 1.0f / g.a_scale[m0 + r], tile + r * NB);
}

void tile_avx512(const Desc& d, const Args& g) {
  if (d.panel && tile_panel_avx512(d, g)) return;
  switch (d.f.bits) {
    case 1: tile_bits<1>(d, g); break;
    case 2: tile_bits<2>(d, g); break;
    case 4: tile_bits<4>(d, g); break;
    default: tile_bits<8>(d, g); break;
  }
}

// Activation quantization, 16 values at a time; the fp32 product x*s is rounded half to even
// by vcvtps2dq (MXCSR default) and narrowed with signed saturation (the clamp).
// NaN / Inf as quant_act_scalar: a row / K-block holding NaN or +-Inf gets scale NaN, codes 0
// and row sum 0 (vmaxps alone would drop NaNs depending on their position).
void quant_act_avx512(const QuantArgs& qa) {
  const bool per_block = qa.flags & LOWBIT_QF_ASCALE_PER_BLOCK;
  const bool bf16 = qa.xtype == LOWBIT_QT_BF16;
  const float kNaN = __builtin_nanf("");
  auto load16 = [&](int64_t row, int64_t k, __mmask16 mk) -> __m512 {
    if (bf16) {
      const uint16_t* p = static_cast<const uint16_t*>(qa.x) + row * qa.ldx + k;
      return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(mk, p)), 16));
    }
    return _mm512_maskz_loadu_ps(mk, static_cast<const float*>(qa.x) + row * qa.ldx + k);
  };
  // amax over [k0, k1), or NaN if a value there is NaN or +-Inf (|x| > FLT_MAX or unordered).
  auto amax_of = [&](int64_t row, int64_t k0, int64_t k1) {
    const __m512 fmax = _mm512_set1_ps(3.40282347e38f);
    __m512 mx = _mm512_setzero_ps();
    __mmask16 bad = 0;
    for (int64_t k = k0; k < k1; k += 16) {
      const __m512 a = _mm512_abs_ps(load16(row, k, lane_mask(k1 - k)));
      bad |= _mm512_cmp_ps_mask(a, fmax, _CMP_NLE_UQ);
      mx = _mm512_max_ps(mx, a);
    }
    return bad ? kNaN : _mm512_reduce_max_ps(mx);
  };
  const bool unit = qa.flags & LOWBIT_QF_AUNIT;  // x already int8 values: scale 1
  auto scale_of = [&](float amax) {
    return amax != amax ? kNaN : unit ? 1.0f : 127.0f / std::max(amax, 1e-5f);
  };
  for (int64_t r = 0; r < qa.m; ++r) {
    float s_row = 0.0f;
    if (!per_block) {
      s_row = scale_of(amax_of(r, 0, qa.k));
      qa.scale[r] = s_row;
    }
    int8_t* xq = qa.xq + r * qa.ldq;
    for (int64_t b = 0; b < qa.nkb; ++b) {
      const int64_t k0 = b * qa.kblock, k1 = std::min(qa.k, k0 + qa.kblock);
      float s = s_row;
      if (per_block) {
        s = scale_of(amax_of(r, k0, k1));
        qa.scale[r * qa.ld_aux + b] = s;
      }
      if (s != s) {
        memset(xq + k0, 0, size_t(qa.kblock));
        qa.rowsum[r * qa.ld_aux + b] = 0;
        continue;
      }
      const __m512 vs = _mm512_set1_ps(s);
      const __m512i lo = _mm512_set1_epi32(-128), hi = _mm512_set1_epi32(127);
      __m512i sum = _mm512_setzero_si512();
      for (int64_t k = k0; k < k1; k += 16) {
        const __mmask16 mk = lane_mask(k1 - k);
        __m512i qi = _mm512_cvtps_epi32(_mm512_mul_ps(load16(r, k, mk), vs));
        qi = _mm512_max_epi32(_mm512_min_epi32(qi, hi), lo);
        sum = _mm512_mask_add_epi32(sum, mk, sum, qi);
        _mm512_mask_cvtepi32_storeu_epi8(xq + k, mk, qi);
      }
      for (int64_t k = k1; k < k0 + qa.kblock; ++k) xq[k] = 0;
      qa.rowsum[r * qa.ld_aux + b] = _mm512_reduce_add_epi32(sum);
    }
  }
}

}  // namespace q
}  // namespace lowbit
