// A decode step's work outside the matmuls, bf16, x86-64 with AVX-512 (built and loaded with
// cpu_gemv.cpp by kernels/native.py): per layer, rotary + cache writes + attention for every
// decoding sequence, the residual add + RMSNorm, and SiLU(gate) * up.
//
// Why: at batch 1 these are ~25 small torch ops per layer, each with microseconds of fixed cost
// and almost no arithmetic (~3 ms of a ~10 ms int8 decode step); here they are three calls. At
// batch 8-32 the eager attention also copies every slot's cache to pad it to the longest
// sequence and masks the padding; here each sequence reads its own keys in place.
// Rotary rounds to bf16 after each product and after the sum, as the eager bf16 ops do, so the
// cached keys are bit-identical; scores, softmax and the weighted sum run in fp32 (as torch's
// fused SDPA does), the output is rounded to bf16 once.

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "cpu_bf16.h"

#define SLIM_AVX512 SLIM_TARGET_AVX512


// exp(x) for x <= 0 (softmax after subtracting the max): 2^n * 2^f, f in [-0.5, 0.5], degree-6
// polynomial (relative error ~2e-7); x below -87 reads as -87 (the sums it feeds dwarf it).
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

// exp(x) for any x: past ~88.7 it overflows to inf as fp32 exp does (silu(-90) is -0, not a
// tiny negative); the clamp at 100 keeps the exponent arithmetic finite.
SLIM_AVX512 static inline __m512 exp_any(__m512 x) {
  return exp_nonpositive(_mm512_min_ps(x, _mm512_set1_ps(100.0f)));
}

