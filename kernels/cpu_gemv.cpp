// W8A16 matmul for decode batches (1-2 rows on AVX-512 VNNI, 1-32 on AVX2), loaded
// through ctypes (kernels/native.py builds it once per machine with the system C++ compiler).
//
// Why not torch._weight_int8pack_mm: at 1-8 rows a decode step only streams the int8 weights, and
// that kernel widens each int8 to fp32 and multiplies in fp32 (three vector ops per 16 weights), so
// it is bound by those ops at ~15 GB/s. Here each activation row is quantized per row to int16
// codes (a step of 1/32767 of the row's largest value: far below the bf16 rounding of the inputs),
// split into a low and a high byte, and both bytes meet the int8 weights through VPDPBUSD (64
// products per instruction, exact int32 sums, weights used as stored). Eight weight rows per pass
// at one activation row keep enough loads in flight to read ~30 GB/s (one core reads ~37).

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <type_traits>

#include "cpu_bf16.h"
#include "cpu_threads.h"

#define SLIM_AVX512 SLIM_TARGET_VNNI_F16C

static const int64_t CODE_LIMIT = 32767;
// Each byte sum is at most 255 * 127 * K: it fits an int32 up to this K.
static const int64_t MAX_K = INT32_MAX / (255 * 127);
#if defined(SLIM_ISA_AVX2)
static const int64_t MAX_ROWS = 32;  // past it the dense fp32 matmul is faster (kernels/README.md)
#else
// 1-2 rows on VPDPBUSD, 3-8 on VPMADDWD; from 16 rows torch's kernels are as fast.
static const int64_t MAX_ROWS = 8;
#endif
static const int64_t VNNI_MAX_ROWS = 2;
// Distance (bytes of weight rows) the loads run ahead of the products.
static const int64_t PREFETCH_BYTES = 12288;

SLIM_AVX512 static inline float load_scalar(const void *base, int dtype, int64_t i) {
  if (dtype == SLIM_F32) return ((const float *)base)[i];
  if (dtype == SLIM_F16) return _cvtsh_ss(((const uint16_t *)base)[i]);
  return slim_bf16_to_float(((const uint16_t *)base)[i]);
}

SLIM_AVX512 static inline void store_scalar(void *base, int dtype, int64_t i, float v) {
  if (dtype == SLIM_F32) ((float *)base)[i] = v;
  else if (dtype == SLIM_F16) ((uint16_t *)base)[i] = _cvtss_sh(v, _MM_FROUND_TO_NEAREST_INT);
  else ((uint16_t *)base)[i] = slim_float_to_bf16(v);
}

extern "C" int64_t slim_w8a16_code_limit(void) { return CODE_LIMIT; }
extern "C" int64_t slim_w8a16_max_k(void) { return MAX_K; }

extern "C" int slim_cpu_supported(void) { return slim_build_runs_here(); }


// Row m of x -> int16 codes c (|c| <= CODE_LIMIT, a step of the row's absmax / CODE_LIMIT) handed
// to store(m, i, c), and scale[m]. A non-finite row gets a NaN scale and no codes (callers
// prefill code 0).
template <class Store>
SLIM_AVX512 static void quantize_rows(const void *x, int dtype, int64_t rows, int64_t k,
                                      double *scales, Store store) {
  for (int64_t m = 0; m < rows; m++) {
    float absmax = 0.0f;
    for (int64_t i = 0; i < k; i++) absmax = fmaxf(absmax, fabsf(load_scalar(x, dtype, m * k + i)));
    if (!isfinite(absmax)) {
      scales[m] = NAN;
      continue;
    }
    scales[m] = (double)absmax / (double)CODE_LIMIT;
    if (absmax == 0.0f) continue;
    float inv = (float)CODE_LIMIT / absmax;
    for (int64_t i = 0; i < k; i++)
      store(m, i, (int32_t)lrintf(load_scalar(x, dtype, m * k + i) * inv));
  }
}

