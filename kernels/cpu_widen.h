// Eight fp32 weights for the AVX2 + FMA kernels from what their packed layouts store: fp32 as
// is, or bf16 (the high half of an fp32 value) widened exactly. A bf16 checkpoint served in
// fp32 keeps its weights in bf16 this way and a decode step reads half the bytes, with the same
// products and sums (cpu_f32_gemm.cpp, cpu_sparse24.cpp).
#pragma once

#include <stdint.h>

#include "cpu_simd.h"

// The fp32 kernels' target: AVX2 + FMA (the whole unit's already in the avx2 build).
#if defined(SLIM_ISA_AVX2)
#define SLIM_F32
#else
#define SLIM_F32 __attribute__((target("avx2,fma")))
#endif

SLIM_F32 static inline __m256 slim_widen8(const float *w) { return _mm256_loadu_ps(w); }

SLIM_F32 static inline __m256 slim_widen8(const uint16_t *w) {
  const __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)w));
  return _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16));
}
