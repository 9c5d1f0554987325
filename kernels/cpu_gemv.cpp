// One- and two-row W8A16 matmul (decode at batch 1-2) for x86-64 CPUs with AVX-512 VNNI, loaded
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

#include "cpu_bf16.h"

#define SLIM_AVX512 SLIM_TARGET_VNNI_F16C

enum SlimDtype { SLIM_F32 = 0, SLIM_BF16 = 1, SLIM_F16 = 2 };

static const int64_t CODE_LIMIT = 32767;
// Each byte sum is at most 255 * 127 * K: it fits an int32 up to this K.
static const int64_t MAX_K = INT32_MAX / (255 * 127);
static const int64_t MAX_ROWS = 2;  // from 3 rows torch's int8pack is faster (kernels/README.md)
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

// Whether this build's GEMV beats torch's int8pack and so serves: not the AVX2 build, whose
// VPDPBUSD comes from SIMDe (exact, but ~15x slower than int8pack); its calls stay correct.
extern "C" int slim_w8a16_gemv_served(void) {
#if defined(SLIM_ISA_AVX2)
  return 0;
#else
  return 1;
#endif
}

// Row m of x -> int16 code c = 256 * (hi - 128) + lo as two unsigned bytes lo[m, :kp] and
// hi[m, :kp] (padding: code 0, i.e. lo 0, hi 128), and scale[m]. A non-finite row gets a NaN
// scale and zero codes.
SLIM_AVX512 static void quantize_rows(const void *x, int dtype, int64_t rows, int64_t k, int64_t kp,
                                      uint8_t *lo, uint8_t *hi, double *scales) {
  for (int64_t m = 0; m < rows; m++) {
    float absmax = 0.0f;
    for (int64_t i = 0; i < k; i++) absmax = fmaxf(absmax, fabsf(load_scalar(x, dtype, m * k + i)));
    memset(lo + m * kp, 0, (size_t)kp);
    memset(hi + m * kp, 128, (size_t)kp);
    if (!isfinite(absmax)) {
      scales[m] = NAN;
      continue;
    }
    scales[m] = (double)absmax / (double)CODE_LIMIT;
    if (absmax == 0.0f) continue;
    float inv = (float)CODE_LIMIT / absmax;
    for (int64_t i = 0; i < k; i++) {
      int32_t code = (int32_t)lrintf(load_scalar(x, dtype, m * k + i) * inv);
      lo[m * kp + i] = (uint8_t)(code & 0xff);
      hi[m * kp + i] = (uint8_t)((code >> 8) + 128);
    }
  }
}

// ROWS activation rows against every weight row, WR weight rows per pass, each 64-byte weight
// vector loaded once for all ROWS. Per weight row: sum(lo * w), sum(hi * w) and sum(w) (the last
// undoes the +128 of the high bytes).
template <int ROWS, int WR>
SLIM_AVX512 static void gemv_block(const uint8_t *lo, const uint8_t *hi, const double *xscale,
                                   int64_t kp, const int8_t *w, const void *wscale, int wdtype,
                                   int64_t n_total, int64_t k, void *out, int odtype) {
  const int64_t kmain = k & ~(int64_t)63;
  const __mmask64 tail = k > kmain ? (__mmask64)(~0ull >> (64 - (k - kmain))) : 0;
  const __m512i ones = _mm512_set1_epi8(1);
  int64_t ahead = PREFETCH_BYTES / k;
  ahead = ahead < WR ? WR : ahead;
  int64_t n = 0;
  // The last n_total % WR weight rows go through the same code as rows already done, then only
  // the new ones are written: no separate remainder loop.
  for (; n < n_total; n += WR) {
    const int64_t first = n + WR <= n_total ? n : (n_total >= WR ? n_total - WR : 0);
    const int rows_here = n_total >= WR ? WR : (int)n_total;
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

// out[M, N] = (x[M, K] @ w[N, K]^T) * wscale[N], x and out contiguous in xdtype; M <= 2.
// Returns 0, or -1 for arguments outside the kernel's limits (checked first in Python).
extern "C" int slim_w8a16_gemv(const void *x, int xdtype, int64_t m, int64_t k, const int8_t *w,
                               const void *wscale, int wdtype, int64_t n, void *out) {
  if (m < 1 || m > MAX_ROWS || k < 1 || k > MAX_K || n < 1) return -1;
  const int64_t kp = (k + 63) & ~(int64_t)63;
  uint8_t *bytes = (uint8_t *)aligned_alloc(64, (size_t)(2 * m * kp));
  if (bytes == NULL) return -1;
  uint8_t *lo = bytes, *hi = bytes + m * kp;
  double scales[MAX_ROWS] = {0};
  quantize_rows(x, xdtype, m, k, kp, lo, hi, scales);
  // One row: eight weight rows per pass (more loads in flight); two rows: four (registers).
  if (m == 1) gemv_block<1, 8>(lo, hi, scales, kp, w, wscale, wdtype, n, k, out, xdtype);
  else gemv_block<2, 4>(lo, hi, scales, kp, w, wscale, wdtype, n, k, out, xdtype);
  free(bytes);
  return 0;
}
