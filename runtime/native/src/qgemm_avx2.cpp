// AVX2 low-bit tiles for CPUs without AVX-512. Same packed layout as the AVX-512 path: a
// 32-byte half of each packed 64-byte row decodes to ymm operands for 8 of every 16 output
// rows, so an n-block is processed as two halves of 32 columns. u8 x s8 products use
// vpmaddubsw + vpmaddwd; codes are at most 15 there, so the int16 pair sums cannot
// saturate, and 8-bit codes are split into nibbles for the same reason.
// (AVX-VNNI's VEX vpdpbusd would replace the pair; it is not used: no CPU here to test it.)
#include <immintrin.h>

#include <algorithm>

#include "qgemm_internal.h"
#include "stream_prefetch.h"

#define LB_INLINE inline __attribute__((always_inline))

namespace lowbit {
namespace q {

namespace {


// Operand vector j of 4-k sub-step h, for output-row half `half` of the n-block.
template <int BITS>
LB_INLINE __m256i decode(const uint8_t* p, int h, int half, int j) {
  const uint8_t* q = p + 32 * half;
  if constexpr (BITS == 1)
    return _mm256_and_si256(_mm256_srli_epi16(_mm256_loadu_si256((const __m256i*)q), 4 * h + j),
                            _mm256_set1_epi8(1));
  else if constexpr (BITS == 2)
    return _mm256_and_si256(_mm256_srli_epi16(_mm256_loadu_si256((const __m256i*)q), 2 * j),
                            _mm256_set1_epi8(3));
  else if constexpr (BITS == 4)
    return _mm256_and_si256(
        _mm256_srli_epi16(_mm256_loadu_si256((const __m256i*)(q + 64 * (j / 2))), 4 * (j % 2)),
        _mm256_set1_epi8(15));
  else
    return _mm256_loadu_si256((const __m256i*)(q + 64 * j));
}

LB_INLINE __m256i dot4(__m256i acc, __m256i u, __m256i x) {
  return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(u, x), _mm256_set1_epi16(1)));
}

template <int BITS>
LB_INLINE __m256i dot(__m256i acc, __m256i u, __m256i x) {
  if constexpr (BITS == 8) {
    const __m256i m15 = _mm256_set1_epi8(15);
    const __m256i lo = _mm256_and_si256(u, m15);
    const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(u, 4), m15);
    acc = dot4(acc, lo, x);
    return _mm256_add_epi32(
        acc, _mm256_madd_epi16(_mm256_maddubs_epi16(hi, x), _mm256_set1_epi16(16)));
  } else {
    return dot4(acc, u, x);
  }
}

// exp(x) for the SiLU epilogue, ~1 ulp: x = n*ln2 + r (Cody-Waite, |r| <= ln2/2), Cephes'
// minimax polynomial for exp(r), times 2^n built as two normal powers of two
// 2^(n/2) * 2^(n - n/2), so that overflow gives inf and underflow rounds gradually to 0.
LB_INLINE __m256 exp_ps(__m256 x) {
  x = _mm256_max_ps(_mm256_set1_ps(-104.0f), _mm256_min_ps(_mm256_set1_ps(89.0f), x));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  const __m256i ni = _mm256_cvtps_epi32(n);  // NaN -> INT_MIN: p is NaN anyway
  const __m256i n1 = _mm256_srai_epi32(ni, 1), n2 = _mm256_sub_epi32(ni, n1);
  const __m256i bias = _mm256_set1_epi32(127);
  const __m256 s1 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(n1, bias), 23));
  const __m256 s2 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(n2, bias), 23));
  return _mm256_mul_ps(_mm256_mul_ps(p, s1), s2);
}

// The epilogue's activation (order and definitions in lowbit/qgemm.h).
// ReLU is max(0, v) with v as the SECOND operand: vmaxps returns its second operand when
// either is NaN (and for 0 vs -0), so NaN and -0 pass through as in torch.relu.
LB_INLINE __m256 apply_act(int32_t flags, __m256 v) {
  if (flags & LOWBIT_QF_ACT_RELU) return _mm256_max_ps(_mm256_setzero_ps(), v);
  if (flags & LOWBIT_QF_ACT_RELU2) {
    const __m256 r = _mm256_max_ps(_mm256_setzero_ps(), v);
    return _mm256_mul_ps(r, r);
  }
  if (flags & LOWBIT_QF_ACT_SILU) {
    const __m256 e = exp_ps(_mm256_sub_ps(_mm256_setzero_ps(), v));
    return _mm256_div_ps(v, _mm256_add_ps(_mm256_set1_ps(1.0f), e));
  }
  return v;
}

