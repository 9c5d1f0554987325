// W8A8 on CPU, x86-64 with AVX-512 VNNI (built and loaded with the other sources by
// kernels/native.py): per-token activation quantization, the per-token rescale after oneDNN's int8
// GEMM, and our own int8 GEMM for few rows.
//
// Why the quantizer and rescale: in torch the quantization is ~10 elementwise ops per projection
// (float, abs, amax, div, clamp, div, round, clamp, add, to uint8) and the rescale two more; with
// 121 projections a step, their fixed costs were several milliseconds at any batch size. Here each
// is one call, with the same arithmetic as `reference.per_token_codes` (fp32 division, round half
// to even), so the codes are identical.
//
// Why the GEMM: on this model's small layers oneDNN's blocked int8 GEMM costs ~35-60 us a call at
// 1-16 rows, fixed costs mostly; a whole decode step on ours was 1.3-1.5x faster at 1-8 rows,
// 1.1-1.2x at 16-24 and 1.05x at 32 (kernels/README.md), so it serves decode batches up to 32.

#include <stdint.h>

#include "cpu_bf16.h"
#include "cpu_pack.h"

#define SLIM_AVX512 SLIM_TARGET_VNNI


// x [rows, k] (row stride `stride` elements) -> per row, codes round(x / s) in [-127, 127] with
// s = max |x| / 127 (at least 1e-12), stored as bytes code + offset (128: uint8 for oneDNN; 0:
// int8 for our GEMM) `code_stride` bytes apart; scales fp32 [rows]; and, unless NULL, each row's
// sum of codes.
SLIM_AVX512 static void quantize_rows(const void *x, int dtype, int64_t rows, int64_t k,
                                      int64_t stride, int offset, uint8_t *codes,
                                      int64_t code_stride, float *scales, int32_t *sums) {
  const int64_t item = dtype == SLIM_F32 ? 4 : 2;
  const __m512 low = _mm512_set1_ps(-127.0f), high = _mm512_set1_ps(127.0f);
  const __m512i shift = _mm512_set1_epi32(offset);
  for (int64_t r = 0; r < rows; r++) {
    const void *row = (const char *)x + r * stride * item;
    __m512 peak = _mm512_setzero_ps();
    for (int64_t i = 0; i < k; i += 16)
      peak = _mm512_max_ps(peak, _mm512_abs_ps(load_row16(row, dtype, i, tail_mask(k - i))));
    float scale = _mm512_reduce_max_ps(peak) / 127.0f;
    scale = scale < 1e-12f ? 1e-12f : scale;
    scales[r] = scale;
    const __m512 s = _mm512_set1_ps(scale);
    __m512i total = _mm512_setzero_si512();
    for (int64_t i = 0; i < k; i += 16) {
      const __mmask16 m = tail_mask(k - i);
      __m512 q = _mm512_div_ps(load_row16(row, dtype, i, m), s);
      q = _mm512_roundscale_ps(q, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
      const __m512i code = _mm512_cvtps_epi32(_mm512_min_ps(_mm512_max_ps(q, low), high));
      total = _mm512_add_epi32(total, code);  // lanes past k load 0: code 0
      _mm512_mask_cvtepi32_storeu_epi8(codes + r * code_stride + i, m,
                                       _mm512_add_epi32(code, shift));
    }
    if (sums != NULL) sums[r] = _mm512_reduce_add_epi32(total);
  }
}

// Returns -1 for an unknown dtype.
extern "C" SLIM_AVX512 int slim_quantize_rows_u8(const void *x, int dtype, int64_t rows, int64_t k,
                                                 int64_t stride, uint8_t *codes, float *scales) {
  if (dtype != SLIM_F32 && dtype != SLIM_BF16 && dtype != SLIM_F16) return -1;
  quantize_rows(x, dtype, rows, k, stride, 128, codes, k, scales, NULL);
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

// ---- the GEMM for few rows ------------------------------------------------------------------
//
// The weights are repacked once (`slim_w8a8_pack`) into VNNI order: for each block of 16 output
// channels and each group of 4 inputs, 64 bytes w[c][4 kq .. 4 kq + 3] + 128 for c in the block.
// One VPDPBUSD then multiplies a whole block by 4 inputs of one activation row (broadcast), and
// its 16 lanes are 16 outputs: no horizontal sums. The +128 (VPDPBUSD's unsigned operand) comes
// back out through each activation row's code sum.

// Rows per pass (the engine's default decode batch); where oneDNN is exact, ours serves up to
// this many rows (1.05x oneDNN at 32) and oneDNN's blocked GEMM the rest.
static const int64_t GEMM_MAX_ROWS = 32;
// Each sum of (w + 128) * code is at most 255 * 127 * K: it fits an int32 up to this K.
static const int64_t GEMM_MAX_K = INT32_MAX / (255 * 127);
static const int64_t ROW_BLOCK = 8;  // activation rows per pass: 2 x 8 accumulators
// Distance (bytes of packed weights) the loads run ahead of the products: at 8 rows a step was
// ~1.3x faster with 32 KiB than with 4 KiB (weights streamed at ~16 GB/s with 4).
static const int64_t GEMM_PREFETCH_BYTES = 32768;

extern "C" int64_t slim_w8a8_gemm_max_rows(void) { return GEMM_MAX_ROWS; }
extern "C" int64_t slim_w8a8_gemm_max_k(void) { return GEMM_MAX_K; }

static inline int64_t packed_quads(int64_t k) { return slim_input_groups(k, 4); }
static inline int64_t packed_blocks(int64_t n) { return slim_channel_blocks(n); }

extern "C" int64_t slim_w8a8_packed_bytes(int64_t n, int64_t k) {
  return packed_blocks(n) * packed_quads(k) * 64;
}

// w int8 [N, K] -> packed uint8 [ceil(N / 16)][ceil(K / 4)][16][4] (see above); padding holds
// +128 (weight 0), which meets code 0 of the padded inputs or is never stored.
extern "C" void slim_w8a8_pack(const int8_t *w, int64_t n, int64_t k, uint8_t *packed) {
  slim_pack_channel_blocks<4>(w, n, k, packed, [](int8_t v) { return (uint8_t)(v + 128); });
}

// ROWS (1-8) activation rows x two 16-channel blocks (the second may be absent: `pair` false).
template <int ROWS>
SLIM_AVX512 static void w8a8_tile(const int8_t *codes, int64_t kp, const float *xscale,
                                  const int32_t *xsum, const uint8_t *w0, const uint8_t *w1,
                                  bool pair, int64_t quads, const float *wscale, int64_t channel,
                                  int64_t n, void *out, int dtype) {
  SLIM_TILE_ACCUMULATORS(__m512i, _mm512_setzero_si512());
  for (int64_t q = 0; q < quads; q++) {
    _mm_prefetch((const char *)(w0 + q * 64 + GEMM_PREFETCH_BYTES), _MM_HINT_T0);
    _mm_prefetch((const char *)(w1 + q * 64 + GEMM_PREFETCH_BYTES), _MM_HINT_T0);
    const __m512i b0 = _mm512_loadu_si512(w0 + q * 64);
    const __m512i b1 = _mm512_loadu_si512(w1 + q * 64);
    SLIM_TILE_ROWS(codes + 4 * q, kp, , _mm512_dpbusd_epi32)
  }
  SLIM_TILE_RESULTS(__m512i);
  const int64_t item = dtype == SLIM_F32 ? 4 : 2;
  for (int half = 0; half < (pair ? 2 : 1); half++) {
    const int64_t first = channel + 16 * half;
    const __mmask16 m16 = tail_mask(n - first);
    const __m512 ws = _mm512_maskz_loadu_ps(m16, wscale + first);
    for (int m = 0; m < ROWS; m++) {
      // (sum - 128 * code sum) * wscale * xscale, in fp32 as oneDNN's path computes it.
      const __m512i exact =
          _mm512_sub_epi32(half ? acc1[m] : acc0[m], _mm512_set1_epi32(128 * xsum[m]));
      const __m512 v = _mm512_mul_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(exact), ws),
                                     _mm512_set1_ps(xscale[m]));
      store_row16((char *)out + (m * n + first) * item, dtype, m16, v);
    }
  }
}

