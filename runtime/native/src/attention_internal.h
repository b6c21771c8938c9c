// Fused attention core (lowbit/attention.h), written once over per-ISA primitives.
//
// Each ISA's translation unit (attention_scalar.cpp, attention_avx2.cpp, attention_avx512.cpp)
// defines a primitives struct P and instantiates `run_heads<P>`, compiled with that ISA's flags:
//   P::to_f32(src, dst, n, bf16)     dst = src as fp32
//   P::scal(y, c, n)                 y *= c
//   P::exp_sum(s, n, m)              s[i] = exp(s[i] - m) (0 where s[i] == -inf), returns the sum
//   P::max(s, n)                     max of s (-inf for an all -inf row)
//   P::store(acc, c, dst, n, bf16)   dst = acc * c, rounded to bf16 (nearest even) when bf16
//   P::scores(q, nq, n, rows, cols, nc, allow, scale, s, bf16, resident)  one key block's scores:
//                                    s[i * kKB + cols[c]] = scale * dot(q + i * n, rows[c], n) where
//                                    bit cols[c] of allow[i] is set, -inf elsewhere (i < nq <= 4,
//                                    c < nc; rows fp32, or bf16 when bf16: only if kDirectBf16;
//                                    resident: the rows are likely in cache). block_scores below
//                                    is the loop, over a 4-key dots of the ISA.
//   P::pv(acc, nq, n, p, cols, nc, v, bf16, resident) acc[i] += sum_c p[i * kKB + cols[c]] * v[c]
//                                    (i < nq), v[c] and resident as for scores
//   P::kDirectBf16                   scores / pv can read bf16 rows themselves (else, and for
//                                    more than 2 queries, run_heads widens each block's rows first)
//   P::nonzero_bits(m, step, n)      bit j set iff m[j * step] != 0 (j < n <= 64)
#ifndef LOWBIT_ATTENTION_INTERNAL_H
#define LOWBIT_ATTENTION_INTERNAL_H

#include <math.h>
#include <stdint.h>
#include <string.h>

#include <vector>

#include "lowbit/attention.h"