// ROWS activation rows against every weight row, WR weight rows per pass, each 64-byte weight
// vector loaded once for all ROWS. Per weight row: sum(lo * w), sum(hi * w) and sum(w) (the last
// undoes the +128 of the high bytes).
// Weight rows [n_begin, n_end) of n_total (one thread's share).
template <int ROWS, int WR>
SLIM_AVX512 static void gemv_block(const uint8_t *lo, const uint8_t *hi, const double *xscale,
                                   int64_t kp, const int8_t *w, const void *wscale, int wdtype,
                                   int64_t n_begin, int64_t n_end, int64_t n_total, int64_t k,
                                   void *out, int odtype) {
  const int64_t kmain = k & ~(int64_t)63;
  const __mmask64 tail = k > kmain ? (__mmask64)(~0ull >> (64 - (k - kmain))) : 0;
  const __m512i ones = _mm512_set1_epi8(1);
  int64_t ahead = PREFETCH_BYTES / k;
  ahead = ahead < WR ? WR : ahead;
  const int64_t span = n_end - n_begin;
  // The last span % WR weight rows go through the same code as rows already done, then only
  // the new ones are written: no separate remainder loop.
  for (int64_t n = n_begin; n < n_end; n += WR) {
    const int64_t first = n + WR <= n_end ? n : (span >= WR ? n_end - WR : n_begin);
    const int rows_here = span >= WR ? WR : (int)span;
    const int8_t *w0 = w + first * k;
    __m512i acc_lo[WR][ROWS], acc_hi[WR][ROWS], acc_w[WR];
#pragma GCC unroll 8
    for (int r = 0; r < WR; r++) {
      acc_w[r] = _mm512_setzero_si512();
#pragma GCC unroll 2
      for (int m = 0; m < ROWS; m++) acc_lo[r][m] = acc_hi[r][m] = _mm512_setzero_si512();
    }
    for (int64_t i = 0; i < kp; i += 64) {
      const __mmask64 mask = i < kmain ? ~(__mmask64)0 : tail;
      __m512i xl[ROWS], xh[ROWS];
#pragma GCC unroll 2
      for (int m = 0; m < ROWS; m++) {
        xl[m] = _mm512_loadu_si512(lo + m * kp + i);
        xh[m] = _mm512_loadu_si512(hi + m * kp + i);
      }
#pragma GCC unroll 8
      for (int r = 0; r < WR; r++) {
        const int8_t *row = w0 + (r < rows_here ? r : 0) * k;
        _mm_prefetch((const char *)(row + ahead * k + i), _MM_HINT_T0);
        __m512i wv = _mm512_maskz_loadu_epi8(mask, row + i);
        acc_w[r] = _mm512_dpbusd_epi32(acc_w[r], ones, wv);
#pragma GCC unroll 2
        for (int m = 0; m < ROWS; m++) {
          acc_lo[r][m] = _mm512_dpbusd_epi32(acc_lo[r][m], xl[m], wv);
          acc_hi[r][m] = _mm512_dpbusd_epi32(acc_hi[r][m], xh[m], wv);
        }
      }
    }
    for (int r = 0; r < rows_here; r++) {
      const int64_t index = first + r;
      if (index < n) continue;  // written by the previous pass
      const int64_t weight_sum = _mm512_reduce_add_epi32(acc_w[r]);
      const double ws = (double)load_scalar(wscale, wdtype, index);
      for (int m = 0; m < ROWS; m++) {
        const int64_t high = (int64_t)_mm512_reduce_add_epi32(acc_hi[r][m]) - 128 * weight_sum;
        const int64_t sum = 256 * high + (int64_t)_mm512_reduce_add_epi32(acc_lo[r][m]);
        store_scalar(out, odtype, m * n_total + index, (float)((double)sum * xscale[m] * ws));
      }
    }
  }
}

// The VPMADDWD kernel: the int16 codes meet the int8 weights widened to int16 (AVX2 has no
// VPDPBUSD; on AVX-512 it serves 3-8 rows, where it beat torch's int8pack 1.5-2x). A pair sums to at most 2 * 32767 * 127, so an int32 lane takes 256 of them (K blocks
// of 4096) before the block's sums move to int64: the same exact sums as the AVX-512 kernel, so
// both builds return the same bits.
static const int64_t AVX2_K_BLOCK = 256 * 16;
static const int GROUP_ROWS = 4;  // code rows per group: 4 x 2 accumulators + 4 codes in 16 YMM

