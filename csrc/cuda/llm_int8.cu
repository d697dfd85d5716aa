// LLM.int8 outlier correction + epilogue (docs/numerics.md s.5), one launch, no host synchronisation:
//   out[m, n] = T(acc[m, n] + sum_{j in O} x[m, j] * (float(b[n, j]) * scale_b[n]) (+ bias[n]))
// acc = (Xq @ Wq^T) * sx * sw from the int8 GEMM (fp32, no bias); O = {j : outliers[j] != 0}.
//
// The outlier set never leaves the device: each block walks the mask in chunks of kChunk
// columns, compacts the chunk's outlier indices into shared memory (warp ballots), gathers
// those columns of its x rows (fp32) and b rows (int8) into shared memory, and accumulates.
// A chunk without outliers costs one pass over kChunk mask bytes, so with no outliers the
// kernel is just the epilogue. The sum runs in increasing j (the reference's matmul order is
// unspecified; docs/numerics.md s.6 tolerances apply). CUDA-graph safe: fixed grid, no allocation.
#include "qk_common.cuh"

namespace quantkernels {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kTileM = 32;                         // rows per block
constexpr int kTileN = 64;                         // columns per block (one per thread % 64)
constexpr int kRowsPerThread = kTileM / (kThreads / kTileN);  // 8
constexpr int kChunk = 128;                        // mask columns compacted per step

template <typename T>
__global__ void __launch_bounds__(kThreads)
llm_int8_correct_kernel(const float* acc, const T* __restrict__ x, const int8_t* __restrict__ b,
                        const float* __restrict__ scale_b, const uint8_t* __restrict__ outliers,
                        const float* __restrict__ bias, int64_t M, int64_t N, int64_t K, T* out) {
  QK_LAUNCH_BOUNDS(kThreads);
  QK_SHARED(int, idx, [kChunk]);
  QK_SHARED(int, warp_count, [kChunk / 32]);
  QK_SHARED(float, xs, [kTileM][kChunk]);  // x[m0 + r, idx[j]]
  QK_SHARED(int8_t, ws, [kChunk][kTileN]); // b[n0 + c, idx[j]] (j-major: a warp reads 32 consecutive bytes)

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int tn = tid % kTileN, tm = tid / kTileN;  // tm is uniform within a warp
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * kTileM;
  const int64_t n0 = static_cast<int64_t>(blockIdx.y) * kTileN;
  const int64_t n = n0 + tn;
  const float sw = n < N ? scale_b[n] : 0.0f;

  float sum[kRowsPerThread];
#pragma unroll
  for (int r = 0; r < kRowsPerThread; ++r) sum[r] = 0.0f;

  for (int64_t c0 = 0; c0 < K; c0 += kChunk) {
    // 1. compact this chunk's outlier columns into idx[0, count)
    bool flag = false;
    unsigned ballot = 0;
    if (tid < kChunk) {
      const int64_t k = c0 + tid;
      flag = k < K && outliers[k] != 0;
      ballot = __ballot_sync(0xffffffffu, flag);
      if (lane == 0) warp_count[warp] = __popc(ballot);
    }
    __syncthreads();
    int count = 0, offset = 0;
#pragma unroll
    for (int w = 0; w < kChunk / 32; ++w) {
      offset += w < warp ? warp_count[w] : 0;
      count += warp_count[w];
    }
    if (flag) idx[offset + __popc(ballot & ((1u << lane) - 1u))] = static_cast<int>(c0 + tid);
    __syncthreads();
    if (count == 0) continue;  // block-uniform: every thread read the same counts

    // 2. gather the outlier columns of this block's x rows and b rows
    for (int e = tid; e < kTileM * count; e += kThreads) {
      const int r = e / count, j = e % count;
      const int64_t m = m0 + r;
      xs[r][j] = m < M ? to_float(x[m * K + idx[j]]) : 0.0f;
    }
    for (int e = tid; e < kTileN * count; e += kThreads) {
      const int j = e / kTileN, c = e % kTileN;
      ws[j][c] = n0 + c < N ? b[(n0 + c) * K + idx[j]] : int8_t(0);
    }
    __syncthreads();

    // 3. sum_j x[m, j] * (float(b[n, j]) * sw), fp32, separate roundings
    for (int j = 0; j < count; ++j) {
      const float wd = __fmul_rn(static_cast<float>(ws[j][tn]), sw);
#pragma unroll
      for (int r = 0; r < kRowsPerThread; ++r)
        sum[r] = __fadd_rn(sum[r], __fmul_rn(xs[tm * kRowsPerThread + r][j], wd));
    }
    __syncthreads();  // xs / ws / idx are rewritten by the next chunk
  }

  if (n >= N) return;
#pragma unroll
  for (int r = 0; r < kRowsPerThread; ++r) {
    const int64_t m = m0 + tm * kRowsPerThread + r;
    if (m < M) {
      float v = __fadd_rn(acc[m * N + n], sum[r]);
      if (bias != nullptr) v = __fadd_rn(v, bias[n]);
      FloatIO<T>::store(out + m * N + n, v);  // out may alias acc (fp32): same element, same thread
    }
  }
}

}  // namespace

cudaError_t llm_int8_correct(const float* acc, const void* x, DType xt, const int8_t* b, const float* scale_b,
                             const uint8_t* outliers, const float* bias, int64_t M, int64_t N, int64_t K, void* out,
                             cudaStream_t stream) {
  if (M <= 0 || N <= 0) return cudaSuccess;
  const dim3 grid(static_cast<unsigned>(ceil_div(M, kTileM)), static_cast<unsigned>(ceil_div(N, kTileN)));
  with_dtype(xt, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    QK_LAUNCH(llm_int8_correct_kernel<T>, grid, kThreads, 0, stream, acc, static_cast<const T*>(x), b, scale_b,
              outliers, bias, M, N, K, static_cast<T*>(out));
    return 0;
  });
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace quantkernels
