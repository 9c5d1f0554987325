// The bf16 GEMM of cpu_bf16_gemm.cpp on a lossless layout that reads 3/4 of the bytes (built and
// loaded with the other sources by kernels/native.py; served where the CPU has AVX-512 BF16).
//
// Why: a decode step streams every weight once, so its speed is the memory's bandwidth over the
// weights' bytes. A bf16 weight's high byte (sign and the top 7 exponent bits) takes few values in
// a trained model: on SmolLM2-135M no block of 32 channels x 64 inputs holds more than 16 of them
// outside 6 of 65664 such blocks. So each chunk of 32 channels x 64 inputs keeps its low bytes as
// they are and each high byte as a 4-bit code into a 16-entry table of the chunk's own: 12 bits a
// weight instead of 16. A chunk with more than 16 high bytes keeps them as they are ("raw").
//
// In the tile, one VPSHUFB turns 64 codes back into 64 high bytes and VPUNPCKLBW / VPUNPCKHBW
// interleave them with the low bytes into the two 16-channel blocks exactly as slim_bf16_pack lays
// them out, so the same VDPBF16PS instructions run on the same values in the same order: every
// output is bit-identical to cpu_bf16_gemm.cpp's. The unpacking costs a few instructions per 64
// weights, hidden under the memory stream from 1 to 128 rows (kernels/README.md).
//
// Layout: cpu_bf16_coded.h, a step per pair of inputs (a tile: channels 32 t .. 32 t + 31, a lone
// last block padded with zero channels), nothing after each step's values.

#include <stdint.h>

#include "cpu_bf16_amx.h"
#include "cpu_bf16_coded.h"
#include "cpu_bf16_tiles.h"
#include "cpu_pack.h"

#define SLIM_AVX512_BF16 SLIM_TARGET_BF16

static const int64_t CODED_ROW_BLOCK = 8;  // activation rows per pass, as the plain GEMM
// Distance (bytes of packed weights) the loads run ahead of the products.
static const int64_t CODED_PREFETCH_BYTES = 32768;

static inline int64_t coded_pairs(int64_t k) { return slim_input_groups(k, 2); }

extern "C" int64_t slim_bf16_coded_tiles(int64_t n) { return (slim_channel_blocks(n) + 1) / 2; }

// Tile t of w bf16 [N, K] (slim_coded_tile): a step per pair of inputs, zeros past N and K.
static int64_t dense_tile(const uint16_t *w, int64_t n, int64_t k, int64_t t, uint8_t *dst,
                          int64_t *raw) {
  const auto value = [&](int64_t pair, int q) -> uint16_t {
    const int e = SLIM_CODED_SLOTS.element[q];
    const int64_t row = 32 * t + 16 * SLIM_CODED_SLOTS.block[q] + e / 2, col = 2 * pair + e % 2;
    return row < n && col < k ? w[row * k + col] : 0;
  };
  return slim_coded_tile(coded_pairs(k), 0, value, [](int64_t, uint8_t *) {}, dst, raw);
}

// offsets[0 .. tiles] of the coded layout of w bf16 [N, K]; returns how many chunks are raw.
extern "C" int64_t slim_bf16_coded_layout(const uint16_t *w, int64_t n, int64_t k,
                                          int64_t *offsets) {
  return slim_coded_layout(slim_bf16_coded_tiles(n), offsets,
                           [&](int64_t t, uint8_t *dst, int64_t *raw) {
                             return dense_tile(w, n, k, t, dst, raw);
                           });
}

// w bf16 [N, K] -> packed (offsets[tiles] bytes), offsets from slim_bf16_coded_layout.
extern "C" void slim_bf16_coded_pack(const uint16_t *w, int64_t n, int64_t k,
                                     const int64_t *offsets, uint8_t *packed) {
  slim_coded_pack(slim_bf16_coded_tiles(n), offsets, packed,
                  [&](int64_t t, uint8_t *dst, int64_t *raw) {
                    return dense_tile(w, n, k, t, dst, raw);
                  });
}

