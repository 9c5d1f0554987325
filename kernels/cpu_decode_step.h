// The plan of a whole decode step (cpu_decode_step.cpp); kernels/decode_step.py mirrors these
// structs in ctypes, field for field.
#pragma once

#include <stdint.h>

// Which of the kernels' own packed layouts a projection is, and so which GEMM reads it.
enum SlimProjectKind : int32_t {
  SLIM_PROJECT_F32_GEMM = 0,       // fp32 panels (slim_f32_gemm); aux: fp32 bias or NULL
  SLIM_PROJECT_W8A16_PANELS = 1,   // int8 panels, fp32 rows (slim_w8a16_panels_gemm); aux: scale
  SLIM_PROJECT_BF16_GEMM = 2,      // bf16 blocks (slim_bf16_gemm); aux: bf16 bias or NULL
  SLIM_PROJECT_W8A16_GEMM = 3,     // int8 blocks (slim_w8a16_gemm); aux: fp32 scale
  SLIM_PROJECT_W8A8_GEMM = 4,      // the same blocks, rows quantized (slim_w8a8_gemm); aux: scale
  SLIM_PROJECT_SPARSE24 = 5,       // 2:4 kept values (slim_sparse24_f32 / _bf16); aux: position codes
  SLIM_PROJECT_W4A16_GEMV = 6,     // 4-bit codes (slim_w4a16_gemv); aux: scales, zeros, group
  SLIM_PROJECT_F32_GEMM_BF16_WEIGHTS = 7,  // bf16 panels, fp32 rows (slim_f32_gemm_bf16)
  SLIM_PROJECT_SPARSE24_BF16_VALUES = 8,   // 2:4 values in bf16, fp32 rows; aux: position codes
  SLIM_PROJECT_BF16_CODED_GEMM = 9,        // coded bf16 (slim_bf16_coded_gemm); aux: bias or NULL
  SLIM_PROJECT_SPARSE24_CODED = 10,        // coded bf16 2:4 (slim_sparse24_bf16_coded); no aux
};

enum SlimStepDtype : int32_t { SLIM_STEP_F32 = 0, SLIM_STEP_BF16 = 1 };

struct SlimProjection {
  int32_t kind;   // SlimProjectKind
  int32_t dtype;  // the rows' SlimStepDtype (slim_w8a16_gemm reads either)
  const void *weight;
  const void *aux;
  const void *zeros;  // group-wise 4-bit zero points (the step's dtype), else NULL
  int64_t n, k;       // output and input features
  int64_t group;      // group-wise 4-bit: inputs per scale, else 0
};

struct SlimDecodeLayer {
  SlimProjection qkv, o, gate_up, down;
  const void *input_norm, *post_norm;  // RMSNorm weights [hidden], the step's dtype
  float input_eps, post_eps;
  void *k_cache, *v_cache;  // this layer's [slots, kv_heads, max_len, head_dim]
};

struct SlimDecodeModel {
  int64_t layers, hidden, heads, kv_heads, head_dim, max_len;
  float scaling;
  int32_t dtype;  // SlimStepDtype of every row, norm weight, table and cache
  const void *cos, *sin;  // rotary tables [max_len, head_dim]
  const void *final_norm;
  float final_eps;
  const SlimDecodeLayer *layer;  // [layers]
};
