// NF4 / FP4 weight-only GEMM on the CPU (docs/numerics.md s.11): Y = x @ to_x(code[v] * absmax[blk])^T + bias,
// fp32 products and accumulation, output in x's dtype. The weight stays packed (two codes per byte, the
// first in the high nibble); each value is decoded by a 16-entry table lookup in registers:
//   avx512 (and above): vpermps of the table (_mm512_permutexvar_ps), 16 codes per instruction;
//   avx2: two vpermps halves (_mm256_permutevar8x32_ps) blended on the nibble's bit 3;
//   portable: a scalar table lookup.
// Per block, the 16-entry table is first scaled by the block's absmax and rounded to x's dtype (the
// contract's to_x(code[v] * absmax), computed once per entry), so a value's decode is one permute.
// Paths (the active ISA level is read once per call, cpu_isa.h):
//   GEMV (M <= kGemvMaxM), avx512 with block >= 64 and K % 64 == 0: 64 values (32 bytes) per step, one
//     vpmovzxwd then four shifts + vpermps (gemv64_tile_avx512), 4 (M <= 2) or 2 weight rows per step sharing
//     the x loads (x pre-arranged in the nibble order), the block table rebuilt only when the block changes;
//   GEMV otherwise: per weight row, 32 values at a time decoded once and multiplied into every
//     activation row (x de-interleaved into even / odd columns, matching the nibble order); needs
//     K % 32 == 0 (so a 32-value chunk never straddles a block: every block size is a multiple of 32),
//     otherwise the scalar loop runs;
//   tiled (M > kGemvMaxM, K % 32 == 0): blocks of 16 weight rows decoded to a thread-local fp32 panel (the
//     values rounded to x's dtype, as the contract says), then register tiles of FMAs (4 x 4 zmm / 4 x 2 ymm);
//   otherwise (portable, or K % 32 != 0): panels of kPanelRows rows decoded by the scalar loop, at::mm in fp32.
// Double quantization: the block absmax values are first decoded to fp32 (s.11.5, the same formula).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <string>
#include <vector>

#include "cpu_isa.h"
#include "qk_checks.h"
#include "qk_4bit_codes.h"  // kNF4, kFP4Raw, kDynamic (shared with the CUDA kernels)

