// Weight packing for the low-bit kernels: integer codes q[N][K] -> the blocked layout
// described in lowbit/qgemm.h and docs/kernels.md. Runs when a model's weights are packed
// (load time for whole 1-3B models), so it is a vectorizable validation pass plus one
// cache-blocked transpose per (64-row n-block, 256-k chunk); qunpack is the slow reference.
#include <string.h>

#include "qgemm_internal.h"

using namespace lowbit::q;

namespace {

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace

extern "C" {

int64_t lowbit_qpack_layout(int32_t wfmt, int64_t n, int64_t k, int64_t kblock,
                            int64_t* kblock_bytes_out, int64_t* nblock_bytes_out,
                            int64_t* num_kblocks_out) {
  Format f{};
  if (!format_of(wfmt, &f)) return -LOWBIT_E_UNSUPPORTED;
  if (n <= 0 || k <= 0 || kblock <= 0) return -LOWBIT_E_SHAPE;
  if (kblock % f.kg != 0) return -LOWBIT_E_ALIGNMENT;
  const int64_t nkb = ceil_div(k, kblock);
  const int64_t kbb = kblock_bytes(f, kblock);
  const int64_t nbb = nkb * kbb;
  if (kbb <= 0 || nbb / nkb != kbb) return -LOWBIT_E_SHAPE;
  const int64_t nnb = ceil_div(n, NB);
  if (nbb > INT64_MAX / nnb) return -LOWBIT_E_SHAPE;
  if (kblock_bytes_out) *kblock_bytes_out = kbb;
  if (nblock_bytes_out) *nblock_bytes_out = nbb;
  if (num_kblocks_out) *num_kblocks_out = nkb;
  return nnb * nbb;
}

int32_t lowbit_qpack(int32_t wfmt, const int8_t* q, int64_t n, int64_t k, int64_t ldq,
                     const float* scale, int64_t group, const int8_t* zero, int64_t kblock,
                     uint8_t* out) {
  int64_t kbb, nbb, nkb;
  const int64_t total = lowbit_qpack_layout(wfmt, n, k, kblock, &kbb, &nbb, &nkb);
  if (total < 0) return int32_t(total);
  Format f{};
  format_of(wfmt, &f);
  if (!q || !scale || !out) return -LOWBIT_E_UNSUPPORTED;
  if (f.zero_point != (zero != nullptr)) return -LOWBIT_E_UNSUPPORTED;
  if (ldq < k) return -LOWBIT_E_LEADING_DIM;
  if (group <= 0) return -LOWBIT_E_SHAPE;
  const bool per_channel = group >= k;
  if (!per_channel && kblock != group) return -LOWBIT_E_ALIGNMENT;
  const int64_t ngroups = per_channel ? 1 : ceil_div(k, group);

  // Validate everything before writing, so a failed call leaves no half-packed buffer.
  // (Branch-free min/max per row: the compiler vectorizes it.)
  for (int64_t r = 0; r < n; ++r) {
    const int8_t* row = q + r * ldq;
    int lo = 127, hi = -128, zeros = 0;
    for (int64_t c = 0; c < k; ++c) {
      const int v = row[c];
      lo = v < lo ? v : lo;
      hi = v > hi ? v : hi;
      zeros += v == 0;
    }
    if (lo < f.qmin || hi > f.qmax || (f.bits == 1 && zeros)) return -LOWBIT_E_QRANGE;
    if (zero)
      for (int64_t g = 0; g < ngroups; ++g) {
        const int z = zero[r * ngroups + g];
        if (z < 0 || z > f.qmax) return -LOWBIT_E_QRANGE;
      }
  }

  // Pack one (n-block, K-chunk) at a time: first the stored codes u = (q + offset) / a of the
  // n-block's 64 rows into a small row-major buffer (padding rows and K columns are u = 0),
  // then interleave: the 4 bytes of k4 group g of row 16j + i hold, at bit field j, the
  // 4 bytes of packed vector j at byte 4i (docs/kernels.md), so a step is 16 x 32-bit ORs.
  const int64_t cb = codes_bytes(f, kblock);
  constexpr int64_t kChunk = 256;  // multiple of every K granule; u buffer 16 KiB
  alignas(64) uint8_t u[NB][kChunk];
  const int64_t nnb = ceil_div(n, NB);
  const int off = f.offset, a = f.a;
  for (int64_t b = 0; b < nnb; ++b) {
    uint8_t* nblock = out + b * nbb;
    const int64_t rows = n - b * NB < NB ? n - b * NB : NB;
    for (int64_t kb = 0; kb < nkb; ++kb) {
      uint8_t* codes = nblock + kb * kbb;
      for (int64_t c0 = 0; c0 < kblock; c0 += kChunk) {
        const int64_t width = kblock - c0 < kChunk ? kblock - c0 : kChunk;
        const int64_t kbase = kb * kblock + c0;  // first k of this chunk in the layer
        const int64_t valid = k - kbase <= 0 ? 0 : (k - kbase < width ? k - kbase : width);
        for (int64_t r = 0; r < NB; ++r) {
          uint8_t* ur = u[r];
          if (r < rows) {
            const int8_t* qr = q + (b * NB + r) * ldq + kbase;
            if (a == 1)
              for (int64_t c = 0; c < valid; ++c) ur[c] = uint8_t(qr[c] + off);
            else
              for (int64_t c = 0; c < valid; ++c) ur[c] = uint8_t((qr[c] + off) >> 1);
            memset(ur + valid, 0, size_t(width - valid));
          } else {
            memset(ur, 0, size_t(width));
          }
        }
        uint8_t* dst = codes + c0 / f.kg * f.step_bytes;
        auto word = [&](int64_t row, int64_t col) {
          uint32_t w;
          memcpy(&w, &u[row][col], 4);
          return w;
        };
        auto put = [](uint8_t* p, uint32_t w) { memcpy(p, &w, 4); };
        const int64_t steps = width / f.kg;
        for (int64_t s = 0; s < steps; ++s)
          for (int64_t i = 0; i < 16; ++i) {
            switch (f.bits) {
              case 1: {
                const int64_t c = s * 8;
                uint32_t w = 0;
                for (int j = 0; j < 4; ++j)
                  w |= word(16 * j + i, c) << j | word(16 * j + i, c + 4) << (4 + j);
                put(dst + s * 64 + 4 * i, w);
                break;
              }
              case 2: {
                const int64_t c = s * 4;
                put(dst + s * 64 + 4 * i, word(i, c) | word(16 + i, c) << 2 |
                                              word(32 + i, c) << 4 | word(48 + i, c) << 6);
                break;
              }
              case 4: {
                const int64_t c = s * 4;
                put(dst + s * 128 + 4 * i, word(i, c) | word(16 + i, c) << 4);
                put(dst + s * 128 + 64 + 4 * i, word(32 + i, c) | word(48 + i, c) << 4);
                break;
              }
              default: {
                const int64_t c = s * 4;
                for (int j = 0; j < 4; ++j) put(dst + s * 256 + 64 * j + 4 * i, word(16 * j + i, c));
                break;
              }
            }
          }
      }
      const int64_t g = per_channel ? 0 : kb;
      float* sc = reinterpret_cast<float*>(codes + cb);
      int32_t* of = f.zero_point ? reinterpret_cast<int32_t*>(codes + cb + NB * 4) : nullptr;
      for (int64_t nl = 0; nl < NB; ++nl) {
        const int64_t r = b * NB + nl;
        sc[nl] = nl < rows ? scale[r * ngroups + g] : 0.0f;
        if (of) of[nl] = nl < rows ? f.offset + zero[r * ngroups + g] : 0;
      }
    }
  }
  return 0;
}

int32_t lowbit_qunpack(int32_t wfmt, const uint8_t* packed, int64_t n, int64_t k,
                       int64_t kblock, int8_t* q, int64_t ldq) {
  int64_t kbb, nbb, nkb;
  const int64_t total = lowbit_qpack_layout(wfmt, n, k, kblock, &kbb, &nbb, &nkb);
  if (total < 0) return int32_t(total);
  if (!packed || !q) return -LOWBIT_E_UNSUPPORTED;
  if (ldq < k) return -LOWBIT_E_LEADING_DIM;
  Format f{};
  format_of(wfmt, &f);
  const int mask = (1 << f.bits) - 1;
  for (int64_t r = 0; r < n; ++r) {
    const uint8_t* nblock = packed + (r / NB) * nbb;
    for (int64_t c = 0; c < k; ++c) {
      int64_t byte;
      int shift;
      code_position(f.bits, r % NB, c % kblock, &byte, &shift);
      const int u = (nblock[(c / kblock) * kbb + byte] >> shift) & mask;
      q[r * ldq + c] = int8_t(f.a * u - f.offset);
    }
  }
  return 0;
}

}  // extern "C"
