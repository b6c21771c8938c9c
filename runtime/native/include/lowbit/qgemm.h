/* lowbit low-bit microkernels: packed 1/2/4/8-bit weights x int8 / fp32 / bf16 activations.
 *
 * Semantics (docs/formats.md, docs/kernels.md): weights are integer codes q[N][K] with an
 * fp32 scale per (output row n, K-block) and, for the asymmetric formats, an integer zero
 * point z[n][K-block]:  W[n][k] = (q[n][k] - z[n][kb]) * s[n][kb].  The tile computes
 *
 *   v[m][n] = sum over batch i (one K-block each) of
 *               s_i[n] * as_i[m] * sum_k A_i[m][k] * (q_i[n][k] - z_i[n])   + bias[n]
 *   C[m][n] = [C_in[m][n] +] act(v[m][n])          (fp32, rounded once to C's type)
 *
 * with exact int32 integer sums for int8 activations (as = 1 / activation scale) and fp32
 * accumulation for fp32 / bf16 activations (weight-only quantization, as = 1).
 *
 * Packed weight layout ("qpack"), independent of the ISA chosen at run time:
 *   n-blocks of LOWBIT_QGEMM_NB = 64 output rows; n-block b starts at byte b * ldb.
 *   Inside an n-block, K is cut into K-blocks of `kblock` values (the scale group); K-block i
 *   starts at byte i * stride_b and holds
 *     codes   : kblock / KG steps of step_bytes(format) bytes (see docs/kernels.md),
 *     scales  : 64 x fp32   s[n][i]          (0 for padding rows),
 *     offsets : 64 x int32  c[n][i] = offset(format) + z[n][i], where the stored unsigned
 *               code u satisfies q = a*u - offset(format) (a = 2 for int1, else 1), so
 *               sum_k x*(q - z) = a * sum_k x*u - c * sum_k x  (vpdpbusd is u8 x s8).
 *   lowbit_qpack_layout() returns kblock_bytes (= stride_b) and nblock_bytes (= ldb).
 *
 * Conventions: *_dispatch is pure and returns a handle > 0 or -LOWBIT_E*; *_invoke runs it.
 */
#ifndef LOWBIT_QGEMM_H
#define LOWBIT_QGEMM_H

#include <stdint.h>

#include "lowbit/runtime.h"

