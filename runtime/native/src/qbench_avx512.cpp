// The VNNI instruction-throughput loop that defines "peak" for benchmarks/microkernels.py.
#include "qgemm_internal.h"

extern "C" {

// Runs `iters` iterations of 24 independent vpdpbusd zmm chains (64 MACs each) and returns
// a value depending on all of them (so nothing is optimised away). 24 chains cover the
// latency x throughput product of every current core. The caller times it: peak MAC/s =
// iters * 24 * 64 / seconds. Requires AVX-512 VNNI (check lowbit_rt_isa_supported(2)).
LOWBIT_API int64_t lowbit_qbench_vnni_loop(int64_t iters) {
  // Written in asm: with intrinsics, gcc keeps a 24-vector array on the stack and the loop
  // measures store forwarding instead of vpdpbusd.
#define LB_DP(r) "vpdpbusd %%zmm1, %%zmm0, %%zmm" #r "\n\t"
  int64_t n = iters;
  int32_t out;
  __asm__ volatile(
      "vpternlogd $0xff, %%zmm0, %%zmm0, %%zmm0\n\t"
      "vpabsb %%zmm0, %%zmm0\n\t"  // all bytes 1 (u8)
      "vpternlogd $0xff, %%zmm1, %%zmm1, %%zmm1\n\t"  // all bytes -1 (s8)
      "vpxord %%zmm8, %%zmm8, %%zmm8\n\t"
      ".irp r,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31\n\t"
      "vmovdqa64 %%zmm8, %%zmm\\r\n\t"
      ".endr\n\t"
      "test %[n], %[n]\n\t"
      "jle 2f\n\t"
      "1:\n\t"
      LB_DP(8) LB_DP(9) LB_DP(10) LB_DP(11) LB_DP(12) LB_DP(13) LB_DP(14) LB_DP(15)
      LB_DP(16) LB_DP(17) LB_DP(18) LB_DP(19) LB_DP(20) LB_DP(21) LB_DP(22) LB_DP(23)
      LB_DP(24) LB_DP(25) LB_DP(26) LB_DP(27) LB_DP(28) LB_DP(29) LB_DP(30) LB_DP(31)
      "dec %[n]\n\t"
      "jnz 1b\n\t"
      "2:\n\t"
      ".irp r,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31\n\t"
      "vpaddd %%zmm\\r, %%zmm8, %%zmm8\n\t"
      ".endr\n\t"
      "vmovd %%xmm8, %[out]\n\t"
      : [n] "+r"(n), [out] "=r"(out)
      :
      : "cc", "xmm0", "xmm1", "xmm8", "xmm9", "xmm10", "xmm11", "xmm12", "xmm13", "xmm14",
        "xmm15", "xmm16", "xmm17", "xmm18", "xmm19", "xmm20", "xmm21", "xmm22", "xmm23",
        "xmm24", "xmm25", "xmm26", "xmm27", "xmm28", "xmm29", "xmm30", "xmm31");
#undef LB_DP
  return out;
}

}  // extern "C"