namespace lowbit::attn {

struct Args {
  bool bf16;
  const char* q;
  const char* k;
  const char* v;
  const uint8_t* mask;
  char* out;
  int64_t B, H, Hkv, T, S, D;
  int64_t mb, mh, mt, ms;
  float scale;
  bool causal;
  int64_t bh_begin, bh_end;
};

using HeadsFn = void (*)(const Args&);
void heads_scalar(const Args&);
void heads_avx2(const Args&);
void heads_avx512(const Args&);

constexpr int kQB = 4;   // queries per block: each K/V row read serves kQB queries
constexpr int kKB = 64;  // keys per block: the unit of skipping and of the online softmax

// One key block's scores for NQ queries, 4 keys per dots4(rows4, out) call (out[i][u] =
// q_i . rows4[u]); a remainder of < 4 keys repeats its last row. Instantiated per NQ (and per
// ISA form) so that the stores below unroll and the dispatch happens once per block.
template <int NQ, class Dots4>
__attribute__((always_inline)) inline void block_scores(Dots4&& dots4, const char* const* rows, const int* cols, int nc,
                                                        const uint64_t* allow, float scale, float* s) {
  const float ninf = -INFINITY;
  float out[kQB][4];
  int c = 0;
  for (; c + 4 <= nc; c += 4) {
    dots4(rows + c, out);
#pragma GCC unroll 4
    for (int i = 0; i < NQ; ++i)
#pragma GCC unroll 4
      for (int u = 0; u < 4; ++u) {
        const int j = cols[c + u];
        s[i * kKB + j] = (allow[i] >> j) & 1 ? out[i][u] * scale : ninf;
      }
  }
  if (c < nc) {
    const int r = nc - c;
    const char* four[4];
    for (int u = 0; u < 4; ++u) four[u] = rows[c + (u < r ? u : r - 1)];
    dots4(four, out);
    for (int i = 0; i < NQ; ++i)
      for (int u = 0; u < r; ++u) {
        const int j = cols[c + u];
        s[i * kKB + j] = (allow[i] >> j) & 1 ? out[i][u] * scale : ninf;
      }
  }
}

// scores / pv / nonzero_bits for an ISA without register-blocked forms (AVX2, scalar): one
// P::dot per (query, key) and one P::axpy per (query, visible value row), on fp32 rows only
// (run_heads widens bf16 rows first). Used as a base: `struct Avx2 : RowwiseFp32<Avx2>`.
template <class P>
struct RowwiseFp32 {
  static constexpr bool kDirectBf16 = false;
  template <int NQ>
  static void scores_n(const float* q, int64_t n, const char* const* rows, const int* cols, int nc, const uint64_t* allow,
                       float scale, float* s) {
    block_scores<NQ>(
        [&](const char* const* k, float out[kQB][4]) {
          for (int i = 0; i < NQ; ++i)
            for (int c = 0; c < 4; ++c) out[i][c] = P::dot(q + i * n, reinterpret_cast<const float*>(k[c]), n);
        },
        rows, cols, nc, allow, scale, s);
  }
  static void scores(const float* q, int nq, int64_t n, const char* const* rows, const int* cols, int nc,
                     const uint64_t* allow, float scale, float* s, bool, bool) {
    switch (nq) {
      case 1: scores_n<1>(q, n, rows, cols, nc, allow, scale, s); break;
      case 2: scores_n<2>(q, n, rows, cols, nc, allow, scale, s); break;
      case 3: scores_n<3>(q, n, rows, cols, nc, allow, scale, s); break;
      default: scores_n<4>(q, n, rows, cols, nc, allow, scale, s); break;
    }
  }
  static void pv(float* acc, int nq, int64_t n, const float* p, const int* cols, int nc, const char* const* v, bool, bool) {
    for (int c = 0; c < nc; ++c)
      for (int i = 0; i < nq; ++i) {
        const float w = p[i * kKB + cols[c]];
        if (w != 0.f) P::axpy(acc + i * n, w, reinterpret_cast<const float*>(v[c]), n);
      }
  }
  static uint64_t nonzero_bits(const uint8_t* m, int64_t step, int n) {
    uint64_t bits = 0;
    for (int j = 0; j < n; ++j) bits |= uint64_t(m[j * step] != 0) << j;
    return bits;
  }
};

template <class P>
void run_heads(const Args& a) {
  const int64_t D = a.D, S = a.S, T = a.T;
  const size_t es = a.bf16 ? 2 : 4;
  const size_t row_bytes = size_t(D) * es;
  thread_local std::vector<float> storage;
  const size_t need = size_t(2 * kQB * D + 2 * kKB * D + kQB * kKB);
  if (storage.size() < need) storage.resize(need);
  float* qf = storage.data();       // [kQB][D] queries as fp32
  float* acc = qf + kQB * D;        // [kQB][D] running P.V
  float* kblk = acc + kQB * D;      // [kKB][D] the block's visible keys as fp32 (bf16 only)
  float* vblk = kblk + kKB * D;     // [kKB][D] the block's visible values as fp32 (bf16 only)
  float* s = vblk + kKB * D;        // [kQB][kKB] scores, then probabilities
  uint64_t allow[kQB];              // visible keys of the block per query (bit j)
  int vis[kKB];                     // visible columns of the block
  const char* rows[kKB];            // their K (then V) rows: fp32, or bf16 read directly
  const int64_t group = a.H / a.Hkv;
  const float ninf = -INFINITY;

  // One pass over a KV head serves every query of the call that reads it: the T queries of
  // each of its query heads inside [bh_begin, bh_end) (GQA: up to H / Hkv heads), taken
  // head by head in blocks of kQB. A GQA decode step (T = 1) thus scores and sums 4 heads
  // per K/V row read instead of re-reading the rows once per head.
  for (int64_t bh = a.bh_begin; bh < a.bh_end;) {
    const int64_t b = bh / a.H, h0 = bh % a.H, hk = h0 / group;
    int64_t h1 = (hk + 1) * group;                                  // end of this KV head's group
    if (b * a.H + h1 > a.bh_end) h1 = a.bh_end - b * a.H;         // or of the call's range
    const int64_t nqall = (h1 - h0) * T;
    bh = b * a.H + h1;
    const char* kh = a.k + size_t((b * a.Hkv + hk) * S * D) * es;
    const char* vh = a.v + size_t((b * a.Hkv + hk) * S * D) * es;
    const int64_t m_row = a.mask && a.mt > 1 ? a.ms : 0;
    const int64_t m_col = a.mask && a.ms > 1 ? 1 : 0;
    int64_t hn = h0, tn = 0;  // head and position of the next query (no divisions per block)
    for (int64_t u0 = 0; u0 < nqall; u0 += kQB) {
      const int nq = int(nqall - u0 < kQB ? nqall - u0 : kQB);
      float m[kQB], l[kQB];
      int64_t tq[kQB];                 // query i's position (for the causal limit)
      char* oq[kQB];                   // its output row
      const uint8_t* mq[kQB];          // its mask row (nullptr: no mask)
      int64_t tmax = 0;
      for (int i = 0; i < nq; ++i) {
        const int64_t h = hn, t = tn;
        if (++tn == T) tn = 0, ++hn;
        const size_t row = size_t(((b * a.H + h) * T + t) * D) * es;
        tq[i] = t;
        tmax = t > tmax ? t : tmax;
        oq[i] = a.out + row;
        mq[i] = a.mask ? a.mask + ((a.mb > 1 ? b : 0) * a.mh + (a.mh > 1 ? h : 0)) * a.mt * a.ms + t * m_row
                       : nullptr;
        P::to_f32(a.q + row, qf + i * D, D, a.bf16);
        memset(acc + i * D, 0, size_t(D) * sizeof(float));
        m[i] = ninf;
        l[i] = 0.f;
      }
      // bf16 K/V rows: read directly by 1-2 queries; for 3-4 the block's rows are widened to
      // fp32 first (one tight streaming pass, then the dots from L1: measured 1.3x faster
      // from DRAM than widening inside the 4-query dots).
      const bool widen = a.bf16 && (!P::kDirectBf16 || nq > 2);
      const bool raw_bf16 = a.bf16 && !widen;
      // Rows in cache: widened into the block buffer, or read again by a later query block of
      // this KV head (prefill; the first block streamed them). Scored in lockstep then.
      const bool resident = widen || u0 > 0;
      int64_t kend = S;
      if (a.causal && tmax + 1 < kend) kend = tmax + 1;  // keys after the block's last query
      for (int64_t k0 = 0; k0 < kend; k0 += kKB) {
        const int nk = int(kend - k0 < kKB ? kend - k0 : kKB);
        // Visibility as bit sets (bit j = key k0 + j): mask bytes, then the causal limit.
        const uint64_t all = nk == 64 ? ~uint64_t(0) : (uint64_t(1) << nk) - 1;
        uint64_t colbits = 0;
        for (int i = 0; i < nq; ++i) {
          uint64_t bits = all;
          if (mq[i]) bits &= P::nonzero_bits(mq[i] + k0 * m_col, m_col, nk);
          if (a.causal) {
            const int64_t last = tq[i] - k0;  // highest visible key in the block
            bits &= last < 0 ? 0 : last >= 63 ? ~uint64_t(0) : (uint64_t(1) << (last + 1)) - 1;
          }
          allow[i] = bits;
          colbits |= bits;
        }
        const bool any = colbits != 0;
        if (!any) continue;  // nobody sees these keys: K and V rows are not read
        int nv = 0;
        for (uint64_t bits = colbits; bits; bits &= bits - 1) vis[nv++] = __builtin_ctzll(bits);
        for (uint64_t bits = all & ~colbits; bits; bits &= bits - 1) {  // columns nobody sees
          const int j = __builtin_ctzll(bits);
          for (int i = 0; i < nq; ++i) s[i * kKB + j] = ninf;
        }
        // Visible keys only (a column nobody sees is never read), as fp32. The row loops are
        // kept free of per-row branches and multiplies (with the scores and P.V out of line,
        // gcc vectorizes them; before, they cost ~10% of causal prefill).
        const char* kb = kh + size_t(k0 * D) * es;
        if (widen) {
          for (int c = 0; c < nv; ++c) {
            P::to_f32(kb + size_t(vis[c]) * row_bytes, kblk + c * D, D, true);
            rows[c] = reinterpret_cast<const char*>(kblk + c * D);
          }
        } else {
          for (int c = 0; c < nv; ++c) rows[c] = kb + size_t(vis[c]) * row_bytes;
        }
        P::scores(qf, nq, D, rows, vis, nv, allow, a.scale, s, raw_bf16, resident);
        for (int i = 0; i < nq; ++i) {
          float* si = s + i * kKB;
          const float mx = P::max(si, nk);
          if (mx == ninf) {  // this query sees nothing in the block: it adds nothing
            for (int j = 0; j < nk; ++j) si[j] = 0.f;
            continue;
          }
          const float mnew = mx > m[i] ? mx : m[i];
          if (m[i] != ninf && mnew != m[i]) {
            const float corr = expf(m[i] - mnew);
            l[i] *= corr;
            P::scal(acc + i * D, corr, D);
          }
          m[i] = mnew;
          l[i] += P::exp_sum(si, nk, mnew);
        }
        const char* vb = vh + size_t(k0 * D) * es;
        if (widen) {
          for (int c = 0; c < nv; ++c) {
            P::to_f32(vb + size_t(vis[c]) * row_bytes, vblk + c * D, D, true);
            rows[c] = reinterpret_cast<const char*>(vblk + c * D);
          }
        } else {
          for (int c = 0; c < nv; ++c) rows[c] = vb + size_t(vis[c]) * row_bytes;
        }
        P::pv(acc, nq, D, s, vis, nv, rows, raw_bf16, resident);
      }
      for (int i = 0; i < nq; ++i) {
        // All keys masked: a zero row (eager CPU SDPA's answer), not 0/0. NaN stays NaN.
        const float inv = l[i] == 0.f ? 0.f : 1.f / l[i];
        P::store(acc + i * D, inv, oq[i], D, a.bf16);
      }
    }
  }
}

}  // namespace lowbit::attn
#endif
