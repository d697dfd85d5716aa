// CPU kernels for quantkernels::int8_gemm and quantkernels::w8a8_gemm (plain layout).
//
//   int8_gemm:  C[m, n] = sum_k a[m, k] * b[n, k]                  int8 x int8 -> int32, exact
//   w8a8_gemm:  Y[m, n] = C[m, n] * scale_a[m] * scale_b[n] + bias[n]   fp32 epilogue, then cast
//
// a is int8 [M, K] (activations), b is int8 [N, K] (weights, F.linear layout, plain row-major).
//
// Exactness. Both ops use one integer path that is exact for every int8 value, -128 included:
// a is widened to int16 once per call (a small [M, K16] buffer), each 16-byte chunk of a b row
// is sign-extended to int16 in registers (vpmovsxbw), and _mm256_madd_epi16 forms int32 sums of
// two products (|2 * 128 * 128| = 32768 fits in int32; madd_epi16 only wraps for two
// (-32768)^2 products, impossible here). We do NOT use the u8 x s8 maddubs trick: its int16
// pair sum saturates for (-128) * (-128) * 2 = 32768, so it would need a pre-scan of int8_gemm
// inputs, and on Zen3 it costs the same number of multiply uops per 32 MACs (maddubs + madd
// with ones) as two madd_epi16, so there is nothing to win. K <= 131071 keeps every int32
// partial sum in range (128 * 128 * K < 2^31).
//
// Blocking. Micro-kernel: MR = 2 rows of a x NR = 4 rows of b, 8 ymm int32 accumulators,
// K in steps of 16, one horizontal reduction per K block (2 x 6 and 3 x 4 tiles spill or run
// slower with GCC 12 on Zen3). Cache blocking: KC = 4096 along K (the 4 x KC b tile, 16 KB,
// stays in L1 while the a rows of the M block stream past it from L2; KC = 1024 measured ~20%
// slower at K = 4096: more reductions and C read-modify-writes), MC = 128 rows of a, NC = 96
// rows of b (reused from L2 across M blocks). Threads split (N block, M block) tasks with N outer, so
// consecutive tasks of one thread reuse the same b block from L2.
//
// ISA: the AVX2 micro-kernel is compiled per function with target("avx2,fma") and chosen at run
// time (QUANTKERNELS_CPU_ISA=portable forces the plain C++ path, read on every call).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>

#include "gemm_int8.h"
#include "gemv_int8.h"

#include "cpu_isa.h"

namespace quantkernels {
namespace cpu {
namespace {

bool gemm_use_avx2() { return active_isa() == Isa::Avx2; }
std::string gemm_dtype_name(c10::ScalarType t) { return dtype_name(t); }

constexpr int MR = 2;        // rows of a per micro-kernel
constexpr int NR = 4;        // rows of b per micro-kernel
constexpr int64_t KC = 4096; // K block (multiple of 16)
constexpr int64_t MC = 128;  // M block
constexpr int64_t NC = 96;   // N block (multiple of NR)
constexpr int64_t MAX_K = (int64_t(1) << 31) / (128 * 128) - 1;  // 131071, as _validate.MAX_K_INT8

// ------------------------------------------------------------------------------ micro-kernels
// C[i, j] (+)= sum_{k < kc} A[i * lda + k] * B[j * ldb + k] for i < mr, j < nr.
// A: int16 (widened a), B: int8 (plain b), C: int32 with row stride ldc.

template <int mr, int nr>
void micro_portable(const int16_t* A, int64_t lda, const int8_t* B, int64_t ldb, int64_t kc,
                    int32_t* C, int64_t ldc, bool accumulate) {
  for (int i = 0; i < mr; ++i) {
    for (int j = 0; j < nr; ++j) {
      const int16_t* a = A + i * lda;
      const int8_t* b = B + j * ldb;
      int32_t s = 0;
      for (int64_t k = 0; k < kc; ++k) s += int32_t(a[k]) * int32_t(b[k]);
      int32_t* c = C + i * ldc + j;
      *c = accumulate ? *c + s : s;
    }
  }
}

#if QK_X86
QK_TARGET_AVX2 inline int32_t hsum_epi32(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1));
  return _mm_cvtsi128_si32(s);
}

template <int mr, int nr>
QK_TARGET_AVX2 void micro_avx2(const int16_t* A, int64_t lda, const int8_t* B, int64_t ldb, int64_t kc,
                               int32_t* C, int64_t ldc, bool accumulate) {
  __m256i acc[mr][nr];
#pragma GCC unroll 8
  for (int i = 0; i < mr; ++i)
#pragma GCC unroll 8
    for (int j = 0; j < nr; ++j) acc[i][j] = _mm256_setzero_si256();
  int64_t k = 0;
  for (; k + 16 <= kc; k += 16) {
    __m256i av[mr];
#pragma GCC unroll 8
    for (int i = 0; i < mr; ++i) av[i] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(A + i * lda + k));
#pragma GCC unroll 8
    for (int j = 0; j < nr; ++j) {
      const __m256i bv = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(B + j * ldb + k)));
#pragma GCC unroll 8
      for (int i = 0; i < mr; ++i) acc[i][j] = _mm256_add_epi32(acc[i][j], _mm256_madd_epi16(av[i], bv));
    }
  }
  int32_t r[mr][nr];
