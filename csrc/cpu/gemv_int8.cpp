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
// kernel therefore prefetches the NEXT tile (NR rows further, same offset) while it computes
// on this one: one prefetcht0 per 64-byte line, the next tile's pages are in flight early.
// Threads split N (at::parallel_for, so torch.set_num_threads is respected).
//
// QUANTKERNELS_CPU_ISA=portable selects plain C++ loops (same integer results).
#include "gemv_int8.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

#include "cpu_isa.h"

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
  const int64_t ahead = NR * K;  // the next tile, same offset
  __m256i acc[MM][NR];
  for (int m = 0; m < MM; ++m)
    for (int r = 0; r < NR; ++r) acc[m][r] = _mm256_setzero_si256();
  const int64_t K64 = K / kLine * kLine;
  int64_t k = 0;
  for (; k < K64; k += kLine) {
    for (int r = 0; r < NR; ++r) _mm_prefetch(reinterpret_cast<const char*>(b[r] + k + ahead), _MM_HINT_T0);
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
  const int64_t ahead = NR * K;  // the next tile, same offset
  const __m256i ones16 = _mm256_set1_epi16(1);
  __m256i acc[MM][NR];
  for (int m = 0; m < MM; ++m)
    for (int r = 0; r < NR; ++r) acc[m][r] = _mm256_setzero_si256();
  const int64_t K64 = K / kLine * kLine;
  int64_t k = 0;
  for (; k < K64; k += kLine) {
    for (int r = 0; r < NR; ++r) _mm_prefetch(reinterpret_cast<const char*>(b[r] + k + ahead), _MM_HINT_T0);
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

// VNNI tiles (AVX-512 VNNI zmm, AVX-VNNI ymm): NR b rows x MM rows of a over all of K, 64 (32)
// bytes of each b row per step, b offset in-register (b ^ 0x80 = b + 128 as u8, a stays s8) and
// vpdpbusd; the sums start from -128 * rowsum(a[m]) (asum). Exact for every int8 input: see
// gemm_int8.cpp's VNNI note (the sums wrap mod 2^32 and the true result fits int32).
// One load + one xor per 64 bytes of b, shared by the MM rows of a; prefetch as in the AVX2 tile.
QK_TARGET_AVX512VNNI inline __m128i hsum4_512(__m512i v0, __m512i v1, __m512i v2, __m512i v3) {
  const __m512i t0 = _mm512_add_epi32(_mm512_unpacklo_epi32(v0, v1), _mm512_unpackhi_epi32(v0, v1));
  const __m512i t1 = _mm512_add_epi32(_mm512_unpacklo_epi32(v2, v3), _mm512_unpackhi_epi32(v2, v3));
  const __m512i u = _mm512_add_epi32(_mm512_unpacklo_epi64(t0, t1), _mm512_unpackhi_epi64(t0, t1));
  const __m256i h = _mm256_add_epi32(_mm512_castsi512_si256(u), _mm512_extracti64x4_epi64(u, 1));
  return _mm_add_epi32(_mm256_castsi256_si128(h), _mm256_extracti128_si256(h, 1));
}

template <int MM, int NR>
QK_TARGET_AVX512VNNI void tile_vnni512(const int8_t* A, const int32_t* asum, const int8_t* B, int64_t K, int64_t n,
                                       int32_t* c, int64_t ldc, int64_t j0) {
  const int8_t* b[NR];
  for (int r = 0; r < NR; ++r) b[r] = B + (n + r) * K;
  const int64_t ahead = NR * K;  // the next tile, same offset
  const __m512i x80 = _mm512_set1_epi8(int8_t(0x80));
  __m512i acc[MM][NR];
#pragma GCC unroll 8
  for (int m = 0; m < MM; ++m)
#pragma GCC unroll 8
    for (int r = 0; r < NR; ++r) acc[m][r] = _mm512_setzero_si512();
  int64_t k = 0;
  for (; k + kLine <= K; k += kLine) {
#pragma GCC unroll 8
    for (int r = 0; r < NR; ++r) _mm_prefetch(reinterpret_cast<const char*>(b[r] + k + ahead), _MM_HINT_T0);
    __m512i av[MM];
#pragma GCC unroll 8
    for (int m = 0; m < MM; ++m) av[m] = _mm512_loadu_si512(A + m * K + k);
#pragma GCC unroll 8
    for (int r = 0; r < NR; ++r) {
      const __m512i bv = _mm512_xor_si512(_mm512_loadu_si512(b[r] + k), x80);
#pragma GCC unroll 8
      for (int m = 0; m < MM; ++m) acc[m][r] = _mm512_dpbusd_epi32(acc[m][r], bv, av[m]);
    }
  }
  if (k < K) {  // K tail: both operands zero past K ((0 ^ 0x80) * 0 = 0)
    const __mmask64 mk = _cvtu64_mask64((~uint64_t(0)) >> (64 - (K - k)));
    __m512i av[MM];
    for (int m = 0; m < MM; ++m) av[m] = _mm512_maskz_loadu_epi8(mk, A + m * K + k);
    for (int r = 0; r < NR; ++r) {
      const __m512i bv = _mm512_xor_si512(_mm512_maskz_loadu_epi8(mk, b[r] + k), x80);
      for (int m = 0; m < MM; ++m) acc[m][r] = _mm512_dpbusd_epi32(acc[m][r], bv, av[m]);
    }
  }
  const __m512i z = _mm512_setzero_si512();
#pragma GCC unroll 8
  for (int m = 0; m < MM; ++m) {
    const uint32_t base = uint32_t(-128 * asum[m]);
#pragma GCC unroll 8
    for (int r0 = 0; r0 < NR; r0 += 4) {
      const __m128i s = hsum4_512(acc[m][r0], r0 + 1 < NR ? acc[m][r0 + 1 < NR ? r0 + 1 : r0] : z,
                                  r0 + 2 < NR ? acc[m][r0 + 2 < NR ? r0 + 2 : r0] : z,
                                  r0 + 3 < NR ? acc[m][r0 + 3 < NR ? r0 + 3 : r0] : z);
      alignas(16) int32_t v[4];
      _mm_store_si128(reinterpret_cast<__m128i*>(v), s);
      for (int r = r0; r < NR && r < r0 + 4; ++r) c[m * ldc + j0 + r] = int32_t(base + uint32_t(v[r - r0]));
    }
  }
}

QK_TARGET_AVXVNNI inline __m128i hsum4_256(__m256i v0, __m256i v1, __m256i v2, __m256i v3) {
  const __m256i t0 = _mm256_add_epi32(_mm256_unpacklo_epi32(v0, v1), _mm256_unpackhi_epi32(v0, v1));
  const __m256i t1 = _mm256_add_epi32(_mm256_unpacklo_epi32(v2, v3), _mm256_unpackhi_epi32(v2, v3));
  const __m256i u = _mm256_add_epi32(_mm256_unpacklo_epi64(t0, t1), _mm256_unpackhi_epi64(t0, t1));
  return _mm_add_epi32(_mm256_castsi256_si128(u), _mm256_extracti128_si256(u, 1));
}

template <int MM, int NR>
QK_TARGET_AVXVNNI void tile_vnni256(const int8_t* A, const int32_t* asum, const int8_t* B, int64_t K, int64_t n,
                                    int32_t* c, int64_t ldc, int64_t j0) {
  const int8_t* b[NR];
  for (int r = 0; r < NR; ++r) b[r] = B + (n + r) * K;
  const int64_t ahead = NR * K;
  const __m256i x80 = _mm256_set1_epi8(int8_t(0x80));
  __m256i acc[MM][NR];
  for (int m = 0; m < MM; ++m)
    for (int r = 0; r < NR; ++r) acc[m][r] = _mm256_setzero_si256();
  int64_t k = 0;
  for (; k + kLine <= K; k += kLine) {
    for (int r = 0; r < NR; ++r) _mm_prefetch(reinterpret_cast<const char*>(b[r] + k + ahead), _MM_HINT_T0);
#pragma GCC unroll 2
    for (int64_t kk = k; kk < k + kLine; kk += 32) {
      __m256i av[MM];
      for (int m = 0; m < MM; ++m) av[m] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(A + m * K + kk));
      for (int r = 0; r < NR; ++r) {
        const __m256i bv = _mm256_xor_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(b[r] + kk)), x80);
        for (int m = 0; m < MM; ++m) acc[m][r] = _mm256_dpbusd_avx_epi32(acc[m][r], bv, av[m]);
      }
    }
  }
  const __m256i z = _mm256_setzero_si256();
  for (int m = 0; m < MM; ++m) {
    const int8_t* a = A + m * K;
    const uint32_t base = uint32_t(-128 * asum[m]);
    for (int r0 = 0; r0 < NR; r0 += 4) {
      const __m128i s = hsum4_256(acc[m][r0], r0 + 1 < NR ? acc[m][r0 + 1 < NR ? r0 + 1 : r0] : z,
                                  r0 + 2 < NR ? acc[m][r0 + 2 < NR ? r0 + 2 : r0] : z,
                                  r0 + 3 < NR ? acc[m][r0 + 3 < NR ? r0 + 3 : r0] : z);
      alignas(16) int32_t v[4];
      _mm_store_si128(reinterpret_cast<__m128i*>(v), s);
      for (int r = r0; r < NR && r < r0 + 4; ++r) {
        uint32_t sum = base + uint32_t(v[r - r0]);
        // K tail (< 64 bytes), with the same +128 offset as the vector part.
        for (int64_t t = k; t < K; ++t) sum += uint32_t(int32_t(a[t]) * (int32_t(b[r][t]) + 128));
        c[m * ldc + j0 + r] = int32_t(sum);
      }
    }
  }
}