namespace quantkernels {
namespace cpu {
namespace {

using checks::shape_str;

constexpr int64_t kGemvMaxM = 8;
constexpr int64_t kPanelRows = 128;

struct Table {
  alignas(64) float v[16];
};

Table code_table(bool nf4) {
  Table t;
  volatile float twelve = 12.0f;  // a true IEEE division, as the reference's tensor / tensor(12.0)
  for (int i = 0; i < 16; ++i) t.v[i] = nf4 ? kNF4[i] : kFP4Raw[i] / twelve;
  return t;
}

enum class Rnd { None, BF16, F16 };

inline float round_to(float v, Rnd r) {
  if (r == Rnd::BF16) return static_cast<float>(c10::BFloat16(v));
  if (r == Rnd::F16) return static_cast<float>(c10::Half(v));
  return v;
}

struct W4 {
  const uint8_t* q;      // [N, K/2]
  const float* absmax;   // [nb], fp32 (decoded under double quantization)
  int64_t N, K, B;
  Table tab;
  Rnd rnd;
};

// One weight value, s.11.6: to_x(fp32(code[v] * absmax[blk])).
inline float weight_at(const W4& w, int64_t n, int64_t k) {
  const int64_t i = n * w.K + k;
  const uint8_t byte = w.q[i >> 1];
  const int v = (i & 1) ? (byte & 0xF) : (byte >> 4);
  return round_to(w.tab.v[v] * w.absmax[i / w.B], w.rnd);
}

// ----------------------------------------------------------------------------- portable

void gemm_rows_portable(const W4& w, const float* x, int64_t M, float* y, int64_t n0, int64_t n1) {
  for (int64_t n = n0; n < n1; ++n)
    for (int64_t m = 0; m < M; ++m) {
      float acc = 0.f;
      for (int64_t k = 0; k < w.K; ++k) acc += x[m * w.K + k] * weight_at(w, n, k);
      y[m * w.N + n] = acc;
    }
}

#if QK_X86
// GCC 12's AVX-512 intrinsic headers start from _mm512_undefined_epi32() (a self-initialised
// variable) and warn about it at every use (a known false positive); see also w4a8.cpp.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
// ----------------------------------------------------------------------------- avx2

#define QK_TARGET_4B_AVX2 __attribute__((target("avx2,fma,f16c")))

QK_TARGET_4B_AVX2 inline __m256 round8(__m256 v, Rnd r) {
  if (r == Rnd::BF16) {  // round to nearest even on the upper 16 bits (NaN and Inf keep their class)
    __m256i u = _mm256_castps_si256(v);
    const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    u = _mm256_add_epi32(u, _mm256_add_epi32(_mm256_set1_epi32(0x7FFF), lsb));
    return _mm256_castsi256_ps(_mm256_and_si256(u, _mm256_set1_epi32(static_cast<int>(0xFFFF0000u))));
  }
  if (r == Rnd::F16) return _mm256_cvtph_ps(_mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  return v;
}

QK_TARGET_4B_AVX2 inline __m256 lookup8(__m256i idx, __m256 lo, __m256 hi) {
  const __m256 a = _mm256_permutevar8x32_ps(lo, idx), b = _mm256_permutevar8x32_ps(hi, idx);
  return _mm256_blendv_ps(a, b, _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28)));  // bit 3 -> sign
}

// xe / xo: [M, K/2] even / odd columns of x. K % 32 == 0.
QK_TARGET_4B_AVX2 void gemv_rows_avx2(const W4& w, const float* xe, const float* xo,
                                                                   int64_t M, float* y, int64_t n0, int64_t n1) {
  const int64_t K2 = w.K / 2;
  const __m256 tlo = _mm256_load_ps(w.tab.v), thi = _mm256_load_ps(w.tab.v + 8);
  for (int64_t n = n0; n < n1; ++n) {
    __m256 acc[kGemvMaxM];
    for (int64_t m = 0; m < M; ++m) acc[m] = _mm256_setzero_ps();
    const uint8_t* row = w.q + n * K2;
    int64_t blk = -1;
    __m256 slo = tlo, shi = thi;
    for (int64_t j = 0; j < K2; j += 8) {  // 8 bytes = 16 values, inside one block (B >= 32, K % 32 == 0)
      const int64_t bi = (n * w.K + 2 * j) / w.B;
      if (bi != blk) {  // the block's table: to_x(code[v] * absmax)
        blk = bi;
        const __m256 a = _mm256_set1_ps(w.absmax[bi]);
        slo = round8(_mm256_mul_ps(tlo, a), w.rnd);
        shi = round8(_mm256_mul_ps(thi, a), w.rnd);
      }
      const __m256i b = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(row + j)));
      const __m256 we = lookup8(_mm256_srli_epi32(b, 4), slo, shi);
      const __m256 wo = lookup8(_mm256_and_si256(b, _mm256_set1_epi32(15)), slo, shi);
      for (int64_t m = 0; m < M; ++m) {
        acc[m] = _mm256_fmadd_ps(_mm256_loadu_ps(xe + m * K2 + j), we, acc[m]);
        acc[m] = _mm256_fmadd_ps(_mm256_loadu_ps(xo + m * K2 + j), wo, acc[m]);
      }
    }
    for (int64_t m = 0; m < M; ++m) {
      alignas(32) float t[8];
      _mm256_store_ps(t, acc[m]);
      y[m * w.N + n] = ((t[0] + t[1]) + (t[2] + t[3])) + ((t[4] + t[5]) + (t[6] + t[7]));
    }
  }
}

// Decodes weight rows [n0, n1) into panel [n1 - n0, K] (fp32 values rounded to x's dtype). K % 32 == 0.
QK_TARGET_4B_AVX2 void decode_rows_avx2(const W4& w, float* panel, int64_t n0,
                                                                     int64_t n1) {
  const int64_t K2 = w.K / 2;
  const __m256 tlo = _mm256_load_ps(w.tab.v), thi = _mm256_load_ps(w.tab.v + 8);
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* row = w.q + n * K2;
    float* out = panel + (n - n0) * w.K;
    int64_t blk = -1;
    __m256 slo = tlo, shi = thi;
    for (int64_t j = 0; j < K2; j += 8) {
      const int64_t bi = (n * w.K + 2 * j) / w.B;
      if (bi != blk) {
        blk = bi;
        const __m256 a = _mm256_set1_ps(w.absmax[bi]);
        slo = round8(_mm256_mul_ps(tlo, a), w.rnd);
        shi = round8(_mm256_mul_ps(thi, a), w.rnd);
      }
      const __m256i b = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(row + j)));
      const __m256 we = lookup8(_mm256_srli_epi32(b, 4), slo, shi);
      const __m256 wo = lookup8(_mm256_and_si256(b, _mm256_set1_epi32(15)), slo, shi);
      // interleave: out[2j + 2i] = we[i], out[2j + 2i + 1] = wo[i]
      const __m256 l = _mm256_unpacklo_ps(we, wo), h = _mm256_unpackhi_ps(we, wo);
      _mm256_storeu_ps(out + 2 * j, _mm256_permute2f128_ps(l, h, 0x20));
      _mm256_storeu_ps(out + 2 * j + 8, _mm256_permute2f128_ps(l, h, 0x31));
    }
  }
}

