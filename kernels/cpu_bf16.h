// bf16 <-> fp32 scalar conversions shared by slimserve's C++ CPU kernels.
#pragma once

#include <stdint.h>
#include <string.h>

static inline float slim_bf16_to_float(uint16_t v) {
  uint32_t bits = (uint32_t)v << 16;
  float f;
  memcpy(&f, &bits, sizeof f);
  return f;
}

// Round to nearest even, as torch does; NaN stays a (quiet) NaN.
static inline uint16_t slim_float_to_bf16(float f) {
  uint32_t bits;
  memcpy(&bits, &f, sizeof bits);
  if ((bits & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((bits >> 16) | 0x40);
  bits += 0x7fffu + ((bits >> 16) & 1u);
  return (uint16_t)(bits >> 16);
}

// f rounded to the nearest bf16 value, kept as a float (what an eager bf16 op stores).
static inline float slim_round_to_bf16(float f) {
  return slim_bf16_to_float(slim_float_to_bf16(f));
}
