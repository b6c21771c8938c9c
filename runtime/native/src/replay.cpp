// Runs a recorded sequence of compiled entries (runtime/replay.py): one call from Python for a
// whole program instead of one per entry.
#include "lowbit/runtime.h"

extern "C" LOWBIT_API int64_t lowbit_rt_run_calls(int64_t n, void* const* fns, void* const* args,
                                                  int32_t* const* flags) {
  for (int64_t i = 0; i < n; ++i) {
    int32_t* flag = flags[i];
    if (flag) *flag = 0;
    reinterpret_cast<void (*)(void**)>(fns[i])(static_cast<void**>(args[i]));
    if (flag && *flag) return i;
  }
  return -1;
}
