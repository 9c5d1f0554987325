// The bf16 GEMMs (cpu_bf16_gemm.cpp, cpu_bf16_coded.cpp) on AMX tiles, where the CPU has AMX-BF16
// (Intel Sapphire Rapids and later) and a call has enough rows (`slim_amx_enable`); also what the
// W8A16 GEMM's AMX-INT8 path (cpu_w8a16_gemm.cpp) shares with them.
//
// Why: VDPBF16PS multiplies one activation row by a 16-channel block per instruction, so the
// AVX-512 tiles cost about one row's time per row (~0.08 TFLOP/s on two cores of an Intel Xeon),
// while one TDPBF16PS multiplies 16 rows by 32 inputs of a 16-channel block: from a few rows on,
// a call costs what reading its weights costs (kernels/README.md, "AMX tiles in our bf16 GEMM").
//
// The weights keep their layouts. A step of slim_bf16_pack's pairs ([2 blocks][16 channels][2
// inputs], 128 bytes) is a row of two B tiles at once, so 16 steps are the two tiles, 128 bytes
// apart: the plain layout is read where it lies, the coded one is unpacked (the AVX-512 tiles'
// own unpacking) into a 2 KB buffer per 16 steps. Activation rows are copied zero-padded to a
// multiple of 16 rows and 32 inputs, so every tile is whole and one tile configuration serves
// every call. Up to 32 rows take one pass over a tile's weights: 4 accumulator tiles (2 row
// groups x 2 blocks), 2 activation tiles, 2 weight tiles: all 8 of AMX's registers.
//
// The sums are TDPBF16PS's: fp32 products of bf16 pairs accumulated in fp32, as the AVX-512
// tiles' (which input pairs meet in which order inside an instruction is the hardware's), then
// the same bias and rounding to bf16.
#pragma once

#if !defined(SLIM_ISA_AVX2)

#include <cpuid.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "cpu_bf16.h"
#include "cpu_bf16_coded.h"
#include "cpu_bf16_tiles.h"
#include "cpu_threads.h"

#define SLIM_TARGET_AMX \
  __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16,amx-tile,amx-bf16")))

static const int64_t SLIM_AMX_STEPS = 16;      // pairs of inputs per tile product (32 inputs)
static const int64_t SLIM_AMX_TILE_ROWS = 16;  // activation rows per tile
static const int64_t SLIM_AMX_PASS_ROWS = 32;  // rows per pass over a weight tile
static const int64_t SLIM_AMX_STEP_BYTES = 128;

// Whether the GEMMs take AMX tiles at all (cpu_bf16_gemm.cpp: slim_amx_enable).
extern int slim_amx_on;
// The fewest rows a bf16 GEMM call has for the tiles: on the coded layout and the default model's
// shapes 0.8-0.9x the AVX-512 tiles at one row, level at 3, 1.2-1.35x at 4, 1.8-2.4x at 8, 4-5.5x
// at 32 (kernels/README.md, "AMX tiles in our bf16 GEMM").
static const int64_t SLIM_BF16_AMX_MIN_ROWS = 3;

// AMX-BF16, AMX-TILE and AMX-INT8 by CPUID, and the kernel's permission for this process to use
// the tiles' state (Linux asks a process to request it: arch_prctl(ARCH_REQ_XCOMP_PERM)).
static inline bool slim_amx_usable(void) {
  unsigned a, b, c, d;
  if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return false;
  if (!(d >> 22 & 1) || !(d >> 24 & 1) || !(d >> 25 & 1)) return false;  // -BF16, -TILE, -INT8
  const long ARCH_GET_XCOMP_PERM = 0x1022, ARCH_REQ_XCOMP_PERM = 0x1023, XTILEDATA = 18;
  if (syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XTILEDATA) != 0) return false;
  unsigned long permitted = 0;
  if (syscall(SYS_arch_prctl, ARCH_GET_XCOMP_PERM, &permitted) != 0) return false;
  return permitted >> XTILEDATA & 1;
}

struct SlimAmxConfig {
  uint8_t palette, start_row, reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
};

