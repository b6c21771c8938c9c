// AMX-BF16 dense BRGEMM tiles: bf16 A x bf16 B -> fp32 with TDPBF16PS (16 x 16 fp32 per C
// tile, 32 k per instruction: an A tile is 16 rows x 32 bf16, a B tile 16 k pairs x 16 columns
// in VNNI-2 order), C fp32 or rounded once to bf16.
//
// A tiles are loaded in place, 16 rows lda apart; only a K tail (K not a multiple of 32) is
// copied, zero-padded (columns past K may be NaN). Copying A to 32-column panels first, as the
// int8 tiles do, gained nothing on whole layers (in-place A ran 0.98-1.12x the copying kernel
// at M = 128, N and K of 2048-5632, lda a multiple of 4 KiB included) and cost 3.2-3.8x on the
// 64-column N tiles compiled code issues with the whole A (the copy is paid per call).
// B is read per n-block of 32 columns (the packed panel width) and K chunk of kKC values,
// reused by every row pair of a pass of up to kMC rows:
//   packed B: the panel's VNNI-2 rows are the two B tiles' rows (128 bytes apart), loaded in
//             place; only a K tail (K not a multiple of 32) is copied, zero-padded, to a
//             scratch step (the rows past K may be another block's data, NaN * 0 is NaN);
//   row-major B: a K chunk of 8 n-blocks at once is interleaved into the same layout in
//             scratch (AVX-512 permutes), zero past K and N.
// Rows go 32 at a time: 2 A tiles x 2 B tiles -> 4 C tiles (tmm0-3 C, tmm4-5 A, tmm6-7 B),
// four loads per four TDPBF16PS; C tiles live in an fp32 [rows][32] block per n-block between
// chunks and batch elements. The n-block's epilogue adds the old C (unless beta 0), rounds a
// bf16 C once (nearest even) and stores the valid columns (masked N tail).
//
// The tile configuration is loaded at the first row pair of every call and released at the
// end (torch's oneDNN uses AMX on the same threads). Results are not bitwise equal to the
// AVX-512 vdpbf16ps tiles, only within fp32 accumulation error: in the SDM's pseudo-code
// TDPBF16PS sums a 32-k step's even and odd products in two fp32 chains and adds their sum to
// C, VDPBF16PS adds both products of each pair to the accumulator, and here the old C is added
// after the whole sum instead of before it (both flush bf16 denormal inputs and fp32 denormal
// results).
#include <immintrin.h>
#include <stdlib.h>
#include <string.h>

#include <algorithm>

#include "amx_tile.h"
#include "brgemm_internal.h"

