// bf16 GEMM on x86-64 CPUs with AVX-512 BF16 (built and loaded with the other sources by
// kernels/native.py); the engine gives it every dense bf16 projection and the lm_head.
//
// Why: at 1-32 rows a decode step streams the weights, and oneDNN's prepacked bf16 matmul read the
// 49152x576 lm_head at ~20 GB/s in a step and the smaller projections slower still (a fixed cost
// per call: 74 us for a 576x576 matmul that this kernel does in 21 us); at prompt sizes (128-512
// rows) this kernel is as fast as oneDNN's, so one copy of the weights serves both (kernels/README.md).
//
// The weight is repacked once in the order VDPBF16PS wants (for each block of 16 output channels
// and each pair of inputs, 64 bytes: w[c][2 p], w[c][2 p + 1] for c in the block), so one
// instruction multiplies a whole block by two inputs of one activation row (broadcast) and its 16
// fp32 lanes are 16 outputs: no horizontal sums. Products of bf16 values are exact in fp32 and
// accumulate in fp32, as oneDNN's do (in another order).

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "cpu_bf16_amx.h"
#include "cpu_bf16_tiles.h"
#include "cpu_pack.h"

#define SLIM_AVX512_BF16 SLIM_TARGET_BF16

static const int64_t BF16_ROW_BLOCK = 8;       // activation rows per pass: 2 x 8 accumulators
// Distance (bytes of packed weights) the loads run ahead of the products.
static const int64_t BF16_PREFETCH_BYTES = 32768;

// The AVX2 build never serves it: without BF16 instructions the emulated dot products lose to
// torch's own matmul, and engine.dtype "auto" computes in fp32 on such CPUs anyway.
extern "C" int slim_bf16_gemm_cpu_supported(void) {
#if defined(SLIM_ISA_AVX2)
  return 0;
#endif
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bf16");
}

int slim_amx_on = 0;

// AMX tiles for the bf16 GEMMs and the W8A16 GEMM (cpu_bf16_amx.h), each from its own row count,
// where this CPU and the kernel allow it; returns whether they are on (0 where AMX is not usable
// here, and in the avx2 build).
extern "C" int slim_amx_enable(int on) {
#if defined(SLIM_ISA_AVX2)
  (void)on;
  return 0;
#else
  static const bool usable = slim_amx_usable();
  slim_amx_on = usable && on;
  return slim_amx_on;
#endif
}

static inline int64_t bf16_pairs(int64_t k) { return slim_input_groups(k, 2); }
static inline int64_t bf16_blocks(int64_t n) { return slim_channel_blocks(n); }

extern "C" int64_t slim_bf16_packed_elements(int64_t n, int64_t k) {
  return bf16_blocks(n) * bf16_pairs(k) * 32;
}

// w bf16 [N, K] -> packed bf16, zeros as padding: blocks of 16 channels, [ceil(K / 2)][16][2] each
// (see above), and each pair of blocks that a tile reads together interleaved per pair of inputs
// ([ceil(K / 2)][2][16][2]), so the tile reads one sequential stream rather than two 18-48 KB
// apart (the old and new builds side by side over the default model's shapes: +4-9% at one
// row, within 2% at 4 and 32 rows; kernels/README.md). A lone last block stays as it is.
extern "C" void slim_bf16_pack(const uint16_t *w, int64_t n, int64_t k, uint16_t *packed) {
  const int64_t pairs = bf16_pairs(k), blocks = bf16_blocks(n), block = pairs * 32;
  for (int64_t b = 0; b < blocks; b++) {
    const bool paired = (b | 1) < blocks;  // a lone last block is not interleaved
    const int64_t step = paired ? 64 : 32, half = paired ? (b & 1) * 32 : 0;
    uint16_t *dst = packed + (b & ~(int64_t)1) * block + half;
    for (int64_t p = 0; p < pairs; p++)
      for (int64_t c = 0; c < 16; c++)
        for (int64_t j = 0; j < 2; j++) {
          const int64_t row = b * 16 + c, col = 2 * p + j;
          dst[p * step + c * 2 + j] = row < n && col < k ? w[row * k + col] : 0;
        }
  }
}

