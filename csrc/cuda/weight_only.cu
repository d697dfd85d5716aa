// Weight-only W8A16 / W4A16 decode GEMV (NUMERICS.md s.4):
//   y[m, n] = sum_k x[m, k] * w[n, k] (+ bias[n]),  w[n, k] = T(float(q[n, k] - z[n, g]) * scale[n, g])
// with T the activation dtype (the dequantized weight is rounded to it, as the reference's
// `w.to(x.dtype)`), products and accumulation in fp32 (fp16 x fp16 / bf16 x bf16 products are
// exact in fp32, so fmaf here equals the reference's separate multiply and add), cast to T.
//
// One warp per output channel n, 4 warps per block; the warp streams its weight row once in
// 16-byte loads (16 int8 or 32 int4 values per lane per step) and applies each dequantized
// chunk to up to kMaxRows rows of x (blockIdx.y picks the 8-row slab), so for M <= 8 every
// weight byte is read once. Each lane keeps one fp32 partial sum per row, reduced across the
// warp at the end. The 16-byte path needs K to be a multiple of the chunk (16 / 32 values),
// 16-byte aligned pointers and (int4) G % 32 == 0; otherwise, and for the K tail, lanes go one
// k value at a time (correct, slower).
#include "qk_common.cuh"

namespace quantkernels {
namespace cuda {
namespace {

constexpr int kWarpsPerBlock = 4;
constexpr int kMaxRows = 8;

template <typename T, bool INT4>
__global__ void __launch_bounds__(kWarpsPerBlock * 32)
weight_only_gemv_kernel(const T* __restrict__ x, const uint8_t* __restrict__ w, const float* __restrict__ scale,
                        const uint8_t* __restrict__ zero, int64_t num_groups, const float* __restrict__ bias,
                        int64_t M, int64_t N, int64_t K, T* __restrict__ y, bool vec) {
  constexpr int KC = INT4 ? 32 : 16;                   // k values per 16-byte weight chunk
  constexpr int XV = KC * static_cast<int>(sizeof(T)) / 16;  // 16-byte x loads per chunk and row
  const int lane = threadIdx.x & 31;
  const int64_t n = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + (threadIdx.x >> 5);
  if (n >= N) return;  // whole warps only; no block-level synchronisation below
  const int64_t m0 = static_cast<int64_t>(blockIdx.y) * kMaxRows;
  const int rows = static_cast<int>(M - m0 < kMaxRows ? M - m0 : kMaxRows);
  const int64_t G = K / num_groups;
  const uint8_t* wrow = w + n * (INT4 ? K / 2 : K);
  const float* srow = scale + n * num_groups;
  const uint8_t* zrow = zero != nullptr ? zero + n * num_groups : nullptr;

  // Dequantized, activation-rounded weight of one int4/int8 code q (sign already applied).
  auto deq = [](int32_t q, float s) { return FloatIO<T>::round(__fmul_rn(static_cast<float>(q), s)); };
  auto nibble = [&](uint32_t v, int32_t z) -> int32_t {
    return zrow != nullptr ? static_cast<int32_t>(v) - z : static_cast<int32_t>((v ^ 8u)) - 8;
  };

  float acc[kMaxRows];
#pragma unroll
  for (int r = 0; r < kMaxRows; ++r) acc[r] = 0.0f;

  const int64_t nchunks = vec ? K / KC : 0;
  for (int64_t c = lane; c < nchunks; c += 32) {
    const int64_t k0 = c * KC;
    uint4 raw = __ldg(reinterpret_cast<const uint4*>(wrow + c * 16));
    const uint8_t* bytes = reinterpret_cast<const uint8_t*>(&raw);
    float wf[KC];
    if constexpr (INT4) {
      const int64_t g = k0 / G;  // G % 32 == 0: the chunk lies in one group
      const float s = srow[g];
      const int32_t z = zrow != nullptr ? zrow[g] : 0;
#pragma unroll
      for (int i = 0; i < 16; ++i) {
        wf[2 * i] = deq(nibble(bytes[i] & 0xFu, z), s);
        wf[2 * i + 1] = deq(nibble(bytes[i] >> 4, z), s);
      }
    } else {
      const float s = srow[0];
#pragma unroll
      for (int i = 0; i < 16; ++i) wf[i] = deq(static_cast<int8_t>(bytes[i]), s);
    }
#pragma unroll
    for (int r = 0; r < kMaxRows; ++r) {
      if (r < rows) {
        const uint4* xp = reinterpret_cast<const uint4*>(x + (m0 + r) * K + k0);
#pragma unroll
        for (int v = 0; v < XV; ++v) {
          uint4 xv = __ldg(xp + v);
          const T* xe = reinterpret_cast<const T*>(&xv);
          constexpr int PER = 16 / static_cast<int>(sizeof(T));
#pragma unroll
          for (int e = 0; e < PER; ++e) acc[r] = fmaf(to_float(xe[e]), wf[v * PER + e], acc[r]);
        }
      }
    }
  }
  // Tail (and the whole row when the 16-byte path is off): one k per lane.
  for (int64_t k = nchunks * KC + lane; k < K; k += 32) {
    float wk;
    if constexpr (INT4) {
      const int64_t g = k / G;
      const uint32_t byte = wrow[k / 2];
      wk = deq(nibble((k & 1) ? byte >> 4 : byte & 0xFu, zrow != nullptr ? zrow[g] : 0), srow[g]);
    } else {
      wk = deq(static_cast<int8_t>(wrow[k]), srow[0]);
    }
#pragma unroll
    for (int r = 0; r < kMaxRows; ++r)
      if (r < rows) acc[r] = fmaf(to_float(x[(m0 + r) * K + k]), wk, acc[r]);
  }
#pragma unroll
  for (int r = 0; r < kMaxRows; ++r) {
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) acc[r] += __shfl_xor_sync(0xffffffffu, acc[r], off);
  }
  if (lane == 0) {
#pragma unroll
    for (int r = 0; r < kMaxRows; ++r) {
      if (r < rows) {
        float v = acc[r];
        if (bias != nullptr) v = __fadd_rn(v, bias[n]);
        FloatIO<T>::store(y + (m0 + r) * N + n, v);
      }
    }
  }
}

bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

}  // namespace

cudaError_t weight_only_gemm(const void* x, DType xt, const void* w, bool int4, const float* scale_b,
                             const uint8_t* zero_b, int64_t num_groups, const float* bias, int64_t M, int64_t N,
                             int64_t K, void* y, cudaStream_t stream) {
  if (M <= 0 || N <= 0) return cudaSuccess;
  const int kc = int4 ? 32 : 16;
  const int64_t G = K / num_groups;
  const bool vec = K % kc == 0 && G % kc == 0 && aligned16(x) && aligned16(w);
  const dim3 grid(static_cast<unsigned>(ceil_div(N, kWarpsPerBlock)), static_cast<unsigned>(ceil_div(M, kMaxRows)));
  with_dtype(xt, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    const uint8_t* wb = static_cast<const uint8_t*>(w);
    if (int4) {
      weight_only_gemv_kernel<T, true><<<grid, kWarpsPerBlock * 32, 0, stream>>>(
          static_cast<const T*>(x), wb, scale_b, zero_b, num_groups, bias, M, N, K, static_cast<T*>(y), vec);
    } else {
      weight_only_gemv_kernel<T, false><<<grid, kWarpsPerBlock * 32, 0, stream>>>(
          static_cast<const T*>(x), wb, scale_b, nullptr, 1, bias, M, N, K, static_cast<T*>(y), vec);
    }
    return 0;
  });
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace quantkernels
