// Decode GEMV for int8_gemm / w8a8_gemm at M <= 4: C[m, n] = sum_k a[m, k] * b[n, k], exact int32.
//
// Memory bound: b ([N, K] int8, plain row-major) is streamed once; all M rows of a share every
// load. a is widened to int16 once per call ([M, K16], zero padded, a few KB) and each 16-byte
// chunk of a b row is sign-extended to int16 in registers (vpmovsxbw); _mm256_madd_epi16 gives
// int32 sums of two products, exact for every int8 value including -128 (|2 * 128 * 128| = 2^15
// fits int32), and K <= 131071 keeps the int32 sums in range (the caller checks K).
//
// When a holds no -128 (w8a8 activations from our quantizers are in [-127, 127]) the AVX2 path
// uses u8 x s8 maddubs on |b| and sign(a, b) instead: 32 bytes of b per step, no widening
// (measured ~1.4x fewer cycles at M = 4, single thread); a raw int8_gemm input with -128 takes
// the int16 path, which is exact for every value.
//
// Tiles of NR consecutive b rows x all M rows of a (MM * NR <= 8 int32 accumulators). A b row
// is one 4 KB page at K = 4096, where the hardware prefetchers restart on every page; the
// kernel therefore prefetches a tile >= 32 KB further on (whole tiles, same offset) while it
// computes on this one: one prefetcht1 per 64-byte line, into L2 (L1's fill buffers capped the
// stream when it prefetched into L1; gemm_int8_vnni.h has the numbers).
// Threads split N (at::parallel_for, so torch.set_num_threads is respected).
//
// avx512_vnni / avx512_bf16 and avx_vnni run the VNNI tile of gemm_int8_vnni.h instead (zmm /
// ymm vpdpbusd, exact for every int8 input, see rows_vnni below): one load + xor per 64 bytes of b.
// QUANTKERNELS_CPU_ISA=portable selects plain C++ loops (same integer results).
#include "gemv_int8.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

#include "cpu_isa.h"
#include "gemm_int8_vnni.h"

namespace quantkernels {
namespace cpu {
namespace {

constexpr int64_t kLine = 64;

// c[m * ldc + (r)] for rows n0 .. n0 + nr - 1 (portable).
void rows_portable(const int16_t* A, int64_t lda, int64_t M, const int8_t* B, int64_t K, int64_t n0, int64_t n1,
                   int32_t* c, int64_t ldc) {
  for (int64_t n = n0; n < n1; ++n) {
    const int8_t* b = B + n * K;
    for (int64_t m = 0; m < M; ++m) {
      const int16_t* a = A + m * lda;
      int32_t s = 0;
      for (int64_t k = 0; k < K; ++k) s += int32_t(a[k]) * int32_t(b[k]);
      c[m * ldc + (n - n0)] = s;
    }
  }
}

#if QK_X86
QK_TARGET_AVX2 inline int32_t hsum_i32(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1));
  return _mm_cvtsi128_si32(s);
}

// NR rows of b from row n (local column j0 of c) x MM rows of a.
template <int MM, int NR>
QK_TARGET_AVX2 void tile_avx2(const int16_t* A, int64_t lda, const int8_t* B, int64_t K, int64_t n, int32_t* c,
                              int64_t ldc, int64_t j0) {
  const int8_t* b[NR];
  for (int r = 0; r < NR; ++r) b[r] = B + (n + r) * K;
  const int64_t ahead = vnni::pf_ahead_bytes(NR * K);  // whole tiles >= 32 KB further on, same offset
  __m256i acc[MM][NR];
  for (int m = 0; m < MM; ++m)
    for (int r = 0; r < NR; ++r) acc[m][r] = _mm256_setzero_si256();
  const int64_t K64 = K / kLine * kLine;
  int64_t k = 0;
  for (; k < K64; k += kLine) {
    for (int r = 0; r < NR; ++r) _mm_prefetch(reinterpret_cast<const char*>(b[r] + k + ahead), _MM_HINT_T1);
#pragma GCC unroll 4
    for (int64_t kk = k; kk < k + kLine; kk += 16) {
      __m256i av[MM];
      for (int m = 0; m < MM; ++m) av[m] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(A + m * lda + kk));
      for (int r = 0; r < NR; ++r) {
        const __m256i bv = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b[r] + kk)));
        for (int m = 0; m < MM; ++m) acc[m][r] = _mm256_add_epi32(acc[m][r], _mm256_madd_epi16(av[m], bv));
      }
    }
  }
  for (; k + 16 <= K; k += 16) {
    __m256i av[MM];
    for (int m = 0; m < MM; ++m) av[m] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(A + m * lda + k));
    for (int r = 0; r < NR; ++r) {
      const __m256i bv = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b[r] + k)));
      for (int m = 0; m < MM; ++m) acc[m][r] = _mm256_add_epi32(acc[m][r], _mm256_madd_epi16(av[m], bv));
    }
  }
  for (int m = 0; m < MM; ++m) {
    const int16_t* a = A + m * lda;
    for (int r = 0; r < NR; ++r) {
      int32_t s = hsum_i32(acc[m][r]);
      for (int64_t t = k; t < K; ++t) s += int32_t(a[t]) * int32_t(b[r][t]);  // K tail (< 16)
      c[m * ldc + j0 + r] = s;
    }
  }
}

