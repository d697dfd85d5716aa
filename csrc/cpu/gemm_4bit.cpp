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
//   bf16 x at avx512_bf16, K % 64 == 0 (GEMV and tiled; see Bf16Guard): per block a 32-word bf16 table
//     (vcvtne2ps2bf16), 64 values per step by vpmovzxbw + two vpermw, products by vdpbf16ps (GEMV: 4 or 2
//     rows per step; tiled: our w4a16's M-in-lanes tiles (qk_bf16_tiles.h) where M is near a multiple of 16
//     and >= 32, else 4 x 6 tiles on 24-row panels); rows that could meet a denormal take the fp32 paths, per row;
//   otherwise (portable, or K % 32 != 0): panels of kPanelRows rows decoded by the scalar loop, at::mm in fp32.
// Double quantization: the block absmax values are first decoded to fp32 (s.11.5, the same formula).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstring>
#include <string>
#include <vector>

#include "cpu_isa.h"
#include "qk_bf16_tiles.h"
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

// ----------------------------------------------------------------------------- avx512_bf16, bf16 x
// bf16 x at avx512_bf16 with K % 64 == 0: the weight is decoded straight to bf16 words and multiplied by
// vdpbf16ps (two bf16 products per fp32 lane), as our w4a16 bf16 GEMV (weight_only.cpp, gemv_reg_w4).
// Per (row, block) the 16 scaled entries fp32(code[v] * absmax) are rounded to bf16 by vcvtne2ps2bf16 into a
// 32-word table (both halves the same; block 32: a step's two blocks, one per half); per 64-value step the
// 32 bytes are widened to words (vpmovzxbw) and two vpermw give the 32 even values (high nibbles) and the
// 32 odd ones (low nibbles; the index's bit 4 is the high nibble's bit 0 and picks the copy). x is packed
// once per call to match: per 64 values its 32 even then its 32 odd bf16 words (xu, [M, K]).
// vcvtne2ps2bf16 rounds to nearest even like the contract but reads denormal inputs as zero, and vdpbf16ps
// treats denormal inputs and results as zero: a row takes this path only when every nonzero entry of its
// blocks' tables is >= max(FLT_MIN, 2^-100 / min nonzero |x|) (so entries and products are normal, and a
// flushed partial sum is below 2^-24 of any product: within s.6), and the caller sends x with a denormal
// value elsewhere. A row that fails is flagged (bad[n] = 1) and recomputed by the fp32 path afterwards; the
// decision is per row, so results do not depend on how threads split N.
struct Bf16Guard {
  float min_code;  // smallest nonzero |code[v]|
  float thr;       // an entry's smallest nonzero magnitude must be >= thr
};

// The block's 16 scaled entries (fp32); clears ok when an entry is nonzero but below the guard.
QK_TARGET_AVX512BF16 inline __m512 scaled_tab(const W4& w, __m512 tab, int64_t bi, const Bf16Guard& g, bool& ok) {
  const float a = w.absmax[bi], aa = std::fabs(a);
  ok = ok && !(aa != 0.f && aa * g.min_code < g.thr);  // NaN / Inf absmax: propagated by both instructions
  return _mm512_mul_ps(tab, _mm512_set1_ps(a));
}

// The 32-word table of the 64-value step at flat index i0 (a multiple of 64) of row state (blk, T).
template <bool B32>
QK_TARGET_AVX512BF16 inline void step_tab(const W4& w, __m512 tab, int64_t i0, int lb, const Bf16Guard& g,
                                          int64_t& blk, __m512i& T, bool& ok) {
  const int64_t bi = i0 >> lb;
  if (B32) {
    T = (__m512i)_mm512_cvtne2ps_pbh(scaled_tab(w, tab, bi + 1, g, ok), scaled_tab(w, tab, bi, g, ok));
  } else if (bi != blk) {
    blk = bi;
    const __m512 t = scaled_tab(w, tab, bi, g, ok);
    T = (__m512i)_mm512_cvtne2ps_pbh(t, t);
  }
}

