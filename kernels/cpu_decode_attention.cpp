// One decoding sequence's step outside the matmuls, bf16, x86-64 with AVX-512 (built and loaded
// with cpu_gemv.cpp by kernels/native.py): per layer, rotary + cache writes + attention, the
// residual add + RMSNorm, and SiLU(gate) * up.
//
// Why: at batch 1 these are ~25 small torch ops per layer, each with microseconds of fixed cost
// and almost no arithmetic (~3 ms of a ~10 ms int8 decode step); here they are three calls.
// Rotary rounds to bf16 after each product and after the sum, as the eager bf16 ops do, so the
// cached keys are bit-identical; scores, softmax and the weighted sum run in fp32 (as torch's
// fused SDPA does), the output is rounded to bf16 once.

#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "cpu_bf16.h"

#define SLIM_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl")))


// 16 bf16 -> 16 fp32
SLIM_AVX512 static inline __m512 load16(const uint16_t *p) {
  return _mm512_castsi512_ps(
      _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16));
}

// exp(x) for x <= 0 (softmax after subtracting the max): 2^n * 2^f, f in [-0.5, 0.5], degree-6
// polynomial (relative error ~2e-7); very negative x flush to 0.
SLIM_AVX512 static inline __m512 exp_nonpositive(__m512 x) {
  const __m512 log2e = _mm512_set1_ps(1.44269504088896341f);
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
  __m512 t = _mm512_mul_ps(x, log2e);
  __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 f = _mm512_mul_ps(_mm512_sub_ps(t, n), _mm512_set1_ps(0.69314718055994531f));
  __m512 p = _mm512_set1_ps(1.0f / 720.0f);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f / 120.0f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f / 24.0f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f / 6.0f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(p, n);
}

// x * cos + rotate_half(x) * sin with a bf16 rounding after each op, into bf16 `out`.
static void rotate(const uint16_t *x, const uint16_t *cos, const uint16_t *sin, int64_t dim,
                   uint16_t *out) {
  const int64_t half = dim / 2;
  for (int64_t d = 0; d < dim; d++) {
    const float rotated =
        d < half ? -slim_bf16_to_float(x[d + half]) : slim_bf16_to_float(x[d - half]);
    const float a = slim_round_to_bf16(slim_bf16_to_float(x[d]) * slim_bf16_to_float(cos[d]));
    const float b = slim_round_to_bf16(rotated * slim_bf16_to_float(sin[d]));
    out[d] = slim_float_to_bf16(a + b);
  }
}

// Keys, values and accumulators of one head live in registers: head_dim / 16 vectors at most.
static const int64_t MAX_HEAD_DIM = 256;
static const int64_t MAX_GROUP = 256;  // query heads per K/V head

extern "C" int64_t slim_decode_attention_max_head_dim(void) { return MAX_HEAD_DIM; }

