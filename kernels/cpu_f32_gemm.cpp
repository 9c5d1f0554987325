// fp32 GEMM on x86-64 with AVX2 + FMA (built and loaded with the other sources by
// kernels/native.py; the avx512 build compiles it for AVX2 + FMA as well).
//
// Why: a decode step streams the weights, and oneDNN's prepacked fp32 matmul read them at ~9-11
// GB/s on one thread where the core reads ~22 (loadtests/decode_profile.py). At the avx2 level,
// where oneDNN's fp32 kernels are AVX2 code too, this kernel is every fp32 weight's only copy and
// serves every row count (as fast as oneDNN's from 32 to 128 rows, faster below); at the avx512
// level it serves the lm_head (49152 x 576, 113 MB in fp32, read whole every step) at 1-4 rows
// beside oneDNN's copy, whose AVX-512 register blocking wins from 8 rows (kernels/README.md). The weight is repacked once into panels of 24 output channels
// ([N/24][K][24] floats, the last panel padded with zeros), so each input k is one broadcast of
// x[m][k] times three 8-lane loads from one sequential stream, into 24 output lanes: no horizontal
// sums. A panel meets up to four activation rows per pass (12 accumulators); sums in fp32, in k
// order per channel. The panel layout replaced blocks of 8 channels read two at a time (two
// streams): 1.2-1.5x faster on the lm_head at 1-4 rows on one thread (kernels/README.md).

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "cpu_simd.h"
#include "cpu_threads.h"
#include "cpu_widen.h"

// Rows it serves beside oneDNN's AVX-512 copy (the lm_head at decode batch 1-4).
static const int64_t F32_GEMM_MAX_ROWS = 4;
static const int64_t F32_PANEL = 24;        // output channels per panel: three YMM
static const int64_t F32_ROW_GROUP = 4;     // activation rows per tile: 3 x 4 accumulators
static const int64_t F32_PREFETCH_BYTES = 16384;  // how far the loads run ahead of the FMAs

extern "C" int64_t slim_f32_gemm_max_rows(void) { return F32_GEMM_MAX_ROWS; }

extern "C" int64_t slim_f32_packed_elements(int64_t n, int64_t k) {
  return (n + F32_PANEL - 1) / F32_PANEL * F32_PANEL * k;
}

// w [N, K] row-major -> packed [N/24][K][24] (zeros past N), each value through `convert`: a
// panel's weights for one input are contiguous (96 bytes in fp32, 48 in bf16, 24 in int8), so a
// tile reads one sequential stream.
template <typename In, typename Out, typename Convert>
static void pack_panels(const In *w, int64_t n, int64_t k, Out *packed, Convert convert) {
  const int64_t panels = (n + F32_PANEL - 1) / F32_PANEL;
  for (int64_t p = 0; p < panels; p++)
    for (int64_t i = 0; i < k; i++)
      for (int64_t c = 0; c < F32_PANEL; c++) {
        const int64_t channel = p * F32_PANEL + c;
        packed[(p * k + i) * F32_PANEL + c] = convert(channel < n ? w[channel * k + i] : (In)0);
      }
}

extern "C" void slim_f32_pack(const float *w, int64_t n, int64_t k, float *packed) {
  pack_panels(w, n, k, packed, [](float v) { return v; });
}

// fp32 weights that are all bf16 values (low 16 bits zero: a bf16 checkpoint widened; the caller
// checks) in the same panels as their high halves, so a step reads half the bytes and the GEMM
// widens them back exactly in registers: the same products and sums as from `slim_f32_pack`.
extern "C" void slim_f32_pack_bf16(const float *w, int64_t n, int64_t k, uint16_t *packed) {
  pack_panels(w, n, k, packed, [](float v) {
    uint32_t bits;
    memcpy(&bits, &v, sizeof bits);
    return (uint16_t)(bits >> 16);
  });
}

// The int8 weights of a W8A16 layer in the same panels (int8, the same element count).
extern "C" void slim_w8a16_panels_pack(const int8_t *w, int64_t n, int64_t k, int8_t *packed) {
  pack_panels(w, n, k, packed, [](int8_t v) { return v; });
}

// Eight weights of one input as fp32: as stored, bf16 widened (cpu_widen.h), or int8 widened
// (exact: |w| <= 127).
SLIM_F32 static inline __m256 slim_widen8(const int8_t *w) {
  int64_t eight;
  memcpy(&eight, w, sizeof eight);
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_cvtsi64_si128(eight)));
}

