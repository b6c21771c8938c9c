// AMX-INT8 low-bit tiles: int8 activations x packed 1/2/4/8-bit codes with TDPBSUD (signed
// activation bytes x unsigned code bytes, 16 x 16 int32 per tile, 64 k per instruction).
//
// Activations: a call of up to kDirectMaxRows output rows (the compiled prefill's tasks) loads
// its A tiles straight from the rows, `lda` apart (compiled layers quantize into rows
// lowbit_qgemm_act_stride apart, an odd number of 64-byte lines: with 2048 or 4096 an A tile's
// 16 rows shared two or one L1 sets, 1.18-1.26x slower per tile); a wider call first copies each pass of up
// to 256 rows into 64-column panels (an A tile is then 1 KiB of consecutive rows), which pays
// off over many n-blocks (direct_rows). A tiles are loaded with TILELOADDT1: the activations
// stream past without evicting the codes and the decode ring from L1.
// Rows go 32 at a time against 32 output columns (half h of a 64-row n-block): 2 A tiles x
// 2 B tiles -> 4 C tiles (tmm0-3 C, tmm4-5 A, tmm6-7 B), four loads per four TDPBSUD, and the
// C tiles stay in their registers for a whole K-block.
//
// The B tiles are decoded just in time: while the TDPBSUDs of K step t run, the codes of step
// t + kAhead are decoded (fields masked in place, decode_half; the packer's VNNI4 order is
// already a B tile's) into a small ring that stays in L1, every row pair decoding the codes
// again: decode work is cheap next to the tile unit, memory traffic is not. Measured outside
// the runtime (benchmarks/amx_loops.py, a 128 x 4096 x 4096 ternary layer, one thread, against
// the adjacent tdpbsud bursts): this ring 0.70, without the streaming hint 0.46, a decoded
// panel of all of K in L2 0.49, 256-value chunks decoded into L1 with the int32 sums spilled
// between chunks (this file's earlier design) 0.39; no decode at all 0.70.
// The ring runs on across a K-block's row_pair invocations (Ring): each decodes the next one's
// first kAhead steps during its own last steps, so only a K-block's first invocation fills it
// before its first TDPBSUD (per-round paired ratios, M = 128: 512 x 2048 1.13-1.18x, other
// shapes 0.93-1.16x, medians ~1.0-1.03x).
//
// Tails: the last row pair configures its tiles with fewer rows; a K-block that is not a
// multiple of 64 has zero ring rows past its end (and zero-padded panels, or whatever the
// activation row holds there: times zero). Each K-block ends with the AVX-512 path's own
// flush (offset correction, scales), so AMX and AVX-512 results are bitwise equal.
#include <immintrin.h>
#include <stdlib.h>

#include <algorithm>

#include "qgemm_decode_avx512.h"
#include "qgemm_internal.h"

