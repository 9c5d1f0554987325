// W8A16 GEMM for any row count on a packed int8 weight, x86-64 with AVX-512 VNNI (built and
// loaded with the other sources by kernels/native.py): the int8 variant's projections once a
// serving engine has packed them (`Int8Linear.pack_for_cpu`), decode and prompt alike.
//
// Why: the row-major GEMV (cpu_gemv.cpp) reads each weight row once per group of code rows, and
// past it torch's int8pack and the de-quantize + matmul path ran at 7-22x the weights' read time
// at 8-32 rows (kernels/README.md, "Where a decode step's time goes"). Here the weight sits in the
// W8A8 GEMM's layout (cpu_pack.h: [N/16][K/4][16][4], each byte w + 128) and each activation row
// becomes int16 codes c = 255 * hi + lo (a step of the row's absmax / 32385; lo and hi in
// [-127, 127]); hi and lo meet the weights through two VPDPBUSD per 64 weights (exact int32
// sums), so no instruction widens a weight and each weight vector loaded serves up to 8 rows. The
// +128 comes back out through each row's byte sums. It beat the GEMV at 1-2 rows and torch's
// paths up to 512 rows on every shape of the default model (kernels/README.md).
//
// The weight is packed by `slim_w8a8_pack` (cpu_w8a8.cpp). The avx2 build does not serve this
// kernel (`slim_w8a16_gemm_available` is 0 there): SIMDe's VPDPBUSD is ~40x slower than the real
// one, and an fp32 FMA tile that widened each weight in registers ran at 0.4-0.5x the GEMV's
// VPMADDWD path on those CPUs (kernels/README.md).

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "cpu_bf16.h"
#include "cpu_bf16_amx.h"
#include "cpu_pack.h"

// Each byte sum (w + 128) * code byte is at most 255 * 127 * K: it fits an int32 up to this K.
static const int64_t W8A16_GEMM_MAX_K = INT32_MAX / (255 * 127);

extern "C" int64_t slim_w8a16_gemm_max_k(void) { return W8A16_GEMM_MAX_K; }

extern "C" int slim_w8a16_gemm_available(void) {
#if defined(SLIM_ISA_AVX2)
  return 0;
#else
  return slim_build_runs_here();
#endif
}

#if !defined(SLIM_ISA_AVX2)

static inline int64_t quads_of(int64_t k) { return slim_input_groups(k, 4); }

#define SLIM_W8A16 SLIM_TARGET_VNNI_F16C

static const int64_t CODE_LIMIT = 255 * 127;  // c = 255 * hi + lo with |hi|, |lo| <= 127
static const int64_t ROW_BLOCK = 8;           // rows per pass: 8 x (lo, hi) accumulators
static const int64_t PREFETCH_BYTES = 32768;  // as the W8A8 GEMM's, which reads the same layout

extern "C" int64_t slim_w8a16_gemm_code_limit(void) { return CODE_LIMIT; }

