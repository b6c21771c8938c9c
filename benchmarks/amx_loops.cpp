// Loop structures for an AMX-INT8 low-bit tile, stand-alone (built and run by amx_loops.py).
//
// One ternary x int8 layer (M rows x N outputs x K, 2-bit codes in the packer's VNNI4 order:
// 64 bytes per 4-k step and 64-row n-block, field j of each byte = B tile j) computed by
// TDPBSUD with the 2 x 2 tile blocking of qgemm_amx.cpp under different loop structures.
// Only the structure is compared: no flush, no epilogue, the int32 sums are not checked
// (qgemm_amx.cpp's tests check the runtime's kernel). Each variant runs one whole layer
// between two tdpbsud bursts; the ratio to their mean is printed per repetition, so that the
// host's changing state (its AMX rate halves and recovers within seconds on the Xeon seen)
// moves both sides.
//
//   usage: amx_loops M N K REPS   ->  lines "variant rep GMAC/s ratio"
#include <immintrin.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>

namespace {

struct alignas(64) TileConfig {
  uint8_t palette, start_row, reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
};

__attribute__((noinline)) void configure() {
  TileConfig c;
  memset(&c, 0, sizeof(c));
  c.palette = 1;
  for (int t = 0; t < 8; ++t) c.rows[t] = 16, c.colsb[t] = 64;
  // gcc 12 drops stores into a local that only LDTILECFG reads
  asm volatile("" : : "r"(&c) : "memory");
  _tile_loadconfig(&c);
}

double now() {
  timespec t;
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &t);
  return t.tv_sec + 1e-9 * t.tv_nsec;
}

int M, N, K;
int8_t* apanels;   // activations as 64-column panels: panel b, row r at (b * M + r) * 64
uint8_t* codes;    // n-block j, 4-k step s at codes + (j * K / 4 + s) * 64
int32_t* acc;      // [M][64]
uint8_t* scratch;  // decoded B (layout per variant)
alignas(64) uint8_t l1codes[1024];

const __m512i kMask3 = _mm512_set1_epi8(3);

void zero_c() {
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
}
void load_c(int32_t* c) {
  _tile_loadd(0, c, 256);
  _tile_loadd(1, c + 16, 256);
  _tile_loadd(2, c + 16 * 64, 256);
  _tile_loadd(3, c + 16 * 64 + 16, 256);
}
void store_c(int32_t* c) {
  _tile_stored(0, c, 256);
  _tile_stored(1, c + 16, 256);
  _tile_stored(2, c + 16 * 64, 256);
  _tile_stored(3, c + 16 * 64 + 16, 256);
}
// A row pair's two A tiles (1 KiB apart) and the two B tiles at b0, b1 (64-byte rows).
inline void load_operands(const int8_t* a, const uint8_t* b0, const uint8_t* b1) {
  _tile_loadd(4, a, 64);
  _tile_loadd(5, a + 1024, 64);
  _tile_loadd(6, b0, 64);
  _tile_loadd(7, b1, 64);
}
inline void dp4() {
  _tile_dpbsud(0, 4, 6);
  _tile_dpbsud(1, 4, 7);
  _tile_dpbsud(2, 5, 6);
  _tile_dpbsud(3, 5, 7);
}

// The 4 fields of a code row into planes `rows` rows apart.
inline void decode_row(const uint8_t* p, uint8_t* dst, int64_t plane_stride) {
  const __m512i x = _mm512_loadu_si512(p);
  for (int j = 0; j < 4; ++j)
    _mm512_store_si512(dst + j * plane_stride, _mm512_and_si512(_mm512_srli_epi16(x, 2 * j), kMask3));
}

// Fields 2h, 2h+1 of a 64-k step's 16 code rows into two B tiles (b, b + 1 KiB).
inline void decode_half_step(const uint8_t* p, int h, uint8_t* b) {
#pragma GCC unroll 16
  for (int s = 0; s < 16; ++s) {
    const __m512i x = _mm512_srli_epi16(_mm512_loadu_si512(p + 64 * s), 4 * h);
    _mm512_store_si512(b + 64 * s, _mm512_and_si512(x, kMask3));
    _mm512_store_si512(b + 1024 + 64 * s, _mm512_and_si512(_mm512_srli_epi16(x, 2), kMask3));
  }
}

