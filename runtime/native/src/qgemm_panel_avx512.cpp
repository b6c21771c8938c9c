// AVX-512 VNNI GEMM tiles over a decoded panel: int8 activations x packed 1-/2-/4-bit codes
// for calls of many rows (prefill), where the register tiles of qgemm_avx512.cpp decode each
// n-block's codes again for every 6 rows.
//
// On a CPU with two vpdpbusd ports (recent Intel, Zen 5) the decode competes with vpdpbusd for
// the same two vector ports: a 2-bit sub-step of 6 rows is 24 vpdpbusd + 4 ANDs + 3 shifts, at
// most 24/31 of the vpdpbusd peak (measured 65-78% at M = 128 on an Intel Xeon). Here the
// codes of kKC k values of one n-block are decoded once per pass of up to kMC rows into a
// panel of u8 vectors that stays in L1 (decode<BITS>, the order vpdpbusd reads), and every 6
// rows then run 24 vpdpbusd per 4 loads and 6 broadcasts: the vector ports do nothing else
// (87-95% of the peak at M = 128, 2-bit). The activations are read in place (a copy of each
// pass's rows measured no faster), the pass's int32 sums are spilled between panels, and every
// K-block ends with the AVX-512 tiles' own flush, so the results equal theirs bit for bit.
// 8-bit codes have nothing to decode and never come here; short K-blocks neither (the
// dispatch rule: their per-block flush through memory costs more than the decode saved).
#include <immintrin.h>

#include <stdlib.h>

#include <algorithm>

#include "qgemm_decode_avx512.h"
#include "qgemm_internal.h"

