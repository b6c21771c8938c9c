// Benchmark and stress helpers that must run as native loops: a repeat loop around a
// dispatched low-bit tile (benchmarks/microkernels.py times the kernel, not ctypes), and
// dispatch loops for the per-call cost and thread-safety of the kernel table.
#include <time.h>

#include <atomic>
#include <thread>
#include <vector>

#include "lowbit/brgemm.h"
#include "qgemm_internal.h"

namespace {

using lowbit::q::now_ns;

// desc: 13 words (qgemm: wfmt atype ctype m n kblock lda ldb ldc stride_a stride_b ld_aux flags;
// brgemm: dtype m n k lda ldb ldc stride_a stride_b flags, the rest ignored).
int64_t dispatch_desc(int32_t kind, const int64_t* v) {
  if (kind == 0)
    return lowbit_qgemm_dispatch(int32_t(v[0]), int32_t(v[1]), int32_t(v[2]), v[3], v[4], v[5],
                                 v[6], v[7], v[8], v[9], v[10], v[11], int32_t(v[12]));
  return lowbit_brgemm_dispatch(int32_t(v[0]), v[1], v[2], v[3], v[4], v[5], v[6], v[7], v[8], v[9]);
}

}  // namespace

extern "C" LOWBIT_API int64_t lowbit_qbench_peak_loop(int32_t kind, int64_t iters);
extern "C" LOWBIT_API int64_t lowbit_qbench_amx_loop(int32_t kind, int64_t iters);

namespace {

// A chain of 24 x iters dependent 1-cycle integer adds: its duration is the core clock.
// Register + register: Intel's Golden Cove cores fold `add $imm, reg` chains in the renamer
// (an immediate-add chain measured "8-14 GHz" on a Sapphire-Rapids-class Xeon).
int64_t clock_loop(int64_t iters) {
  int64_t x = 0, n = iters;
  const int64_t one = 1;
  __asm__ volatile(
      "test %[n], %[n]\n\t"
      "jle 2f\n\t"
      ".p2align 6\n\t"
      "1:\n\t"
      ".rept 24\n\t"
      "add %[one], %[x]\n\t"
      ".endr\n\t"
      "dec %[n]\n\t"
      "jnz 1b\n\t"
      "2:\n\t"
      : [x] "+r"(x), [n] "+r"(n)
      : [one] "r"(one)
      : "cc");
  return x;
}

// Sums 64-bit words of [p, p + bytes) `reps` times (the compiler vectorizes it).
uint64_t read_loop(const uint64_t* p, int64_t words, int64_t reps) {
  uint64_t s0 = 0, s1 = 0, s2 = 0, s3 = 0;
  for (int64_t r = 0; r < reps; ++r)
    for (int64_t i = 0; i + 4 <= words; i += 4) {
      s0 += p[i];
      s1 += p[i + 1];
      s2 += p[i + 2];
      s3 += p[i + 3];
    }
  return s0 ^ s1 ^ s2 ^ s3;
}

int64_t thread_cpu_ns() {
  timespec ts;
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
  return int64_t(ts.tv_sec) * 1000000000 + ts.tv_nsec;
}

// Runs work(t) on `threads` threads started together; returns the wall-clock nanoseconds
// from the common start to the last thread's end and, if cpu_ns is not null, each thread's
// CPU time of work(t) (which excludes time the thread was preempted on a shared machine).
template <class Work>
int64_t run_parallel(int32_t threads, int64_t* cpu_ns, Work work) {
  std::atomic<int> ready{0};
  std::atomic<bool> go{false};
  std::vector<std::thread> pool;
  for (int32_t t = 0; t < threads; ++t)
    pool.emplace_back([&, t] {
      ready.fetch_add(1);
      while (!go.load(std::memory_order_acquire)) {
      }
      const int64_t c0 = thread_cpu_ns();
      work(t);
      if (cpu_ns) cpu_ns[t] = thread_cpu_ns() - c0;
    });
  while (ready.load() < threads) {
  }
  const int64_t t0 = now_ns();
  go.store(true, std::memory_order_release);
  for (auto& th : pool) th.join();
  return now_ns() - t0;
}

std::atomic<uint64_t> g_sink{0};

}  // namespace

extern "C" {

// Wall-clock nanoseconds of `threads` threads each running `iters` iterations of peak loop
// `kind` (lowbit_qbench_peak_loop; kind 100 = the dependent-add clock loop); cpu_ns[t]
// (optional) gets each thread's CPU time. -1 for an unknown kind. The caller checks that
// the CPU has the instruction.
LOWBIT_API int64_t lowbit_qbench_peak(int32_t kind, int64_t iters, int32_t threads,
                                      int64_t* cpu_ns) {
  if (threads < 1 || (kind != 100 && (kind < 0 || kind > 6))) return -1;
  return run_parallel(threads, cpu_ns, [&](int32_t) {
    const int64_t v = kind == 100 ? clock_loop(iters)
                      : kind >= 5 ? lowbit_qbench_amx_loop(kind, iters)
                                  : lowbit_qbench_peak_loop(kind, iters);
    g_sink.fetch_add(uint64_t(v), std::memory_order_relaxed);
  });
}

// Wall-clock nanoseconds of `threads` threads reading `bytes` of `buf` (split evenly, each
// slice `reps` times). For a read-bandwidth probe the buffer must be far larger than the L3.
LOWBIT_API int64_t lowbit_qbench_read(const void* buf, int64_t bytes, int32_t threads,
                                      int64_t reps) {
  if (threads < 1 || bytes < 64 * threads) return -1;
  const int64_t words = bytes / 8 / threads / 64 * 64;
  const uint64_t* p = static_cast<const uint64_t*>(buf);
  return run_parallel(threads, nullptr, [&](int32_t t) {
    g_sink.fetch_add(read_loop(p + t * words, words, reps), std::memory_order_relaxed);
  });
}

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
