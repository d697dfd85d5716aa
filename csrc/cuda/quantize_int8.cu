// Per-token symmetric int8 quantization (docs/numerics.md s.1) and the LLM.int8 outlier mask (s.5).
//
// quantize_rowwise_kernel: one 256-thread block per row, two passes over the row (the second
// hits L1/L2): absmax in fp32, then q. Bit-exact with reference._absmax_quant:
//   absmax = max_k |x|, NaN if any element is NaN          (torch.amax propagates NaN; fmaxf
//                                                           drops it, so NaN is tracked aside)
//   absmax == 0: inv = 0, scale = 1; else inv = 127 / absmax, scale = absmax / 127
//                                                          (__fdiv_rn: IEEE division)
//   q = rne(clamp(x * inv, -127, 127)), 0 where x * inv is NaN
//     (clamping before rounding equals the reference's round-then-clamp since +-127 are
//      integers; an Inf row has inv = 0 and Inf * 0 = NaN -> 0, a NaN row inv = NaN -> 0)
// With an outlier mask, masked columns read as 0 (X_in).
#include "qk_common.cuh"

namespace quantkernels {
namespace cuda {
namespace {

constexpr int kQuantThreads = 256;

template <typename T>
__device__ __forceinline__ float load_masked(const T* row, const uint8_t* outliers, int64_t k) {
  if (outliers != nullptr && outliers[k] != 0) return 0.0f;
  return to_float(row[k]);
}

template <typename T>
__global__ void __launch_bounds__(kQuantThreads)
quantize_rowwise_kernel(const T* __restrict__ x, int64_t K, const uint8_t* __restrict__ outliers,
                        int8_t* __restrict__ q, float* __restrict__ scale) {
  QK_LAUNCH_BOUNDS(kQuantThreads);
  QK_SHARED(float, warp_max, [kQuantThreads / 32]);
  const int64_t row = blockIdx.x;
  const T* xr = x + row * K;
  int8_t* qr = q + row * K;

  float mx = 0.0f;
  int nan = 0;
  for (int64_t k = threadIdx.x; k < K; k += kQuantThreads) {
    const float a = fabsf(load_masked(xr, outliers, k));
    nan |= isnan(a) ? 1 : 0;
    mx = fmaxf(mx, a);
  }
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, off));
  if ((threadIdx.x & 31) == 0) warp_max[threadIdx.x >> 5] = mx;
  // __syncthreads_or also orders the warp_max writes before the reads below.
  nan = __syncthreads_or(nan);
  float absmax = warp_max[0];
#pragma unroll
  for (int w = 1; w < kQuantThreads / 32; ++w) absmax = fmaxf(absmax, warp_max[w]);
  if (nan) absmax = __int_as_float(0x7fc00000);  // quiet NaN

  const bool zero = absmax == 0.0f;  // false for NaN
  const float inv = zero ? 0.0f : __fdiv_rn(127.0f, absmax);
  if (threadIdx.x == 0) scale[row] = zero ? 1.0f : __fdiv_rn(absmax, 127.0f);

  for (int64_t k = threadIdx.x; k < K; k += kQuantThreads) {
    float p = __fmul_rn(load_masked(xr, outliers, k), inv);
    p = isnan(p) ? 0.0f : fminf(fmaxf(p, -127.0f), 127.0f);
    qr[k] = static_cast<int8_t>(__float2int_rn(p));
  }
}

// outliers[k] = 1 if any |x[m, k]| >= threshold over this block's rows (the buffer is zeroed
// first; several blocks may store the same 1: a benign race). Threads run along k (coalesced),
// blockIdx.y picks a slab of kOutlierRows rows.
constexpr int kOutlierThreads = 256;
constexpr int kOutlierRows = 64;

template <typename T>
__global__ void __launch_bounds__(kOutlierThreads)
outlier_columns_kernel(const T* __restrict__ x, int64_t M, int64_t K, float threshold, uint8_t* __restrict__ outliers) {
  QK_LAUNCH_BOUNDS(kOutlierThreads);
  const int64_t k = static_cast<int64_t>(blockIdx.x) * kOutlierThreads + threadIdx.x;
  if (k >= K) return;
  bool hit = false;
  for (int64_t m0 = static_cast<int64_t>(blockIdx.y) * kOutlierRows; m0 < M;
       m0 += static_cast<int64_t>(gridDim.y) * kOutlierRows) {
    const int64_t m1 = m0 + kOutlierRows < M ? m0 + kOutlierRows : M;
    for (int64_t m = m0; m < m1; ++m) hit |= fabsf(to_float(x[m * K + k])) >= threshold;  // NaN: false
  }
  if (hit) outliers[k] = 1;
}

}  // namespace

cudaError_t quantize_rowwise(const void* x, DType xt, int64_t M, int64_t K, const uint8_t* outliers, int8_t* q,
                             float* scale, cudaStream_t stream) {
  if (M <= 0) return cudaSuccess;
  with_dtype(xt, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    QK_LAUNCH(quantize_rowwise_kernel<T>, static_cast<unsigned>(M), kQuantThreads, 0, stream, static_cast<const T*>(x),
              K, outliers, q, scale);
    return 0;
  });
  return cudaGetLastError();
}

cudaError_t outlier_columns(const void* x, DType xt, int64_t M, int64_t K, double threshold, uint8_t* outliers,
                            cudaStream_t stream) {
  cudaError_t err = cudaMemsetAsync(outliers, 0, static_cast<size_t>(K), stream);
  // The reference tests `threshold > 0` on the Python float, then compares |x| >= float32(threshold).
  if (err != cudaSuccess || !(threshold > 0.0) || M <= 0 || K <= 0) return err;
  const int64_t slabs = ceil_div(M, kOutlierRows);
  const dim3 grid(static_cast<unsigned>(ceil_div(K, kOutlierThreads)),
                  static_cast<unsigned>(slabs < 65535 ? slabs : 65535));
  const float tf = static_cast<float>(threshold);
  with_dtype(xt, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    QK_LAUNCH(outlier_columns_kernel<T>, grid, kOutlierThreads, 0, stream, static_cast<const T*>(x), M, K, tf,
              outliers);
    return 0;
  });
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace quantkernels
