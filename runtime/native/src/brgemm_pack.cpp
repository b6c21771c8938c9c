// Packing of a constant B operand into the BRGEMM panel layout (see lowbit/brgemm.h).
// Runs once per weight at compile time, so it is plain portable code.
#include "brgemm_internal.h"

namespace {

constexpr int64_t NB = LOWBIT_BRGEMM_NB;

int64_t padded_k(int32_t dtype, int64_t k) { return dtype == LOWBIT_DTYPE_BF16 ? (k + 1) / 2 * 2 : k; }

// out index of element (kk, col) of a packed [k x n] matrix.
inline int64_t packed_index(bool bf16, int64_t kp, int64_t kk, int64_t col) {
  const int64_t panel = (col / NB) * kp * NB, j = col % NB;
  return bf16 ? panel + (kk / 2) * 2 * NB + 2 * j + (kk % 2) : panel + kk * NB + j;
}

template <class T>
void pack(bool bf16, const T* b, int64_t k, int64_t n, int64_t ldb, bool transposed, T* out, int64_t kp) {
  const int64_t panels = (n + NB - 1) / NB;
  for (int64_t i = 0; i < panels * kp * NB; ++i) out[i] = T(0);
  if (transposed) {  // b is [n x k]: read rows of B^T contiguously
    for (int64_t col = 0; col < n; ++col)
      for (int64_t kk = 0; kk < k; ++kk) out[packed_index(bf16, kp, kk, col)] = b[col * ldb + kk];
  } else {
    for (int64_t kk = 0; kk < k; ++kk)
      for (int64_t col = 0; col < n; ++col) out[packed_index(bf16, kp, kk, col)] = b[kk * ldb + col];
  }
}

}  // namespace

extern "C" {

int64_t lowbit_brgemm_packed_size(int32_t dtype, int64_t k, int64_t n) {
  if (dtype != LOWBIT_DTYPE_F32 && dtype != LOWBIT_DTYPE_BF16) return -LOWBIT_E_UNSUPPORTED;
  if (k <= 0 || n <= 0) return -LOWBIT_E_SHAPE;
  return (n + NB - 1) / NB * NB * padded_k(dtype, k);
}

int32_t lowbit_brgemm_pack_b(int32_t dtype, const void* b, int64_t k, int64_t n, int64_t ldb, int32_t transposed,
                             void* out, int64_t out_elems) {
  const int64_t size = lowbit_brgemm_packed_size(dtype, k, n);
  if (size < 0) return int32_t(size);
  if (ldb < (transposed ? k : n)) return -LOWBIT_E_LEADING_DIM;
  if (out_elems < size) return -LOWBIT_E_SHAPE;
  const int64_t kp = padded_k(dtype, k);
  if (dtype == LOWBIT_DTYPE_F32)
    pack(false, static_cast<const float*>(b), k, n, ldb, transposed, static_cast<float*>(out), kp);
  else
    pack(true, static_cast<const uint16_t*>(b), k, n, ldb, transposed, static_cast<uint16_t*>(out), kp);
  return 0;
}

}  // extern "C"
