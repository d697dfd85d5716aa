// int8 tensor-core GEMMs: int8_gemm / w8a8_gemm (and the inlier GEMM of LLM.int8), and W4A8.
//
//   C[m, n] = sum_k a[m, k] * b[n, k]           a int8 [M, K], b int8 [N, K] (both K-contiguous)
//
// Tensor-core path (sm_80+): mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32. b [N, K] row-major is
// exactly the "col" (K x N column-major) B operand, so both tiles are copied as-is.
//   - CTA tile BM x BN x 64 (BK = 64 bytes = two k32 MMA steps), warps WARPS_M x WARPS_N, each
//     warp owns a (BM / WARPS_M) x (BN / WARPS_N) tile of int32 accumulators in registers.
//   - global -> shared: cp.async.cg 16-byte chunks, STAGES-deep ring (STAGES - 1 tiles in flight),
//     zero-filled (src-size 0) outside M / N / K, so tails need no other predication in the
//     main loop. Requires K % 16 == 0 and 16-byte aligned a, b (else: the SIMT kernel below).
//   - shared -> registers: ldmatrix.x4 (A: one 16x32 fragment; B: two 8x32 fragments). Rows are
//     64 bytes, 4 chunks of 16 bytes; chunk c of row r is stored at c ^ ((r >> 1) & 3), so the 8
//     rows an ldmatrix phase reads fall into 8 different 16-byte bank groups (no conflicts).
//   - epilogue straight from the accumulator fragments: int32, or
//     ((float(C) * scale_a[m]) * scale_b[n]) + bias[n] with separate fp32 roundings (the
//     reference's order), cast to fp32/fp16/bf16.
// Tile configs by M: M <= 16: 16 x 64 (4 warps), M <= 64: 64 x 128 (4 warps; 64 x 64 for W4A8),
// else 128 x 128 (8 warps). No split-K: small-M calls with small N use few SMs (future work).
//
// W4A8 (same kernel, INT4 = true): b is PLAIN packed int4 uint8 [N, K/2]. The B tile is copied
// packed (32 bytes per row per stage) and each thread expands its fragment's nibbles to int8 in
// registers: signed nibbles are sign-extended, unsigned ones get the group's zero point
// subtracted (q - z in [-15, 15] fits int8), so one MMA gives sum a * (q - z) exactly. The int32
// accumulators are flushed into fp32 ones (acc_f += float(acc) * scale_b[n, g]) at every group
// end (G % 32 == 0, so a k32 step never straddles groups); fp32 across groups (docs/numerics.md s.4).
#include "qk_common.cuh"