SLIM_AVX512 static inline int64_t sum_lanes(__m256i v) {
  int32_t lanes[8];
  _mm256_storeu_si256((__m256i *)lanes, v);
  int64_t total = 0;
  for (int i = 0; i < 8; i++) total += lanes[i];  // int64: eight full lanes overflow int32
  return total;
}

// sums[r][m] += the int64 dot products of ROWS code rows with WR weight rows (row r of w0, or
// row 0 again past rows_here).
template <int ROWS, int WR>
SLIM_AVX512 static inline void dot_group_avx2(const int16_t *codes, int64_t kp, const int8_t *w0,
                                  int rows_here, int64_t k, int64_t ahead,
                                  int64_t (*sums)[GROUP_ROWS]) {
  for (int64_t block = 0; block < k; block += AVX2_K_BLOCK) {
    const int64_t end = block + AVX2_K_BLOCK < k ? block + AVX2_K_BLOCK : k;
    __m256i acc[WR][ROWS];
#pragma GCC unroll 4
    for (int r = 0; r < WR; r++)
#pragma GCC unroll 4
      for (int m = 0; m < ROWS; m++) acc[r][m] = _mm256_setzero_si256();
    // Whole 16-weight steps, then the row's last < 16 weights from a zero-padded copy (codes
    // are padded with zeros to kp): never a read past a weight row's end.
    const int64_t whole = block + ((end - block) & ~(int64_t)15);
    const int8_t *rows[WR];
#pragma GCC unroll 4
    for (int r = 0; r < WR; r++) rows[r] = w0 + (r < rows_here ? r : 0) * k;
    for (int64_t i = block; i < whole; i += 16) {
      __m256i xv[ROWS];
#pragma GCC unroll 4
      for (int m = 0; m < ROWS; m++)
        xv[m] = _mm256_loadu_si256((const __m256i *)(codes + m * kp + i));
#pragma GCC unroll 4
      for (int r = 0; r < WR; r++) {
        _mm_prefetch((const char *)(rows[r] + ahead * k + i), _MM_HINT_T0);
        const __m256i wv = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(rows[r] + i)));
#pragma GCC unroll 4
        for (int m = 0; m < ROWS; m++)
          acc[r][m] = _mm256_add_epi32(acc[r][m], _mm256_madd_epi16(xv[m], wv));
      }
    }
    if (whole < end) {
      for (int r = 0; r < WR; r++) {
        int8_t tail[16] = {0};
        memcpy(tail, rows[r] + whole, (size_t)(end - whole));
        const __m256i wv = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)tail));
        for (int m = 0; m < ROWS; m++) {
          const __m256i xv = _mm256_loadu_si256((const __m256i *)(codes + m * kp + whole));
          acc[r][m] = _mm256_add_epi32(acc[r][m], _mm256_madd_epi16(xv, wv));
        }
      }
    }
    for (int r = 0; r < WR; r++)
      for (int m = 0; m < ROWS; m++) sums[r][m] += sum_lanes(acc[r][m]);
  }
}