namespace lowbit {
namespace q {

namespace {

constexpr int64_t kMC = 256;               // most activation rows per pass over the weights
constexpr int64_t kPackBytes = 768 << 10;  // packed activations of a pass (L2-resident)
constexpr int kRing = 8;                   // decoded K steps in the ring (2 B tiles each)
constexpr int kAhead = 4;                  // steps decoded ahead of the tiles that read them
constexpr int64_t kDirectMaxRows = 4096;   // output rows of a call that read A unpacked


// Per-thread scratch, grown on demand and kept (compiled code calls tiles from its OpenMP
// workers over and over).
struct Scratch {
  uint8_t* ring = nullptr;   // kRing x 2 B tiles of 1 KiB
  int32_t* acc = nullptr;    // [kMC][64] int32
  float* tile = nullptr;     // [kMC][64] fp32
  int8_t* apack = nullptr;   // activation panels of a pass
  size_t apack_bytes = 0;
  Scratch() {
    ring = static_cast<uint8_t*>(aligned_alloc(64, kRing * 2048));
    acc = static_cast<int32_t*>(aligned_alloc(64, kMC * NB * 4));
    tile = static_cast<float*>(aligned_alloc(64, kMC * NB * 4));
  }
  ~Scratch() {
    free(ring);
    free(acc);
    free(tile);
    free(apack);
  }
  bool reserve(size_t bytes) {
    if (!ring || !acc || !tile) return false;
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

// Fields 2H and 2H + 1 of 4-k sub-step `sub`'s codes at p (decode<BITS>'s v[2H], v[2H + 1])
// masked where they sit, i.e. times 2^field_shift<BITS>(j): one AND per B tile row from one
// load of the codes (gcc would fold the load into both ANDs, and loads are what the tile
// waits for; 1-bit codes shift their high nibble down once). The sums of field j are shifted
// back, exactly, before the flush (KBlockFlush::shift); the largest masked code (240) is
// below 255, so kMaxInt8KBlock's int32 bound for 8-bit codes covers it.
template <int BITS, int H>
inline void decode_half(const uint8_t* p, int sub, __m512i& lo, __m512i& hi) {
  if constexpr (BITS == 8) {
    lo = _mm512_loadu_si512(p + 128 * H);
    hi = _mm512_loadu_si512(p + 128 * H + 64);
  } else {
    __m512i x = _mm512_loadu_si512(BITS == 4 ? p + 64 * H : p);
    __asm__("" : "+v"(x));  // one load, kept in a register
    if (BITS == 1 && sub) x = _mm512_srli_epi16(x, 4);
    constexpr int kMask = (1 << BITS) - 1;
    lo = _mm512_and_si512(x, _mm512_set1_epi8(char(kMask << field_shift<BITS>(2 * H))));
    hi = _mm512_and_si512(x, _mm512_set1_epi8(char(kMask << field_shift<BITS>(2 * H + 1))));
  }
}

// The codes of K step t (values [64 t, 64 t + 64) of a K-block of kblock values) for output
// rows 32 H .. 32 H + 31 of the n-block, as two B tiles: fields 2H and 2H + 1 of each 4-k
// sub-step, rows 16 apart; sub-steps past the K-block are zero. (H is a template argument so
// that the masks are constants.)
template <int BITS, int H>
inline void decode_step(const uint8_t* codes, int64_t t, int64_t kblock, uint8_t* b) {
  constexpr int kPerStep = 4 * kSubSteps<BITS>;  // k values per packed step
  const uint8_t* p = codes + 64 * t / kPerStep * kStepBytes<BITS>;
  const int full = int(std::clamp<int64_t>((kblock - 64 * t) / 4, 0, 16));  // sub-steps in the K-block
  if (full == 16) {
#pragma GCC unroll 16
    for (int s = 0; s < 16; ++s) {
      __m512i lo, hi;
      decode_half<BITS, H>(p + s / kSubSteps<BITS> * kStepBytes<BITS>, s % kSubSteps<BITS>, lo, hi);
      _mm512_store_si512(b + 64 * s, lo);
      _mm512_store_si512(b + 1024 + 64 * s, hi);
    }
    return;
  }
  for (int s = 0; s < 16; ++s) {
    __m512i lo = _mm512_setzero_si512(), hi = _mm512_setzero_si512();
    if (s < full) decode_half<BITS, H>(p + s / kSubSteps<BITS> * kStepBytes<BITS>, s % kSubSteps<BITS>, lo, hi);
    _mm512_store_si512(b + 64 * s, lo);
    _mm512_store_si512(b + 1024 + 64 * s, hi);
  }
}

// A K-block's flush constants for sums of masked fields (field_shift).
template <int BITS>
KBlockFlush amx_flush(const Desc& d, const uint8_t* w) {
  KBlockFlush fl = kblock_flush(d, w);
  fl.shifted = BITS != 8;
  for (int j = 0; j < 4; ++j) fl.shift[j] = uint8_t(field_shift<BITS>(j));
  return fl;
}

// The decode ring of consecutive row_pair invocations over one K-block. Step t of an
// invocation uses slot (base + t) % kRing; the next invocation starts where this one ended,
// so its first kAhead steps can be decoded during this one's last kAhead steps (into slots
// this one no longer reads) instead of serially before its first TDPBSUD. `next_codes`: the
// next invocation's codes and half (nullptr: none, or its K-block is too short to be covered);
// `warm`: this invocation's first steps are decoded already.
struct Ring {
  uint8_t* mem = nullptr;
  int64_t base = 0;
  bool warm = false;
  const uint8_t* next_codes = nullptr;
  int next_h = 0;

  uint8_t* slot(int64_t t) const { return mem + ((base + t) % kRing) * 2048; }
  template <int BITS>
  void decode_next(int64_t t, int64_t kblock, uint8_t* b) const {
    if (next_h) decode_step<BITS, 1>(next_codes, t, kblock, b);
    else decode_step<BITS, 0>(next_codes, t, kblock, b);
  }
  void advance(int64_t steps) {
    base = (base + steps) % kRing;
    warm = next_codes != nullptr;
    next_codes = nullptr;
  }
};

// With a single K-block, a row pair's finished sums go to the output rows one row per K step
// of the next row pair's passes, on the vector units while the tile unit works (flushed
// serially they were 17-30% of a tile's time at M = 128).
struct PendingRows {
  const Desc* d = nullptr;
  const Args* g = nullptr;
  const int32_t* acc = nullptr;  // row `next` of the block at acc + (next - row0) * NB
  KBlockFlush flush{};            // the n-block's K-block's scales and offsets
  int64_t n0 = 0, row0 = 0, next = 0, end = 0;

  void flush_one() {
    if (next < end) {
      flush_store_row_avx512(*d, *g, flush, acc + (next - row0) * NB, next, n0);
      ++next;
    }
  }
  void drain() {
    while (next < end) flush_one();
  }
};

// Rows mp .. mp + r0 + r1 of the pass x output rows 32 H .. 32 H + 31 over one K-block of
// `steps` 64-value steps: the C tiles start at zero and end in acc (int32, NB per row). `a` is
// the row pair's first A tile of step 0 (rows `lda` bytes apart), step t's `t * astep` bytes
// further.
template <int BITS, int H>
void row_pair(const int8_t* a, int64_t astep, int64_t lda, int64_t steps, int r1, const uint8_t* codes,
              int64_t kblock, Ring& ring, int32_t* acc, PendingRows& pending) {
  // 8-bit codes are bytes already: full steps load their B tiles straight from the packed
  // weights (rows 256 bytes apart); only a K tail goes through the ring.
  constexpr bool kDirect = BITS == 8;
  const int64_t direct_steps = kDirect ? kblock / 64 : 0;
  if (!ring.warm)
    for (int64_t t = direct_steps; t < std::min<int64_t>(direct_steps + kAhead, steps); ++t)
      decode_step<BITS, H>(codes, t, kblock, ring.slot(t));
  _tile_zero(0);
  _tile_zero(1);
  if (r1) {
    _tile_zero(2);
    _tile_zero(3);
  }
  for (int64_t t = 0; t < steps; ++t) {
    const int8_t* at = a + t * astep;
    // TILELOADDT1: the activations pass through without evicting the codes and the ring
    // from L1 (1.2-1.26x over plain loads in the standalone loop, K = 2048 and 4096)
    _tile_stream_loadd(4, at, lda);
    if (r1) _tile_stream_loadd(5, at + 16 * lda, lda);
    if (t < direct_steps) {
      const uint8_t* b = codes + t * 16 * kStepBytes<BITS> + 128 * H;
      _tile_loadd(6, b, kStepBytes<BITS>);
      _tile_loadd(7, b + 64, kStepBytes<BITS>);
    } else {
      const uint8_t* b = ring.slot(t);
      _tile_loadd(6, b, 64);
      _tile_loadd(7, b + 1024, 64);
    }
    _tile_dpbsud(0, 4, 6);
    _tile_dpbsud(1, 4, 7);
    // the decode runs on the vector units while the tile unit works
    if (t >= direct_steps && t + kAhead < steps)
      decode_step<BITS, H>(codes, t + kAhead, kblock, ring.slot(t + kAhead));
    else if (ring.next_codes && t + kAhead >= steps)  // the next invocation's first steps
      ring.decode_next<BITS>(t + kAhead - steps, kblock, ring.slot(t + kAhead));
    pending.flush_one();
    if (r1) {
      _tile_dpbsud(2, 5, 6);
      _tile_dpbsud(3, 5, 7);
    }
  }
  lowbit_amx::store_c_2x2(acc + 32 * H, NB, r1);
  ring.advance(steps);
}

// Bytes of 64-column panels per activation row (every K-block's columns, zero-padded).
int64_t panel_row_bytes(const Desc& d, const Args& g) {
  return g.count * ((d.kblock + 63) / 64) * 64;
}

// Activation rows per pass: as many as kPackBytes of panels hold, a multiple of 32.
int64_t pass_rows(const Desc& d, const Args& g) {
  return std::clamp<int64_t>(kPackBytes / panel_row_bytes(d, g) / 32 * 32, 32, kMC);
}

// Whether the A tiles are loaded straight from the activation rows (`lda` apart) instead of
// from 64-column panels packed per call: measured (ternary, M = 128, same process) 1.07-1.29x
// for calls of 256-1024 output rows, the compiled prefill's tasks. With rows Kp apart, 4096
// rows ran 0.89-0.91x (one packing serves 64 n-blocks); with the padded act_stride rows,
// per-round medians of four or five runs: 4096 x 4096 0.94-1.09x, 2560 x 6912 1.01-1.39x,
// 2048 x 2048 0.78-1.41x, but 6912 x 2560 0.88-1.03x and 8192 x 2048 0.96-1.03x. A row's
// last step reads up to 63 bytes past its K-block (multiplied by zero B rows), which must
// still be inside the row.
bool direct_rows(const Desc& d, const Args& g) {
  const int64_t nb = (d.kblock + 63) / 64;
  return d.n <= kDirectMaxRows && (g.count - 1) * d.stride_a + nb * 64 <= d.lda;
}

// `direct`: direct_rows(d, g), decided once by the caller (it also sizes the scratch).
template <int BITS>
void tile_bits(const Desc& d, const Args& g, Scratch& s, bool direct) {
  const int64_t kb = d.kblock;
  const int64_t nb = (kb + 63) / 64;  // 64-column panels (K steps) per K-block
  // the ring decodes ahead into the next invocation when that covers all its first steps
  const bool ahead = BITS != 8 && nb >= kAhead;
  const int64_t mc = direct ? kMC : pass_rows(d, g);  // rows per pass (acc, tile hold kMC)
  const int64_t alda = direct ? d.lda : 64;           // bytes between an A tile's rows
  lowbit_amx::RowPairTiles tiles;  // configured at the first row pair, released at the end
  PendingRows pending;
  Ring ring;  // every K-block's first invocation fills it serially (ring.warm is false)
  ring.mem = s.ring;
  int64_t pair = 0;  // row pairs so far (their acc slot, with a single K-block)
  pending.d = &d;
  pending.g = &g;
  for (int64_t m0 = 0; m0 < d.m; m0 += mc) {
    const int64_t mrows = std::min(mc, d.m - m0);
    const int64_t astep = direct ? 64 : mrows * 64;  // bytes between an A tile's K steps
    if (!direct) pack_rows(d, g, m0, mrows, nb, s.apack);
    for (int64_t n0 = 0; n0 < d.n; n0 += NB) {
      const uint8_t* nblock = g.b + (n0 / NB) * d.ldb;
      for (int64_t i = 0; i < g.count; ++i) {
        const uint8_t* w = nblock + i * d.stride_b;
        for (int64_t mp = 0; mp < mrows; mp += 32) {
          tiles.set(mrows - mp);
          const int8_t* a = direct ? static_cast<const int8_t*>(g.a) + (m0 + mp) * d.lda + i * d.stride_a
                                   : s.apack + (i * nb * mrows + mp) * 64;
          // one K-block: two row-pair slots of acc alternate (one is being flushed)
          int32_t* acc = g.count == 1 ? s.acc + (pair++ & 1) * 32 * NB : s.acc + mp * NB;
          ring.next_codes = ahead ? w : nullptr;
          ring.next_h = 1;
          row_pair<BITS, 0>(a, astep, alda, nb, tiles.r1, w, kb, ring, acc, pending);
          ring.next_codes = ahead && mp + 32 < mrows ? w : nullptr;
          ring.next_h = 0;
          row_pair<BITS, 1>(a, astep, alda, nb, tiles.r1, w, kb, ring, acc, pending);
          if (g.count == 1) {  // this row pair's rows go out during the next one's steps
            pending.drain();
            pending.acc = acc;
            pending.flush = amx_flush<BITS>(d, w);
            pending.n0 = n0;
            pending.row0 = pending.next = m0 + mp;
            pending.end = m0 + mp + tiles.r0 + tiles.r1;
          }
        }
        if (g.count > 1) flush_block_avx512(d, g, amx_flush<BITS>(d, w), s.acc, m0, mrows, i, s.tile);
      }
      if (g.count > 1) store_rows_avx512(d, g, m0, mrows, n0, s.tile);
    }
  }
  pending.drain();
  _tile_release();
}

}  // namespace

void tile_amx(const Desc& d, const Args& g) {
  static thread_local Scratch s;
  const bool direct = direct_rows(d, g);
  const size_t panels = direct ? 0 : size_t(std::min(pass_rows(d, g), d.m) * panel_row_bytes(d, g));
  if (!s.reserve(panels)) {  // no memory: AVX-512 needs none
    tile_avx512(d, g);
    return;
  }
  switch (d.f.bits) {
    case 1: tile_bits<1>(d, g, s, direct); break;
    case 2: tile_bits<2>(d, g, s, direct); break;
    case 4: tile_bits<4>(d, g, s, direct); break;
    default: tile_bits<8>(d, g, s, direct); break;
  }
}

}  // namespace q
}  // namespace lowbit