// The earlier runtime design: per n-block and chunk of 256 k, the 4 planes decoded once
// (16 KiB, L1) and used by every row pair; int32 sums spilled to acc between chunks.
__attribute__((noinline)) void chunked() {
  constexpr int kc = 256, rows = kc / 4;
  configure();
  for (int j = 0; j < N / 64; ++j)
    for (int k0 = 0; k0 < K; k0 += kc) {
      for (int s = 0; s < rows; ++s)
        decode_row(codes + ((int64_t)j * K / 4 + k0 / 4 + s) * 64, scratch + s * 64, rows * 64);
      for (int mp = 0; mp < M; mp += 32)
        for (int h = 0; h < 2; ++h) {
          int32_t* c = acc + mp * 64 + 32 * h;
          if (k0 == 0) zero_c(); else load_c(c);
          for (int kk = 0; kk < kc; kk += 64) {
            load_operands(apanels + ((int64_t)(k0 + kk) / 64 * M + mp) * 64,
                          scratch + (2 * h * rows + kk / 4) * 64, scratch + ((2 * h + 1) * rows + kk / 4) * 64);
            dp4();
          }
          store_c(c);
        }
    }
  _tile_release();
}

// C tiles kept for the whole K; the n-block's B planes for all of K (256 KiB at K = 4096,
// L2) decoded once per n-block, the next n-block's between the TDPBSUDs (two panels).
__attribute__((noinline)) void l2_panel() {
  const int rows = K / 4;
  const int64_t panel = (int64_t)rows * 256;
  configure();
  for (int s = 0; s < rows; ++s) decode_row(codes + s * 64, scratch + s * 64, rows * 64);
  for (int j = 0; j < N / 64; ++j) {
    const uint8_t* cur = scratch + (j & 1) * panel;
    uint8_t* next = scratch + ((j + 1) & 1) * panel;
    const bool more = j + 1 < N / 64;
    int s = 0;
    for (int mp = 0; mp < M; mp += 32)
      for (int h = 0; h < 2; ++h) {
        zero_c();
        for (int kk = 0; kk < K; kk += 64) {
          load_operands(apanels + ((int64_t)kk / 64 * M + mp) * 64, cur + (2 * h * rows + kk / 4) * 64,
                        cur + ((2 * h + 1) * rows + kk / 4) * 64);
          _tile_dpbsud(0, 4, 6);
          _tile_dpbsud(1, 4, 7);
          for (int u = 0; u < 2 && more && s < rows; ++u, ++s)
            decode_row(codes + ((int64_t)(j + 1) * K / 4 + s) * 64, next + s * 64, rows * 64);
          _tile_dpbsud(2, 5, 6);
          _tile_dpbsud(3, 5, 7);
        }
        store_c(acc + mp * 64 + 32 * h);
      }
  }
  _tile_release();
}

// C tiles kept for the whole K; each row pair decodes the half's two B tiles of step t + 4
// into a ring of 8 steps (16 KiB, L1) while the TDPBSUDs of step t run (the runtime's
// design). STREAM_A: activation tiles by TILELOADDT1. L1_CODES: the codes read from one
// L1-resident KiB instead (wrong values; what codes read from L1 would allow).
template <bool STREAM_A, bool L1_CODES>
__attribute__((noinline)) void ring() {
  constexpr int kRing = 8, kAhead = 4;
  const int steps = K / 64;
  configure();
  for (int j = 0; j < N / 64; ++j) {
    const uint8_t* w = codes + (int64_t)j * K / 4 * 64;
    for (int mp = 0; mp < M; mp += 32)
      for (int h = 0; h < 2; ++h) {
        auto decode = [&](int t) {
          decode_half_step(L1_CODES ? l1codes : w + t * 1024, h, scratch + (t % kRing) * 2048);
        };
        for (int t = 0; t < kAhead; ++t) decode(t);
        zero_c();
        for (int t = 0; t < steps; ++t) {
          const int8_t* a = apanels + ((int64_t)t * M + mp) * 64;
          if (STREAM_A) {
            _tile_stream_loadd(4, a, 64);
            _tile_stream_loadd(5, a + 1024, 64);
          } else {
            _tile_loadd(4, a, 64);
            _tile_loadd(5, a + 1024, 64);
          }
          _tile_loadd(6, scratch + (t % kRing) * 2048, 64);
          _tile_loadd(7, scratch + (t % kRing) * 2048 + 1024, 64);
          _tile_dpbsud(0, 4, 6);
          _tile_dpbsud(1, 4, 7);
          if (t + kAhead < steps) decode(t + kAhead);
          _tile_dpbsud(2, 5, 6);
          _tile_dpbsud(3, 5, 7);
        }
        store_c(acc + mp * 64 + 32 * h);
      }
  }
  _tile_release();
}