typedef void (*W8A8Tile)(const int8_t *, int64_t, const float *, const int32_t *, const uint8_t *,
                         const uint8_t *, bool, int64_t, const float *, int64_t, int64_t, void *,
                         int);

#if defined(SLIM_ISA_AVX2)
// The AVX2 tile, written by hand: SIMDe's VPDPBUSD is exact but ~40x slower than the real one,
// and AVX2's own u8 x s8 product (VPMADDUBSW) saturates its 16-bit pair sums, which is oneDNN's
// bug on these CPUs. Here the unsigned operand is |w| (at most 128) and the signed one the code
// with w's sign (at most 127 in magnitude), so a pair sums to at most 2 * 128 * 127 = 32512 <
// 32767: never saturated, the same int32 sums as the VNNI tile. Same packed layout (w + 128,
// flipped back by one XOR per weight vector); ROWS (1-4) rows x one 16-channel block, whose 2 x 8
// channels sit in two 256-bit accumulators per row.
static const int64_t AVX2_ROW_BLOCK = 4;

template <int ROWS>
static void w8a8_tile_avx2(const int8_t *codes, int64_t kp, const float *xscale,
                           const uint8_t *w, int64_t quads, const float *wscale, int64_t channel,
                           int64_t n, void *out, int dtype) {
  const __m256i flip = _mm256_set1_epi8((char)0x80), ones = _mm256_set1_epi16(1);
  __m256i acc[ROWS][2];
  for (int r = 0; r < ROWS; r++) acc[r][0] = acc[r][1] = _mm256_setzero_si256();
  for (int64_t q = 0; q < quads; q++) {
    _mm_prefetch((const char *)(w + q * 64 + GEMM_PREFETCH_BYTES), _MM_HINT_T0);
    const __m256i w0 = _mm256_xor_si256(_mm256_loadu_si256((const __m256i *)(w + q * 64)), flip);
    const __m256i w1 =
        _mm256_xor_si256(_mm256_loadu_si256((const __m256i *)(w + q * 64 + 32)), flip);
    const __m256i abs0 = _mm256_sign_epi8(w0, w0), abs1 = _mm256_sign_epi8(w1, w1);
    for (int r = 0; r < ROWS; r++) {
      int32_t four;
      memcpy(&four, codes + r * kp + 4 * q, sizeof four);
      const __m256i x = _mm256_set1_epi32(four);
      const __m256i p0 = _mm256_maddubs_epi16(abs0, _mm256_sign_epi8(x, w0));
      const __m256i p1 = _mm256_maddubs_epi16(abs1, _mm256_sign_epi8(x, w1));
      acc[r][0] = _mm256_add_epi32(acc[r][0], _mm256_madd_epi16(p0, ones));
      acc[r][1] = _mm256_add_epi32(acc[r][1], _mm256_madd_epi16(p1, ones));
    }
  }
  const int64_t item = dtype == SLIM_F32 ? 4 : 2;
  for (int r = 0; r < ROWS; r++) {
    // sum * wscale * xscale in fp32, as the VNNI tile and oneDNN's path compute it.
    float values[16];
    for (int half = 0; half < 2; half++) {
      float ws[8] = {0};
      for (int c = 0; c < 8 && channel + 8 * half + c < n; c++) ws[c] = wscale[channel + 8 * half + c];
      const __m256 v = _mm256_mul_ps(
          _mm256_mul_ps(_mm256_cvtepi32_ps(acc[r][half]), _mm256_loadu_ps(ws)),
          _mm256_set1_ps(xscale[r]));
      _mm256_storeu_ps(values + 8 * half, v);
    }
    char *dst = (char *)out + (r * n + channel) * item;
    for (int c = 0; c < 16 && channel + c < n; c++) {
      if (dtype == SLIM_F32)
        ((float *)dst)[c] = values[c];
      else if (dtype == SLIM_BF16)
        ((uint16_t *)dst)[c] = slim_float_to_bf16(values[c]);
      else
        ((uint16_t *)dst)[c] = _cvtss_sh(values[c], _MM_FROUND_TO_NEAREST_INT);
    }
  }
}

