// Fused attention, portable path (no ISA flags; the compiler may still use SSE2).
#include "attention_internal.h"
#include "bf16.h"

namespace lowbit::attn {
namespace {

struct Scalar {
  static void to_f32(const char* src, float* dst, int64_t n, bool bf16) {
    if (!bf16) {
      memcpy(dst, src, size_t(n) * sizeof(float));
      return;
    }
    const uint16_t* s = reinterpret_cast<const uint16_t*>(src);
    for (int64_t i = 0; i < n; ++i) dst[i] = lowbit_bf16::bf16_to_f32(s[i]);
  }
  static float dot(const float* a, const float* b, int64_t n) {
    float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
      for (int u = 0; u < 8; ++u) acc[u] += a[i + u] * b[i + u];
    float r = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
    for (; i < n; ++i) r += a[i] * b[i];
    return r;
  }
  static void axpy(float* y, float a, const float* x, int64_t n) {
    for (int64_t i = 0; i < n; ++i) y[i] += a * x[i];
  }
  static void scal(float* y, float c, int64_t n) {
    for (int64_t i = 0; i < n; ++i) y[i] *= c;
  }
  static float max(const float* s, int n) {
    float m = -INFINITY;
    for (int i = 0; i < n; ++i) m = s[i] > m ? s[i] : m;
    return m;
  }
  static float exp_sum(float* s, int n, float m) {
    float sum = 0.f;
    for (int i = 0; i < n; ++i) {
      s[i] = s[i] == -INFINITY ? 0.f : expf(s[i] - m);
      sum += s[i];
    }
    return sum;
  }
  static constexpr bool kDirectBf16 = false;  // run_heads widens bf16 rows to fp32 first
  template <int NQ>
  static void scores_n(const float* q, int64_t n, const char* const* rows, const int* cols, int nc, const uint64_t* allow,
                       float scale, float* s) {
    block_scores<NQ>(
        [&](const char* const* k, float out[kQB][4]) {
          for (int i = 0; i < NQ; ++i)
            for (int c = 0; c < 4; ++c) out[i][c] = dot(q + i * n, reinterpret_cast<const float*>(k[c]), n);
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
        if (w != 0.f) axpy(acc + i * n, w, reinterpret_cast<const float*>(v[c]), n);
      }
  }
  static uint64_t nonzero_bits(const uint8_t* m, int64_t step, int n) {
    uint64_t bits = 0;
    for (int j = 0; j < n; ++j) bits |= uint64_t(m[j * step] != 0) << j;
    return bits;
  }
  static void store(const float* acc, float c, char* dst, int64_t n, bool bf16) {
    if (!bf16) {
      float* d = reinterpret_cast<float*>(dst);
      for (int64_t i = 0; i < n; ++i) d[i] = acc[i] * c;
      return;
    }
    uint16_t* d = reinterpret_cast<uint16_t*>(dst);
    for (int64_t i = 0; i < n; ++i) d[i] = lowbit_bf16::f32_to_bf16(acc[i] * c);
  }
};

}  // namespace

void heads_scalar(const Args& a) { run_heads<Scalar>(a); }

}  // namespace lowbit::attn
