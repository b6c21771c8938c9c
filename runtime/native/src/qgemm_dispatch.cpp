// Dispatch / invoke for the low-bit BRGEMM tiles, the activation quantizer entry point and
// the whole-layer convenience entry. Dispatch validates a tile description once and
// publishes it in the kernel table (handle_table.h: a repeated description is a lock-free
// hash probe); invoke only looks the handle up.
#include <stdlib.h>
#include <string.h>

#include <atomic>

#include "handle_table.h"
#include "qgemm_internal.h"

using namespace lowbit::q;

namespace {

constexpr int64_t kMaxInt8KBlock = 65536;

// Everything a tile depends on; equal keys get equal handles.
constexpr int kKeyWords = 15;
struct Entry {
  int64_t key[kKeyWords];
  Desc desc;
};
lowbit::HandleTable<Entry, kKeyWords> g_table;

constexpr int32_t kKnownFlags =
    LOWBIT_QF_BETA1 | LOWBIT_QF_BIAS | LOWBIT_QF_ASCALE_PER_BLOCK | LOWBIT_QF_ACT_MASK;

TileFn tile_for(int32_t isa) {
  switch (isa) {
    case LOWBIT_ISA_AMX: return tile_amx;
    case LOWBIT_ISA_AVX512: return tile_avx512;
    case LOWBIT_ISA_AVX2: return tile_avx2;
    default: return tile_scalar;
  }
}

// The AMX rule (docs/kernels.md "ISA selection", measured by benchmarks/amx.py): int8 tiles
// of at least this many rows and K-blocks of at least this many values run AMX. Rows: AMX
// ran 1.6-1.8x the AVX-512 tile at M = 8, 1.0-1.1x at M = 4, 0.3-0.6x at M = 1-2. K-blocks of
// 32 (int4 with groups of 32) ran 0.8-0.9x the AVX-512 tile: half of each 64-k TDPBSUD is
// padding and the per-block flush dominates.
std::atomic<int64_t> g_amx_min_rows{8};
std::atomic<int64_t> g_amx_min_kblock{64};
std::atomic<int64_t> g_amx_invocations{0};  // lowbit_qgemm_amx_invocations

// The panel rule (docs/kernels.md "ISA selection"): AVX-512 tiles of int8 activations x
// 1-/2-/4-bit codes with at least this many rows and K-blocks of at least this many values
// decode each n-block's codes once per pass into an L1 panel (qgemm_panel_avx512.cpp).
// Measured on a two-port Intel Xeon, one thread, against the register tiles: M = 128 per
// channel 1.1-1.3x for 1-/2-bit codes (80-95% of the vpdpbusd peak), 1.07-1.18x for 4-bit
// ones (K-blocks >= 256); M = 8-16 1.2x, M = 6 1.1x; K-blocks of 128 0.9-1.05x, of 32-64
// 0.75-0.9x (each K-block's flush goes through memory); 8-bit codes 0.76-0.86x (no decode
// to save), so they never take it. Past both thresholds, whether the panel pays on this CPU
// at all is measured once per code width (qgemm_panel_rule.cpp).
std::atomic<int64_t> g_panel_min_rows{8};
std::atomic<int64_t> g_panel_min_kblock{256};
std::atomic<int64_t> g_panel_invocations{0};  // lowbit_qgemm_panel_invocations

// A rule threshold's C entry point: sets it when value > 0 and returns the previous value;
// value <= 0 only returns it.
int64_t threshold(std::atomic<int64_t>& t, int64_t value) {
  return value > 0 ? t.exchange(value) : t.load();
}

int elem_size(int32_t t) { return t == LOWBIT_QT_INT8 ? 1 : t == LOWBIT_QT_F32 ? 4 : 2; }

}  // namespace