// ----------------------------------------------------------------------------- avx512

QK_TARGET_AVX512 inline __m512 round16(__m512 v, Rnd r) {
  if (r == Rnd::BF16) {
    __m512i u = _mm512_castps_si512(v);
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    u = _mm512_add_epi32(u, _mm512_add_epi32(_mm512_set1_epi32(0x7FFF), lsb));
    return _mm512_castsi512_ps(_mm512_and_si512(u, _mm512_set1_epi32(static_cast<int>(0xFFFF0000u))));
  }
  if (r == Rnd::F16) return _mm512_cvtph_ps(_mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  return v;
}

QK_TARGET_AVX512 void gemv_rows_avx512(const W4& w, const float* xe, const float* xo, int64_t M, float* y,
                                       int64_t n0, int64_t n1) {
  const int64_t K2 = w.K / 2;
  const __m512 tab = _mm512_load_ps(w.tab.v);
  for (int64_t n = n0; n < n1; ++n) {
    __m512 acc[kGemvMaxM];
    for (int64_t m = 0; m < M; ++m) acc[m] = _mm512_setzero_ps();
    const uint8_t* row = w.q + n * K2;
    int64_t blk = -1;
    __m512 st = tab;
    for (int64_t j = 0; j < K2; j += 16) {  // 16 bytes = 32 values, inside one block
      const int64_t bi = (n * w.K + 2 * j) / w.B;
      if (bi != blk) {  // the block's table: to_x(code[v] * absmax), 16 values decoded once per block
        blk = bi;
        st = round16(_mm512_mul_ps(tab, _mm512_set1_ps(w.absmax[bi])), w.rnd);
      }
      const __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + j)));
      const __m512 we = _mm512_permutexvar_ps(_mm512_srli_epi32(b, 4), st);
      const __m512 wo = _mm512_permutexvar_ps(b, st);  // low 4 bits index
      for (int64_t m = 0; m < M; ++m) {
        acc[m] = _mm512_fmadd_ps(_mm512_loadu_ps(xe + m * K2 + j), we, acc[m]);
        acc[m] = _mm512_fmadd_ps(_mm512_loadu_ps(xo + m * K2 + j), wo, acc[m]);
      }
    }
    for (int64_t m = 0; m < M; ++m) y[m * w.N + n] = _mm512_reduce_add_ps(acc[m]);
  }
}

// GEMV fast path (B >= 64, K % 64 == 0): 64 values (32 bytes) per step, so a step never straddles a block.
// The 32 bytes are widened as 16 little-endian words (vpmovzxwd): lane i holds the four nibbles of values
// 4i..4i+3, and vpermps reads only an index's low 4 bits, so the four shifts 0 / 4 / 8 / 12 of that one
// register give the values 4i+1 / 4i / 4i+3 / 4i+2 of the 16 lanes (the high nibble of a byte is the even
// value). x is pre-arranged the same way (xp: [M, K], per 64-value step four 16-float phases: value 4i+1,
// 4i, 4i+3, 4i+2), so each x load serves NR weight rows. The block's scaled table (to_x(code * absmax),
// block index by shift: B is a power of two) is rebuilt only when the block changes. Each row's sums are
// made in the same order whatever NR, so the result does not depend on how threads split N.
template <int M, int NR, Rnd R>
QK_TARGET_AVX512 inline void gemv64_tile_avx512(const W4& w, const float* xp, float* y, int64_t n, int lb) {
  const int64_t K = w.K, K2 = K / 2;
  const __m512 tab = _mm512_load_ps(w.tab.v);
  __m512 acc[NR][M];
  for (int r = 0; r < NR; ++r)
    for (int m = 0; m < M; ++m) acc[r][m] = _mm512_setzero_ps();
  const uint8_t* q0 = w.q + n * K2;  // row r at q0 + r * K2
  int64_t blk[NR];
  __m512 st[NR];
  for (int r = 0; r < NR; ++r) {
    blk[r] = -1;
    st[r] = tab;
  }
  for (int64_t k = 0; k < K; k += 64) {
    __m512 xv[M][4];
    for (int m = 0; m < M; ++m)
      for (int p = 0; p < 4; ++p) xv[m][p] = _mm512_loadu_ps(xp + m * K + k + 16 * p);
    for (int r = 0; r < NR; ++r) {
      const int64_t bi = ((n + r) * K + k) >> lb;
      if (bi != blk[r]) {
        blk[r] = bi;
        st[r] = round16(_mm512_mul_ps(tab, _mm512_set1_ps(w.absmax[bi])), R);
      }
      const __m256i b16 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q0 + r * K2 + k / 2));
      const __m512i b = _mm512_cvtepu16_epi32(b16);
      const __m512 w1 = _mm512_permutexvar_ps(b, st[r]);
      const __m512 w0 = _mm512_permutexvar_ps(_mm512_srli_epi32(b, 4), st[r]);
      const __m512 w3 = _mm512_permutexvar_ps(_mm512_srli_epi32(b, 8), st[r]);
      const __m512 w2 = _mm512_permutexvar_ps(_mm512_srli_epi32(b, 12), st[r]);
      for (int m = 0; m < M; ++m) {
        acc[r][m] = _mm512_fmadd_ps(xv[m][0], w1, acc[r][m]);
        acc[r][m] = _mm512_fmadd_ps(xv[m][1], w0, acc[r][m]);
        acc[r][m] = _mm512_fmadd_ps(xv[m][2], w3, acc[r][m]);
        acc[r][m] = _mm512_fmadd_ps(xv[m][3], w2, acc[r][m]);
      }
    }
  }
  for (int r = 0; r < NR; ++r)
    for (int m = 0; m < M; ++m) y[m * w.N + n + r] = _mm512_reduce_add_ps(acc[r][m]);
}