// Every tile 16 rows x 64 bytes: sums 0-3, activations 4-5, weights 6-7. Per thread.
SLIM_TARGET_AMX static inline void slim_amx_configure(void) {
  SlimAmxConfig config;
  memset(&config, 0, sizeof config);
  config.palette = 1;
  for (int t = 0; t < 8; t++) {
    config.colsb[t] = 64;
    config.rows[t] = 16;
  }
  _tile_loadconfig(&config);
}

// The next 16 steps of a plain-layout pair of blocks (or a lone block), as two B tiles' rows 128
// bytes apart: where they lie when whole, else copied with zeros past the weight's steps.
struct SlimAmxPlainSteps {
  const uint16_t *w;  // the tile's first step
  bool pair;
  int64_t pairs, first = 0;

  void rewind() { first = 0; }

  const uint8_t *next(uint8_t *scratch) {
    const int64_t count = pairs - first < SLIM_AMX_STEPS ? pairs - first : SLIM_AMX_STEPS;
    const int64_t step = pair ? 64 : 32;  // elements per step
    const uint8_t *at = (const uint8_t *)(w + first * step);
    first += count;
    if (pair && count == SLIM_AMX_STEPS) return at;
    memset(scratch, 0, SLIM_AMX_STEPS * SLIM_AMX_STEP_BYTES);
    for (int64_t s = 0; s < count; s++)
      memcpy(scratch + s * SLIM_AMX_STEP_BYTES, at + s * step * 2, (size_t)step * 2);
    return scratch;
  }
};

// The next 16 steps of a coded tile (cpu_bf16_coded.h), unpacked into the buffer.
struct SlimAmxCodedSteps {
  const uint8_t *tile;
  int64_t pairs, first = 0;
  const uint8_t *chunk = nullptr;

  void rewind() {
    first = 0;
    chunk = tile;
  }

  SLIM_TARGET_BF16 const uint8_t *next(uint8_t *scratch) {
    const int64_t in_chunk = first % SLIM_CODED_CHUNK_STEPS, start = first - in_chunk;
    const int64_t chunk_steps = pairs - start < SLIM_CODED_CHUNK_STEPS ? pairs - start
                                                                       : SLIM_CODED_CHUNK_STEPS;
    const int64_t count = pairs - first < SLIM_AMX_STEPS ? pairs - first : SLIM_AMX_STEPS;
    const SlimCodedHeader *header = (const SlimCodedHeader *)chunk;
    const bool raw = header->raw;
    const int64_t step = raw ? 128 : 96;
    const __m512i table = slim_coded_table(header);
    const uint8_t *body = chunk + sizeof(SlimCodedHeader);
    for (int64_t s = 0; s < count; s++) {
      __m512bh b0, b1;
      slim_coded_blocks(body + (in_chunk + s) * step, raw, table, b0, b1);
      _mm512_storeu_si512(scratch + s * SLIM_AMX_STEP_BYTES, (__m512i)b0);
      _mm512_storeu_si512(scratch + s * SLIM_AMX_STEP_BYTES + 64, (__m512i)b1);
    }
    if (count < SLIM_AMX_STEPS)
      memset(scratch + count * SLIM_AMX_STEP_BYTES, 0,
             (size_t)((SLIM_AMX_STEPS - count) * SLIM_AMX_STEP_BYTES));
    first += count;
    if (first - start == chunk_steps) chunk = body + chunk_steps * step;
    return scratch;
  }
};

// sums fp32 [32 rows][32 channels] = 16 or 32 padded rows (x: bf16, `kq` apart) x the tile's
// weights, `groups` products of 16 steps each.
template <bool TWO_ROW_TILES, typename Steps>
SLIM_TARGET_AMX static void slim_amx_pass(const uint16_t *x, int64_t kq, int64_t groups,
                                          Steps &steps, uint8_t *scratch, float *sums) {
  _tile_zero(0);
  _tile_zero(1);
  if (TWO_ROW_TILES) {
    _tile_zero(2);
    _tile_zero(3);
  }
  steps.rewind();
  const int64_t x_bytes = kq * 2;
  for (int64_t g = 0; g < groups; g++) {
    const uint8_t *w = steps.next(scratch);
    _tile_loadd(6, w, SLIM_AMX_STEP_BYTES);
    _tile_loadd(7, w + 64, SLIM_AMX_STEP_BYTES);
    _tile_loadd(4, x + 2 * SLIM_AMX_STEPS * g, x_bytes);
    _tile_dpbf16ps(0, 4, 6);
    _tile_dpbf16ps(1, 4, 7);
    if (TWO_ROW_TILES) {
      _tile_loadd(5, x + SLIM_AMX_TILE_ROWS * kq + 2 * SLIM_AMX_STEPS * g, x_bytes);
      _tile_dpbf16ps(2, 5, 6);
      _tile_dpbf16ps(3, 5, 7);
    }
  }
  const int64_t row_bytes = SLIM_AMX_PASS_ROWS * 4;
  _tile_stored(0, sums, row_bytes);
  _tile_stored(1, sums + 16, row_bytes);
  if (TWO_ROW_TILES) {
    _tile_stored(2, sums + 16 * SLIM_AMX_PASS_ROWS, row_bytes);
    _tile_stored(3, sums + 16 * SLIM_AMX_PASS_ROWS + 16, row_bytes);
  }
}