// 32 bytes (64 values) -> even values (wh, high nibbles) and odd values (wl, low nibbles) as bf16 words.
template <bool B32>
QK_TARGET_AVX512BF16 inline void decode64_bf16(const uint8_t* p, __m512i T, __m512i& wh, __m512i& wl) {
  const __m512i v = _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  // block 32: words 16..31 (bytes 16..31) are the second block, in the table's upper half (index bit 4)
  const __m512i upper = _mm512_inserti64x4(_mm512_setzero_si512(), _mm256_set1_epi16(16), 1);
  const __m512i hi = B32 ? _mm512_or_si512(_mm512_srli_epi16(v, 4), upper) : _mm512_srli_epi16(v, 4);
  const __m512i lo = B32 ? _mm512_ternarylogic_epi32(v, _mm512_set1_epi16(15), upper, 0xEA) : v;  // (v & 15) | up
  wh = _mm512_permutexvar_epi16(hi, T);
  wl = _mm512_permutexvar_epi16(lo, T);
}

// GEMV tile: NR weight rows from n, M rows of x; returns a bit per row that failed the guard.
template <int M, int NR, bool B32>
QK_TARGET_AVX512BF16 inline unsigned gemv_bf16_tile(const W4& w, const uint16_t* xu, float* y, int64_t n, int lb,
                                                    const Bf16Guard& g) {
  constexpr int S = M <= 2 ? 2 : 1;  // accumulator sets (even / odd values) for enough chains in flight
  const int64_t K = w.K, K2 = K / 2;
  const __m512 tab = _mm512_load_ps(w.tab.v);
  __m512 acc[NR][M][S];
  for (int r = 0; r < NR; ++r)
    for (int m = 0; m < M; ++m)
      for (int s = 0; s < S; ++s) acc[r][m][s] = _mm512_setzero_ps();
  const uint8_t* q0 = w.q + n * K2;  // row r at q0 + r * K2
  const int64_t pf = 2 * NR * K2;    // prefetch two tiles ahead, same offset
  int64_t blk[NR];
  __m512i T[NR];
  bool ok[NR];
  for (int r = 0; r < NR; ++r) {
    blk[r] = -1;
    T[r] = _mm512_setzero_si512();
    ok[r] = true;
  }
  for (int r = 0; r < NR; ++r) step_tab<B32>(w, tab, (n + r) * K, lb, g, blk[r], T[r], ok[r]);
  for (int64_t k = 0; k < K; k += 64) {
    __m512i Tc[NR];  // this step's tables; T[] then moves one step ahead (its latency overlaps this step)
    for (int r = 0; r < NR; ++r) Tc[r] = T[r];
    if (k + 64 < K)
      for (int r = 0; r < NR; ++r) step_tab<B32>(w, tab, (n + r) * K + k + 64, lb, g, blk[r], T[r], ok[r]);
    if ((k & 127) == 0)
      for (int r = 0; r < NR; ++r) _mm_prefetch(reinterpret_cast<const char*>(q0 + r * K2 + k / 2 + pf), _MM_HINT_T0);
    for (int r = 0; r < NR; ++r) {
      __m512i wh, wl;
      decode64_bf16<B32>(q0 + r * K2 + k / 2, Tc[r], wh, wl);
      for (int m = 0; m < M; ++m) {
        const __m512i xh = _mm512_loadu_si512(xu + m * K + k), xl = _mm512_loadu_si512(xu + m * K + k + 32);
        acc[r][m][0] = _mm512_dpbf16_ps(acc[r][m][0], (__m512bh)xh, (__m512bh)wh);
        acc[r][m][S - 1] = _mm512_dpbf16_ps(acc[r][m][S - 1], (__m512bh)xl, (__m512bh)wl);
      }
    }
  }
  unsigned bad = 0;
  for (int r = 0; r < NR; ++r) {
    bad |= ok[r] ? 0u : 1u << r;
    for (int m = 0; m < M; ++m)
      y[m * w.N + n + r] = _mm512_reduce_add_ps(S == 2 ? _mm512_add_ps(acc[r][m][0], acc[r][m][1]) : acc[r][m][0]);
  }
  return bad;
}

