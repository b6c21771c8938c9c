// bf16 <-> fp32 conversions shared by the kernels' scalar paths.
#ifndef LOWBIT_BF16_H
#define LOWBIT_BF16_H

#include <stdint.h>
#include <string.h>

namespace lowbit_bf16 {

inline float bf16_to_f32(uint16_t v) {
  uint32_t u = uint32_t(v) << 16;
  float f;
  memcpy(&f, &u, 4);
  return f;
}

// Round to nearest even (NaN stays a quiet NaN), as torch's fp32 -> bf16 conversion.
inline uint16_t f32_to_bf16(float f) {
  uint32_t u;
  memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return uint16_t((u >> 16) | 0x40);
  u += 0x7fffu + ((u >> 16) & 1u);
  return uint16_t(u >> 16);
}

}  // namespace lowbit_bf16
#endif
