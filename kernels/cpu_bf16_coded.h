// The coded bf16 layout both bf16 GEMMs can read (cpu_bf16_coded.cpp for dense weights,
// cpu_sparse24.cpp for 2:4 kept values): lossless, 12 bits a weight where a trained model's
// values are (cpu_bf16_coded.cpp says why and how).
//
// A tile is a pair of 16-channel blocks, read as steps: each step is the 64 bf16 values that one
// VDPBF16PS per block multiplies ([16 channels][2] per block), stored as 64 low bytes and then
// 32 bytes of 4-bit codes (or, in a raw chunk, the 64 high bytes as they are), then the kernel's
// own `extra` bytes (the 2:4 kernel's position codes). Steps come in chunks of up to 32, each
// after a 32-byte header: the 16 high bytes the codes stand for, and the raw flag. Byte q of a
// step's low and high bytes is element (q / 16) * 8 + q % 8 of block (q % 16) / 8, where
// VPUNPCKLBW / VPUNPCKHBW put it; code byte b holds the codes of high bytes b (low nibble) and
// b + 32 (high nibble). A packed weight starts with int64 offsets[tiles + 1]: each tile's first
// byte from the packed start, the last one the total.
#pragma once

#include <stdint.h>
#include <string.h>

#include <atomic>

#include "cpu_bf16.h"
#include "cpu_threads.h"

static const int64_t SLIM_CODED_CHUNK_STEPS = 32;

struct SlimCodedHeader {
  uint8_t table[16];  // the high byte each code stands for
  uint8_t raw;        // 1: the chunk's high bytes are stored as they are
  uint8_t unused[15];
};
static_assert(sizeof(SlimCodedHeader) == 32, "a chunk header is 32 bytes");

// Which value byte q of a step holds: block (0 or 1) and element of its [16 channels][2 inputs].
struct SlimCodedSlots {
  int block[64], element[64];
  SlimCodedSlots() {
    for (int q = 0; q < 64; q++) {
      block[q] = (q % 16) / 8;
      element[q] = (q / 16) * 8 + q % 8;
    }
  }
};
inline const SlimCodedSlots SLIM_CODED_SLOTS;

// Bytes of one tile of `steps` steps, each with `extra_bytes` after its values; written at dst
// unless it is NULL. value(step, q) gives the bf16 bits of byte q's weight, extra(step, dst)
// writes a step's extra bytes. Counts the raw chunks into *raw.
template <typename Value, typename Extra>
static int64_t slim_coded_tile(int64_t steps, int64_t extra_bytes, Value value, Extra extra,
                               uint8_t *dst, int64_t *raw) {
  int64_t bytes = 0;
  for (int64_t first = 0; first < steps; first += SLIM_CODED_CHUNK_STEPS) {
    const int64_t count =
        steps - first < SLIM_CODED_CHUNK_STEPS ? steps - first : SLIM_CODED_CHUNK_STEPS;
    SlimCodedHeader h;
    memset(&h, 0, sizeof h);
    int8_t code[256];
    memset(code, -1, sizeof code);
    int distinct = 0;
    for (int64_t s = first; s < first + count; s++)
      for (int q = 0; q < 64; q++) {
        const uint8_t high = value(s, q) >> 8;
        if (code[high] >= 0) continue;
        if (distinct < 16) h.table[distinct] = high;
        code[high] = (int8_t)(distinct < 16 ? distinct : 0);
        distinct++;
      }
    h.raw = distinct > 16;
    *raw += h.raw;
    const int64_t step = (h.raw ? 128 : 96) + extra_bytes;
    if (dst != NULL) {
      uint8_t *chunk = dst + bytes;
      memcpy(chunk, &h, sizeof h);
      uint8_t *body = chunk + sizeof h;
      memset(body, 0, (size_t)(count * step));
      for (int64_t s = 0; s < count; s++) {
        uint8_t *low = body + s * step, *high = low + 64;
        for (int q = 0; q < 64; q++) {
          const uint16_t v = value(first + s, q);
          low[q] = (uint8_t)v;
          if (h.raw)
            high[q] = (uint8_t)(v >> 8);
          else
            high[q % 32] |= (uint8_t)(code[v >> 8] << (q < 32 ? 0 : 4));
        }
        extra(first + s, high + (h.raw ? 64 : 32));
      }
    }
    bytes += (int64_t)sizeof h + count * step;
  }
  return bytes;
}

// offsets[0 .. tiles] of a packed weight whose tile t is tile(t, dst, &raw) (slim_coded_tile);
// returns how many chunks are raw. Tiles are sized on the kernels' threads.
template <typename Tile>
static int64_t slim_coded_layout(int64_t tiles, int64_t *offsets, Tile tile) {
  std::atomic<int64_t> raw{0};
  slim_parallel(tiles, [&](int64_t begin, int64_t end) {
    int64_t mine = 0;
    for (int64_t t = begin; t < end; t++) offsets[t + 1] = tile(t, (uint8_t *)NULL, &mine);
    raw += mine;
  });
  offsets[0] = (tiles + 1) * (int64_t)sizeof(int64_t);
  for (int64_t t = 0; t < tiles; t++) offsets[t + 1] += offsets[t];
  return raw.load();
}

// Writes the offsets and every tile at `packed` (offsets[tiles] bytes).
template <typename Tile>
static void slim_coded_pack(int64_t tiles, const int64_t *offsets, uint8_t *packed, Tile tile) {
  memcpy(packed, offsets, (size_t)(tiles + 1) * sizeof(int64_t));
  slim_parallel(tiles, [&](int64_t begin, int64_t end) {
    int64_t raw = 0;
    for (int64_t t = begin; t < end; t++) tile(t, packed + offsets[t], &raw);
  });
}

// A chunk header's table in every 128-bit lane, for VPSHUFB.
SLIM_TARGET_BF16 static inline __m512i slim_coded_table(const SlimCodedHeader *h) {
  return _mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i *)h->table));
}

// A step's two 16-channel blocks, as VDPBF16PS reads them, from its low bytes and codes (or raw
// high bytes).
SLIM_TARGET_BF16 static inline void slim_coded_blocks(const uint8_t *step, bool raw,
                                                      __m512i table, __m512bh &b0,
                                                      __m512bh &b1) {
  const __m512i low = _mm512_loadu_si512(step);
  __m512i high;
  if (raw) {
    high = _mm512_loadu_si512(step + 64);
  } else {  // the 32 code bytes, then the same shifted: their high nibbles
    const __m256i c = _mm256_loadu_si256((const __m256i *)(step + 64));
    const __m512i codes =
        _mm512_inserti64x4(_mm512_castsi256_si512(c), _mm256_srli_epi16(c, 4), 1);
    high = _mm512_shuffle_epi8(table, _mm512_and_si512(codes, _mm512_set1_epi8(0x0f)));
  }
  b0 = (__m512bh)_mm512_unpacklo_epi8(low, high);
  b1 = (__m512bh)_mm512_unpackhi_epi8(low, high);
}