template <int M, Rnd R>
QK_TARGET_AVX512 void gemv64_rows_avx512_mr(const W4& w, const float* xp, float* y, int64_t n0, int64_t n1, int lb) {
  constexpr int NR = M <= 2 ? 4 : 2;  // NR * M accumulators + 4 * M x registers + NR tables: ~32 zmm at M <= 4
  int64_t n = n0;
  for (; n + NR <= n1; n += NR) gemv64_tile_avx512<M, NR, R>(w, xp, y, n, lb);
  for (; n < n1; ++n) gemv64_tile_avx512<M, 1, R>(w, xp, y, n, lb);
}

template <int M>
QK_TARGET_AVX512 void gemv64_rows_avx512_m(const W4& w, const float* xp, float* y, int64_t n0, int64_t n1, int lb) {
  if (w.rnd == Rnd::BF16) return gemv64_rows_avx512_mr<M, Rnd::BF16>(w, xp, y, n0, n1, lb);
  if (w.rnd == Rnd::F16) return gemv64_rows_avx512_mr<M, Rnd::F16>(w, xp, y, n0, n1, lb);
  gemv64_rows_avx512_mr<M, Rnd::None>(w, xp, y, n0, n1, lb);
}

QK_TARGET_AVX512 void gemv64_rows_avx512(const W4& w, const float* xp, int64_t M, float* y, int64_t n0, int64_t n1,
                                         int lb) {
  switch (M) {
    case 1: return gemv64_rows_avx512_m<1>(w, xp, y, n0, n1, lb);
    case 2: return gemv64_rows_avx512_m<2>(w, xp, y, n0, n1, lb);
    case 3: return gemv64_rows_avx512_m<3>(w, xp, y, n0, n1, lb);
    case 4: return gemv64_rows_avx512_m<4>(w, xp, y, n0, n1, lb);
    case 5: return gemv64_rows_avx512_m<5>(w, xp, y, n0, n1, lb);
    case 6: return gemv64_rows_avx512_m<6>(w, xp, y, n0, n1, lb);
    case 7: return gemv64_rows_avx512_m<7>(w, xp, y, n0, n1, lb);
    default: return gemv64_rows_avx512_m<8>(w, xp, y, n0, n1, lb);
  }
}

