// The per-row symmetric int8 quantizer of quantize_int8.cpp (docs/numerics.md section 1), exposed
// so that other CPU kernels (the LLM.int8() outlier quantizer) reuse the exact same rounding,
// NaN/Inf and all-zero-row rules instead of duplicating them.
#pragma once

#include <cstdint>

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "cpu_isa.h"

namespace quantkernels {
namespace cpu {

// max_k |x[k]| of one fp32 row, NaN if any element is NaN (torch.amax propagates NaN).
float row_absmax(const float* x, int64_t K, Isa isa);

// q[k] = clamp(rne(x[k] * inv), -127, 127) (0 where x[k] * inv is NaN) with inv = 127 / absmax,
// or inv = 0 for absmax == 0; returns the row's scale (absmax / 127, or 1 for absmax == 0).
// Bit-exact with reference._absmax_quant.
float quantize_row(const float* x, int64_t K, float absmax, Isa isa, int8_t* q);

// fp16 / bf16 / fp32 -> fp32, exact.
template <typename T>
inline void widen_row(const T* src, int64_t K, float* dst) {
  for (int64_t k = 0; k < K; ++k) {
    dst[k] = static_cast<float>(src[k]);
  }
}

inline void widen_row_isa(const float* src, int64_t K, float* dst, Isa) { widen_row(src, K, dst); }
// The same with zmm where isa has AVX-512 (quantize_int8.cpp).
void widen_row_isa(const c10::Half* src, int64_t K, float* dst, Isa isa);
void widen_row_isa(const c10::BFloat16* src, int64_t K, float* dst, Isa isa);

}  // namespace cpu
}  // namespace quantkernels
