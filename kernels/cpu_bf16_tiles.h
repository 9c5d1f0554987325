// What the bf16 GEMMs (cpu_bf16_gemm.cpp, cpu_bf16_coded.cpp) share around their tiles: the
// activation rows copied with an even K, and a tile's fp32 sums stored as bf16 outputs.
#pragma once

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "cpu_bf16.h"

// x bf16 [m, k] (rows `stride` apart) -> a new [mp, kp] copy (mp >= m), zeros past k (an odd
// K's pad, or whole AMX tiles') and past row m; the caller frees it. NULL when out of memory.
static inline uint16_t *slim_bf16_padded_rows(const uint16_t *x, int64_t m, int64_t k,
                                              int64_t stride, int64_t kp, int64_t mp) {
  uint16_t *rows = (uint16_t *)calloc((size_t)(mp * kp), sizeof(uint16_t));
  if (rows == NULL) return NULL;
  for (int64_t r = 0; r < m; r++) memcpy(rows + r * kp, x + r * stride, (size_t)k * 2);
  return rows;
}

// out[r, channel + 16 h + c] = bf16(acc_h[r][c] + bias) for `rows` rows and the tile's one or two
// 16-channel blocks (h < 2 when `pair`), channels past n left alone.
SLIM_AVX512_BASE static inline void slim_bf16_store_tile(const __m512 *acc0, const __m512 *acc1,
                                                         int rows, bool pair,
                                                         const uint16_t *bias, int64_t channel,
                                                         int64_t n, uint16_t *out) {
  for (int half = 0; half < (pair ? 2 : 1); half++) {
    const int64_t first = channel + 16 * half;
    const __mmask16 m16 = tail_mask(n - first);
    const __m512 b = bias == NULL ? _mm512_setzero_ps() : load16_masked(bias + first, m16);
    for (int m = 0; m < rows; m++) {
      const __m512 v = _mm512_add_ps(half ? acc1[m] : acc0[m], b);
      _mm256_mask_storeu_epi16(out + m * n + first, m16, to_bf16x16(v));
    }
  }
}