QK_TARGET_AVX512 void decode_rows_avx512(const W4& w, float* panel, int64_t n0, int64_t n1) {
  const int64_t K2 = w.K / 2;
  const __m512 tab = _mm512_load_ps(w.tab.v);
  const __m512i ilo = _mm512_set_epi32(23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
  const __m512i ihi = _mm512_set_epi32(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8);
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* row = w.q + n * K2;
    float* out = panel + (n - n0) * w.K;
    int64_t blk = -1;
    __m512 st = tab;
    for (int64_t j = 0; j < K2; j += 16) {
      const int64_t bi = (n * w.K + 2 * j) / w.B;
      if (bi != blk) {
        blk = bi;
        st = round16(_mm512_mul_ps(tab, _mm512_set1_ps(w.absmax[bi])), w.rnd);
      }
      const __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + j)));
      const __m512 we = _mm512_permutexvar_ps(_mm512_srli_epi32(b, 4), st);
      const __m512 wo = _mm512_permutexvar_ps(b, st);
      _mm512_storeu_ps(out + 2 * j, _mm512_permutex2var_ps(we, ilo, wo));
      _mm512_storeu_ps(out + 2 * j + 16, _mm512_permutex2var_ps(we, ihi, wo));
    }
  }
}
// Tiled (M > kGemvMaxM): rows [n0, n1) in blocks of kTileRows decoded to a thread-local fp32 panel,
// then 4 x 4 (m, n) register tiles of zmm FMAs over K. Tails reuse the last valid row (results dropped).
constexpr int64_t kTileRows = 16;

QK_TARGET_AVX512 void tiled_rows_avx512(const W4& w, const float* X, int64_t M, float* y, int64_t n0, int64_t n1,
                                        float* panel) {
  const int64_t K = w.K;
  for (int64_t nb = n0; nb < n1; nb += kTileRows) {
    const int64_t nr = std::min(kTileRows, n1 - nb);
    decode_rows_avx512(w, panel, nb, nb + nr);
    for (int64_t m0 = 0; m0 < M; m0 += 4) {
      const float* xr[4];
      for (int i = 0; i < 4; ++i) xr[i] = X + std::min(m0 + i, M - 1) * K;
      for (int64_t j0 = 0; j0 < nr; j0 += 4) {
        const float* wr[4];
        for (int j = 0; j < 4; ++j) wr[j] = panel + std::min(j0 + j, nr - 1) * K;
        __m512 acc[4][4];
        for (int i = 0; i < 4; ++i)
          for (int j = 0; j < 4; ++j) acc[i][j] = _mm512_setzero_ps();
        for (int64_t k = 0; k < K; k += 16) {
          const __m512 w0 = _mm512_loadu_ps(wr[0] + k), w1 = _mm512_loadu_ps(wr[1] + k);
          const __m512 w2 = _mm512_loadu_ps(wr[2] + k), w3 = _mm512_loadu_ps(wr[3] + k);
          for (int i = 0; i < 4; ++i) {
            const __m512 xv = _mm512_loadu_ps(xr[i] + k);
            acc[i][0] = _mm512_fmadd_ps(xv, w0, acc[i][0]);
            acc[i][1] = _mm512_fmadd_ps(xv, w1, acc[i][1]);
            acc[i][2] = _mm512_fmadd_ps(xv, w2, acc[i][2]);
            acc[i][3] = _mm512_fmadd_ps(xv, w3, acc[i][3]);
          }
        }
        for (int i = 0; i < 4 && m0 + i < M; ++i)
          for (int j = 0; j < 4 && j0 + j < nr; ++j) y[(m0 + i) * w.N + nb + j0 + j] = _mm512_reduce_add_ps(acc[i][j]);
      }
    }
  }
}