template <int MM, bool zmm>
void rows_vnni_mm(const int8_t* A, const int32_t* asum, const int8_t* B, int64_t K, int64_t n0, int64_t n1,
                  int32_t* c, int64_t ldc) {
  constexpr int NR = zmm ? (MM <= 2 ? 8 : 4) : (MM <= 2 ? 4 : 2);
  int64_t n = n0;
  if constexpr (zmm) {
    for (; n + NR <= n1; n += NR) tile_vnni512<MM, NR>(A, asum, B, K, n, c, ldc, n - n0);
    for (; n < n1; ++n) tile_vnni512<MM, 1>(A, asum, B, K, n, c, ldc, n - n0);
  } else {
    for (; n + NR <= n1; n += NR) tile_vnni256<MM, NR>(A, asum, B, K, n, c, ldc, n - n0);
    for (; n < n1; ++n) tile_vnni256<MM, 1>(A, asum, B, K, n, c, ldc, n - n0);
  }
}

template <bool zmm>
void rows_vnni(const int8_t* A, const int32_t* asum, int64_t M, const int8_t* B, int64_t K, int64_t n0, int64_t n1,
               int32_t* c, int64_t ldc) {
  switch (M) {
    case 1: rows_vnni_mm<1, zmm>(A, asum, B, K, n0, n1, c, ldc); break;
    case 2: rows_vnni_mm<2, zmm>(A, asum, B, K, n0, n1, c, ldc); break;
    case 3: rows_vnni_mm<3, zmm>(A, asum, B, K, n0, n1, c, ldc); break;
    default: rows_vnni_mm<4, zmm>(A, asum, B, K, n0, n1, c, ldc); break;
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
      if (vnni512) {
        rows_vnni<true>(src, asum, M, B, K, j0, j1, c, ldc);
      } else if (vnni256) {
        rows_vnni<false>(src, asum, M, B, K, j0, j1, c, ldc);
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
