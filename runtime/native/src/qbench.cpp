// A repeat loop around a dispatched low-bit tile, so benchmarks/microkernels.py times the
// kernel and not the ctypes call overhead.
#include "qgemm_internal.h"

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

}  // extern "C"