// avx512_bf16, bf16 x: the same tiles with vdpbf16ps (two bf16 products per lane). The weight rounded to
// bf16 is exact in bf16, x is bf16 already: the products are those of the fp32 path. vdpbf16ps flushes
// subnormal inputs and results, so the caller takes this path only when every nonzero product is at least
// 2^-100 (a flushed partial sum is then below 2^-24 of any product: within s.6's fp32 tolerance).
QK_TARGET_AVX512BF16 void tiled_rows_avx512bf16(const W4& w, const uint16_t* X, int64_t M, float* y, int64_t n0,
                                                int64_t n1, uint32_t* panel) {
  const int64_t K2 = w.K / 2;
  const __m512 tab = _mm512_load_ps(w.tab.v);
  const __m512i hi16 = _mm512_set1_epi32(static_cast<int>(0xFFFF0000u));
  for (int64_t nb = n0; nb < n1; nb += kTileRows) {
    const int64_t nr = std::min(kTileRows, n1 - nb);
    for (int64_t r = 0; r < nr; ++r) {  // decode to bf16 pairs (k even in the low half, as x's memory)
      const uint8_t* row = w.q + (nb + r) * K2;
      int64_t blk = -1;
      __m512 st = tab;
      for (int64_t j = 0; j < K2; j += 16) {
        const int64_t bi = ((nb + r) * w.K + 2 * j) / w.B;
        if (bi != blk) {
          blk = bi;
          st = round16(_mm512_mul_ps(tab, _mm512_set1_ps(w.absmax[bi])), Rnd::BF16);
        }
        const __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + j)));
        const __m512 we = _mm512_permutexvar_ps(_mm512_srli_epi32(b, 4), st);
        const __m512 wo = _mm512_permutexvar_ps(b, st);
        const __m512i pair = _mm512_or_si512(_mm512_srli_epi32(_mm512_castps_si512(we), 16),
                                             _mm512_and_si512(_mm512_castps_si512(wo), hi16));
        _mm512_storeu_si512(panel + r * K2 + j, pair);
      }
    }
    for (int64_t m0 = 0; m0 < M; m0 += 4) {
      const uint16_t* xr[4];
      for (int i = 0; i < 4; ++i) xr[i] = X + std::min(m0 + i, M - 1) * w.K;
      for (int64_t j0 = 0; j0 < nr; j0 += 4) {
        const uint32_t* wr[4];
        for (int j = 0; j < 4; ++j) wr[j] = panel + std::min(j0 + j, nr - 1) * K2;
        __m512 acc[4][4];
        for (int i = 0; i < 4; ++i)
          for (int j = 0; j < 4; ++j) acc[i][j] = _mm512_setzero_ps();
        for (int64_t k = 0; k < K2; k += 16) {
          const __m512bh w0 = (__m512bh)_mm512_loadu_si512(wr[0] + k), w1 = (__m512bh)_mm512_loadu_si512(wr[1] + k);
          const __m512bh w2 = (__m512bh)_mm512_loadu_si512(wr[2] + k), w3 = (__m512bh)_mm512_loadu_si512(wr[3] + k);
          for (int i = 0; i < 4; ++i) {
            const __m512bh xv = (__m512bh)_mm512_loadu_si512(xr[i] + 2 * k);
            acc[i][0] = _mm512_dpbf16_ps(acc[i][0], xv, w0);
            acc[i][1] = _mm512_dpbf16_ps(acc[i][1], xv, w1);
            acc[i][2] = _mm512_dpbf16_ps(acc[i][2], xv, w2);
            acc[i][3] = _mm512_dpbf16_ps(acc[i][3], xv, w3);
          }
        }
        for (int i = 0; i < 4 && m0 + i < M; ++i)
          for (int j = 0; j < 4 && j0 + j < nr; ++j) y[(m0 + i) * w.N + nb + j0 + j] = _mm512_reduce_add_ps(acc[i][j]);
      }
    }
  }
}

// The same with ymm: 4 x 2 tiles (8 accumulators, 16 registers in all).
QK_TARGET_4B_AVX2 void tiled_rows_avx2(const W4& w, const float* X, int64_t M, float* y, int64_t n0, int64_t n1,
                                       float* panel) {
  const int64_t K = w.K;
  for (int64_t nb = n0; nb < n1; nb += kTileRows) {
    const int64_t nr = std::min(kTileRows, n1 - nb);
    decode_rows_avx2(w, panel, nb, nb + nr);
    for (int64_t m0 = 0; m0 < M; m0 += 4) {
      const float* xr[4];
      for (int i = 0; i < 4; ++i) xr[i] = X + std::min(m0 + i, M - 1) * K;
      for (int64_t j0 = 0; j0 < nr; j0 += 2) {
        const float* w0p = panel + j0 * K;
        const float* w1p = panel + std::min(j0 + 1, nr - 1) * K;
        __m256 acc[4][2];
        for (int i = 0; i < 4; ++i) acc[i][0] = acc[i][1] = _mm256_setzero_ps();
        for (int64_t k = 0; k < K; k += 8) {
          const __m256 w0 = _mm256_loadu_ps(w0p + k), w1 = _mm256_loadu_ps(w1p + k);
          for (int i = 0; i < 4; ++i) {
            const __m256 xv = _mm256_loadu_ps(xr[i] + k);
            acc[i][0] = _mm256_fmadd_ps(xv, w0, acc[i][0]);
            acc[i][1] = _mm256_fmadd_ps(xv, w1, acc[i][1]);
          }
        }
        for (int i = 0; i < 4 && m0 + i < M; ++i)
          for (int j = 0; j < 2 && j0 + j < nr; ++j) {
            alignas(32) float t[8];
            _mm256_store_ps(t, acc[i][j]);
            y[(m0 + i) * w.N + nb + j0 + j] = ((t[0] + t[1]) + (t[2] + t[3])) + ((t[4] + t[5]) + (t[6] + t[7]));
          }
      }
    }
  }
}
#pragma GCC diagnostic pop
#endif  // QK_X86