// Row r -> for each group of 4 inputs, 4 lo bytes then 4 hi bytes at codes + r * row_bytes
// (row_bytes >= 2 * K rounded up to 16: whole 32-byte stores); scale[r] = absmax / CODE_LIMIT
// (NaN for a row with an inf or NaN: its outputs are NaN); the row's sums of lo and of hi (they
// undo the weights' +128). Codes round half to even, as torch.round.
SLIM_W8A16 static void quantize_rows(const void *x, int dtype, int64_t rows, int64_t k,
                                     int64_t stride, int64_t row_bytes, int8_t *codes,
                                     float *scales, int32_t *lo_sums, int32_t *hi_sums) {
  const int64_t item = dtype == SLIM_F32 ? 4 : 2;
  const int round = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
  const __m512 base = _mm512_set1_ps(255.0f);
  for (int64_t r = 0; r < rows; r++) {
    const void *row = (const char *)x + r * stride * item;
    __m512 peak = _mm512_setzero_ps(), poison = _mm512_setzero_ps();
    for (int64_t i = 0; i < k; i += 16) {
      const __m512 v = load_row16(row, dtype, i, tail_mask(k - i));
      peak = _mm512_max_ps(peak, _mm512_abs_ps(v));
      poison = _mm512_add_ps(poison, _mm512_mul_ps(v, _mm512_setzero_ps()));  // NaN if inf / NaN
    }
    const float absmax = _mm512_reduce_max_ps(peak);
    lo_sums[r] = hi_sums[r] = 0;
    if (_mm512_reduce_add_ps(poison) != 0.0f) {
      scales[r] = NAN;
      continue;
    }
    scales[r] = absmax / (float)CODE_LIMIT;
    if (absmax == 0.0f) continue;
    const __m512 s = _mm512_set1_ps(scales[r]);
    __m512i lo_total = _mm512_setzero_si512(), hi_total = _mm512_setzero_si512();
    int8_t *out = codes + r * row_bytes;
    for (int64_t i = 0; i < k; i += 16) {
      const __m512 code =
          _mm512_roundscale_ps(_mm512_div_ps(load_row16(row, dtype, i, tail_mask(k - i)), s), round);
      const __m512 hi = _mm512_roundscale_ps(_mm512_div_ps(code, base), round);
      const __m512i h = _mm512_cvtps_epi32(hi);
      const __m512i l = _mm512_cvtps_epi32(_mm512_fnmadd_ps(hi, base, code));  // |l| <= 127
      lo_total = _mm512_add_epi32(lo_total, l);  // lanes past k hold 0
      hi_total = _mm512_add_epi32(hi_total, h);
      const __m128i lo8 = _mm512_cvtepi32_epi8(l), hi8 = _mm512_cvtepi32_epi8(h);
      _mm_storeu_si128((__m128i *)(out + 2 * i), _mm_unpacklo_epi32(lo8, hi8));
      _mm_storeu_si128((__m128i *)(out + 2 * i + 16), _mm_unpackhi_epi32(lo8, hi8));
    }
    lo_sums[r] = _mm512_reduce_add_epi32(lo_total);
    hi_sums[r] = _mm512_reduce_add_epi32(hi_total);
  }
}

// out[m, channel .. channel + 15] for `rows` rows from their lo / hi sums with the weights (each
// weight + 128) in 16 int32 lanes: sum(w * c) = (lo sum - 128 sum(lo)) + 255 (hi sum - 128
// sum(hi)), each part exact in int32, then the row's and the channels' scales.
SLIM_W8A16 static inline void w8a16_store(const __m512i *lo_acc, const __m512i *hi_acc, int rows,
                                          const float *xscale, const int32_t *lo_sums,
                                          const int32_t *hi_sums, const float *wscale,
                                          int64_t channel, int64_t n, void *out, int dtype) {
  const __mmask16 m16 = tail_mask(n - channel);
  const __m512 ws = _mm512_maskz_loadu_ps(m16, wscale + channel);
  const int64_t item = dtype == SLIM_F32 ? 4 : 2;
  for (int m = 0; m < rows; m++) {
    const __m512 lo = _mm512_cvtepi32_ps(
        _mm512_sub_epi32(lo_acc[m], _mm512_set1_epi32(128 * lo_sums[m])));
    const __m512 hi = _mm512_cvtepi32_ps(
        _mm512_sub_epi32(hi_acc[m], _mm512_set1_epi32(128 * hi_sums[m])));
    const __m512 sum = _mm512_fmadd_ps(hi, _mm512_set1_ps(255.0f), lo);
    const __m512 v = _mm512_mul_ps(_mm512_mul_ps(sum, _mm512_set1_ps(xscale[m])), ws);
    store_row16((char *)out + (m * n + channel) * item, dtype, m16, v);
  }
}

