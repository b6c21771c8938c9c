// CPU feature detection and the run-time ISA choice.
#include "lowbit/runtime.h"

#include <cpuid.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <atomic>

namespace {

struct Features {
  bool avx2 = false, fma = false, avx512f = false, avx512bw = false, avx512vl = false,
       avx512vnni = false, avx512vbmi = false, avx512bf16 = false, avx_vnni = false,
       amx_tile = false, amx_int8 = false, amx_bf16 = false;
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
  // AMX: CPUID.7.0:EDX bits 24 (TILE), 25 (INT8), 22 (BF16), and the OS enabling the tile
  // state in XCR0 (bits 17 XTILECFG, 18 XTILEDATA). Linux additionally wants a per-process
  // arch_prctl(ARCH_REQ_XCOMP_PERM) before the first tile instruction (amx_permitted below).
  const bool tile_os = (xcr0 & (3ull << 17)) == (3ull << 17);
  f.amx_tile = tile_os && (d & (1u << 24));
  f.amx_int8 = f.amx_tile && (d & (1u << 25));
  f.amx_bf16 = f.amx_tile && (d & (1u << 22));
  __cpuid_count(7, 1, a, b, c, d);
  f.avx_vnni = ymm_os && (a & (1u << 4));
  f.avx512bf16 = zmm_os && (a & (1u << 5));
  return f;
}

const Features& features() {
  static const Features f = detect();
  return f;
}

// Linux hands out the 8 KiB AMX tile state per process on request; a tile instruction
// without it is SIGILL. Granted once, it holds for every thread of the process (torch's
// oneDNN asks for the same). 0x1022 / 0x1023: ARCH_GET / ARCH_REQ_XCOMP_PERM, 18:
// XFEATURE_XTILEDATA.
bool request_amx() {
  unsigned long granted = 0;
  if (syscall(SYS_arch_prctl, 0x1022, &granted) == 0 && (granted & (1ul << 18))) return true;
  return syscall(SYS_arch_prctl, 0x1023, 18) == 0;
}

bool amx_permitted() {
  static const bool ok = features().amx_int8 && request_amx();
  return ok;
}

int32_t best_isa() {
  const Features& f = features();
  if (f.avx512f && f.avx512bw && f.avx512vl && f.avx512vnni && f.avx512vbmi && f.fma)
    return amx_permitted() ? LOWBIT_ISA_AMX : LOWBIT_ISA_AVX512;
  if (f.avx2 && f.fma) return LOWBIT_ISA_AVX2;
  return LOWBIT_ISA_SCALAR;
}

std::atomic<int32_t> g_isa{-1};
std::atomic<int32_t> g_isa_error{0};

// LOWBIT_ISA, case-insensitive, surrounding blanks ignored. Never fails: a value it cannot
// honour leaves the best ISA in place and records why in lowbit_rt_isa_error()
// (-LOWBIT_E_UNSUPPORTED: not an ISA name; -LOWBIT_E_ISA: this CPU (or the OS) lacks it).
// The Python loader turns that into one clear exception.
int32_t isa_from_env() {
  const char* v = getenv("LOWBIT_ISA");
  if (!v) return best_isa();
  while (*v == ' ' || *v == '\t') ++v;
  size_t len = strlen(v);
  while (len && (v[len - 1] == ' ' || v[len - 1] == '\t' || v[len - 1] == '\n')) --len;
  if (!len) return best_isa();
  auto is = [&](const char* name) { return len == strlen(name) && !strncasecmp(v, name, len); };
  int32_t want = -1;
  if (is("scalar")) want = LOWBIT_ISA_SCALAR;
  else if (is("avx2")) want = LOWBIT_ISA_AVX2;
  else if (is("avx512")) want = LOWBIT_ISA_AVX512;
  else if (is("amx")) want = LOWBIT_ISA_AMX;
  if (want < 0) {
    g_isa_error.store(-LOWBIT_E_UNSUPPORTED);
    return best_isa();
  }
  if (!lowbit_rt_isa_supported(want)) {
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
    case LOWBIT_ISA_AMX: return "amx";
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
    case 32: return "weight code or zero point outside the format's range";  // LOWBIT_E_QRANGE
    default: return "unknown error";
  }
}

int32_t lowbit_rt_abi_version(void) { return 1; }

int32_t lowbit_rt_cpu_features(void) {
  const Features& f = features();
  return (f.avx2 ? LOWBIT_CPU_AVX2 : 0) | (f.fma ? LOWBIT_CPU_FMA : 0) |
         (f.avx512f ? LOWBIT_CPU_AVX512F : 0) | (f.avx512bw ? LOWBIT_CPU_AVX512BW : 0) |
         (f.avx512vl ? LOWBIT_CPU_AVX512VL : 0) | (f.avx512vnni ? LOWBIT_CPU_AVX512VNNI : 0) |
         (f.avx512vbmi ? LOWBIT_CPU_AVX512VBMI : 0) | (f.avx512bf16 ? LOWBIT_CPU_AVX512BF16 : 0) |
         (f.avx_vnni ? LOWBIT_CPU_AVX_VNNI : 0) | (f.amx_tile ? LOWBIT_CPU_AMX_TILE : 0) |
         (f.amx_int8 ? LOWBIT_CPU_AMX_INT8 : 0) | (f.amx_bf16 ? LOWBIT_CPU_AMX_BF16 : 0);
}

}  // extern "C"