namespace lowbit {
namespace q {

namespace {

constexpr int64_t kKC = 256;             // k values per panel: 64 sub-steps x 256 B = 16 KiB
constexpr int64_t kSubs = kKC / 4;       // 4-k sub-steps per panel
constexpr int64_t kMC = 192;             // most rows per pass (multiple of 6)

// Sub-steps [s0, s0 + nsub) of a K-block's codes as u8 vectors: sub-step t's vector j at
// panel + 256 t + 64 j.
template <int BITS>
void decode_panel(const uint8_t* codes, int64_t s0, int64_t nsub, uint8_t* panel) {
  for (int64_t t = 0; t < nsub; ++t) {
    const int64_t s = s0 + t;
    __m512i v[4];
    decode<BITS>(codes + s / kSubSteps<BITS> * kStepBytes<BITS>, int(s % kSubSteps<BITS>), v);
#pragma GCC unroll 4
    for (int j = 0; j < 4; ++j) _mm512_store_si512(panel + 256 * t + 64 * j, v[j]);
  }
}

// MB <= 6 rows (`lda` apart, `x` at the panel's first k) x 64 columns over `nsub` >= 1
// sub-steps of the panel, adding to the int32 sums acc[MB][64] (or starting them at zero).
// Each sub-step prefetches PF_LINES lines at `pf`, `pf_step` bytes further each time: the first
// rows of a panel fetch the next panel's codes (one sub-step's: 1 line, 2 for 4-bit codes),
// spread over the loop (issued all at once before the decode, the prefetches stalled it for
// 4% of the tile's time).
// Written in asm because gcc 12 kept the 24 accumulators of the intrinsics version on the
// stack (31% of the vpdpbusd peak). Row r's sums are zmm 4r .. 4r + 3, the panel's vectors
// zmm24-27, the broadcast activations alternate between zmm28 and zmm29.
#define LB_PANEL_ROW(R, ADDR, B, A0, A1, A2, A3)           \
  ".if " #R " < %c[mb]\n\t"                               \
  "vpbroadcastd " ADDR ", %%zmm" B "\n\t"                  \
  "vpdpbusd %%zmm" B ", %%zmm24, %%zmm" A0 "\n\t"          \
  "vpdpbusd %%zmm" B ", %%zmm25, %%zmm" A1 "\n\t"          \
  "vpdpbusd %%zmm" B ", %%zmm26, %%zmm" A2 "\n\t"          \
  "vpdpbusd %%zmm" B ", %%zmm27, %%zmm" A3 "\n\t"          \
  ".endif\n\t"
#define LB_ACC_REGS "0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23"

template <int MB, int PF_LINES>
LB_INLINE void panel_rows(const uint8_t* panel, int64_t nsub, const int8_t* x, int64_t lda,
                          int32_t* acc, bool first, const uint8_t* pf, int64_t pf_step) {
  static_assert(MB >= 1 && MB <= 6, "panel_rows: 1 to 6 rows");
  const int8_t* x3 = x + 3 * lda;
  __asm__ volatile(
      "test %[first], %[first]\n\t"
      "jz 3f\n\t"
      ".irp r," LB_ACC_REGS "\n\t"
      ".if \\r < 4 * %c[mb]\n\t"
      "vpxord %%zmm\\r, %%zmm\\r, %%zmm\\r\n\t"
      ".endif\n\t"
      ".endr\n\t"
      "jmp 4f\n\t"
      "3:\n\t"
      ".irp r," LB_ACC_REGS "\n\t"
      ".if \\r < 4 * %c[mb]\n\t"
      "vmovdqa64 64 * \\r(%[acc]), %%zmm\\r\n\t"
      ".endif\n\t"
      ".endr\n\t"
      "4:\n\t"
      ".p2align 5\n\t"
      "1:\n\t"
      "prefetcht0 (%[pf])\n\t"
      ".if %c[pfl] > 1\n\t"
      "prefetcht0 64(%[pf])\n\t"
      ".endif\n\t"
      "add %[pfs], %[pf]\n\t"
      "vmovdqa64 (%[p]), %%zmm24\n\t"
      "vmovdqa64 64(%[p]), %%zmm25\n\t"
      "vmovdqa64 128(%[p]), %%zmm26\n\t"
      "vmovdqa64 192(%[p]), %%zmm27\n\t"
      LB_PANEL_ROW(0, "(%[x])", "28", "0", "1", "2", "3")
      LB_PANEL_ROW(1, "(%[x],%[l],1)", "29", "4", "5", "6", "7")
      LB_PANEL_ROW(2, "(%[x],%[l],2)", "28", "8", "9", "10", "11")
      LB_PANEL_ROW(3, "(%[x3])", "29", "12", "13", "14", "15")
      LB_PANEL_ROW(4, "(%[x3],%[l],1)", "28", "16", "17", "18", "19")
      LB_PANEL_ROW(5, "(%[x3],%[l],2)", "29", "20", "21", "22", "23")
      "add $256, %[p]\n\t"
      "add $4, %[x]\n\t"
      "add $4, %[x3]\n\t"
      "dec %[n]\n\t"
      "jnz 1b\n\t"
      ".irp r," LB_ACC_REGS "\n\t"
      ".if \\r < 4 * %c[mb]\n\t"
      "vmovdqa64 %%zmm\\r, 64 * \\r(%[acc])\n\t"
      ".endif\n\t"
      ".endr\n\t"
      : [p] "+r"(panel), [x] "+r"(x), [x3] "+r"(x3), [n] "+r"(nsub), [pf] "+r"(pf)
      : [pfs] "r"(pf_step), [l] "r"(lda), [acc] "r"(acc), [first] "r"(int(first)), [mb] "i"(MB), [pfl] "i"(PF_LINES)
      : "cc", "memory", "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6", "xmm7", "xmm8",
        "xmm9", "xmm10", "xmm11", "xmm12", "xmm13", "xmm14", "xmm15", "xmm16", "xmm17", "xmm18",
        "xmm19", "xmm20", "xmm21", "xmm22", "xmm23", "xmm24", "xmm25", "xmm26", "xmm27", "xmm28",
        "xmm29");
}
#undef LB_PANEL_ROW
#undef LB_ACC_REGS

// Per-thread scratch (compiled code calls tiles from its OpenMP workers over and over): the
// panel, and a pass's int32 sums and fp32 tile.
struct Scratch {
  uint8_t* panel = static_cast<uint8_t*>(aligned_alloc(64, kSubs * 256));
  int32_t* acc = static_cast<int32_t*>(aligned_alloc(64, kMC * NB * 4));
  float* tile = static_cast<float*>(aligned_alloc(64, kMC * NB * 4));
  ~Scratch() {
    free(panel);
    free(acc);
    free(tile);
  }
  bool ok() const { return panel && acc && tile; }
};

// Rows per pass: the passes share the rows evenly, in multiples of 6 (kMC at most).
int64_t pass_rows(int64_t m) {
  const int64_t passes = (m + kMC - 1) / kMC;
  return std::min(kMC, ((m + passes - 1) / passes + 5) / 6 * 6);
}

template <int BITS>
void tile_bits(const Desc& d, const Args& g, Scratch& s) {
  uint8_t* const panel = s.panel;
  int32_t* const acc = s.acc;
  float* const tile = s.tile;
  const int64_t subs = d.kblock / 4;  // sub-steps per K-block (activation rows are zero past K)
  const int64_t chunks = (subs + kSubs - 1) / kSubs;
  const int64_t mc = pass_rows(d.m), lda = d.lda;
  const int8_t* a = static_cast<const int8_t*>(g.a);
  constexpr int64_t kPfStep = kStepBytes<BITS> / kSubSteps<BITS>;  // code bytes per sub-step
  constexpr int kPfLines = kPfStep > 64 ? 2 : 1;
  for (int64_t m0 = 0; m0 < d.m; m0 += mc) {
    const int64_t rows = std::min(mc, d.m - m0);
    for (int64_t n0 = 0; n0 < d.n; n0 += NB) {
      const uint8_t* nblock = g.b + (n0 / NB) * d.ldb;
      for (int64_t i = 0; i < g.count; ++i) {
        const uint8_t* w = nblock + i * d.stride_b;
        for (int64_t c = 0; c < chunks; ++c) {
          const int64_t nsub = std::min(kSubs, subs - kSubs * c);
          decode_panel<BITS>(w, kSubs * c, nsub, panel);
          const int8_t* x = a + m0 * lda + i * d.stride_a + kKC * c;
          const bool first = c == 0;
          // the first rows prefetch the next panel's codes (past the last panel: harmless)
          const uint8_t* pf = w + (kSubs * (c + 1)) / kSubSteps<BITS> * kStepBytes<BITS>;
          int64_t r = 0;
          for (; r + 6 <= rows; r += 6, pf = panel)
            panel_rows<6, kPfLines>(panel, nsub, x + r * lda, lda, acc + r * NB, first, pf, r ? 0 : kPfStep);
          const int64_t pfs = r ? 0 : kPfStep;
          switch (rows - r) {
            case 5: panel_rows<5, kPfLines>(panel, nsub, x + r * lda, lda, acc + r * NB, first, pf, pfs); break;
            case 4: panel_rows<4, kPfLines>(panel, nsub, x + r * lda, lda, acc + r * NB, first, pf, pfs); break;
            case 3: panel_rows<3, kPfLines>(panel, nsub, x + r * lda, lda, acc + r * NB, first, pf, pfs); break;
            case 2: panel_rows<2, kPfLines>(panel, nsub, x + r * lda, lda, acc + r * NB, first, pf, pfs); break;
            case 1: panel_rows<1, kPfLines>(panel, nsub, x + r * lda, lda, acc + r * NB, first, pf, pfs); break;
            default: break;
          }
        }
        flush_block_avx512(d, g, kblock_flush(d, w), acc, m0, rows, i, tile);
      }
      store_rows_avx512(d, g, m0, rows, n0, tile);
    }
  }
}

}  // namespace

bool tile_panel_avx512(const Desc& d, const Args& g) {
  static thread_local Scratch s;
  if (d.f.bits > 4 || !s.ok()) return false;
  if (d.f.bits == 1) tile_bits<1>(d, g, s);
  else if (d.f.bits == 2) tile_bits<2>(d, g, s);
  else tile_bits<4>(d, g, s);
  return true;
}

}  // namespace q
}  // namespace lowbit