template <int M, bool B32>
QK_TARGET_AVX512BF16 void gemv_bf16_rows_mb(const W4& w, const uint16_t* xu, float* y, int64_t n0, int64_t n1, int lb,
                                            const Bf16Guard& g, uint8_t* bad) {
  constexpr int NR = M <= 2 ? 4 : 2;
  int64_t n = n0;
  for (; n + NR <= n1; n += NR) {
    const unsigned b = gemv_bf16_tile<M, NR, B32>(w, xu, y, n, lb, g);
    for (int r = 0; r < NR; ++r) bad[n + r] = (b >> r) & 1;
  }
  for (; n < n1; ++n) bad[n] = gemv_bf16_tile<M, 1, B32>(w, xu, y, n, lb, g) & 1;
}

template <int M>
QK_TARGET_AVX512BF16 void gemv_bf16_rows_m(const W4& w, const uint16_t* xu, float* y, int64_t n0, int64_t n1, int lb,
                                           const Bf16Guard& g, uint8_t* bad) {
  if (w.B == 32) return gemv_bf16_rows_mb<M, true>(w, xu, y, n0, n1, lb, g, bad);
  gemv_bf16_rows_mb<M, false>(w, xu, y, n0, n1, lb, g, bad);
}

QK_TARGET_AVX512BF16 void gemv_bf16_rows(const W4& w, const uint16_t* xu, int64_t M, float* y, int64_t n0, int64_t n1,
                                         int lb, const Bf16Guard& g, uint8_t* bad) {
  switch (M) {
    case 1: return gemv_bf16_rows_m<1>(w, xu, y, n0, n1, lb, g, bad);
    case 2: return gemv_bf16_rows_m<2>(w, xu, y, n0, n1, lb, g, bad);
    case 3: return gemv_bf16_rows_m<3>(w, xu, y, n0, n1, lb, g, bad);
    case 4: return gemv_bf16_rows_m<4>(w, xu, y, n0, n1, lb, g, bad);
    case 5: return gemv_bf16_rows_m<5>(w, xu, y, n0, n1, lb, g, bad);
    case 6: return gemv_bf16_rows_m<6>(w, xu, y, n0, n1, lb, g, bad);
    case 7: return gemv_bf16_rows_m<7>(w, xu, y, n0, n1, lb, g, bad);
    default: return gemv_bf16_rows_m<8>(w, xu, y, n0, n1, lb, g, bad);
  }
}

// Tiled, use_lane_tiles(M): our w4a16's bf16-x tiles (qk_bf16_tiles.h, weight_only.cpp's tiled512), M in the
// vector lanes, no horizontal sums. x is packed once per call as bf16 pairs (units) of xu's order, per 16 rows
// [U][16] (U = K / 2; rows past M zero). Each thread takes a contiguous range of rows (boundaries rounded to
// 16), in chunks of NC rows: a chunk's rows are decoded to bf16 words (the guard decided per row, as in the
// GEMV) into blocks of kKCUBf16 units, [K block][row][unit], zero rows up to a multiple of 24; then per K block
// all rows of x pass over it in 4 x 6 / 3 x 8 / 2 x 12 / 1 x 12 tiles (16 rows of x per zmm x weight rows),
// C kept transposed (cbuf[n][m]), finally written to y. Each output is one fp32 chain over the units in
// order, whatever the thread split.
constexpr int64_t kKCUBf16 = 512;  // units per decoded K block (as tiled512)
constexpr int64_t kNCBf16 = 48;    // rows per chunk (a multiple of 24; up to 4x that for M > 32)

