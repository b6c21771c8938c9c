// AMX-INT8 low-bit tiles: int8 activations x packed 1/2/4/8-bit codes with TDPBSUD (signed
// activation bytes x unsigned code bytes, 16 x 16 int32 per tile, 64 k per instruction).
//
// A pass takes up to 256 activation rows and copies them once into 64-column panels: each A
// tile is then 1 KiB of consecutive rows (tiles loaded straight from rows `lda` apart ran
// 25-35% slower in-process, with lda padded off 4 KiB multiples too: 16 pages per tile).
// Per chunk of kKC values of a K-block of one n-block (64 output rows), the codes are decoded
// once to bytes in the B-tile layout (unpack_codes_avx512: 4 planes of 16 rows; the packer's
// VNNI4 order is already the B tile's) and reused by every row of the pass (prefetching the
// next n-block's codes cost 4-5%: the hardware prefetchers keep up; decoding the next chunk in
// slices between the TDPBSUDs measured 0.9-1.1x). Rows go 32 at a time:
// 2 A tiles x 2 B tiles -> 4 C tiles (tmm0-3 C, tmm4-5 A, tmm6-7 B), four loads per four
// TDPBSUD. C tiles are kept in an int32 [rows][64] block between K chunks; each K-block ends
// with the AVX-512 path's own flush (offset correction, scales), so AMX and AVX-512 results
// are bitwise equal.
//
// Tails: the last row pair configures its tiles with fewer rows; a K-block that is not a
// multiple of 64 has its panels zero-padded (activations and codes), adding nothing.
#include <immintrin.h>
#include <stdlib.h>

#include <algorithm>

#include "qgemm_internal.h"