// Every activation row against WR weight rows per pass: the pass's weight rows come from memory
// once and stay in L1 while each group of up to GROUP_ROWS code rows meets them.
// Weight rows [n_begin, n_end) of n_total (one thread's share).
SLIM_AVX512 static void gemv_avx2(const int16_t *codes, const double *xscale, int64_t m_total,
                                  int64_t kp, const int8_t *w, const void *wscale, int wdtype,
                                  int64_t n_begin, int64_t n_end, int64_t n_total, int64_t k,
                                  void *out, int odtype) {
  constexpr int WR = 2;
  int64_t ahead = PREFETCH_BYTES / k;
  ahead = ahead < WR ? WR : ahead;
  const int64_t span = n_end - n_begin;
  for (int64_t n = n_begin; n < n_end; n += WR) {
    // The last span % WR weight rows go through the same code as rows already done, then
    // only the new ones are written: no separate remainder loop.
    const int64_t first = n + WR <= n_end ? n : (span >= WR ? n_end - WR : n_begin);
    const int rows_here = span >= WR ? WR : (int)span;
    const int8_t *w0 = w + first * k;
    for (int64_t row0 = 0; row0 < m_total; row0 += GROUP_ROWS) {
      const int64_t rows = m_total - row0 < GROUP_ROWS ? m_total - row0 : GROUP_ROWS;
      const int16_t *c = codes + row0 * kp;
      int64_t sums[WR][GROUP_ROWS] = {};
      if (rows == 1) dot_group_avx2<1, WR>(c, kp, w0, rows_here, k, ahead, sums);
      else if (rows == 2) dot_group_avx2<2, WR>(c, kp, w0, rows_here, k, ahead, sums);
      else if (rows == 3) dot_group_avx2<3, WR>(c, kp, w0, rows_here, k, ahead, sums);
      else dot_group_avx2<4, WR>(c, kp, w0, rows_here, k, ahead, sums);
      for (int r = 0; r < rows_here; r++) {
        const int64_t index = first + r;
        if (index < n) continue;  // written by the previous pass
        const double ws = (double)load_scalar(wscale, wdtype, index);
        for (int64_t m = 0; m < rows; m++)
          store_scalar(out, odtype, (row0 + m) * n_total + index,
                       (float)((double)sums[r][m] * xscale[row0 + m] * ws));
      }
    }
  }
}

SLIM_AVX512 static void w8a16_gemv_avx2(const void *x, int xdtype, int64_t m, int64_t k, const int8_t *w,
                            const void *wscale, int wdtype, int64_t n, void *out,
                            int16_t *codes, double *scales) {
  const int64_t kp = (k + 15) & ~(int64_t)15;
  memset(codes, 0, (size_t)(m * kp) * sizeof(int16_t));
  quantize_rows(x, xdtype, m, k, scales,
                [&](int64_t row, int64_t i, int32_t code) { codes[row * kp + i] = (int16_t)code; });
  // Weight rows shared out across the kernels' threads (cpu_threads.h).
  slim_parallel(n, [&](int64_t begin, int64_t end) {
    gemv_avx2(codes, scales, m, kp, w, wscale, wdtype, begin, end, n, k, out, xdtype);
  });
}

#if !defined(SLIM_ISA_AVX2)
// 1-2 rows on VPDPBUSD: both bytes of each code meet the weights as stored.
SLIM_AVX512 static int w8a16_gemv_vnni(const void *x, int xdtype, int64_t m, int64_t k,
                                       const int8_t *w, const void *wscale, int wdtype, int64_t n,
                                       void *out, double *scales) {
  const int64_t kp = (k + 63) & ~(int64_t)63;
  uint8_t *bytes = (uint8_t *)aligned_alloc(64, (size_t)(2 * m * kp));
  if (bytes == NULL) return -1;
  uint8_t *lo = bytes, *hi = bytes + m * kp;
  // code c = 256 * (hi - 128) + lo; padding and zero rows: code 0 (lo 0, hi 128)
  memset(lo, 0, (size_t)(m * kp));
  memset(hi, 128, (size_t)(m * kp));
  quantize_rows(x, xdtype, m, k, scales, [&](int64_t row, int64_t i, int32_t code) {
    lo[row * kp + i] = (uint8_t)(code & 0xff);
    hi[row * kp + i] = (uint8_t)((code >> 8) + 128);
  });
  // One row: eight weight rows per pass (more loads in flight); two rows: four (registers).
  slim_parallel(n, [&](int64_t begin, int64_t end) {
    if (m == 1)
      gemv_block<1, 8>(lo, hi, scales, kp, w, wscale, wdtype, begin, end, n, k, out, xdtype);
    else
      gemv_block<2, 4>(lo, hi, scales, kp, w, wscale, wdtype, begin, end, n, k, out, xdtype);
  });
  free(bytes);
  return 0;
}
#endif

