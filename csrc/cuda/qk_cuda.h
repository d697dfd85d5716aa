// Plain C++ launchers of the quantkernels CUDA kernels: raw pointers, sizes and a stream.
//
// No torch headers here or in any .cu file (ARCHITECTURE.md, "CUDA without a GPU in CI"):
// csrc/cuda_bindings.cpp validates tensors, makes them contiguous, picks the stream and calls
// these. Every launcher enqueues work on `stream` only (no host synchronisation, no
// allocation), so all of them can be captured in a CUDA graph, and returns the
// cudaGetLastError() of its launches (cudaSuccess when nothing went wrong).
//
// Layouts (all row-major, contiguous):
//   x  float [M, K] (fp32 / fp16 / bf16, see DType)        activations
//   a  int8  [M, K]                                         quantized activations
//   b  int8  [N, K]                                         weight, F.linear layout
//   bp uint8 [N, K/2]                                       PLAIN int4 weight: lo nibble = even k
//   scale_a fp32 [M], scale_b fp32 [N] or [N, K/G], zero_b uint8 [N, K/G]
//   bias fp32 [N] (the bindings widen fp16/bf16 bias to fp32: exact)
// Numerics: docs/numerics.md; each launcher's comment says which section.
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

namespace quantkernels {
namespace cuda {

// Element type of a floating-point tensor (activations, outputs).
enum class DType : int { F32 = 0, F16 = 1, BF16 = 2 };

// ---------------------------------------------------------------- quantization (quantize_int8.cu)

// docs/numerics.md s.1 per row of x [M, K]: q int8 [M, K], scale fp32 [M]. If `outliers` (uint8 [K],
// 0/1) is given, columns with outliers[k] != 0 count as 0 (s.5: X_in). Bit-exact with
// reference._absmax_quant, NaN/Inf rows included.
cudaError_t quantize_rowwise(const void* x, DType xt, int64_t M, int64_t K, const uint8_t* outliers,
                             int8_t* q, float* scale, cudaStream_t stream);

// outliers[k] = any_m |x[m, k]| >= threshold (uint8 0/1 [K]; NaN never counts), computed on the
// device with a memset and one kernel. threshold <= 0 (or M == 0) gives all zeros.
cudaError_t outlier_columns(const void* x, DType xt, int64_t M, int64_t K, double threshold, uint8_t* outliers,
                            cudaStream_t stream);

// ---------------------------------------------------------------- int8 GEMMs (int8_gemm.cu)

// C[m, n] = sum_k a[m, k] * b[n, k], exact int32 (K <= 131071, checked by the caller).
// If scale_a is null: writes int32 to `out`. Otherwise writes
//   out[m, n] = (float(C) * scale_a[m]) * scale_b[n] (+ bias[n])      (fp32, separate roundings)
// cast to out_t. Tensor-core path (mma.sync m16n8k32 s8, ldmatrix, cp.async pipeline) when
// K % 16 == 0 and a, b are 16-byte aligned; otherwise a simple SIMT kernel (same results).
cudaError_t int8_gemm(const int8_t* a, const int8_t* b, int64_t M, int64_t N, int64_t K, const float* scale_a,
                      const float* scale_b, const float* bias, void* out, DType out_t, cudaStream_t stream);

// The path int8_gemm takes for these arguments: 1 = tensor cores, 0 = SIMT fallback (tests, docs).
int int8_gemm_uses_tensor_cores(const int8_t* a, const int8_t* b, int64_t K);

// W4A8 (docs/numerics.md s.4): out[m, n] = scale_a[m] * sum_g scale_b[n, g] * C_g[m, n] (+ bias[n]),
// C_g = sum_{k in g} a[m, k] * (q[n, k] - zero[n, g]) exact in int32, fp32 across groups (in
// group order). q is signed when zero_b is null, unsigned otherwise. G = K / num_groups.
// Tensor cores (int4 unpacked to int8 in registers) when K % 32 == 0, G % 32 == 0 and pointers
// are 16-byte aligned; otherwise a SIMT kernel.
cudaError_t w4a8_gemm(const int8_t* a, const uint8_t* bp, int64_t M, int64_t N, int64_t K, int64_t num_groups,
                      const float* scale_a, const float* scale_b, const uint8_t* zero_b, const float* bias,
                      void* out, DType out_t, cudaStream_t stream);

// ---------------------------------------------------------------- LLM.int8 (llm_int8.cu)

// The outlier correction and epilogue of LLM.int8 (docs/numerics.md s.5), one launch:
//   out[m, n] = cast(acc[m, n] + sum_{j: outliers[j]} x[m, j] * (float(b[n, j]) * scale_b[n]) (+ bias[n]))
// acc fp32 [M, N] is the scaled int8 GEMM of the inliers (no bias); x [M, K] in xt; out [M, N]
// in xt (may alias acc when xt is F32). The outlier set is read from the device mask: no sync.
cudaError_t llm_int8_correct(const float* acc, const void* x, DType xt, const int8_t* b, const float* scale_b,
                             const uint8_t* outliers, const float* bias, int64_t M, int64_t N, int64_t K, void* out,
                             cudaStream_t stream);

// ---------------------------------------------------------------- weight-only (weight_only.cu)

// W8A16 / W4A16 (docs/numerics.md s.4): y[m, n] = sum_k x[m, k] * w[n, k] (+ bias[n]) in fp32, cast to xt,
// where w[n, k] = float(q[n, k] (- zero[n, g])) * scale[n, g], rounded to xt (the activation dtype).
// int8: b int8 [N, K], scale [N] (num_groups = 1). int4: bp uint8 [N, K/2] PLAIN, scale [N, G'],
// zero optional. Two kernels (weight_only.cu): a GEMV that streams each weight row once for up
// to 8 rows of x, and a tensor-core GEMM (mma.sync m16n8k16 f16/bf16, weights dequantized in
// registers, optional split-K).
//
// weight_only_splits: the path for these arguments. 0 = the GEMV (fp32 activations,
// M <= gemv_max_m (< 0: the default, 8), misaligned pointers, K % 32 != 0 for int4 /
// K % 16 != 0 for int8, int4 group size % 16 != 0);
// s >= 1 = the tensor-core kernel with the K dimension split s ways (sized from the current
// device's SM count). The caller passes s back to weight_only_gemm with, when s > 1, an fp32
// workspace of s * M * N elements (any contents; only this launch uses it).
int weight_only_splits(DType xt, bool int4, const void* x, const void* w, int64_t M, int64_t N, int64_t K,
                       int64_t num_groups, int gemv_max_m);

cudaError_t weight_only_gemm(const void* x, DType xt, const void* w, bool int4, const float* scale_b,
                             const uint8_t* zero_b, int64_t num_groups, const float* bias, int64_t M, int64_t N,
                             int64_t K, void* y, int splits, float* workspace, cudaStream_t stream);

// ---------------------------------------------------------------- NF4 / FP4 (weight_only.cu)

// gemm_4bit (docs/numerics.md s.11.6): y[m, n] = T(sum_k x[m, k] * W[n, k] (+ bias[n])), fp32 products and
// accumulation, W[n, k] = T(fp32(code[v] * absmax[(n*K + k) / blocksize])) with v the nibble of flat index
// n*K + k of `packed` (uint8 [N, K/2], the first value of each pair in the HIGH nibble), code the NF4 (nf4)
// or FP4 table of s.11.1, absmax fp32 [ceil(N*K / blocksize)] (decoded: see decode_absmax_4bit),
// blocksize a power of two in [32, 4096], K even. The W4A16 kernels with the code-table decode: the
// GEMV or the tensor-core kernel as weight_only_splits(xt, true, x, packed, M, N, K, 1, gemv_max_m) says,
// with the same workspace rule.
cudaError_t gemm_4bit(const void* x, DType xt, const uint8_t* packed, bool nf4, const float* absmax,
                      int64_t blocksize, const float* bias, int64_t M, int64_t N, int64_t K, void* y, int splits,
                      float* workspace, cudaStream_t stream);

// Double quantization (s.11.5): out[b] = fp32(fp32(DYN[q[b]] * nested[b / 256]) + *offset) for b < nb,
// two separately rounded operations; offset is a device pointer (no host synchronisation).
cudaError_t decode_absmax_4bit(const uint8_t* q, const float* nested, const float* offset, int64_t nb, float* out,
                               cudaStream_t stream);

}  // namespace cuda
}  // namespace quantkernels
