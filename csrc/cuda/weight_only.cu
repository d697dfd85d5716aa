// Weight-only W8A16 / W4A16 GEMMs (docs/numerics.md s.4), and NF4 / FP4 (gemm_4bit, s.11) through the
// same two kernels with a third weight format (template flag CODE; see "NF4 / FP4" below):
//   y[m, n] = sum_k x[m, k] * w[n, k] (+ bias[n]),  w[n, k] = T(float(q[n, k] - z[n, g]) * scale[n, g])
// with T the activation dtype (the dequantized weight is rounded to it, as the reference's
// `w.to(x.dtype)`), products and accumulation in fp32 (fp16 x fp16 / bf16 x bf16 products are
// exact in fp32), cast to T once at the end (after + bias in fp32).
//
// Two kernels; weight_only_gemm picks (weight_only_splits() says which):
//
// 1. GEMV (any dtype, any shape): one warp per output channel n, 4 warps per block; the warp
//    streams its weight row once in 16-byte loads (16 int8 or 32 int4 values per lane per step)
//    and applies each dequantized chunk to up to kMaxRows = 8 rows of x (blockIdx.y picks the
//    8-row slab), so for M <= 8 every weight byte is read once. Each lane keeps one fp32 partial
//    sum per row, reduced across the warp at the end. The 16-byte path needs K to be a multiple
//    of the chunk (16 / 32 values), 16-byte aligned pointers and (int4) G % 32 == 0; otherwise,
//    and for the K tail, lanes go one k value at a time (correct, slower).
//    Used for M <= kGemvMaxM (= 8: above it the GEMV re-reads every weight byte once per 8 rows;
//    the bindings let QUANTKERNELS_CUDA_WO_GEMV_MAX_M override it, e.g. 0 to measure the
//    tensor-core kernel at decode M: per weight it needs ~4 instructions, the GEMV ~8 with an
//    I2F, so it may win even at M = 1 -- unmeasured),
//    for fp32 activations at every M (no fp32 tensor-core path: tf32 would change the numbers),
//    and for the shapes the tensor-core kernel does not take (below).
//
// 2. Tensor cores, fp16 / bf16 activations, M > 8 (weight_only_mma_kernel):
//    mma.sync.aligned.m16n8k16.row.col.f32.{f16,bf16} with fp32 accumulators.
//    - CTA: 4 warps side by side along N, each owning NT n8 tiles for all BM rows: tile BM x BN =
//      16 x 64 (M <= 16), 32 x 64 (M <= 32), 64 x 128 (larger M), BK = 64 k values per stage,
//      a STAGES-deep cp.async ring (6 / 5 / 4 stages) for both operands, zero-filled outside
//      M / N / K. A CTA reads each weight byte of its columns once (per M tile).
//    - Split-K over gridDim.z when the (M, N) tiles alone would leave SMs idle (decode shapes):
//      each split writes fp32 partial sums to a workspace [splits, M, N] that
//      splitk_reduce_kernel adds in split order (deterministic), + bias, cast to T.
//    - Weight layout: option (b) of issue 5, the PLAIN layout read as it is (no repack, no new
//      format or op). The m16n8k16 B fragment gives lane (g = lane / 4, t = lane % 4) the k pairs
//      {2t, 2t+1} and {2t+8, 2t+9} of row n = g: with PLAIN bytes that is byte t and byte t+4 of
//      every 8-byte k16 chunk, a stride-4 byte gather. Instead, the kernel permutes k inside each
//      64-wide stage identically for both operands (a GEMM may sum k in any order): lane t owns
//      the contiguous k range [16t, 16t + 16) of the stage and, in MMA step s (0..3), feeds
//      k = 16t + 4s + {0, 1} into the fragment slots {2t, 2t+1} and 16t + 4s + {2, 3} into
//      {2t+8, 2t+9}. Its weights are then ONE aligned 8-byte shared load per n8 tile and stage
//      (int4: 16 nibbles; int8: one 16-byte load), every weight byte is read from global
//      memory once per M tile and from shared memory once per warp, and the activations of a
//      m16 tile are four 16-byte shared loads per lane (rows g and g + 8, k 16t .. 16t + 15;
//      two per half stage, i.e. per two MMA steps, to bound the registers of the 64-row tile),
//      which replace ldmatrix: ldmatrix.x4 hands lane t the pairs 2t, 2t+1 of each 8-wide
//      chunk, i.e. the standard k order, which would force the stride-4 gather (4x the shared
//      weight traffic plus byte permutes) on the weights; the LDS.128 path costs the same
//      number of shared-load instructions as ldmatrix. The A tile rows are 128 bytes, 16-byte
//      chunk c of row r stored at c ^ (r & 7): each quarter-warp phase (rows 2p, 2p+1, chunks
//      2t or 2t+1) hits 8 distinct bank groups, and the cp.async writes stay conflict-free.
//      The int4 B rows are 32 bytes (16 lanes of an 8-byte load read 4 consecutive rows = 128
//      contiguous bytes) and the int8 ones 64 bytes (8 lanes of a 16-byte load read 128
//      contiguous bytes): no swizzle needed.
//    - Dequantization in registers with the magic-number trick, in fp32 rather than Marlin's
//      fp16 (0x6400) / bf16 (0x4300) form: the nibble (byte) u is placed into the mantissa
//      of 2^23 by a byte permute (0x4B000000 | u = 2^23 + u exactly), 2^23 + z is subtracted
//      (exact: q - z is an integer of magnitude <= 255), the result multiplied by the fp32
//      group scale with __fmul_rn and the pair rounded to T by one cvt.rn.{f16x2,bf16x2}.f32.
//      That is bit for bit the reference's T(float(q - z) * s): Marlin's fp16 HFMA2 with an
//      fp16 scale rounds the scale and the product separately in fp16 (up to ~1 ulp of T off
//      per weight, and for bf16 more) -- not our spec. Signed int4 uses u = nibble ^ 8, z = 8;
//      int8 uses u = byte ^ 0x80, z = 128. Cost per weight: one PRMT (plus a LOP3 and a shift
//      per 8 int4 values to split the nibbles into bytes), an FADD, an FMUL and half a cvt,
//      done once per (M tile, weight).
//    - Scales (and zero points) per lane and n8 tile are loaded from global memory one stage
//      ahead (registers), so their latency overlaps the previous stage's MMAs. A lane's 16
//      consecutive k values lie in one group when G % 16 == 0.
//    - Requirements (else the GEMV, which handles everything): fp16/bf16, M > 8, x and w 16-byte
//      aligned, K % 32 == 0 (int4: a packed row is then 16-byte aligned) or K % 16 == 0 (int8),
//      G % 16 == 0 (int4). M, N and the K tail past the last full stage are zero-filled /
//      predicated (scales of k >= K are never read).
//    Status: compiled for sm_80 / sm_89 / sm_90a by `make cuda-check` (HMMA present, no
//    spills) and run on the CPU by the CUDA emulator (tests/test_cuda_emu.py, in `make test`);
//    NOT yet run on a GPU -- tests/test_cuda.py and bench (make gpu-check) verify it there.
//
// NF4 / FP4 (CODE = true; INT4 = true, the bytes hold two 4-bit codes): the packed weight
// [N, K/2] holds the first value of each pair in the HIGH nibble (s.11.4) and `scale` is the fp32
// absmax of flat blocks of B = 2^lb values of the [N, K] weight (block (n*K + k) >> lb: a block
// may span rows; double quantization is decoded first by absmax_dq_kernel). A value decodes to
// T(fp32(code[v] * absmax)) -- a lookup in the 16-entry code table, which each CTA copies from a
// __grid_constant__ parameter into shared memory (16 banks: conflict-free for any nibbles), one
// __fmul_rn and the rounding to T -- in place of the magic-number dequantization; everything else
// (tiles, cp.async ring, k permutation, split-K, GEMV, fallbacks) is shared. With K % 32 == 0 a
// lane's 16 (tensor cores) or 32 (GEMV chunk) consecutive values of a row lie in one block.
#include <atomic>

