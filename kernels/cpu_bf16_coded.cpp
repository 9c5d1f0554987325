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
// Layout (bytes): int64 offsets[tiles + 1] (tile t's start from the packed start; the last one is
// the total), then each tile: the channels 32 t .. 32 t + 31 (a lone last block padded with zero
// channels), as chunks of up to 32 pairs of inputs, each a 32-byte header (the table, a raw flag)
// followed per pair of inputs by 64 low bytes and 32 bytes of codes (64 high bytes if raw). Byte
// q of a pair's low and high bytes is the weight VPUNPCK puts at element (q / 16) * 8 + q % 8 of
// block (q % 16) / 8; code byte b holds the codes of high bytes b (low nibble) and b + 32.

#include <stdint.h>
#include <string.h>

#include <atomic>

#include "cpu_bf16_tiles.h"
#include "cpu_pack.h"

#define SLIM_AVX512_BF16 SLIM_TARGET_BF16

static const int64_t CODED_CHUNK_PAIRS = 32;  // pairs of inputs per chunk (64 inputs)
static const int64_t CODED_ROW_BLOCK = 8;     // activation rows per pass, as the plain GEMM
// Distance (bytes of packed weights) the loads run ahead of the products.
static const int64_t CODED_PREFETCH_BYTES = 32768;

struct CodedHeader {
  uint8_t table[16];  // the high byte each code stands for
  uint8_t raw;        // 1: the chunk's high bytes are stored as they are
  uint8_t unused[15];
};
static_assert(sizeof(CodedHeader) == 32, "a chunk header is 32 bytes");

static inline int64_t coded_pairs(int64_t k) { return slim_input_groups(k, 2); }
static inline int64_t coded_chunk_pairs(int64_t pairs, int64_t first) {
  return pairs - first < CODED_CHUNK_PAIRS ? pairs - first : CODED_CHUNK_PAIRS;
}

extern "C" int64_t slim_bf16_coded_tiles(int64_t n) { return (slim_channel_blocks(n) + 1) / 2; }

namespace {

// Where byte q of a pair step's 64 low / high bytes comes from: channel 32 t + row[q], input
// 2 p + col[q] (see the layout above).
struct StepSlots {
  int row[64], col[64];
  StepSlots() {
    for (int q = 0; q < 64; q++) {
      const int element = (q / 16) * 8 + q % 8;  // of its block's [16 channels][2 inputs]
      row[q] = 16 * ((q % 16) / 8) + element / 2;
      col[q] = element % 2;
    }
  }
};
const StepSlots SLOTS;

// One chunk of a weight: tile t, `count` pairs of inputs from `first`.
struct Chunk {
  const uint16_t *w;
  int64_t n, k, t, first, count;

  uint16_t at(int64_t p, int q) const {
    const int64_t row = 32 * t + SLOTS.row[q], col = 2 * (first + p) + SLOTS.col[q];
    return row < n && col < k ? w[row * k + col] : 0;
  }
  // The header: the distinct high bytes in first-seen order (raw if more than 16).
  CodedHeader header() const {
    CodedHeader h;
    memset(&h, 0, sizeof h);
    bool seen[256] = {false};
    int distinct = 0;
    for (int64_t p = 0; p < count; p++)
      for (int q = 0; q < 64; q++) {
        const uint8_t high = at(p, q) >> 8;
        if (seen[high]) continue;
        seen[high] = true;
        if (distinct < 16) h.table[distinct] = high;
        distinct++;
      }
    h.raw = distinct > 16;
    return h;
  }
  int64_t bytes(const CodedHeader &h) const {
    return (int64_t)sizeof(CodedHeader) + count * (h.raw ? 128 : 96);
  }
  // Writes the header and the pairs at `dst`.
  void write(const CodedHeader &h, uint8_t *dst) const {
    memcpy(dst, &h, sizeof h);
    int8_t code[256];
    for (int i = 0; i < 16; i++) code[h.table[i]] = (int8_t)i;
    const int64_t step = h.raw ? 128 : 96;
    uint8_t *body = dst + sizeof h;
    memset(body, 0, (size_t)(count * step));
    for (int64_t p = 0; p < count; p++) {
      uint8_t *low = body + p * step, *high = low + 64;
      for (int q = 0; q < 64; q++) {
        const uint16_t v = at(p, q);
        low[q] = (uint8_t)v;
        if (h.raw)
          high[q] = (uint8_t)(v >> 8);
        else
          high[q % 32] |= (uint8_t)(code[v >> 8] << (q < 32 ? 0 : 4));
      }
    }
  }
};

Chunk chunk_of(const uint16_t *w, int64_t n, int64_t k, int64_t t, int64_t first) {
  return Chunk{w, n, k, t, first, coded_chunk_pairs(coded_pairs(k), first)};
}

}  // namespace

