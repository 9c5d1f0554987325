// A decode step's work outside the matmuls, bf16 or fp32, on x86-64 (built and loaded with
// cpu_gemv.cpp by kernels/native.py; AVX-512, or AVX2 through SIMDe): per layer, rotary + cache
// writes + attention for every decoding sequence, the residual add + RMSNorm, and
// SiLU(gate) * up. One template per op, instantiated for both element types.
//
// Why: at batch 1 these are ~25 small torch ops per layer, each with microseconds of fixed cost
// and almost no arithmetic (~3 ms of a ~10 ms int8 decode step); here they are three calls. At
// batch 8-32 the eager attention also copies every slot's cache to pad it to the longest
// sequence and masks the padding; here each sequence reads its own keys in place.
// Rotary rounds to bf16 after each product and after the sum, as the eager bf16 ops do, so the
// cached keys are bit-identical; scores, softmax and the weighted sum run in fp32 (as torch's
// fused SDPA does), the output is rounded to bf16 once. In fp32 every rounding is fp32's own
// (the AVX2 level computes in fp32: these ops were 19-30% of its decode step there, eager).

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <atomic>

#include "cpu_bf16.h"
#include "cpu_threads.h"

#define SLIM_AVX512 SLIM_TARGET_AVX512

// How each op reads, writes and rounds its element type: bf16 rounds after every op as the
// eager bf16 ops do; fp32 keeps fp32's own roundings.
struct Bf16 {
  using T = uint16_t;
  SLIM_AVX512 static __m512 load(const T *p) { return load16(p); }
  SLIM_AVX512 static __m512 load_masked(const T *p, __mmask16 m) { return load16_masked(p, m); }
  SLIM_AVX512 static void store(T *p, __m512 v) {
    _mm256_storeu_si256((__m256i *)p, to_bf16x16(v));
  }
  SLIM_AVX512 static void store_masked(T *p, __mmask16 m, __m512 v) {
    _mm256_mask_storeu_epi16(p, m, to_bf16x16(v));
  }
  SLIM_AVX512 static __m512 round(__m512 v) { return round_bf16x16(v); }
  static float to_float(T v) { return slim_bf16_to_float(v); }
  static T from_float(float v) { return slim_float_to_bf16(v); }
  static float round(float v) { return slim_round_to_bf16(v); }
};

struct F32 {
  using T = float;
  SLIM_AVX512 static __m512 load(const T *p) { return _mm512_loadu_ps(p); }
  SLIM_AVX512 static __m512 load_masked(const T *p, __mmask16 m) {
    return _mm512_maskz_loadu_ps(m, p);
  }
  SLIM_AVX512 static void store(T *p, __m512 v) { _mm512_storeu_ps(p, v); }
  SLIM_AVX512 static void store_masked(T *p, __mmask16 m, __m512 v) {
    _mm512_mask_storeu_ps(p, m, v);
  }
  SLIM_AVX512 static __m512 round(__m512 v) { return v; }
  static float to_float(T v) { return v; }
  static T from_float(float v) { return v; }
  static float round(float v) { return v; }
};