#ifdef __cplusplus
extern "C" {
#endif

#define LOWBIT_QGEMM_NB 64 /* output rows (n) per packed n-block */

/* Error code (negated) of lowbit_qpack for a code or zero point outside the format's range. */
#define LOWBIT_E_QRANGE 32

/* Weight formats (integer code range of q). */
enum {
  LOWBIT_QW_TERNARY = 1,   /* q in {-1,0,1}, 2-bit storage */
  LOWBIT_QW_INT2_SYM = 2,  /* q in [-2,1] */
  LOWBIT_QW_INT2_ASYM = 3, /* q in [0,3] with integer zero point z in [0,3] */
  LOWBIT_QW_INT1 = 4,      /* q in {-1,+1} */
  LOWBIT_QW_INT4_SYM = 5,  /* q in [-8,7] */
  LOWBIT_QW_INT4_ASYM = 6, /* q in [0,15] with integer zero point z in [0,15] */
  LOWBIT_QW_INT8 = 7,      /* q in [-128,127] */
};

/* Activation (A) and output (C) element types. */
enum {
  LOWBIT_QT_INT8 = 1, /* A only: quantized activations (lowbit_qquant_act) */
  LOWBIT_QT_F32 = 2,
  LOWBIT_QT_BF16 = 3,
};

/* Dispatch flags.
 *
 * Epilogue order, per output element, all in fp32 and rounded once to C's type at the end:
 *
 *   v = sum_i (t_i * s_i[n] * as_i[m]) * as[m]     (scales and zero points, see above)
 *   v = v + bias[n]                                 LOWBIT_QF_BIAS
 *   v = act(v)                                      at most one LOWBIT_QF_ACT_*
 *   C = C_in + v   (LOWBIT_QF_BETA1)   or   C = v
 *
 * BETA1 reads C before writing it: for a residual add the caller first places the residual
 * in C (tpp/libxsmm beta = 1; the compiler makes the output buffer hold it). With a bf16 C,
 * C_in is widened to fp32 and the sum is rounded once, so BETA1 on a bf16 C is exact for a
 * residual but rounds per invoke when a K range is split over several BETA1 invokes.
 * The activations are non-linear: they are only correct when one invoke covers all
 * K-blocks of the layer (count = all of K); the kernel cannot check that (it does not know
 * the layer's K), so a caller that splits K must not request them.
 */
enum {
  LOWBIT_QF_BETA1 = 1 << 0,          /* C = C_in + result (fp32 or bf16 C); default C = result */
  LOWBIT_QF_BIAS = 1 << 1,           /* add bias[n] */
  LOWBIT_QF_ASCALE_PER_BLOCK = 1 << 2, /* int8 A: activation scale per (m, K-block), else per m */
  LOWBIT_QF_ACT_RELU = 1 << 3,       /* act(v) = max(v, 0) */
  LOWBIT_QF_ACT_SILU = 1 << 4,       /* act(v) = v * sigmoid(v) = v / (1 + exp(-v)), fp32 */
  LOWBIT_QF_ACT_RELU2 = 1 << 5,      /* act(v) = max(v, 0)^2 (squared ReLU) */
  LOWBIT_QF_AUNIT = 1 << 6,          /* lowbit_qquant_act only: x already holds int8 values (the
                                        model quantized it): scale 1, xq = x (act_format int8_unit) */
};
#define LOWBIT_QF_ACT_MASK (LOWBIT_QF_ACT_RELU | LOWBIT_QF_ACT_SILU | LOWBIT_QF_ACT_RELU2)

/* Packed size/geometry of an [n x k] weight in `kblock`-sized K-blocks.
 * Returns total bytes (> 0) or -LOWBIT_E*; fills the optional outputs. */
LOWBIT_API int64_t lowbit_qpack_layout(int32_t wfmt, int64_t n, int64_t k, int64_t kblock,
                                       int64_t* kblock_bytes, int64_t* nblock_bytes,
                                       int64_t* num_kblocks);

/* Pack integer codes q (int8, row n at q + n*ldq, k values) into `out`
 * (lowbit_qpack_layout bytes). `scale`: fp32 [n][ceil(k/group)] (group >= k: per channel;
 * the last group may be short). `zero`: int8, same shape, for the *_ASYM formats, else NULL.
 * kblock must equal group when group < k; per channel, any multiple of the format's K
 * granule works (the scale is repeated per K-block). Returns 0 or -LOWBIT_E* (-LOWBIT_E_QRANGE for out-of-range codes). */
LOWBIT_API int32_t lowbit_qpack(int32_t wfmt, const int8_t* q, int64_t n, int64_t k, int64_t ldq,
                                const float* scale, int64_t group, const int8_t* zero,
                                int64_t kblock, uint8_t* out);

/* Inverse of lowbit_qpack for the codes (tests, debugging): writes q[n][k] (ldq). */
LOWBIT_API int32_t lowbit_qunpack(int32_t wfmt, const uint8_t* packed, int64_t n, int64_t k,
                                  int64_t kblock, int8_t* q, int64_t ldq);

/* Dynamic int8 activation quantization (per token, or per (token, K-block)), fused with
 * the per-K-block row sums the kernels need for the zero-point / code-offset correction:
 *   s = 127 / max(amax, 1e-5)  (amax over the row, or over the K-block)
 *   s = 1 with LOWBIT_QF_AUNIT (per token only): x holds integers in [-128, 127] already
 *   xq[m][k] = clamp(round_half_even(x[m][k] * s), -128, 127), 0 for k in [k, nkb*kblock)
 *   rowsum[m][i] = sum of xq[m][k] over K-block i.
 * x: fp32 or bf16 [m][ldx]; xq: [m][ldq], ldq >= nkb*kblock (nkb = ceil(k/kblock));
 * scale: [m] (or [m][ld_aux] with LOWBIT_QF_ASCALE_PER_BLOCK); rowsum: [m][ld_aux].
 * m = 0 (no tokens) validates the other arguments and returns 0 without touching any buffer
 * (which may then be null).
 * NaN / Inf follow the eager op (docs/kernels.md "NaN and Inf"): a row (or K-block) whose
 * amax is NaN or +Inf gets scale NaN and rowsum 0, which every tile turns into a NaN output. */
LOWBIT_API int32_t lowbit_qquant_act(int32_t xtype, const void* x, int64_t m, int64_t k,
                                     int64_t ldx, int64_t kblock, int32_t flags, int8_t* xq,
                                     int64_t ldq, float* scale, int32_t* rowsum, int64_t ld_aux);

/* The row stride (bytes) to give int8 activations of nkb*kblock = kp values that the tiles
 * read: kp rounded up to an odd number of 64-byte lines. A stride of many lines times a power
 * of two (2048, 4096: every K of a real model) puts the 16 rows of an AMX A tile, and rows
 * further down, into the same few L1 sets; an odd number of lines spreads them over all sets
 * (AMX tiles reading rows in place 1.18-1.26x, the other paths unchanged). Depends on kp only,
 * not on the CPU, so compiled artifacts carry it as a constant. kp <= 0 returns 0. */
LOWBIT_API int64_t lowbit_qgemm_act_stride(int64_t kp);

/* Dispatch a BRGEMM tile: C[m x n] over `count` K-blocks of `kblock` values (count is given
 * at invoke time). Strides: lda, ldc in elements; stride_a in elements between the batch's
 * A blocks (usually kblock); ldb, stride_b in bytes (from lowbit_qpack_layout); ld_aux is the
 * row stride of the activation scale (per-block) and row-sum arrays (>= count).
 * Returns a handle > 0 or -LOWBIT_E*. The ISA is the one current at dispatch time. */
LOWBIT_API int64_t lowbit_qgemm_dispatch(int32_t wfmt, int32_t atype, int32_t ctype, int64_t m,
                                         int64_t n, int64_t kblock, int64_t lda, int64_t ldb,
                                         int64_t ldc, int64_t stride_a, int64_t stride_b,
                                         int64_t ld_aux, int32_t flags);

/* Run a dispatched tile. Offsets are in elements of each array's type (bytes for b).
 * a_scale / a_sum are only read for int8 A; bias only with LOWBIT_QF_BIAS; C is read
 * (C_in) only with LOWBIT_QF_BETA1.
 * Returns 0, or -LOWBIT_E_UNSUPPORTED for an unknown handle, -LOWBIT_E_SHAPE for count < 1. */
LOWBIT_API int32_t lowbit_qgemm_invoke(int64_t handle, const void* a, int64_t a_off,
                                       const void* b, int64_t b_off, void* c, int64_t c_off,
                                       const float* a_scale, int64_t as_off,
                                       const int32_t* a_sum, int64_t sum_off, const float* bias,
                                       int64_t bias_off, int64_t count);

/* Name of the ISA a handle runs ("scalar", "avx2", "avx512", "amx"). With the AMX ISA, tiles
 * of int8 activations, at least lowbit_qgemm_amx_min_rows() rows and K-blocks of at least
 * lowbit_qgemm_amx_min_kblock() values run AMX-INT8; the others run AVX-512 and say "avx512". */
LOWBIT_API const char* lowbit_qgemm_handle_isa(int64_t handle);

/* The AMX row threshold of later dispatches: sets it when rows > 0 and returns the previous
 * value; rows <= 0 only returns it. Handles dispatched before keep their path. */
LOWBIT_API int64_t lowbit_qgemm_amx_min_rows(int64_t rows);
/* The same for the K-block threshold (default 64). */
LOWBIT_API int64_t lowbit_qgemm_amx_min_kblock(int64_t kblock);

/* Number of AMX tile invocations in this process so far (tests and diagnostics: did compiled
 * code reach the AMX path?). */
LOWBIT_API int64_t lowbit_qgemm_amx_invocations(void);

/* AVX-512 tiles of int8 activations x 1-/2-/4-bit codes with at least this many rows (default
 * 8) and K-blocks of at least lowbit_qgemm_panel_min_kblock() values (default 256) decode the
 * codes once per pass into an L1 panel instead of once per 6 rows (same results, bit for bit).
 * Sets the threshold of later dispatches when rows > 0 and returns the previous value;
 * rows <= 0 only returns it. Handles dispatched before keep their path. */
LOWBIT_API int64_t lowbit_qgemm_panel_min_rows(int64_t rows);
/* The same for the K-block threshold. */
LOWBIT_API int64_t lowbit_qgemm_panel_min_kblock(int64_t kblock);
/* Number of invocations of panel tiles in this process so far. */
LOWBIT_API int64_t lowbit_qgemm_panel_invocations(void);

/* Whether a tile past both panel thresholds takes the panel. The panel pays where decoding
 * competes with vpdpbusd for the vector ports (two vpdpbusd ports, recent Intel) and may not
 * where it does not (one port, Zen 4), so by default (MEASURED) the first such dispatch per
 * code width (1, 2, 4 bits) times both tiles on one synthetic 128 x 192 x 1024 call, on the
 * calling thread (~2 ms, once per process), and takes the panel when it ran faster than the
 * register tiles (median of 9 back-to-back pairs). ALWAYS / NEVER skip the measurement. */
typedef enum {
  LOWBIT_PANEL_MEASURED = 0,
  LOWBIT_PANEL_ALWAYS = 1,
  LOWBIT_PANEL_NEVER = 2,
} lowbit_panel_rule_t;
/* Sets the rule of later dispatches when mode >= 0 and returns the previous one; mode < 0
 * only returns it; an unknown mode returns -LOWBIT_E_UNSUPPORTED and changes nothing. */
LOWBIT_API int32_t lowbit_qgemm_panel_rule(int32_t mode);
/* The measured panel / register tile speed ratio for codes of `bits` (1, 2 or 4), measured
 * now if this process has not yet; 0 when the process's ISA is below AVX-512 or bits is not
 * 1, 2 or 4; negative when the measurement could not allocate its operands. */
LOWBIT_API double lowbit_qgemm_panel_speedup(int32_t bits);

/* Whole layer, single-threaded on the calling thread: y[m][n] = x[m][k] @ W^T (+ bias).
 * mode LOWBIT_QT_INT8: quantize x per token to int8 (lowbit_qquant_act) and run the int8
 * kernels; mode LOWBIT_QT_F32: weight-only (fp32 accumulation of x against W).
 * x: fp32/bf16 [m][ldx]; y: fp32/bf16 [m][ldy]. m = 0 returns 0 and touches nothing. */
LOWBIT_API int32_t lowbit_qlinear(int32_t wfmt, const uint8_t* packed, int64_t n, int64_t k,
                                  int64_t kblock, int32_t mode, int32_t xtype, const void* x,
                                  int64_t m, int64_t ldx, const float* bias, int32_t ytype,
                                  void* y, int64_t ldy);

#ifdef __cplusplus
}
#endif
#endif