// M-in-lanes tiles pad M to a multiple of 16 and load x once per 12 / 8 / 6 weight rows, the 4 x 6 tiles below
// (kPanelBf16) pad M to a multiple of 4 but sum each output across lanes: bench/nf4_cpu.py, bf16 x, 2 threads,
// A/B in one run (bench/results/nf4_cpu_2026-12-07.md), lane tiles / 4 x 6 tiles at 4096 x 4096: M = 16 1.10-1.12,
// 24 1.21, 32 0.96, 40 1.10, 64 0.92-1.00, 100 1.02-1.05, 128 0.87-0.97; at K = 640, N = 2048 (Gemma-3-270M):
// 16 0.96-1.11, 24 1.14, 32 0.99, 40 1.09, 64 0.79-0.95, 100 0.84-0.91, 128 0.75-0.83.
inline bool use_lane_tiles(int64_t M) { return M >= 32 && 8 * ((M + 15) / 16 * 16 - M) <= M; }

// Decodes row n to bf16 words in xu's order: K block b (2 * kKCUBf16 words) at out + b * bstride words.
// Returns whether the row passed the guard.
template <bool B32>
QK_TARGET_AVX512BF16 inline bool decode_row_bf16(const W4& w, int64_t n, uint16_t* out, int64_t bstride, int lb,
                                                 const Bf16Guard& g) {
  const int64_t K = w.K, K2 = K / 2;
  const __m512 tab = _mm512_load_ps(w.tab.v);
  const uint8_t* row = w.q + n * K2;
  int64_t blk = -1;
  __m512i T = _mm512_setzero_si512();
  bool ok = true;
  for (int64_t k = 0; k < K; k += 64) {  // 2 * kKCUBf16 is a multiple of 64: a step stays in one block
    step_tab<B32>(w, tab, n * K + k, lb, g, blk, T, ok);
    __m512i wh, wl;
    decode64_bf16<B32>(row + k / 2, T, wh, wl);
    uint16_t* o = out + (k / (2 * kKCUBf16)) * bstride + k % (2 * kKCUBf16);
    _mm512_storeu_si512(o, wh);
    _mm512_storeu_si512(o + 32, wl);
  }
  return ok;
}

// Rows [n0, n1) of y (fp32, [M, N]); wbuf: nblk * NC * kKCUBf16 units, cbuf: NC * Mp floats.
template <bool B32>
QK_TARGET_AVX512BF16 void tiled_bf16_rows_b(const W4& w, const uint32_t* xpack, int64_t M, int64_t Mp, float* y,
                                            int64_t n0, int64_t n1, int64_t NC, uint32_t* wbuf, float* cbuf, int lb,
                                            const Bf16Guard& g, uint8_t* bad) {
  constexpr int64_t KCU = kKCUBf16;
  const int64_t K = w.K, U = K / 2, nblk = (U + KCU - 1) / KCU;
  for (int64_t c0 = n0; c0 < n1; c0 += NC) {
    const int64_t nc = std::min(NC, n1 - c0), ncp = (nc + 23) / 24 * 24;
    const int64_t n_next = std::min(NC, n1 - c0 - nc);  // rows of the next chunk (prefetched into L2)
    for (int64_t i = 0; i < ncp; ++i) {
      if (i < n_next)
        for (int64_t b = 0; b < K / 2; b += 64)
          _mm_prefetch(reinterpret_cast<const char*>(w.q + (c0 + NC + i) * (K / 2) + b), _MM_HINT_T1);
      if (i < nc) {
        uint16_t* out = reinterpret_cast<uint16_t*>(wbuf + i * KCU);
        bad[c0 + i] = !decode_row_bf16<B32>(w, c0 + i, out, 2 * NC * KCU, lb, g);
      } else {
        for (int64_t b = 0; b < nblk; ++b) std::memset(wbuf + (b * NC + i) * KCU, 0, KCU * 4);
      }
    }
    for (int64_t u0 = 0; u0 < U; u0 += KCU) {
      const int64_t uc = std::min(KCU, U - u0);
      for (int64_t m0 = 0; m0 < Mp;) {
        const bf16_tiles::Tile tl = bf16_tiles::tile_for<KCU>(Mp - m0);
        const uint32_t* xa = xpack + (m0 / 16) * U * 16 + u0 * 16;
        for (int64_t r = 0; r < nc; r += tl.nr)
          tl.fn(xa, U * 16, wbuf + ((u0 / KCU) * NC + r) * KCU, uc, cbuf + r * Mp + m0, Mp, u0 == 0);
        m0 += tl.rows;
      }
    }
    // C^T -> y: full 16 x 16 blocks by register transposes, the ragged rest scalar
    const int64_t M16 = M / 16 * 16, nc16 = nc / 16 * 16;
    for (int64_t m0 = 0; m0 < M16; m0 += 16)
      for (int64_t j0 = 0; j0 < nc16; j0 += 16) {
        __m512 r[16];
        for (int j = 0; j < 16; ++j) r[j] = _mm512_loadu_ps(cbuf + (j0 + j) * Mp + m0);
        bf16_tiles::transpose16x16(r);
        for (int m = 0; m < 16; ++m) _mm512_storeu_ps(y + (m0 + m) * w.N + c0 + j0, r[m]);
      }
    for (int64_t m = 0; m < M; ++m)
      for (int64_t j = m < M16 ? nc16 : 0; j < nc; ++j) y[m * w.N + c0 + j] = cbuf[j * Mp + m];
  }
}