// exp(x) for x <= 0 (softmax after subtracting the max): 2^n * 2^f, f in [-0.5, 0.5], degree-6
// polynomial (relative error ~2e-7); x below -87 reads as -87 (the sums it feeds dwarf it).
// 2^n = 2^a * 2^b with a = n >> 1, b = n - a, each built in the exponent bits: both normal for
// n in [-126, 128], so a result past fp32's range still overflows to inf in the last product.
// Written once per vector width, the same operations per lane: the avx2 build runs each
// 8-lane half with AVX2's own instructions (SIMDe's 512-bit integer shifts and VSCALEFPS went
// through memory there: SiLU * up ran 5x slower than the eager ops).
#define SLIM_EXP_NONPOSITIVE(V, VI, P, CAST, ROUND)                                            \
  x = P##_max_ps(x, P##_set1_ps(-87.0f));                                                      \
  const V t = P##_mul_ps(x, P##_set1_ps(1.44269504088896341f));                               \
  const V n = ROUND;                                                                           \
  const V f = P##_mul_ps(P##_sub_ps(t, n), P##_set1_ps(0.69314718055994531f));                \
  V p = P##_set1_ps(1.0f / 720.0f);                                                            \
  p = P##_fmadd_ps(p, f, P##_set1_ps(1.0f / 120.0f));                                          \
  p = P##_fmadd_ps(p, f, P##_set1_ps(1.0f / 24.0f));                                           \
  p = P##_fmadd_ps(p, f, P##_set1_ps(1.0f / 6.0f));                                            \
  p = P##_fmadd_ps(p, f, P##_set1_ps(0.5f));                                                   \
  p = P##_fmadd_ps(p, f, P##_set1_ps(1.0f));                                                   \
  p = P##_fmadd_ps(p, f, P##_set1_ps(1.0f));                                                   \
  const VI whole = P##_cvtps_epi32(n);                                                         \
  const VI a = P##_srai_epi32(whole, 1), b = P##_sub_epi32(whole, a);                          \
  const VI bias = P##_set1_epi32(127);                                                         \
  const V two_a = CAST(P##_slli_epi32(P##_add_epi32(a, bias), 23));          \
  const V two_b = CAST(P##_slli_epi32(P##_add_epi32(b, bias), 23));          \
  return P##_mul_ps(P##_mul_ps(p, two_a), two_b);

#if defined(SLIM_ISA_AVX2)
static inline __m256 exp8_nonpositive(__m256 x) {
  SLIM_EXP_NONPOSITIVE(__m256, __m256i, _mm256, _mm256_castsi256_ps,
                       _mm256_round_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC))
}
static inline simde__m512 exp_nonpositive(simde__m512 x) {
  simde__m512_private halves = simde__m512_to_private(x);
  halves.m256[0] = exp8_nonpositive(halves.m256[0]);
  halves.m256[1] = exp8_nonpositive(halves.m256[1]);
  return simde__m512_from_private(halves);
}
#else
SLIM_AVX512 static inline __m512 exp_nonpositive(__m512 x) {
  SLIM_EXP_NONPOSITIVE(__m512, __m512i, _mm512, _mm512_castsi512_ps,
                       _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC))
}
#endif
#undef SLIM_EXP_NONPOSITIVE

// exp(x) for any x: past ~88.7 it overflows to inf as fp32 exp does (silu(-90) is -0, not a
// tiny negative); the clamp at 88.8 keeps n within 128.
SLIM_AVX512 static inline __m512 exp_any(__m512 x) {
  return exp_nonpositive(_mm512_min_ps(x, _mm512_set1_ps(88.8f)));
}

// x * cos + rotate_half(x) * sin with E's rounding after each op, into `out`.
template <class E>
SLIM_AVX512 static void rotate(const typename E::T *x, const typename E::T *cos,
                               const typename E::T *sin, int64_t dim, typename E::T *out) {
  const int64_t half = dim / 2;
  if (half % 16 == 0) {
    for (int64_t d = 0; d < half; d += 16) {
      const __m512 first = E::load(x + d), second = E::load(x + half + d);
      const __m512 a1 = E::round(_mm512_mul_ps(first, E::load(cos + d)));
      const __m512 b1 = E::round(
          _mm512_mul_ps(_mm512_sub_ps(_mm512_setzero_ps(), second), E::load(sin + d)));
      const __m512 a2 = E::round(_mm512_mul_ps(second, E::load(cos + half + d)));
      const __m512 b2 = E::round(_mm512_mul_ps(first, E::load(sin + half + d)));
      E::store(out + d, _mm512_add_ps(a1, b1));
      E::store(out + half + d, _mm512_add_ps(a2, b2));
    }
    return;
  }
  for (int64_t d = 0; d < dim; d++) {
    const float rotated = d < half ? -E::to_float(x[d + half]) : E::to_float(x[d - half]);
    const float a = E::round(E::to_float(x[d]) * E::to_float(cos[d]));
    const float b = E::round(rotated * E::to_float(sin[d]));
    out[d] = E::from_float(a + b);
  }
}

// Keys, values and accumulators of one head live in registers: head_dim / 16 vectors at most.
static const int64_t MAX_HEAD_DIM = 256;

extern "C" int64_t slim_decode_attention_max_head_dim(void) { return MAX_HEAD_DIM; }

// Rows ahead of the one in use that the score loop fetches (16 rows of 64 bf16: 2 KiB).
static const int64_t KEY_LEAD = 16;

// Every cache line of one row of `dim` values, into L1.
template <class T>
static inline void prefetch_row(const T *row, int64_t dim) {
  for (int64_t offset = 0; offset < dim * (int64_t)sizeof(T); offset += 64)
    _mm_prefetch((const char *)row + offset, _MM_HINT_T0);
}

