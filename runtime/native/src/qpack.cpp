// Weight packing for the low-bit kernels: integer codes q[N][K] -> the blocked layout
// described in lowbit/qgemm.h and docs/kernels.md. Runs at compile time, so it favours
// clarity and full validation over speed.
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
  for (int64_t r = 0; r < n; ++r) {
    for (int64_t c = 0; c < k; ++c) {
      const int v = q[r * ldq + c];
      if (v < f.qmin || v > f.qmax || (f.bits == 1 && v == 0)) return -LOWBIT_E_QRANGE;
    }
    if (zero)
      for (int64_t g = 0; g < ngroups; ++g) {
        const int z = zero[r * ngroups + g];
        if (z < 0 || z > f.qmax) return -LOWBIT_E_QRANGE;
      }
  }

  memset(out, 0, size_t(total));
  const int64_t cb = codes_bytes(f, kblock);
  for (int64_t r = 0; r < n; ++r) {
    const int64_t nl = r % NB;
    uint8_t* nblock = out + (r / NB) * nbb;
    for (int64_t c = 0; c < k; ++c) {
      const int64_t kb = c / kblock;
      const int u = (q[r * ldq + c] + f.offset) / f.a;
      int64_t byte;
      int shift;
      code_position(f.bits, nl, c % kblock, &byte, &shift);
      nblock[kb * kbb + byte] |= uint8_t(u << shift);
    }
    for (int64_t kb = 0; kb < nkb; ++kb) {
      const int64_t g = per_channel ? 0 : kb;
      float* s = reinterpret_cast<float*>(nblock + kb * kbb + cb);
      int32_t* off = reinterpret_cast<int32_t*>(nblock + kb * kbb + cb + NB * 4);
      s[nl] = scale[r * ngroups + g];
      off[nl] = f.offset + (zero ? zero[r * ngroups + g] : 0);
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
