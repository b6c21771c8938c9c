// Internals shared by the BRGEMM translation units: the kernel description, the per-ISA
// entry points, and the cache-blocking driver that walks a BRGEMM call in register tiles.
//
// The driver is a template included by each ISA's translation unit inside an anonymous
// namespace, so every copy is compiled with that unit's ISA flags and never merged with
// another unit's copy by the linker.
#ifndef LOWBIT_BRGEMM_INTERNAL_H
#define LOWBIT_BRGEMM_INTERNAL_H

#include "bf16.h"
#include <stdint.h>
#include <string.h>

#include <algorithm>
#include <utility>
#include <vector>

#include "lowbit/brgemm.h"

namespace lowbit_brgemm {

struct Desc {
  int32_t dtype;
  int64_t m, n, k, lda, ldb, ldc, stride_a, stride_b, flags;
  int32_t isa;  // the ISA the kernel was built for (recorded at dispatch)

  bool beta0() const { return flags & LOWBIT_BRGEMM_BETA_0; }
  bool packed() const { return flags & LOWBIT_BRGEMM_B_PACKED; }
  bool c_bf16() const { return flags & LOWBIT_BRGEMM_C_BF16; }
  bool bf16() const { return dtype == LOWBIT_DTYPE_BF16; }
};

using KernelFn = void (*)(const Desc&, const void* a, const void* b, void* c, int64_t batch);

// Per-ISA selection; nullptr when the ISA cannot run the description.
KernelFn select_scalar(const Desc& d);
KernelFn select_avx2(const Desc& d);
KernelFn select_avx512(const Desc& d);  // needs AVX512_BF16 for bf16 (caller checks)
KernelFn select_amx(const Desc& d);     // bf16 only; AMX-BF16 granted (caller checks)

using lowbit_bf16::bf16_to_f32;
using lowbit_bf16::f32_to_bf16;

}  // namespace lowbit_brgemm