namespace quantkernels {
namespace cuda {
namespace {

constexpr int BK = 64;  // bytes (int8 k values) per stage along K

// ------------------------------------------------------------------ PTX wrappers

// smem_addr / cp_async_16 / cp_async_commit / cp_async_wait: qk_common.cuh.

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], uint32_t addr) {
#ifdef QK_CUDA_EMU
  ::qk_emu::ldmatrix_x4(r, addr);
#else
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
#endif
}

// c += a (16x32 s8, row) * b (32x8 s8, col), int32 accumulate.
__device__ __forceinline__ void mma_s8(int32_t (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
#ifdef QK_CUDA_EMU
  ::qk_emu::mma_m16n8k32_s8(c, a, b0, b1);
#else
  asm volatile(
      "mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+r"(c[0]), "+r"(c[1]), "+r"(c[2]), "+r"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#endif
}

// Byte offset of 16-byte chunk `ch` (0..3) of row `r` in a 64-byte-row tile (see the header).
__device__ __forceinline__ int swz64(int r, int ch) { return r * BK + ((ch ^ ((r >> 1) & 3)) << 4); }
// The same for the packed int4 B tile (32-byte rows, 2 chunks): rows r and r + 4 differ.
__device__ __forceinline__ int swz32(int r, int ch) { return r * (BK / 2) + ((ch ^ ((r >> 2) & 1)) << 4); }

// 4 nibbles (k order, lo nibble first) -> 4 int8 (k order, byte 0 first).
__device__ __forceinline__ uint32_t expand_nibbles(uint32_t x) {
  return (x & 0xFu) | ((x & 0xF0u) << 4) | ((x & 0xF00u) << 8) | ((x & 0xF000u) << 12);
}
// signed: sign-extend each 4-bit value ((v ^ 8) - 8 per byte); unsigned: v - zero per byte.
__device__ __forceinline__ uint32_t nibbles_to_s8(uint32_t x, bool is_signed, uint32_t zero4) {
  const uint32_t v = expand_nibbles(x);
  return is_signed ? __vsub4(v ^ 0x08080808u, 0x08080808u) : __vsub4(v, zero4);
}

// ------------------------------------------------------------------ epilogue

template <typename OutT>
struct Epilogue {
  const float* scale_a;  // null for the int32 output (int8_gemm)
  const float* scale_b;
  const float* bias;     // may be null
  OutT* out;
  int64_t N;

  __device__ __forceinline__ void store_float(int64_t m, int64_t n, float v) const {
    if (bias != nullptr) v = __fadd_rn(v, bias[n]);
    FloatIO<OutT>::store(out + m * N + n, v);
  }
  // int8 GEMM: C -> out.
  __device__ __forceinline__ void store(int64_t m, int64_t n, int32_t c) const {
    if constexpr (std::is_same<OutT, int32_t>::value) {
      out[m * N + n] = c;
    } else {
      store_float(m, n, __fmul_rn(__fmul_rn(__int2float_rn(c), scale_a[m]), scale_b[n]));
    }
  }
  // W4A8: acc = sum_g scale_b[n, g] * C_g (fp32) -> acc * scale_a[m] (+ bias) -> out.
  __device__ __forceinline__ void store_grouped(int64_t m, int64_t n, float acc) const {
    if constexpr (!std::is_same<OutT, int32_t>::value) store_float(m, n, __fmul_rn(acc, scale_a[m]));
  }
};

// ------------------------------------------------------------------ tensor-core kernel

struct Int4Args {
  const float* scale_b;  // [N, num_groups]
  const uint8_t* zero_b; // [N, num_groups] or null (signed nibbles)
  int64_t num_groups;
  int64_t group_size;    // multiple of 32
};

template <int BM, int BN, int WARPS_M, int WARPS_N, int STAGES, bool INT4>
struct TileCfg {
  static constexpr int kThreads = WARPS_M * WARPS_N * 32;
  static constexpr int kWarpM = BM / WARPS_M;
  static constexpr int kWarpN = BN / WARPS_N;
  static constexpr int kMT = kWarpM / 16;  // m16 tiles per warp
  static constexpr int kNT = kWarpN / 8;   // n8 tiles per warp
  static constexpr int kBRowBytes = INT4 ? BK / 2 : BK;
  static constexpr int kStageA = BM * BK;
  static constexpr int kStageB = BN * kBRowBytes;
  static constexpr int kSmem = STAGES * (kStageA + kStageB);
  static_assert(kWarpM % 16 == 0 && kWarpN % 16 == 0, "warp tile must be a multiple of 16 x 16");
  static_assert(STAGES >= 2, "at least double buffering");
};

template <int BM, int BN, int WARPS_M, int WARPS_N, int STAGES, bool INT4, typename OutT>
__global__ void __launch_bounds__(WARPS_M * WARPS_N * 32)
imma_gemm_kernel(const int8_t* __restrict__ a, const uint8_t* __restrict__ b, int64_t M, int64_t N, int64_t K,
                 Epilogue<OutT> ep, Int4Args i4) {
  QK_LAUNCH_BOUNDS(WARPS_M * WARPS_N * 32);
  using Cfg = TileCfg<BM, BN, WARPS_M, WARPS_N, STAGES, INT4>;
  constexpr int MT = Cfg::kMT, NT = Cfg::kNT, THREADS = Cfg::kThreads;
  QK_DYNAMIC_SMEM(smem);
  uint8_t* sA = smem;
  uint8_t* sB = smem + STAGES * Cfg::kStageA;

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int warp_m0 = (warp / WARPS_N) * Cfg::kWarpM;
  const int warp_n0 = (warp % WARPS_N) * Cfg::kWarpN;
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * BM;
  const int64_t n0 = static_cast<int64_t>(blockIdx.y) * BN;
  const int64_t ldb = INT4 ? K / 2 : K;  // bytes per row of b
  const int KT = static_cast<int>(ceil_div(K, BK));

  // Copies k tile kt into ring slot `stage` (zero-filling outside the matrix).
  auto load_tile = [&](int kt, int stage) {
    const uint32_t a_base = smem_addr(sA + stage * Cfg::kStageA);
    const int64_t k0 = static_cast<int64_t>(kt) * BK;
#pragma unroll
    for (int i = tid; i < BM * (BK / 16); i += THREADS) {
      const int r = i / (BK / 16), ch = i % (BK / 16);
      const int64_t gm = m0 + r, gk = k0 + ch * 16;
      const bool ok = gm < M && gk < K;
      cp_async_16(a_base + swz64(r, ch), ok ? a + gm * K + gk : a, ok);
    }
    const uint32_t b_base = smem_addr(sB + stage * Cfg::kStageB);
    constexpr int kChunks = Cfg::kBRowBytes / 16;
    const int64_t kb0 = INT4 ? k0 / 2 : k0;
#pragma unroll
    for (int i = tid; i < BN * kChunks; i += THREADS) {
      const int r = i / kChunks, ch = i % kChunks;
      const int64_t gn = n0 + r, gk = kb0 + ch * 16;
      const bool ok = gn < N && gk < ldb;
      const int off = INT4 ? swz32(r, ch) : swz64(r, ch);
      cp_async_16(b_base + off, ok ? b + gn * ldb + gk : b, ok);
    }
  };

  int32_t acc[MT][NT][4];
#pragma unroll
  for (int i = 0; i < MT; ++i)
#pragma unroll
    for (int j = 0; j < NT; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[i][j][e] = 0;
  // W4A8 only: fp32 sums across groups, and the zero point of each n8 tile's B row.
  float accf[INT4 ? MT : 1][INT4 ? NT : 1][4];
  uint32_t zero4[INT4 ? NT : 1];
  if constexpr (INT4) {
#pragma unroll
    for (int i = 0; i < MT; ++i)
#pragma unroll
      for (int j = 0; j < NT; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) accf[i][j][e] = 0.0f;
#pragma unroll
    for (int j = 0; j < NT; ++j) zero4[j] = 0;
  }

#pragma unroll
  for (int s = 0; s < STAGES - 1; ++s) {
    if (s < KT) load_tile(s, s);
    cp_async_commit();  // always commit (possibly empty) so that group counting stays uniform
  }

  for (int kt = 0; kt < KT; ++kt) {
    // Tile kt has landed (at most STAGES - 2 younger groups pending); the barrier also makes
    // every thread's copies visible and frees slot (kt - 1) % STAGES for the prefetch below.
    cp_async_wait<STAGES - 2>();
    __syncthreads();
    if (kt + STAGES - 1 < KT) load_tile(kt + STAGES - 1, (kt + STAGES - 1) % STAGES);
    cp_async_commit();

    const int stage = kt % STAGES;
    const uint8_t* tA = sA + stage * Cfg::kStageA;
    const uint8_t* tB = sB + stage * Cfg::kStageB;
#pragma unroll
    for (int kk = 0; kk < BK / 32; ++kk) {
      const int64_t kglob = static_cast<int64_t>(kt) * BK + kk * 32;  // first k of this MMA step
      // W4A8: K % 32 == 0, so a step is entirely inside or past K; past K (the second half of the
      // last tile) the MMA adds zero-filled A, and no group may start or end there.
      const bool in_k = kglob < K;
      if constexpr (INT4) {
        if (in_k && i4.zero_b != nullptr && kglob % i4.group_size == 0) {  // group start: this tile's zero points
          const int64_t g = kglob / i4.group_size;
#pragma unroll
          for (int j = 0; j < NT; ++j) {
            const int64_t n = n0 + warp_n0 + j * 8 + (lane >> 2);
            zero4[j] = n < N ? 0x01010101u * i4.zero_b[n * i4.num_groups + g] : 0u;
          }
        }
      }
      uint32_t af[MT][4];
#pragma unroll
      for (int i = 0; i < MT; ++i) {
        // lanes 0-7: rows 0-7, k 0-15; 8-15: rows 8-15, k 0-15; 16-23: rows 0-7, k 16-31; 24-31: rows 8-15, k 16-31
        const int r = warp_m0 + i * 16 + (lane & 7) + ((lane >> 3) & 1) * 8;
        ldmatrix_x4(af[i], smem_addr(tA + swz64(r, kk * 2 + (lane >> 4))));
      }
      uint32_t bf[NT][2];
      if constexpr (!INT4) {
#pragma unroll
        for (int j = 0; j < NT; j += 2) {
          // lanes 0-7: n 0-7, k 0-15; 8-15: n 0-7, k 16-31; 16-23: n 8-15, k 0-15; 24-31: n 8-15, k 16-31
          const int r = warp_n0 + j * 8 + (lane & 7) + (lane >> 4) * 8;
          uint32_t t[4];
          ldmatrix_x4(t, smem_addr(tB + swz64(r, kk * 2 + ((lane >> 3) & 1))));
          bf[j][0] = t[0];
          bf[j][1] = t[1];
          bf[j + 1][0] = t[2];
          bf[j + 1][1] = t[3];
        }
      } else {
        // b0: row n = lane / 4, k = 4 (lane % 4) .. +3 -> packed bytes 2 (lane % 4), +1 of this
        // step's 16 bytes; b1: k + 16 -> bytes + 8.
        const int t4 = lane & 3;
#pragma unroll
        for (int j = 0; j < NT; ++j) {
          const int r = warp_n0 + j * 8 + (lane >> 2);
          const uint8_t* row = tB + swz32(r, kk);  // this step's 16 packed bytes of row r
          const uint32_t lo = *reinterpret_cast<const uint16_t*>(row + 2 * t4);
          const uint32_t hi = *reinterpret_cast<const uint16_t*>(row + 8 + 2 * t4);
          const bool sgn = i4.zero_b == nullptr;
          bf[j][0] = nibbles_to_s8(lo, sgn, zero4[j]);
          bf[j][1] = nibbles_to_s8(hi, sgn, zero4[j]);
        }
      }
#pragma unroll
      for (int i = 0; i < MT; ++i)
#pragma unroll
        for (int j = 0; j < NT; ++j) mma_s8(acc[i][j], af[i], bf[j][0], bf[j][1]);

      if constexpr (INT4) {
        if (in_k && (kglob + 32) % i4.group_size == 0) {  // group end: int32 -> fp32 with this group's scale
          const int64_t g = kglob / i4.group_size;
#pragma unroll
          for (int j = 0; j < NT; ++j) {
            const int64_t n = n0 + warp_n0 + j * 8 + (lane & 3) * 2;
            const float s0 = n < N ? i4.scale_b[n * i4.num_groups + g] : 0.0f;
            const float s1 = n + 1 < N ? i4.scale_b[(n + 1) * i4.num_groups + g] : 0.0f;
#pragma unroll
            for (int i = 0; i < MT; ++i)
#pragma unroll
              for (int e = 0; e < 4; ++e) {
                accf[i][j][e] = __fadd_rn(accf[i][j][e], __fmul_rn(__int2float_rn(acc[i][j][e]), (e & 1) ? s1 : s0));
                acc[i][j][e] = 0;
              }
          }
        }
      }
    }
  }
  cp_async_wait<0>();  // no copy may still target shared memory when the CTA exits

  // Fragment (i, j): c0, c1 at (row lane / 4, cols 2 (lane % 4), +1); c2, c3 at row + 8.
#pragma unroll
  for (int i = 0; i < MT; ++i) {
#pragma unroll
    for (int j = 0; j < NT; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int64_t m = m0 + warp_m0 + i * 16 + (lane >> 2) + (e >> 1) * 8;
        const int64_t n = n0 + warp_n0 + j * 8 + (lane & 3) * 2 + (e & 1);
        if (m < M && n < N) {
          if constexpr (INT4) {
            ep.store_grouped(m, n, accf[i][j][e]);
          } else {
            ep.store(m, n, acc[i][j][e]);
          }
        }
      }
    }
  }
}

// ------------------------------------------------------------------ SIMT fallback kernels
// One thread per output, plain loops: for K % 16 != 0 (or K % 32 for W4A8) and misaligned
// pointers. Correct for every shape; slow.
constexpr int kSimtThreads = 256;

template <typename OutT>
__global__ void __launch_bounds__(kSimtThreads)
simt_gemm_kernel(const int8_t* __restrict__ a, const int8_t* __restrict__ b, int64_t M, int64_t N, int64_t K,
                 Epilogue<OutT> ep) {
  QK_LAUNCH_BOUNDS(kSimtThreads);
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < M * N;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t m = idx / N, n = idx % N;
    int32_t c = 0;
    for (int64_t k = 0; k < K; ++k) c += static_cast<int32_t>(a[m * K + k]) * static_cast<int32_t>(b[n * K + k]);
    ep.store(m, n, c);
  }
}

template <typename OutT>
__global__ void __launch_bounds__(kSimtThreads)
simt_w4a8_kernel(const int8_t* __restrict__ a, const uint8_t* __restrict__ bp, int64_t M, int64_t N, int64_t K,
                 Epilogue<OutT> ep, Int4Args i4) {
  QK_LAUNCH_BOUNDS(kSimtThreads);
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < M * N;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t m = idx / N, n = idx % N;
    float acc = 0.0f;
    for (int64_t g = 0; g < i4.num_groups; ++g) {
      const int32_t z = i4.zero_b != nullptr ? static_cast<int32_t>(i4.zero_b[n * i4.num_groups + g]) : 0;
      int32_t c = 0;
      for (int64_t k = g * i4.group_size; k < (g + 1) * i4.group_size; ++k) {
        const uint32_t byte = bp[n * (K / 2) + k / 2];
        int32_t q = static_cast<int32_t>((k & 1) ? byte >> 4 : byte & 0xFu);
        q = i4.zero_b != nullptr ? q - z : (q ^ 8) - 8;
        c += static_cast<int32_t>(a[m * K + k]) * q;
      }
      acc = __fadd_rn(acc, __fmul_rn(__int2float_rn(c), i4.scale_b[n * i4.num_groups + g]));
    }
    ep.store_grouped(m, n, acc);
  }
}

// ------------------------------------------------------------------ launch

template <int BM, int BN, int WARPS_M, int WARPS_N, int STAGES, bool INT4, typename OutT>
cudaError_t launch_imma(const int8_t* a, const uint8_t* b, int64_t M, int64_t N, int64_t K, const Epilogue<OutT>& ep,
                        const Int4Args& i4, cudaStream_t stream) {
  using Cfg = TileCfg<BM, BN, WARPS_M, WARPS_N, STAGES, INT4>;
  auto kernel = imma_gemm_kernel<BM, BN, WARPS_M, WARPS_N, STAGES, INT4, OutT>;
  if (Cfg::kSmem > 48 * 1024) {
    // Opt in to > 48 KB of dynamic shared memory (a function attribute, not a stream operation).
    cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, Cfg::kSmem);
    if (err != cudaSuccess) return err;
  }
  const dim3 grid(static_cast<unsigned>(ceil_div(M, BM)), static_cast<unsigned>(ceil_div(N, BN)));
  QK_LAUNCH(kernel, grid, Cfg::kThreads, Cfg::kSmem, stream, a, b, M, N, K, ep, i4);
  return cudaGetLastError();
}