// ROWS (1-8) activation rows (x: bf16, rows kp apart, zero-padded to an even K) x one tile.
template <int ROWS>
SLIM_AVX512_BF16 static void coded_tile(const uint16_t *x, int64_t kp, const uint8_t *tile,
                                        bool pair, int64_t pairs, const uint16_t *bias,
                                        int64_t channel, int64_t n, uint16_t *out) {
  SLIM_TILE_ACCUMULATORS(__m512, _mm512_setzero_ps());
  const uint8_t *at = tile;
  for (int64_t first = 0; first < pairs; first += SLIM_CODED_CHUNK_STEPS) {
    const int64_t count =
        pairs - first < SLIM_CODED_CHUNK_STEPS ? pairs - first : SLIM_CODED_CHUNK_STEPS;
    const SlimCodedHeader *header = (const SlimCodedHeader *)at;
    const bool raw = header->raw;
    const __m512i table = slim_coded_table(header);
    const uint8_t *body = at + sizeof(SlimCodedHeader);
    const int64_t step = raw ? 128 : 96;
    for (int64_t p = 0; p < count; p++) {
      _mm_prefetch((const char *)(body + p * step) + CODED_PREFETCH_BYTES, _MM_HINT_T0);
      __m512bh b0, b1;
      slim_coded_blocks(body + p * step, raw, table, b0, b1);
      SLIM_TILE_ROWS(x + 2 * (first + p), kp, (__m512bh), _mm512_dpbf16_ps)
    }
    at = body + count * step;
  }
  SLIM_TILE_RESULTS(__m512);
  slim_bf16_store_tile(acc0, acc1, ROWS, pair, bias, channel, n, out);
}

typedef void (*CodedTile)(const uint16_t *, int64_t, const uint8_t *, bool, int64_t,
                          const uint16_t *, int64_t, int64_t, uint16_t *);

// out bf16 [M, N] = x bf16 [M, K] (rows `stride` elements apart) @ w.T + bias (bf16 [N] or NULL),
// w packed by `slim_bf16_coded_pack`; any M. Returns -1 for arguments outside the kernel's
// limits (checked first in Python).
extern "C" SLIM_AVX512_BF16 int slim_bf16_coded_gemm(const uint16_t *x, int64_t m, int64_t k,
                                                     int64_t stride, const uint8_t *packed,
                                                     const uint16_t *bias, int64_t n,
                                                     uint16_t *out) {
  if (m < 1 || k < 1 || n < 1) return -1;
  const int64_t pairs = coded_pairs(k), kp = 2 * pairs, blocks = slim_channel_blocks(n);
  const int64_t *offsets = (const int64_t *)packed;
#if !defined(SLIM_ISA_AVX2)
  if (slim_amx_on && m >= SLIM_BF16_AMX_MIN_ROWS)  // a lone block is padded to a pair
    return slim_amx_gemm(x, m, k, stride, slim_bf16_coded_tiles(n), blocks % 2 == 1, bias, n,
                         out, [&](int64_t t) {
                           return SlimAmxCodedSteps{packed + offsets[t], pairs};
                         });
#endif
  uint16_t *rows = slim_bf16_padded_rows(x, m, k, stride, kp, m);
  if (rows == NULL) return -1;
  static const CodedTile tiles[CODED_ROW_BLOCK] = {coded_tile<1>, coded_tile<2>, coded_tile<3>,
                                                   coded_tile<4>, coded_tile<5>, coded_tile<6>,
                                                   coded_tile<7>, coded_tile<8>};
  slim_parallel(slim_bf16_coded_tiles(n), [&](int64_t first, int64_t end) {
    for (int64_t t = first; t < end; t++) {
      const bool pair = 2 * t + 1 < blocks;  // a lone last block: its own 16 channels only
      for (int64_t r0 = 0; r0 < m; r0 += CODED_ROW_BLOCK) {
        const int64_t count = m - r0 < CODED_ROW_BLOCK ? m - r0 : CODED_ROW_BLOCK;
        tiles[count - 1](rows + r0 * kp, kp, packed + offsets[t], pair, pairs, bias, 32 * t, n,
                         out + r0 * n);
      }
    }
  });
  free(rows);
  return 0;
}
