// The AMX tile configuration shared by every AMX translation unit (qgemm_amx.cpp,
// brgemm_amx.cpp, qbench_amx.cpp).
#ifndef LOWBIT_AMX_TILE_H
#define LOWBIT_AMX_TILE_H

#include <stdint.h>

namespace lowbit_amx {

// The 64-byte operand of LDTILECFG (palette 1: up to 16 rows of up to 64 bytes per tile).
struct alignas(64) TileConfig {
  uint8_t palette;
  uint8_t start_row;
  uint8_t reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
};

}  // namespace lowbit_amx
#endif