// One VPDPBUSD pair for row M: its 4 lo and 4 hi codes broadcast against the weight vector b.
#define W8A16_ROW(M)                                                 \
  if constexpr (ROWS > M) {                                          \
    int32_t lo4, hi4;                                                \
    memcpy(&lo4, codes + M * row_bytes + 8 * q, sizeof lo4);         \
    memcpy(&hi4, codes + M * row_bytes + 8 * q + 4, sizeof hi4);     \
    a0##M = _mm512_dpbusd_epi32(a0##M, b, _mm512_set1_epi32(lo4));   \
    a1##M = _mm512_dpbusd_epi32(a1##M, b, _mm512_set1_epi32(hi4));   \
  }

// ROWS (1-8) rows x one 16-channel block; a0M / a1M hold row M's lo / hi sums.
template <int ROWS>
SLIM_W8A16 static void w8a16_tile(const int8_t *codes, int64_t row_bytes,
                                       const float *xscale, const int32_t *lo_sums,
                                       const int32_t *hi_sums, const uint8_t *w, int64_t quads,
                                       const float *wscale, int64_t channel, int64_t n, void *out,
                                       int dtype) {
  SLIM_TILE_ACCUMULATORS(__m512i, _mm512_setzero_si512());
  for (int64_t q = 0; q < quads; q++) {
    _mm_prefetch((const char *)(w + q * 64 + PREFETCH_BYTES), _MM_HINT_T0);
    const __m512i b = _mm512_loadu_si512(w + q * 64);
    W8A16_ROW(0) W8A16_ROW(1) W8A16_ROW(2) W8A16_ROW(3)
    W8A16_ROW(4) W8A16_ROW(5) W8A16_ROW(6) W8A16_ROW(7)
  }
  SLIM_TILE_RESULTS(__m512i);
  w8a16_store(acc0, acc1, ROWS, xscale, lo_sums, hi_sums, wscale, channel, n, out, dtype);
}

// AMX-BF16 and AVX-512 BF16 too: the tile configuration (cpu_bf16_amx.h) is compiled for them.
#define SLIM_W8A16_AMX  \
  __attribute__((target( \
      "avx512f,avx512bw,avx512vl,avx512vnni,avx512bf16,f16c,amx-tile,amx-int8,amx-bf16")))

static const int64_t AMX_QUADS = 16;  // groups of 4 inputs per tile product (64 inputs)
// The fewest rows for AMX-INT8: 0.75-0.95x the VNNI tiles at 1-4 rows (one byte a weight streams
// fast), 0.95-1.12x at 8, 1.4-1.5x at 16, 1.6-2.0x at 32 (kernels/README.md).
static const int64_t W8A16_AMX_MIN_ROWS = 16;

// Each row's codes ([quad][4 lo][4 hi], row_bytes apart) -> a plane of lo and one of hi codes
// (`plane` bytes a row, zeros past K and past row m: whole tiles), as AMX's activation tiles read
// them. 64 code bytes (8 quads) at a time: even dwords to lo, odd to hi.
SLIM_W8A16 static void split_codes(const int8_t *codes, int64_t m, int64_t row_bytes,
                                   int64_t plane, int8_t *lo, int8_t *hi) {
  const __m512i order = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15);
  for (int64_t r = 0; r < m; r++)
    for (int64_t i = 0; i < row_bytes; i += 64) {
      const __mmask16 whole = row_bytes - i >= 64 ? (__mmask16)0xffff : (__mmask16)0x00ff;
      const __m512i v = _mm512_permutexvar_epi32(
          order, _mm512_maskz_loadu_epi32(whole, codes + r * row_bytes + i));
      const int64_t at = r * plane + i / 2;
      _mm256_storeu_si256((__m256i *)(lo + at), _mm512_castsi512_si256(v));
      _mm256_storeu_si256((__m256i *)(hi + at), _mm512_extracti64x4_epi64(v, 1));
    }
}