// x * cos + rotate_half(x) * sin with a bf16 rounding after each op, into bf16 `out`.
SLIM_AVX512 static void rotate(const uint16_t *x, const uint16_t *cos, const uint16_t *sin,
                               int64_t dim, uint16_t *out) {
  const int64_t half = dim / 2;
  if (half % 16 == 0) {
    for (int64_t d = 0; d < half; d += 16) {
      const __m512 first = load16(x + d), second = load16(x + half + d);
      const __m512 a1 = round_bf16x16(_mm512_mul_ps(first, load16(cos + d)));
      const __m512 b1 = round_bf16x16(_mm512_mul_ps(
          _mm512_sub_ps(_mm512_setzero_ps(), second), load16(sin + d)));
      const __m512 a2 = round_bf16x16(_mm512_mul_ps(second, load16(cos + half + d)));
      const __m512 b2 = round_bf16x16(_mm512_mul_ps(first, load16(sin + half + d)));
      _mm256_storeu_si256((__m256i *)(out + d), to_bf16x16(_mm512_add_ps(a1, b1)));
      _mm256_storeu_si256((__m256i *)(out + half + d), to_bf16x16(_mm512_add_ps(a2, b2)));
    }
    return;
  }
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

extern "C" int64_t slim_decode_attention_max_head_dim(void) { return MAX_HEAD_DIM; }

// Rows ahead of the one in use that the score loop fetches (16 rows of 64 bf16: 2 KiB).
static const int64_t KEY_LEAD = 16;

// Every cache line of one bf16 row of `dim` values, into L1.
static inline void prefetch_row(const uint16_t *row, int64_t dim) {
  for (int64_t offset = 0; offset < dim * 2; offset += 64)
    _mm_prefetch((const char *)row + offset, _MM_HINT_T0);
}

// One K/V head's group of query heads over keys 0..length-1: q_group [group, CHUNKS * 16]
// fp32 (scaled), scores [group, stride] scratch, out [group, CHUNKS * 16] bf16. CHUNKS is a
// compile-time count so a key's and a head's accumulators stay in registers (a runtime count
// kept them on the stack: each FMA waited on a store and a reload).
template <int CHUNKS>
SLIM_AVX512 static void attend_group(const float *q_group, const uint16_t *keys,
                                     const uint16_t *values, int64_t length, int64_t group,
                                     float *scores, int64_t stride, uint16_t *out) {
  const int64_t dim = CHUNKS * 16;
  // Scores of the group's query heads against every key, each key converted once. At batch
  // 8-32 a step's caches come from memory, and the hardware prefetchers alone read them at
  // ~9 GB/s (~16 with these): the keys are fetched KEY_LEAD rows ahead, and this group's values
  // as the keys go by, ready for the weighted sum.
  for (int64_t j = 0; j < KEY_LEAD && j < length; j++) prefetch_row(keys + j * dim, dim);
  for (int64_t j = 0; j < length; j++) {
    if (j + KEY_LEAD < length) prefetch_row(keys + (j + KEY_LEAD) * dim, dim);
    prefetch_row(values + j * dim, dim);
    __m512 key[CHUNKS];
    for (int c = 0; c < CHUNKS; c++) key[c] = load16(keys + j * dim + 16 * c);
    for (int64_t h = 0; h < group; h++) {
      const float *q = q_group + h * dim;
      __m512 acc = _mm512_mul_ps(_mm512_loadu_ps(q), key[0]);
      for (int c = 1; c < CHUNKS; c++) acc = _mm512_fmadd_ps(_mm512_loadu_ps(q + 16 * c), key[c], acc);
      scores[h * stride + j] = _mm512_reduce_add_ps(acc);
    }
  }
  for (int64_t h = 0; h < group; h++) {
    float *row = scores + h * stride;
    __m512 peaks = _mm512_set1_ps(-INFINITY);
    for (int64_t j = 0; j < length; j += 16)
      peaks = _mm512_max_ps(peaks, _mm512_mask_loadu_ps(peaks, tail_mask(length - j), row + j));
    const __m512 shift = _mm512_set1_ps(_mm512_reduce_max_ps(peaks));
    __m512 total = _mm512_setzero_ps();
    for (int64_t j = 0; j < length; j += 16) {
      const __mmask16 m = tail_mask(length - j);
      __m512 e = exp_nonpositive(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, row + j), shift));
      e = _mm512_maskz_mov_ps(m, e);
      _mm512_mask_storeu_ps(row + j, m, e);
      total = _mm512_add_ps(total, e);
    }
    // Weighted sum of the values: two keys per pass into two accumulator sets, so the FMA
    // chains of consecutive keys overlap.
    __m512 even[CHUNKS], odd[CHUNKS];
    for (int c = 0; c < CHUNKS; c++) even[c] = odd[c] = _mm512_setzero_ps();
    int64_t j = 0;
    for (; j + 1 < length; j += 2) {
      const __m512 p0 = _mm512_set1_ps(row[j]), p1 = _mm512_set1_ps(row[j + 1]);
      for (int c = 0; c < CHUNKS; c++) {
        even[c] = _mm512_fmadd_ps(p0, load16(values + j * dim + 16 * c), even[c]);
        odd[c] = _mm512_fmadd_ps(p1, load16(values + (j + 1) * dim + 16 * c), odd[c]);
      }
    }
    if (j < length) {
      const __m512 p0 = _mm512_set1_ps(row[j]);
      for (int c = 0; c < CHUNKS; c++)
        even[c] = _mm512_fmadd_ps(p0, load16(values + j * dim + 16 * c), even[c]);
    }
    const __m512 inv = _mm512_set1_ps(1.0f / _mm512_reduce_add_ps(total));
    for (int c = 0; c < CHUNKS; c++)
      _mm256_storeu_si256((__m256i *)(out + h * dim + 16 * c),
                          to_bf16x16(_mm512_mul_ps(_mm512_add_ps(even[c], odd[c]), inv)));
  }
}

typedef void (*GroupKernel)(const float *, const uint16_t *, const uint16_t *, int64_t, int64_t,
                            float *, int64_t, uint16_t *);