namespace {

constexpr int64_t NB = LOWBIT_BRGEMM_NB;      // output columns per n-block (2 C tiles)
constexpr int64_t kKC = 512;                  // K values per B chunk (32 KiB of bf16 B: L1)
constexpr int64_t kMC = 256;                  // most rows of A per pass over B (B reuse)
constexpr int64_t kStepElems = 16 * 2 * NB;   // B chunk elements per 32 k (16 pairs x 64)
// n-blocks per panel of a row-major B: its rows are ldb apart, one page each for a wide B, so
// they are read 256 columns (8 cache lines) at a time (32 columns, one line per row and page,
// ran the 128 x 4096 x 4096 tile at 0.45x the packed one; software prefetch did not help).
constexpr int64_t kPanelBlocks = 8;


// Per-thread scratch, grown on demand and kept (compiled code calls tiles from its OpenMP
// workers over and over).
struct Scratch {
  uint16_t* bchunk = nullptr;  // a row-major B panel chunk in VNNI-2 order, or a packed K tail step
  float* acc = nullptr;        // [kPanelBlocks][kMC][NB] fp32
  uint16_t* atail = nullptr;   // the K tail of a pass's rows of A
  size_t atail_bytes = 0;
  Scratch() {
    bchunk = static_cast<uint16_t*>(aligned_alloc(64, kPanelBlocks * (kKC / 32) * kStepElems * 2));
    acc = static_cast<float*>(aligned_alloc(64, kPanelBlocks * kMC * NB * 4));
  }
  ~Scratch() {
    free(bchunk);
    free(acc);
    free(atail);
  }
  bool reserve(size_t bytes) {
    if (!bchunk || !acc) return false;
    if (bytes <= atail_bytes) return true;
    free(atail);
    atail = static_cast<uint16_t*>(aligned_alloc(64, bytes));
    atail_bytes = atail ? bytes : 0;
    return atail != nullptr;
  }
};

// Rows [k0, k0 + kc) of row-major B, columns [n0, n0 + w), into VNNI-2 steps per n-block of
// 32 columns: n-block j, pair q, column c, half h at out[(j * pairs + q) * 64 + 2 c + h], with
// pairs = 16 * ceil(kc / 32); zero past K and past w.
void interleave_b(const uint16_t* b, int64_t ldb, int64_t k0, int64_t kc, int64_t k,
                  int64_t n0, int64_t w, uint16_t* out) {
  // lo: columns 0-15 of rows (2q, 2q + 1) interleaved, hi: columns 16-31.
  const __m512i lo = _mm512_set_epi16(47, 15, 46, 14, 45, 13, 44, 12, 43, 11, 42, 10, 41, 9, 40, 8,
                                      39, 7, 38, 6, 37, 5, 36, 4, 35, 3, 34, 2, 33, 1, 32, 0);
  const __m512i hi = _mm512_add_epi16(lo, _mm512_set1_epi16(16));
  const int64_t pairs = (kc + 31) / 32 * 16;
  for (int64_t q = 0; q < pairs; ++q) {
    const int64_t r = k0 + 2 * q;
    for (int64_t j = 0; j * NB < w; ++j) {
      const int64_t left = w - j * NB;
      const __mmask32 mk = left >= 32 ? ~__mmask32(0) : (__mmask32(1) << left) - 1;
      const uint16_t* bj = b + n0 + j * NB;
      const __m512i r0 = r < k ? _mm512_maskz_loadu_epi16(mk, bj + r * ldb) : _mm512_setzero_si512();
      const __m512i r1 = r + 1 < k ? _mm512_maskz_loadu_epi16(mk, bj + (r + 1) * ldb) : _mm512_setzero_si512();
      uint16_t* o = out + (j * pairs + q) * 64;
      _mm512_store_si512(o, _mm512_permutex2var_epi16(r0, lo, r1));
      _mm512_store_si512(o + 32, _mm512_permutex2var_epi16(r0, hi, r1));
    }
  }
}

// The last, partial 32-k step of a packed chunk (pairs [0, pairs) valid, the partner half of
// the last pair zeroed when K is odd), zero-padded to 16 pairs.
void packed_tail(const uint16_t* b, int64_t kvalid, uint16_t* out) {
  const int64_t pairs = (kvalid + 1) / 2;
  for (int64_t q = 0; q < 16; ++q) {
    __m512i v = q < pairs ? _mm512_loadu_si512(b + q * 64) : _mm512_setzero_si512();
    __m512i u = q < pairs ? _mm512_loadu_si512(b + q * 64 + 32) : _mm512_setzero_si512();
    if (q == pairs - 1 && (kvalid & 1)) {
      const __m512i even = _mm512_set1_epi32(0xffff);
      v = _mm512_and_si512(v, even);
      u = _mm512_and_si512(u, even);
    }
    _mm512_store_si512(out + q * 64, v);
    _mm512_store_si512(out + q * 64 + 32, u);
  }
}

// Where each 32-k step of a chunk reads its A tile (rows `stride` bytes apart; the pair's
// second tile 16 rows further) and its two B tiles (b, b + 32; rows 128 bytes apart).
struct Steps {
  const uint16_t* a[kKC / 32];
  int64_t a_stride[kKC / 32];
  const uint16_t* b[kKC / 32];
  int n = 0;
};

// One row pair (pass rows mp .. mp + r0 + r1) over the steps of a chunk against 32 output
// columns: C tiles loaded from acc (zeroed when `first`) and stored back.
void row_pair(const Steps& st, int r1, bool first, float* acc) {
  lowbit_amx::load_c_2x2(acc, NB, r1, first);
  for (int s = 0; s < st.n; ++s) {
    const uint16_t* as = st.a[s];
    const int64_t ast = st.a_stride[s];
    const uint16_t* bs = st.b[s];
    _tile_loadd(4, as, ast);
    _tile_loadd(6, bs, 4 * NB);
    _tile_dpbf16ps(0, 4, 6);
    _tile_loadd(7, bs + 32, 4 * NB);
    _tile_dpbf16ps(1, 4, 7);
    if (r1) {
      _tile_loadd(5, as + 16 * (ast / 2), ast);
      _tile_dpbf16ps(2, 5, 6);
      _tile_dpbf16ps(3, 5, 7);
    }
  }
  lowbit_amx::store_c_2x2(acc, NB, r1);
}

// fp32 -> bf16, nearest even, NaN kept quiet (lowbit_bf16::f32_to_bf16 on 16 lanes).
inline __m256i to_bf16(__m512 x) {
  const __m512i u = _mm512_castps_si512(x);
  const __m512i rounded = _mm512_srli_epi32(
      _mm512_add_epi32(u, _mm512_add_epi32(_mm512_set1_epi32(0x7fff),
                                           _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1)))),
      16);
  const __mmask16 nan = _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q);
  const __m512i quiet = _mm512_or_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(0x40));
  return _mm512_cvtepi32_epi16(_mm512_mask_mov_epi32(rounded, nan, quiet));
}