// Weight blocks w0 and w1 x 16 rows of the lo / hi planes: the lo and hi int32 sums with each
// block, 16 x 16 each, at sums in the order lo0, hi0, lo1, hi1.
SLIM_W8A16_AMX static void w8a16_amx_pass(const int8_t *lo, const int8_t *hi, int64_t plane,
                                          const uint8_t *w0, const uint8_t *w1, int64_t quads,
                                          uint8_t *scratch, int32_t *sums) {
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
  const int64_t groups = (quads + AMX_QUADS - 1) / AMX_QUADS;
  for (int64_t g = 0; g < groups; g++) {
    const int64_t count = quads - g * AMX_QUADS < AMX_QUADS ? quads - g * AMX_QUADS : AMX_QUADS;
    const uint8_t *b0 = w0 + g * AMX_QUADS * 64, *b1 = w1 + g * AMX_QUADS * 64;
    if (count < AMX_QUADS) {  // the last group: its quads, then zeros (codes there are 0 too)
      memset(scratch, 0, 2 * AMX_QUADS * 64);
      memcpy(scratch, b0, (size_t)count * 64);
      memcpy(scratch + AMX_QUADS * 64, b1, (size_t)count * 64);
      b0 = scratch, b1 = scratch + AMX_QUADS * 64;
    }
    _tile_loadd(6, b0, 64);
    _tile_loadd(7, b1, 64);
    _tile_loadd(4, lo + g * 64, plane);
    _tile_loadd(5, hi + g * 64, plane);
    _tile_dpbsud(0, 4, 6);
    _tile_dpbsud(1, 5, 6);
    _tile_dpbsud(2, 4, 7);
    _tile_dpbsud(3, 5, 7);
  }
  _tile_stored(0, sums, 64);
  _tile_stored(1, sums + 256, 64);
  _tile_stored(2, sums + 512, 64);
  _tile_stored(3, sums + 768, 64);
}

// Pairs of blocks [begin, end) on this thread, every group of 16 rows.
SLIM_W8A16_AMX static void w8a16_amx_blocks(const int8_t *lo, const int8_t *hi, int64_t plane,
                                            int64_t m, const float *xscale, const int32_t *sums,
                                            const uint8_t *packed, int64_t quads,
                                            const float *wscale, int64_t n, void *out, int dtype,
                                            int64_t begin, int64_t end) {
  alignas(64) uint8_t scratch[2 * AMX_QUADS * 64];
  alignas(64) int32_t tiles[4 * 256];
  __m512i lo_acc[16], hi_acc[16];
  const int64_t blocks = slim_channel_blocks(n), block_bytes = quads * 64;
  const int64_t item = dtype == SLIM_F32 ? 4 : 2;
  slim_amx_configure();
  for (int64_t pair = begin; pair < end; pair++) {
    const int64_t block = 2 * pair;
    const bool both = block + 1 < blocks;
    const uint8_t *w0 = packed + block * block_bytes;
    const uint8_t *w1 = both ? w0 + block_bytes : w0;  // a lone block's second sums are unused
    for (int64_t r0 = 0; r0 < m; r0 += SLIM_AMX_TILE_ROWS) {
      const int rows = (int)(m - r0 < SLIM_AMX_TILE_ROWS ? m - r0 : SLIM_AMX_TILE_ROWS);
      w8a16_amx_pass(lo + r0 * plane, hi + r0 * plane, plane, w0, w1, quads, scratch, tiles);
      for (int half = 0; half < (both ? 2 : 1); half++) {
        for (int r = 0; r < rows; r++) {
          lo_acc[r] = _mm512_load_si512(tiles + half * 512 + r * 16);
          hi_acc[r] = _mm512_load_si512(tiles + half * 512 + 256 + r * 16);
        }
        w8a16_store(lo_acc, hi_acc, rows, xscale + r0, sums + r0, sums + m + r0, wscale,
                    16 * (block + half), n, (char *)out + r0 * n * item, dtype);
      }
    }
  }
  _tile_release();
}

typedef void (*W8A16Tile)(const int8_t *, int64_t, const float *, const int32_t *,
                          const int32_t *, const uint8_t *, int64_t, const float *, int64_t,
                          int64_t, void *, int);

