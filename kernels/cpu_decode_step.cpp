// A whole decode step of a Llama-family model in one native call (kernels/decode_step.py
// builds the plan from the engine's packed modules).
//
// Why: called one by one from Python, a step's ~150 kernel calls (4 projections, 2 norms,
// attention and SiLU per layer) each paid 3-8 us of interpreter, ctypes and tensor allocation,
// and the pool's second thread waited through every gap: in one call an int8 step at one
// sequence went from 8.5 to 5.9 ms at the avx2 level (kernels/README.md). Here the same kernels run
// in the same order on the same inputs, so the result is bit-identical to the per-call path; the
// intermediate rows live in one workspace the caller allocates once.
//
// Projections are the kernels' own packed layouts only (each module says which, decode_step.py);
// a model with any other projection keeps the per-call path.

#include <stdint.h>
#include <string.h>

#include "cpu_decode_step.h"

extern "C" {
int slim_f32_gemm(const float *x, int64_t m, int64_t k, int64_t stride, const float *packed,
                  const float *bias, int64_t n, float *out);
int slim_f32_gemm_bf16(const float *x, int64_t m, int64_t k, int64_t stride,
                       const uint16_t *packed, const float *bias, int64_t n, float *out);
int slim_w8a16_panels_gemm(const float *x, int64_t m, int64_t k, int64_t stride,
                           const int8_t *packed, const float *scale, int64_t n, float *out);
int slim_bf16_gemm(const uint16_t *x, int64_t m, int64_t k, int64_t stride,
                   const uint16_t *packed, const uint16_t *bias, int64_t n, uint16_t *out);
int slim_bf16_coded_gemm(const uint16_t *x, int64_t m, int64_t k, int64_t stride,
                         const uint8_t *packed, const uint16_t *bias, int64_t n, uint16_t *out);
int slim_w8a16_gemm(const void *x, int dtype, int64_t m, int64_t k, int64_t stride,
                    const uint8_t *packed, const float *wscale, int64_t n, void *out);
int slim_w8a8_gemm(const void *x, int dtype, int64_t m, int64_t k, int64_t stride,
                   const uint8_t *packed, const float *wscale, int64_t n, void *out);
int slim_sparse24_f32(const float *x, int64_t m, int64_t k, int64_t stride, const float *values,
                      const uint32_t *meta, int64_t n, float *out);
int slim_sparse24_f32_bf16(const float *x, int64_t m, int64_t k, int64_t stride,
                           const uint16_t *values, const uint32_t *meta, int64_t n, float *out);
int slim_sparse24_bf16(const uint16_t *x, int64_t m, int64_t k, int64_t stride,
                       const uint16_t *values, const uint64_t *meta, int64_t n, uint16_t *out);
int slim_sparse24_bf16_coded(const uint16_t *x, int64_t m, int64_t k, int64_t stride,
                             const uint8_t *packed, int64_t n, uint16_t *out);
int slim_w4a16_gemv(const void *x, int xdtype, int64_t m, int64_t k, const uint8_t *w,
                    const void *scales, const void *zeros, int sdtype, int64_t group, int64_t n,
                    void *out);
void slim_add_rms_norm_f32(float *x, const float *delta, const float *weight, int64_t rows,
                           int64_t n, float eps, float *out);
void slim_add_rms_norm_bf16(uint16_t *x, const uint16_t *delta, const uint16_t *weight,
                            int64_t rows, int64_t n, float eps, uint16_t *out);
void slim_silu_mul_f32(const float *gate_up, int64_t rows, int64_t n, float *out);
void slim_silu_mul_bf16(const uint16_t *gate_up, int64_t rows, int64_t n, uint16_t *out);
int slim_decode_attention_f32(const float *qkv, int64_t qkv_stride, const float *cos_table,
                              const float *sin_table, float *k_cache, float *v_cache,
                              int64_t max_len, const int64_t *positions, int64_t batch,
                              int64_t heads, int64_t kv_heads, int64_t head_dim, float scaling,
                              float *out);
int slim_decode_attention_bf16(const uint16_t *qkv, int64_t qkv_stride,
                               const uint16_t *cos_table, const uint16_t *sin_table,
                               uint16_t *k_cache, uint16_t *v_cache, int64_t max_len,
                               const int64_t *positions, int64_t batch, int64_t heads,
                               int64_t kv_heads, int64_t head_dim, float scaling, uint16_t *out);
}

