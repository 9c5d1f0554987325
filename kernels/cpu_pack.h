// The weight layout of slimserve's few-row GEMMs (cpu_w8a8.cpp, cpu_bf16_gemm.cpp): for each
// block of 16 output channels and each group of GROUP inputs, the 16 channels' GROUP values side
// by side, so one 512-bit dot-product instruction covers a block and its lanes are 16 outputs.
#pragma once

#include <stdint.h>
#include <string.h>

#include "cpu_threads.h"

static inline int64_t slim_channel_blocks(int64_t n) { return (n + 15) / 16; }
static inline int64_t slim_input_groups(int64_t k, int64_t group) { return (k + group - 1) / group; }

// w [N, K] -> packed [ceil(N / 16)][ceil(K / GROUP)][16][GROUP], each value through `convert`;
// padding (past N or K) is convert(0).
template <int GROUP, typename In, typename Out, typename Convert>
static void slim_pack_channel_blocks(const In *w, int64_t n, int64_t k, Out *packed,
                                     Convert convert) {
  const int64_t groups = slim_input_groups(k, GROUP);
  for (int64_t block = 0; block < slim_channel_blocks(n); block++)
    for (int64_t g = 0; g < groups; g++)
      for (int64_t c = 0; c < 16; c++)
        for (int64_t j = 0; j < GROUP; j++) {
          const int64_t row = block * 16 + c, col = GROUP * g + j;
          packed[((block * groups + g) * 16 + c) * GROUP + j] =
              convert(row < n && col < k ? w[row * k + col] : (In)0);
        }
}

// visit(w0, w1, pair, first channel, first row, rows) for each pair of 16-channel blocks (w0 and
// w1: element offsets of the two blocks in the packed weight, each block_elements long; a lone
// last block is visited with pair false and w1 == w0) and each group of up to row_block
// activation rows. The pairs are shared out across the kernels' threads (cpu_threads.h).
template <typename Visit>
static void slim_for_each_tile(int64_t n, int64_t m, int64_t block_elements, int64_t row_block,
                               Visit visit) {
  const int64_t blocks = slim_channel_blocks(n);
  slim_parallel((blocks + 1) / 2, [&](int64_t first_pair, int64_t end_pair) {
    for (int64_t block = 2 * first_pair; block < 2 * end_pair; block += 2) {
      const bool pair = block + 1 < blocks;
      const int64_t w0 = block * block_elements, w1 = pair ? w0 + block_elements : w0;
      for (int64_t r0 = 0; r0 < m; r0 += row_block)
        visit(w0, w1, pair, 16 * block, r0, m - r0 < row_block ? m - r0 : row_block);
    }
  });
}

// The inner step of both GEMMs' tiles (ROWS <= 8 activation rows x two 16-channel weight blocks
// b0 and b1): per row M, broadcast its next 4 bytes at source + M * stride (four int8 codes or
// two bf16 inputs, as CAST makes them) and add their products with each block to the named
// accumulators a0M and a1M. Named variables, not arrays: GCC 12 kept arrays of accumulators in
// other registers and copied each in and out around every dot-product instruction (two moves per
// product), and the int8 GEMM ran at half this core's VNNI rate.
#define SLIM_TILE_ACCUMULATORS(Vec, zero)                                                     \
  Vec a00 = zero, a01 = zero, a02 = zero, a03 = zero, a04 = zero, a05 = zero, a06 = zero,      \
      a07 = zero, a10 = zero, a11 = zero, a12 = zero, a13 = zero, a14 = zero, a15 = zero,      \
      a16 = zero, a17 = zero
// After the loop, the accumulators as arrays acc0 / acc1 [row] for the stores.
#define SLIM_TILE_RESULTS(Vec)                                        \
  const Vec acc0[8] = {a00, a01, a02, a03, a04, a05, a06, a07};       \
  const Vec acc1[8] = {a10, a11, a12, a13, a14, a15, a16, a17}
#define SLIM_TILE_ROW(M, source, stride, CAST, DOT)     \
  if constexpr (ROWS > M) {                              \
    int32_t four;                                        \
    memcpy(&four, (source) + M * (stride), sizeof four); \
    const auto x = CAST(_mm512_set1_epi32(four));        \
    a0##M = DOT(a0##M, b0, x);                           \
    a1##M = DOT(a1##M, b1, x);                           \
  }
#define SLIM_TILE_ROWS(source, stride, CAST, DOT)                                             \
  SLIM_TILE_ROW(0, source, stride, CAST, DOT) SLIM_TILE_ROW(1, source, stride, CAST, DOT)     \
  SLIM_TILE_ROW(2, source, stride, CAST, DOT) SLIM_TILE_ROW(3, source, stride, CAST, DOT)     \
  SLIM_TILE_ROW(4, source, stride, CAST, DOT) SLIM_TILE_ROW(5, source, stride, CAST, DOT)     \
  SLIM_TILE_ROW(6, source, stride, CAST, DOT) SLIM_TILE_ROW(7, source, stride, CAST, DOT)
