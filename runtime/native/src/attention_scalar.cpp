// Fused attention, portable path (no ISA flags; the compiler may still use SSE2).
#include "attention_internal.h"
#include "bf16.h"

namespace lowbit::attn {
namespace {

struct Scalar : RowwiseFp32<Scalar> {  // scores, pv, nonzero_bits: attention_internal.h
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