// Final store of one row: scale, bias, activation, beta (C_in + v), type conversion
// (rounded once), 8 columns at a time; a partial chunk goes through a stack buffer so
// that every column takes the same vector arithmetic.
void store_row(const Desc& d, const Args& g, int64_t row, int64_t n0, float inv,
               const float* tile_row) {
  const int64_t nvalid = std::min<int64_t>(NB, d.n - n0);
  const bool beta = d.flags & LOWBIT_QF_BETA1, f32 = d.ctype == LOWBIT_QT_F32;
  const __m256 vinv = _mm256_set1_ps(inv);
  for (int64_t c0 = 0; c0 < nvalid; c0 += 8) {
    const int w = int(std::min<int64_t>(8, nvalid - c0));
    const int64_t ci = row * d.ldc + n0 + c0;
    alignas(32) float bias[8] = {}, cin[8] = {}, out[8];
    __m256 v = _mm256_mul_ps(_mm256_loadu_ps(tile_row + c0), vinv);
    if (d.flags & LOWBIT_QF_BIAS) {
      memcpy(bias, g.bias + n0 + c0, size_t(w) * 4);
      v = _mm256_add_ps(v, _mm256_load_ps(bias));
    }
    if (d.flags & LOWBIT_QF_ACT_MASK) v = apply_act(d.flags, v);
    if (beta) {
      if (f32) memcpy(cin, static_cast<const float*>(g.c) + ci, size_t(w) * 4);
      else
        for (int t = 0; t < w; ++t) cin[t] = bf16_to_f32(static_cast<const uint16_t*>(g.c)[ci + t]);
      v = _mm256_add_ps(v, _mm256_load_ps(cin));
    }
    _mm256_store_ps(out, v);
    if (f32) memcpy(static_cast<float*>(g.c) + ci, out, size_t(w) * 4);
    else
      for (int t = 0; t < w; ++t) static_cast<uint16_t*>(g.c)[ci + t] = f32_to_bf16(out[t]);
  }
}

