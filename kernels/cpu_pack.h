// The weight layout of slimserve's few-row GEMMs (cpu_w8a8.cpp, cpu_bf16_gemm.cpp): for each
// block of 16 output channels and each group of GROUP inputs, the 16 channels' GROUP values side
// by side, so one 512-bit dot-product instruction covers a block and its lanes are 16 outputs.
#pragma once

#include <stdint.h>

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
// activation rows.
template <typename Visit>
static void slim_for_each_tile(int64_t n, int64_t m, int64_t block_elements, int64_t row_block,
                               Visit visit) {
  const int64_t blocks = slim_channel_blocks(n);
  for (int64_t block = 0; block < blocks; block += 2) {
    const bool pair = block + 1 < blocks;
    const int64_t w0 = block * block_elements, w1 = pair ? w0 + block_elements : w0;
    for (int64_t r0 = 0; r0 < m; r0 += row_block)
      visit(w0, w1, pair, 16 * block, r0, m - r0 < row_block ? m - r0 : row_block);
  }
}