// Tiles [begin, end) of the GEMM below on this thread: rows bf16 [mp][kq] (zero-padded).
template <typename StepsFor>
SLIM_TARGET_AMX static void slim_amx_tiles(const uint16_t *rows, int64_t m, int64_t kq,
                                           int64_t begin, int64_t end, int64_t tiles,
                                           bool lone_last, const uint16_t *bias, int64_t n,
                                           uint16_t *out, StepsFor &steps_for) {
  alignas(64) uint8_t scratch[SLIM_AMX_STEPS * SLIM_AMX_STEP_BYTES];
  alignas(64) float sums[SLIM_AMX_PASS_ROWS * 32];
  __m512 acc0[SLIM_AMX_PASS_ROWS], acc1[SLIM_AMX_PASS_ROWS];
  const int64_t groups = kq / (2 * SLIM_AMX_STEPS);
  slim_amx_configure();
  for (int64_t t = begin; t < end; t++) {
    auto steps = steps_for(t);
    const bool pair = !(lone_last && t == tiles - 1);
    for (int64_t r0 = 0; r0 < m; r0 += SLIM_AMX_PASS_ROWS) {
      const int64_t count = m - r0 < SLIM_AMX_PASS_ROWS ? m - r0 : SLIM_AMX_PASS_ROWS;
      if (count > SLIM_AMX_TILE_ROWS)
        slim_amx_pass<true>(rows + r0 * kq, kq, groups, steps, scratch, sums);
      else
        slim_amx_pass<false>(rows + r0 * kq, kq, groups, steps, scratch, sums);
      for (int64_t r = 0; r < count; r++) {
        acc0[r] = _mm512_load_ps(sums + r * 32);
        acc1[r] = _mm512_load_ps(sums + r * 32 + 16);
      }
      slim_bf16_store_tile(acc0, acc1, (int)count, pair, bias, 32 * t, n, out + r0 * n);
    }
  }
  _tile_release();
}

// out bf16 [M, N] = x bf16 [M, K] (rows `stride` apart) @ w.T + bias over `tiles` weight tiles of
// 32 channels (the last may be a lone 16-channel block: `lone_last`); steps_for(t) gives tile t's
// steps (SlimAmxPlainSteps or SlimAmxCodedSteps). Returns -1 when out of memory.
template <typename StepsFor>
static int slim_amx_gemm(const uint16_t *x, int64_t m, int64_t k, int64_t stride, int64_t tiles,
                         bool lone_last, const uint16_t *bias, int64_t n, uint16_t *out,
                         StepsFor steps_for) {
  const int64_t pairs = (k + 1) / 2, groups = (pairs + SLIM_AMX_STEPS - 1) / SLIM_AMX_STEPS;
  const int64_t kq = groups * 2 * SLIM_AMX_STEPS;
  const int64_t mp = (m + SLIM_AMX_TILE_ROWS - 1) / SLIM_AMX_TILE_ROWS * SLIM_AMX_TILE_ROWS;
  uint16_t *rows = slim_bf16_padded_rows(x, m, k, stride, kq, mp);
  if (rows == NULL) return -1;
  slim_parallel(tiles, [&](int64_t begin, int64_t end) {
    slim_amx_tiles(rows, m, kq, begin, end, tiles, lone_last, bias, n, out, steps_for);
  });
  free(rows);
  return 0;
}

#endif  // !SLIM_ISA_AVX2