namespace {

using lowbit_brgemm::Desc;

// One register tile's view of a BRGEMM chunk: batch elements [ib, ie), each over
// `klen` consecutive k starting at the chunk's k0 (already folded into `a` and `bv`).
constexpr int kMaxNV = 8;  // most B vectors (columns / VL) one register tile spans

struct Tile {
  const void* a;            // A_0 at (row m0, k0)
  int64_t lda, stride_a;    // in A elements
  const void* bv[kMaxNV];   // B_0 at (k0, first column of vector v)
  int64_t b_row_step;       // B elements between k rows (fp32) or k pairs (bf16 packed)
  int64_t ldb, stride_b;    // unpacked row stride; batch stride of B
  int64_t ib, ie, klen;
  float* c;                 // fp32 C tile (C itself or the driver's scratch)
  int64_t ldc;
  bool load_c;              // accumulate into c (else overwrite)
  int tail;                 // valid columns of the last vector, 1..VL
};

// Walks one BRGEMM call. Traits gives the element type T, the vector length VL, the
// register tile MR x (NV * VL), the k chunk KC and `table`, ukernels indexed [mr - 1][nv - 1].
//
// Loop order (BLIS-like): n-panel of NC columns (C panel m x NC stays in L2), k chunk
// (A chunk m x KC stays in L2 and is reused by every n-block of the panel), n-block of
// NR columns (B chunk KC x NR stays in L1 and is reused by every m-block), m-block.
// Every element of B is read once. Small m (<= MR) reduces the whole batch and k in
// registers instead. A bf16 C is accumulated in an fp32 scratch panel and rounded once.
template <class Traits>
void drive(const Desc& d, const void* a_base, const void* b_base, void* c_base, int64_t batch) {
  using T = typename Traits::T;
  constexpr int VL = Traits::VL, MR = Traits::MR, NV = Traits::NV, NR = VL * NV;
  constexpr int64_t NB = LOWBIT_BRGEMM_NB;
  constexpr int64_t kPanelBytes = 256 << 10;
  const bool bf16 = d.bf16();
  const T* A = static_cast<const T*>(a_base);
  const T* B = static_cast<const T*>(b_base);
  // Packed bf16 rows come in pairs of 2 * NB elements; packed fp32 rows are NB apart.
  const int64_t row_step = d.packed() ? (bf16 ? 2 * NB : NB) : d.ldb;
  auto col_offset = [&](int64_t col) -> int64_t {
    if (!d.packed()) return col;
    return (col / NB) * d.ldb + (col % NB) * (bf16 ? 2 : 1);
  };

  const bool chunked = d.m > MR;
  const int64_t kc = chunked ? Traits::KC : d.k;
  const int64_t group = (chunked && d.k < kc) ? std::max<int64_t>(1, kc / d.k) : batch;
  const int64_t nc = std::max<int64_t>(NR, kPanelBytes / (4 * d.m) / NR * NR);

  thread_local std::vector<float> scratch;
  if (d.c_bf16()) scratch.resize(size_t(d.m) * size_t(std::min<int64_t>(nc, d.n)));

  // A is read in place. Rows of A whose stride is a multiple of 4 KiB (2 KiB) map to one
  // (two) L1 sets, so a register tile must not need more rows at once than that set has ways (8 on
  // Zen 4 and current Intel cores) minus one for the B stream: with MR <= 7 they all stay
  // in L1. (A 14-row tile missed L1 on every broadcast, and copying A chunks to a
  // de-aliased buffer cost a serial pass over A, ~13% of a 128x32x4096 tile.)
  static_assert(MR <= 7, "register tiles of more than 7 rows thrash an L1 set on aliasing lda");
  // Rows are split into balanced m-blocks (e.g. 128 = 14 x 7 + 5 x 6, not 18 x 7 + 2) so
  // no block runs with too few accumulators to cover the dot-product latency.
  const int64_t mblocks = (d.m + MR - 1) / MR;
  const int64_t mbase = d.m / mblocks, mextra = d.m % mblocks;

  for (int64_t p0 = 0; p0 < d.n; p0 += nc) {
    const int64_t pw = std::min<int64_t>(nc, d.n - p0);
    float* cp;  // C panel (or its fp32 scratch copy) at column p0
    int64_t ldcp;
    bool have_c = !d.beta0();
    if (d.c_bf16()) {
      cp = scratch.data();
      ldcp = pw;
      if (have_c) {
        const uint16_t* cb = static_cast<const uint16_t*>(c_base);
        for (int64_t r = 0; r < d.m; ++r)
          for (int64_t j = 0; j < pw; ++j) cp[r * pw + j] = lowbit_brgemm::bf16_to_f32(cb[r * d.ldc + p0 + j]);
      }
    } else {
      cp = static_cast<float*>(c_base) + p0;
      ldcp = d.ldc;
    }

    auto run_chunk = [&](int64_t ib, int64_t ie, int64_t k0, int64_t klen) {
      Tile t;
      t.lda = d.lda;
      t.stride_a = d.stride_a;
      t.b_row_step = row_step;
      t.ldb = d.ldb;
      t.stride_b = d.stride_b;
      t.ib = ib;
      t.ie = ie;
      t.klen = klen;
      t.ldc = ldcp;
      t.load_c = have_c;
      const int64_t b_k = d.packed() ? k0 * NB : k0 * d.ldb;
      const T* a_chunk = A + k0;  // A_0 at column k0, rows lda apart
      for (int64_t n0 = 0; n0 < pw; n0 += NR) {
        const int nw = int(std::min<int64_t>(NR, pw - n0));
        const int nv = (nw + VL - 1) / VL;
        t.tail = nw - (nv - 1) * VL;
        for (int v = 0; v < NV; ++v)
          t.bv[v] = B + b_k + col_offset(p0 + n0 + int64_t(std::min(v, nv - 1)) * VL);
        for (int64_t mb = 0, m0 = 0; mb < mblocks; ++mb) {
          const int mr = int(mbase + (mb < mextra ? 1 : 0));
          t.a = a_chunk + m0 * d.lda;
          t.c = cp + m0 * ldcp + n0;
          Traits::table[mr - 1][nv - 1](t);
          m0 += mr;
        }
      }
      have_c = true;
    };

    if (d.k > kc) {
      for (int64_t i = 0; i < batch; ++i)
        for (int64_t k0 = 0; k0 < d.k; k0 += kc) run_chunk(i, i + 1, k0, std::min(kc, d.k - k0));
    } else {
      for (int64_t i = 0; i < batch; i += group) run_chunk(i, std::min(batch, i + group), 0, d.k);
    }

    if (d.c_bf16()) {
      uint16_t* cb = static_cast<uint16_t*>(c_base);
      for (int64_t r = 0; r < d.m; ++r)
        for (int64_t j = 0; j < pw; ++j) cb[r * d.ldc + p0 + j] = lowbit_brgemm::f32_to_bf16(cp[r * pw + j]);
    }
  }
}

// table[mr - 1][nv - 1] = &Kernel::template run<mr, nv>, built at compile time.
template <class Kernel, int MR, int NV>
struct KernelTable {
  using Fn = void (*)(const Tile&);
  Fn fns[MR][NV];
  template <int R, int V>
  static constexpr void fill_one(KernelTable& t) {
    t.fns[R][V] = &Kernel::template run<R + 1, V + 1>;
  }
  template <int R, int... Vs>
  static constexpr void fill_row(KernelTable& t, std::integer_sequence<int, Vs...>) {
    (fill_one<R, Vs>(t), ...);
  }
  template <int... Rs>
  static constexpr void fill(KernelTable& t, std::integer_sequence<int, Rs...>) {
    (fill_row<Rs>(t, std::make_integer_sequence<int, NV>{}), ...);
  }
  constexpr KernelTable() : fns{} { fill(*this, std::make_integer_sequence<int, MR>{}); }
  constexpr const Fn* operator[](int r) const { return fns[r]; }
};

}  // namespace

#endif