// attend_group for head_dim / 16 chunks (1..16).
static GroupKernel group_kernel(int64_t chunks) {
  static const GroupKernel table[MAX_HEAD_DIM / 16] = {
      attend_group<1>,  attend_group<2>,  attend_group<3>,  attend_group<4>,
      attend_group<5>,  attend_group<6>,  attend_group<7>,  attend_group<8>,
      attend_group<9>,  attend_group<10>, attend_group<11>, attend_group<12>,
      attend_group<13>, attend_group<14>, attend_group<15>, attend_group<16>};
  return table[chunks - 1];
}

// One sequence: rotary on its q and k, the new key and value written at `position` of its slot
// caches [kv_heads, max_len, head_dim], attention of every query head over keys 0..position.
// q_rot [heads * head_dim] (bf16), q_f32 [heads * head_dim] and scores
// [group * (position + 17)] are scratch.
SLIM_AVX512 static void attend_sequence(const uint16_t *qkv, const uint16_t *cos,
                                        const uint16_t *sin, uint16_t *k_cache,
                                        uint16_t *v_cache, int64_t max_len, int64_t position,
                                        int64_t heads, int64_t kv_heads, int64_t head_dim,
                                        float scaling, uint16_t *q_rot, float *q_f32,
                                        float *scores, uint16_t *out) {
  const int64_t group = heads / kv_heads, length = position + 1;
  for (int64_t h = 0; h < heads; h++)
    rotate(qkv + h * head_dim, cos, sin, head_dim, q_rot + h * head_dim);
  // The scaling folds into q here (one rounding in fp32, not in bf16).
  for (int64_t i = 0; i < heads * head_dim; i += 16)
    _mm512_storeu_ps(q_f32 + i, _mm512_mul_ps(load16(q_rot + i), _mm512_set1_ps(scaling)));
  for (int64_t g = 0; g < kv_heads; g++) {
    const uint16_t *k_new = qkv + (heads + g) * head_dim;
    const uint16_t *v_new = qkv + (heads + kv_heads + g) * head_dim;
    rotate(k_new, cos, sin, head_dim, k_cache + (g * max_len + position) * head_dim);
    memcpy(v_cache + (g * max_len + position) * head_dim, v_new,
           (size_t)head_dim * sizeof(uint16_t));
  }
  const GroupKernel kernel = group_kernel(head_dim / 16);
  for (int64_t g = 0; g < kv_heads; g++)
    kernel(q_f32 + g * group * head_dim, k_cache + g * max_len * head_dim,
           v_cache + g * max_len * head_dim, length, group, scores, length + 16,
           out + g * group * head_dim);
}

// Every decoding sequence of a step, one layer. Sequence b: its row of qkv
// [batch, qkv_stride] (q | k | v of the new token, not yet rotated), its slot b of the layer's
// caches [slots, kv_heads, max_len, head_dim] (the new key and value written at positions[b]),
// cos / sin tables [max_len, head_dim] read at positions[b]; out [batch, heads * head_dim].
// Each sequence attends its own keys 0..positions[b], read in place. Returns -1 for arguments
// outside the kernel's limits (checked first in Python).
extern "C" SLIM_AVX512 int slim_decode_attention_bf16(
    const uint16_t *qkv, int64_t qkv_stride, const uint16_t *cos_table, const uint16_t *sin_table,
    uint16_t *k_cache, uint16_t *v_cache, int64_t max_len, const int64_t *positions,
    int64_t batch, int64_t heads, int64_t kv_heads, int64_t head_dim, float scaling,
    uint16_t *out) {
  if (head_dim % 16 != 0 || head_dim > MAX_HEAD_DIM || kv_heads < 1 || heads % kv_heads != 0 ||
      batch < 1 || qkv_stride < (heads + 2 * kv_heads) * head_dim)
    return -1;
  int64_t longest = 0;
  for (int64_t b = 0; b < batch; b++) {
    if (positions[b] < 0 || positions[b] >= max_len) return -1;
    if (positions[b] + 1 > longest) longest = positions[b] + 1;
  }
  const int64_t group = heads / kv_heads, slot_size = kv_heads * max_len * head_dim;
  uint16_t *q_rot = (uint16_t *)malloc((size_t)(heads * head_dim) * sizeof(uint16_t));
  float *q_f32 = (float *)malloc((size_t)(heads * head_dim) * sizeof(float));
  float *scores = (float *)malloc((size_t)(group * (longest + 16)) * sizeof(float));
  if (q_rot == NULL || q_f32 == NULL || scores == NULL) {
    free(q_rot);
    free(q_f32);
    free(scores);
    return -1;
  }
  for (int64_t b = 0; b < batch; b++) {
    const int64_t position = positions[b];
    attend_sequence(qkv + b * qkv_stride, cos_table + position * head_dim,
                    sin_table + position * head_dim, k_cache + b * slot_size,
                    v_cache + b * slot_size, max_len, position, heads, kv_heads, head_dim,
                    scaling, q_rot, q_f32, scores, out + b * heads * head_dim);
  }
  free(q_rot);
  free(q_f32);
  free(scores);
  return 0;
}

