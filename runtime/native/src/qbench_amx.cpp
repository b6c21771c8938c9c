// AMX throughput loops for benchmarks/peaks.py: 4 independent C tiles (tmm0-3) each updated
// by TDPBSUD (16 x 16 x 64 int8 MACs) or TDPBF16PS (16 x 16 x 32 bf16 MACs) from two A and
// two B tiles loaded once, 24 instructions per iteration like the vector loops. The caller
// checks that the CPU (and the OS) allow AMX.
#include <immintrin.h>
#include <stdint.h>
#include <string.h>

#include "qgemm_internal.h"

extern "C" {

// kind 5: TDPBSUD, kind 6: TDPBF16PS. Returns a value depending on every C tile.
LOWBIT_API int64_t lowbit_qbench_amx_loop(int32_t kind, int64_t iters) {
  if (kind != 5 && kind != 6) return -1;
  if (lowbit_rt_isa() != LOWBIT_ISA_AMX && !lowbit_rt_isa_supported(LOWBIT_ISA_AMX)) return -1;
  lowbit::q::TileConfig c;
  memset(&c, 0, sizeof(c));
  c.palette = 1;
  for (int t = 0; t < 8; ++t) c.rows[t] = 16, c.colsb[t] = 64;
  alignas(64) static thread_local uint8_t src[16 * 64];
  alignas(64) static thread_local int32_t dst[16 * 16];
  memset(src, kind == 5 ? 1 : 0, sizeof(src));
  _tile_loadconfig(&c);
  _tile_loadd(4, src, 64);
  _tile_loadd(5, src, 64);
  _tile_loadd(6, src, 64);
  _tile_loadd(7, src, 64);
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
  for (int64_t i = 0; i < iters; ++i) {
    if (kind == 5) {
      for (int u = 0; u < 6; ++u) {
        _tile_dpbsud(0, 4, 6);
        _tile_dpbsud(1, 4, 7);
        _tile_dpbsud(2, 5, 6);
        _tile_dpbsud(3, 5, 7);
      }
    } else {
      for (int u = 0; u < 6; ++u) {
        _tile_dpbf16ps(0, 4, 6);
        _tile_dpbf16ps(1, 4, 7);
        _tile_dpbf16ps(2, 5, 6);
        _tile_dpbf16ps(3, 5, 7);
      }
    }
  }
  int64_t out = 0;
  for (int t = 0; t < 4; ++t) {
    switch (t) {
      case 0: _tile_stored(0, dst, 64); break;
      case 1: _tile_stored(1, dst, 64); break;
      case 2: _tile_stored(2, dst, 64); break;
      default: _tile_stored(3, dst, 64); break;
    }
    out += dst[0];
  }
  _tile_release();
  return out;
}

}  // extern "C"