void decode_rows_portable(const W4& w, float* panel, int64_t n0, int64_t n1) {
  for (int64_t n = n0; n < n1; ++n)
    for (int64_t k = 0; k < w.K; ++k) panel[(n - n0) * w.K + k] = weight_at(w, n, k);
}

enum class Path { Portable, Avx2, Avx512 };

Path use_path() {
  const Isa isa = active_isa();
  if (isa_has_avx512(isa)) return Path::Avx512;
  return isa_has_avx2(isa) ? Path::Avx2 : Path::Portable;
}

// fp32 [nb] block absmax: as given, or decoded from the double quantization (s.11.5).
at::Tensor absmax_f32(const at::Tensor& absmax, const std::optional<at::Tensor>& nested,
                      const std::optional<at::Tensor>& offset) {
  if (!nested.has_value()) return absmax.contiguous();
  const at::Tensor q = absmax.contiguous(), n2 = nested->contiguous();
  const float off = offset->item<float>();
  at::Tensor out = at::empty({q.numel()}, q.options().dtype(at::kFloat));
  const uint8_t* qp = q.data_ptr<uint8_t>();
  const float* sp = n2.data_ptr<float>();
  float* op = out.data_ptr<float>();
  for (int64_t i = 0; i < q.numel(); ++i) {
    const float prod = kDynamic[qp[i]] * sp[i / 256];  // two separately rounded fp32 operations
    op[i] = prod + off;
  }
  return out;
}

// Whether vdpbf16ps's flushing of subnormals stays within s.6: every nonzero |x| * |W'| >= 2^-100.
bool bf16_dot_safe(const at::Tensor& xf, const at::Tensor& am, const W4& w) {
  float min_code = 1.f;
  for (int i = 0; i < 16; ++i)
    if (w.tab.v[i] != 0.f) min_code = std::min(min_code, std::fabs(w.tab.v[i]));
  const at::Tensor ax = xf.abs(), aa = am.abs();
  const at::Tensor nzx = ax.masked_select(ax > 0), nza = aa.masked_select(aa > 0);
  if (nzx.numel() == 0 || nza.numel() == 0) return true;  // every product is an exact zero
  const double lo = double(nzx.min().item<float>()) * double(nza.min().item<float>()) * double(min_code);
  return lo >= std::ldexp(1.0, -100);  // NaN / Inf need no care: vdpbf16ps propagates them
}

at::Tensor gemm_4bit_cpu(const at::Tensor& x_in, const at::Tensor& packed, const at::Tensor& absmax,
                         c10::string_view quant_type, int64_t blocksize, const std::optional<at::Tensor>& nested,
                         const std::optional<at::Tensor>& offset, const std::optional<at::Tensor>& bias_in) {
  const char* op = "gemm_4bit";
  const std::string qt(quant_type);
  checks::weight_4bit(op, packed, absmax, qt, blocksize, nested, offset);
  const int64_t N = packed.size(0), K = packed.size(1) * 2;
  checks::float_rows(op, "x", x_in, 2);
  checks::ndim_is(op, "x", x_in, 2, "[M, K] activation");
  TORCH_CHECK_VALUE(x_in.size(1) == K, "quantkernels.", op, ": x has K = ", x_in.size(1),
                    " columns but the weight has K = ", K, " (x shape ", shape_str(x_in.sizes()), ")");
  checks::same_device(op, "packed", packed, "x", x_in);
  checks::bias(op, bias_in, N, x_in);
  const Path path = use_path();
  const int64_t M = x_in.size(0);
  const at::ScalarType xt = x_in.scalar_type();
  at::Tensor y = at::empty({M, N}, x_in.options());
  if (M == 0 || N == 0) return y;

  const at::Tensor q = packed.contiguous(), am = absmax_f32(absmax, nested, offset);
  W4 w{q.data_ptr<uint8_t>(), am.data_ptr<float>(), N, K, blocksize, code_table(qt == "nf4"),
       xt == at::kBFloat16 ? Rnd::BF16 : (xt == at::kHalf ? Rnd::F16 : Rnd::None)};
  const at::Tensor xf = x_in.to(at::kFloat).contiguous();
  at::Tensor acc = at::empty({M, N}, x_in.options().dtype(at::kFloat));
  float* Y = acc.data_ptr<float>();
  const bool vec = path != Path::Portable && K % 32 == 0;

  const bool gemv64 = vec && path == Path::Avx512 && blocksize >= 64 && K % 64 == 0;
  if (M <= kGemvMaxM && gemv64) {
    // x in the nibble order of gemv64_tile_avx512: per 64 values, phases (4i+1, 4i, 4i+3, 4i+2), i = 0..15
    const at::Tensor ph = at::tensor({1, 0, 3, 2}, at::TensorOptions().dtype(at::kLong));
    const at::Tensor xp = xf.view({M, K / 64, 16, 4}).index_select(3, ph).transpose(2, 3).contiguous();
    const float* XP = xp.data_ptr<float>();
    int lb = 0;
    while ((int64_t{1} << lb) < blocksize) ++lb;
#if QK_X86
    at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) { gemv64_rows_avx512(w, XP, M, Y, n0, n1, lb); });