// Per row of x [rows, n]: x += delta (bf16, in place; delta may be NULL), then
// out = weight * (x / rms(x)) with the eager ops' roundings: the normalized x rounded to bf16,
// then the product rounded to bf16.
extern "C" SLIM_AVX512 void slim_add_rms_norm_bf16(uint16_t *x, const uint16_t *delta,
                                                   const uint16_t *weight, int64_t rows,
                                                   int64_t n, float eps, uint16_t *out) {
  for (int64_t r = 0; r < rows; r++, x += n, out += n) {
    __m512 squares = _mm512_setzero_ps();
    for (int64_t i = 0; i < n; i += 16) {
      const __mmask16 m = tail_mask(n - i);
      __m512 v = load16_masked(x + i, m);
      if (delta != NULL) {
        const __m256i summed = to_bf16x16(_mm512_add_ps(v, load16_masked(delta + r * n + i, m)));
        _mm256_mask_storeu_epi16(x + i, m, summed);
        v = load16_masked(x + i, m);
      }
      squares = _mm512_fmadd_ps(v, v, squares);
    }
    const __m512 inv =
        _mm512_set1_ps(1.0f / sqrtf(_mm512_reduce_add_ps(squares) / (float)n + eps));
    for (int64_t i = 0; i < n; i += 16) {
      const __mmask16 m = tail_mask(n - i);
      const __m512 normed = round_bf16x16(_mm512_mul_ps(load16_masked(x + i, m), inv));
      const __m256i product = to_bf16x16(_mm512_mul_ps(load16_masked(weight + i, m), normed));
      _mm256_mask_storeu_epi16(out + i, m, product);
    }
  }
}

// Per row of gate_up [rows, 2n] = gate | up -> out [rows, n] = silu(gate) * up, each op rounded
// to bf16 as the eager ops round.
extern "C" SLIM_AVX512 void slim_silu_mul_bf16(const uint16_t *gate_up, int64_t rows, int64_t n,
                                               uint16_t *out) {
  const __m512 one = _mm512_set1_ps(1.0f);
  for (int64_t r = 0; r < rows; r++, gate_up += 2 * n, out += n) {
    for (int64_t i = 0; i < n; i += 16) {
      const __mmask16 m = tail_mask(n - i);
      const __m512 g = load16_masked(gate_up + i, m);
      const __m512 e = exp_any(_mm512_sub_ps(_mm512_setzero_ps(), g));
      const __m512 silu = round_bf16x16(_mm512_div_ps(g, _mm512_add_ps(one, e)));
      const __m256i product = to_bf16x16(_mm512_mul_ps(silu, load16_masked(gate_up + n + i, m)));
      _mm256_mask_storeu_epi16(out + i, m, product);
    }
  }
}
