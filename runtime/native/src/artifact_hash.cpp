// XXH64 (xxHash's 64-bit variant, per its specification) and a one-pass pair of it with two
// seeds: the compile cache's fast weight digest (lowbit/artifact_hash.h).
#include "lowbit/artifact_hash.h"

#include <string.h>

namespace {

constexpr uint64_t P1 = 0x9E3779B185EBCA87ULL;
constexpr uint64_t P2 = 0xC2B2AE3D27D4EB4FULL;
constexpr uint64_t P3 = 0x165667B19E3779F9ULL;
constexpr uint64_t P4 = 0x85EBCA77C2B2AE63ULL;
constexpr uint64_t P5 = 0x27D4EB2F165667C5ULL;

inline uint64_t rotl(uint64_t x, int r) { return (x << r) | (x >> (64 - r)); }

inline uint64_t read64(const unsigned char* p) {
  uint64_t v;
  memcpy(&v, p, 8);  // little endian (x86-64 only)
  return v;
}

inline uint32_t read32(const unsigned char* p) {
  uint32_t v;
  memcpy(&v, p, 4);
  return v;
}

inline uint64_t round(uint64_t acc, uint64_t input) {
  acc += input * P2;
  acc = rotl(acc, 31);
  return acc * P1;
}

inline uint64_t merge(uint64_t acc, uint64_t val) {
  acc ^= round(0, val);
  return acc * P1 + P4;
}

struct State {
  uint64_t v[4];
  explicit State(uint64_t seed) : v{seed + P1 + P2, seed + P2, seed, seed - P1} {}
  uint64_t converge() const {
    uint64_t h = rotl(v[0], 1) + rotl(v[1], 7) + rotl(v[2], 12) + rotl(v[3], 18);
    for (int i = 0; i < 4; ++i) h = merge(h, v[i]);
    return h;
  }
};

// The tail (< 32 bytes) and the final avalanche.
uint64_t finish(uint64_t h, const unsigned char* p, size_t n_total, size_t rest) {
  h += n_total;
  while (rest >= 8) {
    h ^= round(0, read64(p));
    h = rotl(h, 27) * P1 + P4;
    p += 8;
    rest -= 8;
  }
  if (rest >= 4) {
    h ^= uint64_t(read32(p)) * P1;
    h = rotl(h, 23) * P2 + P3;
    p += 4;
    rest -= 4;
  }
  while (rest > 0) {
    h ^= uint64_t(*p) * P5;
    h = rotl(h, 11) * P1;
    ++p;
    --rest;
  }
  h ^= h >> 33;
  h *= P2;
  h ^= h >> 29;
  h *= P3;
  h ^= h >> 32;
  return h;
}

}  // namespace

extern "C" uint64_t lowbit_artifact_xxh64(const void* data, size_t n, uint64_t seed) {
  const unsigned char* p = static_cast<const unsigned char*>(data);
  const size_t stripes = n / 32;
  uint64_t h;
  if (stripes) {
    State s(seed);
    for (size_t i = 0; i < stripes; ++i, p += 32)
      for (int l = 0; l < 4; ++l) s.v[l] = round(s.v[l], read64(p + 8 * l));
    h = s.converge();
  } else {
    h = seed + P5;
  }
  return finish(h, p, n, n - 32 * stripes);
}

extern "C" void lowbit_artifact_digest128(const void* data, size_t n, uint64_t seed0, uint64_t seed1,
                                          uint64_t out[2]) {
  const unsigned char* p = static_cast<const unsigned char*>(data);
  const size_t stripes = n / 32;
  uint64_t h0, h1;
  if (stripes) {
    State a(seed0), b(seed1);
    for (size_t i = 0; i < stripes; ++i, p += 32) {
      const uint64_t w0 = read64(p), w1 = read64(p + 8), w2 = read64(p + 16), w3 = read64(p + 24);
      a.v[0] = round(a.v[0], w0);
      b.v[0] = round(b.v[0], w0);
      a.v[1] = round(a.v[1], w1);
      b.v[1] = round(b.v[1], w1);
      a.v[2] = round(a.v[2], w2);
      b.v[2] = round(b.v[2], w2);
      a.v[3] = round(a.v[3], w3);
      b.v[3] = round(b.v[3], w3);
    }
    h0 = a.converge();
    h1 = b.converge();
  } else {
    h0 = seed0 + P5;
    h1 = seed1 + P5;
  }
  const size_t rest = n - 32 * stripes;
  out[0] = finish(h0, p, n, rest);
  out[1] = finish(h1, p, n, rest);
}
