// Whether this CPU's AVX-512 int8 tiles of 1-/2-/4-bit codes take the decoded panel
// (qgemm_panel_avx512.cpp) or keep the register tiles (qgemm_avx512.cpp): measured, not named.
//
// The panel pays where the decode competes with vpdpbusd for the vector ports (two vpdpbusd
// ports: 1.1-1.3x at M = 128 on an Intel Xeon); a core with one vpdpbusd port (Zen 4) has ports
// to spare for the decode, and there the panel's extra L1 traffic may cost more than it saves.
// So the first dispatch that would take the panel for a code width times both tiles on the
// calling thread, on one synthetic call, in back-to-back pairs (the host may change speed
// between pairs, not within one), and the rule takes the panel when the median pair ratio is
// above 1. Both tiles give the same results bit for bit: the choice is speed only, and a
// wrong choice costs what the two differ by, so there is no margin either way. (Measured on
// an Intel Xeon, 15 processes: 1.11-1.22x for 1-bit codes, 1.09-1.21x 2-bit, 1.03-1.14x
// 4-bit; a process's three widths dip together.)
#include <stdlib.h>

#include <algorithm>
#include <atomic>
#include <mutex>

#include "qgemm_internal.h"

namespace lowbit {
namespace q {
namespace {

// The calibration call: a prefill-sized tile (the panel's passes are up to 192 rows) over a
// per-channel K-block of 1024 (four 256-k panels) and 3 n-blocks; ~50-100 us per call.
constexpr int64_t kRows = 128, kCols = 3 * NB, kK = 1024;
constexpr int kPairs = 9;

std::atomic<int32_t> g_mode{LOWBIT_PANEL_MEASURED};
std::mutex g_measure_mutex;
// Per code width 1, 2, 4 (index bits / 2): the measured speedup; 0 = not measured yet.
std::atomic<double> g_speedup[3];

int32_t format_for(int bits) {
  return bits == 1 ? LOWBIT_QW_INT1 : bits == 2 ? LOWBIT_QW_TERNARY : LOWBIT_QW_INT4_SYM;
}

// Median over kPairs of t(register) / t(panel), one untimed call of each first. -1 when the
// scratch could not be allocated.
double measure(int bits) {
  Desc d{};
  format_of(format_for(bits), &d.f);
  d.wfmt = format_for(bits);
  d.atype = LOWBIT_QT_INT8;
  d.ctype = LOWBIT_QT_F32;
  d.isa = LOWBIT_ISA_AVX512;
  d.m = kRows;
  d.n = kCols;
  d.kblock = kK;
  d.lda = d.stride_a = lowbit_qgemm_act_stride(kK);
  d.ldb = d.stride_b = kblock_bytes(d.f, kK);
  d.ldc = kCols;
  d.ld_aux = 1;
  const int64_t a_bytes = kRows * d.lda, b_bytes = kCols / NB * d.ldb;
  const int64_t c_bytes = kRows * kCols * 4, aux_bytes = kRows * 8;
  const int64_t total = a_bytes + b_bytes + c_bytes + aux_bytes;
  char* mem = static_cast<char*>(aligned_alloc(64, (total + 63) / 64 * 64));
  if (!mem) return -1;
  // Codes and activations: a fixed mix of every byte value; scales 1 (the measured formats are
  // symmetric: their K-blocks store no offsets).
  for (int64_t i = 0; i < a_bytes + b_bytes; ++i) mem[i] = char((i * 167 + 13) & 0xff);
  Args g{};
  g.a = mem;
  g.b = reinterpret_cast<const uint8_t*>(mem + a_bytes);
  for (int64_t nb = 0; nb < kCols / NB; ++nb) {
    float* scale = reinterpret_cast<float*>(mem + a_bytes + nb * d.ldb + codes_bytes(d.f, kK));
    std::fill(scale, scale + NB, 1.0f);
  }
  g.c = mem + a_bytes + b_bytes;
  float* a_scale = reinterpret_cast<float*>(mem + a_bytes + b_bytes + c_bytes);
  int32_t* a_sum = reinterpret_cast<int32_t*>(a_scale + kRows);
  std::fill(a_scale, a_scale + kRows, 1.0f);
  std::fill(a_sum, a_sum + kRows, 0);
  g.a_scale = a_scale;
  g.a_sum = a_sum;
  g.count = 1;

  Desc panel = d, regs = d;
  panel.panel = true;
  regs.panel = false;
  tile_avx512(regs, g);
  tile_avx512(panel, g);
  double ratio[kPairs];
  for (int p = 0; p < kPairs; ++p) {
    int64_t t[2];
    for (int i = 0; i < 2; ++i) {
      const bool is_panel = (i + p) % 2 == 0;  // alternate which runs first
      const int64_t t0 = now_ns();
      tile_avx512(is_panel ? panel : regs, g);
      t[is_panel] = now_ns() - t0;
    }
    ratio[p] = double(std::max<int64_t>(t[0], 1)) / double(std::max<int64_t>(t[1], 1));
  }
  free(mem);
  std::nth_element(ratio, ratio + kPairs / 2, ratio + kPairs);
  return ratio[kPairs / 2];
}

double panel_speedup(int bits) {
  if (bits != 1 && bits != 2 && bits != 4) return 0;
  std::atomic<double>& slot = g_speedup[bits / 2];
  double s = slot.load(std::memory_order_acquire);
  if (s != 0) return s;
  std::lock_guard<std::mutex> lock(g_measure_mutex);
  s = slot.load(std::memory_order_relaxed);
  if (s == 0) {
    s = measure(bits);
    slot.store(s, std::memory_order_release);
  }
  return s;
}

}  // namespace

bool panel_pays_off(int bits) {
  switch (g_mode.load(std::memory_order_relaxed)) {
    case LOWBIT_PANEL_ALWAYS: return true;
    case LOWBIT_PANEL_NEVER: return false;
    default: return panel_speedup(bits) > 1.0;
  }
}

}  // namespace q
}  // namespace lowbit

extern "C" {

int32_t lowbit_qgemm_panel_rule(int32_t mode) {
  using lowbit::q::g_mode;
  if (mode < 0) return g_mode.load();
  if (mode > LOWBIT_PANEL_NEVER) return -LOWBIT_E_UNSUPPORTED;
  return g_mode.exchange(mode);
}

double lowbit_qgemm_panel_speedup(int32_t bits) {
  if (lowbit_rt_isa() < LOWBIT_ISA_AVX512) return 0;
  return lowbit::q::panel_speedup(bits);
}

}  // extern "C"
