/* lowbit dense BRGEMM: batch-reduce GEMM microkernels for fp32 and bf16.
 *
 *   C[m x n] (+)= sum_{i < batch} A_i[m x k] * B_i[k x n]
 *   A_i = A + a_offset + i * stride_a      (row-major, leading dimension lda)
 *   B_i = B + b_offset + i * stride_b      (row-major with ldb, or packed, see below)
 *   C   = C + c_offset                     (row-major, leading dimension ldc)
 *
 * Offsets, strides and leading dimensions are in elements of the operand's type.
 * Accumulation is always fp32; a bf16 C is rounded (nearest-even) once, at the end.
 *
 * Packed B (LOWBIT_BRGEMM_B_PACKED). lowbit_brgemm_pack_b turns a [K x N] matrix into
 * panels of LOWBIT_BRGEMM_NB columns. With kp = K for fp32 and kp = round_up(K, 2) for bf16:
 *   panel j (columns [j*NB, j*NB + NB)) starts at element j * kp * NB and is contiguous;
 *   fp32: element (k, n) of the panel is at  k * NB + n
 *   bf16: element (k, n) of the panel is at  (k / 2) * 2 * NB + 2 * n + (k % 2)   (VNNI2)
 * Padding columns (N tail) and the padding row (odd K, bf16) are zero. So the packed block
 * for output columns [n0, n0 + w), n0 a multiple of NB, starts at element n0 * kp, and the
 * block for rows [k0, k0 + kb) of it (k0 even for bf16) at n0 * kp + k0 * NB.
 * For a packed B the dispatch's `ldb` is the panel stride (kp * NB for a whole packed matrix).
 */
#ifndef LOWBIT_BRGEMM_H
#define LOWBIT_BRGEMM_H

#include <stdint.h>

#include "lowbit/runtime.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Element types of A and B (C is fp32 unless LOWBIT_BRGEMM_C_BF16). */
enum {
  LOWBIT_DTYPE_F32 = 1,
  LOWBIT_DTYPE_BF16 = 2,
};

/* Dispatch flags. */
enum {
  LOWBIT_BRGEMM_BETA_0 = 1 << 0,   /* C = sum (C is not read); default: C += sum */
  LOWBIT_BRGEMM_B_PACKED = 1 << 1, /* B in the panel layout of lowbit_brgemm_pack_b */
  LOWBIT_BRGEMM_C_BF16 = 1 << 2,   /* C is bf16 (bf16 inputs only) */
};
#define LOWBIT_BRGEMM_FLAGS_ALL (LOWBIT_BRGEMM_BETA_0 | LOWBIT_BRGEMM_B_PACKED | LOWBIT_BRGEMM_C_BF16)

/* Column panel width of the packed B layout (same for every ISA and dtype). */
#define LOWBIT_BRGEMM_NB 32

/* Validates a kernel description and returns a handle (> 0) or -LOWBIT_E*:
 * UNSUPPORTED (dtype, flags), SHAPE (m, n or k <= 0), LEADING_DIM (lda < k, ldc < n,
 * ldb < n or, packed, ldb < kp * NB or not a multiple of NB), ALIGNMENT (negative batch
 * stride; for packed B a stride_b that is not a multiple of NB (fp32) or 2 * NB (bf16)),
 * TABLE_FULL. Pure: equal descriptions return equal handles. The ISA is fixed at dispatch. */
LOWBIT_API int64_t lowbit_brgemm_dispatch(int32_t dtype, int64_t m, int64_t n, int64_t k,
                                          int64_t lda, int64_t ldb, int64_t ldc,
                                          int64_t stride_a, int64_t stride_b, int64_t flags);

/* Runs a dispatched kernel over `batch` (>= 1) pairs. Returns 0, or -LOWBIT_E_UNSUPPORTED
 * for an unknown handle, -LOWBIT_E_SHAPE for batch < 1 (nothing is written then). */
LOWBIT_API int32_t lowbit_brgemm_invoke(int64_t handle, const void* a, int64_t a_offset,
                                        const void* b, int64_t b_offset, void* c,
                                        int64_t c_offset, int64_t batch);

/* Number of elements of the packed layout of a [k x n] B (or -LOWBIT_E*). */
LOWBIT_API int64_t lowbit_brgemm_packed_size(int32_t dtype, int64_t k, int64_t n);

/* Packs B into `out` (`out_elems` elements, at least lowbit_brgemm_packed_size). B is
 * [k x n] row-major with leading dimension ldb, or, with `transposed` != 0, stored as
 * [n x k] row-major (B^T, e.g. a torch Linear weight) with leading dimension ldb.
 * Returns 0 or -LOWBIT_E*. */
LOWBIT_API int32_t lowbit_brgemm_pack_b(int32_t dtype, const void* b, int64_t k, int64_t n,
                                        int64_t ldb, int32_t transposed, void* out,
                                        int64_t out_elems);

/* The ISA a dispatched kernel runs (LOWBIT_ISA_*), and whether bf16 runs on native
 * dot-product instructions (AVX512_BF16) on this CPU. With the AMX ISA, bf16 descriptions of
 * at least lowbit_brgemm_amx_min_rows() rows and lowbit_brgemm_amx_min_k() k run the
 * AMX-BF16 tiles (LOWBIT_ISA_AMX); fp32 and smaller ones run AVX-512. */
LOWBIT_API int32_t lowbit_brgemm_isa(int64_t handle);
LOWBIT_API int32_t lowbit_brgemm_has_native_bf16(void);

/* The AMX rule's thresholds: a value > 0 sets it (descriptions dispatched later follow it),
 * 0 only reads it; returns the previous value. */
LOWBIT_API int64_t lowbit_brgemm_amx_min_rows(int64_t rows);
LOWBIT_API int64_t lowbit_brgemm_amx_min_k(int64_t k);
/* Invocations that ran the AMX tiles so far (all threads): tests check that compiled code
 * reaches them. */
LOWBIT_API int64_t lowbit_brgemm_amx_invocations(void);

#ifdef __cplusplus
}
#endif
#endif