// One K/V head's group of query heads over keys 0..length-1: q_group [group, CHUNKS * 16]
// fp32 (scaled), scores [group, stride] scratch, out [group, CHUNKS * 16]. CHUNKS is a
// compile-time count so a key's and a head's accumulators stay in registers (a runtime count
// kept them on the stack: each FMA waited on a store and a reload).
template <class E, int CHUNKS>
SLIM_AVX512 static void attend_group(const float *q_group, const typename E::T *keys,
                                     const typename E::T *values, int64_t length, int64_t group,
                                     float *scores, int64_t stride, typename E::T *out) {
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
    for (int c = 0; c < CHUNKS; c++) key[c] = E::load(keys + j * dim + 16 * c);
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
        even[c] = _mm512_fmadd_ps(p0, E::load(values + j * dim + 16 * c), even[c]);
        odd[c] = _mm512_fmadd_ps(p1, E::load(values + (j + 1) * dim + 16 * c), odd[c]);
      }
    }
    if (j < length) {
      const __m512 p0 = _mm512_set1_ps(row[j]);
      for (int c = 0; c < CHUNKS; c++)
        even[c] = _mm512_fmadd_ps(p0, E::load(values + j * dim + 16 * c), even[c]);
    }
    const __m512 inv = _mm512_set1_ps(1.0f / _mm512_reduce_add_ps(total));
    for (int c = 0; c < CHUNKS; c++)
      E::store(out + h * dim + 16 * c, _mm512_mul_ps(_mm512_add_ps(even[c], odd[c]), inv));
  }
}

template <class E>
using GroupKernel = void (*)(const float *, const typename E::T *, const typename E::T *, int64_t,
                             int64_t, float *, int64_t, typename E::T *);

// attend_group for head_dim / 16 chunks (1..16).
template <class E>
static GroupKernel<E> group_kernel(int64_t chunks) {
  static const GroupKernel<E> table[MAX_HEAD_DIM / 16] = {
      attend_group<E, 1>,  attend_group<E, 2>,  attend_group<E, 3>,  attend_group<E, 4>,
      attend_group<E, 5>,  attend_group<E, 6>,  attend_group<E, 7>,  attend_group<E, 8>,
      attend_group<E, 9>,  attend_group<E, 10>, attend_group<E, 11>, attend_group<E, 12>,
      attend_group<E, 13>, attend_group<E, 14>, attend_group<E, 15>, attend_group<E, 16>};
  return table[chunks - 1];
}

// One sequence's new token: rotary on its q (scaled, into q_f32 [heads * head_dim]) and k, the
// new key and value written at `position` of its slot caches [kv_heads, max_len, head_dim].
// q_rot [heads * head_dim] (in E) is scratch.
template <class E>
SLIM_AVX512 static void prepare_sequence(const typename E::T *qkv, const typename E::T *cos,
                                         const typename E::T *sin, typename E::T *k_cache,
                                         typename E::T *v_cache, int64_t max_len,
                                         int64_t position, int64_t heads, int64_t kv_heads,
                                         int64_t head_dim, float scaling, typename E::T *q_rot,
                                         float *q_f32) {
  using T = typename E::T;
  for (int64_t h = 0; h < heads; h++)
    rotate<E>(qkv + h * head_dim, cos, sin, head_dim, q_rot + h * head_dim);
  // The scaling folds into q here (one rounding in fp32, not in bf16).
  for (int64_t i = 0; i < heads * head_dim; i += 16)
    _mm512_storeu_ps(q_f32 + i, _mm512_mul_ps(E::load(q_rot + i), _mm512_set1_ps(scaling)));
  for (int64_t g = 0; g < kv_heads; g++) {
    const T *k_new = qkv + (heads + g) * head_dim;
    const T *v_new = qkv + (heads + kv_heads + g) * head_dim;
    rotate<E>(k_new, cos, sin, head_dim, k_cache + (g * max_len + position) * head_dim);
    memcpy(v_cache + (g * max_len + position) * head_dim, v_new, (size_t)head_dim * sizeof(T));
  }
}

