// The AMX tile configuration shared by every AMX translation unit (qgemm_amx.cpp,
// brgemm_amx.cpp, qbench_amx.cpp).
#ifndef LOWBIT_AMX_TILE_H
#define LOWBIT_AMX_TILE_H

#include <stdint.h>
#include <string.h>

#ifdef __AMX_TILE__
#include <immintrin.h>

#include <algorithm>
#include <initializer_list>
#endif

namespace lowbit_amx {

// The 64-byte operand of LDTILECFG (palette 1: up to 16 rows of up to 64 bytes per tile).
struct alignas(64) TileConfig {
  uint8_t palette;
  uint8_t start_row;
  uint8_t reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
};

#ifdef __AMX_TILE__  // AMX-flagged translation units only
// The 2 x 2 blocking of the GEMM tiles (qgemm_amx.cpp, brgemm_amx.cpp): C tiles tmm0, tmm1
// (rows r0), tmm2, tmm3 (rows r1), A tiles tmm4 (r0), tmm5 (r1), B tiles tmm6, tmm7 (16 rows
// of 64 bytes). r1 = 0 leaves tmm2, 3, 5 unconfigured (never used).
inline void configure_2x2(int r0, int r1) {
  TileConfig c;
  memset(&c, 0, sizeof(c));
  c.palette = 1;
  for (int t : {0, 1, 4}) c.rows[t] = uint8_t(r0), c.colsb[t] = 64;
  if (r1)
    for (int t : {2, 3, 5}) c.rows[t] = uint8_t(r1), c.colsb[t] = 64;
  for (int t : {6, 7}) c.rows[t] = 16, c.colsb[t] = 64;
  _tile_loadconfig(&c);
}

// The tile rows of a row pair (16 + 16 rows, fewer at the end of a pass) with the tiles
// configured for them: LDTILECFG only when they differ from the previous row pair's. The
// first row pair of every call configures (the thread's last configuration is not ours to
// trust: another library may have used AMX).
struct RowPairTiles {
  int r0 = 0, r1 = 0;  // rows of tmm0/1/4 and tmm2/3/5; 0: not configured yet
  void set(int64_t rows_left) {
    const int a = int(std::min<int64_t>(16, rows_left));
    const int b = int(std::clamp<int64_t>(rows_left - 16, 0, 16));
    if (a != r0 || b != r1) {
      configure_2x2(a, b);
      r0 = a, r1 = b;
    }
  }
};

// The C tiles of a row pair in a block of 4-byte sums (int32 or fp32), `ld` elements per row:
// tmm1 16 columns right of tmm0, tmm2 and tmm3 16 rows below them (r1 = 0: tmm0, tmm1 only).
inline void load_c_2x2(const void* c, int64_t ld, int r1, bool zero) {
  const char* p = static_cast<const char*>(c);
  if (zero) {
    _tile_zero(0);
    _tile_zero(1);
    if (r1) {
      _tile_zero(2);
      _tile_zero(3);
    }
    return;
  }
  _tile_loadd(0, p, ld * 4);
  _tile_loadd(1, p + 64, ld * 4);
  if (r1) {
    _tile_loadd(2, p + 64 * ld, ld * 4);
    _tile_loadd(3, p + 64 * ld + 64, ld * 4);
  }
}

inline void store_c_2x2(void* c, int64_t ld, int r1) {
  char* p = static_cast<char*>(c);
  _tile_stored(0, p, ld * 4);
  _tile_stored(1, p + 64, ld * 4);
  if (r1) {
    _tile_stored(2, p + 64 * ld, ld * 4);
    _tile_stored(3, p + 64 * ld + 64, ld * 4);
  }
}
#endif

}  // namespace lowbit_amx
#endif