// The same tile with u8 x s8 maddubs, for a without -128 (always so for our quantizers):
// maddubs(|b|, sign(a, b)) = pair sums of |b| * (+-a) = b * a, at most 2 * 128 * 127 = 32512 (no
// int16 saturation; |-128| = 128 is read unsigned, so b may hold -128), then madd(ones) -> int32.
// 32 bytes of b per step instead of 16, and no sign extension.
template <int MM, int NR>
QK_TARGET_AVX2 void tile_ubs_avx2(const int8_t* A, int64_t lda, const int8_t* B, int64_t K, int64_t n, int32_t* c,
                                  int64_t ldc, int64_t j0) {
  const int8_t* b[NR];
  for (int r = 0; r < NR; ++r) b[r] = B + (n + r) * K;
  const int64_t ahead = vnni::pf_ahead_bytes(NR * K);  // whole tiles >= 32 KB further on, same offset
  const __m256i ones16 = _mm256_set1_epi16(1);
  __m256i acc[MM][NR];
  for (int m = 0; m < MM; ++m)
    for (int r = 0; r < NR; ++r) acc[m][r] = _mm256_setzero_si256();
  const int64_t K64 = K / kLine * kLine;
  int64_t k = 0;
  for (; k < K64; k += kLine) {
    for (int r = 0; r < NR; ++r) _mm_prefetch(reinterpret_cast<const char*>(b[r] + k + ahead), _MM_HINT_T1);
#pragma GCC unroll 2
    for (int64_t kk = k; kk < k + kLine; kk += 32) {
      __m256i av[MM];
      for (int m = 0; m < MM; ++m) av[m] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(A + m * lda + kk));
      for (int r = 0; r < NR; ++r) {
        const __m256i bv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b[r] + kk));
        const __m256i ab = _mm256_abs_epi8(bv);
        for (int m = 0; m < MM; ++m)
          acc[m][r] = _mm256_add_epi32(
              acc[m][r], _mm256_madd_epi16(_mm256_maddubs_epi16(ab, _mm256_sign_epi8(av[m], bv)), ones16));
      }
    }
  }
  for (int m = 0; m < MM; ++m) {
    const int8_t* a = A + m * lda;
    for (int r = 0; r < NR; ++r) {
      int32_t s = hsum_i32(acc[m][r]);
      for (int64_t t = k; t < K; ++t) s += int32_t(a[t]) * int32_t(b[r][t]);  // K tail (< 64)
      c[m * ldc + j0 + r] = s;
    }
  }
}