QK_TARGET_AVX512BF16 void tiled_bf16_rows(const W4& w, const uint32_t* xpack, int64_t M, int64_t Mp, float* y,
                                          int64_t n0, int64_t n1, int64_t NC, uint32_t* wbuf, float* cbuf, int lb,
                                          const Bf16Guard& g, uint8_t* bad) {
  if (w.B == 32) return tiled_bf16_rows_b<true>(w, xpack, M, Mp, y, n0, n1, NC, wbuf, cbuf, lb, g, bad);
  tiled_bf16_rows_b<false>(w, xpack, M, Mp, y, n0, n1, NC, wbuf, cbuf, lb, g, bad);
}

// Tiled, M < 32 or M far from a multiple of 16 (see use_lane_tiles): panels of kPanelBf16 rows decoded to bf16
// words (L2), then 4 x 6 (m, n) register tiles of vdpbf16ps over K: 24 accumulators, 4 x and 6 weight loads
// per 24 instructions (tails reuse the last valid row; results dropped).
constexpr int64_t kPanelBf16 = 24;

// The four horizontal sums of a, b, c, d (in that order), each in a fixed order of its own lanes (the same
// whatever the other three): pairs within 128-bit lanes, then the four 128-bit lanes.
QK_TARGET_AVX512BF16 inline __m128 hsum4(__m512 a, __m512 b, __m512 c, __m512 d) {
  const __m512 ab = _mm512_add_ps(_mm512_unpacklo_ps(a, b), _mm512_unpackhi_ps(a, b));  // a0+a2 b0+b2 a1+a3 b1+b3
  const __m512 cd = _mm512_add_ps(_mm512_unpacklo_ps(c, d), _mm512_unpackhi_ps(c, d));
  const __m512d abd = _mm512_castps_pd(ab), cdd = _mm512_castps_pd(cd);
  const __m512 s = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(abd, cdd)),
                                 _mm512_castpd_ps(_mm512_unpackhi_pd(abd, cdd)));  // per 128-bit lane: a b c d
  const __m256 hi = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(s), 1));
  const __m256 h = _mm256_add_ps(_mm512_castps512_ps256(s), hi);
  return _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
}