// acc rows [0, mrows) x columns [0, w) into C rows [m0, ...) columns [n0, n0 + w).
void store_block(const Desc& d, const float* acc, void* c_base, int64_t m0, int64_t mrows,
                 int64_t n0, int w) {
  const __mmask16 m0k = __mmask16(w >= 16 ? 0xffff : (1u << w) - 1);
  const __mmask16 m1k = __mmask16(w <= 16 ? 0 : w >= 32 ? 0xffff : (1u << (w - 16)) - 1);
  const __mmask16 mk[2] = {m0k, m1k};
  for (int64_t r = 0; r < mrows; ++r) {
    const int64_t off = (m0 + r) * d.ldc + n0;
    for (int h = 0; h < 2; ++h) {
      if (!mk[h]) continue;
      __m512 v = _mm512_load_ps(acc + r * NB + 16 * h);
      if (d.c_bf16()) {
        uint16_t* c = static_cast<uint16_t*>(c_base) + off + 16 * h;
        if (!d.beta0()) {
          const __m256i old = _mm256_maskz_loadu_epi16(mk[h], c);
          v = _mm512_add_ps(v, _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(old), 16)));
        }
        _mm256_mask_storeu_epi16(c, mk[h], to_bf16(v));
      } else {
        float* c = static_cast<float*>(c_base) + off + 16 * h;
        if (!d.beta0()) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(mk[h], c));
        _mm512_mask_storeu_ps(c, mk[h], v);
      }
    }
  }
}

// The K tail of rows [m0, m0 + mrows) of every batch element (columns [32 (np - 1), K),
// zero-padded to 32) at atail + (i * mrows + r) * 32: what in-place A tiles must not read.
void pack_a_tail(const Desc& d, const uint16_t* a, int64_t batch, int64_t m0, int64_t mrows,
                 int64_t np, uint16_t* atail) {
  const __mmask32 mk = (__mmask32(1) << (d.k - 32 * (np - 1))) - 1;
  for (int64_t i = 0; i < batch; ++i)
    for (int64_t r = 0; r < mrows; ++r)
      _mm512_store_si512(atail + (i * mrows + r) * 32,
                         _mm512_maskz_loadu_epi16(mk, a + i * d.stride_a + (m0 + r) * d.lda + 32 * (np - 1)));
}