template <int MM>
void rows_ubs_mm(const int8_t* A, int64_t lda, const int8_t* B, int64_t K, int64_t n0, int64_t n1, int32_t* c,
                 int64_t ldc) {
  constexpr int NR = MM <= 2 ? 4 : 2;
  int64_t n = n0;
  for (; n + NR <= n1; n += NR) tile_ubs_avx2<MM, NR>(A, lda, B, K, n, c, ldc, n - n0);
  for (; n < n1; ++n) tile_ubs_avx2<MM, 1>(A, lda, B, K, n, c, ldc, n - n0);
}

void rows_ubs(const int8_t* A, int64_t lda, int64_t M, const int8_t* B, int64_t K, int64_t n0, int64_t n1,
              int32_t* c, int64_t ldc) {
  switch (M) {
    case 1: rows_ubs_mm<1>(A, lda, B, K, n0, n1, c, ldc); break;
    case 2: rows_ubs_mm<2>(A, lda, B, K, n0, n1, c, ldc); break;
    case 3: rows_ubs_mm<3>(A, lda, B, K, n0, n1, c, ldc); break;
    default: rows_ubs_mm<4>(A, lda, B, K, n0, n1, c, ldc); break;
  }
}

template <int MM>
void rows_avx2_mm(const int16_t* A, int64_t lda, const int8_t* B, int64_t K, int64_t n0, int64_t n1, int32_t* c,
                  int64_t ldc) {
  constexpr int NR = MM <= 2 ? 4 : 2;  // MM * NR <= 8 accumulators
  int64_t n = n0;
  for (; n + NR <= n1; n += NR) tile_avx2<MM, NR>(A, lda, B, K, n, c, ldc, n - n0);
  for (; n < n1; ++n) tile_avx2<MM, 1>(A, lda, B, K, n, c, ldc, n - n0);
}

void rows_avx2(const int16_t* A, int64_t lda, int64_t M, const int8_t* B, int64_t K, int64_t n0, int64_t n1,
               int32_t* c, int64_t ldc) {
  switch (M) {
    case 1: rows_avx2_mm<1>(A, lda, B, K, n0, n1, c, ldc); break;
    case 2: rows_avx2_mm<2>(A, lda, B, K, n0, n1, c, ldc); break;
    case 3: rows_avx2_mm<3>(A, lda, B, K, n0, n1, c, ldc); break;
    default: rows_avx2_mm<4>(A, lda, B, K, n0, n1, c, ldc); break;
  }
}

// VNNI (AVX-512 VNNI zmm, AVX-VNNI ymm): the inner-product tile of gemm_int8_vnni.h, 4 (2) b rows x
// all M rows of a over all of K, 64 (32) bytes of each b row per step, b offset in-register
// (b ^ 0x80 = b + 128 as u8, a stays s8), sums started from -128 * rowsum(a[m]): exact for every
// int8 input (see there). One load + one xor per 64 bytes of b, shared by the M rows of a; the
// tile prefetches into L2 the lines of the tile >= 32 KB further on (same offset; see
// gemm_int8_vnni.h for why L2 and not L1).
void rows_vnni(const vnni::TileTable& tb, const int8_t* A, const int32_t* asum, int64_t M, const int8_t* B, int64_t K,
               int64_t n0, int64_t n1, int32_t* c, int64_t ldc) {
  const int NR = tb.R;  // zmm: 4 b rows x M (<= 16 accumulators); ymm: 2 rows (<= 8 of 16 ymm)
  for (int64_t m = 0; m < M; ++m)
    for (int64_t n = n0; n < n1; ++n) c[m * ldc + (n - n0)] = -128 * asum[m];
  const int64_t pf = vnni::pf_ahead_bytes(NR * K);
  for (int64_t n = n0; n < n1; n += NR) {
    const int r = int(std::min<int64_t>(NR, n1 - n));
    tb.fn[r - 1][M - 1](B + n * K, K, A, K, K, c + (n - n0), ldc, pf);
  }
}
#endif

}  // namespace

