// Internal definitions shared by the low-bit kernels of every ISA: format traits, the
// dispatched tile description, and the packed-layout addressing that all paths agree on.
#ifndef LOWBIT_QGEMM_INTERNAL_H
#define LOWBIT_QGEMM_INTERNAL_H

#include "amx_tile.h"
#include "bf16.h"
#include <stdint.h>
#include <string.h>
#include <time.h>

#include "lowbit/qgemm.h"

namespace lowbit {
namespace q {

constexpr int NB = LOWBIT_QGEMM_NB;

// Compile-time packed-step sizes per storage width (Format::step_bytes, for tiles templated on
// the bits): bytes per packed step of an n-block, and 4-k sub-steps per packed step.
template <int BITS>
constexpr int kStepBytes = BITS == 1 ? 64 : BITS == 2 ? 64 : BITS == 4 ? 128 : 256;
template <int BITS>
constexpr int kSubSteps = BITS == 1 ? 2 : 1;

// Static properties of a weight format. A stored code u relates to the integer code q by
// q = a*u - offset; the decoded kernel operand is the unsigned byte u.
struct Format {
  int bits;        // storage bits per code: 1, 2, 4, 8
  int kg;          // K granule: values of k per packed step (8 for 1-bit, 4 otherwise)
  int step_bytes;  // bytes per step per n-block
  int a;           // code multiplier (2 for int1)
  int offset;      // code offset
  int qmin, qmax;  // valid range of q
  bool zero_point; // carries a per-(n, K-block) zero point
};

inline bool format_of(int32_t wfmt, Format* f) {
  switch (wfmt) {
    case LOWBIT_QW_TERNARY: *f = {2, 4, 64, 1, 1, -1, 1, false}; return true;
    case LOWBIT_QW_INT2_SYM: *f = {2, 4, 64, 1, 2, -2, 1, false}; return true;
    case LOWBIT_QW_INT2_ASYM: *f = {2, 4, 64, 1, 0, 0, 3, true}; return true;
    case LOWBIT_QW_INT1: *f = {1, 8, 64, 2, 1, -1, 1, false}; return true;
    case LOWBIT_QW_INT4_SYM: *f = {4, 4, 128, 1, 8, -8, 7, false}; return true;
    case LOWBIT_QW_INT4_ASYM: *f = {4, 4, 128, 1, 0, 0, 15, true}; return true;
    case LOWBIT_QW_INT8: *f = {8, 4, 256, 1, 128, -128, 127, false}; return true;
    default: return false;
  }
}

inline int64_t codes_bytes(const Format& f, int64_t kblock) { return kblock / f.kg * f.step_bytes; }
// Bytes of one K-block of one n-block: codes, then 64 fp32 scales, then -- only for formats
// with zero points -- 64 int32 offsets c[n] = offset + z[n]. A symmetric format's c is the
// constant f.offset, so it is not stored: with per-group scales (group 32) the offsets were
// a sixth of the bytes a decode step streams.
inline int64_t kblock_bytes(const Format& f, int64_t kblock) {
  return codes_bytes(f, kblock) + NB * 4 + (f.zero_point ? NB * 4 : 0);
}
// The offsets of a K-block whose codes take `cb` bytes (nullptr: the constant f.offset).
inline const int32_t* kblock_offsets(const Format& f, const uint8_t* block, int64_t cb) {
  return f.zero_point ? reinterpret_cast<const int32_t*>(block + cb + NB * 4) : nullptr;
}

// Position of code (n_local in [0,64), k_local in [0, kblock)) inside a K-block's codes:
// byte index and bit shift. Decoded operand vector j of a 4-k sub-step holds, at byte
// i = (n % 16) * 4 + k % 4, the code of row n = 16 j + i / 4 (vpdpbusd's VNNI4 order).
//   2-bit: step = one k4, byte i holds vectors j = 0..3 at bits 2j.
//   1-bit: step = two k4 (h = 0, 1), byte i holds vector (h, j) at bit 4h + j.
//   4-bit: step = one k4, bytes [0,64) hold j = 0 | 1 << 4, bytes [64,128) hold j = 2 | 3 << 4.
//   8-bit: step = one k4, bytes [64 j, 64 j + 64) hold vector j.
inline void code_position(int bits, int64_t n_local, int64_t k_local, int64_t* byte, int* shift) {
  const int j = int(n_local / 16);
  const int64_t i = (n_local % 16) * 4 + k_local % 4;
  switch (bits) {
    case 1: {
      const int64_t step = k_local / 8;
      const int h = int((k_local % 8) / 4);
      *byte = step * 64 + i;
      *shift = 4 * h + j;
      return;
    }
    case 2:
      *byte = (k_local / 4) * 64 + i;
      *shift = 2 * j;
      return;
    case 4:
      *byte = (k_local / 4) * 128 + (j / 2) * 64 + i;
      *shift = 4 * (j % 2);
      return;
    default:
      *byte = (k_local / 4) * 256 + 64 * j + i;
      *shift = 0;
      return;
  }
}

// A dispatched tile (immutable once published in the kernel table).
struct Desc {
  int32_t wfmt, atype, ctype, flags, isa;
  bool panel;  // AVX-512: the decoded-panel tiles (tile_panel_avx512)
  int64_t m, n, kblock, lda, ldb, ldc, stride_a, stride_b, ld_aux;
  Format f;
};

struct Args {
  const void* a;
  const uint8_t* b;
  void* c;
  const float* a_scale;
  const int32_t* a_sum;
  const float* bias;
  int64_t count;
};

using TileFn = void (*)(const Desc&, const Args&);

using TileConfig = lowbit_amx::TileConfig;  // amx_tile.h, shared with brgemm_amx.cpp

// Per-ISA tile implementations (qgemm_scalar.cpp, qgemm_avx2.cpp, qgemm_avx512.cpp).
void tile_scalar(const Desc& d, const Args& args);
void tile_avx2(const Desc& d, const Args& args);
void tile_avx512(const Desc& d, const Args& args);
void tile_amx(const Desc& d, const Args& args);
// The AVX-512 tiles of many int8 rows x 1-/2-/4-bit codes over a decoded panel
// (qgemm_panel_avx512.cpp), for descriptions dispatched with `panel`. False: no memory for its
// scratch (nothing was written; the register tiles run instead).
bool tile_panel_avx512(const Desc& d, const Args& args);
// The panel rule's last condition (qgemm_panel_rule.cpp, lowbit_qgemm_panel_rule): whether
// tiles of `bits`-bit codes take the panel on this CPU, measured on first use per width.
bool panel_pays_off(int bits);
// The clock that times tiles (the panel rule, the benchmark helpers of qbench.cpp).
inline int64_t now_ns() {
  timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return int64_t(ts.tv_sec) * 1000000000 + ts.tv_nsec;
}

// Where a K-block's flush constants are: its scales, its offsets (nullptr: the format's one
// offset), computed once per K-block rather than per row. `shift`: the AMX tiles multiply
// codes masked in place (field j times 2^shift[j]); their sums are shifted back first.
struct KBlockFlush {
  const float* scale;
  const int32_t* off;
  int32_t offset;
  int a;
  bool per_block;
  bool shifted;
  uint8_t shift[4];
};
inline KBlockFlush kblock_flush(const Desc& d, const uint8_t* w) {
  const int64_t cb = codes_bytes(d.f, d.kblock);
  return {reinterpret_cast<const float*>(w + cb), kblock_offsets(d.f, w, cb), d.f.offset, d.f.a,
          (d.flags & LOWBIT_QF_ASCALE_PER_BLOCK) != 0, false, {}};
}
// AVX-512 pieces of the AMX and panel tiles (qgemm_avx512.cpp): one K-block's integer sums
// acc[rows][64] into the fp32 tile[rows][64] (K-block i = 0 overwrites it), and the final
// epilogue of rows. (The codes decode they share is qgemm_decode_avx512.h.)
void flush_block_avx512(const Desc& d, const Args& g, const KBlockFlush& fl, const int32_t* acc,
                        int64_t m0, int64_t rows, int64_t i, float* tile);
void store_rows_avx512(const Desc& d, const Args& g, int64_t m0, int64_t rows, int64_t n0,
                       const float* tile);
// Both at once for one row of a tile of one K-block (no fp32 tile between them).
void flush_store_row_avx512(const Desc& d, const Args& g, const KBlockFlush& fl,
                            const int32_t* acc_row, int64_t row, int64_t n0);

// Per-ISA activation quantization rows (same contract as lowbit_qquant_act, validated).
struct QuantArgs {
  int32_t xtype, flags;
  const void* x;
  int64_t m, k, ldx, kblock, nkb;
  int8_t* xq;
  int64_t ldq;
  float* scale;
  int32_t* rowsum;
  int64_t ld_aux;
};
void quant_act_scalar(const QuantArgs& qa);
void quant_act_avx512(const QuantArgs& qa);

using lowbit_bf16::bf16_to_f32;
using lowbit_bf16::f32_to_bf16;

}  // namespace q
}  // namespace lowbit

#endif