typedef void (*W8A8TileAvx2)(const int8_t *, int64_t, const float *, const uint8_t *, int64_t,
                             const float *, int64_t, int64_t, void *, int);
#endif

// Up to GEMM_MAX_ROWS rows of `slim_w8a8_gemm`.
SLIM_AVX512 static int w8a8_gemm_rows(const void *x, int dtype, int64_t m, int64_t k,
                                      int64_t stride, const uint8_t *packed, const float *wscale,
                                      int64_t n, void *out) {
  const int64_t quads = packed_quads(k), kp = 4 * quads;
  int8_t *codes = (int8_t *)calloc((size_t)(m * kp), 1);  // padding: code 0
  if (codes == NULL) return -1;
  float xscale[GEMM_MAX_ROWS];
  int32_t xsum[GEMM_MAX_ROWS];
  quantize_rows(x, dtype, m, k, stride, 0, (uint8_t *)codes, kp, xscale, xsum);
  const int64_t item = dtype == SLIM_F32 ? 4 : 2;
#if defined(SLIM_ISA_AVX2)
  static const W8A8TileAvx2 tiles[AVX2_ROW_BLOCK] = {w8a8_tile_avx2<1>, w8a8_tile_avx2<2>,
                                                     w8a8_tile_avx2<3>, w8a8_tile_avx2<4>};
  const int64_t block_bytes = quads * 64;
  for (int64_t block = 0; block < packed_blocks(n); block++)
    for (int64_t r0 = 0; r0 < m; r0 += AVX2_ROW_BLOCK) {
      const int64_t rows = m - r0 < AVX2_ROW_BLOCK ? m - r0 : AVX2_ROW_BLOCK;
      tiles[rows - 1](codes + r0 * kp, kp, xscale + r0, packed + block * block_bytes, quads, wscale,
                      16 * block, n, (char *)out + r0 * n * item, dtype);
    }
#else
  static const W8A8Tile tiles[ROW_BLOCK] = {w8a8_tile<1>, w8a8_tile<2>, w8a8_tile<3>,
                                            w8a8_tile<4>, w8a8_tile<5>, w8a8_tile<6>,
                                            w8a8_tile<7>, w8a8_tile<8>};
  slim_for_each_tile(n, m, quads * 64, ROW_BLOCK,
                     [&](int64_t w0, int64_t w1, bool pair, int64_t channel, int64_t r0,
                         int64_t rows) {
                       tiles[rows - 1](codes + r0 * kp, kp, xscale + r0, xsum + r0, packed + w0,
                                       packed + w1, pair, quads, wscale, channel, n,
                                       (char *)out + r0 * n * item, dtype);
                     });
#endif
  free(codes);
  return 0;
}