#include "../qk_4bit_codes.h"
#include "qk_common.cuh"

namespace quantkernels {
namespace cuda {
namespace {

constexpr int kWarpsPerBlock = 4;
constexpr int kMaxRows = 8;
constexpr int kGemvMaxM = kMaxRows;  // above this M (fp16/bf16), the tensor-core kernel

// NF4 / FP4 (CODE = true, docs/numerics.md s.11): the 16 fp32 values of the code table, a
// __grid_constant__ kernel parameter that each CTA copies into 64 bytes of shared memory once
// (the 16 entries sit in 16 distinct banks, so any nibble pattern of a warp is one conflict-free
// LDS; a lookup in the parameter space itself would serialise on distinct addresses).
struct Code16 {
  float v[16];
};

// Copies the code table into shared memory (threads 0..15); the caller's next barrier publishes it.
__device__ __forceinline__ void stage_code_table(float* s_code, const Code16& code) {
  if (threadIdx.x < 16) s_code[threadIdx.x] = code.v[threadIdx.x];
}

// CODE: w is the NF4 / FP4 packed weight (first value of each pair in the HIGH nibble), scale the
// fp32 absmax of the flat blocks of 2^lb values of the [N, K] weight (block (n*K + k) >> lb; a
// block may span rows), zero null, num_groups 1; each value decodes to T(code[v] * absmax).
template <typename T, bool INT4, bool CODE = false>
__global__ void __launch_bounds__(kWarpsPerBlock * 32)
weight_only_gemv_kernel(const T* __restrict__ x, const uint8_t* __restrict__ w, const float* __restrict__ scale,
                        const uint8_t* __restrict__ zero, int64_t num_groups, const float* __restrict__ bias,
                        int64_t M, int64_t N, int64_t K, T* __restrict__ y, bool vec,
                        const __grid_constant__ Code16 code, int lb) {
  QK_LAUNCH_BOUNDS(kWarpsPerBlock * 32);
  static_assert(!CODE || INT4, "the 4-bit code formats are packed like int4");
  constexpr int KC = INT4 ? 32 : 16;                   // k values per 16-byte weight chunk
  constexpr int XV = KC * static_cast<int>(sizeof(T)) / 16;  // 16-byte x loads per chunk and row
  const float* tab = nullptr;
  if constexpr (CODE) {
    QK_SHARED(float, s_code, [16]);
    stage_code_table(s_code, code);
    __syncthreads();  // before any warp returns below
    tab = s_code;
  }
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
  // CODE: T(fp32(code[v] * absmax)), one IEEE product (s.11.6).
  auto code_deq = [&](uint32_t v, float a) { return FloatIO<T>::round(__fmul_rn(tab[v], a)); };

  float acc[kMaxRows];
#pragma unroll
  for (int r = 0; r < kMaxRows; ++r) acc[r] = 0.0f;

  const int64_t nchunks = vec ? K / KC : 0;
  for (int64_t c = lane; c < nchunks; c += 32) {
    const int64_t k0 = c * KC;
    uint4 raw = __ldg(reinterpret_cast<const uint4*>(wrow + c * 16));
    const uint8_t* bytes = reinterpret_cast<const uint8_t*>(&raw);
    float wf[KC];
    if constexpr (CODE) {
      // K % 32 == 0 and 2^lb >= 32: the chunk's 32 flat indices lie in one block.
      const float a = __ldg(scale + ((n * K + k0) >> lb));
#pragma unroll
      for (int i = 0; i < 16; ++i) {
        wf[2 * i] = code_deq(bytes[i] >> 4, a);
        wf[2 * i + 1] = code_deq(bytes[i] & 0xFu, a);
      }
    } else if constexpr (INT4) {
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
    if constexpr (CODE) {
      const uint32_t byte = wrow[k / 2];
      wk = code_deq((k & 1) ? byte & 0xFu : byte >> 4, __ldg(scale + ((n * K + k) >> lb)));
    } else if constexpr (INT4) {
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

// ------------------------------------------------------------------ tensor-core kernel

constexpr int kTcBK = 64;                 // k values per stage
constexpr int kTcWarps = 4;               // side by side along N; each has all BM rows
constexpr int kTcThreads = kTcWarps * 32;
constexpr int kTcMaxSplits = 16;
constexpr int kTcMinTilesPerSplit = 4;    // >= 256 k values per split

// smem_addr / cp_async_16 / cp_async_commit / cp_async_wait: qk_common.cuh.

// c += a (16x16, row) * b (16x8, col), fp32 accumulate; pack rounds two fp32 values to one
// register of T pairs (lo = first, the smaller k / column).
template <typename T>
struct HalfMma;

template <>
struct HalfMma<__half> {
  static __device__ __forceinline__ void mma(float (&c)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                             uint32_t b0, uint32_t b1) {
#ifdef QK_CUDA_EMU
    ::qk_emu::mma_m16n8k16_f16(c, a0, a1, a2, a3, b0, b1);
#else
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
#endif
  }
  static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
    const __half2 h = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<const uint32_t*>(&h);
  }
};

template <>
struct HalfMma<__nv_bfloat16> {
  static __device__ __forceinline__ void mma(float (&c)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                             uint32_t b0, uint32_t b1) {
#ifdef QK_CUDA_EMU
    ::qk_emu::mma_m16n8k16_bf16(c, a0, a1, a2, a3, b0, b1);
#else
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
#endif
  }
  static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
    const __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<const uint32_t*>(&h);
  }
};

// float(u - z) * s for u = byte `b` (0..3) of `bytes` (see the header): one PRMT builds the fp32
// 2^23 + u (bytes [u, 0x00, 0x00, 0x4B]), exact (2^23 + u) - (2^23 + z), then one fp32 multiply.
__device__ __forceinline__ float magic_deq(uint32_t bytes, int b, float zmagic, float s) {
  const float f = __uint_as_float(__byte_perm(bytes, 0x4B000000u, 0x7540u | static_cast<uint32_t>(b)));
  return __fmul_rn(__fsub_rn(f, zmagic), s);
}

template <typename T, bool INT4, int BM, int NT, int STAGES>
struct TcCfg {
  static constexpr int kMT = BM / 16;                       // m16 tiles per warp
  static constexpr int kNT = NT;                            // n8 tiles per warp
  static constexpr int kWN = NT * 8;                        // output channels per warp
  static constexpr int kBN = kTcWarps * kWN;                // output channels per CTA
  static constexpr int kAStage = BM * kTcBK * 2;            // bytes (128 per row)
  static constexpr int kBRow = INT4 ? kTcBK / 2 : kTcBK;    // bytes per channel per stage
  static constexpr int kBStage = kBN * kBRow;
  static constexpr int kSmem = STAGES * (kAStage + kBStage);
  static_assert(BM % 16 == 0 && STAGES >= 2, "bad tile config");
};

// One (BM x 32 NT) output tile, k tiles [blockIdx.z * tiles_per_split, + tiles_per_split).
// ws == nullptr: + bias, cast to T, store to y; else fp32 partial sums to ws[blockIdx.z, m, n].
// CODE: NF4 / FP4 as in weight_only_gemv_kernel (scale = flat-block absmax, 2^lb values a block).
template <typename T, bool INT4, int BM, int NT, int STAGES, bool CODE = false>
__global__ void __launch_bounds__(kTcThreads)
weight_only_mma_kernel(const T* __restrict__ x, const uint8_t* __restrict__ w, const float* __restrict__ scale,
                       const uint8_t* __restrict__ zero, int64_t num_groups, int64_t group_size,
                       const float* __restrict__ bias, int64_t M, int64_t N, int64_t K, int tiles_per_split,
                       T* __restrict__ y, float* __restrict__ ws, const __grid_constant__ Code16 code, int lb) {
  QK_LAUNCH_BOUNDS(kTcThreads);
  static_assert(!CODE || INT4, "the 4-bit code formats are packed like int4");
  using Cfg = TcCfg<T, INT4, BM, NT, STAGES>;
  using H = HalfMma<T>;
  constexpr int MT = Cfg::kMT, BN = Cfg::kBN, WN = Cfg::kWN;
  QK_DYNAMIC_SMEM(smem);
  const float* tab = nullptr;
  if constexpr (CODE) {
    QK_SHARED(float, s_code, [16]);
    stage_code_table(s_code, code);  // published by the main loop's first barrier
    tab = s_code;
  }
  uint8_t* sA = smem;
  uint8_t* sB = smem + STAGES * Cfg::kAStage;

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int g = lane >> 2, t = lane & 3;
  const int64_t n0 = static_cast<int64_t>(blockIdx.x) * BN;
  const int64_t m0 = static_cast<int64_t>(blockIdx.y) * BM;
  const int KT = static_cast<int>(ceil_div(K, kTcBK));
  const int kt0 = static_cast<int>(blockIdx.z) * tiles_per_split;
  const int nkt = (KT - kt0 < tiles_per_split ? KT - kt0 : tiles_per_split);  // >= 1 (host)
  const int64_t ldb = INT4 ? K / 2 : K;  // bytes per weight row

  auto load_tile = [&](int it, int stage) {
    const int64_t k0 = static_cast<int64_t>(kt0 + it) * kTcBK;
    const uint32_t a_base = smem_addr(sA + stage * Cfg::kAStage);
#pragma unroll
    for (int i = tid; i < BM * 8; i += kTcThreads) {  // BM rows x 8 chunks of 8 values
      const int r = i >> 3, c = i & 7;
      const int64_t gm = m0 + r, gk = k0 + c * 8;
      const bool ok = gm < M && gk < K;  // K % 8 == 0: a chunk is wholly inside or outside
      cp_async_16(a_base + r * 128 + ((c ^ (r & 7)) << 4), ok ? x + gm * K + gk : x, ok);
    }
    const uint32_t b_base = smem_addr(sB + stage * Cfg::kBStage);
    constexpr int CH = Cfg::kBRow / 16;
    const int64_t kb0 = INT4 ? k0 / 2 : k0;
#pragma unroll
    for (int i = tid; i < BN * CH; i += kTcThreads) {
      const int r = i / CH, c = i % CH;
      const int64_t gn = n0 + r, gb = kb0 + c * 16;
      const bool ok = gn < N && gb < ldb;
      cp_async_16(b_base + r * Cfg::kBRow + c * 16, ok ? w + gn * ldb + gb : w, ok);
    }
  };

  // Group of this lane's first k in the next stage load_scales reads, and its offset in the
  // group: one division here, then advanced by 64 per call (no 64-bit division in the loop).
  int64_t grp = 0, grp_off = 0;
  if constexpr (INT4 && !CODE) {
    const int64_t k = static_cast<int64_t>(kt0) * kTcBK + 16 * t;
    grp = k / group_size;
    grp_off = k - grp * group_size;
  }
  // Scale and (2^23 + zero point) of this lane's weight row in n8 tile j for stage `it`; called
  // for it = 0, 1, 2, ... in order. Past N or K: scale 0 (the zero-filled operands then add
  // exact zeros; no scale is read there).
  auto load_scales = [&](int it, float (&sc)[NT], float (&zm)[NT]) {
    const int64_t k = static_cast<int64_t>(kt0 + it) * kTcBK + 16 * t;  // this lane's first k
#pragma unroll
    for (int j = 0; j < NT; ++j) {
      const int64_t n = n0 + warp * WN + j * 8 + g;
      float s = 0.0f, z = INT4 ? 8.0f : 128.0f;
      if (n < N && k < K) {
        if constexpr (CODE) {
          s = __ldg(scale + ((n * K + k) >> lb));  // K % 16 == 0: the lane's 16 values share a block
        } else if constexpr (INT4) {
          const int64_t gi = n * num_groups + grp;
          s = __ldg(scale + gi);
          if (zero != nullptr) z = static_cast<float>(__ldg(zero + gi));
        } else {
          s = __ldg(scale + n);
        }
      }
      sc[j] = s;
      zm[j] = __fadd_rn(8388608.0f, z);  // 2^23 + z, exact
    }
    if constexpr (INT4 && !CODE) {
      grp_off += kTcBK;  // group_size >= 32: at most two steps
      while (grp_off >= group_size) {
        grp_off -= group_size;
        ++grp;
      }
    }
  };

  float acc[MT][NT][4];
#pragma unroll
  for (int i = 0; i < MT; ++i)
#pragma unroll
    for (int j = 0; j < NT; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[i][j][e] = 0.0f;

#pragma unroll
  for (int s = 0; s < STAGES - 1; ++s) {
    if (s < nkt) load_tile(s, s);
    cp_async_commit();  // always commit (possibly empty) so that group counting stays uniform
  }
  float sc[NT], zm[NT];
  load_scales(0, sc, zm);

  // Signed int4: u = nibble ^ 8 (z = 8); int8: u = byte ^ 0x80 (z = 128); unsigned int4 and the
  // 4-bit codes: u as is.
  const uint32_t flip = CODE ? 0u : (INT4 ? (zero != nullptr ? 0u : 0x88888888u) : 0x80808080u);

  for (int it = 0; it < nkt; ++it) {
    // Stage it has landed (at most STAGES - 2 younger groups pending); the barrier also makes
    // every thread's copies visible and frees slot (it - 1) % STAGES for the prefetch below.
    cp_async_wait<STAGES - 2>();
    __syncthreads();
    if (it + STAGES - 1 < nkt) load_tile(it + STAGES - 1, (it + STAGES - 1) % STAGES);
    cp_async_commit();
    float nsc[NT], nzm[NT];
    if (it + 1 < nkt) {
      load_scales(it + 1, nsc, nzm);
    } else {
#pragma unroll
      for (int j = 0; j < NT; ++j) nsc[j] = nzm[j] = 0.0f;
    }

    const int stage = it % STAGES;
    const uint8_t* tA = sA + stage * Cfg::kAStage;
    const uint8_t* tB = sB + stage * Cfg::kBStage;

    // This lane's weights: row warp*WN + j*8 + g, k 16t .. 16t + 15 of the stage.
    constexpr int BW = INT4 ? 2 : 4;  // 32-bit words
    uint32_t bw[NT][BW];
#pragma unroll
    for (int j = 0; j < NT; ++j) {
      const uint8_t* row = tB + (warp * WN + j * 8 + g) * Cfg::kBRow;
      if constexpr (INT4) {
        const uint2 v = *reinterpret_cast<const uint2*>(row + 8 * t);
        bw[j][0] = v.x ^ flip;
        bw[j][1] = v.y ^ flip;
      } else {
        const uint4 v = *reinterpret_cast<const uint4*>(row + 16 * t);
        bw[j][0] = v.x ^ flip;
        bw[j][1] = v.y ^ flip;
        bw[j][2] = v.z ^ flip;
        bw[j][3] = v.w ^ flip;
      }
    }
#pragma unroll
    for (int hs = 0; hs < 2; ++hs) {
      // This lane's activations for MMA steps 2 hs, 2 hs + 1: rows g, g + 8 of each m16 tile,
      // k 16t + 8 hs .. + 7 = 16-byte chunk 2t + hs of the row (swizzled); register q holds
      // k 16t + 8 hs + 2q, +1.
      uint32_t ar[MT][2][4];
#pragma unroll
      for (int i = 0; i < MT; ++i)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const int r = i * 16 + g + h * 8;
          const uint4 v = *reinterpret_cast<const uint4*>(tA + r * 128 + (((2 * t + hs) ^ (r & 7)) << 4));
          ar[i][h][0] = v.x;
          ar[i][h][1] = v.y;
          ar[i][h][2] = v.z;
          ar[i][h][3] = v.w;
        }
#pragma unroll
      for (int ss = 0; ss < 2; ++ss) {
        // MMA step s: k 16t + 4s + {0, 1} in slots 2t, 2t+1 and 16t + 4s + {2, 3} in 2t+8, 2t+9.
        const int s = 2 * hs + ss;
        uint32_t b0[NT], b1[NT];
#pragma unroll
        for (int j = 0; j < NT; ++j) {
          float v[4];
          if constexpr (CODE) {
            // Nibble i (k offset i) of the word: byte i / 2, its HIGH nibble for even i (s.11.4),
            // looked up in the shared code table and multiplied by the block's absmax.
#pragma unroll
            for (int e = 0; e < 4; ++e) {
              const int i = ss * 4 + e;
              const uint32_t v4 = (bw[j][hs] >> (8 * (i >> 1) + ((i & 1) ? 0 : 4))) & 0xFu;
              v[e] = __fmul_rn(tab[v4], sc[j]);
            }
          } else if constexpr (INT4) {
            // Nibble i (k offset i) of the word: byte i / 2 of its low (even i) or high nibbles.
            const uint32_t lo = bw[j][hs] & 0x0F0F0F0Fu, hi = (bw[j][hs] >> 4) & 0x0F0F0F0Fu;
#pragma unroll
            for (int e = 0; e < 4; ++e) {
              const int i = ss * 4 + e;
              v[e] = magic_deq((i & 1) ? hi : lo, i >> 1, zm[j], sc[j]);
            }
          } else {
#pragma unroll
            for (int e = 0; e < 4; ++e) v[e] = magic_deq(bw[j][s], e, zm[j], sc[j]);
          }
          b0[j] = H::pack(v[0], v[1]);
          b1[j] = H::pack(v[2], v[3]);
        }
#pragma unroll
        for (int i = 0; i < MT; ++i)
#pragma unroll
          for (int j = 0; j < NT; ++j)
            H::mma(acc[i][j], ar[i][0][2 * ss], ar[i][1][2 * ss], ar[i][0][2 * ss + 1], ar[i][1][2 * ss + 1], b0[j],
                   b1[j]);
      }
    }
#pragma unroll
    for (int j = 0; j < NT; ++j) {
      sc[j] = nsc[j];
      zm[j] = nzm[j];
    }
  }
  cp_async_wait<0>();  // no copy may still target shared memory when the CTA exits

  // Fragment (i, j): c0, c1 at (row g, cols 2t, 2t + 1); c2, c3 at row g + 8.
#pragma unroll
  for (int i = 0; i < MT; ++i)
#pragma unroll
    for (int j = 0; j < NT; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int64_t m = m0 + i * 16 + g + (e >> 1) * 8;
        const int64_t n = n0 + warp * WN + j * 8 + 2 * t + (e & 1);
        if (m < M && n < N) {
          if (ws != nullptr) {
            ws[(static_cast<int64_t>(blockIdx.z) * M + m) * N + n] = acc[i][j][e];
          } else {
            float v = acc[i][j][e];
            if (bias != nullptr) v = __fadd_rn(v, bias[n]);
            FloatIO<T>::store(y + m * N + n, v);
          }
        }
      }
}

// y[m, n] = T(sum_z ws[z, m, n] (in split order) + bias[n]).
constexpr int kReduceThreads = 256;

template <typename T>
__global__ void __launch_bounds__(kReduceThreads)
splitk_reduce_kernel(const float* __restrict__ ws, int splits, const float* __restrict__ bias, int64_t M, int64_t N,
                     T* __restrict__ y) {
  QK_LAUNCH_BOUNDS(kReduceThreads);
  const int64_t MN = M * N;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < MN;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    float v = ws[idx];
    for (int z = 1; z < splits; ++z) v = __fadd_rn(v, ws[z * MN + idx]);
    if (bias != nullptr) v = __fadd_rn(v, bias[idx % N]);
    FloatIO<T>::store(y + idx, v);
  }
}

// Tile configs by M: BM x BN = 16 x 64 (M <= 16), 32 x 64 (M <= 32), 64 x 128 (larger M; each
// warp 64 x 32: twice the MMAs per activation fragment read from shared memory, half the
// activation re-reads across CTAs). Stages: as many as keep the ring at <= 48 / 64 KB.
int tc_bm(int64_t M) { return M <= 16 ? 16 : (M <= 32 ? 32 : 64); }
int tc_bn(int64_t M) { return M <= 32 ? 64 : 128; }

template <typename T, bool INT4, bool CODE, int BM, int NT, int STAGES>
cudaError_t launch_mma(const T* x, const uint8_t* w, const float* scale, const uint8_t* zero, int64_t num_groups,
                       const float* bias, int64_t M, int64_t N, int64_t K, int splits, T* y, float* ws,
                       const Code16& code, int lb, cudaStream_t stream) {
  using Cfg = TcCfg<T, INT4, BM, NT, STAGES>;
  static_assert(Cfg::kBN == (BM <= 32 ? 64 : 128), "tc_bn() must match the tile config");
  auto kernel = weight_only_mma_kernel<T, INT4, BM, NT, STAGES, CODE>;
  if (Cfg::kSmem > 48 * 1024) {
    // Opt in to > 48 KB of dynamic shared memory (a function attribute, not a stream operation).
    const cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, Cfg::kSmem);
    if (err != cudaSuccess) return err;
  }
  const int KT = static_cast<int>(ceil_div(K, kTcBK));
  const int tps = static_cast<int>(ceil_div(KT, splits));  // every split gets >= 1 tile (weight_only_splits)
  const dim3 grid(static_cast<unsigned>(ceil_div(N, Cfg::kBN)), static_cast<unsigned>(ceil_div(M, BM)),
                  static_cast<unsigned>(splits));
  QK_LAUNCH(kernel, grid, kTcThreads, Cfg::kSmem, stream, x, w, scale, zero, num_groups, K / num_groups, bias, M, N,
            K, tps, y, splits > 1 ? ws : nullptr, code, lb);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess || splits == 1) return err;
  const int64_t blocks = ceil_div(M * N, kReduceThreads);
  QK_LAUNCH(splitk_reduce_kernel<T>, static_cast<unsigned>(blocks < 4096 ? blocks : 4096), kReduceThreads, 0, stream,
            ws, splits, bias, M, N, y);
  return cudaGetLastError();
}

template <typename T, bool INT4, bool CODE>
cudaError_t launch_mma_by_m(const T* x, const uint8_t* w, const float* scale, const uint8_t* zero,
                            int64_t num_groups, const float* bias, int64_t M, int64_t N, int64_t K, int splits, T* y,
                            float* ws, const Code16& code, int lb, cudaStream_t stream) {
  switch (tc_bm(M)) {
    case 16:
      return launch_mma<T, INT4, CODE, 16, 2, 6>(x, w, scale, zero, num_groups, bias, M, N, K, splits, y, ws, code,
                                                 lb, stream);
    case 32:
      return launch_mma<T, INT4, CODE, 32, 2, 5>(x, w, scale, zero, num_groups, bias, M, N, K, splits, y, ws, code,
                                                 lb, stream);
    default:
      return launch_mma<T, INT4, CODE, 64, 4, 4>(x, w, scale, zero, num_groups, bias, M, N, K, splits, y, ws, code,
                                                 lb, stream);
  }
}

bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

}  // namespace

namespace {

// SM count of the current device, cached per device (an attribute query, no synchronisation).
int current_sm_count() {
  static std::atomic<int> cache[64];
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess || dev < 0) return 1;
  if (dev < 64) {
    const int c = cache[dev].load(std::memory_order_relaxed);
    if (c > 0) return c;
  }
  int n = 0;
  if (cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess || n <= 0) return 1;
  if (dev < 64) cache[dev].store(n, std::memory_order_relaxed);
  return n;
}

}  // namespace