// W4A16, group-wise asymmetric (LowBitLinear's 4-bit layout: byte j of a weight row holds codes
// 2j | 2j+1 << 4; W = (code - zero[g]) * scale[g] per group g of G weights along K). The int16
// activation codes q meet the 4-bit codes c through VPMADDWD: per group the int32 sum D = sum c*q
// is exact (G <= 256: 256 * 15 * 32767 < 2^31), and
//   y = xscale * sum_g scale[g] * (D_g - zero[g] * S_g),  S_g = the group's sum of q,
// with S_g computed once per activation row and shared by every weight row. Each 16-byte load
// gives 32 codes: the low nibbles are the even positions, the high ones the odd, so the
// activation codes are stored in that order (per 32: the 16 even, then the 16 odd). Both builds:
// at the avx2 level torch's int4pack is 5-40x slower than the fp32 dense matmul; at the avx512
// level the one-call decode step runs it (per call int4pack keeps 2-64 rows, kernels/lowbit.py).
static const int64_t W4_MAX_ROWS = 32;
static const int64_t W4_MAX_GROUP = 256;

extern "C" int64_t slim_w4a16_max_rows(void) { return W4_MAX_ROWS; }

// The 4-bit kernel is AVX2 + FMA code; in the avx512 build it may use the upper 16 vector
// registers too.
#if defined(SLIM_ISA_AVX2)
#define SLIM_W4
#else
#define SLIM_W4 __attribute__((target("avx2,fma,f16c,avx512f,avx512bw,avx512vl")))
#endif

// One of a group's scales or zero points, broadcast; the dtype is a template argument so that
// the loop over groups carries no branch.
template <int SD>
SLIM_W4 static inline __m256 broadcast_scale(const void *base, int64_t i) {
  if constexpr (SD == SLIM_F32) return _mm256_broadcast_ss((const float *)base + i);
  else if constexpr (SD == SLIM_BF16)
    return _mm256_castsi256_ps(_mm256_set1_epi32((int32_t)((const uint16_t *)base)[i] << 16));
  else return _mm256_set1_ps(_cvtsh_ss(((const uint16_t *)base)[i]));
}

// Eight consecutive scales or zero points as fp32.
template <int SD>
SLIM_W4 static inline __m256 load_scales8(const void *base, int64_t i) {
  if constexpr (SD == SLIM_F32) return _mm256_loadu_ps((const float *)base + i);
  const __m128i half = _mm_loadu_si128((const __m128i *)((const uint16_t *)base + i));
  if constexpr (SD == SLIM_BF16)
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(half), 16));
  else return _mm256_cvtph_ps(half);
}

SLIM_W4 static inline float sum8(__m256 v) {
  float lanes[8];
  _mm256_storeu_ps(lanes, v);
  double sum = 0.0;
  for (int j = 0; j < 8; j++) sum += lanes[j];
  return (float)sum;
}

// sum_g scale[g] * zero[g] * S_g for weight row n and activation row m (the zero points' share,
// subtracted once per output rather than per group).
template <int SD>
SLIM_W4 static inline float w4_zero_term(const void *scales, const void *zeros, int64_t n,
                                         int64_t groups, const float *group_sums) {
  const int64_t base = n * groups;
  __m256 acc = _mm256_setzero_ps();
  int64_t g = 0;
  for (; g + 8 <= groups; g += 8)
    acc = _mm256_fmadd_ps(
        _mm256_mul_ps(load_scales8<SD>(scales, base + g), load_scales8<SD>(zeros, base + g)),
        _mm256_loadu_ps(group_sums + g), acc);
  float sum = sum8(acc);
  for (; g < groups; g++)
    sum += _mm256_cvtss_f32(broadcast_scale<SD>(scales, base + g)) *
           _mm256_cvtss_f32(broadcast_scale<SD>(zeros, base + g)) * group_sums[g];
  return sum;
}

