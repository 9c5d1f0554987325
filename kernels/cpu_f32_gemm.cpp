// fp32 GEMM for few rows (decode batches) on x86-64 with AVX2 + FMA (built and loaded with the
// other sources by kernels/native.py; the avx512 build compiles it for AVX2 + FMA as well).
//
// Why: at 1-4 rows a decode step streams the weights, and oneDNN's prepacked fp32 matmul read
// them at ~9-11 GB/s on one thread where the core reads ~22 (loadtests/decode_profile.py); the
// engine gives this kernel the lm_head (49152 x 576, 113 MB in fp32, read whole every step), as
// it gives the bf16 one in bf16. The weight is
// repacked once into blocks of eight output channels ([N/8][K][8] floats, the last block padded
// with zeros), so each input k is one broadcast of x[m][k] times one 8-lane load, into 8 output
// lanes: no horizontal sums. Two blocks (16 channels) per pass meet the (up to four) activation
// rows; sums in fp32, in k order per channel.

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "cpu_simd.h"
#include "cpu_threads.h"

#if defined(SLIM_ISA_AVX2)
#define SLIM_F32
#else
#define SLIM_F32 __attribute__((target("avx2,fma")))
#endif

// From 8 rows oneDNN's register blocking wins (kernels/README.md): decode at batch 1-4.
static const int64_t F32_GEMM_MAX_ROWS = 4;
static const int64_t F32_BLOCK = 8;         // output channels per block: one YMM
static const int64_t F32_ROW_GROUP = 4;     // activation rows per tile: 2 x 4 accumulators
static const int64_t F32_PREFETCH = 4096;   // floats (16 KiB) the loads run ahead of the FMAs

extern "C" int64_t slim_f32_gemm_max_rows(void) { return F32_GEMM_MAX_ROWS; }

extern "C" int64_t slim_f32_packed_elements(int64_t n, int64_t k) {
  return (n + F32_BLOCK - 1) / F32_BLOCK * F32_BLOCK * k;
}

// w fp32 [N, K] row-major -> packed [N/8][K][8] (zeros past N).
extern "C" void slim_f32_pack(const float *w, int64_t n, int64_t k, float *packed) {
  const int64_t blocks = (n + F32_BLOCK - 1) / F32_BLOCK;
  for (int64_t b = 0; b < blocks; b++)
    for (int64_t i = 0; i < k; i++)
      for (int64_t c = 0; c < F32_BLOCK; c++) {
        const int64_t channel = b * F32_BLOCK + c;
        packed[(b * k + i) * F32_BLOCK + c] = channel < n ? w[channel * k + i] : 0.0f;
      }
}

// BLOCKS blocks of 8 channels starting at `block` against ROWS rows of x starting at row0.
template <int ROWS, int BLOCKS>
SLIM_F32 static void f32_tile(const float *x, int64_t stride, int64_t k, const float *packed,
                              int64_t block, const float *bias, int64_t n, float *out,
                              int64_t row0) {
  __m256 acc[BLOCKS][ROWS];
#pragma GCC unroll 2
  for (int b = 0; b < BLOCKS; b++)
#pragma GCC unroll 4
    for (int m = 0; m < ROWS; m++) acc[b][m] = _mm256_setzero_ps();
  const float *w[BLOCKS];
#pragma GCC unroll 2
  for (int b = 0; b < BLOCKS; b++) w[b] = packed + (block + b) * k * F32_BLOCK;
  const float *rows[ROWS];
#pragma GCC unroll 4
  for (int m = 0; m < ROWS; m++) rows[m] = x + (row0 + m) * stride;
  for (int64_t i = 0; i < k; i++) {
    _mm_prefetch((const char *)(w[BLOCKS - 1] + i * F32_BLOCK + F32_PREFETCH), _MM_HINT_T0);
    __m256 wv[BLOCKS];
#pragma GCC unroll 2
    for (int b = 0; b < BLOCKS; b++) wv[b] = _mm256_loadu_ps(w[b] + i * F32_BLOCK);
#pragma GCC unroll 4
    for (int m = 0; m < ROWS; m++) {
      const __m256 xv = _mm256_broadcast_ss(rows[m] + i);
#pragma GCC unroll 2
      for (int b = 0; b < BLOCKS; b++) acc[b][m] = _mm256_fmadd_ps(wv[b], xv, acc[b][m]);
    }
  }
  for (int b = 0; b < BLOCKS; b++) {
    const int64_t first = (block + b) * F32_BLOCK;
    for (int m = 0; m < ROWS; m++) {
      float lanes[F32_BLOCK];
      _mm256_storeu_ps(lanes, acc[b][m]);
      for (int64_t c = 0; c < F32_BLOCK && first + c < n; c++)
        out[(row0 + m) * n + first + c] = lanes[c] + (bias != NULL ? bias[first + c] : 0.0f);
    }
  }
}

using F32Tile = void (*)(const float *, int64_t, int64_t, const float *, int64_t, const float *,
                         int64_t, float *, int64_t);

// out fp32 [M, N] = x fp32 [M, K] (rows `stride` elements apart) @ w.T + bias (fp32 [N] or NULL),
// w packed by `slim_f32_pack`; M <= F32_GEMM_MAX_ROWS. Returns -1 outside the kernel's limits
// (checked first in Python).
extern "C" SLIM_F32 int slim_f32_gemm(const float *x, int64_t m, int64_t k, int64_t stride,
                                      const float *packed, const float *bias, int64_t n,
                                      float *out) {
  if (m < 1 || m > F32_GEMM_MAX_ROWS || k < 1 || n < 1) return -1;
  static const F32Tile pairs[F32_ROW_GROUP] = {f32_tile<1, 2>, f32_tile<2, 2>, f32_tile<3, 2>,
                                               f32_tile<4, 2>};
  static const F32Tile singles[F32_ROW_GROUP] = {f32_tile<1, 1>, f32_tile<2, 1>, f32_tile<3, 1>,
                                                 f32_tile<4, 1>};
  const int64_t blocks = (n + F32_BLOCK - 1) / F32_BLOCK;
  // Pairs of blocks shared out across the kernels' threads (cpu_threads.h).
  slim_parallel((blocks + 1) / 2, [&](int64_t first_pair, int64_t end_pair) {
    for (int64_t block = 2 * first_pair; block < 2 * end_pair && block < blocks; block += 2) {
      const F32Tile *tiles = blocks - block >= 2 ? pairs : singles;
      for (int64_t row0 = 0; row0 < m; row0 += F32_ROW_GROUP) {
        const int64_t rows = m - row0 < F32_ROW_GROUP ? m - row0 : F32_ROW_GROUP;
        tiles[rows - 1](x, stride, k, packed, block, bias, n, out, row0);
      }
    }
  });
  return 0;
}