#endif
  } else if (M <= kGemvMaxM) {
    at::Tensor xe, xo;
    if (vec) {
      xe = xf.slice(1, 0, K, 2).contiguous();
      xo = xf.slice(1, 1, K, 2).contiguous();
    }
    const float* X = xf.data_ptr<float>();
    at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
#if QK_X86
      if (vec && path == Path::Avx512)
        return gemv_rows_avx512(w, xe.data_ptr<float>(), xo.data_ptr<float>(), M, Y, n0, n1);
      if (vec) return gemv_rows_avx2(w, xe.data_ptr<float>(), xo.data_ptr<float>(), M, Y, n0, n1);
#endif
      gemm_rows_portable(w, X, M, Y, n0, n1);
    });
  } else if (vec && isa_has_bf16dot(active_isa()) && xt == at::kBFloat16 && bf16_dot_safe(xf, am, w)) {
    const at::Tensor xb = x_in.contiguous();
    const uint16_t* X = reinterpret_cast<const uint16_t*>(xb.data_ptr<at::BFloat16>());
    at::parallel_for(0, N, kTileRows, [&](int64_t n0, int64_t n1) {
      std::vector<uint32_t> panel(static_cast<size_t>(kTileRows * K / 2));
#if QK_X86
      tiled_rows_avx512bf16(w, X, M, Y, n0, n1, panel.data());
#endif
    });
  } else if (vec) {
    const float* X = xf.data_ptr<float>();
    at::parallel_for(0, N, kTileRows, [&](int64_t n0, int64_t n1) {
      std::vector<float> panel(static_cast<size_t>(kTileRows * K));
#if QK_X86
      if (path == Path::Avx512) return tiled_rows_avx512(w, X, M, Y, n0, n1, panel.data());
      tiled_rows_avx2(w, X, M, Y, n0, n1, panel.data());
#endif
    });
  } else {
    at::Tensor panel = at::empty({std::min(kPanelRows, N), K}, xf.options());
    for (int64_t p0 = 0; p0 < N; p0 += kPanelRows) {
      const int64_t p1 = std::min(N, p0 + kPanelRows);
      float* P = panel.data_ptr<float>();
      at::parallel_for(p0, p1, 8, [&](int64_t n0, int64_t n1) {
        decode_rows_portable(w, P + (n0 - p0) * K, n0, n1);
      });
      acc.slice(1, p0, p1).copy_(at::mm(xf, panel.slice(0, 0, p1 - p0).t()));
    }
  }
  if (bias_in.has_value()) acc.add_(bias_in->to(at::kFloat));
  y.copy_(acc);  // one rounding to x's dtype (round half to even)
  return y;
}

const bool gemm_4bit_variant_registered = register_variant("gemm_4bit", [](Isa isa) -> const char* {
  if (isa_has_bf16dot(isa))
    return "avx512_bf16: vpermps table decode; GEMV (M <= 8; 64-value steps for block >= 64) / 4x4 zmm tiles: "
           "vdpbf16ps for bf16 x (when no product can underflow), fp32 FMA otherwise (K % 32 == 0; else scalar "
           "decode + at::mm)";
  if (isa_has_avx512(isa))
    return "avx512: vpermps 16-entry table decode in zmm; GEMV (M <= 8; 64-value steps for block >= 64) / 4x4 zmm "
           "FMA tiles on 16-row panels (K % 32 == 0; else scalar decode + at::mm)";
  return isa_has_avx2(isa) ? "avx2: two-half vpermps table decode in ymm; GEMV (M <= 8) / 4x2 ymm FMA tiles "
                             "(K % 32 == 0; else scalar decode + at::mm)"
                           : "portable: scalar table lookup";
});

}  // namespace
}  // namespace cpu
}  // namespace quantkernels

TORCH_LIBRARY_IMPL(quantkernels, CPU, m) {
  m.impl("gemm_4bit", &quantkernels::cpu::gemm_4bit_cpu);
}