template <bool INT4, typename OutT>
cudaError_t launch_by_m(const int8_t* a, const uint8_t* b, int64_t M, int64_t N, int64_t K, const Epilogue<OutT>& ep,
                        const Int4Args& i4, cudaStream_t stream) {
  if (M <= 16) return launch_imma<16, 64, 1, 4, 4, INT4>(a, b, M, N, K, ep, i4, stream);
  // W4A8 keeps fp32 group sums next to the int32 tile: 32 x 32 warp tiles there (64 x 128 ones
  // need ~254 registers).
  if (M <= 64) {
    if constexpr (INT4) {
      return launch_imma<64, 64, 2, 2, 4, INT4>(a, b, M, N, K, ep, i4, stream);
    } else {
      return launch_imma<64, 128, 2, 2, 4, INT4>(a, b, M, N, K, ep, i4, stream);
    }
  }
  return launch_imma<128, 128, 2, 4, 4, INT4>(a, b, M, N, K, ep, i4, stream);
}

unsigned simt_blocks(int64_t outputs) {
  const int64_t blocks = ceil_div(outputs, kSimtThreads);
  return static_cast<unsigned>(blocks < 65535 ? blocks : 65535);
}

bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

template <typename F>
cudaError_t with_out_type(const float* scale_a, DType out_t, F&& f) {
  if (scale_a == nullptr) return f(static_cast<int32_t*>(nullptr));
  return with_dtype(out_t, f);
}

}  // namespace