int weight_only_splits(DType xt, bool int4, const void* x, const void* w, int64_t M, int64_t N, int64_t K,
                       int64_t num_groups, int gemv_max_m) {
  if (gemv_max_m < 0) gemv_max_m = kGemvMaxM;
  if (xt == DType::F32 || M <= gemv_max_m || N <= 0 || K <= 0 || num_groups <= 0) return 0;
  if (!aligned16(x) || !aligned16(w) || K % (int4 ? 32 : 16) != 0) return 0;
  if (int4 && (K % num_groups != 0 || (K / num_groups) % 16 != 0)) return 0;
  const int64_t ctas = ceil_div(N, tc_bn(M)) * ceil_div(M, tc_bm(M));
  const int64_t KT = ceil_div(K, kTcBK);
  // About two CTAs per SM in total, each split >= kTcMinTilesPerSplit stages long, and the fp32
  // workspace (written and read once, mostly in L2) at most half the weight bytes:
  // splits * M * N * 4 <= N * K * (int4 ? 1/2 : 1) / 2.
  int64_t splits = ceil_div(2 * static_cast<int64_t>(current_sm_count()), ctas);
  const int64_t max_by_k = KT / kTcMinTilesPerSplit > 1 ? KT / kTcMinTilesPerSplit : 1;
  const int64_t max_by_ws = K / (M * (int4 ? 16 : 8));
  if (splits > max_by_k) splits = max_by_k;
  if (splits > max_by_ws) splits = max_by_ws;
  if (splits > kTcMaxSplits) splits = kTcMaxSplits;
  if (splits < 1) splits = 1;
  return static_cast<int>(ceil_div(KT, ceil_div(KT, splits)));  // no empty split
}

