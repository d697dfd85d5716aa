// The int8 x int8 -> int32 GEMM core of gemm_int8.cpp (exact; VNNI zmm / ymm, AVX2, portable;
// blocked, at::parallel_for), exposed for other CPU kernels (LLM.int8()) that need its result with
// their own fused epilogue.
#pragma once

#include <cstdint>

#include <ATen/core/Tensor.h>

#include "cpu_isa.h"

namespace quantkernels {
namespace cpu {

// Called once per finished [mb, nb] block of int32 sums C (row stride ldc), with
// sa = ep.sa + m0, sb = ep.sb + n0, bias = ep.bias + n0 (or nullptr) and
// Y = ep.y + (m0 * N + n0) * ep.elem_size, ldy = N. Runs inside at::parallel_for.
using EpilogueFn = void (*)(const int32_t* C, int64_t ldc, int64_t mb, int64_t nb, const float* sa,
                            const float* sb, const float* bias, void* Y, int64_t ldy);

// Alternative hook with the block position and a caller context: called as
// block_fn(ctx, C, ldc, m0, mb, n0, nb) instead of fn when set (runs inside at::parallel_for).
using BlockFn = void (*)(const void* ctx, const int32_t* C, int64_t ldc, int64_t m0, int64_t mb, int64_t n0,
                         int64_t nb);

struct Epilogue {
  EpilogueFn fn = nullptr;   // nullptr (and no block_fn): write int32 straight into the output (int8_gemm)
  BlockFn block_fn = nullptr;
  const void* ctx = nullptr;
  const float* sa = nullptr;
  const float* sb = nullptr;
  const float* bias = nullptr;
  char* y = nullptr;         // output base
  int64_t elem_size = 0;
};

// C = a @ b^T over contiguous int8 a [M, K] and b [N, K], K <= 131071 (checked by the caller).
// M <= 4 goes to gemv_int8 (gemv_int8.h: one pass over b); larger M to the blocked GEMM.
// If ep.fn is null the int32 result goes to c_out [M, N]; otherwise each finished block goes
// through ep.fn. Reads QUANTKERNELS_CPU_ISA (cpu_isa.h) on the calling thread.
// out[m] = sum_k a[m, k] over contiguous int8 a [M, K] (exact int32; at::parallel_for). The VNNI
// paths start every int32 sum from -128 * out[m] (their weights are offset by +128 in-register).
void int8_row_sums(const int8_t* a, int64_t M, int64_t K, int32_t* out);

void gemm_driver(const at::Tensor& a, const at::Tensor& b, int64_t M, int64_t N, int64_t K, int32_t* c_out,
                 const Epilogue& ep);

// The W8A8 epilogue for output dtype `out` (float, half or bfloat16) at ISA level `isa`:
// Y = cast(((C * sa[m]) * sb[n]) (+ bias[n])), mul and add rounded separately, the cast rounding
// half to even (qk_store.h); zmm / ymm / scalar by level, the same bits at every level.
EpilogueFn w8a8_epilogue(at::ScalarType out, Isa isa);

}  // namespace cpu
}  // namespace quantkernels