template <int BITS, int MB>
void mblock_int8(const Desc& d, const Args& g, int64_t m0, int64_t n0) {
  const Format& f = d.f;
  const int64_t kb = d.kblock, cb = codes_bytes(f, kb), steps = kb / f.kg;
  const int64_t lda = d.lda;
  const bool per_block = d.flags & LOWBIT_QF_ASCALE_PER_BLOCK;
  const uint8_t* nblock = g.b + (n0 / NB) * d.ldb;
  alignas(32) float tile[MB][NB] = {};

  for (int64_t i = 0; i < g.count; ++i) {
    const uint8_t* w = nblock + i * d.stride_b;
    const int8_t* x = static_cast<const int8_t*>(g.a) + m0 * lda + i * d.stride_a;
    const float* scale = reinterpret_cast<const float*>(w + cb);
    const int32_t* off = kblock_offsets(f, w, cb);
#pragma GCC unroll 2
    for (int half = 0; half < 2; ++half) {
      __m256i acc[MB][4];
#pragma GCC unroll 8
      for (int r = 0; r < MB; ++r)
#pragma GCC unroll 4
        for (int j = 0; j < 4; ++j) acc[r][j] = _mm256_setzero_si256();
      for (int64_t s = 0; s < steps; ++s)
#pragma GCC unroll 2
        for (int h = 0; h < kSubSteps<BITS>; ++h) {
          const uint8_t* p = w + s * kStepBytes<BITS>;
          // GEMV tiles: the first pass over the codes streams them (stream_prefetch.h).
          if (MB == 1 && BITS < 8 && half == 0 && h == 0) prefetch_ahead<kStepBytes<BITS> / 64>(p);
          const int64_t k = s * f.kg + 4 * h;
#pragma GCC unroll 4
          for (int j = 0; j < 4; ++j) {
            const __m256i v = decode<BITS>(p, h, half, j);
#pragma GCC unroll 8
            for (int r = 0; r < MB; ++r) {
              int32_t xs;
              memcpy(&xs, x + r * lda + k, 4);
              acc[r][j] = dot<BITS>(acc[r][j], v, _mm256_set1_epi32(xs));
            }
          }
        }
#pragma GCC unroll 4
      for (int j = 0; j < 4; ++j) {
        const int64_t c0 = 16 * j + 8 * half;
        const __m256 sc = _mm256_loadu_ps(scale + c0);
        const __m256i of = off ? _mm256_loadu_si256((const __m256i*)(off + c0)) : _mm256_set1_epi32(f.offset);
#pragma GCC unroll 8
        for (int r = 0; r < MB; ++r) {
          __m256i t = acc[r][j];
          if (f.a == 2) t = _mm256_slli_epi32(t, 1);
          const int64_t ai = (m0 + r) * d.ld_aux + i;
          t = _mm256_sub_epi32(t, _mm256_mullo_epi32(of, _mm256_set1_epi32(g.a_sum[ai])));
          __m256 sr = sc;
          if (per_block) sr = _mm256_mul_ps(sc, _mm256_set1_ps(1.0f / g.a_scale[ai]));
          _mm256_store_ps(&tile[r][c0], _mm256_fmadd_ps(_mm256_cvtepi32_ps(t), sr,
                                                        _mm256_load_ps(&tile[r][c0])));
        }
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

template <int BITS, int MB, bool BF16>
void mblock_fp(const Desc& d, const Args& g, int64_t m0, int64_t n0) {
  const Format& f = d.f;
  const int64_t kb = d.kblock, cb = codes_bytes(f, kb), steps = kb / f.kg;
  const int64_t lda = d.lda;
  const uint8_t* nblock = g.b + (n0 / NB) * d.ldb;
  const __m256 va = _mm256_set1_ps(float(f.a));
  const __m256i m255 = _mm256_set1_epi32(255);
  alignas(32) float tile[MB][NB] = {};

  for (int64_t i = 0; i < g.count; ++i) {
    const uint8_t* w = nblock + i * d.stride_b;
    const int64_t x0 = m0 * lda + i * d.stride_a;
    const float* scale = reinterpret_cast<const float*>(w + cb);
    const int32_t* off = kblock_offsets(f, w, cb);
#pragma GCC unroll 2
    for (int half = 0; half < 2; ++half) {
      __m256 acc[MB][4];
#pragma GCC unroll 8
      for (int r = 0; r < MB; ++r)
#pragma GCC unroll 4
        for (int j = 0; j < 4; ++j) acc[r][j] = _mm256_setzero_ps();
#pragma GCC unroll 4
      for (int j = 0; j < 4; ++j) {
        const __m256 corr =
            off ? _mm256_cvtepi32_ps(_mm256_loadu_si256((const __m256i*)(off + 16 * j + 8 * half)))
                : _mm256_set1_ps(float(f.offset));
        for (int64_t s = 0; s < steps; ++s)
#pragma GCC unroll 2
          for (int h = 0; h < kSubSteps<BITS>; ++h) {
            const __m256i v = decode<BITS>(w + s * kStepBytes<BITS>, h, half, j);
            const int64_t k = s * f.kg + 4 * h;
#pragma GCC unroll 4
            for (int t = 0; t < 4; ++t) {
              const __m256i u = _mm256_and_si256(_mm256_srli_epi32(v, 8 * t), m255);
              const __m256 wt = _mm256_fmsub_ps(_mm256_cvtepi32_ps(u), va, corr);
#pragma GCC unroll 8
              for (int r = 0; r < MB; ++r)
                acc[r][j] = _mm256_fmadd_ps(_mm256_set1_ps(act_at<BF16>(g.a, x0 + r * lda + k + t)),
                                            wt, acc[r][j]);
            }
          }
      }
#pragma GCC unroll 4
      for (int j = 0; j < 4; ++j) {
        const int64_t c0 = 16 * j + 8 * half;
        const __m256 sc = _mm256_loadu_ps(scale + c0);
#pragma GCC unroll 8
        for (int r = 0; r < MB; ++r)
          _mm256_store_ps(&tile[r][c0],
                          _mm256_fmadd_ps(acc[r][j], sc, _mm256_load_ps(&tile[r][c0])));
      }
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
      for (; m0 + 2 <= d.m; m0 += 2) mblock_int8<BITS, 2>(d, g, m0, n0);
      if (m0 < d.m) mblock_int8<BITS, 1>(d, g, m0, n0);
    } else if (d.atype == LOWBIT_QT_F32) {
      for (; m0 + 2 <= d.m; m0 += 2) mblock_fp<BITS, 2, false>(d, g, m0, n0);
      if (m0 < d.m) mblock_fp<BITS, 1, false>(d, g, m0, n0);
    } else {
      for (; m0 + 2 <= d.m; m0 += 2) mblock_fp<BITS, 2, true>(d, g, m0, n0);
      if (m0 < d.m) mblock_fp<BITS, 1, true>(d, g, m0, n0);
    }
  }
}

}  // namespace

void tile_avx2(const Desc& d, const Args& g) {
  switch (d.f.bits) {
    case 1: tile_bits<1>(d, g); break;
    case 2: tile_bits<2>(d, g); break;
    case 4: tile_bits<4>(d, g); break;
    default: tile_bits<8>(d, g); break;
  }
}

}  // namespace q
}  // namespace lowbit