// WR weight rows from n against ROWS activation rows from row0. Each 16-byte load of a weight
// row gives 32 codes (low nibbles: even positions, high: odd; the activation codes are stored
// in that order), which meet every activation row through VPMADDWD; per group the exact int32
// sum becomes fp32 once and is scaled. G32: groups of 32, one load each (no int32 accumulator
// kept across loads). Loops run weight row outer, activation row inner, so that only the
// ROWS x WR fp32 sums live in registers.
template <int ROWS, int WR, int SD, bool G32>
SLIM_W4 static void w4_block(const int16_t *codes, int64_t k, const double *xscale,
                             const float *group_sums, int64_t groups, const uint8_t *w,
                             const void *scales, const void *zeros, int64_t group, int64_t n,
                             int64_t n_total, void *out, int odtype, int64_t row0) {
  const __m256i nibble = _mm256_set1_epi16(0x0f);
  const uint64_t row_bytes = (uint64_t)k / 2;
  const uint8_t *weights = w + (uint64_t)n * row_bytes;
  const uint64_t loads = G32 ? 1 : (uint64_t)group / 32;
  // Software prefetch PREFETCH_BYTES ahead of the reads at one or two activation rows: a call's
  // share of rows is a few hundred KB, too short for the hardware prefetchers to ramp up on their
  // own (one row: 4.6 against 5.4 ms per step of 120 calls); more rows are bound by the products.
  // The pass reads its rows' WR x 16 bytes per 32-code block, and their scales and zero points.
  constexpr bool PREFETCH = ROWS <= 2;
  const char *weights_ahead = (const char *)weights + PREFETCH_BYTES;
  if (PREFETCH) {
    const uint64_t scale_bytes = SD == SLIM_F32 ? 4 : 2;
    const uint64_t ahead_rows = PREFETCH_BYTES / row_bytes;
    const uint64_t first = ((uint64_t)n + ahead_rows) * (uint64_t)groups * scale_bytes;
    for (uint64_t b = 0; b < WR * (uint64_t)groups * scale_bytes; b += 64) {
      _mm_prefetch((const char *)scales + first + b, _MM_HINT_T0);
      _mm_prefetch((const char *)zeros + first + b, _MM_HINT_T0);
    }
  }
  __m256 total[ROWS][WR];
#pragma GCC unroll 4
  for (int m = 0; m < ROWS; m++)
#pragma GCC unroll 4
    for (int r = 0; r < WR; r++) total[m][r] = _mm256_setzero_ps();
  for (uint64_t g = 0; g < (uint64_t)groups; g++) {
    __m256i acc[ROWS][WR];
#pragma GCC unroll 4
    for (int m = 0; m < ROWS; m++)
#pragma GCC unroll 4
      for (int r = 0; r < WR; r++) acc[m][r] = _mm256_setzero_si256();
    for (uint64_t l = 0; l < loads; l++) {
      const uint64_t i = g * loads + l;  // the 32-code block along K
      if (PREFETCH && WR * 16 * i % 64 == 0)
        _mm_prefetch(weights_ahead + WR * 16 * i, _MM_HINT_T0);
#pragma GCC unroll 4
      for (int r = 0; r < WR; r++) {
        const __m256i bytes = _mm256_cvtepu8_epi16(
            _mm_loadu_si128((const __m128i *)(weights + r * row_bytes + i * 16)));
        const __m256i even = _mm256_and_si256(bytes, nibble);
        const __m256i odd = _mm256_srli_epi16(bytes, 4);
#pragma GCC unroll 4
        for (int m = 0; m < ROWS; m++) {
          const int16_t *q = codes + m * k + i * 32;
          acc[m][r] = _mm256_add_epi32(
              acc[m][r],
              _mm256_add_epi32(
                  _mm256_madd_epi16(_mm256_load_si256((const __m256i *)q), even),
                  _mm256_madd_epi16(_mm256_load_si256((const __m256i *)(q + 16)), odd)));
        }
      }
    }
#pragma GCC unroll 4
    for (int r = 0; r < WR; r++) {
      const __m256 scale = broadcast_scale<SD>(scales, (n + r) * groups + g);
#pragma GCC unroll 4
      for (int m = 0; m < ROWS; m++)
        total[m][r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(acc[m][r]), scale, total[m][r]);
    }
  }
#pragma GCC unroll 4
  for (int m = 0; m < ROWS; m++)
#pragma GCC unroll 4
    for (int r = 0; r < WR; r++) {
      const float zero_term =
          w4_zero_term<SD>(scales, zeros, n + r, groups, group_sums + m * groups);
      store_scalar(out, odtype, (row0 + m) * n_total + n + r,
                   (float)(((double)sum8(total[m][r]) - zero_term) * xscale[m]));
    }
}

