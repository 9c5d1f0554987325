// 2:4 sparse GEMM on x86-64 CPUs that reads only the kept half of the weight and its 2-bit
// positions (built and loaded with the other sources by kernels/native.py); a SparseLinear packed
// for CPU serving runs on it at every row count.
//
// Why: a decode step streams the weights, so a 2:4 weight decodes faster than a dense one only if
// the kernel reads ~half the bytes. Expanding to dense first (torch has no CPU 2:4 kernel) read
// more than dense and ran at 0.06-0.19x (kernels/README.md).
//
// How: the gather of the inputs each channel keeps is a shuffle within one group of 4 inputs.
// Broadcast the group's 4 inputs to every 128-bit lane (fp32) or every 64-bit lane (bf16), and
// one in-lane permute gives every lane the input its weight multiplies; the permute reads only
// the low 2 bits of each index, so a channel's 4-bit position code, shifted into place, is the
// index as it stands. Products and sums in fp32, in input order per kept slot.
//
// Layout (packed once in Python, kernels/packing.py `pack_24_blocks`): blocks of B output channels
// (8 for fp32, 16 for bf16); per block and group g of 4 inputs, values [B][2] (channel c's two
// kept weights side by side, the pair VDPBF16PS multiplies) and one B*4-bit word with channel c's
// position code i0 | i1 << 2 at bits 4c. Channels past N are zeros.
//
// A pruned weight is absent, not zero: an input at a position no channel keeps is never read, so
// an inf or NaN there does not reach the output (a dense matmul with zeros would give NaN).

#include <stdint.h>
#include <string.h>

#include "cpu_bf16.h"
#include "cpu_bf16_coded.h"
#include "cpu_pack.h"
#include "cpu_widen.h"

static const int64_t SPARSE_F32_BLOCK = 8;      // channels per block: one YMM of 4 x 2 slots
static const int64_t SPARSE_F32_ROW_GROUP = 4;  // activation rows per pass: 2 x 4 accumulators
static const int64_t SPARSE_BF16_ROW_BLOCK = 8;  // 2 blocks x 8 rows: 16 ZMM accumulators
// Distance (bytes of packed values) the loads run ahead of the products.
static const int64_t SPARSE_PREFETCH_BYTES = 16384;

// One row M of an fp32 tile: its group of 4 inputs in both 128-bit lanes, permuted per half.
#define SPARSE24_F32_ROW(M)                                                           \
  if constexpr (ROWS > M) {                                                           \
    const __m256 group = _mm256_broadcast_ps((const __m128 *)(x + M * stride + 4 * g)); \
    a0##M = _mm256_fmadd_ps(w0, _mm256_permutevar_ps(group, i0), a0##M);              \
    a1##M = _mm256_fmadd_ps(w1, _mm256_permutevar_ps(group, i1), a1##M);              \
  }