// out [M, N] in x's dtype = x [M, K] (rows `stride` elements apart, fp32 / bf16 / fp16) @
// (w * wscale [N]).T, w packed by `slim_w8a8_pack`; any M. Returns -1 for arguments
// outside the kernel's limits (checked first in Python) or when out of memory.
extern "C" SLIM_W8A16 int slim_w8a16_gemm(const void *x, int dtype, int64_t m, int64_t k,
                                               int64_t stride, const uint8_t *packed,
                                               const float *wscale, int64_t n, void *out) {
  if (dtype != SLIM_F32 && dtype != SLIM_BF16 && dtype != SLIM_F16) return -1;
  if (m < 1 || k < 1 || k > W8A16_GEMM_MAX_K || n < 1) return -1;
  const int64_t quads = quads_of(k), row_bytes = 2 * ((k + 15) / 16 * 16);
  int8_t *codes = (int8_t *)calloc((size_t)(m * row_bytes), 1);  // padding: code 0
  float *xscale = (float *)malloc((size_t)m * sizeof(float));
  int32_t *sums = (int32_t *)malloc((size_t)(2 * m) * sizeof(int32_t));
  if (codes == NULL || xscale == NULL || sums == NULL) {
    free(codes), free(xscale), free(sums);
    return -1;
  }
  quantize_rows(x, dtype, m, k, stride, row_bytes, codes, xscale, sums, sums + m);
  if (slim_amx_on && m >= W8A16_AMX_MIN_ROWS) {
    // AMX-INT8 (on with the bf16 GEMMs' tiles: slim_amx_enable): TDPBSUD takes signed codes against
    // the unsigned (w + 128) weights in this very layout ([K/4][16][4] per block is a weight
    // tile's rows), 16 rows x 64 inputs a product, the same exact int32 sums.
    const int64_t plane = (quads + AMX_QUADS - 1) / AMX_QUADS * AMX_QUADS * 4;
    const int64_t mp = (m + SLIM_AMX_TILE_ROWS - 1) / SLIM_AMX_TILE_ROWS * SLIM_AMX_TILE_ROWS;
    int8_t *planes = (int8_t *)calloc((size_t)(2 * mp * plane), 1);
    if (planes == NULL) {
      free(codes), free(xscale), free(sums);
      return -1;
    }
    split_codes(codes, m, row_bytes, plane, planes, planes + mp * plane);
    slim_parallel((slim_channel_blocks(n) + 1) / 2, [&](int64_t first, int64_t end) {
      w8a16_amx_blocks(planes, planes + mp * plane, plane, m, xscale, sums, packed, quads,
                       wscale, n, out, dtype, first, end);
    });
    free(planes), free(codes), free(xscale), free(sums);
    return 0;
  }
  static const W8A16Tile tiles[ROW_BLOCK] = {w8a16_tile<1>, w8a16_tile<2>, w8a16_tile<3>,
                                             w8a16_tile<4>, w8a16_tile<5>, w8a16_tile<6>,
                                             w8a16_tile<7>, w8a16_tile<8>};
  const int64_t item = dtype == SLIM_F32 ? 4 : 2, block_bytes = quads * 64;
  // Blocks shared out across the kernels' threads; each block (at most K bytes x 16) stays in
  // cache while every group of 8 rows meets it.
  slim_parallel(slim_channel_blocks(n), [&](int64_t first, int64_t end) {
    for (int64_t block = first; block < end; block++)
      for (int64_t r0 = 0; r0 < m; r0 += ROW_BLOCK) {
        const int64_t rows = m - r0 < ROW_BLOCK ? m - r0 : ROW_BLOCK;
        tiles[rows - 1](codes + r0 * row_bytes, row_bytes, xscale + r0, sums + r0, sums + m + r0,
                        packed + block * block_bytes, quads, wscale, 16 * block, n,
                        (char *)out + r0 * n * item, dtype);
      }
  });
  free(codes), free(xscale), free(sums);
  return 0;
}

#else

extern "C" int64_t slim_w8a16_gemm_code_limit(void) { return 0; }

extern "C" int slim_w8a16_gemm(const void *, int, int64_t, int64_t, int64_t, const uint8_t *,
                               const float *, int64_t, void *) {
  return -1;  // never called: slim_w8a16_gemm_available() is 0 in this build
}

#endif