// offsets[0 .. tiles] of the layout above for w bf16 [N, K]; returns how many chunks are raw.
extern "C" int64_t slim_bf16_coded_layout(const uint16_t *w, int64_t n, int64_t k,
                                          int64_t *offsets) {
  const int64_t tiles = slim_bf16_coded_tiles(n), pairs = coded_pairs(k);
  std::atomic<int64_t> raw{0};
  // Each tile's bytes first (offsets[t + 1]), then their running sum.
  slim_parallel(tiles, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; t++) {
      int64_t bytes = 0;
      for (int64_t first = 0; first < pairs; first += CODED_CHUNK_PAIRS) {
        const Chunk chunk = chunk_of(w, n, k, t, first);
        const CodedHeader h = chunk.header();
        raw += h.raw;
        bytes += chunk.bytes(h);
      }
      offsets[t + 1] = bytes;
    }
  });
  offsets[0] = (tiles + 1) * (int64_t)sizeof(int64_t);
  for (int64_t t = 0; t < tiles; t++) offsets[t + 1] += offsets[t];
  return raw.load();
}

// w bf16 [N, K] -> packed (offsets[tiles] bytes), offsets from slim_bf16_coded_layout.
extern "C" void slim_bf16_coded_pack(const uint16_t *w, int64_t n, int64_t k,
                                     const int64_t *offsets, uint8_t *packed) {
  const int64_t tiles = slim_bf16_coded_tiles(n), pairs = coded_pairs(k);
  memcpy(packed, offsets, (size_t)(tiles + 1) * sizeof(int64_t));
  slim_parallel(tiles, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; t++) {
      uint8_t *at = packed + offsets[t];
      for (int64_t first = 0; first < pairs; first += CODED_CHUNK_PAIRS) {
        const Chunk chunk = chunk_of(w, n, k, t, first);
        const CodedHeader h = chunk.header();
        chunk.write(h, at);
        at += chunk.bytes(h);
      }
    }
  });
}

// ROWS (1-8) activation rows (x: bf16, rows kp apart, zero-padded to an even K) x one tile.
template <int ROWS>
SLIM_AVX512_BF16 static void coded_tile(const uint16_t *x, int64_t kp, const uint8_t *tile,
                                        bool pair, int64_t pairs, const uint16_t *bias,
                                        int64_t channel, int64_t n, uint16_t *out) {
  SLIM_TILE_ACCUMULATORS(__m512, _mm512_setzero_ps());
  const __m512i nibble = _mm512_set1_epi8(0x0f);
  const uint8_t *at = tile;
  for (int64_t first = 0; first < pairs; first += CODED_CHUNK_PAIRS) {
    const int64_t count = coded_chunk_pairs(pairs, first);
    const CodedHeader *header = (const CodedHeader *)at;
    const bool raw = header->raw;
    const __m512i table = _mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i *)header->table));
    const uint8_t *body = at + sizeof(CodedHeader);
    const int64_t step = raw ? 128 : 96;
    for (int64_t p = 0; p < count; p++) {
      const uint8_t *low = body + p * step;
      _mm_prefetch((const char *)low + CODED_PREFETCH_BYTES, _MM_HINT_T0);
      const __m512i l = _mm512_loadu_si512(low);
      __m512i h;
      if (raw) {
        h = _mm512_loadu_si512(low + 64);
      } else {  // the 32 code bytes, then the same shifted: their high nibbles
        const __m256i c = _mm256_loadu_si256((const __m256i *)(low + 64));
        const __m512i codes =
            _mm512_inserti64x4(_mm512_castsi256_si512(c), _mm256_srli_epi16(c, 4), 1);
        h = _mm512_shuffle_epi8(table, _mm512_and_si512(codes, nibble));
      }
      const __m512bh b0 = (__m512bh)_mm512_unpacklo_epi8(l, h);
      const __m512bh b1 = (__m512bh)_mm512_unpackhi_epi8(l, h);
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
  uint16_t *rows = slim_bf16_padded_rows(x, m, k, stride, kp);
  if (rows == NULL) return -1;
  static const CodedTile tiles[CODED_ROW_BLOCK] = {coded_tile<1>, coded_tile<2>, coded_tile<3>,
                                                   coded_tile<4>, coded_tile<5>, coded_tile<6>,
                                                   coded_tile<7>, coded_tile<8>};
  const int64_t *offsets = (const int64_t *)packed;
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