namespace {

// x [m, p.k] (rows p.k apart) @ the projection -> out [m, p.n], in the step's dtype.
int project(const SlimProjection &p, const void *x, int64_t m, void *out) {
  switch (p.kind) {
    case SLIM_PROJECT_F32_GEMM:
      return slim_f32_gemm((const float *)x, m, p.k, p.k, (const float *)p.weight,
                           (const float *)p.aux, p.n, (float *)out);
    case SLIM_PROJECT_F32_GEMM_BF16_WEIGHTS:
      return slim_f32_gemm_bf16((const float *)x, m, p.k, p.k, (const uint16_t *)p.weight,
                                (const float *)p.aux, p.n, (float *)out);
    case SLIM_PROJECT_W8A16_PANELS:
      return slim_w8a16_panels_gemm((const float *)x, m, p.k, p.k, (const int8_t *)p.weight,
                                    (const float *)p.aux, p.n, (float *)out);
    case SLIM_PROJECT_BF16_GEMM:
      return slim_bf16_gemm((const uint16_t *)x, m, p.k, p.k, (const uint16_t *)p.weight,
                            (const uint16_t *)p.aux, p.n, (uint16_t *)out);
    case SLIM_PROJECT_BF16_CODED_GEMM:
      return slim_bf16_coded_gemm((const uint16_t *)x, m, p.k, p.k, (const uint8_t *)p.weight,
                                  (const uint16_t *)p.aux, p.n, (uint16_t *)out);
    case SLIM_PROJECT_W8A16_GEMM:
      return slim_w8a16_gemm(x, p.dtype, m, p.k, p.k, (const uint8_t *)p.weight,
                             (const float *)p.aux, p.n, out);
    case SLIM_PROJECT_W8A8_GEMM:
      return slim_w8a8_gemm(x, p.dtype, m, p.k, p.k, (const uint8_t *)p.weight,
                            (const float *)p.aux, p.n, out);
    case SLIM_PROJECT_SPARSE24:
      if (p.dtype == SLIM_STEP_BF16)
        return slim_sparse24_bf16((const uint16_t *)x, m, p.k, p.k, (const uint16_t *)p.weight,
                                  (const uint64_t *)p.aux, p.n, (uint16_t *)out);
      return slim_sparse24_f32((const float *)x, m, p.k, p.k, (const float *)p.weight,
                               (const uint32_t *)p.aux, p.n, (float *)out);
    case SLIM_PROJECT_SPARSE24_BF16_VALUES:
      return slim_sparse24_f32_bf16((const float *)x, m, p.k, p.k, (const uint16_t *)p.weight,
                                    (const uint32_t *)p.aux, p.n, (float *)out);
    case SLIM_PROJECT_SPARSE24_CODED:
      return slim_sparse24_bf16_coded((const uint16_t *)x, m, p.k, p.k, (const uint8_t *)p.weight,
                                      p.n, (uint16_t *)out);
    case SLIM_PROJECT_W4A16_GEMV:  // scales and zeros in the rows' dtype
      return slim_w4a16_gemv(x, p.dtype, m, p.k, (const uint8_t *)p.weight, p.aux, p.zeros,
                             p.dtype, p.group, p.n, out);
    default:
      return -1;
  }
}

void add_rms_norm(int32_t dtype, void *x, const void *delta, const void *weight, int64_t rows,
                  int64_t n, float eps, void *out) {
  if (dtype == SLIM_STEP_BF16)
    slim_add_rms_norm_bf16((uint16_t *)x, (const uint16_t *)delta, (const uint16_t *)weight,
                           rows, n, eps, (uint16_t *)out);
  else
    slim_add_rms_norm_f32((float *)x, (const float *)delta, (const float *)weight, rows, n,
                          eps, (float *)out);
}

void silu_mul(int32_t dtype, const void *gate_up, int64_t rows, int64_t n, void *out) {
  if (dtype == SLIM_STEP_BF16)
    slim_silu_mul_bf16((const uint16_t *)gate_up, rows, n, (uint16_t *)out);
  else
    slim_silu_mul_f32((const float *)gate_up, rows, n, (float *)out);
}

int attend(const SlimDecodeModel &model, const SlimDecodeLayer &layer, const void *qkv,
           const int64_t *positions, int64_t batch, void *out) {
  const int64_t stride = layer.qkv.n;
  if (model.dtype == SLIM_STEP_BF16)
    return slim_decode_attention_bf16(
        (const uint16_t *)qkv, stride, (const uint16_t *)model.cos, (const uint16_t *)model.sin,
        (uint16_t *)layer.k_cache, (uint16_t *)layer.v_cache, model.max_len, positions, batch,
        model.heads, model.kv_heads, model.head_dim, model.scaling, (uint16_t *)out);
  return slim_decode_attention_f32(
      (const float *)qkv, stride, (const float *)model.cos, (const float *)model.sin,
      (float *)layer.k_cache, (float *)layer.v_cache, model.max_len, positions, batch,
      model.heads, model.kv_heads, model.head_dim, model.scaling, (float *)out);
}

// The step's intermediate rows, carved from one workspace.
struct Rows {
  char *h, *qkv, *attn, *delta, *gate_up, *act;
};

int64_t aligned(int64_t bytes) { return (bytes + 63) & ~(int64_t)63; }

// Lays `batch` rows of each part out from `base` (64-byte aligned parts, in Rows' order) into
// `rows`; returns the bytes they take.
int64_t lay_out(const SlimDecodeModel &model, int64_t batch, uintptr_t base, Rows &rows) {
  const SlimDecodeLayer &first = model.layer[0];
  const int64_t item = model.dtype == SLIM_STEP_BF16 ? 2 : 4;
  uintptr_t at = base;
  auto take = [&](int64_t width) {
    char *part = (char *)at;
    at += aligned(batch * width * item);
    return part;
  };
  rows.h = take(model.hidden);
  rows.qkv = take(first.qkv.n);
  rows.attn = take(model.heads * model.head_dim);
  rows.delta = take(model.hidden);
  rows.gate_up = take(first.gate_up.n);
  rows.act = take(first.down.k);
  return (int64_t)(at - base);
}

}  // namespace