// out [M, N] in x's dtype = per-token int8 x (w * wscale [N]).T with w packed by
// `slim_w8a8_pack`; x [M, K] rows `stride` elements apart; any M >= 1, in passes of
// GEMM_MAX_ROWS rows (each pass reads the packed weight once). Where oneDNN's int8 GEMM is exact
// (VNNI) it serves only decode batches of up to GEMM_MAX_ROWS; where it is not, this serves every
// row count. Returns -1 for arguments outside the kernel's limits (checked first in Python).
extern "C" SLIM_AVX512 int slim_w8a8_gemm(const void *x, int dtype, int64_t m, int64_t k,
                                          int64_t stride, const uint8_t *packed,
                                          const float *wscale, int64_t n, void *out) {
  if (dtype != SLIM_F32 && dtype != SLIM_BF16 && dtype != SLIM_F16) return -1;
  if (m < 1 || k < 1 || k > GEMM_MAX_K || n < 1) return -1;
  const int64_t item = dtype == SLIM_F32 ? 4 : 2;
  for (int64_t r0 = 0; r0 < m; r0 += GEMM_MAX_ROWS) {
    const int64_t rows = m - r0 < GEMM_MAX_ROWS ? m - r0 : GEMM_MAX_ROWS;
    const int status = w8a8_gemm_rows((const char *)x + r0 * stride * item, dtype, rows, k, stride,
                                      packed, wscale, n, (char *)out + r0 * n * item);
    if (status != 0) return status;
  }
  return 0;
}