namespace lowbit {
namespace q {

namespace {

constexpr int64_t kKC = 256;             // K values per decoded codes chunk (16 KiB of B planes)
constexpr int64_t kMC = 256;             // most activation rows per pass over the weights
constexpr int64_t kPackBytes = 768 << 10;  // packed activations of a pass (L2-resident)


// Per-thread scratch, grown on demand and kept (compiled code calls tiles from its OpenMP
// workers over and over).
struct Scratch {
  uint8_t* panel = nullptr;  // 4 planes x kKC/4 rows x 64 bytes
  int32_t* acc = nullptr;    // [kMC][64] int32
  float* tile = nullptr;     // [kMC][64] fp32
  int8_t* apack = nullptr;   // activation panels of a pass
  size_t apack_bytes = 0;
  Scratch() {
    panel = static_cast<uint8_t*>(aligned_alloc(64, kKC * NB));
    acc = static_cast<int32_t*>(aligned_alloc(64, kMC * NB * 4));
    tile = static_cast<float*>(aligned_alloc(64, kMC * NB * 4));
  }
  ~Scratch() {
    free(panel);
    free(acc);
    free(tile);
    free(apack);
  }
  bool reserve(size_t bytes) {
    if (!panel || !acc || !tile) return false;
    if (bytes <= apack_bytes) return true;
    free(apack);
    apack = static_cast<int8_t*>(aligned_alloc(64, bytes));
    apack_bytes = apack ? bytes : 0;
    return apack != nullptr;
  }
};

// Rows [m0, m0 + mrows) of every K-block as 64-column panels: K-block i's columns
// [64 b, 64 b + 64) of row r at apack + ((i * nb + b) * mrows + r) * 64, zero past the
// K-block's end.
void pack_rows(const Desc& d, const Args& g, int64_t m0, int64_t mrows, int64_t nb,
               int8_t* apack) {
  const int8_t* a = static_cast<const int8_t*>(g.a);
  for (int64_t i = 0; i < g.count; ++i)
    for (int64_t r = 0; r < mrows; ++r) {
      const int8_t* x = a + (m0 + r) * d.lda + i * d.stride_a;
      for (int64_t b = 0; b < nb; ++b) {
        const int64_t left = d.kblock - 64 * b;
        const __mmask64 mk = left >= 64 ? ~__mmask64(0) : (__mmask64(1) << left) - 1;
        _mm512_store_si512(apack + ((i * nb + b) * mrows + r) * 64,
                           _mm512_maskz_loadu_epi8(mk, x + 64 * b));
      }
    }
}

// One row pair (rows mp .. mp + r0 + r1 of the pass) against the 64 output rows of a decoded
// codes chunk of kc values: C tiles loaded from acc (or zeroed on the first chunk), kc / 64
// steps of 4 TDPBSUD per 32-column half, stored back. `a` is the pair's first A tile, the
// next 64 columns `astep` bytes further.
void row_pair(const int8_t* a, int64_t astep, int64_t kc, int r1, const uint8_t* panel,
              int64_t rows, bool first, int32_t* acc) {
  for (int h = 0; h < 2; ++h) {
    int32_t* c = acc + 32 * h;
    lowbit_amx::load_c_2x2(c, NB, r1, first);
    const uint8_t* b0 = panel + (2 * h) * rows * 64;  // plane row kk / 4 holds k = kk..kk+3
    const uint8_t* b1 = panel + (2 * h + 1) * rows * 64;
    for (int64_t kk = 0; kk < kc; kk += 64) {
      const int8_t* ak = a + (kk / 64) * astep;
      _tile_loadd(4, ak, 64);
      if (r1) {
        _tile_loadd(5, ak + 16 * 64, 64);
      }
      _tile_loadd(6, b0 + kk * 16, 64);
      _tile_loadd(7, b1 + kk * 16, 64);
      _tile_dpbsud(0, 4, 6);
      _tile_dpbsud(1, 4, 7);
      if (r1) {
        _tile_dpbsud(2, 5, 6);
        _tile_dpbsud(3, 5, 7);
      }
    }
    lowbit_amx::store_c_2x2(c, NB, r1);
  }
}

}  // namespace

void tile_amx(const Desc& d, const Args& g) {
  static thread_local Scratch s;
  const Format& f = d.f;
  const int64_t kb = d.kblock;
  const int64_t nb = (kb + 63) / 64;  // 64-column panels per K-block
  const int64_t per_row = g.count * nb * 64;
  const int64_t mc = std::clamp<int64_t>(kPackBytes / per_row / 32 * 32, 32, kMC);
  if (!s.reserve(size_t(std::min(mc, d.m) * per_row))) {  // no memory: AVX-512 needs none
    tile_avx512(d, g);
    return;
  }
  int cfg0 = -1, cfg1 = -1;
  // The last tile configuration on this thread is not ours to trust (another library may
  // have used AMX): configure at the first row pair of every call, release at the end.
  for (int64_t m0 = 0; m0 < d.m; m0 += mc) {
    const int64_t mrows = std::min(mc, d.m - m0);
    pack_rows(d, g, m0, mrows, nb, s.apack);
    for (int64_t n0 = 0; n0 < d.n; n0 += NB) {
      const uint8_t* nblock = g.b + (n0 / NB) * d.ldb;
      for (int64_t i = 0; i < g.count; ++i) {
        const uint8_t* w = nblock + i * d.stride_b;
        for (int64_t k0 = 0; k0 < kb; k0 += kKC) {
          const int64_t kc = std::min(kKC, kb - k0);
          const int64_t rows = (kc + 63) / 64 * 16;
          unpack_codes_avx512(f.bits, w, k0, k0 + kc, s.panel, rows);
          for (int64_t mp = 0; mp < mrows; mp += 32) {
            const int r0 = int(std::min<int64_t>(16, mrows - mp));
            const int r1 = int(std::clamp<int64_t>(mrows - mp - 16, 0, 16));
            if (r0 != cfg0 || r1 != cfg1) {
              lowbit_amx::configure_2x2(r0, r1);
              cfg0 = r0, cfg1 = r1;
            }
            const int8_t* a = s.apack + ((i * nb + k0 / 64) * mrows + mp) * 64;
            row_pair(a, mrows * 64, kc, r1, s.panel, rows, k0 == 0, s.acc + mp * NB);
          }
        }
        flush_block_avx512(d, g, s.acc, m0, mrows, i, w, s.tile);
      }
      store_rows_avx512(d, g, m0, mrows, n0, s.tile);
    }
  }
  _tile_release();
}

}  // namespace q
}  // namespace lowbit