// fp32: ROWS (1-4) rows of x against one 8-channel block. a0M holds channels 0-3 of row M and
// a1M channels 4-7, each lane one (channel, slot): lane 2c + s. Named accumulators, not arrays:
// GCC kept arrays on the stack and stored all of them on every group (cpu_pack.h says the same of
// the AVX-512 tiles). The kept values are fp32, or bf16 numbers stored as bf16 (cpu_widen.h).
template <int ROWS, typename T>
SLIM_F32 static void sparse24_f32_tile(const float *x, int64_t stride, const T *w,
                                       const uint32_t *meta, int64_t groups,
                                       int64_t channel, int64_t n, float *out) {
  __m256 a00 = _mm256_setzero_ps(), a01 = a00, a02 = a00, a03 = a00;
  __m256 a10 = a00, a11 = a00, a12 = a00, a13 = a00;
  // Lane 2c + s of a block half takes code bits 4c + 2s (channels 4-7: 16 more).
  const __m256i shift_lo = _mm256_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14);
  const __m256i shift_hi = _mm256_setr_epi32(16, 18, 20, 22, 24, 26, 28, 30);
  for (int64_t g = 0; g < groups; g++) {
    const T *wg = w + g * 2 * SPARSE_F32_BLOCK;
    _mm_prefetch((const char *)wg + SPARSE_PREFETCH_BYTES, _MM_HINT_T0);
    const __m256 w0 = slim_widen8(wg), w1 = slim_widen8(wg + 8);
    const __m256i codes = _mm256_set1_epi32((int)meta[g]);
    const __m256i i0 = _mm256_srlv_epi32(codes, shift_lo);
    const __m256i i1 = _mm256_srlv_epi32(codes, shift_hi);
    SPARSE24_F32_ROW(0) SPARSE24_F32_ROW(1) SPARSE24_F32_ROW(2) SPARSE24_F32_ROW(3)
  }
  const __m256 acc0[4] = {a00, a01, a02, a03}, acc1[4] = {a10, a11, a12, a13};
  for (int m = 0; m < ROWS; m++) {
    // Pairwise sums give channels 0 1 4 5 | 2 3 6 7; the 64-bit permute puts them in order.
    const __m256 pairs = _mm256_hadd_ps(acc0[m], acc1[m]);
    const __m256 sums = _mm256_castpd_ps(
        _mm256_permute4x64_pd(_mm256_castps_pd(pairs), _MM_SHUFFLE(3, 1, 2, 0)));
    float lanes[8];
    _mm256_storeu_ps(lanes, sums);
    for (int64_t c = 0; c < SPARSE_F32_BLOCK && channel + c < n; c++)
      out[m * n + channel + c] = lanes[c];
  }
}
#undef SPARSE24_F32_ROW

template <typename T>
using SparseF32Tile = void (*)(const float *, int64_t, const T *, const uint32_t *, int64_t,
                               int64_t, int64_t, float *);

template <typename T>
SLIM_F32 static int sparse24_f32(const float *x, int64_t m, int64_t k, int64_t stride,
                                 const T *values, const uint32_t *meta, int64_t n,
                                 float *out) {
  if (m < 1 || k < 4 || k % 4 || n < 1) return -1;
  static const SparseF32Tile<T> tiles[SPARSE_F32_ROW_GROUP] = {
      sparse24_f32_tile<1, T>, sparse24_f32_tile<2, T>, sparse24_f32_tile<3, T>,
      sparse24_f32_tile<4, T>};
  const int64_t groups = k / 4;
  const int64_t blocks = (n + SPARSE_F32_BLOCK - 1) / SPARSE_F32_BLOCK;
  // Blocks shared out across the kernels' threads; each block meets every row while it is in
  // cache.
  slim_parallel(blocks, [&](int64_t first, int64_t end) {
    for (int64_t block = first; block < end; block++) {
      const T *w = values + block * groups * 2 * SPARSE_F32_BLOCK;
      for (int64_t r0 = 0; r0 < m; r0 += SPARSE_F32_ROW_GROUP) {
        const int64_t rows = m - r0 < SPARSE_F32_ROW_GROUP ? m - r0 : SPARSE_F32_ROW_GROUP;
        tiles[rows - 1](x + r0 * stride, stride, w, meta + block * groups, groups,
                        block * SPARSE_F32_BLOCK, n, out + r0 * n);
      }
    }
  });
  return 0;
}

// out fp32 [M, N] = x fp32 [M, K] (rows `stride` elements apart) @ W.T, W 2:4 sparse along K and
// packed in 8-channel blocks (values fp32, codes uint32). Any M; K % 4 == 0. Returns -1 outside
// the kernel's limits (checked first in Python).
extern "C" SLIM_F32 int slim_sparse24_f32(const float *x, int64_t m, int64_t k,
                                          int64_t stride, const float *values,
                                          const uint32_t *meta, int64_t n, float *out) {
  return sparse24_f32(x, m, k, stride, values, meta, n, out);
}

// The same with the kept values stored as bf16 (all of them bf16 numbers, the caller checks):
// half the value bytes, bit-identical results.
extern "C" SLIM_F32 int slim_sparse24_f32_bf16(const float *x, int64_t m, int64_t k,
                                               int64_t stride, const uint16_t *values,
                                               const uint32_t *meta, int64_t n, float *out) {
  return sparse24_f32(x, m, k, stride, values, meta, n, out);
}