namespace {

// The GEMV (splits == 0) or the tensor-core kernel (splits >= 1) for one weight format.
template <typename T, bool INT4, bool CODE>
cudaError_t run_weight_only(const T* x, const uint8_t* w, const float* scale, const uint8_t* zero, int64_t num_groups,
                            const float* bias, int64_t M, int64_t N, int64_t K, T* y, int splits, float* ws,
                            const Code16& code, int lb, cudaStream_t stream) {
  if (splits > 0) {
    if constexpr (std::is_same_v<T, float>) {
      return cudaErrorInvalidValue;  // fp32 never gets splits > 0 from weight_only_splits
    } else {
      return launch_mma_by_m<T, INT4, CODE>(x, w, scale, zero, num_groups, bias, M, N, K, splits, y, ws, code, lb,
                                            stream);
    }
  }
  constexpr int kc = INT4 ? 32 : 16;
  const int64_t G = K / num_groups;
  const bool vec = K % kc == 0 && G % kc == 0 && aligned16(x) && aligned16(w);
  const dim3 grid(static_cast<unsigned>(ceil_div(N, kWarpsPerBlock)), static_cast<unsigned>(ceil_div(M, kMaxRows)));
  const auto gemv = weight_only_gemv_kernel<T, INT4, CODE>;
  QK_LAUNCH(gemv, grid, kWarpsPerBlock * 32, 0, stream, x, w, scale, zero, num_groups, bias, M, N, K, y, vec, code,
            lb);
  return cudaGetLastError();
}

// s.11.1's table: NF4 as listed, FP4 = raw / 12 (one IEEE division each; nibble 8 is +0).
Code16 code_table_4bit(bool nf4) {
  Code16 c;
  volatile float twelve = 12.0f;  // a true division on the host, as the reference's tensor / 12
  for (int i = 0; i < 16; ++i) c.v[i] = nf4 ? kNF4[i] : kFP4Raw[i] / twelve;
  return c;
}

// s.11.5: absmax'[b] = fp32(fp32(DYN[q[b]] * nested[b / 256]) + offset), two roundings (no FMA).
struct Dyn256 {
  float v[256];
};
constexpr int kDqThreads = 256;

__global__ void __launch_bounds__(kDqThreads)
absmax_dq_kernel(const uint8_t* __restrict__ q, const float* __restrict__ nested, const float* __restrict__ offset,
                 int64_t nb, const __grid_constant__ Dyn256 dyn, float* __restrict__ out) {
  QK_LAUNCH_BOUNDS(kDqThreads);
  QK_SHARED(float, s_dyn, [256]);
  s_dyn[threadIdx.x] = dyn.v[threadIdx.x];  // blockDim.x == 256: the whole map, one value a thread
  __syncthreads();
  const float off = __ldg(offset);
  for (int64_t b = static_cast<int64_t>(blockIdx.x) * kDqThreads + threadIdx.x; b < nb;
       b += static_cast<int64_t>(gridDim.x) * kDqThreads)
    out[b] = __fadd_rn(__fmul_rn(s_dyn[q[b]], __ldg(nested + (b >> 8))), off);
}

}  // namespace