// One row M of a tile: its input i broadcast, times the panel's three weight vectors.
#define F32_TILE_ROW(M)                                   \
  if constexpr (ROWS > M) {                               \
    const __m256 xv = _mm256_broadcast_ss(x##M + i);      \
    a0##M = _mm256_fmadd_ps(w0, xv, a0##M);               \
    a1##M = _mm256_fmadd_ps(w1, xv, a1##M);               \
    a2##M = _mm256_fmadd_ps(w2, xv, a2##M);               \
  }

// Panel `panel` (24 channels: three 8-lane vectors) against ROWS rows of x starting at row0;
// out = sums * scale (per channel, or none) + bias (or none). 3 x 4 accumulators, three weight
// vectors and a broadcast fill the 16 YMM registers. Named accumulators, not arrays: GCC kept an
// array on the stack and stored all twelve after every input, which held the kernel to half the
// FMA rate (cpu_pack.h says the same of the AVX-512 tiles).
template <int ROWS, typename T>
SLIM_F32 static void f32_tile(const float *x, int64_t stride, int64_t k, const T *packed,
                              int64_t panel, const float *scale, const float *bias, int64_t n,
                              float *out, int64_t row0) {
  __m256 a00 = _mm256_setzero_ps(), a01 = a00, a02 = a00, a03 = a00;
  __m256 a10 = a00, a11 = a00, a12 = a00, a13 = a00;
  __m256 a20 = a00, a21 = a00, a22 = a00, a23 = a00;
  const T *w = packed + panel * k * F32_PANEL;
  // Rows past ROWS are never read (F32_TILE_ROW skips them); row0 keeps their pointers valid.
  const float *x0 = x + row0 * stride;
  const float *x1 = x0 + (ROWS > 1 ? stride : 0), *x2 = x0 + (ROWS > 2 ? 2 * stride : 0);
  const float *x3 = x0 + (ROWS > 3 ? 3 * stride : 0);
  for (int64_t i = 0; i < k; i++) {
    const T *wi = w + i * F32_PANEL;
    _mm_prefetch((const char *)wi + F32_PREFETCH_BYTES, _MM_HINT_T0);
    if constexpr (sizeof(T) * F32_PANEL > 64)
      _mm_prefetch((const char *)wi + F32_PREFETCH_BYTES + 64, _MM_HINT_T0);
    const __m256 w0 = slim_widen8(wi), w1 = slim_widen8(wi + 8), w2 = slim_widen8(wi + 16);
    F32_TILE_ROW(0) F32_TILE_ROW(1) F32_TILE_ROW(2) F32_TILE_ROW(3)
  }
  const __m256 acc[3][4] = {{a00, a01, a02, a03}, {a10, a11, a12, a13}, {a20, a21, a22, a23}};
  for (int b = 0; b < 3; b++) {
    const int64_t first = panel * F32_PANEL + b * 8;
    for (int m = 0; m < ROWS; m++) {
      float lanes[8];
      _mm256_storeu_ps(lanes, acc[b][m]);
      for (int64_t c = 0; c < 8 && first + c < n; c++) {
        float v = lanes[c];
        if (scale != NULL) v *= scale[first + c];
        out[(row0 + m) * n + first + c] = v + (bias != NULL ? bias[first + c] : 0.0f);
      }
    }
  }
}
#undef F32_TILE_ROW

template <typename T>
using PanelTile = void (*)(const float *, int64_t, int64_t, const T *, int64_t, const float *,
                           const float *, int64_t, float *, int64_t);

// Every panel against every group of up to 4 rows; panels shared out across the kernels' threads
// (cpu_threads.h), each staying in cache while every row group meets it.
template <typename T>
SLIM_F32 static void panels_gemm(const float *x, int64_t m, int64_t k, int64_t stride,
                                 const T *packed, const float *scale, const float *bias,
                                 int64_t n, float *out) {
  static const PanelTile<T> tiles[F32_ROW_GROUP] = {f32_tile<1, T>, f32_tile<2, T>,
                                                    f32_tile<3, T>, f32_tile<4, T>};
  const int64_t panels = (n + F32_PANEL - 1) / F32_PANEL;
  slim_parallel(panels, [&](int64_t first, int64_t end) {
    for (int64_t panel = first; panel < end; panel++)
      for (int64_t row0 = 0; row0 < m; row0 += F32_ROW_GROUP) {
        const int64_t rows = m - row0 < F32_ROW_GROUP ? m - row0 : F32_ROW_GROUP;
        tiles[rows - 1](x, stride, k, packed, panel, scale, bias, n, out, row0);
      }
  });
}

// The entry points' shape check (-1 for arguments outside the kernel's limits), then the GEMM.
template <typename T>
SLIM_F32 static int checked_panels_gemm(const float *x, int64_t m, int64_t k, int64_t stride,
                                        const T *packed, const float *scale, const float *bias,
                                        int64_t n, float *out) {
  if (m < 1 || k < 1 || n < 1) return -1;
  panels_gemm(x, m, k, stride, packed, scale, bias, n, out);
  return 0;
}

// out fp32 [M, N] = x fp32 [M, K] (rows `stride` elements apart) @ w.T + bias (fp32 [N] or NULL),
// w packed by `slim_f32_pack`; any M. Returns -1 for arguments outside the kernel's limits
// (checked first in Python).
extern "C" SLIM_F32 int slim_f32_gemm(const float *x, int64_t m, int64_t k, int64_t stride,
                                      const float *packed, const float *bias, int64_t n,
                                      float *out) {
  return checked_panels_gemm(x, m, k, stride, packed, NULL, bias, n, out);
}

// The same with the weight packed by `slim_f32_pack_bf16`: bit-identical results.
extern "C" SLIM_F32 int slim_f32_gemm_bf16(const float *x, int64_t m, int64_t k, int64_t stride,
                                           const uint16_t *packed, const float *bias, int64_t n,
                                           float *out) {
  return checked_panels_gemm(x, m, k, stride, packed, NULL, bias, n, out);
}

// out fp32 [M, N] = (x fp32 [M, K] @ q.T) * scale (fp32 [N]): W8A16 with fp32 activations, q int8
// packed by `slim_w8a16_panels_pack`, each weight widened to fp32 in registers (fp32 products and
// sums, no activation rounding); any M.
extern "C" SLIM_F32 int slim_w8a16_panels_gemm(const float *x, int64_t m, int64_t k, int64_t stride,
                                               const int8_t *packed, const float *scale,
                                               int64_t n, float *out) {
  return checked_panels_gemm(x, m, k, stride, packed, scale, NULL, n, out);
}
