// Portable low-bit tile and activation quantizer: the reference the SIMD paths are tested
// against, and the path for CPUs without AVX2. Decodes each (n-block, K-block) once into
// bytes and reuses it for every row of A.
#include <math.h>
#include <stdlib.h>

#include <algorithm>
#include <vector>

#include "qgemm_internal.h"

namespace lowbit {
namespace q {

namespace {

// Decode the codes of one K-block of one n-block into u[n_local][k] (bytes).
void decode_kblock(const Format& f, const uint8_t* codes, int64_t kblock, uint8_t* u) {
  const int mask = (1 << f.bits) - 1;
  for (int64_t nl = 0; nl < NB; ++nl)
    for (int64_t k = 0; k < kblock; ++k) {
      int64_t byte;
      int shift;
      code_position(f.bits, nl, k, &byte, &shift);
      u[nl * kblock + k] = uint8_t((codes[byte] >> shift) & mask);
    }
}

float load_act(int32_t t, const void* base, int64_t i) {
  if (t == LOWBIT_QT_F32) return static_cast<const float*>(base)[i];
  return bf16_to_f32(static_cast<const uint16_t*>(base)[i]);
}

}  // namespace

// The epilogue's activation (docs in lowbit/qgemm.h), in fp32; libm expf (< 1 ulp).
float apply_act_scalar(int32_t flags, float v) {
  // ReLU as torch.relu: NaN stays NaN, -0 stays -0 (only v < 0 becomes 0).
  if (flags & LOWBIT_QF_ACT_RELU) return v < 0.0f ? 0.0f : v;
  if (flags & LOWBIT_QF_ACT_RELU2) {
    const float r = v < 0.0f ? 0.0f : v;
    return r * r;
  }
  if (flags & LOWBIT_QF_ACT_SILU) return v / (1.0f + expf(-v));
  return v;
}

void tile_scalar(const Desc& d, const Args& g) {
  const Format& f = d.f;
  const int64_t kb = d.kblock, cb = codes_bytes(f, kb);
  const bool int8_a = d.atype == LOWBIT_QT_INT8;
  const bool per_block = d.flags & LOWBIT_QF_ASCALE_PER_BLOCK;
  std::vector<uint8_t> u(size_t(NB * kb));
  std::vector<float> acc(size_t(d.m * NB));

  for (int64_t n0 = 0; n0 < d.n; n0 += NB) {
    const uint8_t* nblock = g.b + (n0 / NB) * d.ldb;
    std::fill(acc.begin(), acc.end(), 0.0f);
    for (int64_t i = 0; i < g.count; ++i) {
      const uint8_t* blk = nblock + i * d.stride_b;
      const float* scale = reinterpret_cast<const float*>(blk + cb);
      const int32_t* off = kblock_offsets(f, blk, cb);
      decode_kblock(f, blk, kb, u.data());
      for (int64_t r = 0; r < d.m; ++r) {
        float* out = &acc[size_t(r * NB)];
        if (int8_a) {
          const int8_t* x = static_cast<const int8_t*>(g.a) + r * d.lda + i * d.stride_a;
          const uint32_t rs = uint32_t(g.a_sum[r * d.ld_aux + i]);
          const float inv = per_block ? 1.0f / g.a_scale[r * d.ld_aux + i] : 1.0f;
          for (int64_t nl = 0; nl < NB; ++nl) {
            const uint8_t* w = &u[size_t(nl * kb)];
            uint32_t s = 0;  // wraps like vpdpbusd; the corrected sum below is exact mod 2^32
            for (int64_t k = 0; k < kb; ++k) s += uint32_t(int32_t(x[k]) * int32_t(w[k]));
            const int32_t t = int32_t(uint32_t(f.a) * s - uint32_t(off ? off[nl] : f.offset) * rs);
            out[nl] += float(t) * scale[nl] * inv;
          }
        } else {
          const int64_t x0 = r * d.lda + i * d.stride_a;
          for (int64_t nl = 0; nl < NB; ++nl) {
            const uint8_t* w = &u[size_t(nl * kb)];
            const float c = float(off ? off[nl] : f.offset);
            float s = 0.0f;
            for (int64_t k = 0; k < kb; ++k)
              s += load_act(d.atype, g.a, x0 + k) * (float(f.a * w[k]) - c);
            out[nl] += s * scale[nl];
          }
        }
      }
    }
    const int64_t nvalid = std::min<int64_t>(NB, d.n - n0);
    for (int64_t r = 0; r < d.m; ++r) {
      const float inv = (int8_a && !per_block) ? 1.0f / g.a_scale[r] : 1.0f;
      for (int64_t nl = 0; nl < nvalid; ++nl) {
        float v = acc[size_t(r * NB + nl)] * inv;
        if (d.flags & LOWBIT_QF_BIAS) v += g.bias[n0 + nl];
        v = apply_act_scalar(d.flags, v);
        const int64_t ci = r * d.ldc + n0 + nl;
        if (d.ctype == LOWBIT_QT_F32) {
          float* c = static_cast<float*>(g.c);
          c[ci] = (d.flags & LOWBIT_QF_BETA1) ? c[ci] + v : v;
        } else {
          uint16_t* c = static_cast<uint16_t*>(g.c);
          if (d.flags & LOWBIT_QF_BETA1) v += bf16_to_f32(c[ci]);
          c[ci] = f32_to_bf16(v);
        }
      }
    }
  }
}

// NaN / Inf (docs/kernels.md "NaN and Inf"): eager's s = 127 / amax is NaN for a NaN amax and
// its round(x * s) is NaN at every +-Inf (Inf * 0), so every output of such a row is NaN.
// int8 codes cannot hold NaN: the row (per-token) or K-block (per-block) gets scale NaN, codes
// 0 and row sum 0, and the tiles' division by the scale makes the outputs NaN.
void quant_act_scalar(const QuantArgs& qa) {
  const bool per_block = qa.flags & LOWBIT_QF_ASCALE_PER_BLOCK;
  const bool unit = qa.flags & LOWBIT_QF_AUNIT;  // x already int8 values: scale 1
  const float kNaN = __builtin_nanf("");
  // amax over [k0, k1), NaN if any value is NaN or +-Inf.
  auto amax_of = [&](int64_t x0, int64_t k0, int64_t k1) {
    float amax = 0.0f;
    bool finite = true;
    for (int64_t k = k0; k < k1; ++k) {
      const float a = fabsf(load_act(qa.xtype, qa.x, x0 + k));
      finite &= a <= 3.40282347e38f;
      amax = fmaxf(amax, a);
    }
    return finite ? amax : kNaN;
  };
  for (int64_t r = 0; r < qa.m; ++r) {
    const int64_t x0 = r * qa.ldx;
    float s_row = 0.0f;
    if (!per_block) {
      const float amax = amax_of(x0, 0, qa.k);
      s_row = amax != amax ? kNaN : unit ? 1.0f : 127.0f / fmaxf(amax, 1e-5f);  // (fmaxf would drop a NaN)
      qa.scale[r] = s_row;
    }
    for (int64_t b = 0; b < qa.nkb; ++b) {
      const int64_t k0 = b * qa.kblock, k1 = std::min(qa.k, k0 + qa.kblock);
      float s = s_row;
      if (per_block) {
        const float amax = amax_of(x0, k0, k1);
        s = amax != amax ? kNaN : 127.0f / fmaxf(amax, 1e-5f);
        qa.scale[r * qa.ld_aux + b] = s;
      }
      int32_t sum = 0;
      if (s != s) {
        for (int64_t k = k0; k < k1; ++k) qa.xq[r * qa.ldq + k] = 0;
      } else {
        for (int64_t k = k0; k < k1; ++k) {
          const float p = load_act(qa.xtype, qa.x, x0 + k) * s;
          const float v = fminf(fmaxf(nearbyintf(p), -128.0f), 127.0f);
          qa.xq[r * qa.ldq + k] = int8_t(v);
          sum += int32_t(v);
        }
      }
      for (int64_t k = k1; k < k0 + qa.kblock; ++k) qa.xq[r * qa.ldq + k] = 0;
      qa.rowsum[r * qa.ld_aux + b] = sum;
    }
  }
}

}  // namespace q
}  // namespace lowbit