cudaError_t weight_only_gemm(const void* x, DType xt, const void* w, bool int4, const float* scale_b,
                             const uint8_t* zero_b, int64_t num_groups, const float* bias, int64_t M, int64_t N,
                             int64_t K, void* y, int splits, float* workspace, cudaStream_t stream) {
  if (M <= 0 || N <= 0) return cudaSuccess;
  const uint8_t* wb = static_cast<const uint8_t*>(w);
  return with_dtype(xt, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    const T* xt_ = static_cast<const T*>(x);
    T* yt = static_cast<T*>(y);
    return int4 ? run_weight_only<T, true, false>(xt_, wb, scale_b, zero_b, num_groups, bias, M, N, K, yt, splits,
                                                  workspace, Code16{}, 0, stream)
                : run_weight_only<T, false, false>(xt_, wb, scale_b, nullptr, 1, bias, M, N, K, yt, splits,
                                                   workspace, Code16{}, 0, stream);
  });
}

cudaError_t decode_absmax_4bit(const uint8_t* q, const float* nested, const float* offset, int64_t nb, float* out,
                               cudaStream_t stream) {
  if (nb <= 0) return cudaSuccess;
  Dyn256 dyn;
  for (int i = 0; i < 256; ++i) dyn.v[i] = kDynamic[i];
  const int64_t blocks = ceil_div(nb, kDqThreads);
  QK_LAUNCH(absmax_dq_kernel, static_cast<unsigned>(blocks < 4096 ? blocks : 4096), kDqThreads, 0, stream, q, nested,
            offset, nb, dyn, out);
  return cudaGetLastError();
}

cudaError_t gemm_4bit(const void* x, DType xt, const uint8_t* packed, bool nf4, const float* absmax,
                      int64_t blocksize, const float* bias, int64_t M, int64_t N, int64_t K, void* y, int splits,
                      float* workspace, cudaStream_t stream) {
  if (M <= 0 || N <= 0) return cudaSuccess;
  if (blocksize < 32 || blocksize > 4096 || (blocksize & (blocksize - 1)) != 0 || K % 2 != 0)
    return cudaErrorInvalidValue;  // the bindings refuse these first
  int lb = 0;
  while ((int64_t{1} << lb) < blocksize) ++lb;
  const Code16 code = code_table_4bit(nf4);
  return with_dtype(xt, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    return run_weight_only<T, true, true>(static_cast<const T*>(x), packed, absmax, nullptr, 1, bias, M, N, K,
                                          static_cast<T*>(y), splits, workspace, code, lb, stream);
  });
}

}  // namespace cuda
}  // namespace quantkernels