#if !defined(SLIM_ISA_AVX2)
// A 16-channel block's codes (channel c at bits 4c) -> VPERMW indices: word 2c = i0, word
// 2c + 1 = i1 in their low 2 bits (bits above select the same input: every 64-bit lane holds the
// group).
SLIM_TARGET_BF16 static inline __m512i sparse24_word_index(uint64_t codes) {
  const __m512i spread = _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1);
  const __m512i shifts =
      _mm512_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28, 0, 4, 8, 12, 16, 20, 24, 28);
  const __m512i lanes = _mm512_permutexvar_epi32(
      spread, _mm512_castsi128_si512(_mm_cvtsi64_si128((long long)codes)));
  const __m512i t = _mm512_srlv_epi32(lanes, shifts);  // dword c: code c in bits 0-3
  // Odd words: the high half of t << 14, whose low 2 bits are t's bits 2-3 (i1).
  return _mm512_mask_blend_epi16(0xAAAAAAAA, t, _mm512_slli_epi32(t, 14));
}

// A tile's sums to bf16 outputs, as they are (no bias: a 2:4 layer with one keeps torch's path).
SLIM_TARGET_BF16 static inline void sparse24_bf16_store(const __m512 *acc0, const __m512 *acc1,
                                                        int rows, bool pair, int64_t channel,
                                                        int64_t n, uint16_t *out) {
  for (int half = 0; half < (pair ? 2 : 1); half++) {
    const int64_t first = channel + 16 * half;
    const __mmask16 m16 = tail_mask(n - first);
    for (int m = 0; m < rows; m++)
      _mm256_mask_storeu_epi16(out + m * n + first, m16, to_bf16x16(half ? acc1[m] : acc0[m]));
  }
}

// One row M of a tile: its group of 4 inputs broadcast to every 64-bit lane, permuted per block.
#define SPARSE24_ROW(M)                                                             \
  if constexpr (ROWS > M) {                                                         \
    int64_t four;                                                                   \
    memcpy(&four, x + M * stride + 4 * g, sizeof four);                             \
    const __m512i group = _mm512_set1_epi64(four);                                  \
    a0##M = _mm512_dpbf16_ps(a0##M, b0, (__m512bh)_mm512_permutexvar_epi16(i0, group)); \
    a1##M = _mm512_dpbf16_ps(a1##M, b1, (__m512bh)_mm512_permutexvar_epi16(i1, group)); \
  }

// bf16: ROWS (1-8) rows of x against two 16-channel blocks (the second absent when `pair` is
// false); lane c of an accumulator is channel c.
template <int ROWS>
SLIM_TARGET_BF16 static void sparse24_bf16_tile(const uint16_t *x, int64_t stride,
                                                const uint16_t *w0, const uint16_t *w1,
                                                const uint64_t *m0, const uint64_t *m1, bool pair,
                                                int64_t groups, int64_t channel, int64_t n,
                                                uint16_t *out) {
  SLIM_TILE_ACCUMULATORS(__m512, _mm512_setzero_ps());
  for (int64_t g = 0; g < groups; g++) {
    _mm_prefetch((const char *)(w0 + g * 32) + SPARSE_PREFETCH_BYTES, _MM_HINT_T0);
    _mm_prefetch((const char *)(w1 + g * 32) + SPARSE_PREFETCH_BYTES, _MM_HINT_T0);
    const __m512bh b0 = (__m512bh)_mm512_loadu_si512(w0 + g * 32);
    const __m512bh b1 = (__m512bh)_mm512_loadu_si512(w1 + g * 32);
    const __m512i i0 = sparse24_word_index(m0[g]), i1 = sparse24_word_index(m1[g]);
    SPARSE24_ROW(0) SPARSE24_ROW(1) SPARSE24_ROW(2) SPARSE24_ROW(3)
    SPARSE24_ROW(4) SPARSE24_ROW(5) SPARSE24_ROW(6) SPARSE24_ROW(7)
  }
  SLIM_TILE_RESULTS(__m512);
  sparse24_bf16_store(acc0, acc1, ROWS, pair, channel, n, out);
}