// Every decoding sequence of a step, one layer. Sequence b: its row of qkv
// [batch, qkv_stride] (q | k | v of the new token, not yet rotated), its slot b of the layer's
// caches [slots, kv_heads, max_len, head_dim] (the new key and value written at positions[b]),
// cos / sin tables [max_len, head_dim] read at positions[b]; out [batch, heads * head_dim].
// Each sequence attends its own keys 0..positions[b], read in place. Returns -1 for arguments
// outside the kernel's limits (checked first in Python).
template <class E>
SLIM_AVX512 static int decode_attention(const typename E::T *qkv, int64_t qkv_stride,
                                        const typename E::T *cos_table,
                                        const typename E::T *sin_table, typename E::T *k_cache,
                                        typename E::T *v_cache, int64_t max_len,
                                        const int64_t *positions, int64_t batch, int64_t heads,
                                        int64_t kv_heads, int64_t head_dim, float scaling,
                                        typename E::T *out) {
  using T = typename E::T;
  if (head_dim % 16 != 0 || head_dim > MAX_HEAD_DIM || kv_heads < 1 || heads % kv_heads != 0 ||
      batch < 1 || qkv_stride < (heads + 2 * kv_heads) * head_dim)
    return -1;
  int64_t longest = 0;
  for (int64_t b = 0; b < batch; b++) {
    if (positions[b] < 0 || positions[b] >= max_len) return -1;
    if (positions[b] + 1 > longest) longest = positions[b] + 1;
  }
  const int64_t group = heads / kv_heads, slot_size = kv_heads * max_len * head_dim;
  const int64_t width = heads * head_dim;
  T *q_rot = (T *)malloc((size_t)width * sizeof(T));
  float *q_f32 = (float *)malloc((size_t)(batch * width) * sizeof(float));
  if (q_rot == NULL || q_f32 == NULL) {
    free(q_rot);
    free(q_f32);
    return -1;
  }
  // Each sequence's new key and value go into the cache before any query reads it.
  for (int64_t b = 0; b < batch; b++) {
    const int64_t position = positions[b];
    prepare_sequence<E>(qkv + b * qkv_stride, cos_table + position * head_dim,
                        sin_table + position * head_dim, k_cache + b * slot_size,
                        v_cache + b * slot_size, max_len, position, heads, kv_heads, head_dim,
                        scaling, q_rot, q_f32 + b * width);
  }
  free(q_rot);
  // (sequence, K/V head) pairs shared out across the kernels' threads (cpu_threads.h): each
  // writes only its own output heads, so the result does not depend on the split. At one
  // sequence its K/V heads still split (the other thread waited through every layer's
  // attention); at batch 32 a layer's attention read ~4 MB of fp32 cache on one thread.
  const GroupKernel<E> kernel = group_kernel<E>(head_dim / 16);
  std::atomic<int> failed{0};
  slim_parallel(batch * kv_heads, [&](int64_t first, int64_t end) {
    float *scores = (float *)malloc((size_t)(group * (longest + 16)) * sizeof(float));
    if (scores == NULL) {
      failed.store(1, std::memory_order_relaxed);
      return;
    }
    for (int64_t unit = first; unit < end; unit++) {
      const int64_t b = unit / kv_heads, g = unit % kv_heads, length = positions[b] + 1;
      const T *keys = k_cache + b * slot_size + g * max_len * head_dim;
      const T *values = v_cache + b * slot_size + g * max_len * head_dim;
      kernel(q_f32 + b * width + g * group * head_dim, keys, values, length, group, scores,
             length + 16, out + b * width + g * group * head_dim);
    }
    free(scores);
  });
  free(q_f32);
  return failed.load() ? -1 : 0;
}

#define SLIM_DECODE_ATTENTION(NAME, E)                                                          \
  extern "C" SLIM_AVX512 int NAME(                                                              \
      const E::T *qkv, int64_t qkv_stride, const E::T *cos_table, const E::T *sin_table,       \
      E::T *k_cache, E::T *v_cache, int64_t max_len, const int64_t *positions, int64_t batch,  \
      int64_t heads, int64_t kv_heads, int64_t head_dim, float scaling, E::T *out) {          \
    return decode_attention<E>(qkv, qkv_stride, cos_table, sin_table, k_cache, v_cache,         \
                               max_len, positions, batch, heads, kv_heads, head_dim, scaling,   \
                               out);                                                            \
  }
SLIM_DECODE_ATTENTION(slim_decode_attention_bf16, Bf16)
SLIM_DECODE_ATTENTION(slim_decode_attention_f32, F32)

