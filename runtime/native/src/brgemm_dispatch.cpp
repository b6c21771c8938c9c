// BRGEMM dispatch (validate a description, pick the ISA's kernel, hand out a handle) and
// invoke (look the handle up and run it). Handles index the kernel table of handle_table.h:
// entries are immutable once published, so invoke and repeated dispatches read without a lock.
#include <cpuid.h>

#include <string.h>

#include <atomic>

#include "brgemm_internal.h"
#include "handle_table.h"

namespace {

using lowbit_brgemm::Desc;
using lowbit_brgemm::KernelFn;

constexpr int kKeyWords = 11;
struct Entry {
  int64_t key[kKeyWords];  // the requested description (ISA before any bf16 fallback)
  Desc desc;
  KernelFn fn;
};
lowbit::HandleTable<Entry, kKeyWords> g_table;

bool cpu_has_avx512_bf16() {
  unsigned a, b, c, d;
  if (__get_cpuid_max(0, nullptr) < 7) return false;
  __cpuid_count(7, 1, a, b, c, d);
  return a & (1u << 5);
}

const Entry* lookup(int64_t handle) { return g_table.get(handle); }

// The AMX rule (docs/kernels.md "ISA selection", measured by benchmarks/amx_dense.py with AMX
// forced at every size, 2048 x 2048 B): bf16 descriptions of at least this many rows and this k
// run the AMX-BF16 tiles; fp32 and smaller ones run AVX-512. Rows: AMX ran 1.0x the AVX-512
// tile at M = 1, 1.0-1.2x at M = 2 (three runs), 1.35-1.5x at M = 4, 4x at M = 16 (vdpbf16ps
// is slow here: ~43 GMAC/s per core); M = 2-3 stay on AVX-512 for the small and unsteady gain
// (the sweep's B is L3-resident, a decode GEMV's streams from memory). k at M = 128: 0.6x at
// k = 2, 0.7-0.8x at 8, 1.25x at 16, 2.5x at 32 (a 32-k step is padded with zeros).
std::atomic<int64_t> g_amx_min_rows{4};
std::atomic<int64_t> g_amx_min_k{16};
std::atomic<int64_t> g_amx_invocations{0};  // lowbit_brgemm_amx_invocations

bool amx_bf16_granted() {
  // LOWBIT_ISA_AMX means the tile state was granted (cpu.cpp); the BF16 tiles are a CPUID bit of their own.
  static const bool has = lowbit_rt_cpu_features() & LOWBIT_CPU_AMX_BF16;
  return has && lowbit_rt_isa_supported(LOWBIT_ISA_AMX);
}

int64_t validate(const Desc& d) {
  if (d.dtype != LOWBIT_DTYPE_F32 && d.dtype != LOWBIT_DTYPE_BF16) return -LOWBIT_E_UNSUPPORTED;
  if (d.flags & ~int64_t(LOWBIT_BRGEMM_FLAGS_ALL)) return -LOWBIT_E_UNSUPPORTED;
  if (d.c_bf16() && !d.bf16()) return -LOWBIT_E_UNSUPPORTED;
  if (d.m <= 0 || d.n <= 0 || d.k <= 0) return -LOWBIT_E_SHAPE;
  if (d.stride_a < 0 || d.stride_b < 0) return -LOWBIT_E_SHAPE;
  if (d.lda < d.k || d.ldc < d.n) return -LOWBIT_E_LEADING_DIM;
  if (d.packed()) {
    const int64_t row = d.bf16() ? 2 * LOWBIT_BRGEMM_NB : LOWBIT_BRGEMM_NB;
    const int64_t kp = d.bf16() ? (d.k + 1) / 2 * 2 : d.k;
    if (d.ldb < kp * LOWBIT_BRGEMM_NB) return -LOWBIT_E_LEADING_DIM;
    if (d.ldb % row != 0 || d.stride_b % row != 0) return -LOWBIT_E_ALIGNMENT;
  } else if (d.ldb < d.n) {
    return -LOWBIT_E_LEADING_DIM;
  }
  return LOWBIT_OK;
}

}  // namespace