template <bool B32>
QK_TARGET_AVX512BF16 void tiled_hsum_bf16_rows_b(const W4& w, const uint16_t* xu, int64_t M, float* y, int64_t n0,
                                                 int64_t n1, uint16_t* panel, int lb, const Bf16Guard& g, uint8_t* bad) {
  constexpr int MI = 4, NJ = 6;
  const int64_t K = w.K;
  for (int64_t nb = n0; nb < n1; nb += kPanelBf16) {
    const int64_t nr = std::min(kPanelBf16, n1 - nb);
    for (int64_t r = 0; r < nr; ++r)  // bstride 2 * kKCUBf16: the row's words contiguous
      bad[nb + r] = !decode_row_bf16<B32>(w, nb + r, panel + r * K, 2 * kKCUBf16, lb, g);
    for (int64_t m0 = 0; m0 < M; m0 += MI) {
      const uint16_t* xr[MI];
      for (int i = 0; i < MI; ++i) xr[i] = xu + std::min(m0 + i, M - 1) * K;
      for (int64_t j0 = 0; j0 < nr; j0 += NJ) {
        const uint16_t* wr[NJ];
        for (int j = 0; j < NJ; ++j) wr[j] = panel + std::min(j0 + j, nr - 1) * K;
        __m512 acc[MI][NJ];
        for (int i = 0; i < MI; ++i)
          for (int j = 0; j < NJ; ++j) acc[i][j] = _mm512_setzero_ps();
        for (int64_t k = 0; k < K; k += 32) {
          __m512bh wv[NJ];
          for (int j = 0; j < NJ; ++j) wv[j] = (__m512bh)_mm512_loadu_si512(wr[j] + k);
          for (int i = 0; i < MI; ++i) {
            const __m512bh xv = (__m512bh)_mm512_loadu_si512(xr[i] + k);
            for (int j = 0; j < NJ; ++j) acc[i][j] = _mm512_dpbf16_ps(acc[i][j], xv, wv[j]);
          }
        }
        for (int j = 0; j < NJ && j0 + j < nr; ++j) {
          alignas(16) float t[4];
          _mm_store_ps(t, hsum4(acc[0][j], acc[1][j], acc[2][j], acc[3][j]));
          for (int i = 0; i < MI && m0 + i < M; ++i) y[(m0 + i) * w.N + nb + j0 + j] = t[i];
        }
      }
    }
  }
}

