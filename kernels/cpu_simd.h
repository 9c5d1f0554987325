// The instruction set one build of slimserve's CPU kernels targets. kernels/native.py compiles
// the same sources once per ISA and loads the build the CPU (or SLIMSERVE_CPU_ISA) allows:
//   avx512: AVX-512 F / BW / VL / VNNI (BF16 where a kernel needs it), through <immintrin.h>;
//           each function carries its target attribute, the rest of the unit stays baseline.
//   avx2:   the unit is compiled with -mavx2 -mfma -mf16c and SLIM_ISA_AVX2; the AVX-512
//           intrinsics come from SIMDe, which gives each its exact AVX-512 result from 256-bit
//           (and scalar) code: VPDPBUSD's int32 sums never saturate, masks and reductions
//           behave as on AVX-512. One source, two ISAs, the same answers.
#pragma once

#if defined(SLIM_ISA_AVX2)
#define SIMDE_ENABLE_NATIVE_ALIASES
#include <simde/x86/avx512.h>
#define SLIM_TARGET_AVX512
#define SLIM_TARGET_VNNI
#define SLIM_TARGET_VNNI_F16C
#define SLIM_TARGET_BF16
#include <string.h>

// The few AVX-512 intrinsics these kernels use that SIMDe 0.8.2 leaves out, with the same
// results (sums in the same tree order as GCC's AVX-512 reductions, so both builds round alike).
static inline simde__m256i slim_avx2_cvtepi32_epi16(simde__m512i v) {
  int32_t in[16];
  int16_t out[16];
  simde_mm512_storeu_si512(in, v);
  for (int i = 0; i < 16; i++) out[i] = (int16_t)in[i];
  return simde_mm256_loadu_si256(out);
}
static inline simde__m256i slim_avx2_cvtps_ph(simde__m512 v, int rounding) {
  (void)rounding;  // callers round to nearest even, F16C's immediate below
  float in[16];
  simde_mm512_storeu_ps(in, v);
  const __m128i lo = _mm256_cvtps_ph(_mm256_loadu_ps(in), _MM_FROUND_TO_NEAREST_INT);
  const __m128i hi = _mm256_cvtps_ph(_mm256_loadu_ps(in + 8), _MM_FROUND_TO_NEAREST_INT);
  return _mm256_set_m128i(hi, lo);
}
static inline void slim_avx2_mask_cvtepi32_storeu_epi8(void *dst, simde__mmask16 m,
                                                       simde__m512i v) {
  int32_t in[16];
  simde_mm512_storeu_si512(in, v);
  for (int i = 0; i < 16; i++)
    if (m >> i & 1) ((int8_t *)dst)[i] = (int8_t)in[i];
}
static inline int32_t slim_avx2_mask_reduce_min_epi32(simde__mmask16 m, simde__m512i v) {
  int32_t in[16], best = INT32_MAX;
  simde_mm512_storeu_si512(in, v);
  for (int i = 0; i < 16; i++)
    if (m >> i & 1 && in[i] < best) best = in[i];
  return best;
}
static inline simde__m512i slim_avx2_maskz_loadu_epi8(simde__mmask64 m, const void *src) {
  if (m == ~(simde__mmask64)0) return simde_mm512_loadu_si512(src);
  int8_t out[64];
  for (int i = 0; i < 64; i++) out[i] = m >> i & 1 ? ((const int8_t *)src)[i] : 0;
  return simde_mm512_loadu_si512(out);
}
static inline int32_t slim_avx2_reduce_add_epi32(simde__m512i v) {
  int32_t in[16], total = 0;
  simde_mm512_storeu_si512(in, v);
  for (int i = 0; i < 16; i++) total += in[i];  // integer sums: any order
  return total;
}
static inline float slim_avx2_reduce_add_ps(simde__m512 v) {
  // Halves, quarters, pairs, then the last two: GCC's tree, in AVX registers.
  const __m256 eight = _mm256_add_ps(simde_mm512_castps512_ps256(v),
                                     simde_mm512_extractf32x8_ps(v, 1));
  const __m128 four = _mm_add_ps(_mm256_castps256_ps128(eight), _mm256_extractf128_ps(eight, 1));
  const __m128 two = _mm_add_ps(four, _mm_movehl_ps(four, four));
  return _mm_cvtss_f32(_mm_add_ss(two, _mm_shuffle_ps(two, two, 1)));
}
// Masked loads and stores touch only the lanes in the mask: SIMDe 0.8.2 reads and writes whole
// vectors there (a store past a row's end overwrote the next row's values), so these replace
// its versions. A full mask (every iteration but a row's last) is one plain load or store.
static inline simde__m256i slim_avx2_maskz_loadu_epi16(simde__mmask16 m, const void *src) {
  if (m == 0xffff) return simde_mm256_loadu_si256(src);
  int16_t lanes[16];
  for (int i = 0; i < 16; i++) lanes[i] = m >> i & 1 ? ((const int16_t *)src)[i] : 0;
  return simde_mm256_loadu_si256(lanes);
}
static inline void slim_avx2_mask_storeu_epi16(void *dst, simde__mmask16 m, simde__m256i v) {
  if (m == 0xffff) return simde_mm256_storeu_si256(dst, v);
  int16_t lanes[16];
  simde_mm256_storeu_si256(lanes, v);
  for (int i = 0; i < 16; i++)
    if (m >> i & 1) ((int16_t *)dst)[i] = lanes[i];
}
static inline simde__m512 slim_avx2_mask_loadu_ps(simde__m512 keep, simde__mmask16 m,
                                                  const void *src) {
  if (m == 0xffff) return simde_mm512_loadu_ps(src);
  float lanes[16];
  simde_mm512_storeu_ps(lanes, keep);
  for (int i = 0; i < 16; i++)
    if (m >> i & 1) lanes[i] = ((const float *)src)[i];
  return simde_mm512_loadu_ps(lanes);
}
static inline simde__m512 slim_avx2_maskz_loadu_ps(simde__mmask16 m, const void *src) {
  return slim_avx2_mask_loadu_ps(simde_mm512_setzero_ps(), m, src);
}
static inline void slim_avx2_mask_storeu_ps(void *dst, simde__mmask16 m, simde__m512 v) {
  if (m == 0xffff) return simde_mm512_storeu_ps(dst, v);
  float lanes[16];
  simde_mm512_storeu_ps(lanes, v);
  for (int i = 0; i < 16; i++)
    if (m >> i & 1) ((float *)dst)[i] = lanes[i];
}
#undef _mm256_maskz_loadu_epi16
#undef _mm256_mask_storeu_epi16
#undef _mm512_mask_loadu_ps
#undef _mm512_maskz_loadu_ps
#undef _mm512_mask_storeu_ps
#define _mm256_maskz_loadu_epi16 slim_avx2_maskz_loadu_epi16
#define _mm256_mask_storeu_epi16 slim_avx2_mask_storeu_epi16
#define _mm512_mask_loadu_ps slim_avx2_mask_loadu_ps
#define _mm512_maskz_loadu_ps slim_avx2_maskz_loadu_ps
#define _mm512_mask_storeu_ps slim_avx2_mask_storeu_ps
#define _mm512_cvtepi32_epi16 slim_avx2_cvtepi32_epi16
#define _mm512_cvtps_ph slim_avx2_cvtps_ph
#define _mm512_mask_cvtepi32_storeu_epi8 slim_avx2_mask_cvtepi32_storeu_epi8
#define _mm512_mask_reduce_min_epi32 slim_avx2_mask_reduce_min_epi32
#define _mm512_maskz_loadu_epi8 slim_avx2_maskz_loadu_epi8
#define _mm512_reduce_add_epi32 slim_avx2_reduce_add_epi32
#define _mm512_reduce_add_ps slim_avx2_reduce_add_ps
#else
#include <immintrin.h>
#define SLIM_TARGET_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl")))
#define SLIM_TARGET_VNNI __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni")))
#define SLIM_TARGET_VNNI_F16C __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,f16c")))
#define SLIM_TARGET_BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))
#endif

// Whether this CPU runs this build (checked once, in Python, before any kernel is called).
static inline int slim_build_runs_here(void) {
  __builtin_cpu_init();
#if defined(SLIM_ISA_AVX2)
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
         __builtin_cpu_supports("f16c");
#else
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni");
#endif
}