#pragma GCC unroll 8
  for (int i = 0; i < mr; ++i)
#pragma GCC unroll 8
    for (int j = 0; j < nr; ++j) r[i][j] = hsum_epi32(acc[i][j]);
  for (int i = 0; i < mr; ++i) {
    for (int j = 0; j < nr; ++j) {
      int32_t s = r[i][j];
      const int16_t* a = A + i * lda;
      const int8_t* b = B + j * ldb;
      for (int64_t t = k; t < kc; ++t) s += int32_t(a[t]) * int32_t(b[t]);  // K tail (< 16)
      int32_t* c = C + i * ldc + j;
      *c = accumulate ? *c + s : s;
    }
  }
}
#endif

using MicroFn = void (*)(const int16_t*, int64_t, const int8_t*, int64_t, int64_t, int32_t*, int64_t, bool);

template <int mr, int nr>
MicroFn pick_one(bool avx2) {
#if QK_X86
  if (avx2) return &micro_avx2<mr, nr>;
#endif
  (void)avx2;
  return &micro_portable<mr, nr>;
}

// table[mr - 1][nr - 1]: full tiles and every M / N tail shape.
struct MicroTable {
  MicroFn fn[MR][NR];
  explicit MicroTable(bool avx2) {
    fn[0][0] = pick_one<1, 1>(avx2); fn[0][1] = pick_one<1, 2>(avx2);
    fn[0][2] = pick_one<1, 3>(avx2); fn[0][3] = pick_one<1, 4>(avx2);
    fn[1][0] = pick_one<2, 1>(avx2); fn[1][1] = pick_one<2, 2>(avx2);
    fn[1][2] = pick_one<2, 3>(avx2); fn[1][3] = pick_one<2, 4>(avx2);
  }
};
static_assert(MR == 2 && NR == 4, "update MicroTable");

// ------------------------------------------------------------------------------ driver

// a (int8 [M, K]) -> int16 [M, lda] with lda = K rounded up to 16 (padding never read as data).
at::Tensor widen_a(const at::Tensor& a, int64_t M, int64_t K, int64_t lda) {
  at::Tensor a16 = at::empty({M, lda}, a.options().dtype(at::kShort));
  const int8_t* src = a.data_ptr<int8_t>();
  int16_t* dst = a16.data_ptr<int16_t>();
  at::parallel_for(0, M, 64, [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m) {
      for (int64_t k = 0; k < K; ++k) dst[m * lda + k] = src[m * K + k];
      for (int64_t k = K; k < lda; ++k) dst[m * lda + k] = 0;
    }
  });
  return a16;
}