// No decode at all: C for the whole K, A and B tiles both streamed from L2 (B from a panel
// of already decoded bytes). The tile stream's own bound.
__attribute__((noinline)) void no_decode() {
  const int rows = K / 4;
  configure();
  for (int j = 0; j < N / 64; ++j)
    for (int mp = 0; mp < M; mp += 32)
      for (int h = 0; h < 2; ++h) {
        zero_c();
        for (int kk = 0; kk < K; kk += 64) {
          load_operands(apanels + ((int64_t)kk / 64 * M + mp) * 64, scratch + (2 * h * rows + kk / 4) * 64,
                        scratch + ((2 * h + 1) * rows + kk / 4) * 64);
          dp4();
        }
        store_c(acc + mp * 64 + 32 * h);
      }
  _tile_release();
}

// The tdpbsud burst: 4 independent C tiles, operands loaded once (benchmarks/peaks.py's loop).
__attribute__((noinline)) double burst(int iters) {
  configure();
  alignas(64) static int8_t src[1024];
  _tile_loadd(4, src, 64);
  _tile_loadd(5, src, 64);
  _tile_loadd(6, src, 64);
  _tile_loadd(7, src, 64);
  zero_c();
  const double t0 = now();
  for (int i = 0; i < iters; ++i) dp4();
  const double dt = now() - t0;
  store_c(acc);
  _tile_release();
  return 4.0 * 16 * 16 * 64 * iters / dt;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 5) {
    fprintf(stderr, "usage: %s M N K REPS\n", argv[0]);
    return 2;
  }
  M = atoi(argv[1]), N = atoi(argv[2]), K = atoi(argv[3]);
  const int reps = atoi(argv[4]);
  if (M % 32 || N % 64 || K % 256 || M <= 0 || N <= 0 || K <= 0 || reps <= 0) {
    fprintf(stderr, "M must be a multiple of 32, N of 64, K of 256\n");
    return 2;
  }
  // 0x1023: ARCH_REQ_XCOMP_PERM, 18: XFEATURE_XTILEDATA
  if (syscall(SYS_arch_prctl, 0x1023, 18) != 0) {
    fprintf(stderr, "Linux refused the AMX tile state\n");
    return 3;
  }
  apanels = static_cast<int8_t*>(aligned_alloc(64, (size_t)M * K));
  codes = static_cast<uint8_t*>(aligned_alloc(64, (size_t)N * K / 4));
  acc = static_cast<int32_t*>(aligned_alloc(64, (size_t)M * 64 * 4));
  scratch = static_cast<uint8_t*>(aligned_alloc(64, (size_t)K * 512 + (64 << 10)));
  for (size_t i = 0; i < (size_t)M * K; ++i) apanels[i] = int8_t(i * 7);
  for (size_t i = 0; i < (size_t)N * K / 4; ++i) codes[i] = uint8_t(i * 13);
  memset(scratch, 1, (size_t)K * 512 + (64 << 10));
  memset(l1codes, 0x5a, sizeof(l1codes));
  struct Variant {
    const char* name;
    void (*run)();
  } variants[] = {
      {"chunked_256", chunked},
      {"l2_panel", l2_panel},
      {"ring", ring<false, false>},
      {"ring_t1", ring<true, false>},
      {"bound_codes_in_l1", ring<true, true>},
      {"bound_no_decode", no_decode},
  };
  const double macs = (double)M * N * K;
  for (int r = 0; r < reps; ++r)
    for (const Variant& v : variants) {
      const double p0 = burst(20000);
      const double t0 = now();
      v.run();
      const double g = macs / (now() - t0);
      const double p1 = burst(20000);
      printf("%s %d %.1f %.4f %.1f\n", v.name, r, g / 1e9, g / (0.5 * (p0 + p1)), 0.5 * (p0 + p1) / 1e9);
    }
  return 0;
}
