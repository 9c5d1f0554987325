// bf16 <-> fp32 conversions shared by slimserve's C++ CPU kernels: scalar, and 16 lanes at a
// time with AVX-512 (callers compile them into functions targeting AVX-512 F / BW / VL).
#pragma once

#include "cpu_simd.h"
#include <stdint.h>
#include <string.h>

#define SLIM_AVX512_BASE SLIM_TARGET_AVX512

static inline float slim_bf16_to_float(uint16_t v) {
  uint32_t bits = (uint32_t)v << 16;
  float f;
  memcpy(&f, &bits, sizeof f);
  return f;
}

// Round to nearest even, as torch does; NaN stays a (quiet) NaN.
static inline uint16_t slim_float_to_bf16(float f) {
  uint32_t bits;
  memcpy(&bits, &f, sizeof bits);
  if ((bits & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((bits >> 16) | 0x40);
  bits += 0x7fffu + ((bits >> 16) & 1u);
  return (uint16_t)(bits >> 16);
}

// f rounded to the nearest bf16 value, kept as a float (what an eager bf16 op stores).
static inline float slim_round_to_bf16(float f) {
  return slim_bf16_to_float(slim_float_to_bf16(f));
}

// 16 bf16 -> 16 fp32
SLIM_AVX512_BASE static inline __m512 load16(const uint16_t *p) {
  return _mm512_castsi512_ps(
      _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16));
}

// 16 fp32 -> 16 bf16, round to nearest even as torch rounds; NaN stays a quiet NaN.
SLIM_AVX512_BASE static inline __m256i to_bf16x16(__m512 f) {
  const __m512i bits = _mm512_castps_si512(f);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  __m512i rounded = _mm512_add_epi32(bits, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff)));
  const __mmask16 nan = _mm512_cmp_ps_mask(f, f, _CMP_UNORD_Q);
  rounded = _mm512_mask_or_epi32(rounded, nan, bits, _mm512_set1_epi32(0x400000));
  return _mm512_cvtepi32_epi16(_mm512_srli_epi32(rounded, 16));
}

// f rounded to bf16, kept in fp32 (what an eager bf16 op stores).
SLIM_AVX512_BASE static inline __m512 round_bf16x16(__m512 f) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(to_bf16x16(f)), 16));
}

// The dtype codes of native.py.
enum SlimDtype { SLIM_F32 = 0, SLIM_BF16 = 1, SLIM_F16 = 2 };

// Up to 16 bf16 at p (mask m) -> fp32, zeros outside the mask.
SLIM_AVX512_BASE static inline __m512 load16_masked(const uint16_t *p, __mmask16 m) {
  return _mm512_castsi512_ps(
      _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p)), 16));
}

SLIM_AVX512_BASE static inline __mmask16 tail_mask(int64_t left) {
  return left >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << left) - 1);
}

// Up to 16 values of a row in its dtype (fp32, bf16 or fp16) -> fp32, zeros outside the mask.
SLIM_AVX512_BASE static inline __m512 load_row16(const void *row, int dtype, int64_t i,
                                                 __mmask16 m) {
  if (dtype == SLIM_F32) return _mm512_maskz_loadu_ps(m, (const float *)row + i);
  if (dtype == SLIM_BF16) return load16_masked((const uint16_t *)row + i, m);
  return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, (const uint16_t *)row + i));
}

// Up to 16 fp32 values -> a row in its dtype (fp32, bf16 or fp16), the lanes in the mask only;
// to 16 bits with round to nearest even.
SLIM_AVX512_BASE static inline void store_row16(void *dst, int dtype, __mmask16 m, __m512 v) {
  if (dtype == SLIM_F32)
    _mm512_mask_storeu_ps((float *)dst, m, v);
  else if (dtype == SLIM_BF16)
    _mm256_mask_storeu_epi16(dst, m, to_bf16x16(v));
  else
    _mm256_mask_storeu_epi16(dst, m,
                             _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}
