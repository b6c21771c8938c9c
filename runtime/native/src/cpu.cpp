// CPU feature detection and the run-time ISA choice.
#include "lowbit/runtime.h"

#include <cpuid.h>
#include <stdlib.h>
#include <string.h>

#include <atomic>

namespace {

struct Features {
  bool avx2 = false, fma = false, avx512f = false, avx512bw = false, avx512vl = false,
       avx512vnni = false, avx512vbmi = false, avx_vnni = false;
};

uint64_t xgetbv0() {
  uint32_t lo, hi;
  __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
  return (uint64_t(hi) << 32) | lo;
}

Features detect() {
  Features f;
  unsigned a, b, c, d;
  if (!__get_cpuid(1, &a, &b, &c, &d)) return f;
  const bool osxsave = c & (1u << 27);
  f.fma = c & (1u << 12);
  if (!osxsave) return f;
  const uint64_t xcr0 = xgetbv0();
  const bool ymm_os = (xcr0 & 0x6) == 0x6;
  const bool zmm_os = (xcr0 & 0xe6) == 0xe6;
  if (__get_cpuid_max(0, nullptr) < 7) return f;
  __cpuid_count(7, 0, a, b, c, d);
  f.avx2 = ymm_os && (b & (1u << 5));
  f.avx512f = zmm_os && (b & (1u << 16));
  f.avx512bw = zmm_os && (b & (1u << 30));
  f.avx512vl = zmm_os && (b & (1u << 31));
  f.avx512vbmi = zmm_os && (c & (1u << 1));
  f.avx512vnni = zmm_os && (c & (1u << 11));
  __cpuid_count(7, 1, a, b, c, d);
  f.avx_vnni = ymm_os && (a & (1u << 4));
  return f;
}

const Features& features() {
  static const Features f = detect();
  return f;
}

int32_t best_isa() {
  const Features& f = features();
  if (f.avx512f && f.avx512bw && f.avx512vl && f.avx512vnni && f.avx512vbmi && f.fma)
    return LOWBIT_ISA_AVX512;
  if (f.avx2 && f.fma) return LOWBIT_ISA_AVX2;
  return LOWBIT_ISA_SCALAR;
}

std::atomic<int32_t> g_isa{-1};
std::atomic<int32_t> g_isa_error{0};

int32_t isa_from_env() {
  const char* v = getenv("LOWBIT_ISA");
  if (!v || !*v) return best_isa();
  int32_t want = -1;
  if (!strcmp(v, "scalar")) want = LOWBIT_ISA_SCALAR;
  else if (!strcmp(v, "avx2")) want = LOWBIT_ISA_AVX2;
  else if (!strcmp(v, "avx512")) want = LOWBIT_ISA_AVX512;
  if (want < 0 || !lowbit_rt_isa_supported(want)) {
    g_isa_error.store(-LOWBIT_E_ISA);
    return best_isa();
  }
  return want;
}

}  // namespace

extern "C" {

int32_t lowbit_rt_isa_supported(int32_t isa) {
  return isa >= LOWBIT_ISA_SCALAR && isa <= best_isa();
}

int32_t lowbit_rt_isa(void) {
  int32_t isa = g_isa.load(std::memory_order_relaxed);
  if (isa < 0) {
    isa = isa_from_env();
    g_isa.store(isa);
  }
  return isa;
}

int32_t lowbit_rt_set_isa(int32_t isa) {
  if (!lowbit_rt_isa_supported(isa)) return -LOWBIT_E_ISA;
  g_isa.store(isa);
  return 0;
}

int32_t lowbit_rt_isa_error(void) {
  lowbit_rt_isa();
  return g_isa_error.load();
}

const char* lowbit_rt_isa_name(int32_t isa) {
  switch (isa) {
    case LOWBIT_ISA_SCALAR: return "scalar";
    case LOWBIT_ISA_AVX2: return "avx2";
    case LOWBIT_ISA_AVX512: return "avx512";
    default: return "unknown";
  }
}

const char* lowbit_rt_error_string(int64_t code) {
  switch (code < 0 ? -code : code) {
    case LOWBIT_OK: return "ok";
    case LOWBIT_E_UNSUPPORTED: return "unsupported format, dtype or flag combination";
    case LOWBIT_E_SHAPE: return "invalid size (zero, negative or not a multiple of the block)";
    case LOWBIT_E_LEADING_DIM: return "leading dimension smaller than the row length";
    case LOWBIT_E_ALIGNMENT: return "size or stride not a multiple of the format's block";
    case LOWBIT_E_ISA: return "requested ISA is not available on this CPU";
    case LOWBIT_E_TABLE_FULL: return "kernel table full";
    default: return "unknown error";
  }
}

int32_t lowbit_rt_abi_version(void) { return 1; }

}  // extern "C"