// Epilogue for one [mb, nb] block of int32 sums: Y = C * sa[m] * sb[n] (+ bias[n]), in the
// reference's order ((c * sa) * sb) + bias, separate roundings (this function is compiled for
// baseline x86-64, so no FMA contraction), then cast to out_t (round to nearest even).
template <typename out_t>
void epilogue_block(const int32_t* C, int64_t ldc, int64_t mb, int64_t nb, const float* sa, const float* sb,
                    const float* bias, out_t* Y, int64_t ldy) {
  for (int64_t i = 0; i < mb; ++i) {
    const float s = sa[i];
    const int32_t* c = C + i * ldc;
    out_t* y = Y + i * ldy;
    if (bias != nullptr) {
      for (int64_t j = 0; j < nb; ++j) {
        float v = static_cast<float>(c[j]) * s;
        v = v * sb[j];
        v = v + bias[j];
        y[j] = static_cast<out_t>(v);
      }
    } else {
      for (int64_t j = 0; j < nb; ++j) {
        float v = static_cast<float>(c[j]) * s;
        v = v * sb[j];
        y[j] = static_cast<out_t>(v);
      }
    }
  }
}

template <typename out_t>
void epilogue_erased(const int32_t* C, int64_t ldc, int64_t mb, int64_t nb, const float* sa, const float* sb,
                     const float* bias, void* Y, int64_t ldy) {
  epilogue_block<out_t>(C, ldc, mb, nb, sa, sb, bias, static_cast<out_t*>(Y), ldy);
}

}  // namespace

// The GEMM over plain a [M, K] (int8) and b [N, K] (int8), declared in gemm_int8.h. If ep.fn is
// null, the int32 result goes to c_out [M, N]; otherwise each finished block goes through ep.fn into ep.y.
void gemm_driver(const at::Tensor& a, const at::Tensor& b, int64_t M, int64_t N, int64_t K, int32_t* c_out,
                 const Epilogue& ep) {
  const bool avx2 = gemm_use_avx2();  // read on the calling thread, once per call
  const MicroTable table(avx2);
  const int64_t lda = (K + 15) / 16 * 16;
  const at::Tensor a16 = widen_a(a, M, K, lda);
  const int16_t* A = a16.data_ptr<int16_t>();
  const int8_t* B = b.data_ptr<int8_t>();
  const int64_t n_blocks = (N + NC - 1) / NC;
  const int64_t m_blocks = (M + MC - 1) / MC;
  at::parallel_for(0, n_blocks * m_blocks, 1, [&](int64_t t0, int64_t t1) {
    // Per-thread int32 block for the fused epilogue (w8a8); int8_gemm writes to the output.
    const bool fused = ep.fn != nullptr || ep.block_fn != nullptr;
    std::vector<int32_t> cbuf(fused ? size_t(MC * NC) : size_t(0));
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t nbk = t / m_blocks, mbk = t % m_blocks;  // N outer: b block reused across tasks
      const int64_t n0 = nbk * NC, nb = std::min(NC, N - n0);
      const int64_t m0 = mbk * MC, mb = std::min(MC, M - m0);
      int32_t* C;
      int64_t ldc;
      if (fused) {
        C = cbuf.data();
        ldc = NC;
      } else {
        C = c_out + m0 * N + n0;
        ldc = N;
      }
      if (K == 0) {
        for (int64_t i = 0; i < mb; ++i) std::fill(C + i * ldc, C + i * ldc + nb, 0);
      }
      for (int64_t k0 = 0; k0 < K; k0 += KC) {
        const int64_t kc = std::min(KC, K - k0);
        const bool accumulate = k0 > 0;
        for (int64_t j = 0; j < nb; j += NR) {
          const int nr = int(std::min<int64_t>(NR, nb - j));
          const int8_t* Bt = B + (n0 + j) * K + k0;
          for (int64_t i = 0; i < mb; i += MR) {
            const int mr = int(std::min<int64_t>(MR, mb - i));
            table.fn[mr - 1][nr - 1](A + (m0 + i) * lda + k0, lda, Bt, K, kc, C + i * ldc + j, ldc, accumulate);
          }
        }
      }
      if (ep.block_fn) {
        ep.block_fn(ep.ctx, C, ldc, m0, mb, n0, nb);
      } else if (ep.fn) {
        ep.fn(C, ldc, mb, nb, ep.sa + m0, ep.sb + n0, ep.bias ? ep.bias + n0 : nullptr,
              ep.y + (m0 * N + n0) * ep.elem_size, N);
      }
    }
  });
}

