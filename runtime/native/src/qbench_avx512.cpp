// Instruction-throughput loops that define "peak" for benchmarks/peaks.py and
// benchmarks/microkernels.py: 24 independent accumulator chains of one instruction (enough
// to cover latency x throughput on every current core), written in asm because with
// intrinsics gcc keeps a 24-vector array on the stack and the loop measures store
// forwarding instead. Requires AVX-512 F/VL/VNNI (+ AVX512_BF16 for the bf16 loop; the
// caller checks lowbit_rt_cpu_features()).
#include <stdint.h>

#include "qgemm_internal.h"

namespace {

#define LB_REGS_8_31 "8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31"
#define LB_CLOBBER_8_31                                                                       \
  "xmm8", "xmm9", "xmm10", "xmm11", "xmm12", "xmm13", "xmm14", "xmm15", "xmm16", "xmm17",  \
      "xmm18", "xmm19", "xmm20", "xmm21", "xmm22", "xmm23", "xmm24", "xmm25", "xmm26",      \
      "xmm27", "xmm28", "xmm29", "xmm30", "xmm31"

// One loop: accumulators z8..z31 = 0, operands z0 (broadcast of `a`) and z1 (of `b`), then
// `iters` x 24 instructions `INSN %%{V}1, %%{V}0, %%{V}r`, then a value depending on all
// chains (so nothing is optimised away).
#define LB_PEAK_LOOP(INSN, V, ADD)                                                          \
  __asm__ volatile(                                                                         \
      "vpbroadcastd %k[a], %%zmm0\n\t"                                                      \
      "vpbroadcastd %k[b], %%zmm1\n\t"                                                      \
      "vpxord %%zmm8, %%zmm8, %%zmm8\n\t"                                                   \
      ".irp r," LB_REGS_8_31 "\n\t"                                                         \
      "vmovdqa64 %%zmm8, %%zmm\\r\n\t"                                                      \
      ".endr\n\t"                                                                           \
      "test %[n], %[n]\n\t"                                                                 \
      "jle 2f\n\t"                                                                          \
      ".p2align 6\n\t"                                                                      \
      "1:\n\t"                                                                              \
      ".irp r," LB_REGS_8_31 "\n\t"                                                         \
      INSN " %%" V "1, %%" V "0, %%" V "\\r\n\t"                                            \
      ".endr\n\t"                                                                           \
      "dec %[n]\n\t"                                                                        \
      "jnz 1b\n\t"                                                                          \
      "2:\n\t"                                                                              \
      ".irp r,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31\n\t"      \
      ADD " %%zmm\\r, %%zmm8, %%zmm8\n\t"                                                   \
      ".endr\n\t"                                                                           \
      "vmovd %%xmm8, %k[out]\n\t"                                                           \
      : [n] "+r"(n), [out] "=r"(out)                                                        \
      : [a] "r"(a), [b] "r"(b)                                                              \
      : "cc", "xmm0", "xmm1", LB_CLOBBER_8_31)

}  // namespace

extern "C" {

// kind: 0 vpdpbusd zmm (64 int8 MACs), 1 vpdpbusd ymm (32), 2 vdpbf16ps zmm (32 bf16 MACs),
// 3 vfmadd231ps zmm (16 fp32 MACs), 4 vfmadd231ps ymm (8). Runs `iters` x 24 instructions.
LOWBIT_API int64_t lowbit_qbench_peak_loop(int32_t kind, int64_t iters) {
  int64_t n = iters;
  uint32_t out = 0;
  switch (kind) {
    case 0: {
      const uint32_t a = 0x01010101u, b = 0xffffffffu;  // u8 1 x s8 -1
      LB_PEAK_LOOP("vpdpbusd", "zmm", "vpaddd");
      break;
    }
    case 1: {
      const uint32_t a = 0x01010101u, b = 0xffffffffu;
      LB_PEAK_LOOP("vpdpbusd", "ymm", "vpaddd");
      break;
    }
    case 2: {
      const uint32_t a = 0x3f803f80u, b = 0x3a833a83u;  // bf16 pairs (1.0, 1.0) x (~1e-3, ~1e-3)
      LB_PEAK_LOOP("vdpbf16ps", "zmm", "vaddps");
      break;
    }
    case 3: {
      const uint32_t a = 0x3f800000u, b = 0x3a83126fu;  // 1.0f, 1e-3f
      LB_PEAK_LOOP("vfmadd231ps", "zmm", "vaddps");
      break;
    }
    case 4: {
      const uint32_t a = 0x3f800000u, b = 0x3a83126fu;
      LB_PEAK_LOOP("vfmadd231ps", "ymm", "vaddps");
      break;
    }
    default:
      return -1;
  }
  return int64_t(out);
}

// The original VNNI loop (kept for benchmarks that call it by name): kind 0 above.
LOWBIT_API int64_t lowbit_qbench_vnni_loop(int64_t iters) { return lowbit_qbench_peak_loop(0, iters); }

}  // extern "C"
