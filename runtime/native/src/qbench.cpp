// Benchmark and stress helpers that must run as native loops: a repeat loop around a
// dispatched low-bit tile (benchmarks/microkernels.py times the kernel, not ctypes), and
// dispatch loops for the per-call cost and thread-safety of the kernel table.
#include <time.h>

#include "lowbit/brgemm.h"
#include "qgemm_internal.h"

namespace {

int64_t now_ns() {
  timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return int64_t(ts.tv_sec) * 1000000000 + ts.tv_nsec;
}

// desc: 13 words (qgemm: wfmt atype ctype m n kblock lda ldb ldc stride_a stride_b ld_aux flags;
// brgemm: dtype m n k lda ldb ldc stride_a stride_b flags, the rest ignored).
int64_t dispatch_desc(int32_t kind, const int64_t* v) {
  if (kind == 0)
    return lowbit_qgemm_dispatch(int32_t(v[0]), int32_t(v[1]), int32_t(v[2]), v[3], v[4], v[5],
                                 v[6], v[7], v[8], v[9], v[10], v[11], int32_t(v[12]));
  return lowbit_brgemm_dispatch(int32_t(v[0]), v[1], v[2], v[3], v[4], v[5], v[6], v[7], v[8], v[9]);
}

}  // namespace

extern "C" {

// Invokes a dispatched tile `reps` times on the same operands (L1/L2-resident benchmarks).
LOWBIT_API int32_t lowbit_qbench_tile(int64_t handle, const void* a, const void* b, void* c,
                                      const float* a_scale, const int32_t* a_sum,
                                      const float* bias, int64_t count, int64_t reps) {
  for (int64_t r = 0; r < reps; ++r) {
    const int32_t rc = lowbit_qgemm_invoke(handle, a, 0, b, 0, c, 0, a_scale, 0, a_sum, 0, bias,
                                           0, count);
    if (rc != 0) return rc;
  }
  return 0;
}

// Dispatches the `n` descriptions of `descs` ([n][13], see dispatch_desc; kind 0 = qgemm,
// 1 = brgemm) `rounds` times, in a rotated order per round. Round 0 writes each handle to
// handles[i]; later rounds check they get the same one. Returns the elapsed nanoseconds of
// rounds 1.. (repeated dispatches only), -1 if a handle changed, or the first dispatch error.
LOWBIT_API int64_t lowbit_qbench_dispatch(int32_t kind, const int64_t* descs, int64_t n,
                                          int64_t rounds, int64_t* handles) {
  int64_t t0 = 0;
  for (int64_t r = 0; r < rounds; ++r) {
    if (r == 1) t0 = now_ns();
    for (int64_t j = 0; j < n; ++j) {
      const int64_t i = (j + r) % n;
      const int64_t h = dispatch_desc(kind, descs + 13 * i);
      if (h < 0) return h;
      if (r == 0) handles[i] = h;
      else if (handles[i] != h) return -1;
    }
  }
  return rounds > 1 ? now_ns() - t0 : 0;
}

}  // extern "C"
