// Portable BRGEMM tiles (no ISA flags): the reference path for CPUs without AVX2 and for
// `LOWBIT_ISA=scalar`. Same driver and layouts as the vector paths, one column per "vector".
#include "brgemm_internal.h"

namespace {

// How a tile reads A and B elements for each dtype / B layout.
struct F32Access {
  using T = float;
  static float a(const T* p) { return *p; }
  static float b(const T* col, int64_t kk, int64_t step, int64_t) { return col[kk * step]; }
};
struct Bf16PackedAccess {
  using T = uint16_t;
  static float a(const T* p) { return lowbit_brgemm::bf16_to_f32(*p); }
  static float b(const T* col, int64_t kk, int64_t step, int64_t) {
    return lowbit_brgemm::bf16_to_f32(col[(kk / 2) * step + (kk % 2)]);
  }
};
struct Bf16RowAccess {
  using T = uint16_t;
  static float a(const T* p) { return lowbit_brgemm::bf16_to_f32(*p); }
  static float b(const T* col, int64_t kk, int64_t, int64_t ldb) {
    return lowbit_brgemm::bf16_to_f32(col[kk * ldb]);
  }
};

template <class Access>
struct Kernel {
  template <int MR, int NV>
  static void run(const Tile& t) {
    using T = typename Access::T;
    float acc[MR][NV];
#pragma GCC unroll 16
    for (int r = 0; r < MR; ++r)
#pragma GCC unroll 16
      for (int v = 0; v < NV; ++v) acc[r][v] = t.load_c ? t.c[r * t.ldc + v] : 0.0f;
    for (int64_t i = t.ib; i < t.ie; ++i) {
      const T* a = static_cast<const T*>(t.a) + i * t.stride_a;
      const T* b[NV];
#pragma GCC unroll 16
      for (int v = 0; v < NV; ++v) b[v] = static_cast<const T*>(t.bv[v]) + i * t.stride_b;
      for (int64_t kk = 0; kk < t.klen; ++kk) {
        float bv[NV];
#pragma GCC unroll 16
        for (int v = 0; v < NV; ++v) bv[v] = Access::b(b[v], kk, t.b_row_step, t.ldb);
#pragma GCC unroll 16
        for (int r = 0; r < MR; ++r) {
          const float av = Access::a(a + r * t.lda + kk);
#pragma GCC unroll 16
          for (int v = 0; v < NV; ++v) acc[r][v] += av * bv[v];
        }
      }
    }
#pragma GCC unroll 16
    for (int r = 0; r < MR; ++r)
#pragma GCC unroll 16
      for (int v = 0; v < NV; ++v) t.c[r * t.ldc + v] = acc[r][v];
  }
};

template <class Access>
struct Traits {
  using T = typename Access::T;
  static constexpr int VL = 1, MR = 4, NV = 8, KC = 256;
  static constexpr KernelTable<Kernel<Access>, MR, NV> table{};
};

}  // namespace

namespace lowbit_brgemm {

KernelFn select_scalar(const Desc& d) {
  if (d.dtype == LOWBIT_DTYPE_F32) return &drive<Traits<F32Access>>;
  if (d.dtype == LOWBIT_DTYPE_BF16)
    return d.packed() ? &drive<Traits<Bf16PackedAccess>> : &drive<Traits<Bf16RowAccess>>;
  return nullptr;
}

}  // namespace lowbit_brgemm
