// Runs a recorded sequence of compiled entries (runtime/replay.py): one call from Python for a
// whole program instead of one per entry, or for a whole greedy decode.
#include <cmath>
#include <cstring>

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

// A mutated input written back after a compiled call (runtime/replay.py records it as an
// entry): args[0] -> destination, args[1] -> source, args[2] -> byte count (packed form).
extern "C" LOWBIT_API void lowbit_rt_copy_entry(void** args) {
  std::memmove(*static_cast<void**>(args[0]), *static_cast<void**>(args[1]),
               size_t(*static_cast<int64_t*>(args[2])));
}

namespace {

float logit_at(const void* logits, bool bf16, int64_t i) {
  if (!bf16) return static_cast<const float*>(logits)[i];
  const uint32_t bits = uint32_t(static_cast<const uint16_t*>(logits)[i]) << 16;
  float v;
  std::memcpy(&v, &bits, 4);
  return v;
}

// torch.argmax: the first maximum; a NaN is larger than everything (the first NaN wins).
int64_t argmax(const void* logits, bool bf16, int64_t vocab) {
  int64_t best = 0;
  float bv = logit_at(logits, bf16, 0);
  if (std::isnan(bv)) return 0;
  for (int64_t i = 1; i < vocab; ++i) {
    const float v = logit_at(logits, bf16, i);
    if (std::isnan(v)) return i;
    if (v > bv) {
      bv = v;
      best = i;
    }
  }
  return best;
}

}  // namespace

extern "C" LOWBIT_API int64_t lowbit_rt_decode_calls(int64_t n, void* const* fns, void* const* args,
                                                     int32_t* const* flags, int64_t steps,
                                                     int64_t* token, int64_t* pos, const void* logits,
                                                     int32_t logits_bf16, int64_t vocab,
                                                     int64_t* tokens_out, lowbit_token_fn on_token,
                                                     int64_t* trapped) {
  *trapped = -1;
  for (int64_t s = 0; s < steps; ++s) {
    const int64_t bad = lowbit_rt_run_calls(n, fns, args, flags);
    if (bad >= 0) {
      *trapped = bad;
      return s;
    }
    const int64_t t = argmax(logits, logits_bf16 != 0, vocab);
    tokens_out[s] = t;
    *token = t;
    *pos += 1;
    if (on_token && on_token(t) != 0) return s + 1;
  }
  return steps;
}