// Weight rows [n_begin, n_end), WR per pass (the last n % WR one at a time), against ROWS
// activation rows.
template <int ROWS, int WR, int SD, bool G32>
SLIM_W4 static void w4_passes(const int16_t *codes, int64_t k, const double *xscale,
                              const float *group_sums, int64_t groups, const uint8_t *w,
                              const void *scales, const void *zeros, int64_t group, int64_t n_begin,
                              int64_t n_end, int64_t n_total, void *out, int odtype) {
  int64_t n = n_begin;
  for (; n + WR <= n_end; n += WR)
    w4_block<ROWS, WR, SD, G32>(codes, k, xscale, group_sums, groups, w, scales, zeros, group, n,
                                n_total, out, odtype, 0);
  for (; n < n_end; n++)
    w4_block<ROWS, 1, SD, G32>(codes, k, xscale, group_sums, groups, w, scales, zeros, group, n,
                               n_total, out, odtype, 0);
}

// Weight rows [n_begin, n_end) against the m activation rows: one activation row meets four
// weight rows per pass, two meet two, more go four at a time against each weight row (the
// registers hold ROWS x WR accumulators).
template <int SD, bool G32>
SLIM_W4 static void w4_rows_range(const int16_t *codes, int64_t m, int64_t k, const double *xscale,
                                  const float *group_sums, int64_t groups, const uint8_t *w,
                                  const void *scales, const void *zeros, int64_t group,
                                  int64_t n_begin, int64_t n_end, int64_t n_total, void *out,
                                  int odtype) {
  if (m == 1)
    return w4_passes<1, 4, SD, G32>(codes, k, xscale, group_sums, groups, w, scales, zeros, group,
                                    n_begin, n_end, n_total, out, odtype);
  if (m == 2)
    return w4_passes<2, 2, SD, G32>(codes, k, xscale, group_sums, groups, w, scales, zeros, group,
                                    n_begin, n_end, n_total, out, odtype);
  // Each weight row (K/2 bytes) comes from memory once and stays in L1 while every group of up
  // to four activation rows meets it.
  for (int64_t n = n_begin; n < n_end; n++) {
    for (int64_t row0 = 0; row0 < m; row0 += 4) {
      const int64_t rows = m - row0 < 4 ? m - row0 : 4;
      const int16_t *c = codes + row0 * k;
      const float *gs = group_sums + row0 * groups;
      const double *xs = xscale + row0;
      if (rows == 1)
        w4_block<1, 1, SD, G32>(c, k, xs, gs, groups, w, scales, zeros, group, n, n_total, out,
                                odtype, row0);
      else if (rows == 2)
        w4_block<2, 1, SD, G32>(c, k, xs, gs, groups, w, scales, zeros, group, n, n_total, out,
                                odtype, row0);
      else if (rows == 3)
        w4_block<3, 1, SD, G32>(c, k, xs, gs, groups, w, scales, zeros, group, n, n_total, out,
                                odtype, row0);
      else
        w4_block<4, 1, SD, G32>(c, k, xs, gs, groups, w, scales, zeros, group, n, n_total, out,
                                odtype, row0);
    }
  }
}

