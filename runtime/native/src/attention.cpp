// lowbit_attention_invoke: argument checks and the run-time ISA choice for the fused
// attention kernels (attention_internal.h has the algorithm).
#include "attention_internal.h"

using namespace lowbit::attn;

namespace {

thread_local int32_t t_last_isa = -1;

bool mask_dim_ok(int64_t m, int64_t full) { return m == 1 || m == full; }

}  // namespace

extern "C" {

int32_t lowbit_attention_invoke(int32_t dtype, int64_t q, int64_t k, int64_t v, int64_t mask, int64_t out,
                                int64_t B, int64_t H, int64_t Hkv, int64_t T, int64_t S, int64_t D,
                                int64_t mb, int64_t mh, int64_t mt, int64_t ms, float scale, int32_t flags,
                                int64_t bh_begin, int64_t bh_end) {
  if (dtype != LOWBIT_ATTN_F32 && dtype != LOWBIT_ATTN_BF16) return -LOWBIT_E_UNSUPPORTED;
  if (flags & ~LOWBIT_ATTN_CAUSAL) return -LOWBIT_E_UNSUPPORTED;
  if (B < 0 || H < 1 || Hkv < 1 || T < 0 || S < 0 || D < 1 || H % Hkv) return -LOWBIT_E_SHAPE;
  if (bh_begin < 0 || bh_end < bh_begin || bh_end > B * H) return -LOWBIT_E_SHAPE;
  if (mask && !(mask_dim_ok(mb, B) && mask_dim_ok(mh, H) && mask_dim_ok(mt, T) && mask_dim_ok(ms, S)))
    return -LOWBIT_E_SHAPE;
  if (bh_begin == bh_end || T == 0) return 0;
  if (!q || !out || (S > 0 && (!k || !v))) return -LOWBIT_E_UNSUPPORTED;
  Args a;
  a.bf16 = dtype == LOWBIT_ATTN_BF16;
  a.q = reinterpret_cast<const char*>(q);
  a.k = reinterpret_cast<const char*>(k);
  a.v = reinterpret_cast<const char*>(v);
  a.mask = reinterpret_cast<const uint8_t*>(mask);
  a.out = reinterpret_cast<char*>(out);
  a.B = B, a.H = H, a.Hkv = Hkv, a.T = T, a.S = S, a.D = D;
  a.mb = mb, a.mh = mh, a.mt = mt, a.ms = ms;
  a.scale = scale;
  a.causal = flags & LOWBIT_ATTN_CAUSAL;
  a.bh_begin = bh_begin, a.bh_end = bh_end;
  // AMX has no attention kernel: its CPUs run the AVX-512 one.
  const int32_t isa = lowbit_rt_isa() == LOWBIT_ISA_AMX ? LOWBIT_ISA_AVX512 : lowbit_rt_isa();
  t_last_isa = isa;
  switch (isa) {
    case LOWBIT_ISA_AVX512: heads_avx512(a); break;
    case LOWBIT_ISA_AVX2: heads_avx2(a); break;
    default: heads_scalar(a); break;
  }
  return 0;
}

const char* lowbit_attention_last_isa(void) {
  return t_last_isa < 0 ? "none" : lowbit_rt_isa_name(t_last_isa);
}

}  // extern "C"
