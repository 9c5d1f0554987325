// Per-token activation quantization for W8A8 on CPU, x86-64 with AVX-512 (built and loaded with
// the other sources by kernels/native.py), and the per-token rescale after the int8 GEMM.
//
// Why: in torch the quantization is ~10 elementwise ops per projection (float, abs, amax, div,
// clamp, div, round, clamp, add, to uint8) and the rescale two more; with 121 projections a step,
// their fixed costs were several milliseconds at any batch size. Here each is one call, with the
// same arithmetic as `reference.per_token_codes` (fp32 division, round half to even), so the codes
// are identical.

#include <immintrin.h>
#include <stdint.h>

#include "cpu_bf16.h"

#define SLIM_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl")))

enum { SLIM_F32 = 0, SLIM_BF16 = 1, SLIM_F16 = 2 };  // the dtype codes of native.py

// Up to 16 values of a row in its dtype -> fp32 (zeros outside the mask).
SLIM_AVX512 static inline __m512 load_row16(const void *row, int dtype, int64_t i, __mmask16 m) {
  if (dtype == SLIM_F32) return _mm512_maskz_loadu_ps(m, (const float *)row + i);
  if (dtype == SLIM_BF16) return load16_masked((const uint16_t *)row + i, m);
  return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, (const uint16_t *)row + i));
}

// x [rows, k] (row stride `stride` elements) -> codes uint8 [rows, k] = round(x / s) + 128 with
// s = max |x| / 127 per row (at least 1e-12), the codes clamped to [1, 255]; scales fp32 [rows].
// Returns -1 for an unknown dtype.
extern "C" SLIM_AVX512 int slim_quantize_rows_u8(const void *x, int dtype, int64_t rows, int64_t k,
                                                 int64_t stride, uint8_t *codes, float *scales) {
  if (dtype != SLIM_F32 && dtype != SLIM_BF16 && dtype != SLIM_F16) return -1;
  const int64_t item = dtype == SLIM_F32 ? 4 : 2;
  const __m512 low = _mm512_set1_ps(-127.0f), high = _mm512_set1_ps(127.0f);
  const __m512 shift = _mm512_set1_ps(128.0f);
  for (int64_t r = 0; r < rows; r++) {
    const void *row = (const char *)x + r * stride * item;
    __m512 peak = _mm512_setzero_ps();
    for (int64_t i = 0; i < k; i += 16)
      peak = _mm512_max_ps(peak, _mm512_abs_ps(load_row16(row, dtype, i, tail_mask(k - i))));
    float scale = _mm512_reduce_max_ps(peak) / 127.0f;
    scale = scale < 1e-12f ? 1e-12f : scale;
    scales[r] = scale;
    const __m512 s = _mm512_set1_ps(scale);
    for (int64_t i = 0; i < k; i += 16) {
      const __mmask16 m = tail_mask(k - i);
      __m512 q = _mm512_div_ps(load_row16(row, dtype, i, m), s);
      q = _mm512_roundscale_ps(q, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
      q = _mm512_add_ps(_mm512_min_ps(_mm512_max_ps(q, low), high), shift);
      _mm512_mask_cvtusepi32_storeu_epi8(codes + r * k + i, m, _mm512_cvtps_epu32(q));
    }
  }
  return 0;
}

// out [rows, n] in `dtype` = acc [rows, n] fp32 * scales[row], rounded to nearest even.
// Returns -1 for an unknown dtype.
extern "C" SLIM_AVX512 int slim_rescale_rows(const float *acc, const float *scales, int64_t rows,
                                             int64_t n, int dtype, void *out) {
  if (dtype != SLIM_F32 && dtype != SLIM_BF16 && dtype != SLIM_F16) return -1;
  for (int64_t r = 0; r < rows; r++) {
    const __m512 s = _mm512_set1_ps(scales[r]);
    for (int64_t i = 0; i < n; i += 16) {
      const __mmask16 m = tail_mask(n - i);
      const __m512 v = _mm512_mul_ps(_mm512_maskz_loadu_ps(m, acc + r * n + i), s);
      if (dtype == SLIM_F32) {
        _mm512_mask_storeu_ps((float *)out + r * n + i, m, v);
      } else if (dtype == SLIM_F16) {
        const __m256i half = _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        _mm256_mask_storeu_epi16((uint16_t *)out + r * n + i, m, half);
      } else {
        _mm256_mask_storeu_epi16((uint16_t *)out + r * n + i, m, to_bf16x16(v));
      }
    }
  }
  return 0;
}
