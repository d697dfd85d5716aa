// Decode-size (M <= kGemvInt8MaxM) int8 x int8 -> int32 products for int8_gemm / w8a8_gemm
// (gemm_driver calls it for small M, so every caller, LLM.int8 included, gets it). Same contract as
// gemm_driver (gemm_int8.h): exact int32 sums, c_out or the epilogue hooks.
#pragma once

#include <cstdint>

#include <ATen/core/Tensor.h>

#include "gemm_int8.h"

namespace quantkernels {
namespace cpu {

constexpr int64_t kGemvInt8MaxM = 4;  // = vnni::kMaxT (gemm_int8_vnni.h): the GEMV tile takes all rows of a

// C = a @ b^T over contiguous int8 a [M, K] (M <= kGemvInt8MaxM) and b [N, K], K <= 131071
// (checked by the caller). Each byte of b is read once for all M rows. If ep.fn and
// ep.block_fn are null the int32 result goes to c_out [M, N]; otherwise each finished
// [M, nb] block (m0 = 0) goes through the hook, as in gemm_driver. Reads QUANTKERNELS_CPU_ISA.
void gemv_int8(const at::Tensor& a, const at::Tensor& b, int64_t M, int64_t N, int64_t K, int32_t* c_out,
               const Epilogue& ep);

}  // namespace cpu
}  // namespace quantkernels