// ROWS (1-8) activation rows (x: bf16, rows kp apart, zero-padded to an even K) x two 16-channel
// blocks interleaved from w (`slim_bf16_pack`), or one lone block when `pair` is false.
template <int ROWS>
SLIM_AVX512_BF16 static void bf16_tile(const uint16_t *x, int64_t kp, const uint16_t *w,
                                       bool pair, int64_t pairs, const uint16_t *bias,
                                       int64_t channel, int64_t n, uint16_t *out) {
  SLIM_TILE_ACCUMULATORS(__m512, _mm512_setzero_ps());
  const int64_t step = pair ? 64 : 32;  // elements per pair of inputs
  const uint16_t *w1 = pair ? w + 32 : w;  // a lone block's second half repeats it (unstored)
  for (int64_t p = 0; p < pairs; p++) {
    _mm_prefetch((const char *)(w + p * step) + BF16_PREFETCH_BYTES, _MM_HINT_T0);
    if (pair) _mm_prefetch((const char *)(w + p * step) + BF16_PREFETCH_BYTES + 64, _MM_HINT_T0);
    const __m512bh b0 = (__m512bh)_mm512_loadu_si512(w + p * step);
    const __m512bh b1 = (__m512bh)_mm512_loadu_si512(w1 + p * step);
    SLIM_TILE_ROWS(x + 2 * p, kp, (__m512bh), _mm512_dpbf16_ps)
  }
  SLIM_TILE_RESULTS(__m512);
  slim_bf16_store_tile(acc0, acc1, ROWS, pair, bias, channel, n, out);
}

typedef void (*Bf16Tile)(const uint16_t *, int64_t, const uint16_t *, bool, int64_t,
                         const uint16_t *, int64_t, int64_t, uint16_t *);

// out bf16 [M, N] = x bf16 [M, K] (rows `stride` elements apart) @ w.T + bias (bf16 [N] or NULL),
// w packed by `slim_bf16_pack`; any M (each 32-channel pair of blocks stays in cache while every
// group of 8 rows meets it). Returns -1 for arguments outside the kernel's limits
// (checked first in Python).
extern "C" SLIM_AVX512_BF16 int slim_bf16_gemm(const uint16_t *x, int64_t m, int64_t k,
                                               int64_t stride, const uint16_t *packed,
                                               const uint16_t *bias, int64_t n, uint16_t *out) {
  if (m < 1 || k < 1 || n < 1) return -1;
  const int64_t pairs = bf16_pairs(k), kp = 2 * pairs;
#if !defined(SLIM_ISA_AVX2)
  if (slim_amx_on && m >= SLIM_BF16_AMX_MIN_ROWS) {
    const int64_t blocks = bf16_blocks(n);
    return slim_amx_gemm(x, m, k, stride, (blocks + 1) / 2, blocks % 2 == 1, bias, n, out,
                         [&](int64_t t) {
                           return SlimAmxPlainSteps{packed + 2 * t * pairs * 32,
                                                    2 * t + 1 < blocks, pairs};
                         });
  }
#endif
  uint16_t *rows = slim_bf16_padded_rows(x, m, k, stride, kp, m);
  if (rows == NULL) return -1;
  static const Bf16Tile tiles[BF16_ROW_BLOCK] = {bf16_tile<1>, bf16_tile<2>, bf16_tile<3>,
                                                 bf16_tile<4>, bf16_tile<5>, bf16_tile<6>,
                                                 bf16_tile<7>, bf16_tile<8>};
  slim_for_each_tile(n, m, pairs * 32, BF16_ROW_BLOCK,
                     [&](int64_t w0, int64_t, bool pair, int64_t channel, int64_t r0,
                         int64_t count) {
                       tiles[count - 1](rows + r0 * kp, kp, packed + w0, pair, pairs, bias,
                                        channel, n, out + r0 * n);
                     });
  free(rows);
  return 0;
}
