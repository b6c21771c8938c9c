/* lowbit fused attention: softmax(scale * Q K^T + mask) V without materialized scores.
 *
 * One call computes the heads [bh_begin, bh_end) of the flattened (batch, head) index
 * (bh = b * H + h); compiled code runs disjoint ranges on OpenMP threads (scf.forall),
 * the kernel itself is single-threaded like every other runtime kernel.
 *
 * Layouts (all contiguous, row-major):
 *   q, out  [B, H,   T, D]
 *   k, v    [B, Hkv, S, D]   (GQA: head h reads kv head h / (H / Hkv))
 *   mask    bool bytes (0 / non-zero) of sizes [mb, mh, mt, ms], each 1 (broadcast) or equal
 *           to B / H / T / S; NULL for no mask. Laid out contiguously in those sizes.
 * dtype is LOWBIT_ATTN_F32 or LOWBIT_ATTN_BF16 for q, k, v and out alike; scores, softmax
 * and the P.V accumulation are fp32 (online softmax over key blocks, FlashAttention-style),
 * the output is rounded once.
 * Flags: LOWBIT_ATTN_CAUSAL keeps key s for query t only when s <= t (top-left aligned, as
 * F.scaled_dot_product_attention(is_causal=True)); it combines (AND) with a mask.
 * A block of keys that no query of the current query block may see is skipped without
 * reading K or V (decode at position p reads p + 1 cache rows, not S). A query whose keys
 * are all masked gets a zero row, as eager scaled_dot_product_attention on CPU returns.
 * Returns 0, or -LOWBIT_E_SHAPE / -LOWBIT_E_UNSUPPORTED for invalid arguments.
 * Pointers are passed as int64 (what compiled code extracts from memrefs). */
#ifndef LOWBIT_ATTENTION_H
#define LOWBIT_ATTENTION_H

#include <stdint.h>

#include "lowbit/runtime.h"

#ifdef __cplusplus
extern "C" {
#endif

enum {
  LOWBIT_ATTN_F32 = 2,  /* same codes as LOWBIT_QT_F32 / LOWBIT_QT_BF16 */
  LOWBIT_ATTN_BF16 = 3,
};

enum {
  LOWBIT_ATTN_CAUSAL = 1,
};

LOWBIT_API int32_t lowbit_attention_invoke(int32_t dtype, int64_t q, int64_t k, int64_t v, int64_t mask,
                                           int64_t out, int64_t B, int64_t H, int64_t Hkv, int64_t T,
                                           int64_t S, int64_t D, int64_t mb, int64_t mh, int64_t mt,
                                           int64_t ms, float scale, int32_t flags, int64_t bh_begin,
                                           int64_t bh_end);

/* The ISA the last lowbit_attention_invoke used on this thread (for tests and reports). */
LOWBIT_API const char* lowbit_attention_last_isa(void);

#ifdef __cplusplus
}
#endif
#endif