extern "C" int64_t slim_decode_step_workspace_bytes(const SlimDecodeModel *model, int64_t batch) {
  Rows unused;
  return 64 + lay_out(*model, batch, 0, unused);  // 64: room to align the start
}

// Every layer, then the final norm, for `batch` decoding sequences (slots 0..batch-1, their new
// tokens at positions[b]): x [batch, hidden] holds the embedded tokens and is the residual
// (updated in place); out [batch, hidden] gets the final-normed rows the lm_head reads.
// Returns 0, or the failing kernel's status (nothing is rolled back: the caller drops the step).
extern "C" int slim_decode_step(const SlimDecodeModel *model, void *x, int64_t batch,
                                const int64_t *positions, void *workspace, void *out) {
  if (batch < 1 || model->layers < 1) return -1;
  Rows rows;
  lay_out(*model, batch, ((uintptr_t)workspace + 63) & ~(uintptr_t)63, rows);
  const int32_t dtype = model->dtype;
  const void *delta = NULL;  // what the last layer adds to the residual, added by the next norm
  for (int64_t l = 0; l < model->layers; l++) {
    const SlimDecodeLayer &layer = model->layer[l];
    int status;
    add_rms_norm(dtype, x, delta, layer.input_norm, batch, model->hidden, layer.input_eps,
                 rows.h);
    if ((status = project(layer.qkv, rows.h, batch, rows.qkv)) != 0) return status;
    if ((status = attend(*model, layer, rows.qkv, positions, batch, rows.attn)) != 0)
      return status;
    if ((status = project(layer.o, rows.attn, batch, rows.delta)) != 0) return status;
    add_rms_norm(dtype, x, rows.delta, layer.post_norm, batch, model->hidden, layer.post_eps,
                 rows.h);
    if ((status = project(layer.gate_up, rows.h, batch, rows.gate_up)) != 0) return status;
    silu_mul(dtype, rows.gate_up, batch, layer.down.k, rows.act);
    if ((status = project(layer.down, rows.act, batch, rows.delta)) != 0) return status;
    delta = rows.delta;
  }
  add_rms_norm(dtype, x, delta, model->final_norm, batch, model->hidden, model->final_eps, out);
  return 0;
}