QK_TARGET_AVX512BF16 void tiled_hsum_bf16_rows(const W4& w, const uint16_t* xu, int64_t M, float* y, int64_t n0,
                                               int64_t n1, uint16_t* panel, int lb, const Bf16Guard& g,
                                               uint8_t* bad) {
  if (w.B == 32) return tiled_hsum_bf16_rows_b<true>(w, xu, M, y, n0, n1, panel, lb, g, bad);
  tiled_hsum_bf16_rows_b<false>(w, xu, M, y, n0, n1, panel, lb, g, bad);
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
  at::Tensor xf;  // x in fp32, made only by the paths that read it
  at::Tensor acc = at::empty({M, N}, x_in.options().dtype(at::kFloat));
  float* Y = acc.data_ptr<float>();
  const bool vec = path != Path::Portable && K % 32 == 0;
  int lb = 0;
  while ((int64_t{1} << lb) < blocksize) ++lb;

  // Rows [r0, r1) by the fp32-product paths.
  at::Tensor xp, xe, xo;
  auto fp32_rows = [&](int64_t r0, int64_t r1) {
    if (!xf.defined()) xf = x_in.to(at::kFloat).contiguous();
    const bool gemv64 = vec && path == Path::Avx512 && blocksize >= 64 && K % 64 == 0;
    if (M <= kGemvMaxM && gemv64) {
      // x in the nibble order of gemv64_tile_avx512: per 64 values, phases (4i+1, 4i, 4i+3, 4i+2), i = 0..15
      if (!xp.defined()) {
        const at::Tensor ph = at::tensor({1, 0, 3, 2}, at::TensorOptions().dtype(at::kLong));
        xp = xf.view({M, K / 64, 16, 4}).index_select(3, ph).transpose(2, 3).contiguous();
      }
      const float* XP = xp.data_ptr<float>();
#if QK_X86
      at::parallel_for(r0, r1, 16, [&](int64_t n0, int64_t n1) { gemv64_rows_avx512(w, XP, M, Y, n0, n1, lb); });
#endif
    } else if (M <= kGemvMaxM) {
      if (vec && !xe.defined()) {
        xe = xf.slice(1, 0, K, 2).contiguous();
        xo = xf.slice(1, 1, K, 2).contiguous();
      }
      const float* X = xf.data_ptr<float>();
      at::parallel_for(r0, r1, 16, [&](int64_t n0, int64_t n1) {
#if QK_X86
        if (vec && path == Path::Avx512)
          return gemv_rows_avx512(w, xe.data_ptr<float>(), xo.data_ptr<float>(), M, Y, n0, n1);
        if (vec) return gemv_rows_avx2(w, xe.data_ptr<float>(), xo.data_ptr<float>(), M, Y, n0, n1);
#endif
        gemm_rows_portable(w, X, M, Y, n0, n1);
      });
    } else if (vec) {
      const float* X = xf.data_ptr<float>();
      at::parallel_for(r0, r1, kTileRows, [&](int64_t n0, int64_t n1) {
        std::vector<float> panel(static_cast<size_t>(kTileRows * K));
#if QK_X86
        if (path == Path::Avx512) return tiled_rows_avx512(w, X, M, Y, n0, n1, panel.data());
        tiled_rows_avx2(w, X, M, Y, n0, n1, panel.data());
#endif
      });
    } else {
      at::Tensor panel = at::empty({std::min(kPanelRows, r1 - r0), K}, xf.options());
      for (int64_t p0 = r0; p0 < r1; p0 += kPanelRows) {
        const int64_t p1 = std::min(r1, p0 + kPanelRows);
        float* P = panel.data_ptr<float>();
        at::parallel_for(p0, p1, 8, [&](int64_t n0, int64_t n1) {
          decode_rows_portable(w, P + (n0 - p0) * K, n0, n1);
        });
        acc.slice(1, p0, p1).copy_(at::mm(xf, panel.slice(0, 0, p1 - p0).t()));
      }
    }
  };

  bool done = false;
#if QK_X86
  if (vec && isa_has_bf16dot(active_isa()) && xt == at::kBFloat16 && K % 64 == 0) {
    // bf16 words straight into vdpbf16ps (see Bf16Guard): x must hold no denormal (read as zero)
    const at::Tensor xb = x_in.contiguous();
    const uint16_t* xw = reinterpret_cast<const uint16_t*>(xb.data_ptr<at::BFloat16>());
    uint16_t min_x = 0x7F80;  // smallest nonzero |x| as bits (bf16 magnitudes order as integers); Inf if none
    bool x_denormal = false;
    for (int64_t i = 0; i < M * K; ++i) {
      const uint16_t a = xw[i] & 0x7FFF;
      x_denormal |= a != 0 && a < 0x0080;
      if (a != 0 && a < min_x) min_x = a;
    }
    if (!x_denormal) {
      float min_code = 1.f;
      for (int i = 0; i < 16; ++i)
        if (w.tab.v[i] != 0.f) min_code = std::min(min_code, std::fabs(w.tab.v[i]));
      const double mx = static_cast<double>(c10::BFloat16(min_x, c10::BFloat16::from_bits()));
      const double thr = std::max(static_cast<double>(FLT_MIN), std::ldexp(1.0, -100) / mx);  // mx = Inf: FLT_MIN
      const Bf16Guard g{min_code, std::nextafter(static_cast<float>(thr), INFINITY)};
      // x packed as the decoded weight: per 64 values the 32 even values, then the 32 odd ones
      std::vector<uint16_t> xu(static_cast<size_t>(M * K));
      for (int64_t i = 0; i < M * K; i += 64)  // K % 64 == 0: a 64-value chunk never spans rows
        for (int j = 0; j < 32; ++j) {
          xu[i + j] = xw[i + 2 * j];
          xu[i + 32 + j] = xw[i + 2 * j + 1];
        }
      const uint16_t* XU = xu.data();
      std::vector<uint8_t> bad(static_cast<size_t>(N), 0);
      if (M <= kGemvMaxM) {
        at::parallel_for(0, N, 16,
                         [&](int64_t n0, int64_t n1) { gemv_bf16_rows(w, XU, M, Y, n0, n1, lb, g, bad.data()); });
      } else if (!use_lane_tiles(M)) {
        at::parallel_for(0, N, kPanelBf16, [&](int64_t n0, int64_t n1) {
          std::vector<uint16_t> panel(static_cast<size_t>(kPanelBf16 * K));
          tiled_hsum_bf16_rows(w, XU, M, Y, n0, n1, panel.data(), lb, g, bad.data());
        });
      } else {
        // x as units [Mp / 16][U][16] (Mp: M rounded up to 16, zero rows); threads get contiguous row ranges
        // of equal size (rounded to 16 rows), chunks of NC rows inside them (as tiled512)
        const int64_t U = K / 2, Mp = (M + 15) / 16 * 16;
        std::vector<uint32_t> xpack(static_cast<size_t>(Mp * U), 0);
        const uint32_t* XU32 = reinterpret_cast<const uint32_t*>(XU);
        for (int64_t m = 0; m < M; ++m)
          for (int64_t u = 0; u < U; ++u) std::memcpy(&xpack[((m / 16) * U + u) * 16 + m % 16], XU32 + m * U + u, 4);
        const int64_t T = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), (N + 15) / 16));
        const int64_t rows_t = (N + T - 1) / T;
        int64_t mult = M > 32 ? 4 : 1;
        while (mult > 1 && (rows_t + kNCBf16 * mult - 1) / (kNCBf16 * mult) < 3) mult /= 2;  // >= 3 chunks each
        const int64_t NC = kNCBf16 * mult, nblk = (U + kKCUBf16 - 1) / kKCUBf16;
        auto bound = [&](int64_t t) { return t == 0 ? 0 : t == T ? N : std::min(N, (N * t / T + 8) / 16 * 16); };
        at::parallel_for(0, T, 1, [&](int64_t t0, int64_t t1) {
          std::vector<uint32_t> wbuf(static_cast<size_t>(nblk * NC * kKCUBf16));
          std::vector<float> cbuf(static_cast<size_t>(NC * Mp));
          tiled_bf16_rows(w, xpack.data(), M, Mp, Y, bound(t0), bound(t1), NC, wbuf.data(), cbuf.data(), lb, g,
                          bad.data());
        });
      }
      for (int64_t n = 0; n < N;) {  // rows that failed the guard: the fp32 paths, run by run
        if (!bad[n]) {
          ++n;
          continue;
        }
        int64_t e = n;
        while (e < N && bad[e]) ++e;
        fp32_rows(n, e);
        n = e;
      }
      done = true;
    }
  }