extern "C" {

int64_t lowbit_qgemm_dispatch(int32_t wfmt, int32_t atype, int32_t ctype, int64_t m, int64_t n,
                              int64_t kblock, int64_t lda, int64_t ldb, int64_t ldc,
                              int64_t stride_a, int64_t stride_b, int64_t ld_aux,
                              int32_t flags) {
  int32_t isa = lowbit_rt_isa();
  // AMX tiles take int8 activations and pay off from 8 rows and 64-value K-blocks (g_amx_min_*);
  // the rest of an AMX CPU's tiles run AVX-512, and their handles say so.
  if (isa == LOWBIT_ISA_AMX &&
      (atype != LOWBIT_QT_INT8 || m < g_amx_min_rows.load(std::memory_order_relaxed) ||
       kblock < g_amx_min_kblock.load(std::memory_order_relaxed)))
    isa = LOWBIT_ISA_AVX512;
  Format f{};
  const bool known_format = format_of(wfmt, &f);
  const bool panel = isa == LOWBIT_ISA_AVX512 && atype == LOWBIT_QT_INT8 && known_format &&
                     f.bits <= 4 && m >= g_panel_min_rows.load(std::memory_order_relaxed) &&
                     kblock >= g_panel_min_kblock.load(std::memory_order_relaxed) &&
                     panel_pays_off(f.bits);
  const int64_t key[kKeyWords] = {wfmt, atype, ctype, m, n, kblock, lda, ldb,
                                  ldc, stride_a, stride_b, ld_aux, flags, isa, panel};
  // A repeated description (the common case: compiled code dispatches per call) is one
  // lock-free hash probe; only invalid descriptions are never in the table.
  if (const int64_t h = g_table.find(key)) return h;

  if (!known_format) return -LOWBIT_E_UNSUPPORTED;
  Desc d{};
  d.f = f;
  if (atype != LOWBIT_QT_INT8 && atype != LOWBIT_QT_F32 && atype != LOWBIT_QT_BF16)
    return -LOWBIT_E_UNSUPPORTED;
  if (ctype != LOWBIT_QT_F32 && ctype != LOWBIT_QT_BF16) return -LOWBIT_E_UNSUPPORTED;
  if (flags & ~kKnownFlags) return -LOWBIT_E_UNSUPPORTED;
  // One activation at most (they do not compose in the epilogue's fixed order).
  const int32_t act = flags & LOWBIT_QF_ACT_MASK;
  if (act & (act - 1)) return -LOWBIT_E_UNSUPPORTED;
  if ((flags & LOWBIT_QF_ASCALE_PER_BLOCK) && atype != LOWBIT_QT_INT8)
    return -LOWBIT_E_UNSUPPORTED;
  if (m <= 0 || n <= 0 || kblock <= 0 || ld_aux <= 0) return -LOWBIT_E_SHAPE;
  if (kblock % d.f.kg != 0) return -LOWBIT_E_ALIGNMENT;
  // int8 K-block sums must stay exact in int32 with the AVX-512 path's scaled codes.
  if (atype == LOWBIT_QT_INT8 && kblock > kMaxInt8KBlock) return -LOWBIT_E_SHAPE;
  if (lda < kblock || stride_a < kblock || ldc < n) return -LOWBIT_E_LEADING_DIM;
  if (stride_b < kblock_bytes(d.f, kblock)) return -LOWBIT_E_LEADING_DIM;
  if (n > NB && ldb < stride_b) return -LOWBIT_E_LEADING_DIM;

  d.wfmt = wfmt;
  d.atype = atype;
  d.ctype = ctype;
  d.flags = flags;
  d.isa = isa;
  d.panel = panel;
  d.m = m;
  d.n = n;
  d.kblock = kblock;
  d.lda = lda;
  d.ldb = ldb;
  d.ldc = ldc;
  d.stride_a = stride_a;
  d.stride_b = stride_b;
  d.ld_aux = ld_aux;
  return g_table.find_or_insert(key, [&] {
    Entry e;
    memcpy(e.key, key, sizeof(key));
    e.desc = d;
    return e;
  }, LOWBIT_E_TABLE_FULL);
}

int32_t lowbit_qgemm_invoke(int64_t handle, const void* a, int64_t a_off, const void* b,
                            int64_t b_off, void* c, int64_t c_off, const float* a_scale,
                            int64_t as_off, const int32_t* a_sum, int64_t sum_off,
                            const float* bias, int64_t bias_off, int64_t count) {
  const Entry* e = g_table.get(handle);
  if (!e) return -LOWBIT_E_UNSUPPORTED;
  const Desc& d = e->desc;
  if (count < 1 || (d.atype == LOWBIT_QT_INT8 && count > d.ld_aux)) return -LOWBIT_E_SHAPE;
  if ((count - 1) * d.stride_a + d.kblock > d.lda) return -LOWBIT_E_LEADING_DIM;
  if (!a || !b || !c) return -LOWBIT_E_UNSUPPORTED;
  if (d.atype == LOWBIT_QT_INT8 && (!a_scale || !a_sum)) return -LOWBIT_E_UNSUPPORTED;
  if ((d.flags & LOWBIT_QF_BIAS) && !bias) return -LOWBIT_E_UNSUPPORTED;
  Args args;
  args.a = static_cast<const char*>(a) + a_off * elem_size(d.atype);
  args.b = static_cast<const uint8_t*>(b) + b_off;
  args.c = static_cast<char*>(c) + c_off * elem_size(d.ctype);
  args.a_scale = a_scale ? a_scale + as_off : nullptr;
  args.a_sum = a_sum ? a_sum + sum_off : nullptr;
  args.bias = bias ? bias + bias_off : nullptr;
  args.count = count;
  if (d.isa == LOWBIT_ISA_AMX) g_amx_invocations.fetch_add(1, std::memory_order_relaxed);
  if (d.panel) g_panel_invocations.fetch_add(1, std::memory_order_relaxed);
  tile_for(d.isa)(d, args);
  return 0;
}

int64_t lowbit_qgemm_amx_min_rows(int64_t rows) { return threshold(g_amx_min_rows, rows); }

int64_t lowbit_qgemm_amx_invocations(void) { return g_amx_invocations.load(std::memory_order_relaxed); }

int64_t lowbit_qgemm_panel_min_rows(int64_t rows) { return threshold(g_panel_min_rows, rows); }

int64_t lowbit_qgemm_panel_min_kblock(int64_t kblock) { return threshold(g_panel_min_kblock, kblock); }

int64_t lowbit_qgemm_panel_invocations(void) {
  return g_panel_invocations.load(std::memory_order_relaxed);
}

int64_t lowbit_qgemm_amx_min_kblock(int64_t kblock) { return threshold(g_amx_min_kblock, kblock); }

const char* lowbit_qgemm_handle_isa(int64_t handle) {
  const Entry* e = g_table.get(handle);
  return e ? lowbit_rt_isa_name(e->desc.isa) : "invalid";
}

int64_t lowbit_qgemm_act_stride(int64_t kp) {
  if (kp <= 0) return 0;
  const int64_t lines = (kp + 63) / 64;
  return (lines | 1) * 64;
}

int32_t lowbit_qquant_act(int32_t xtype, const void* x, int64_t m, int64_t k, int64_t ldx,
                          int64_t kblock, int32_t flags, int8_t* xq, int64_t ldq, float* scale,
                          int32_t* rowsum, int64_t ld_aux) {
  if (xtype != LOWBIT_QT_F32 && xtype != LOWBIT_QT_BF16) return -LOWBIT_E_UNSUPPORTED;
  if (flags & ~(LOWBIT_QF_ASCALE_PER_BLOCK | LOWBIT_QF_AUNIT)) return -LOWBIT_E_UNSUPPORTED;
  if ((flags & LOWBIT_QF_AUNIT) && (flags & LOWBIT_QF_ASCALE_PER_BLOCK)) return -LOWBIT_E_UNSUPPORTED;
  if (m < 0 || k <= 0 || kblock <= 0) return -LOWBIT_E_SHAPE;
  if (kblock % 4 != 0) return -LOWBIT_E_ALIGNMENT;
  const int64_t nkb = (k + kblock - 1) / kblock;
  if (ldx < k || ldq < nkb * kblock || ld_aux < nkb) return -LOWBIT_E_LEADING_DIM;
  // No tokens (a dynamic M of 0): nothing to read or write; the buffers of an empty tensor
  // may be null.
  if (m == 0) return 0;
  if (!x || !xq || !scale || !rowsum) return -LOWBIT_E_UNSUPPORTED;
  QuantArgs qa{xtype, flags, x, m, k, ldx, kblock, nkb, xq, ldq, scale, rowsum, ld_aux};
  if (lowbit_rt_isa() >= LOWBIT_ISA_AVX512)
    quant_act_avx512(qa);
  else
    quant_act_scalar(qa);
  return 0;
}

int32_t lowbit_qlinear(int32_t wfmt, const uint8_t* packed, int64_t n, int64_t k, int64_t kblock,
                       int32_t mode, int32_t xtype, const void* x, int64_t m, int64_t ldx,
                       const float* bias, int32_t ytype, void* y, int64_t ldy) {
  int64_t kbb, nbb, nkb;
  const int64_t total = lowbit_qpack_layout(wfmt, n, k, kblock, &kbb, &nbb, &nkb);
  if (total < 0) return int32_t(total);
  if (mode != LOWBIT_QT_INT8 && mode != LOWBIT_QT_F32) return -LOWBIT_E_UNSUPPORTED;
  if (xtype != LOWBIT_QT_F32 && xtype != LOWBIT_QT_BF16) return -LOWBIT_E_UNSUPPORTED;
  if (m < 0) return -LOWBIT_E_SHAPE;
  if (ldx < k || ldy < n) return -LOWBIT_E_LEADING_DIM;
  if (m == 0) return 0;  // no tokens: y is empty
  if (!packed || !x || !y) return -LOWBIT_E_UNSUPPORTED;
  const int64_t kp = nkb * kblock;
  const int32_t flags = bias ? LOWBIT_QF_BIAS : 0;

  if (mode == LOWBIT_QT_INT8) {
    const int64_t ldq = lowbit_qgemm_act_stride(kp);
    int8_t* xq = static_cast<int8_t*>(malloc(size_t(m * ldq)));
    float* sx = static_cast<float*>(malloc(size_t(m) * 4));
    int32_t* rs = static_cast<int32_t*>(malloc(size_t(m * nkb) * 4));
    int32_t rc = (xq && sx && rs) ? 0 : -LOWBIT_E_SHAPE;
    if (rc == 0) rc = lowbit_qquant_act(xtype, x, m, k, ldx, kblock, 0, xq, ldq, sx, rs, nkb);
    int64_t h = 0;
    if (rc == 0)
      h = lowbit_qgemm_dispatch(wfmt, LOWBIT_QT_INT8, ytype, m, n, kblock, ldq, nbb, ldy, kblock,
                                kbb, nkb, flags);
    if (rc == 0 && h < 0) rc = int32_t(h);
    if (rc == 0) rc = lowbit_qgemm_invoke(h, xq, 0, packed, 0, y, 0, sx, 0, rs, 0, bias, 0, nkb);
    free(xq);
    free(sx);
    free(rs);
    return rc;
  }

  // Weight-only: the kernel reads whole K-blocks, so a K tail needs a zero-padded copy.
  const int es = xtype == LOWBIT_QT_F32 ? 4 : 2;
  const void* a = x;
  int64_t lda = ldx;
  char* padded = nullptr;
  if (kp != k || ldx < kp) {
    padded = static_cast<char*>(calloc(size_t(m * kp), size_t(es)));
    if (!padded) return -LOWBIT_E_SHAPE;
    for (int64_t r = 0; r < m; ++r)
      memcpy(padded + r * kp * es, static_cast<const char*>(x) + r * ldx * es, size_t(k * es));
    a = padded;
    lda = kp;
  }
  int32_t rc = 0;
  const int64_t h = lowbit_qgemm_dispatch(wfmt, xtype, ytype, m, n, kblock, lda, nbb, ldy, kblock,
                                          kbb, nkb, flags);
  if (h < 0) rc = int32_t(h);
  if (rc == 0) rc = lowbit_qgemm_invoke(h, a, 0, packed, 0, y, 0, nullptr, 0, nullptr, 0, bias, 0, nkb);
  free(padded);
  return rc;
}

}  // extern "C"