void gemv_int8(const at::Tensor& a, const at::Tensor& b, int64_t M, int64_t N, int64_t K, int32_t* c_out,
               const Epilogue& ep) {
  TORCH_CHECK(M >= 1 && M <= kGemvInt8MaxM, "quantkernels: gemv_int8 called with M = ", M, " (expects 1..",
              kGemvInt8MaxM, ")");
  const Isa isa = active_isa();  // read once, on the calling thread
  const bool avx2 = isa_has_avx2(isa);
  const bool vnni512 = isa_has_vnni512(isa), vnni256 = isa_has_vnni256(isa);
  const int8_t* src = a.data_ptr<int8_t>();
  int32_t asum[kGemvInt8MaxM] = {};
  if (vnni256) int8_row_sums(src, M, K, asum);
#if QK_X86
  const vnni::TileTable tb = vnni::make_table<true>(vnni512);
#endif
  // maddubs needs a without -128 (a is tiny: checking it costs nothing next to b).
  const bool ubs = avx2 && !vnni256 && std::find(src, src + M * K, int8_t(-128)) == src + M * K;
  const int64_t lda = (K + 15) / 16 * 16;
  const bool widen = !ubs && !vnni256;
  std::vector<int16_t> a16(widen ? size_t(M * lda) : size_t(0), 0);
  if (widen)
    for (int64_t m = 0; m < M; ++m)
      for (int64_t k = 0; k < K; ++k) a16[m * lda + k] = src[m * K + k];
  const int16_t* A = a16.data();
  const int8_t* B = b.data_ptr<int8_t>();
  const bool fused = ep.fn != nullptr || ep.block_fn != nullptr;
  // Small layers stay on one thread; a big layer is split in two contiguous halves of N.
  const int64_t grain = std::max<int64_t>(16, (int64_t(1) << 16) / std::max<int64_t>(K, 1));
  at::parallel_for(0, N, grain, [&](int64_t n0, int64_t n1) {
    // Blocks of up to 256 columns: a small int32 buffer per thread when an epilogue follows.
    // A block epilogue (LLM.int8's outlier correction) reads a few scattered bytes of each of the
    // block's weight rows again: blocks of 32 rows (128 KB at K = 4096) keep them in L2; after 256
    // rows they came from L3 and the gather cost ~1/3 of the GEMV (llm_int8 at M = 1: 1.45x w8a8).
    const int64_t kBlock = ep.block_fn ? 32 : 256;
    std::vector<int32_t> cbuf(fused ? size_t(M * kBlock) : size_t(0));
    for (int64_t j0 = n0; j0 < n1; j0 += kBlock) {
      const int64_t j1 = std::min(n1, j0 + kBlock), nb = j1 - j0;
      int32_t* c = fused ? cbuf.data() : c_out + j0;
      const int64_t ldc = fused ? kBlock : N;
#if QK_X86
      if (vnni256) {
        rows_vnni(tb, src, asum, M, B, K, j0, j1, c, ldc);
      } else if (ubs) {
        rows_ubs(src, K, M, B, K, j0, j1, c, ldc);
      } else if (avx2) {
        rows_avx2(A, lda, M, B, K, j0, j1, c, ldc);
      } else
#endif
      {
        rows_portable(A, lda, M, B, K, j0, j1, c, ldc);
      }
      if (ep.block_fn) {
        ep.block_fn(ep.ctx, c, ldc, 0, M, j0, nb);
      } else if (ep.fn) {
        ep.fn(c, ldc, M, nb, ep.sa, ep.sb + j0, ep.bias ? ep.bias + j0 : nullptr, ep.y + j0 * ep.elem_size, N);
      }
    }
  });
  (void)avx2;
  (void)vnni512;
}

}  // namespace cpu
}  // namespace quantkernels