// Per row of x [rows, n]: x += delta (in place; delta may be NULL), then
// out = weight * (x / rms(x)) with E's roundings: the normalized x rounded, then the product.
template <class E>
SLIM_AVX512 static void add_rms_norm(typename E::T *x, const typename E::T *delta,
                                     const typename E::T *weight, int64_t rows, int64_t n,
                                     float eps, typename E::T *out) {
  for (int64_t r = 0; r < rows; r++, x += n, out += n) {
    __m512 squares = _mm512_setzero_ps();
    for (int64_t i = 0; i < n; i += 16) {
      const __mmask16 m = tail_mask(n - i);
      __m512 v = E::load_masked(x + i, m);
      if (delta != NULL) {
        E::store_masked(x + i, m, _mm512_add_ps(v, E::load_masked(delta + r * n + i, m)));
        v = E::load_masked(x + i, m);
      }
      squares = _mm512_fmadd_ps(v, v, squares);
    }
    const __m512 inv =
        _mm512_set1_ps(1.0f / sqrtf(_mm512_reduce_add_ps(squares) / (float)n + eps));
    for (int64_t i = 0; i < n; i += 16) {
      const __mmask16 m = tail_mask(n - i);
      const __m512 normed = E::round(_mm512_mul_ps(E::load_masked(x + i, m), inv));
      E::store_masked(out + i, m, _mm512_mul_ps(E::load_masked(weight + i, m), normed));
    }
  }
}

extern "C" SLIM_AVX512 void slim_add_rms_norm_bf16(uint16_t *x, const uint16_t *delta,
                                                   const uint16_t *weight, int64_t rows,
                                                   int64_t n, float eps, uint16_t *out) {
  add_rms_norm<Bf16>(x, delta, weight, rows, n, eps, out);
}

extern "C" SLIM_AVX512 void slim_add_rms_norm_f32(float *x, const float *delta,
                                                  const float *weight, int64_t rows, int64_t n,
                                                  float eps, float *out) {
  add_rms_norm<F32>(x, delta, weight, rows, n, eps, out);
}

// Per row of gate_up [rows, 2n] = gate | up -> out [rows, n] = silu(gate) * up, each op rounded
// as E's eager ops round.
template <class E>
SLIM_AVX512 static void silu_mul(const typename E::T *gate_up, int64_t rows, int64_t n,
                                 typename E::T *out) {
  const __m512 one = _mm512_set1_ps(1.0f);
  for (int64_t r = 0; r < rows; r++, gate_up += 2 * n, out += n) {
    for (int64_t i = 0; i < n; i += 16) {
      const __mmask16 m = tail_mask(n - i);
      const __m512 g = E::load_masked(gate_up + i, m);
      const __m512 e = exp_any(_mm512_sub_ps(_mm512_setzero_ps(), g));
      const __m512 silu = E::round(_mm512_div_ps(g, _mm512_add_ps(one, e)));
      E::store_masked(out + i, m, _mm512_mul_ps(silu, E::load_masked(gate_up + n + i, m)));
    }
  }
}

extern "C" SLIM_AVX512 void slim_silu_mul_bf16(const uint16_t *gate_up, int64_t rows, int64_t n,
                                               uint16_t *out) {
  silu_mul<Bf16>(gate_up, rows, n, out);
}

#if defined(SLIM_ISA_AVX2)
// fp32 in the avx2 build: the same arithmetic, 8 lanes at a time in AVX2's own registers (the
// 16-lane form through SIMDe kept its vectors in memory: 2.3x slower than the eager ops at 32
// rows); a row's last n % 8 values go through a zero-padded copy.
static inline __m256 silu_mul8(__m256 g, __m256 up) {
  const __m256 e = exp8_nonpositive(_mm256_min_ps(_mm256_sub_ps(_mm256_setzero_ps(), g),
                                                  _mm256_set1_ps(88.8f)));
  return _mm256_mul_ps(_mm256_div_ps(g, _mm256_add_ps(_mm256_set1_ps(1.0f), e)), up);
}

extern "C" void slim_silu_mul_f32(const float *gate_up, int64_t rows, int64_t n, float *out) {
  const int64_t whole = n & ~(int64_t)7;
  for (int64_t r = 0; r < rows; r++, gate_up += 2 * n, out += n) {
    for (int64_t i = 0; i < whole; i += 8)
      _mm256_storeu_ps(out + i, silu_mul8(_mm256_loadu_ps(gate_up + i),
                                          _mm256_loadu_ps(gate_up + n + i)));
    if (whole < n) {
      float g[8] = {0}, up[8] = {0}, result[8];
      memcpy(g, gate_up + whole, (size_t)(n - whole) * sizeof(float));
      memcpy(up, gate_up + n + whole, (size_t)(n - whole) * sizeof(float));
      _mm256_storeu_ps(result, silu_mul8(_mm256_loadu_ps(g), _mm256_loadu_ps(up)));
      memcpy(out + whole, result, (size_t)(n - whole) * sizeof(float));
    }
  }
}
#else
extern "C" SLIM_AVX512 void slim_silu_mul_f32(const float *gate_up, int64_t rows, int64_t n,
                                              float *out) {
  silu_mul<F32>(gate_up, rows, n, out);
}
#endif
