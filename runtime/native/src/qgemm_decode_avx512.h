// The AVX-512 decode of packed low-bit codes, shared by the AVX-512 tiles (qgemm_avx512.cpp)
// and the AMX tiles (qgemm_amx.cpp, which store the decoded vectors as B-tile rows).
#ifndef LOWBIT_QGEMM_DECODE_AVX512_H
#define LOWBIT_QGEMM_DECODE_AVX512_H

#include <immintrin.h>
#include <stdint.h>

#define LB_INLINE inline __attribute__((always_inline))

namespace lowbit {
namespace q {
namespace {

// Bit position of field j (vector j of decode) in a code byte, for decodes that mask the
// fields in place instead of shifting them down (decode_scaled of the GEMV tiles, the AMX
// tiles' decode_half): their sums are 2^field_shift times the codes' and are shifted back.
template <int BITS>
constexpr int field_shift(int j) {
  return BITS == 1 ? j : BITS == 2 ? 2 * j : BITS == 4 ? 4 * (j % 2) : 0;
}

// Decode the 4 VNNI4 u8 operand vectors of 4-k sub-step `h` from a packed step.
template <int BITS>
LB_INLINE void decode(const uint8_t* p, int h, __m512i v[4]) {
  if constexpr (BITS == 1) {
    const __m512i m1 = _mm512_set1_epi8(1);
    const __m512i x = _mm512_srli_epi16(_mm512_loadu_si512(p), 4 * h);
    v[0] = _mm512_and_si512(x, m1);
    v[1] = _mm512_and_si512(_mm512_srli_epi16(x, 1), m1);
    v[2] = _mm512_and_si512(_mm512_srli_epi16(x, 2), m1);
    v[3] = _mm512_and_si512(_mm512_srli_epi16(x, 3), m1);
  } else if constexpr (BITS == 2) {
    const __m512i m3 = _mm512_set1_epi8(3);
    const __m512i x = _mm512_loadu_si512(p);
    v[0] = _mm512_and_si512(x, m3);
    v[1] = _mm512_and_si512(_mm512_srli_epi16(x, 2), m3);
    v[2] = _mm512_and_si512(_mm512_srli_epi16(x, 4), m3);
    v[3] = _mm512_and_si512(_mm512_srli_epi16(x, 6), m3);
  } else if constexpr (BITS == 4) {
    const __m512i m15 = _mm512_set1_epi8(15);
    const __m512i x0 = _mm512_loadu_si512(p), x1 = _mm512_loadu_si512(p + 64);
    v[0] = _mm512_and_si512(x0, m15);
    v[1] = _mm512_and_si512(_mm512_srli_epi16(x0, 4), m15);
    v[2] = _mm512_and_si512(x1, m15);
    v[3] = _mm512_and_si512(_mm512_srli_epi16(x1, 4), m15);
  } else {
#pragma GCC unroll 4
    for (int j = 0; j < 4; ++j) v[j] = _mm512_loadu_si512(p + 64 * j);
  }
}

}  // namespace
}  // namespace q
}  // namespace lowbit

#endif