// Up to W4_MAX_ROWS rows of slim_w4a16_gemv (its limits checked there).
SLIM_W4 static int w4a16_rows(const void *x, int xdtype, int64_t m, int64_t k, const uint8_t *w,
                              const void *scales, const void *zeros, int sdtype, int64_t group,
                              int64_t n, void *out) {
  const int64_t groups = k / group;
  int16_t *codes = (int16_t *)aligned_alloc(32, (size_t)(m * k) * sizeof(int16_t));
  float *group_sums = (float *)calloc((size_t)(m * groups), sizeof(float));
  if (codes == NULL || group_sums == NULL) {
    free(codes);
    free(group_sums);
    return -1;
  }
  double xscale[W4_MAX_ROWS] = {0};
  memset(codes, 0, (size_t)(m * k) * sizeof(int16_t));
  quantize_rows(x, xdtype, m, k, xscale, [&](int64_t row, int64_t i, int32_t code) {
    const int64_t r = i % 32;  // even positions first, then odd: the nibble order
    codes[row * k + (i - r) + (r % 2) * 16 + r / 2] = (int16_t)code;
    group_sums[row * groups + i / group] += (float)code;  // integers below 2^24: exact
  });
  // Weight rows shared out across the kernels' threads.
  slim_parallel(n, [&](int64_t begin, int64_t end) {
    const auto range = [&](auto sd, auto g32) {
      w4_rows_range<decltype(sd)::value, decltype(g32)::value>(
          codes, m, k, xscale, group_sums, groups, w, scales, zeros, group, begin, end, n, out,
          xdtype);
    };
    using F32 = std::integral_constant<int, SLIM_F32>;
    using BF16 = std::integral_constant<int, SLIM_BF16>;
    using F16 = std::integral_constant<int, SLIM_F16>;
    const bool g32 = group == 32;
    if (sdtype == SLIM_F32) g32 ? range(F32{}, std::true_type{}) : range(F32{}, std::false_type{});
    else if (sdtype == SLIM_BF16)
      g32 ? range(BF16{}, std::true_type{}) : range(BF16{}, std::false_type{});
    else g32 ? range(F16{}, std::true_type{}) : range(F16{}, std::false_type{});
  });
  free(codes);
  free(group_sums);
  return 0;
}

// out[M, N] = x[M, K] @ dequant(w[N, K/2], scales[N, K/G], zeros[N, K/G]).T in x's dtype, x and
// out contiguous; any M >= 1, in passes of W4_MAX_ROWS rows that each read the weight once. A
// prompt's rows take the same passes: torch's int4pack matmul, the other path at this level,
// took 120-190 ms per call at 40-64 rows of a 3072 x 576 layer where the passes take 1.7-2.8 ms
// (kernels/README.md). Returns 0, or -1 outside the kernel's limits (checked first in Python):
// K % 32 == 0, G % 32 == 0, K % G == 0, G <= W4_MAX_GROUP.
extern "C" int slim_w4a16_gemv(const void *x, int xdtype, int64_t m, int64_t k, const uint8_t *w,
                               const void *scales, const void *zeros, int sdtype, int64_t group,
                               int64_t n, void *out) {
  if (m < 1 || k < 32 || k % 32 || group < 32 || group % 32 || group > W4_MAX_GROUP ||
      k % group || n < 1)
    return -1;
  const int64_t item = xdtype == SLIM_F32 ? 4 : 2;
  for (int64_t r0 = 0; r0 < m; r0 += W4_MAX_ROWS) {
    const int64_t rows = m - r0 < W4_MAX_ROWS ? m - r0 : W4_MAX_ROWS;
    const int status = w4a16_rows((const char *)x + r0 * k * item, xdtype, rows, k, w, scales,
                                  zeros, sdtype, group, n, (char *)out + r0 * n * item);
    if (status != 0) return status;
  }
  return 0;
}

extern "C" int64_t slim_w8a16_max_rows(void) { return MAX_ROWS; }

// out[M, N] = (x[M, K] @ w[N, K]^T) * wscale[N], x and out contiguous in xdtype; M <= MAX_ROWS.
// Returns 0, or -1 for arguments outside the kernel's limits (checked first in Python).
extern "C" int slim_w8a16_gemv(const void *x, int xdtype, int64_t m, int64_t k, const int8_t *w,
                               const void *wscale, int wdtype, int64_t n, void *out) {
  if (m < 1 || m > MAX_ROWS || k < 1 || k > MAX_K || n < 1) return -1;
  double scales[MAX_ROWS] = {0};
#if !defined(SLIM_ISA_AVX2)
  if (m <= VNNI_MAX_ROWS) return w8a16_gemv_vnni(x, xdtype, m, k, w, wscale, wdtype, n, out, scales);
#endif
  const int64_t kp = (k + 15) & ~(int64_t)15;
  int16_t *codes = (int16_t *)aligned_alloc(32, (size_t)(m * kp) * sizeof(int16_t));
  if (codes == NULL) return -1;
  w8a16_gemv_avx2(x, xdtype, m, k, w, wscale, wdtype, n, out, codes, scales);
  free(codes);
  return 0;
}