namespace {

// ------------------------------------------------------------------------------ validation
// Messages mirror quantkernels/_validate.py: "quantkernels.<op>: <arg> must ..., got <value>".

std::string shape_str(at::IntArrayRef s) {
  std::string r = "(";
  for (size_t i = 0; i < s.size(); ++i) {
    r += std::to_string(s[i]);
    if (s.size() == 1 || i + 1 < s.size()) r += s.size() == 1 ? "," : ", ";
  }
  return r + ")";
}

void check_int8_operands(const char* op, const at::Tensor& a, const at::Tensor& b) {
  TORCH_CHECK_TYPE(a.scalar_type() == at::kChar, "quantkernels.", op, ": a must have dtype in ['torch.int8'], got ",
                   gemm_dtype_name(a.scalar_type()));
  TORCH_CHECK_VALUE(a.dim() == 2, "quantkernels.", op, ": a must be 2-D [M, K] activation, got shape ",
                    shape_str(a.sizes()));
  TORCH_CHECK_TYPE(b.scalar_type() == at::kChar, "quantkernels.", op, ": b must have dtype in ['torch.int8'], got ",
                   gemm_dtype_name(b.scalar_type()));
  TORCH_CHECK_VALUE(b.dim() == 2, "quantkernels.", op, ": b must be 2-D [N, K] weight, got shape ",
                    shape_str(b.sizes()));
  TORCH_CHECK_VALUE(b.size(1) == a.size(1), "quantkernels.", op, ": b must have K = ", a.size(1),
                    " columns to match a ", shape_str(a.sizes()), ", got shape ", shape_str(b.sizes()));
  TORCH_CHECK_VALUE(b.device() == a.device(), "quantkernels.", op, ": b is on ", b.device(), " but a is on ",
                    a.device(), "; all tensors must be on one device");
  const int64_t K = a.size(1);
  TORCH_CHECK_VALUE(K <= MAX_K, "quantkernels.", op, ": K = ", K, " exceeds ", MAX_K,
                    ", beyond which the int32 accumulator could overflow");
}

void check_scale(const char* op, const char* name, const at::Tensor& s, int64_t n, const char* what,
                 const at::Tensor& a) {
  TORCH_CHECK_TYPE(s.scalar_type() == at::kFloat, "quantkernels.", op, ": ", name,
                   " must have dtype in ['torch.float32'], got ", gemm_dtype_name(s.scalar_type()));
  TORCH_CHECK_VALUE(s.dim() == 1 && s.size(0) == n, "quantkernels.", op, ": ", name, " must have shape (", n,
                    ",) ", what, ", got ", shape_str(s.sizes()));
  TORCH_CHECK_VALUE(s.device() == a.device(), "quantkernels.", op, ": ", name, " is on ", s.device(),
                    " but a is on ", a.device(), "; all tensors must be on one device");
}

// ------------------------------------------------------------------------------ ops

at::Tensor int8_gemm_cpu(const at::Tensor& a_in, const at::Tensor& b_in) {
  check_int8_operands("int8_gemm", a_in, b_in);
  const at::Tensor a = a_in.contiguous(), b = b_in.contiguous();
  const int64_t M = a.size(0), N = b.size(0), K = a.size(1);
  at::Tensor c = at::empty({M, N}, a.options().dtype(at::kInt));
  if (M == 0 || N == 0) return c;
  if (M <= kGemvInt8MaxM) gemv_int8(a, b, M, N, K, c.data_ptr<int32_t>(), Epilogue{});  // decode (gemv_int8.cpp)
  else gemm_driver(a, b, M, N, K, c.data_ptr<int32_t>(), Epilogue{});
  return c;
}

at::Tensor w8a8_gemm_cpu(const at::Tensor& a_in, const at::Tensor& b_in, const at::Tensor& scale_a_in,
                         const at::Tensor& scale_b_in, const std::optional<at::Tensor>& bias_in,
                         std::optional<at::ScalarType> out_dtype) {
  const char* op = "w8a8_gemm";
  check_int8_operands(op, a_in, b_in);
  const int64_t M = a_in.size(0), N = b_in.size(0), K = a_in.size(1);
  check_scale(op, "scale_a", scale_a_in, M, "(one per-token scale per row of a)", a_in);
  check_scale(op, "scale_b", scale_b_in, N, "(one per-channel scale per row of b)", a_in);
  at::Tensor bias;
  if (bias_in.has_value()) {
    const at::Tensor& bb = *bias_in;
    const auto bt = bb.scalar_type();
    TORCH_CHECK_TYPE(bt == at::kHalf || bt == at::kBFloat16 || bt == at::kFloat, "quantkernels.", op,
                     ": bias must have dtype in ['torch.float16', 'torch.bfloat16', 'torch.float32'], got ",
                     gemm_dtype_name(bt));
    TORCH_CHECK_VALUE(bb.dim() == 1 && bb.size(0) == N, "quantkernels.", op, ": bias must have shape (", N,
                      ",) (one value per output channel N), got ", shape_str(bb.sizes()));
    TORCH_CHECK_VALUE(bb.device() == a_in.device(), "quantkernels.", op, ": bias is on ", bb.device(),
                      " but the other inputs is on ", a_in.device(), "; all tensors must be on one device");
    bias = bb.to(at::kFloat).contiguous();
  }
  const at::ScalarType dt = out_dtype.value_or(at::kFloat);
  TORCH_CHECK_TYPE(dt == at::kHalf || dt == at::kBFloat16 || dt == at::kFloat, "quantkernels.", op,
                   ": out_dtype must be one of float16, bfloat16, float32, got ", gemm_dtype_name(dt));

  const at::Tensor a = a_in.contiguous(), b = b_in.contiguous();
  const at::Tensor sa = scale_a_in.contiguous(), sb = scale_b_in.contiguous();
  at::Tensor y = at::empty({M, N}, a.options().dtype(dt));
  if (M == 0 || N == 0) return y;
  Epilogue ep;
  ep.sa = sa.data_ptr<float>();
  ep.sb = sb.data_ptr<float>();
  ep.bias = bias.defined() ? bias.data_ptr<float>() : nullptr;
  ep.y = static_cast<char*>(y.data_ptr());
  ep.elem_size = y.element_size();
  switch (dt) {
    case at::kFloat: ep.fn = &epilogue_erased<float>; break;
    case at::kHalf: ep.fn = &epilogue_erased<c10::Half>; break;
    default: ep.fn = &epilogue_erased<c10::BFloat16>; break;
  }
  if (M <= kGemvInt8MaxM) gemv_int8(a, b, M, N, K, nullptr, ep);  // decode (gemv_int8.cpp)
  else gemm_driver(a, b, M, N, K, nullptr, ep);
  return y;
}

}  // namespace
}  // namespace cpu
}  // namespace quantkernels

TORCH_LIBRARY_IMPL(quantkernels, CPU, m) {
  m.impl("int8_gemm", &quantkernels::cpu::int8_gemm_cpu);
  m.impl("w8a8_gemm", &quantkernels::cpu::w8a8_gemm_cpu);
}