void brgemm_amx_bf16(const Desc& d, const void* a_base, const void* b_base, void* c_base,
                     int64_t batch) {
  static thread_local Scratch s;
  const uint16_t* A = static_cast<const uint16_t*>(a_base);
  const uint16_t* B = static_cast<const uint16_t*>(b_base);
  const int64_t np = (d.k + 31) / 32;  // 32-k steps per batch element
  const int64_t mc = kMC;
  if (!s.reserve(size_t(std::min(mc, d.m) * batch * 64))) {  // no memory: AVX-512 needs none
    lowbit_brgemm::select_avx512(d)(d, a_base, b_base, c_base, batch);
    return;
  }
  const int64_t panel = d.packed() ? NB : kPanelBlocks * NB;
  const int64_t k_full = d.k / 32 * 32;  // A columns tiles read in place
  lowbit_amx::RowPairTiles tiles;  // configured at the first row pair, released at the end
  Steps st;
  for (int64_t m0 = 0; m0 < d.m; m0 += mc) {
    const int64_t mrows = std::min(mc, d.m - m0);
    if (k_full < d.k) pack_a_tail(d, A, batch, m0, mrows, np, s.atail);
    for (int64_t p0 = 0; p0 < d.n; p0 += panel) {
      const int64_t pw = std::min(panel, d.n - p0);
      for (int64_t i = 0; i < batch; ++i) {
        const uint16_t* bi = B + i * d.stride_b;
        for (int64_t k0 = 0; k0 < d.k; k0 += kKC) {
          const int64_t kc = std::min(kKC, d.k - k0);
          const int steps = int((kc + 31) / 32);
          st.n = steps;
          if (!d.packed()) interleave_b(bi, d.ldb, k0, kc, d.k, p0, pw, s.bchunk);
          const bool first = i == 0 && k0 == 0;
          for (int64_t j = 0; j * NB < pw; ++j) {
            for (int t = 0; t < steps; ++t) st.b[t] = s.bchunk + (j * steps + t) * kStepElems;
            if (d.packed()) {
              const uint16_t* b = bi + ((p0 / NB) + j) * d.ldb + k0 * NB;  // row pairs of k0 (even)
              for (int t = 0; t < steps; ++t) st.b[t] = b + t * kStepElems;
              if (kc % 32) {
                packed_tail(st.b[steps - 1], kc % 32, s.bchunk);
                st.b[steps - 1] = s.bchunk;
              }
            }
            float* acc = s.acc + j * mrows * NB;
            for (int64_t mp = 0; mp < mrows; mp += 32) {
              tiles.set(mrows - mp);
              for (int t = 0; t < steps; ++t) {
                const int64_t kk = k0 + 32 * t;
                if (kk < k_full) {
                  st.a[t] = A + i * d.stride_a + (m0 + mp) * d.lda + kk;
                  st.a_stride[t] = d.lda * 2;
                } else {
                  st.a[t] = s.atail + (i * mrows + mp) * 32;
                  st.a_stride[t] = 64;
                }
              }
              row_pair(st, tiles.r1, first, acc + mp * NB);
            }
          }
        }
      }
      for (int64_t j = 0; j * NB < pw; ++j)
        store_block(d, s.acc + j * mrows * NB, c_base, m0, mrows, p0 + j * NB,
                    int(std::min<int64_t>(NB, pw - j * NB)));
    }
  }
  _tile_release();
}

}  // namespace

namespace lowbit_brgemm {

KernelFn select_amx(const Desc& d) {
  return d.dtype == LOWBIT_DTYPE_BF16 ? &brgemm_amx_bf16 : nullptr;
}

}  // namespace lowbit_brgemm
