// Greedy next-token choice on x86-64 CPUs with AVX-512 (built and loaded with the other sources
// by kernels/native.py).
//
// Why: torch.argmax over a decode step's fp32 logits ([32, 49152] at batch 32) took ~1 ms on one
// core, ~3% of a step, for a 6 MB read that takes a tenth of that. Same answer as torch.argmax:
// the first index of each row's largest value, or of its first NaN where it has one.

#include <math.h>
#include <stdint.h>

#include "cpu_bf16.h"

// The first NaN of a row, or -1.
static int64_t first_nan(const float *row, int64_t n) {
  for (int64_t i = 0; i < n; i++)
    if (isnan(row[i])) return i;
  return -1;
}

#if defined(SLIM_ISA_AVX2)
// AVX2: eight lanes with blends (the AVX-512 form through SIMDe was 4x slower than torch).
// x fp32 [rows, n] (rows `stride` elements apart, n >= 1) -> out[r] = argmax of row r.
extern "C" void slim_argmax_rows_f32(const float *x, int64_t rows, int64_t n, int64_t stride,
                                     int64_t *out) {
  const __m256i lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  const int64_t whole = n & ~(int64_t)7;
  for (int64_t r = 0; r < rows; r++) {
    const float *row = x + r * stride;
    __m256 best = _mm256_set1_ps(-INFINITY), nan = _mm256_setzero_ps();
    __m256i where = lanes;
    for (int64_t i = 0; i < whole; i += 8) {
      const __m256 v = _mm256_loadu_ps(row + i);
      nan = _mm256_or_ps(nan, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
      const __m256 larger = _mm256_cmp_ps(v, best, _CMP_GT_OQ);  // a later equal one stays out
      best = _mm256_blendv_ps(best, v, larger);
      const __m256i here = _mm256_add_epi32(lanes, _mm256_set1_epi32((int32_t)i));
      where = _mm256_castps_si256(
          _mm256_blendv_ps(_mm256_castsi256_ps(where), _mm256_castsi256_ps(here), larger));
    }
    float top = -INFINITY;
    int64_t index = 0;
    if (whole > 0) {  // lanes tie-break by index: the smallest of the lanes holding the top
      float values[8];
      int32_t indices[8];
      _mm256_storeu_ps(values, best);
      _mm256_storeu_si256((__m256i *)indices, where);
      index = INT64_MAX;
      for (int j = 0; j < 8; j++) top = values[j] > top ? values[j] : top;
      for (int j = 0; j < 8; j++)
        if (values[j] == top && indices[j] < index) index = indices[j];
    }
    bool has_nan = _mm256_movemask_ps(nan) != 0;
    for (int64_t i = whole; i < n; i++) {  // the tail: later indices win only when larger
      has_nan |= isnan(row[i]);
      if (row[i] > top) top = row[i], index = i;
    }
    out[r] = has_nan ? first_nan(row, n) : index;
  }
}
#else
// x fp32 [rows, n] (rows `stride` elements apart, n >= 1) -> out[r] = argmax of row r.
extern "C" SLIM_AVX512_BASE void slim_argmax_rows_f32(const float *x, int64_t rows, int64_t n,
                                                      int64_t stride, int64_t *out) {
  const __m512i lanes = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  for (int64_t r = 0; r < rows; r++) {
    const float *row = x + r * stride;
    // Per lane the largest value so far and where it was; a later equal one does not replace
    // it, so each lane keeps its first, and lanes tie-break by index below.
    __m512 best = _mm512_set1_ps(-INFINITY);
    __m512i where = lanes;
    __mmask16 nan = 0;
    for (int64_t i = 0; i < n; i += 16) {
      const __mmask16 m = tail_mask(n - i);
      const __m512 v = _mm512_mask_loadu_ps(_mm512_set1_ps(-INFINITY), m, row + i);
      nan |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
      const __mmask16 larger = _mm512_cmp_ps_mask(v, best, _CMP_GT_OQ);
      best = _mm512_mask_mov_ps(best, larger, v);
      where = _mm512_mask_mov_epi32(
          where, larger, _mm512_add_epi32(lanes, _mm512_set1_epi32((int32_t)i)));
    }
    if (nan) {  // rare: find the first NaN in order
      out[r] = first_nan(row, n);
      continue;
    }
    const float top = _mm512_reduce_max_ps(best);
    const __mmask16 holders = _mm512_cmp_ps_mask(best, _mm512_set1_ps(top), _CMP_EQ_OQ);
    // Lanes of an all -inf row still hold their first index: the smallest index wins as well.
    out[r] = _mm512_mask_reduce_min_epi32(holders, where);
  }
}
#endif