// The same on the coded layout (cpu_bf16_coded.h): a step per group of 4 inputs, its two blocks'
// kept values and then their position codes (8 bytes each), one sequential stream per tile.
template <int ROWS>
SLIM_TARGET_BF16 static void sparse24_coded_tile(const uint16_t *x, int64_t stride,
                                                 const uint8_t *tile, bool pair, int64_t groups,
                                                 int64_t channel, int64_t n, uint16_t *out) {
  SLIM_TILE_ACCUMULATORS(__m512, _mm512_setzero_ps());
  const uint8_t *at = tile;
  for (int64_t first = 0; first < groups; first += SLIM_CODED_CHUNK_STEPS) {
    const int64_t count =
        groups - first < SLIM_CODED_CHUNK_STEPS ? groups - first : SLIM_CODED_CHUNK_STEPS;
    const SlimCodedHeader *header = (const SlimCodedHeader *)at;
    const bool raw = header->raw;
    const __m512i table = slim_coded_table(header);
    const uint8_t *body = at + sizeof(SlimCodedHeader);
    const int64_t values = raw ? 128 : 96, step = values + 16;
    for (int64_t s = 0; s < count; s++) {
      const uint8_t *here = body + s * step;
      _mm_prefetch((const char *)here + SPARSE_PREFETCH_BYTES, _MM_HINT_T0);
      __m512bh b0, b1;
      slim_coded_blocks(here, raw, table, b0, b1);
      uint64_t codes[2];
      memcpy(codes, here + values, sizeof codes);
      const __m512i i0 = sparse24_word_index(codes[0]), i1 = sparse24_word_index(codes[1]);
      const int64_t g = first + s;
      SPARSE24_ROW(0) SPARSE24_ROW(1) SPARSE24_ROW(2) SPARSE24_ROW(3)
      SPARSE24_ROW(4) SPARSE24_ROW(5) SPARSE24_ROW(6) SPARSE24_ROW(7)
    }
    at = body + count * step;
  }
  SLIM_TILE_RESULTS(__m512);
  sparse24_bf16_store(acc0, acc1, ROWS, pair, channel, n, out);
}
#undef SPARSE24_ROW

typedef void (*SparseCodedTile)(const uint16_t *, int64_t, const uint8_t *, bool, int64_t,
                                int64_t, int64_t, uint16_t *);

typedef void (*SparseBf16Tile)(const uint16_t *, int64_t, const uint16_t *, const uint16_t *,
                               const uint64_t *, const uint64_t *, bool, int64_t, int64_t,
                               int64_t, uint16_t *);
#endif

// out bf16 [M, N] = x bf16 [M, K] (rows `stride` elements apart) @ W.T, W 2:4 sparse along K and
// packed in 16-channel blocks (values bf16, codes uint64); fp32 sums, one bf16 rounding. Any M;
// K % 4 == 0. Needs what the bf16 GEMM needs (`slim_bf16_gemm_cpu_supported`). Returns -1
// outside the kernel's limits or in the AVX2 build.
extern "C" SLIM_TARGET_BF16 int slim_sparse24_bf16(const uint16_t *x, int64_t m, int64_t k,
                                                   int64_t stride, const uint16_t *values,
                                                   const uint64_t *meta, int64_t n,
                                                   uint16_t *out) {
#if defined(SLIM_ISA_AVX2)
  (void)x, (void)m, (void)k, (void)stride, (void)values, (void)meta, (void)n, (void)out;
  return -1;
#else
  if (m < 1 || k < 4 || k % 4 || n < 1) return -1;
  static const SparseBf16Tile tiles[SPARSE_BF16_ROW_BLOCK] = {
      sparse24_bf16_tile<1>, sparse24_bf16_tile<2>, sparse24_bf16_tile<3>,
      sparse24_bf16_tile<4>, sparse24_bf16_tile<5>, sparse24_bf16_tile<6>,
      sparse24_bf16_tile<7>, sparse24_bf16_tile<8>};
  const int64_t groups = k / 4;
  slim_for_each_tile(n, m, groups * 32, SPARSE_BF16_ROW_BLOCK,
                     [&](int64_t w0, int64_t w1, bool pair, int64_t channel, int64_t r0,
                         int64_t count) {
                       const uint64_t *m0 = meta + channel / 16 * groups;
                       tiles[count - 1](x + r0 * stride, stride, values + w0, values + w1, m0,
                                        pair ? m0 + groups : m0, pair, groups, channel, n,
                                        out + r0 * n);
                     });
  return 0;
#endif
}