#endif
  if (!done) fp32_rows(0, N);
  if (done && M * N <= 16384) {  // small bf16 outputs (decode): + bias, the rounding of copy_ below, no dispatch
    at::Tensor bf;
    const float* bp = nullptr;
    if (bias_in.has_value()) {
      bf = bias_in->to(at::kFloat).contiguous();
      bp = bf.data_ptr<float>();
    }
    at::BFloat16* yp = y.data_ptr<at::BFloat16>();
    for (int64_t m = 0; m < M; ++m)
      for (int64_t n = 0; n < N; ++n) yp[m * N + n] = at::BFloat16(bp ? Y[m * N + n] + bp[n] : Y[m * N + n]);
    return y;
  }
  if (bias_in.has_value()) acc.add_(bias_in->to(at::kFloat));
  y.copy_(acc);  // one rounding to x's dtype (round half to even)
  return y;
}

const bool gemm_4bit_variant_registered = register_variant("gemm_4bit", [](Isa isa) -> const char* {
  if (isa_has_bf16dot(isa))
    return "avx512_bf16: bf16 x with K % 64 == 0: vcvtne2ps2bf16 block tables, vpermw decode to bf16 words, "
           "vdpbf16ps (GEMV for M <= 8; w4a16's M-in-lanes tiles for M >= 32 near a multiple of 16, else 4x6 tiles on "
           "24-row panels; rows that could meet a denormal: fp32); "
           "otherwise as avx512: vpermps table decode, GEMV (M <= 8) / 4x4 zmm FMA tiles (K % 32 == 0; else "
           "scalar decode + at::mm)";
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