extern "C" {

int32_t lowbit_brgemm_has_native_bf16(void) {
  static const bool has = cpu_has_avx512_bf16();
  return has && lowbit_rt_isa_supported(LOWBIT_ISA_AVX512);
}

int64_t lowbit_brgemm_dispatch(int32_t dtype, int64_t m, int64_t n, int64_t k, int64_t lda, int64_t ldb,
                               int64_t ldc, int64_t stride_a, int64_t stride_b, int64_t flags) {
  int32_t isa = lowbit_rt_isa();
  if (isa == LOWBIT_ISA_AMX &&
      (dtype != LOWBIT_DTYPE_BF16 || !amx_bf16_granted() ||
       m < g_amx_min_rows.load(std::memory_order_relaxed) || k < g_amx_min_k.load(std::memory_order_relaxed)))
    isa = LOWBIT_ISA_AVX512;
  const int64_t key[kKeyWords] = {dtype, m, n, k, lda, ldb, ldc, stride_a, stride_b, flags, isa};
  // Repeated descriptions (compiled code dispatching per call) are a lock-free hash probe.
  if (const int64_t h = g_table.find(key)) return h;
  Desc d{dtype, m, n, k, lda, ldb, ldc, stride_a, stride_b, flags, isa};
  if (const int64_t err = validate(d)) return err;
  // bf16 on an AVX-512 CPU without vdpbf16ps: widen to fp32 on the AVX2 path.
  if (d.isa == LOWBIT_ISA_AVX512 && d.bf16() && !lowbit_brgemm_has_native_bf16()) d.isa = LOWBIT_ISA_AVX2;
  KernelFn fn = d.isa == LOWBIT_ISA_AMX    ? lowbit_brgemm::select_amx(d)
              : d.isa == LOWBIT_ISA_AVX512 ? lowbit_brgemm::select_avx512(d)
              : d.isa == LOWBIT_ISA_AVX2   ? lowbit_brgemm::select_avx2(d)
                                           : lowbit_brgemm::select_scalar(d);
  if (!fn) return -LOWBIT_E_UNSUPPORTED;
  return g_table.find_or_insert(key, [&] {
    Entry e;
    memcpy(e.key, key, sizeof(key));
    e.desc = d;
    e.fn = fn;
    return e;
  }, LOWBIT_E_TABLE_FULL);
}

int32_t lowbit_brgemm_invoke(int64_t handle, const void* a, int64_t a_offset, const void* b, int64_t b_offset,
                             void* c, int64_t c_offset, int64_t batch) {
  const Entry* e = lookup(handle);
  if (!e) return -LOWBIT_E_UNSUPPORTED;
  if (batch < 1) return -LOWBIT_E_SHAPE;
  const Desc& d = e->desc;
  const int64_t ab = d.bf16() ? 2 : 4, cb = d.c_bf16() ? 2 : 4;
  if (d.isa == LOWBIT_ISA_AMX) g_amx_invocations.fetch_add(1, std::memory_order_relaxed);
  e->fn(d, static_cast<const char*>(a) + a_offset * ab, static_cast<const char*>(b) + b_offset * ab,
        static_cast<char*>(c) + c_offset * cb, batch);
  return 0;
}

int32_t lowbit_brgemm_isa(int64_t handle) {
  const Entry* e = lookup(handle);
  return e ? e->desc.isa : -LOWBIT_E_UNSUPPORTED;
}

int64_t lowbit_brgemm_amx_min_rows(int64_t rows) {
  if (rows > 0) return g_amx_min_rows.exchange(rows);
  return g_amx_min_rows.load();
}

int64_t lowbit_brgemm_amx_min_k(int64_t k) {
  if (k > 0) return g_amx_min_k.exchange(k);
  return g_amx_min_k.load();
}

int64_t lowbit_brgemm_amx_invocations(void) { return g_amx_invocations.load(std::memory_order_relaxed); }

}  // extern "C"