static inline int64_t sparse24_coded_tiles(int64_t n) { return (slim_channel_blocks(n) + 1) / 2; }

// Tile t of the bf16 2:4 blocks (values [N/16][K/4][16][2], codes [N/16][K/4] as uint64) in the
// coded layout; a lone last block's partner is zeros.
static int64_t sparse24_tile(const uint16_t *values, const uint64_t *meta, int64_t n, int64_t k,
                             int64_t t, uint8_t *dst, int64_t *raw) {
  const int64_t groups = k / 4, blocks = slim_channel_blocks(n);
  const auto value = [&](int64_t g, int q) -> uint16_t {
    const int64_t block = 2 * t + SLIM_CODED_SLOTS.block[q];
    return block < blocks ? values[(block * groups + g) * 32 + SLIM_CODED_SLOTS.element[q]] : 0;
  };
  const auto codes = [&](int64_t g, uint8_t *at) {
    for (int64_t b = 0; b < 2; b++) {
      const uint64_t word = 2 * t + b < blocks ? meta[(2 * t + b) * groups + g] : 0;
      memcpy(at + 8 * b, &word, sizeof word);
    }
  };
  return slim_coded_tile(groups, 16, value, codes, dst, raw);
}

// offsets[0 .. tiles] of the coded layout of bf16 2:4 blocks (slim_sparse24_bf16's packing);
// returns how many chunks are raw.
extern "C" int64_t slim_sparse24_coded_layout(const uint16_t *values, const uint64_t *meta,
                                              int64_t n, int64_t k, int64_t *offsets) {
  return slim_coded_layout(sparse24_coded_tiles(n), offsets,
                           [&](int64_t t, uint8_t *dst, int64_t *raw) {
                             return sparse24_tile(values, meta, n, k, t, dst, raw);
                           });
}

extern "C" void slim_sparse24_coded_pack(const uint16_t *values, const uint64_t *meta, int64_t n,
                                         int64_t k, const int64_t *offsets, uint8_t *packed) {
  slim_coded_pack(sparse24_coded_tiles(n), offsets, packed,
                  [&](int64_t t, uint8_t *dst, int64_t *raw) {
                    return sparse24_tile(values, meta, n, k, t, dst, raw);
                  });
}

// slim_sparse24_bf16 on the coded layout (slim_sparse24_coded_pack): the same bits out.
extern "C" SLIM_TARGET_BF16 int slim_sparse24_bf16_coded(const uint16_t *x, int64_t m, int64_t k,
                                                         int64_t stride, const uint8_t *packed,
                                                         int64_t n, uint16_t *out) {
#if defined(SLIM_ISA_AVX2)
  (void)x, (void)m, (void)k, (void)stride, (void)packed, (void)n, (void)out;
  return -1;
#else
  if (m < 1 || k < 4 || k % 4 || n < 1) return -1;
  static const SparseCodedTile tiles[SPARSE_BF16_ROW_BLOCK] = {
      sparse24_coded_tile<1>, sparse24_coded_tile<2>, sparse24_coded_tile<3>,
      sparse24_coded_tile<4>, sparse24_coded_tile<5>, sparse24_coded_tile<6>,
      sparse24_coded_tile<7>, sparse24_coded_tile<8>};
  const int64_t groups = k / 4, blocks = slim_channel_blocks(n);
  const int64_t *offsets = (const int64_t *)packed;
  slim_parallel(sparse24_coded_tiles(n), [&](int64_t first, int64_t end) {
    for (int64_t t = first; t < end; t++)
      for (int64_t r0 = 0; r0 < m; r0 += SPARSE_BF16_ROW_BLOCK) {
        const int64_t count = m - r0 < SPARSE_BF16_ROW_BLOCK ? m - r0 : SPARSE_BF16_ROW_BLOCK;
        tiles[count - 1](x + r0 * stride, stride, packed + offsets[t], 2 * t + 1 < blocks,
                         groups, 32 * t, n, out + r0 * n);
      }
  });
  return 0;
#endif
}