int int8_gemm_uses_tensor_cores(const int8_t* a, const int8_t* b, int64_t K) {
  return K % 16 == 0 && aligned16(a) && aligned16(b) ? 1 : 0;
}

cudaError_t int8_gemm(const int8_t* a, const int8_t* b, int64_t M, int64_t N, int64_t K, const float* scale_a,
                      const float* scale_b, const float* bias, void* out, DType out_t, cudaStream_t stream) {
  if (M <= 0 || N <= 0) return cudaSuccess;
  const bool tc = int8_gemm_uses_tensor_cores(a, b, K) != 0;
  return with_out_type(scale_a, out_t, [&](auto* tag) -> cudaError_t {
    using OutT = std::remove_pointer_t<decltype(tag)>;
    const Epilogue<OutT> ep{scale_a, scale_b, bias, static_cast<OutT*>(out), N};
    if (tc) return launch_by_m<false, OutT>(a, reinterpret_cast<const uint8_t*>(b), M, N, K, ep, Int4Args{}, stream);
    QK_LAUNCH(simt_gemm_kernel<OutT>, simt_blocks(M * N), kSimtThreads, 0, stream, a, b, M, N, K, ep);
    return cudaGetLastError();
  });
}

cudaError_t w4a8_gemm(const int8_t* a, const uint8_t* bp, int64_t M, int64_t N, int64_t K, int64_t num_groups,
                      const float* scale_a, const float* scale_b, const uint8_t* zero_b, const float* bias, void* out,
                      DType out_t, cudaStream_t stream) {
  if (M <= 0 || N <= 0) return cudaSuccess;
  const Int4Args i4{scale_b, zero_b, num_groups, K / num_groups};
  const bool tc = K % 32 == 0 && i4.group_size % 32 == 0 && aligned16(a) && aligned16(bp);
  return with_dtype(out_t, [&](auto* tag) -> cudaError_t {
    using OutT = std::remove_pointer_t<decltype(tag)>;
    const Epilogue<OutT> ep{scale_a, nullptr, bias, static_cast<OutT*>(out), N};
    if (tc) return launch_by_m<true, OutT>(a, bp, M, N, K, ep, i4, stream);
    QK_LAUNCH(simt_w4a8_kernel<OutT>, simt_blocks(M * N), kSimtThreads, 0, stream, a, bp, M, N, K, ep, i4);
    return cudaGetLastError();
  });
}

}  // namespace cuda
}  // namespace quantkernels