// qkv: [heads + 2 * kv_heads, head_dim] of this token, q | k | v; cos / sin: [head_dim] at
// `position`; k_cache / v_cache: [kv_heads, max_len, head_dim] of the sequence's slot (the new
// key and value are written at `position`); out: [heads, head_dim]. Every key 0..position is
// attended. Returns -1 for arguments outside the kernel's limits (checked first in Python).
extern "C" SLIM_AVX512 int slim_decode_attention_bf16(
    const uint16_t *qkv, const uint16_t *cos, const uint16_t *sin, uint16_t *k_cache,
    uint16_t *v_cache, int64_t max_len, int64_t position, int64_t heads, int64_t kv_heads,
    int64_t head_dim, float scaling, uint16_t *out) {
  if (head_dim % 16 != 0 || head_dim > MAX_HEAD_DIM || kv_heads < 1 || heads % kv_heads != 0 ||
      heads / kv_heads > MAX_GROUP ||
      position < 0 || position >= max_len)
    return -1;
  const int64_t group = heads / kv_heads, length = position + 1, chunks = head_dim / 16;
  uint16_t *q_rot = (uint16_t *)malloc((size_t)(heads * head_dim) * sizeof(uint16_t));
  float *scores = (float *)malloc((size_t)(group * (length + 16)) * sizeof(float));
  if (q_rot == NULL || scores == NULL) {
    free(q_rot);
    free(scores);
    return -1;
  }
  for (int64_t h = 0; h < heads; h++)
    rotate(qkv + h * head_dim, cos, sin, head_dim, q_rot + h * head_dim);
  for (int64_t g = 0; g < kv_heads; g++) {
    const uint16_t *k_new = qkv + (heads + g) * head_dim;
    const uint16_t *v_new = qkv + (heads + kv_heads + g) * head_dim;
    rotate(k_new, cos, sin, head_dim, k_cache + (g * max_len + position) * head_dim);
    memcpy(v_cache + (g * max_len + position) * head_dim, v_new,
           (size_t)head_dim * sizeof(uint16_t));
  }
  for (int64_t g = 0; g < kv_heads; g++) {
    const uint16_t *keys = k_cache + g * max_len * head_dim;
    const uint16_t *values = v_cache + g * max_len * head_dim;
    // Scores of the group's query heads against every key, each key converted once.
    for (int64_t j = 0; j < length; j++) {
      __m512 key[MAX_HEAD_DIM / 16];
      for (int64_t c = 0; c < chunks; c++) key[c] = load16(keys + j * head_dim + 16 * c);
      for (int64_t h = 0; h < group; h++) {
        const uint16_t *q = q_rot + (g * group + h) * head_dim;
        __m512 acc = _mm512_setzero_ps();
        for (int64_t c = 0; c < chunks; c++) acc = _mm512_fmadd_ps(load16(q + 16 * c), key[c], acc);
        scores[h * (length + 16) + j] = _mm512_reduce_add_ps(acc) * scaling;
      }
    }
    float sums[MAX_GROUP];
    for (int64_t h = 0; h < group; h++) {
      float *row = scores + h * (length + 16);
      float peak = -INFINITY;
      for (int64_t j = 0; j < length; j++) peak = fmaxf(peak, row[j]);
      __m512 total = _mm512_setzero_ps();
      const __m512 shift = _mm512_set1_ps(peak);
      for (int64_t j = 0; j < length; j += 16) {
        __mmask16 m = length - j >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (length - j)) - 1);
        __m512 e = exp_nonpositive(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, row + j), shift));
        e = _mm512_maskz_mov_ps(m, e);
        _mm512_mask_storeu_ps(row + j, m, e);
        total = _mm512_add_ps(total, e);
      }
      sums[h] = _mm512_reduce_add_ps(total);
    }
    // Weighted sum of the values, per query head (the group's values stay in L1 / L2).
    for (int64_t h0 = 0; h0 < group; h0++) {
      __m512 acc[MAX_HEAD_DIM / 16];
      for (int64_t c = 0; c < chunks; c++) acc[c] = _mm512_setzero_ps();
      const float *weights = scores + h0 * (length + 16);
      for (int64_t j = 0; j < length; j++) {
        const __m512 p = _mm512_set1_ps(weights[j]);
        for (int64_t c = 0; c < chunks; c++)
          acc[c] = _mm512_fmadd_ps(p, load16(values + j * head_dim + 16 * c), acc[c]);
      }
      uint16_t *dst = out + (g * group + h0) * head_dim;
      const float inv = 1.0f / sums[h0];
      for (int64_t c = 0; c < chunks; c++) {
        float lane[16];
        _mm512_storeu_ps(lane, _mm512_mul_ps(acc[c], _mm512_set1_ps(inv)));
        for (int i = 0; i < 16; i++) dst[16 * c + i] = slim_float_to_bf16(lane[i]);
      }
    }
  }
  free(q_rot);
  free(scores);
  return 0;
}

// x += delta (bf16, in place; delta may be NULL), then out = weight * (x / rms(x)) with the
// eager ops' roundings: the normalized x rounded to bf16, then the product rounded to bf16.
extern "C" void slim_add_rms_norm_bf16(uint16_t *x, const uint16_t *delta, const uint16_t *weight,
                                       int64_t n, float eps, uint16_t *out) {
  float squares = 0.0f;
  for (int64_t i = 0; i < n; i++) {
    if (delta != NULL)
      x[i] = slim_float_to_bf16(slim_bf16_to_float(x[i]) + slim_bf16_to_float(delta[i]));
    const float v = slim_bf16_to_float(x[i]);
    squares += v * v;
  }
  const float inv = 1.0f / sqrtf(squares / (float)n + eps);
  for (int64_t i = 0; i < n; i++) {
    const float normed = slim_round_to_bf16(slim_bf16_to_float(x[i]) * inv);
    out[i] = slim_float_to_bf16(slim_bf16_to_float(weight[i]) * normed);
  }
}

// gate_up [2n] = gate | up -> out [n] = silu(gate) * up, each op rounded to bf16 as eager.
extern "C" void slim_silu_mul_bf16(const uint16_t *gate_up, int64_t n, uint16_t *out) {
  for (int64_t i = 0; i < n; i++) {
    const float g = slim_bf16_to_float(gate_up[i]);
    const float silu = slim_round_to_bf16(g / (1.0f + expf(-g)));
    out[i] = slim_float_to_bf16(silu * slim_bf16_to_float(gate_up[n + i]));
  }
}
