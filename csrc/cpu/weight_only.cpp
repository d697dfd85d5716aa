// CPU kernels for the weight-only ops quantkernels::w8a16_gemm and quantkernels::w4a16_gemm.
//
//   w8a16:  Y = x @ W^T + bias,  W[n, k] = rnd(b[n, k] * scale_b[n])                     b int8 [N, K]
//   w4a16:  Y = x @ W^T + bias,  W[n, k] = rnd((q[n, k] - zero[n, g]) * scale_b[n, g])  g = k / G
//           q: PLAIN int4, byte[n, i] = q[n, 2i] | q[n, 2i + 1] << 4; signed nibbles (zero = 0)
//           when zero_b is None, unsigned nibbles with uint8 zero points otherwise.
// rnd() rounds the fp32 product to x's dtype (a no-op for fp32); products x * W are exact in
// fp32 for bf16/fp16 operands; accumulation in fp32; then + bias (fp32), cast to x's dtype.
//
// Three paths, chosen by M and x's dtype:
// - M <= 4, int4, bf16 / fp16 x, K % 64 == 0 and G = 32 or G % 64 == 0: the table-lookup GEMV
//   (gemv4_lut below): the 16 possible rounded weights of each (row, group) are built once and
//   picked per nibble with vpshufb; bit-identical to the per-element path, ~1.4x faster for bf16.
// - M <= 4 otherwise (decode, GEMV): memory bound. Each weight byte is read once and decoded in
//   registers (vpmovsx/zxbd, and/shift, cvtdq2ps), then FMA'd into all M rows of x. Threads
//   split N. Tiles of NR weight rows x M rows keep 8 FMA chains in flight (M = 1: 4 rows with
//   two sums each; M = 2: 2 rows, two sums; M = 3, 4: 2 rows, one sum). While a tile runs,
//   the next tile (NR rows further, same offset) is prefetched line by line: a weight row is
//   about one 4 KB page at K = 4096 and the hardware prefetchers stop at page boundaries, so
//   without it every row start waits for DRAM.
//   For fp32 x the per-group scale is factored out of the K-sum (sum_k x*(q - z)*s =
//   s * (sum_k x*q' - z' * sum_k x) with q' the unsigned nibble, z' = 8 for signed nibbles
//   after flipping bit 3), which saves the per-element subtract and multiply. Not bit-identical
//   with the reference, but within docs/numerics.md s.6 (fp32 rel 1e-5): the in-register sums are
//   flushed every <= 128 elements and the correction z' * sum_k x is evaluated in fp64.
//   For bf16/fp16 x the weight is rounded per element to x's dtype, as the spec says
//   (bf16: integer round-half-even on the bits; fp16: vcvtps2ph/vcvtph2ps, F16C).
// - M = 5..8 (AVX2): the paths above, once per chunk of 4 rows of x (~2x faster than tiled).
// - M >= 9, or M >= 5 on the portable path (tiled): each thread dequantizes 16 weight rows at a time (exact spec weights,
//   rounded to x's dtype) into its own fp32 buffer (256 KB at K = 4096), transposes it to
//   K-major (8 x 8 register transposes) and runs 6 x 16 outer-product FMA tiles over all M rows
//   of x in K blocks of 256 (the block's weights, 16 KB, stay in L1; x is broadcast from memory);
//   the full fp32 weight is never materialized. Portable ISA: dot products per output.
//
// int4 K order: inside every full 16-element chunk the decoder naturally produces the 8 low
// nibbles (elements 0, 2, .., 14) then the 8 high nibbles (1, 3, .., 15). Instead of
// interleaving the weights, x is permuted the same way once per call (O(M K)), and the
// dot products / the tiled GEMM run over that common K order. A K tail that is not a multiple
// of 16 (only possible with G = K) stays in natural order and is done in scalar code.
//
// ISA: QUANTKERNELS_CPU_ISA (cpu_isa.h), read once per call; the AVX2 code also needs F16C
// (every AVX2 CPU has it; checked anyway, else the portable path runs). What each level runs:
//   portable            plain C++ (above)
//   avx2, avx_vnni      the AVX2 paths above (no VNNI use: these ops have no integer products)
//   avx512, avx512_vnni zmm fp32 FMA for every x dtype (bf16 / fp16 x: weights rounded to x's dtype),
//                       except fp32 x with M <= 4: the AVX2 GEMV (faster, see weight_only_gemm)
//   avx512_bf16         bf16 x: vdpbf16ps (M <= 4: weights decoded in registers); fp32 / fp16 x: as avx512
//
// AVX-512 paths (isa_has_avx512; below). They work on 4-byte K "units": one fp32 value, or for
// vdpbf16ps a pair of bf16 values (K positions 2u, 2u + 1; an odd K pads one zero pair). x is
// converted once per call into units in the weights' K order (int4: per 32-element chunk the 16
// even elements then the 16 odd ones, what 16 bytes give as low / high nibbles; a K tail that is not
// a multiple of 32, only with G = K, natural; int8: natural). Weights are decoded per row into units,
// exactly the spec weights rounded to x's dtype: int8 by cvt / mul / rounding (bf16: integer round
// half to even, or vcvtne2ps2bf16 when the row scale is normal or zero so that no product is
// denormal); int4 through per-group tables of the 16 possible weights (vpermps on fp32 tables;
// vpermw on a 32-word bf16 table, 64 weights per 32 bytes, for the bf16-pair units).
// - bf16 x, M <= 4 (avx512_bf16; int4 needs K % 64 == 0 and G = 32, G % 64 == 0 or G = K): the
//   register-decode GEMV (gemv_reg_w4 / gemv_reg_w8). Threads split N into tiles of 4 weight rows;
//   each step reads 32 bytes of every row and decodes them in registers straight into vdpbf16ps (no
//   row buffer): int4 bytes -> vpmovzxbw, low nibbles (even elements of the 64-block) and high
//   nibbles (odd ones) index with vpermw a 32-word table of the (row, group)'s 16 weights
//   rnd_bf16((v - z) * s) (G = 32: two groups' tables in the two halves), built in registers once per
//   (row, group) as 16 fp32 products + vcvtne2ps2bf16, one span of groups ahead; int8: vpmovsxbd,
//   cvtdq2ps, * row scale, vcvtne2ps2bf16 (32 weights; the K tail by masked loads). x is packed once
//   per call to match (int4: per 64-block the 32 even elements then the 32 odd ones; int8 natural).
//   vcvtne(2)ps2bf16 is RNE like the contract but treats denormal inputs as zero, so it is used only
//   when none of the tile's scales is denormal (then no product is); else the integer rounding.
//   Weight stream prefetched at the same offset (into L2, whole tiles >= 32 KB ahead; see kRegPfBytes). Before the L2 prefetch (2026-12-02), M = 1, 6 x 4096 x 11008 from
//   DRAM, G = 128 asym (bench/bf16_decode.py, bench/results/bf16_decode_2026-12-02.md; shared machine):
//   2 threads, two runs: int4 0.62 / 0.74 ms vs 1.39 / 1.08 ms for the buffered GEMV below (68 / 77%
//   of read bandwidth, 1.50 / 1.72x fbgemm's speed); int8 1.15 / 1.27 vs 1.66 / 1.39 ms (68 / 84%);
//   1 thread, CPU time: int4 0.99 vs 2.46 ms (79%), int8 2.13 vs 3.54 ms. Still instruction bound for
//   int4 with small groups (a table per (row, group)): 1 thread, 4096^2 asym in L3, M = 1: 0.16 ms at
//   G = K, 0.28 ms at G = 128, 0.53 ms at G = 32.
// - M <= 8 otherwise: GEMV. Threads split N; per tile of NR rows (4 for M <= 2, else 2) the whole rows are
//   decoded into an L1/L2 buffer (the rows are contiguous: one sequential read, software-prefetched
//   4 KB ahead) and dotted with all M rows of x in zmm (vfmadd / vdpbf16ps, two accumulator sets
//   for M <= 4), one horizontal sum per output.
// - M >= 9: tiled. Threads split N into equal contiguous ranges (16-row bounds), each walked in chunks
//   of 48 rows (bf16 pairs; fp32: 24; up to 4x that for M > 32), decoded whole into a per-thread
//   buffer in K blocks of 512 units (bf16 pairs; fp32: 256)
//   (next chunk prefetched to L2). x is packed once per call, in one pass of 16 x 16 zmm transposes,
//   per 16 rows as [units][16 rows] (M padded to 16 with zeros). Micro tiles keep 24 zmm
//   accumulators, one x load per 16 rows and one weight broadcast per weight row and unit: bf16
//   64 rows of x x 6 weight rows (the last 48 / 32 / 16 rows: 3 x 8, 2 x 12, 1 x 12 zmm x weight
//   rows), fp32 32 (or 16) rows x 12. C is kept transposed ([n][m], the lanes) per chunk, then
//   stored through 16 x 16 zmm transposes with + bias and the RNE cast (ragged edges scalar).
// vdpbf16ps vs the contract (bf16 x): bf16 x bf16 products are exact in fp32, so the products are
// the reference's; the instruction adds the two products of a pair to the fp32 accumulator with
// RNE (in one or two roundings: a summation order the reference does not fix either), treats
// denormal inputs as zero and flushes denormal results. The differences are a reordered fp32 sum
// (well inside bf16 output's assert_close tolerance) and terms below 2^-126 in magnitude (a
// denormal x or weight, or a product underflowing), i.e. absolute errors < 1e-37 per term. The
// bit-exact test (x rows with two ones: y = W[n, a] + W[n, b]) stays bit-exact: products by 1 and
// 0 are exact, adding zeros is exact, and the one non-trivial fp32 addition rounds as in the
// reference (as long as the weights are normal, which they are for normal scales).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "cpu_isa.h"
#include "qk_bf16_tiles.h"
#include "qk_checks.h"

#if QK_X86
#define QK_TARGET_WO __attribute__((target("avx2,fma,f16c")))
#endif

namespace quantkernels {
namespace cpu {
namespace {

// How the dequantized weight is rounded: to x's dtype.
enum class Rnd { F32, BF16, F16 };

constexpr int64_t kMaxGemvM = 4;   // M <= this: GEMV path
constexpr int64_t kGemvSplitM = 8; // kMaxGemvM < M <= this (AVX2): the GEMV per chunk of kMaxGemvM rows
constexpr int64_t kTileN = 16;     // weight rows per dequantized tile of the tiled path
constexpr int64_t kFlush = 128;    // elements per in-register partial sum before it is flushed

inline float round_to(float v, Rnd r) {
  // c10 conversions are round-half-to-even, as torch's .to(dtype).
  if (r == Rnd::BF16) return static_cast<float>(c10::BFloat16(v));
  if (r == Rnd::F16) return static_cast<float>(c10::Half(v));
  return v;
}

// The quantized weight, plain layout.
struct Weight {
  bool int4 = false;
  bool has_zero = false;              // int4: unsigned nibbles with zero points
  const int8_t* q8 = nullptr;         // int8 [N, K]
  const uint8_t* q4 = nullptr;        // uint8 [N, K/2]
  const float* scale = nullptr;       // [N] (int8) or [N, ng] (int4)
  const uint8_t* zero = nullptr;      // [N, ng] or nullptr
  int64_t N = 0, K = 0, ng = 1, G = 0;
  int64_t Kv = 0;                     // K covered by full vector chunks (int8: 8, int4: 16)
  int gshift = 0;                     // int4 with ng > 1: G = 1 << gshift (G = 32..256)
};

// The exact spec weight W[n, k] in natural K order, rounded to x's dtype (scalar).
inline float weight_at(const Weight& w, int64_t n, int64_t k, Rnd r) {
  float v;
  if (!w.int4) {
    v = static_cast<float>(w.q8[n * w.K + k]) * w.scale[n];
  } else {
    const uint8_t byte = w.q4[n * (w.K / 2) + k / 2];
    const int u = (k & 1) ? (byte >> 4) : (byte & 0xF);
    const int64_t g = k / w.G;
    const float qf = w.has_zero ? static_cast<float>(u) - static_cast<float>(w.zero[n * w.ng + g])
                                : static_cast<float>((u ^ 8) - 8);
    v = qf * w.scale[n * w.ng + g];
  }
  return round_to(v, r);
}

// Position in the common K order of element k (int4 full chunks are permuted, see the top).
inline int64_t korder(const Weight& w, int64_t k) {
  if (!w.int4 || k >= w.Kv) return k;
  const int64_t c = k & ~int64_t(15), j = k & 15;
  return c + ((j & 1) ? 8 + j / 2 : j / 2);
}

// ------------------------------------------------------------------ portable (plain C++)

void decode_row_portable(const Weight& w, int64_t n, Rnd r, float* out) {
  for (int64_t k = 0; k < w.K; ++k) out[korder(w, k)] = weight_at(w, n, k, r);
}

// Dot product in 8 independent partial sums flushed every kFlush elements (accuracy at
// large K, and the same summation shape as the vector code).
float dot_portable(const float* a, const float* b, int64_t K) {
  double total = 0.0;
  for (int64_t k0 = 0; k0 < K; k0 += kFlush) {
    const int64_t k1 = std::min(K, k0 + kFlush);
    float p[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    int64_t k = k0;
    for (; k + 8 <= k1; k += 8)
      for (int i = 0; i < 8; ++i) p[i] += a[k + i] * b[k + i];
    for (; k < k1; ++k) p[0] += a[k] * b[k];
    total += ((p[0] + p[1]) + (p[2] + p[3])) + ((p[4] + p[5]) + (p[6] + p[7]));
  }
  return static_cast<float>(total);
}

// y[m, n] (fp32, [M, N]) for rows n in [n0, n1).
void gemv_rows_portable(const Weight& w, Rnd r, const float* x, int64_t M, int64_t n0, int64_t n1, float* y) {
  std::vector<float> buf(w.K);
  for (int64_t n = n0; n < n1; ++n) {
    decode_row_portable(w, n, r, buf.data());
    for (int64_t m = 0; m < M; ++m) y[m * w.N + n] = dot_portable(x + m * w.K, buf.data(), w.K);
  }
}

// ------------------------------------------------------------------ AVX2 + FMA + F16C

#if QK_X86
template <Rnd R>
QK_TARGET_WO inline __m256 round_v(__m256 v) {
  if constexpr (R == Rnd::BF16) {
    // round half to even to the top 16 bits; NaN kept as is (the bias trick could turn it into Inf)
    const __m256i u = _mm256_castps_si256(v);
    const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    __m256i t = _mm256_add_epi32(u, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF)));
    t = _mm256_and_si256(t, _mm256_set1_epi32(static_cast<int>(0xFFFF0000u)));
    return _mm256_blendv_ps(_mm256_castsi256_ps(t), v, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
  } else if constexpr (R == Rnd::F16) {
    return _mm256_cvtph_ps(_mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  } else {
    return v;
  }
}

QK_TARGET_WO inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

QK_TARGET_WO inline __m256i load8_s8(const int8_t* p) {
  return _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
}

QK_TARGET_WO inline __m256i load8_u8(const uint8_t* p) {
  return _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
}

// One weight row in the common K order, exact spec weights rounded to x's dtype.
template <Rnd R>
QK_TARGET_WO void decode_row_avx2(const Weight& w, int64_t n, float* out) {
  const int64_t K = w.K;
  if (!w.int4) {
    const int8_t* q = w.q8 + n * K;
    const __m256 sv = _mm256_set1_ps(w.scale[n]);
    for (int64_t k = 0; k < w.Kv; k += 8)
      _mm256_storeu_ps(out + k, round_v<R>(_mm256_mul_ps(_mm256_cvtepi32_ps(load8_s8(q + k)), sv)));
  } else {
    const uint8_t* q = w.q4 + n * (K / 2);
    const __m256i m15 = _mm256_set1_epi32(15);
    // signed nibbles: flip bit 3 of each, then value = unsigned - 8
    const __m256i flip = _mm256_set1_epi32(w.has_zero ? 0 : 0x88);
    for (int64_t g = 0; g < w.ng; ++g) {
      const int64_t k0 = g * w.G, k1 = std::min(k0 + w.G, w.Kv);
      const __m256 sv = _mm256_set1_ps(w.scale[n * w.ng + g]);
      const __m256i zv = _mm256_set1_epi32(w.has_zero ? w.zero[n * w.ng + g] : 8);
      for (int64_t k = k0; k < k1; k += 16) {
        const __m256i b = _mm256_xor_si256(load8_u8(q + k / 2), flip);
        const __m256i lo = _mm256_sub_epi32(_mm256_and_si256(b, m15), zv);
        const __m256i hi = _mm256_sub_epi32(_mm256_srli_epi32(b, 4), zv);
        _mm256_storeu_ps(out + k, round_v<R>(_mm256_mul_ps(_mm256_cvtepi32_ps(lo), sv)));
        _mm256_storeu_ps(out + k + 8, round_v<R>(_mm256_mul_ps(_mm256_cvtepi32_ps(hi), sv)));
      }
    }
  }
  for (int64_t k = w.Kv; k < K; ++k) out[k] = weight_at(w, n, k, R);
}

// One 8-wide K step of the int8 GEMV tile: acc[m][r] += x[m, k..k+8) * W[n0 + r, k..k+8).
template <Rnd R, int MM, int NR>
QK_TARGET_WO inline void step8(const int8_t* const* q, const __m256* sv, const float* x, int64_t K, int64_t k,
                               __m256 (&acc)[MM][NR]) {
  __m256 xv[MM];
  for (int m = 0; m < MM; ++m) xv[m] = _mm256_loadu_ps(x + m * K + k);
  for (int r = 0; r < NR; ++r) {
    __m256 wv = _mm256_cvtepi32_ps(load8_s8(q[r] + k));
    if constexpr (R != Rnd::F32) wv = round_v<R>(_mm256_mul_ps(wv, sv[r]));
    for (int m = 0; m < MM; ++m) acc[m][r] = _mm256_fmadd_ps(xv[m], wv, acc[m][r]);
  }
}

// int8 GEMV tile: MM rows of x (fp32 [MM, K]) x NR weight rows from n0 -> y[m, n0 + r].
// TWO: two accumulator sets (even / odd 8-wide steps), so that 2 * MM * NR = 8 FMA chains are in
// flight (FMA latency 4 x 2 per cycle) where MM * NR = 4; MM >= 3 uses NR = 2 and one set.
template <Rnd R, int MM, int NR, bool TWO>
QK_TARGET_WO void gemv8_avx2(const Weight& w, const float* x, int64_t n0, float* y) {
  const int64_t K = w.K, Kv = w.Kv;
  const int8_t* q[NR];
  __m256 sv[NR], acc0[MM][NR], acc1[MM][NR], tot[MM][NR];
  for (int r = 0; r < NR; ++r) {
    q[r] = w.q8 + (n0 + r) * K;
    sv[r] = _mm256_set1_ps(w.scale[n0 + r]);
    for (int m = 0; m < MM; ++m) tot[m][r] = _mm256_setzero_ps();
  }
  const int64_t ahead = NR * K;  // prefetch the next tile of NR rows, same offset (see the top)
  for (int64_t kb = 0; kb < Kv; kb += kFlush) {
    const int64_t ke = std::min(Kv, kb + kFlush);
    for (int r = 0; r < NR; ++r) {  // kFlush = 128 bytes = 2 lines per row
      _mm_prefetch(reinterpret_cast<const char*>(q[r] + kb + ahead), _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(q[r] + kb + 64 + ahead), _MM_HINT_T0);
    }
    for (int m = 0; m < MM; ++m)
      for (int r = 0; r < NR; ++r) acc0[m][r] = acc1[m][r] = _mm256_setzero_ps();
    int64_t k = kb;
    for (; k + 16 <= ke; k += 16) {
      step8<R, MM, NR>(q, sv, x, K, k, acc0);
      step8<R, MM, NR>(q, sv, x, K, k + 8, TWO ? acc1 : acc0);
    }
    if (k < ke) step8<R, MM, NR>(q, sv, x, K, k, acc0);
    for (int m = 0; m < MM; ++m)
      for (int r = 0; r < NR; ++r) tot[m][r] = _mm256_add_ps(tot[m][r], _mm256_add_ps(acc0[m][r], acc1[m][r]));
  }
  for (int m = 0; m < MM; ++m) {
    for (int r = 0; r < NR; ++r) {
      float s = hsum(tot[m][r]);
      if constexpr (R == Rnd::F32) {
        for (int64_t k = Kv; k < K; ++k) s += x[m * K + k] * static_cast<float>(q[r][k]);
        s *= w.scale[n0 + r];  // the scale factored out of the sum (fp32 only)
      } else {
        for (int64_t k = Kv; k < K; ++k) s += x[m * K + k] * weight_at(w, n0 + r, k, R);
      }
      y[m * w.N + n0 + r] = s;
    }
  }
}

inline int32_t load_u32(const uint8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return v;
}

// sum_g scale[g] * zero'[g] * xs[g] in fp64 (zero' = zero[g], or 8 for signed nibbles when zero is
// null): the zero-point term of the fp32 int4 GEMV, once per output. Four groups per step in two
// independent accumulators: as a scalar loop it was one serial FMA chain, ~11% of a 4096-wide row.
QK_TARGET_WO inline double zero_correction(const float* scale, const uint8_t* zero, const double* xs, int64_t ng) {
  __m256d c0 = _mm256_setzero_pd(), c1 = _mm256_setzero_pd();
  const __m256d eight = _mm256_set1_pd(8.0);
  int64_t g = 0;
  for (; g + 8 <= ng; g += 8) {
    __m256d z0 = eight, z1 = eight;
    if (zero) {
      z0 = _mm256_cvtepi32_pd(_mm_cvtepu8_epi32(_mm_cvtsi32_si128(load_u32(zero + g))));
      z1 = _mm256_cvtepi32_pd(_mm_cvtepu8_epi32(_mm_cvtsi32_si128(load_u32(zero + g + 4))));
    }
    c0 = _mm256_fmadd_pd(_mm256_mul_pd(_mm256_cvtps_pd(_mm_loadu_ps(scale + g)), z0), _mm256_loadu_pd(xs + g), c0);
    c1 = _mm256_fmadd_pd(_mm256_mul_pd(_mm256_cvtps_pd(_mm_loadu_ps(scale + g + 4)), z1), _mm256_loadu_pd(xs + g + 4), c1);
  }
  const __m256d c = _mm256_add_pd(c0, c1);
  __m128d h = _mm_add_pd(_mm256_castpd256_pd128(c), _mm256_extractf128_pd(c, 1));
  double corr = _mm_cvtsd_f64(_mm_add_sd(h, _mm_unpackhi_pd(h, h)));
  for (; g < ng; ++g) corr += double(scale[g]) * double(zero ? zero[g] : 8) * xs[g];
  return corr;
}

// int4 GEMV tile. x is fp32 [MM, K] in the common K order; xs (fp32 path only) holds the fp64
// sums of x over the full chunks of each group, [MM, ng].
// SPLIT: low- and high-nibble products in separate sums (2 * MM * NR FMA chains) for MM <= 2;
// MM >= 3 runs NR = 2 rows with one sum each (MM * NR >= 6 chains, fewer x loads per FMA; measured
// 1.45x faster at M = 4 than NR = 1 with split sums).
template <Rnd R, int MM, int NR, bool SYM, bool SPLIT>
QK_TARGET_WO void gemv4_avx2(const Weight& w, const float* x, const double* xs, int64_t n0, float* y) {
  const int64_t K = w.K, ng = w.ng;
  const __m256i m15 = _mm256_set1_epi32(15);
  const __m256i flip = _mm256_set1_epi32(0x88);
  const uint8_t* q[NR];
  __m256 acc[MM][NR], blk[MM][NR], blh[MM][NR];  // blk: low nibbles, blh: high nibbles (2 FMA chains)
  for (int r = 0; r < NR; ++r) {
    q[r] = w.q4 + (n0 + r) * (K / 2);
    for (int m = 0; m < MM; ++m) acc[m][r] = _mm256_setzero_ps();
  }
  for (int64_t g = 0; g < ng; ++g) {
    const int64_t kg0 = g * w.G, kg1 = std::min(kg0 + w.G, w.Kv);
    __m256 sv[NR];
    __m256i zv[NR];
    for (int r = 0; r < NR; ++r) {
      sv[r] = _mm256_set1_ps(w.scale[(n0 + r) * ng + g]);
      zv[r] = _mm256_set1_epi32(w.has_zero ? w.zero[(n0 + r) * ng + g] : 8);
    }
    for (int64_t kb = kg0; kb < kg1; kb += kFlush) {
      const int64_t ke = std::min(kg1, kb + kFlush);
      if ((kb & 127) == 0)  // one 64-byte line (128 nibbles) per row, of the next tile of NR rows
        for (int r = 0; r < NR; ++r)
          _mm_prefetch(reinterpret_cast<const char*>(q[r] + kb / 2 + NR * (K / 2)), _MM_HINT_T0);
      for (int m = 0; m < MM; ++m)
        for (int r = 0; r < NR; ++r) blk[m][r] = blh[m][r] = _mm256_setzero_ps();
      for (int64_t k = kb; k < ke; k += 16) {
        __m256 xe[MM], xo[MM];
        for (int m = 0; m < MM; ++m) {
          xe[m] = _mm256_loadu_ps(x + m * K + k);
          xo[m] = _mm256_loadu_ps(x + m * K + k + 8);
        }
        for (int r = 0; r < NR; ++r) {
          __m256i b = load8_u8(q[r] + k / 2);
          if constexpr (SYM) b = _mm256_xor_si256(b, flip);  // signed nibbles: flip bit 3, zero' = 8
          __m256 lo, hi;
          if constexpr (R == Rnd::F32) {  // unsigned nibble; zero point applied after the sum
            lo = _mm256_cvtepi32_ps(_mm256_and_si256(b, m15));
            hi = _mm256_cvtepi32_ps(_mm256_srli_epi32(b, 4));
          } else {  // the spec weight, rounded to x's dtype per element
            lo = round_v<R>(_mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_and_si256(b, m15), zv[r])), sv[r]));
            hi = round_v<R>(_mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_srli_epi32(b, 4), zv[r])), sv[r]));
          }
          for (int m = 0; m < MM; ++m) {
            blk[m][r] = _mm256_fmadd_ps(xe[m], lo, blk[m][r]);
            if constexpr (SPLIT) blh[m][r] = _mm256_fmadd_ps(xo[m], hi, blh[m][r]);
            else blk[m][r] = _mm256_fmadd_ps(xo[m], hi, blk[m][r]);
          }
        }
      }
      for (int m = 0; m < MM; ++m)
        for (int r = 0; r < NR; ++r) {
          const __m256 b = _mm256_add_ps(blk[m][r], blh[m][r]);
          acc[m][r] = R == Rnd::F32 ? _mm256_fmadd_ps(b, sv[r], acc[m][r]) : _mm256_add_ps(acc[m][r], b);
        }
    }
  }
  for (int m = 0; m < MM; ++m) {
    for (int r = 0; r < NR; ++r) {
      const int64_t n = n0 + r;
      double s = hsum(acc[m][r]);
      if constexpr (R == Rnd::F32) {
        s -= zero_correction(w.scale + n * ng, w.has_zero ? w.zero + n * ng : nullptr, xs + m * ng, ng);
      }
      float tail = 0.0f;  // K tail in natural order (G = K only)
      for (int64_t k = w.Kv; k < K; ++k) tail += x[m * K + k] * weight_at(w, n, k, R);
      y[m * w.N + n] = static_cast<float>(s + double(tail));
    }
  }
}

template <Rnd R, int MM>
QK_TARGET_WO void gemv_rows_avx2_mm(const Weight& w, const float* x, const double* xs, int64_t n0, int64_t n1,
                                    float* y) {
  // 8 FMA chains: MM * NR = 4 with two sums each (MM <= 2), or NR = 2 with one (MM = 3, 4).
  constexpr int NR = MM == 1 ? 4 : 2;
  constexpr bool kTwo = MM <= 2;
  int64_t n = n0;
  if (w.int4) {
    if (w.has_zero) {
      for (; n + NR <= n1; n += NR) gemv4_avx2<R, MM, NR, false, kTwo>(w, x, xs, n, y);
      for (; n < n1; ++n) gemv4_avx2<R, MM, 1, false, true>(w, x, xs, n, y);
    } else {
      for (; n + NR <= n1; n += NR) gemv4_avx2<R, MM, NR, true, kTwo>(w, x, xs, n, y);
      for (; n < n1; ++n) gemv4_avx2<R, MM, 1, true, true>(w, x, xs, n, y);
    }
  } else {
    for (; n + NR <= n1; n += NR) gemv8_avx2<R, MM, NR, kTwo>(w, x, n, y);
    for (; n < n1; ++n) gemv8_avx2<R, MM, 1, true>(w, x, n, y);
  }
}

template <Rnd R>
void gemv_rows_avx2_r(const Weight& w, const float* x, const double* xs, int64_t M, int64_t n0, int64_t n1,
                      float* y) {
  switch (M) {
    case 1: gemv_rows_avx2_mm<R, 1>(w, x, xs, n0, n1, y); break;
    case 2: gemv_rows_avx2_mm<R, 2>(w, x, xs, n0, n1, y); break;
    case 3: gemv_rows_avx2_mm<R, 3>(w, x, xs, n0, n1, y); break;
    default: gemv_rows_avx2_mm<R, 4>(w, x, xs, n0, n1, y); break;
  }
}

void gemv_rows_avx2(const Weight& w, Rnd r, const float* x, const double* xs, int64_t M, int64_t n0, int64_t n1,
                    float* y) {
  if (r == Rnd::F32) gemv_rows_avx2_r<Rnd::F32>(w, x, xs, M, n0, n1, y);
  else if (r == Rnd::BF16) gemv_rows_avx2_r<Rnd::BF16>(w, x, xs, M, n0, n1, y);
  else gemv_rows_avx2_r<Rnd::F16>(w, x, xs, M, n0, n1, y);
}

// ---- int4 GEMV for bf16 / fp16 x (M <= 4, K % 64 == 0, G = 32 or G % 64 == 0): table lookup.
// The spec weight rnd((q - z) * s) (rounded to x's dtype) takes only 16 values per (row, group),
// each exactly a 16-bit pattern. Per (row, group) they are computed once, exactly as above
// (round_v / vcvtps2ph), and split into a low-byte and a high-byte 16-entry table; in the K loop
// a nibble picks its weight with two vpshufb, two unpacks make the 16-bit words and one more
// step makes fp32 (bf16: the word as the top half; fp16: vcvtph2ps). Bit-identical weights to
// the per-element path, at about half of its instructions (no per-element cvt / mul / rounding).
// G = 32: a 64-chunk holds two groups, one per 128-bit lane, so each lane gets its own tables.
// x is permuted once per call per 64-chunk into the order the unpacks produce (lut_korder).
inline bool lut_gemv_applies(const Weight& w, Rnd r) {
  return w.int4 && r != Rnd::F32 && w.K % 64 == 0 && (w.G % 64 == 0 || w.G == 32);
}

// Position of element k in the table path's K order: per 64-chunk, p = 32h + 8j + 4l + d for
// k = 2 * (16l + 4j + d) + h (h: high nibble, l: 128-bit lane, j: unpack step, d: dword).
inline int64_t lut_korder(int64_t k) {
  const int64_t c = k & ~int64_t(63), i = (k & 63) >> 1, h = k & 1;
  const int64_t l = i >> 4, j = (i >> 2) & 3, d = i & 3;
  return c + 32 * h + 8 * j + 4 * l + d;
}

// The 16 weights rnd((v - z) * s), v = 0..15, as 16-bit patterns split into byte tables.
template <Rnd R>
QK_TARGET_WO inline void lut_tables(float s, int32_t z, __m128i& tlo, __m128i& thi) {
  const __m256i i0 = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  const __m256i zv = _mm256_set1_epi32(z);
  const __m256 sv = _mm256_set1_ps(s);
  const __m256 v0 = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(i0, zv)), sv);
  const __m256 v1 = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_add_epi32(i0, _mm256_set1_epi32(8)), zv)), sv);
  __m256i e;  // words e0 .. e15
  if constexpr (R == Rnd::BF16) {
    const __m256i a = _mm256_srli_epi32(_mm256_castps_si256(round_v<R>(v0)), 16);
    const __m256i b = _mm256_srli_epi32(_mm256_castps_si256(round_v<R>(v1)), 16);
    e = _mm256_permute4x64_epi64(_mm256_packus_epi32(a, b), 0xD8);
  } else {
    const __m128i a = _mm256_cvtps_ph(v0, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m128i b = _mm256_cvtps_ph(v1, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    e = _mm256_set_m128i(b, a);
  }
  // per lane: low bytes of its 8 words, then their high bytes
  const __m256i split = _mm256_setr_epi8(0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15,
                                         0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15);
  e = _mm256_shuffle_epi8(e, split);
  const __m128i e0 = _mm256_castsi256_si128(e), e1 = _mm256_extracti128_si256(e, 1);
  tlo = _mm_unpacklo_epi64(e0, e1);
  thi = _mm_unpackhi_epi64(e0, e1);
}

// 16 words (8 per lane) -> fp32, j = 0: words 0..3 of both lanes, j = 1: words 4..7.
template <Rnd R>
QK_TARGET_WO inline void words_to_f32(__m256i wv, __m256& f0, __m256& f1) {
  if constexpr (R == Rnd::BF16) {
    const __m256i z = _mm256_setzero_si256();
    f0 = _mm256_castsi256_ps(_mm256_unpacklo_epi16(z, wv));
    f1 = _mm256_castsi256_ps(_mm256_unpackhi_epi16(z, wv));
  } else {
    const __m256i q = _mm256_permute4x64_epi64(wv, 0xD8);  // [l0 w0-3, l1 w0-3 | l0 w4-7, l1 w4-7]
    f0 = _mm256_cvtph_ps(_mm256_castsi256_si128(q));
    f1 = _mm256_cvtph_ps(_mm256_extracti128_si256(q, 1));
  }
}

// MM rows of x (fp32, lut_korder) x NR weight rows from n0 -> y[m, n0 + r] (fp32 sums).
template <Rnd R, int MM, int NR>
QK_TARGET_WO void gemv4_lut(const Weight& w, const float* x, int64_t n0, float* y) {
  constexpr int A = MM == 1 ? 2 : 1;  // FMA chains per (m, r) (more spill: 16 ymm registers)
  const int64_t K = w.K, ng = w.ng, G = w.G;
  const __m256i m15 = _mm256_set1_epi8(0x0F);
  const uint8_t* q[NR];
  __m256 acc[MM][NR][A], tot[MM][NR];
  for (int r = 0; r < NR; ++r) {
    q[r] = w.q4 + (n0 + r) * (K / 2);
    for (int m = 0; m < MM; ++m) tot[m][r] = _mm256_setzero_ps();
  }
  const int64_t span = G == 32 ? 64 : G;  // K covered by one set of tables
  const int64_t gstep = G == 32 ? 2 : 1;
  for (int64_t k0 = 0, g = 0; k0 < K; k0 += span, g += gstep) {
    __m256i TL[NR], TH[NR];
    for (int r = 0; r < NR; ++r) {
      const int64_t n = n0 + r;
      __m128i lo0, hi0;
      lut_tables<R>(w.scale[n * ng + g], w.has_zero ? w.zero[n * ng + g] : 8, lo0, hi0);
      if (G == 32) {
        __m128i lo1, hi1;
        lut_tables<R>(w.scale[n * ng + g + 1], w.has_zero ? w.zero[n * ng + g + 1] : 8, lo1, hi1);
        TL[r] = _mm256_set_m128i(lo1, lo0);
        TH[r] = _mm256_set_m128i(hi1, hi0);
      } else {
        TL[r] = _mm256_broadcastsi128_si256(lo0);
        TH[r] = _mm256_broadcastsi128_si256(hi0);
      }
    }
    for (int m = 0; m < MM; ++m)
      for (int r = 0; r < NR; ++r)
        for (int a = 0; a < A; ++a) acc[m][r][a] = _mm256_setzero_ps();
    for (int64_t k = k0; k < k0 + span; k += 64) {
      if ((k & 127) == 0)  // the next tile's rows, one 64-byte line (128 nibbles) each
        for (int r = 0; r < NR; ++r)
          _mm_prefetch(reinterpret_cast<const char*>(q[r] + k / 2 + NR * (K / 2)), _MM_HINT_T0);
      for (int r = 0; r < NR; ++r) {
        __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q[r] + k / 2));
        if (!w.has_zero) v = _mm256_xor_si256(v, _mm256_set1_epi8(static_cast<char>(0x88)));  // u = q + 8
        const __m256i nib[2] = {_mm256_and_si256(v, m15), _mm256_and_si256(_mm256_srli_epi16(v, 4), m15)};
        for (int h = 0; h < 2; ++h) {
          const __m256i bl = _mm256_shuffle_epi8(TL[r], nib[h]), bh = _mm256_shuffle_epi8(TH[r], nib[h]);
          __m256 f[4];
          words_to_f32<R>(_mm256_unpacklo_epi8(bl, bh), f[0], f[1]);
          words_to_f32<R>(_mm256_unpackhi_epi8(bl, bh), f[2], f[3]);
          for (int j = 0; j < 4; ++j)
            for (int m = 0; m < MM; ++m)
              acc[m][r][j % A] = _mm256_fmadd_ps(_mm256_loadu_ps(x + m * K + k + 32 * h + 8 * j), f[j], acc[m][r][j % A]);
        }
      }
    }
    for (int m = 0; m < MM; ++m)
      for (int r = 0; r < NR; ++r) {
        __m256 t = acc[m][r][0];
        for (int a = 1; a < A; ++a) t = _mm256_add_ps(t, acc[m][r][a]);
        tot[m][r] = _mm256_add_ps(tot[m][r], t);
      }
  }
  for (int m = 0; m < MM; ++m)
    for (int r = 0; r < NR; ++r) y[m * w.N + n0 + r] = hsum(tot[m][r]);
}

template <Rnd R, int MM>
void gemv4_lut_rows_mm(const Weight& w, const float* x, int64_t n0, int64_t n1, float* y) {
  constexpr int NR = MM <= 2 ? 2 : 1;
  int64_t n = n0;
  for (; n + NR <= n1; n += NR) gemv4_lut<R, MM, NR>(w, x, n, y);
  for (; n < n1; ++n) gemv4_lut<R, MM, 1>(w, x, n, y);
}

template <Rnd R>
void gemv4_lut_rows(const Weight& w, const float* x, int64_t M, int64_t n0, int64_t n1, float* y) {
  switch (M) {
    case 1: gemv4_lut_rows_mm<R, 1>(w, x, n0, n1, y); break;
    case 2: gemv4_lut_rows_mm<R, 2>(w, x, n0, n1, y); break;
    case 3: gemv4_lut_rows_mm<R, 3>(w, x, n0, n1, y); break;
    default: gemv4_lut_rows_mm<R, 4>(w, x, n0, n1, y); break;
  }
}

void decode_row_avx2_any(const Weight& w, int64_t n, Rnd r, float* out) {
  if (r == Rnd::F32) decode_row_avx2<Rnd::F32>(w, n, out);
  else if (r == Rnd::BF16) decode_row_avx2<Rnd::BF16>(w, n, out);
  else decode_row_avx2<Rnd::F16>(w, n, out);
}


// Outer-product tile for the tiled path: C[m, 0..15] += sum_{k < kc} x[m * ldx + k] * wT[k * 16 + 0..15]
// for m < MR, with the weight tile transposed to K-major (16 rows = 2 ymm per k). 12 accumulators
// for 6 rows, x broadcast from memory, 12 FMAs per 2 weight loads; the tile's K block (kWoKB
// values, 16 KB) stays in L1 while the x rows stream past it. Each call sums its K block in fresh
// registers (a sequential fp32 chain of at most kWoKB products per output) and adds it to C.
constexpr int64_t kWoKB = 256;

template <int MR>
QK_TARGET_WO void outer_tile_avx2(const float* x, int64_t ldx, const float* wT, int64_t kc, float* c) {
  __m256 a0[MR], a1[MR];
#pragma GCC unroll 6
  for (int m = 0; m < MR; ++m) a0[m] = a1[m] = _mm256_setzero_ps();
  for (int64_t k = 0; k < kc; ++k) {
    const __m256 w0 = _mm256_loadu_ps(wT + k * 16), w1 = _mm256_loadu_ps(wT + k * 16 + 8);
#pragma GCC unroll 6
    for (int m = 0; m < MR; ++m) {
      const __m256 xb = _mm256_broadcast_ss(x + m * ldx + k);
      a0[m] = _mm256_fmadd_ps(xb, w0, a0[m]);
      a1[m] = _mm256_fmadd_ps(xb, w1, a1[m]);
    }
  }
#pragma GCC unroll 6
  for (int m = 0; m < MR; ++m) {
    _mm256_storeu_ps(c + m * 16, _mm256_add_ps(_mm256_loadu_ps(c + m * 16), a0[m]));
    _mm256_storeu_ps(c + m * 16 + 8, _mm256_add_ps(_mm256_loadu_ps(c + m * 16 + 8), a1[m]));
  }
}

using OuterTileFn = void (*)(const float*, int64_t, const float*, int64_t, float*);
struct OuterTable {
  OuterTileFn fn[6] = {&outer_tile_avx2<1>, &outer_tile_avx2<2>, &outer_tile_avx2<3>,
                       &outer_tile_avx2<4>, &outer_tile_avx2<5>, &outer_tile_avx2<6>};
};

// dst[k * 16 + i] = src[i * lds + k] for i < 16, k < K (16 rows of K floats -> K-major), with
// 8 x 8 in-register transposes; rows >= nt are written as zeros.
QK_TARGET_WO void transpose_rows16(const float* src, int64_t lds, int64_t nt, int64_t K, float* dst) {
  const int64_t K8 = K / 8 * 8;
  for (int h = 0; h < 2; ++h) {
    for (int64_t k = 0; k < K8; k += 8) {
      __m256 r[8];
      for (int i = 0; i < 8; ++i)
        r[i] = (h * 8 + i < nt) ? _mm256_loadu_ps(src + (h * 8 + i) * lds + k) : _mm256_setzero_ps();
      const __m256 t0 = _mm256_unpacklo_ps(r[0], r[1]), t1 = _mm256_unpackhi_ps(r[0], r[1]);
      const __m256 t2 = _mm256_unpacklo_ps(r[2], r[3]), t3 = _mm256_unpackhi_ps(r[2], r[3]);
      const __m256 t4 = _mm256_unpacklo_ps(r[4], r[5]), t5 = _mm256_unpackhi_ps(r[4], r[5]);
      const __m256 t6 = _mm256_unpacklo_ps(r[6], r[7]), t7 = _mm256_unpackhi_ps(r[6], r[7]);
      const __m256 u0 = _mm256_shuffle_ps(t0, t2, 0x44), u1 = _mm256_shuffle_ps(t0, t2, 0xEE);
      const __m256 u2 = _mm256_shuffle_ps(t1, t3, 0x44), u3 = _mm256_shuffle_ps(t1, t3, 0xEE);
      const __m256 u4 = _mm256_shuffle_ps(t4, t6, 0x44), u5 = _mm256_shuffle_ps(t4, t6, 0xEE);
      const __m256 u6 = _mm256_shuffle_ps(t5, t7, 0x44), u7 = _mm256_shuffle_ps(t5, t7, 0xEE);
      float* d = dst + k * 16 + h * 8;
      _mm256_storeu_ps(d + 0 * 16, _mm256_permute2f128_ps(u0, u4, 0x20));
      _mm256_storeu_ps(d + 1 * 16, _mm256_permute2f128_ps(u1, u5, 0x20));
      _mm256_storeu_ps(d + 2 * 16, _mm256_permute2f128_ps(u2, u6, 0x20));
      _mm256_storeu_ps(d + 3 * 16, _mm256_permute2f128_ps(u3, u7, 0x20));
      _mm256_storeu_ps(d + 4 * 16, _mm256_permute2f128_ps(u0, u4, 0x31));
      _mm256_storeu_ps(d + 5 * 16, _mm256_permute2f128_ps(u1, u5, 0x31));
      _mm256_storeu_ps(d + 6 * 16, _mm256_permute2f128_ps(u2, u6, 0x31));
      _mm256_storeu_ps(d + 7 * 16, _mm256_permute2f128_ps(u3, u7, 0x31));
    }
  }
  for (int64_t k = K8; k < K; ++k)
    for (int64_t i = 0; i < 16; ++i) dst[k * 16 + i] = i < nt ? src[i * lds + k] : 0.0f;
}

bool cpu_has_f16c() {
  static const bool has = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("f16c");
  }();
  return has;
}
#endif

// ------------------------------------------------------------------ driver

// xf (fp32 [M, K], contiguous) with element k of every row moved to position pos(k).
template <typename Pos>
at::Tensor permute_k(const at::Tensor& xf, Pos pos) {
  const int64_t M = xf.size(0), K = xf.size(1);
  at::Tensor xp = at::empty({M, K}, xf.options());
  const float* src = xf.data_ptr<float>();
  float* dst = xp.data_ptr<float>();
  at::parallel_for(0, M, std::max<int64_t>(1, (1 << 16) / std::max<int64_t>(K, 1)), [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m)
      for (int64_t k = 0; k < K; ++k) dst[m * K + pos(k)] = src[m * K + k];
  });
  return xp;
}

// x as fp32 [M, K] in the common K order (x is contiguous).
at::Tensor x_in_k_order(const at::Tensor& x, const Weight& w) {
  at::Tensor xf = x.scalar_type() == at::kFloat ? x : x.to(at::kFloat);
  if (!w.int4 || w.Kv == 0) return xf;
  return permute_k(xf, [&](int64_t k) { return korder(w, k); });
}

template <typename out_t>
void store_out(const float* acc, int64_t lda, int64_t rows, int64_t cols, const float* bias, out_t* y, int64_t ldy) {
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t j = 0; j < cols; ++j) {
      float v = acc[i * lda + j];
      if (bias) v = v + bias[j];
      y[i * ldy + j] = static_cast<out_t>(v);  // round half to even, as .to(dtype)
    }
}

void store_any(at::ScalarType st, const float* acc, int64_t lda, int64_t rows, int64_t cols, const float* bias,
               void* y, int64_t ldy) {
  if (st == at::kFloat) store_out(acc, lda, rows, cols, bias, static_cast<float*>(y), ldy);
  else if (st == at::kHalf) store_out(acc, lda, rows, cols, bias, static_cast<c10::Half*>(y), ldy);
  else store_out(acc, lda, rows, cols, bias, static_cast<c10::BFloat16*>(y), ldy);
}


// ------------------------------------------------------------------ AVX-512 F/BW/VL/DQ (+ AVX512-BF16)
//
// Everything here works on 4-byte "units" of K: an fp32 value (fp32 FMA paths), or a pair of bf16
// values (vdpbf16ps path, two consecutive K positions). x is packed once per call into units in
// the weights' K order; weights are decoded into units, a K block at a time, into a per-thread
// buffer (L1 / L2), exactly rounded per the contract, then consumed by zmm FMA / vdpbf16ps.
#if QK_X86
#define QK_T512 QK_TARGET_AVX512
#define QK_TBF16 QK_TARGET_AVX512BF16
using bf16_tiles::MicroFn;         // qk_bf16_tiles.h
using bf16_tiles::transpose16x16;

constexpr int64_t kNR512 = 12;    // weight rows per micro tile (tiled path; bf16 x: 12, 8 or 6, see tiled512)
constexpr int64_t kNC512 = 48;    // weight rows decoded per chunk (a multiple of 24 = lcm of the tile rows)
constexpr int64_t kKCU512 = 256;  // K units per decoded block, fp32 units
constexpr int64_t kKCUBf16 = 512; // the same, bf16 pairs

// int4 K order of the AVX-512 paths: inside every full 32-element chunk the 16 even elements, then
// the 16 odd ones (the low / high nibbles of 16 bytes); a tail that is not a multiple of 32 (only
// possible with G = K) stays natural. int8: natural.
inline int64_t kv512(const Weight& w) { return w.int4 ? w.K / 32 * 32 : w.K; }
inline int64_t k_of_pos512(const Weight& w, int64_t p) {
  if (!w.int4 || p >= kv512(w)) return p;
  const int64_t c = p & ~int64_t(31), j = p & 31;
  return c + (j < 16 ? 2 * j : 2 * (j - 16) + 1);
}

template <Rnd R>
QK_T512 inline __m512 round512(__m512 v) {
  if constexpr (R == Rnd::BF16) {
    // round half to even to the top 16 bits; a NaN becomes a quiet NaN with the same top bits
    // (the bias trick could turn it into Inf or flip its sign).
    const __m512i u = _mm512_castps_si512(v);
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    __m512i t = _mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF)));
    t = _mm512_and_si512(t, _mm512_set1_epi32(static_cast<int>(0xFFFF0000u)));
    const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    t = _mm512_mask_mov_epi32(t, nan, _mm512_or_si512(u, _mm512_set1_epi32(0x00400000)));
    return _mm512_castsi512_ps(t);
  } else if constexpr (R == Rnd::F16) {
    return _mm512_cvtph_ps(_mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  } else {
    return v;
  }
}

// 16 values already rounded to bf16 (round512<BF16>) -> their 16-bit patterns.
QK_T512 inline __m256i bf16_words(__m512 v) {
  return _mm512_cvtepi32_epi16(_mm512_srli_epi32(_mm512_castps_si512(v), 16));
}

// The 16 spec weights rnd((v - z) * s), v = 0..15, as fp32 (reference: (q - z) exact, one fp32 product).
template <Rnd R>
QK_T512 inline __m512 table512(float s, int32_t z) {
  const __m512i iota = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  return round512<R>(_mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(iota, _mm512_set1_epi32(z))), _mm512_set1_ps(s)));
}

// Group of K position p (< the natural-order tail, so also of its natural k): no division.
inline int64_t group512(const Weight& w, int64_t p) { return w.ng == 1 ? 0 : p >> w.gshift; }

// Software prefetch distance of the decoders, in weight bytes ahead of the byte being decoded (rows
// are contiguous, so this runs into the next rows): a steady stream of one prefetch per line. M = 1,
// 6 x (4096 x 11008) int4, 1 thread, 3 runs each: no prefetch 5.7-8.7 ms/layer; 4 KB 3.9-5.7;
// 16 KB 4.5-5.3; 64 KB 4.4-5.3 (a shared, loaded machine).
inline int64_t pf_dist() { return 4096; }

inline int32_t zero_of(const Weight& w, int64_t n, int64_t g) { return w.has_zero ? w.zero[n * w.ng + g] : 8; }

// Row n, K positions [p0, p1) (p0 a multiple of 64) in the AVX-512 K order -> fp32 spec weights.
template <Rnd R>
QK_T512 void decode512_f32(const Weight& w, int64_t n, int64_t p0, int64_t p1, float* out) {
  int64_t p = p0;
  if (!w.int4) {
    const int8_t* q = w.q8 + n * w.K;
    const __m512 sv = _mm512_set1_ps(w.scale[n]);
    const int64_t pf = pf_dist();
    for (; p + 16 <= p1; p += 16) {
      if (pf && (p & 63) == 0) _mm_prefetch(reinterpret_cast<const char*>(q + p + pf), _MM_HINT_T0);
      _mm512_storeu_ps(out + p - p0, round512<R>(_mm512_mul_ps(
          _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q + p)))), sv)));
    }
  } else {
    const uint8_t* q = w.q4 + n * (w.K / 2);
    const __m512i flip = _mm512_set1_epi32(w.has_zero ? 0 : 0x88);  // signed nibbles: u ^ 8, zero' = 8
    const int64_t pe = std::min(p1, kv512(w));
    int64_t gcur = -1;
    __m512 T = _mm512_setzero_ps();
    const int64_t pf = pf_dist();
    for (; p + 32 <= pe; p += 32) {
      if (pf && (p & 127) == 0) _mm_prefetch(reinterpret_cast<const char*>(q + p / 2 + pf), _MM_HINT_T0);
      const int64_t g = group512(w, p);
      if (g != gcur) {
        T = table512<R>(w.scale[n * w.ng + g], zero_of(w, n, g));
        gcur = g;
      }
      const __m512i b = _mm512_xor_si512(
          _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q + p / 2))), flip);
      _mm512_storeu_ps(out + p - p0, _mm512_permutexvar_ps(b, T));  // vpermps: index bits 3:0
      _mm512_storeu_ps(out + p - p0 + 16, _mm512_permutexvar_ps(_mm512_srli_epi32(b, 4), T));
    }
  }
  for (; p < p1; ++p) out[p - p0] = weight_at(w, n, p, R);  // natural-order tail
}

// Row n, K positions [p0, p1) (p0 a multiple of 64) -> bf16 patterns of the spec weights; an odd
// count is padded with one zero (the pair unit of vdpbf16ps).
QK_TBF16 void decode512_bf16(const Weight& w, int64_t n, int64_t p0, int64_t p1, uint16_t* out) {
  int64_t p = p0;
  if (!w.int4) {
    const int8_t* q = w.q8 + n * w.K;
    const __m512 sv = _mm512_set1_ps(w.scale[n]);
    if (w.scale[n] == 0.0f || std::fabs(w.scale[n]) >= FLT_MIN) {
      // q * s is then never denormal, and vcvtne2ps2bf16 (RNE; only its denormals-are-zero differs
      // from the reference's rounding) gives the exact bf16 weight, NaN and Inf included.
      const int64_t pf = pf_dist();
      for (; p + 32 <= p1; p += 32) {
        if (pf && (p & 63) == 0) _mm_prefetch(reinterpret_cast<const char*>(q + p + pf), _MM_HINT_T0);
        const __m512 a = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q + p)))), sv);
        const __m512 b = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q + p + 16)))), sv);
        _mm512_storeu_si512(out + p - p0, (__m512i)_mm512_cvtne2ps_pbh(b, a));
      }
    }
    for (; p + 16 <= p1; p += 16)
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + p - p0),
                          bf16_words(round512<Rnd::BF16>(_mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(
                              _mm_loadu_si128(reinterpret_cast<const __m128i*>(q + p)))), sv))));
  } else {
    const uint8_t* q = w.q4 + n * (w.K / 2);
    const int64_t pe = std::min(p1, kv512(w));
    // 64 elements (32 bytes) per step: vpmovzxbw, then vpermw through a 32-word table holding the
    // 16 weights of the group of bytes 0..15 and the 16 of the group of bytes 16..31.
    const __m512i flip = _mm512_set1_epi16(w.has_zero ? 0 : 0x88);
    const __m512i m15 = _mm512_set1_epi16(15);
    const __m512i upper = _mm512_inserti64x4(_mm512_setzero_si512(), _mm256_set1_epi16(16), 1);
    int64_t ga = -1, gb = -1;
    __m512i T = _mm512_setzero_si512();
    const int64_t pf = pf_dist();
    for (; p + 64 <= pe; p += 64) {
      if (pf && (p & 127) == 0) _mm_prefetch(reinterpret_cast<const char*>(q + p / 2 + pf), _MM_HINT_T0);
      const int64_t g0 = group512(w, p), g1 = group512(w, p + 32);
      if (g0 != ga || g1 != gb) {
        const __m256i t0 = bf16_words(table512<Rnd::BF16>(w.scale[n * w.ng + g0], zero_of(w, n, g0)));
        const __m256i t1 = g1 == g0 ? t0 : bf16_words(table512<Rnd::BF16>(w.scale[n * w.ng + g1], zero_of(w, n, g1)));
        T = _mm512_inserti64x4(_mm512_castsi256_si512(t0), t1, 1);
        ga = g0;
        gb = g1;
      }
      const __m512i b = _mm512_xor_si512(
          _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + p / 2))), flip);
      const __m512i lo = _mm512_permutexvar_epi16(_mm512_or_si512(_mm512_and_si512(b, m15), upper), T);
      const __m512i hi = _mm512_permutexvar_epi16(_mm512_or_si512(_mm512_srli_epi16(b, 4), upper), T);
      // lo = [even of bytes 0..15 | even of 16..31], hi likewise odd -> [even, odd] per 32-chunk
      _mm512_storeu_si512(out + p - p0, _mm512_shuffle_i64x2(lo, hi, 0x44));
      _mm512_storeu_si512(out + p - p0 + 32, _mm512_shuffle_i64x2(lo, hi, 0xEE));
    }
    if (p + 32 <= pe) {  // one 32-chunk left: the fp32 table path
      const int64_t g = group512(w, p);
      const __m512 T32 = table512<Rnd::BF16>(w.scale[n * w.ng + g], zero_of(w, n, g));
      const __m512i b = _mm512_xor_si512(_mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q + p / 2))),
                                         _mm512_set1_epi32(w.has_zero ? 0 : 0x88));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + p - p0), bf16_words(_mm512_permutexvar_ps(b, T32)));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + p - p0 + 16),
                          bf16_words(_mm512_permutexvar_ps(_mm512_srli_epi32(b, 4), T32)));
      p += 32;
    }
  }
  for (; p < p1; ++p) out[p - p0] = c10::BFloat16(weight_at(w, n, p, Rnd::BF16)).x;
  if ((p1 - p0) & 1) out[p1 - p0] = 0;
}

// Units [u0, u0 + uc) of row n (or zeros for a padding row) into dst, zero-padded to ucp units.
template <bool BD>
QK_T512 void decode_units(const Weight& w, Rnd r, int64_t n, int64_t u0, int64_t uc, int64_t ucp, uint32_t* dst) {
  if (n >= w.N) {
    std::memset(dst, 0, ucp * 4);
    return;
  }
  if constexpr (BD) {
    decode512_bf16(w, n, 2 * u0, std::min(2 * (u0 + uc), w.K), reinterpret_cast<uint16_t*>(dst));
  } else {
    float* f = reinterpret_cast<float*>(dst);
    if (r == Rnd::F32) decode512_f32<Rnd::F32>(w, n, u0, u0 + uc, f);
    else if (r == Rnd::BF16) decode512_f32<Rnd::BF16>(w, n, u0, u0 + uc, f);
    else decode512_f32<Rnd::F16>(w, n, u0, u0 + uc, f);
  }
  if (ucp > uc) std::memset(dst + uc, 0, (ucp - uc) * 4);
}

// Prefetch the weight bytes of rows [n, n + nr) that hold K units [u0, u0 + uc) (next tile).
template <int HINT = _MM_HINT_T0>
inline void prefetch_units(const Weight& w, bool bd, int64_t n, int64_t nr, int64_t u0, int64_t uc) {
  const int64_t k0 = bd ? 2 * u0 : u0, k1 = std::min(w.K, bd ? 2 * (u0 + uc) : u0 + uc);
  for (int64_t i = n; i < std::min(n + nr, w.N); ++i) {
    const char* base = w.int4 ? reinterpret_cast<const char*>(w.q4 + i * (w.K / 2)) + k0 / 2
                              : reinterpret_cast<const char*>(w.q8 + i * w.K) + k0;
    const int64_t bytes = w.int4 ? (k1 - k0 + 1) / 2 : k1 - k0;
    for (int64_t b = 0; b < bytes; b += 64) _mm_prefetch(base + b, static_cast<_mm_hint>(HINT));
  }
}

// Micro tiles of the tiled path: C[r][lane] (+)= sum_u x[u][lane] . w[r][u] for 16 * MZ lanes (rows
// of x) and NR weight rows; x is packed [U][16] per 16 rows of x (xa: lanes 0..15, xb: 16..31).
template <int MZ, int NR>
QK_T512 void micro_f32(const uint32_t* xa, int64_t xs, const uint32_t* wt, int64_t uc, float* c, int64_t ldc,
                       bool first) {
  const uint32_t* xb = xa + xs;
  __m512 acc[NR][MZ];
  for (int r = 0; r < NR; ++r)
    for (int z = 0; z < MZ; ++z) acc[r][z] = first ? _mm512_setzero_ps() : _mm512_loadu_ps(c + r * ldc + 16 * z);
  const float* X0 = reinterpret_cast<const float*>(xa);
  const float* X1 = reinterpret_cast<const float*>(xb);
  const float* W = reinterpret_cast<const float*>(wt);
  for (int64_t u = 0; u < uc; ++u) {
    const __m512 x0 = _mm512_loadu_ps(X0 + u * 16);
    const __m512 x1 = MZ > 1 ? _mm512_loadu_ps(X1 + u * 16) : x0;
#pragma GCC unroll 12
    for (int r = 0; r < NR; ++r) {
      const __m512 wv = _mm512_set1_ps(W[r * kKCU512 + u]);  // one base register for all rows
      acc[r][0] = _mm512_fmadd_ps(x0, wv, acc[r][0]);
      if constexpr (MZ > 1) acc[r][1] = _mm512_fmadd_ps(x1, wv, acc[r][1]);
    }
  }
  for (int r = 0; r < NR; ++r)
    for (int z = 0; z < MZ; ++z) _mm512_storeu_ps(c + r * ldc + 16 * z, acc[r][z]);
}

// bf16: bf16_tiles::micro_bf16 (qk_bf16_tiles.h, shared with gemm_4bit.cpp).

// GEMV tile: MM rows of x (units [MM][ldx], zero-padded to a multiple of 16) x NR weight rows from
// n0, all of K; each K block of NR rows is decoded into buf (L1) and dotted with x in zmm. TWO: two
// accumulator sets (alternate 16-unit steps) for more chains in flight when MM * NR is small.
template <int MM, int NR, bool TWO>
QK_T512 void gemv512_f32(const Weight& w, Rnd rnd, const uint32_t* xu, int64_t ldx, int64_t U, int64_t n0, float* y,
                         uint32_t* buf) {
  __m512 acc[2][MM][NR];
  for (int a = 0; a < 2; ++a)
    for (int m = 0; m < MM; ++m)
      for (int r = 0; r < NR; ++r) acc[a][m][r] = _mm512_setzero_ps();
  const float* X = reinterpret_cast<const float*>(xu);
  const float* Bf = reinterpret_cast<const float*>(buf);
  // whole rows (contiguous in memory: sequential reads, prefetched pf_dist() bytes ahead)
  for (int r = 0; r < NR; ++r) {
    decode_units<false>(w, rnd, n0 + r, 0, U, ldx, buf + r * ldx);
  }
  {
    const int64_t u0 = 0;
    for (int64_t u = 0; u < ldx; u += 32) {
#pragma GCC unroll 2
      for (int h = 0; h < 2; ++h) {
        __m512 xv[MM];
        for (int m = 0; m < MM; ++m) xv[m] = _mm512_loadu_ps(X + m * ldx + u0 + u + 16 * h);
        for (int r = 0; r < NR; ++r) {
          const __m512 wv = _mm512_loadu_ps(Bf + r * ldx + u + 16 * h);
          for (int m = 0; m < MM; ++m) {
            __m512& a = acc[TWO ? h : 0][m][r];
            a = _mm512_fmadd_ps(xv[m], wv, a);
          }
        }
      }
    }
  }
  for (int m = 0; m < MM; ++m)
    for (int r = 0; r < NR; ++r) y[m * w.N + n0 + r] = _mm512_reduce_add_ps(_mm512_add_ps(acc[0][m][r], acc[1][m][r]));
}

template <int MM, int NR, bool TWO>
QK_TBF16 void gemv512_bf16(const Weight& w, Rnd rnd, const uint32_t* xu, int64_t ldx, int64_t U, int64_t n0, float* y,
                           uint32_t* buf) {
  __m512 acc[2][MM][NR];
  for (int a = 0; a < 2; ++a)
    for (int m = 0; m < MM; ++m)
      for (int r = 0; r < NR; ++r) acc[a][m][r] = _mm512_setzero_ps();
  // whole rows (contiguous in memory: sequential reads, prefetched pf_dist() bytes ahead)
  for (int r = 0; r < NR; ++r) {
    decode_units<true>(w, rnd, n0 + r, 0, U, ldx, buf + r * ldx);
  }
  {
    const int64_t u0 = 0;
    for (int64_t u = 0; u < ldx; u += 32) {
#pragma GCC unroll 2
      for (int h = 0; h < 2; ++h) {
        __m512i xv[MM];
        for (int m = 0; m < MM; ++m) xv[m] = _mm512_loadu_si512(xu + m * ldx + u0 + u + 16 * h);
        for (int r = 0; r < NR; ++r) {
          const __m512i wv = _mm512_loadu_si512(buf + r * ldx + u + 16 * h);
          for (int m = 0; m < MM; ++m) {
            __m512& a = acc[TWO ? h : 0][m][r];
            a = _mm512_dpbf16_ps(a, (__m512bh)xv[m], (__m512bh)wv);
          }
        }
      }
    }
  }
  for (int m = 0; m < MM; ++m)
    for (int r = 0; r < NR; ++r) y[m * w.N + n0 + r] = _mm512_reduce_add_ps(_mm512_add_ps(acc[0][m][r], acc[1][m][r]));
}

template <bool BD, int MM>
void gemv512_rows_mm(const Weight& w, Rnd rnd, const uint32_t* xu, int64_t ldx, int64_t U, int64_t n0, int64_t n1,
                     float* y, uint32_t* buf) {
  constexpr int NR = MM <= 2 ? 4 : 2;
  constexpr bool TWO = MM <= 4;
  int64_t n = n0;
  for (; n + NR <= n1; n += NR) {
    if constexpr (BD) gemv512_bf16<MM, NR, TWO>(w, rnd, xu, ldx, U, n, y, buf);
    else gemv512_f32<MM, NR, TWO>(w, rnd, xu, ldx, U, n, y, buf);
  }
  for (; n < n1; ++n) {
    if constexpr (BD) gemv512_bf16<MM, 1, true>(w, rnd, xu, ldx, U, n, y, buf);
    else gemv512_f32<MM, 1, true>(w, rnd, xu, ldx, U, n, y, buf);
  }
}

template <bool BD>
void gemv512_rows(const Weight& w, Rnd rnd, const uint32_t* xu, int64_t ldx, int64_t U, int64_t M, int64_t n0,
                  int64_t n1, float* y, uint32_t* buf) {
  switch (M) {
    case 1: gemv512_rows_mm<BD, 1>(w, rnd, xu, ldx, U, n0, n1, y, buf); break;
    case 2: gemv512_rows_mm<BD, 2>(w, rnd, xu, ldx, U, n0, n1, y, buf); break;
    case 3: gemv512_rows_mm<BD, 3>(w, rnd, xu, ldx, U, n0, n1, y, buf); break;
    case 4: gemv512_rows_mm<BD, 4>(w, rnd, xu, ldx, U, n0, n1, y, buf); break;
    case 5: gemv512_rows_mm<BD, 5>(w, rnd, xu, ldx, U, n0, n1, y, buf); break;
    case 6: gemv512_rows_mm<BD, 6>(w, rnd, xu, ldx, U, n0, n1, y, buf); break;
    case 7: gemv512_rows_mm<BD, 7>(w, rnd, xu, ldx, U, n0, n1, y, buf); break;
    default: gemv512_rows_mm<BD, 8>(w, rnd, xu, ldx, U, n0, n1, y, buf); break;
  }
}

// ---- bf16 x, M <= 4: GEMV decoding in registers (no L1 buffer). Every step reads 32 weight bytes of
// each of NR rows (int4: 64 weights, int8: 32) and turns them into 32-word bf16 vectors that go
// straight into vdpbf16ps against x (packed once per call in the matching order, in weight_only_gemm512).
// int4 (K % 64 == 0, G = 32 or G % 64 == 0): the 32 bytes are zero-extended to words; their low
// nibbles are the even elements 0, 2, .., 62 of the 64-block, their high nibbles the odd ones; each
// indexes (vpermw) a 32-word table holding rnd_bf16((v - z) * s) for v = 0..15 of the block's group
// in both halves (G = 32: the first group's 16 words, then the second's, the index gets + 16 in the
// upper half). Signed nibbles: the table is indexed by the stored nibble (entries (v ^ 8) - 8).
// Tables are built once per (row, group) in registers: 16 fp32 (v - z) * s, vcvtne2ps2bf16.
// int8 (any K; the last step masked): vpmovsxbd, cvtdq2ps, * row scale, vcvtne2ps2bf16.
// vcvtne(2)ps2bf16 is RNE, as the contract's rounding, except that it treats denormal inputs as
// zero: used only when the scale is 0 or normal (then no (v - z) * s is denormal); a denormal scale
// takes round512 (integer RNE on the bits).
// int4 weight stream: prefetched into L2 (prefetcht1), whole tiles >= kRegPfBytes ahead. Into L1, two
// tiles ahead, the outstanding line fills capped the stream: 1 thread, CPU time, M = 1, 4096 x 11008
// G = 128 asym rotating over 6 layers, one process (2026-12-07, cpu_weight_only_2026-12-07.md):
// 2.23 ms (L1, 16 KB ahead) -> 1.63-1.67 ms (L2, 16 / 32 / 48 / 64 KB ahead: alike; 32 KB kept).
// int8 (gemv_reg_w8, 4 KB rows): into L2 was not faster in that run (3.61 / 3.65 ms vs 3.46); a later
// interleaved run (2026-12-07, 15:50 UTC, 4096 x 11008 from DRAM) gave 1.04-1.10x at 1 and 2 threads
// for 16 to 64 KB ahead into L2, so it prefetches as int4 does now.
constexpr int64_t kRegPfBytes = 32 * 1024;

inline bool reg_gemv_applies(const Weight& w) {
  if (!w.int4) return true;
  return w.K % 64 == 0 && (w.ng == 1 ? true : (w.G == 32 || w.G % 64 == 0));
}

QK_TBF16 inline __m512 table_f32_reg(const float* s, int32_t z, bool sym) {
  const __m512i iota = sym ? _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, -8, -7, -6, -5, -4, -3, -2, -1)
                           : _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  return _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(iota, _mm512_set1_epi32(z))), _mm512_set1_ps(*s));
}

// 32 bf16 words: the 16 weights of table va (words 0..15) and of vb (16..31). fast: the scales are 0 or
// normal, so no entry is denormal and vcvtne2ps2bf16 (RNE, denormal inputs as zero) rounds as the
// contract; else the integer rounding (round512).
QK_TBF16 inline __m512i bf16_pack2(__m512 va, __m512 vb, bool fast) {
  if (__builtin_expect(fast, 1)) return (__m512i)_mm512_cvtne2ps_pbh(vb, va);
  return _mm512_inserti64x4(_mm512_castsi256_si512(bf16_words(round512<Rnd::BF16>(va))),
                            bf16_words(round512<Rnd::BF16>(vb)), 1);
}

// Whether none of the n floats at p is denormal.
QK_TBF16 inline bool no_denormal(const float* p, int64_t n) {
  __mmask16 d = 0;
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) d |= _mm512_fpclass_ps_mask(_mm512_loadu_ps(p + i), 0x20);
  if (i < n) d |= _mm512_fpclass_ps_mask(_mm512_maskz_loadu_ps(static_cast<__mmask16>((1u << (n - i)) - 1), p + i), 0x20);
  return d == 0;
}

template <int NR, bool G32>
QK_TBF16 inline void tables_reg(const Weight& w, int64_t n0, int64_t g, bool sym, bool fast, __m512i* T) {
  const float* S = w.scale + n0 * w.ng;
  for (int r = 0; r < NR; ++r) {
    const int64_t n = n0 + r;
    if (G32) {
      T[r] = bf16_pack2(table_f32_reg(S + r * w.ng + g, sym ? 0 : w.zero[n * w.ng + g], sym),
                        table_f32_reg(S + r * w.ng + g + 1, sym ? 0 : w.zero[n * w.ng + g + 1], sym), fast);
    } else {
      const __m512 t = table_f32_reg(S + r * w.ng + g, sym ? 0 : w.zero[n * w.ng + g], sym);
      T[r] = bf16_pack2(t, t, fast);
    }
  }
}
template <int MM, int NR, bool G32>
QK_TBF16 void gemv_reg_w4(const Weight& w, const uint32_t* xu, int64_t ldx, int64_t n0, float* y) {
  constexpr bool TWO = MM <= 2;
  __m512 acc[MM][NR][2];
  for (int m = 0; m < MM; ++m)
    for (int r = 0; r < NR; ++r) acc[m][r][0] = acc[m][r][1] = _mm512_setzero_ps();
  const int64_t rb = w.K / 2;  // bytes per row
  const uint8_t* q = w.q4 + n0 * rb;
  const bool sym = !w.has_zero;
  const int64_t pf = (kRegPfBytes + NR * rb - 1) / (NR * rb) * (NR * rb);  // whole tiles, into L2
  const __m512i m15 = _mm512_set1_epi16(15);
  const __m512i upper = G32 ? _mm512_inserti64x4(_mm512_setzero_si512(), _mm256_set1_epi16(16), 1) : _mm512_setzero_si512();
  const int64_t span = G32 ? 32 : (w.ng == 1 ? rb : w.G / 2);  // bytes per table
  // tables of the next span are built before the current span's steps (their latency overlaps)
  __m512i T[NR], Tn[NR];
  auto group_of = [&](int64_t b0) -> int64_t { return G32 ? b0 / 16 : (w.ng == 1 ? 0 : b0 / span); };
  const bool fast = no_denormal(w.scale + n0 * w.ng, NR * w.ng);  // the tile's scales (contiguous)
  tables_reg<NR, G32>(w, n0, group_of(0), sym, fast, T);
  for (int64_t b0 = 0; b0 < rb; b0 += span) {
    if (b0 + span < rb) tables_reg<NR, G32>(w, n0, group_of(b0 + span), sym, fast, Tn);
    for (int64_t b = b0; b < b0 + span; b += 32) {
      __m512i xl[MM], xh[MM];
      for (int m = 0; m < MM; ++m) {
        xl[m] = _mm512_loadu_si512(xu + m * ldx + b);       // unit = 2 words; 32 bytes = 64 words = 32 units
        xh[m] = _mm512_loadu_si512(xu + m * ldx + b + 16);
      }
      if ((b & 63) == 0)
        for (int r = 0; r < NR; ++r) _mm_prefetch(reinterpret_cast<const char*>(q + r * rb + b + pf), _MM_HINT_T1);
      for (int r = 0; r < NR; ++r) {
        const __m512i v = _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + r * rb + b)));
        const __m512i lo = G32 ? _mm512_ternarylogic_epi32(v, m15, upper, 0xEA) : v;  // (v & 15) | upper; vpermw uses bits 4:0
        const __m512i hi = G32 ? _mm512_or_si512(_mm512_srli_epi16(v, 4), upper) : _mm512_srli_epi16(v, 4);
        const __m512i wl = _mm512_permutexvar_epi16(lo, T[r]);
        const __m512i wh = _mm512_permutexvar_epi16(hi, T[r]);
        for (int m = 0; m < MM; ++m) {
          acc[m][r][0] = _mm512_dpbf16_ps(acc[m][r][0], (__m512bh)xl[m], (__m512bh)wl);
          __m512& a1 = acc[m][r][TWO ? 1 : 0];
          a1 = _mm512_dpbf16_ps(a1, (__m512bh)xh[m], (__m512bh)wh);
        }
      }
    }
    for (int r = 0; r < NR; ++r) T[r] = Tn[r];
  }
  for (int m = 0; m < MM; ++m)
    for (int r = 0; r < NR; ++r)
      y[m * w.N + n0 + r] = _mm512_reduce_add_ps(TWO ? _mm512_add_ps(acc[m][r][0], acc[m][r][1]) : acc[m][r][0]);
}

template <int MM, int NR>
QK_TBF16 void gemv_reg_w8(const Weight& w, const uint32_t* xu, int64_t ldx, int64_t n0, float* y) {
  constexpr bool TWO = MM <= 2;
  __m512 acc[MM][NR][2];
  for (int m = 0; m < MM; ++m)
    for (int r = 0; r < NR; ++r) acc[m][r][0] = acc[m][r][1] = _mm512_setzero_ps();
  const int64_t K = w.K;
  const int8_t* q = w.q8 + n0 * K;
  // Whole tiles >= kRegPfBytes ahead, same offset, into L2: 1.04-1.10x the time of two tiles ahead into
  // L1 (4096 x 11008 bf16 x from DRAM, 1 and 2 threads, interleaved, 2026-12-07; 16-64 KB alike). The
  // GEMV still draws only ~12 GB/s per thread, below DRAM's rate (bench/results/cpu_targets14_2026-12-07.md).
  const int64_t pf = (kRegPfBytes + NR * K - 1) / (NR * K) * (NR * K);
  bool fast = true;  // no row scale denormal: no product q * s is (vcvtne2ps2bf16 would flush it)
  __m512 sv[NR];
  for (int r = 0; r < NR; ++r) {
    const float s = w.scale[n0 + r];
    fast = fast && (s == 0.0f || !(std::fabs(s) < FLT_MIN));
    sv[r] = _mm512_set1_ps(s);
  }
  for (int64_t k = 0; k < K; k += 32) {
    const int64_t left = K - k;
    const __mmask16 ma = left >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << left) - 1);
    const __mmask16 mb = left >= 32 ? 0xFFFF : (left <= 16 ? 0 : static_cast<__mmask16>((1u << (left - 16)) - 1));
    const int par = TWO ? static_cast<int>((k >> 5) & 1) : 0;
    if ((k & 63) == 0)
      for (int r = 0; r < NR; ++r) _mm_prefetch(reinterpret_cast<const char*>(q + r * K + k + pf), _MM_HINT_T1);
    __m512i xv[MM];
    for (int m = 0; m < MM; ++m) xv[m] = _mm512_loadu_si512(xu + m * ldx + k / 2);
    for (int r = 0; r < NR; ++r) {
      const int8_t* p = q + r * K + k;
      const __m512 a = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(ma, p))), sv[r]);
      const __m512 c = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(mb, p + 16))), sv[r]);
      __m512i wv;
      if (fast) wv = (__m512i)_mm512_cvtne2ps_pbh(c, a);
      else wv = _mm512_inserti64x4(_mm512_castsi256_si512(bf16_words(round512<Rnd::BF16>(a))), bf16_words(round512<Rnd::BF16>(c)), 1);
      for (int m = 0; m < MM; ++m) {
        __m512& ac = acc[m][r][par];
        ac = _mm512_dpbf16_ps(ac, (__m512bh)xv[m], (__m512bh)wv);
      }
    }
  }
  for (int m = 0; m < MM; ++m)
    for (int r = 0; r < NR; ++r)
      y[m * w.N + n0 + r] = _mm512_reduce_add_ps(TWO ? _mm512_add_ps(acc[m][r][0], acc[m][r][1]) : acc[m][r][0]);
}

template <int MM, int NR>
void gemv_reg_rows_nr(const Weight& w, const uint32_t* xu, int64_t ldx, int64_t n0, int64_t n1, float* y) {
  int64_t n = n0;
  if (!w.int4) {
    for (; n + NR <= n1; n += NR) gemv_reg_w8<MM, NR>(w, xu, ldx, n, y);
    for (; n < n1; ++n) gemv_reg_w8<MM, 1>(w, xu, ldx, n, y);
  } else if (w.ng > 1 && w.G == 32) {
    for (; n + NR <= n1; n += NR) gemv_reg_w4<MM, NR, true>(w, xu, ldx, n, y);
    for (; n < n1; ++n) gemv_reg_w4<MM, 1, true>(w, xu, ldx, n, y);
  } else {
    for (; n + NR <= n1; n += NR) gemv_reg_w4<MM, NR, false>(w, xu, ldx, n, y);
    for (; n < n1; ++n) gemv_reg_w4<MM, 1, false>(w, xu, ldx, n, y);
  }
}
template <int MM>
void gemv_reg_rows_mm(const Weight& w, const uint32_t* xu, int64_t ldx, int64_t n0, int64_t n1, float* y) {
  gemv_reg_rows_nr<MM, 4>(w, xu, ldx, n0, n1, y);
}

void gemv_reg_rows(const Weight& w, const uint32_t* xu, int64_t ldx, int64_t M, int64_t n0, int64_t n1, float* y) {
  switch (M) {
    case 1: gemv_reg_rows_mm<1>(w, xu, ldx, n0, n1, y); break;
    case 2: gemv_reg_rows_mm<2>(w, xu, ldx, n0, n1, y); break;
    case 3: gemv_reg_rows_mm<3>(w, xu, ldx, n0, n1, y); break;
    default: gemv_reg_rows_mm<4>(w, xu, ldx, n0, n1, y); break;
  }
}

// y[m][j] = c[j * ldc + m] (+ bias[j]) for m, j < 16, cast to y's dtype (round half to even, as
// .to(dtype)): a 16 x 16 register transpose of the tiled path's transposed C.
template <Rnd R>
QK_T512 void store16x16(const float* c, int64_t ldc, const float* bias, char* y, int64_t ldy) {
  __m512 r[16];
  for (int j = 0; j < 16; ++j) r[j] = _mm512_loadu_ps(c + j * ldc);
  transpose16x16(r);
  const __m512 bv = bias ? _mm512_loadu_ps(bias) : _mm512_setzero_ps();
  for (int m = 0; m < 16; ++m) {
    __m512 v = r[m];
    if (bias) v = _mm512_add_ps(v, bv);
    if constexpr (R == Rnd::F32) {
      _mm512_storeu_ps(reinterpret_cast<float*>(y) + m * ldy, v);
    } else if constexpr (R == Rnd::BF16) {
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(reinterpret_cast<uint16_t*>(y) + m * ldy),
                          bf16_words(round512<Rnd::BF16>(v)));
    } else {
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(reinterpret_cast<uint16_t*>(y) + m * ldy),
                          _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    }
  }
}


// Tiled path: threads split N into chunks of kNC512 rows; per chunk and K block of KCU units the
// rows are decoded once into wbuf, then the rows of x run micro tiles over it, MZ blocks of 16 rows of x
// x NR weight rows: fp32 2 x 12 (1 x 12 for the last 16 rows); bf16 4 x 6 (24 accumulators; 10 loads
// per 24 vdpbf16ps against 14 for 2 x 12), the last 48 / 32 / 16 rows 3 x 8, 2 x 12, 1 x 12.
// bf16, 1 thread CPU time, one process, interleaved A/B against 2 x 12 tiles with K blocks of 256
// pairs (and the earlier torch-op x pack): 4096 x 4096 M = 512 49.2 -> 44.4 ms (w8a16), 53.9 -> 44.9
// (w4a16); M = 128 11.6 -> 11.0, 12.6 -> 11.0 (bench/results/cpu_perf14_2026-12-02.md). A standalone
// loop of these tiles over L2-sized data (random bf16) runs ~245 GMAC/s, 4 x 6 vs 2 x 12 +6-9% at
// this size; with M x K of x beyond L2 ~205-215 GMAC/s (x re-read from L3 per chunk and K block).
// C is kept transposed (cbuf[n][m], the micro tiles' lane order) and stored with bias + cast at the end.
template <bool BD>
void tiled512(const Weight& w, Rnd rnd, const uint32_t* xpack, int64_t M, int64_t Mp, int64_t U, at::ScalarType st,
              const float* B, char* Y, int64_t esize) {
  constexpr int64_t KCU = BD ? kKCUBf16 : kKCU512;
  struct Tile { MicroFn fn; int64_t rows, nr; };  // rows of x (16 * MZ), weight rows
  const Tile t1 = BD ? Tile{&bf16_tiles::micro_bf16<1, 12, KCU>, 16, 12} : Tile{&micro_f32<1, kNR512>, 16, kNR512};
  const Tile t2 = BD ? Tile{&bf16_tiles::micro_bf16<2, 12, KCU>, 32, 12} : Tile{&micro_f32<2, kNR512>, 32, kNR512};
  const Tile t3 = BD ? Tile{&bf16_tiles::micro_bf16<3, 8, KCU>, 48, 8} : t2;
  const Tile t4 = BD ? Tile{&bf16_tiles::micro_bf16<4, 6, KCU>, 64, 6} : t2;
  // Rows per chunk (times mult below): their decoded units, all of K (bf16 pairs 48 x 8 KB, fp32 24 x 16 KB at
  // K = 4096), are read one K block at a time while all rows of x pass over it (x from L2: the
  // micro tiles' x loads are sequential; the block's weight rows stay in L1).
  // For M > 32, up to 4x larger chunks: the packed x (M x K units) streams from L3 once per chunk.
  // 1 thread, w8a16 bf16 x, 4096 x 11008, one process: M = 512 249 / 204 / 187 ms at 1x / 2x / 4x,
  // M = 128 62.5 / 58.8 / 58.7 ms. Halved while that leaves a thread fewer than 3 chunks.
  const int64_t NC0 = BD ? kNC512 : kNC512 / 2;
  const int64_t N = w.N;
  // Threads get contiguous row ranges of equal size (boundaries rounded to 16 rows), then chunks of NC
  // rows inside them; splitting N into chunks first and chunks over threads left one thread up to a
  // chunk ahead: 4096 rows as 22 chunks of 192 gave 2112 / 1984 rows (3% lost at M = 512).
  const int64_t T = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), (N + 15) / 16));
  const int64_t rows_t = (N + T - 1) / T;
  int64_t mult = M > 32 ? 4 : 1;
  while (mult > 1 && (rows_t + NC0 * mult - 1) / (NC0 * mult) < 3) mult /= 2;  // >= 3 chunks per thread
  const int64_t NC = NC0 * mult;
  // thread t's rows: [bound(t), bound(t + 1))
  auto bound = [&](int64_t t) { return t == 0 ? 0 : t == T ? N : std::min(N, (N * t / T + 8) / 16 * 16); };
  at::parallel_for(0, T, 1, [&](int64_t th0, int64_t th1) {
    const int64_t nblk = (U + KCU - 1) / KCU;
    std::vector<uint32_t> wbuf(nblk * NC * KCU);  // [K block][row][KCU units]
    std::vector<float> cbuf(NC * Mp), obuf(Mp * NC);
    const int64_t n_end = bound(th1);  // this task's rows: [bound(th0), n_end), contiguous
    for (int64_t n0 = bound(th0); n0 < n_end; n0 += NC) {
      const int64_t nc = std::min(NC, n_end - n0);
      const int64_t ncp = (nc + 23) / 24 * 24;  // rows decoded (zeros past nc): whole tiles of 12, 8 and 6
      const int64_t n_next = std::min(NC, n_end - n0 - nc);  // rows of the next chunk (0: none)
      // The chunk's rows are one contiguous stretch of the weight: decode them row after row
      // (sequential reads), prefetching the next chunk's rows into L2 meanwhile. Each row is stored
      // in blocks of KCU units, so that the micro tiles address all rows from one register.
      for (int64_t i = 0; i < ncp; ++i) {
        if (i < n_next) prefetch_units<_MM_HINT_T1>(w, BD, n0 + NC + i, 1, 0, U);
        for (int64_t b = 0; b < nblk; ++b) {
          const int64_t u0 = b * KCU, uc = std::min(KCU, U - u0);
          decode_units<BD>(w, rnd, i < nc ? n0 + i : w.N, u0, uc, uc, wbuf.data() + (b * NC + i) * KCU);
        }
      }
      for (int64_t u0 = 0; u0 < U; u0 += KCU) {
        const int64_t uc = std::min(KCU, U - u0);
        for (int64_t m0 = 0; m0 < Mp;) {
          const int64_t left = Mp - m0;
          const Tile& tl = left >= 64 ? t4 : left == 48 ? t3 : left >= 32 ? t2 : t1;
          const uint32_t* xa = xpack + (m0 / 16) * U * 16 + u0 * 16;
          for (int64_t r = 0; r < nc; r += tl.nr)
            tl.fn(xa, U * 16, wbuf.data() + ((u0 / KCU) * NC + r) * KCU, uc, cbuf.data() + r * Mp + m0, Mp, u0 == 0);
          m0 += tl.rows;
        }
      }
      // full 16 x 16 blocks with register transposes, the ragged rest through obuf (scalar)
      const int64_t M16 = M / 16 * 16, nc16 = nc / 16 * 16;
      for (int64_t m0 = 0; m0 < M16; m0 += 16)
        for (int64_t j0 = 0; j0 < nc16; j0 += 16) {
          const float* cb = cbuf.data() + j0 * Mp + m0;
          const float* bb = B ? B + n0 + j0 : nullptr;
          char* yb = Y + (m0 * N + n0 + j0) * esize;
          if (st == at::kFloat) store16x16<Rnd::F32>(cb, Mp, bb, yb, N);
          else if (st == at::kBFloat16) store16x16<Rnd::BF16>(cb, Mp, bb, yb, N);
          else store16x16<Rnd::F16>(cb, Mp, bb, yb, N);
        }
      for (int64_t m = 0; m < M; ++m)
        for (int64_t j = m < M16 ? nc16 : 0; j < nc; ++j) obuf[m * NC + j] = cbuf[j * Mp + m];
      if (nc16 < nc) store_any(st, obuf.data() + nc16, NC, M16, nc - nc16, B ? B + n0 + nc16 : nullptr, Y + (n0 + nc16) * esize, N);
      if (M16 < M) store_any(st, obuf.data() + M16 * NC, NC, M - M16, nc, B ? B + n0 : nullptr, Y + (M16 * N + n0) * esize, N);
    }
  });
}

// The tiled path's x: rows [16 b, 16 b + 16) of x (contiguous [M, K]: bf16 when BD, else fp32) as
// units [U][16] (unit u of the 16 rows in the lanes; rows >= M and units past K are zeros), in the
// AVX-512 K order, in one pass of 16 x 16 register transposes. bf16: 16 units (32 bf16) of each row
// are loaded straight from x (int4: permuted with one vpermw per 32-chunk; a ragged K end through a
// zero-padded copy). fp32: each row is first put into tmp (16 x Ut units, Ut = U rounded up to 16)
// in K order (int4 chunks of 32: vpermt2ps).
template <bool BD>
QK_T512 void pack_x_block512(const void* xv, const Weight& w, int64_t M, int64_t U, int64_t b, uint32_t* tmp,
                             uint32_t* out) {
  const int64_t K = w.K, Ut = (U + 15) / 16 * 16, kv = w.int4 ? kv512(w) : 0;
  uint32_t* ob = out + b * U * 16;
  __m512 v[16];
  if constexpr (BD) {
    const uint16_t* X = static_cast<const uint16_t*>(xv);
    static const uint16_t kPerm[32] = {0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30,
                                       1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31};
    const __m512i perm = _mm512_loadu_si512(kPerm);
    uint16_t part[32];
    for (int64_t u0 = 0; u0 < U; u0 += 16) {
      const int64_t p0 = 2 * u0;
      const bool full = p0 + 32 <= K;  // int4: then also p0 + 32 <= kv (kv = K rounded down to 32)
      for (int r = 0; r < 16; ++r) {
        const int64_t m = 16 * b + r;
        __m512i t = _mm512_setzero_si512();
        if (m < M && full) {
          t = _mm512_loadu_si512(X + m * K + p0);
          if (w.int4) t = _mm512_permutexvar_epi16(perm, t);
        } else if (m < M) {
          for (int64_t j = 0; j < 32; ++j) part[j] = p0 + j < K ? X[m * K + k_of_pos512(w, p0 + j)] : 0;
          t = _mm512_loadu_si512(part);
        }
        v[r] = _mm512_castsi512_ps(t);
      }
      transpose16x16(v);
      const int64_t n = std::min<int64_t>(16, U - u0);
      for (int64_t i = 0; i < n; ++i) _mm512_storeu_ps(reinterpret_cast<float*>(ob + (u0 + i) * 16), v[i]);
    }
    return;
  }
  for (int64_t r = 0; r < 16; ++r) {
    const int64_t m = 16 * b + r;
    float* dst = reinterpret_cast<float*>(tmp + r * Ut);
    if (m >= M) {
      std::memset(dst, 0, Ut * 4);
      continue;
    }
    const float* src = static_cast<const float*>(xv) + m * K;
    const __m512i ev = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
    const __m512i od = _mm512_add_epi32(ev, _mm512_set1_epi32(1));
    for (int64_t c = 0; c < kv; c += 32) {
      const __m512 a = _mm512_loadu_ps(src + c), h = _mm512_loadu_ps(src + c + 16);
      _mm512_storeu_ps(dst + c, _mm512_permutex2var_ps(a, ev, h));
      _mm512_storeu_ps(dst + c + 16, _mm512_permutex2var_ps(a, od, h));
    }
    std::memcpy(dst + kv, src + kv, (K - kv) * 4);
    std::memset(dst + K, 0, (Ut - K) * 4);
  }
  for (int64_t u0 = 0; u0 < U; u0 += 16) {
    for (int r = 0; r < 16; ++r) v[r] = _mm512_loadu_ps(reinterpret_cast<const float*>(tmp + r * Ut + u0));
    transpose16x16(v);
    const int64_t n = std::min<int64_t>(16, U - u0);
    for (int64_t i = 0; i < n; ++i) _mm512_storeu_ps(reinterpret_cast<float*>(ob + (u0 + i) * 16), v[i]);
  }
}

// x (contiguous; bf16 when bd, else any float dtype, taken as fp32) -> [Mp / 16][U][16] units.
at::Tensor pack_x_tiles512(const at::Tensor& x, const Weight& w, bool bd, int64_t U) {
  const int64_t M = x.size(0), nb = (M + 15) / 16;
  const at::Tensor xs = bd ? x : x.to(at::kFloat).contiguous();
  at::Tensor out = at::empty({nb, U, 16}, x.options().dtype(at::kInt));
  const void* X = xs.data_ptr();
  uint32_t* O = reinterpret_cast<uint32_t*>(out.data_ptr<int32_t>());
  at::parallel_for(0, nb, 1, [&](int64_t b0, int64_t b1) {
    std::vector<uint32_t> tmp(bd ? 0 : 16 * ((U + 15) / 16 * 16));
    for (int64_t b = b0; b < b1; ++b) {
      if (bd) pack_x_block512<true>(X, w, M, U, b, tmp.data(), O);
      else pack_x_block512<false>(X, w, M, U, b, tmp.data(), O);
    }
  });
  return out;
}

// x (contiguous [M, K]) -> 4-byte units [M, ldx] in the AVX-512 K order: fp32 values, or (bd, x is
// bf16) pairs of bf16; zero-padded to ldx units.
at::Tensor x_units512(const at::Tensor& x, const Weight& w, bool bd, int64_t ldx) {
  const int64_t K = w.K;
  at::Tensor xk = bd ? x : x.to(at::kFloat);
  if (w.int4 && kv512(w) > 0) {
    std::vector<int64_t> idx(K);
    for (int64_t p = 0; p < K; ++p) idx[p] = k_of_pos512(w, p);
    xk = xk.index_select(1, at::tensor(idx, at::kLong));
  }
  // fresh row-major storage (a size-1 dim of x can carry any stride, which .view(kInt) rejects)
  at::Tensor out = at::zeros({xk.size(0), bd ? 2 * ldx : ldx}, xk.options());
  out.narrow(1, 0, K).copy_(xk);
  return out.view(at::kInt);
}

at::Tensor weight_only_gemm512(const at::Tensor& x_in, const Weight& w, const at::Tensor& bias, bool bd) {
  const int64_t M = x_in.size(0), N = w.N, K = w.K;
  const at::ScalarType st = x_in.scalar_type();
  at::Tensor y = at::empty({M, N}, x_in.options());
  if (M == 0 || N == 0) return y;
  const Rnd rnd = st == at::kFloat ? Rnd::F32 : (st == at::kBFloat16 ? Rnd::BF16 : Rnd::F16);
  const float* B = bias.defined() ? bias.data_ptr<float>() : nullptr;
  const int64_t esize = y.element_size();
  char* Y = static_cast<char*>(y.data_ptr());
  const at::Tensor x = x_in.contiguous();
  const int64_t U = bd ? (K + 1) / 2 : K;
  if (bd && M <= kMaxGemvM && reg_gemv_applies(w)) {  // the register-decode GEMV
    const int64_t ldx = (U + 31) / 32 * 32;
    // x (contiguous bf16) -> [M][2 ldx] words in the kernel's K order, zero-padded
    at::Tensor xo = at::empty({M, 2 * ldx}, x.options());
    const uint16_t* xs = reinterpret_cast<const uint16_t*>(x.data_ptr());
    uint16_t* xd = reinterpret_cast<uint16_t*>(xo.data_ptr());
    for (int64_t m = 0; m < M; ++m) {
      const uint16_t* src = xs + m * K;
      uint16_t* dst = xd + m * 2 * ldx;
      if (w.int4) {
        for (int64_t c = 0; c < K; c += 64)
          for (int64_t j = 0; j < 32; ++j) {
            dst[c + j] = src[c + 2 * j];
            dst[c + 32 + j] = src[c + 2 * j + 1];
          }
      } else {
        std::memcpy(dst, src, K * 2);
      }
      std::memset(dst + K, 0, (2 * ldx - K) * 2);
    }
    const uint32_t* XU = reinterpret_cast<const uint32_t*>(xo.data_ptr());
    at::Tensor acc = at::empty({M, N}, y.options().dtype(at::kFloat));
    float* A = acc.data_ptr<float>();
    const int64_t grain = std::max<int64_t>(16, (1 << 15) / K);
    at::parallel_for(0, N, grain, [&](int64_t n0, int64_t n1) { gemv_reg_rows(w, XU, ldx, M, n0, n1, A); });
    store_any(st, A, N, M, N, B, Y, N);
    return y;
  }
  if (M <= kGemvSplitM) {
    const int64_t ldx = (U + 31) / 32 * 32;
    const at::Tensor xu = x_units512(x, w, bd, ldx);
    const uint32_t* XU = reinterpret_cast<const uint32_t*>(xu.data_ptr<int32_t>());
    at::Tensor acc = st == at::kFloat ? y : at::empty({M, N}, y.options().dtype(at::kFloat));
    float* A = acc.data_ptr<float>();
    const int64_t grain = std::max<int64_t>(16, (1 << 15) / K);  // small layers stay on one thread
    at::parallel_for(0, N, grain, [&](int64_t n0, int64_t n1) {
      std::vector<uint32_t> buf(4 * ldx);
      if (bd) gemv512_rows<true>(w, rnd, XU, ldx, U, M, n0, n1, A, buf.data());
      else gemv512_rows<false>(w, rnd, XU, ldx, U, M, n0, n1, A, buf.data());
    });
    if (st != at::kFloat || B) store_any(st, A, N, M, N, B, Y, N);
    return y;
  }
  const int64_t Mp = (M + 15) / 16 * 16;
  const at::Tensor xpack = pack_x_tiles512(x, w, bd, U);
  const uint32_t* XP = reinterpret_cast<const uint32_t*>(xpack.data_ptr<int32_t>());
  if (bd) tiled512<true>(w, rnd, XP, M, Mp, U, st, B, Y, esize);
  else tiled512<false>(w, rnd, XP, M, Mp, U, st, B, Y, esize);
  return y;
}
#endif

// Paths by ISA: what the active level lets the kernels use.
enum class Path { Portable, Avx2, Avx512, Avx512Bf16 };

at::Tensor weight_only_gemm(const at::Tensor& x_in, const Weight& w, const at::Tensor& bias, Path path) {
#if QK_X86
  // fp32 x, M <= 4: the AVX2 GEMV (scale factored out of the K-sum) beats the zmm decode-to-buffer
  // GEMV, whose fp32 rows overflow L1: 1 thread, M = 1, 6 x (4096 x 11008) rotating (DRAM), int8
  // 3.7 vs 7.9 ms, int4 3.8 vs 7.0 ms; 4096 x 4096 in cache 0.74 vs 1.86, 0.79 vs 1.64 ms.
  const bool avx2_gemv_fp32 = x_in.scalar_type() == at::kFloat && x_in.size(0) <= kMaxGemvM;
  if ((path == Path::Avx512 || path == Path::Avx512Bf16) && !avx2_gemv_fp32)
    return weight_only_gemm512(x_in, w, bias, path == Path::Avx512Bf16 && x_in.scalar_type() == at::kBFloat16);
#endif
  const bool avx2 = path != Path::Portable;
  const int64_t M = x_in.size(0), N = w.N, K = w.K;
  const at::ScalarType st = x_in.scalar_type();
  at::Tensor y = at::empty({M, N}, x_in.options());
  if (M == 0 || N == 0) return y;
  if (avx2 && M > kMaxGemvM && M <= kGemvSplitM) {
    // Small batches: the GEMV once per chunk of 4 rows (it re-reads the weights per chunk) beats
    // the tiled path, which dequantizes every weight row whatever M is. 4096^2, 2 threads:
    // fp32 w4a16 M = 5 / 8 ~5.3 / 5.9 ms tiled vs ~2.1 ms per chunk; w8a16 ~4.8 / 5.3 vs ~1.6.
    for (int64_t m0 = 0; m0 < M; m0 += kMaxGemvM) {
      const int64_t mc = std::min(kMaxGemvM, M - m0);
      y.narrow(0, m0, mc).copy_(weight_only_gemm(x_in.narrow(0, m0, mc), w, bias, path));
    }
    return y;
  }
  const Rnd rnd = st == at::kFloat ? Rnd::F32 : (st == at::kBFloat16 ? Rnd::BF16 : Rnd::F16);
  const float* B = bias.defined() ? bias.data_ptr<float>() : nullptr;
  const int64_t esize = y.element_size();
  char* Y = static_cast<char*>(y.data_ptr());
#if QK_X86
  if (avx2 && M <= kMaxGemvM && lut_gemv_applies(w, rnd)) {  // int4, bf16 / fp16 x: table lookup
    const at::Tensor xp = permute_k(x_in.contiguous().to(at::kFloat), lut_korder);
    const float* dst = xp.data_ptr<float>();
    at::Tensor acc = at::empty({M, N}, y.options().dtype(at::kFloat));
    float* A = acc.data_ptr<float>();
    const int64_t grain = std::max<int64_t>(16, (1 << 15) / K);
    at::parallel_for(0, N, grain, [&](int64_t n0, int64_t n1) {
      if (rnd == Rnd::BF16) gemv4_lut_rows<Rnd::BF16>(w, dst, M, n0, n1, A);
      else gemv4_lut_rows<Rnd::F16>(w, dst, M, n0, n1, A);
    });
    store_any(st, A, N, M, N, B, Y, N);
    return y;
  }
#endif
  const at::Tensor xk = x_in_k_order(x_in.contiguous(), w);
  const float* X = xk.data_ptr<float>();

  if (M <= kMaxGemvM) {
    // fp32 result [M, N] (y itself for fp32 output), then bias + cast.
    at::Tensor acc = st == at::kFloat ? y : at::empty({M, N}, y.options().dtype(at::kFloat));
    float* A = acc.data_ptr<float>();
    std::vector<double> xs;
    bool factored_ok = true;
#if QK_X86
    if (avx2 && w.int4 && rnd == Rnd::F32) {  // group sums of x for the factored zero point
      xs.assign(M * w.ng, 0.0);
      for (int64_t m = 0; m < M; ++m)
        for (int64_t g = 0; g < w.ng; ++g)
          for (int64_t k = g * w.G; k < std::min((g + 1) * w.G, w.Kv); ++k) xs[m * w.ng + g] += X[m * K + k];
      // s * (sum x q - z' sum x) turns an Inf activation into Inf - Inf = NaN where the contract
      // (IEEE, as F.linear; docs/numerics.md s.5b) gives +-Inf: a batch holding NaN/Inf (a group
      // sum that is not finite) runs the portable GEMV, which dequantizes element by element.
      for (double v : xs) factored_ok = factored_ok && std::isfinite(v);
    }
#endif
    const int64_t grain = std::max<int64_t>(16, (1 << 15) / K);  // small layers stay on one thread
    at::parallel_for(0, N, grain, [&](int64_t n0, int64_t n1) {
#if QK_X86
      if (avx2 && factored_ok) {
        gemv_rows_avx2(w, rnd, X, xs.data(), M, n0, n1, A);
        return;
      }
#endif
      gemv_rows_portable(w, rnd, X, M, n0, n1, A);
    });
    if (st != at::kFloat || B) store_any(st, A, N, M, N, B, Y, N);
    return y;
  }

  // Tiled: one parallel region over tiles of kTileN weight rows. Per tile, the thread
  // dequantizes the rows into its own fp32 buffer; AVX2 transposes it to K-major and runs 6 x 16
  // outer-product tiles over all M in K blocks of kWoKB (portable: dot products).
  // No BLAS call and a single fork/join per op: on this shared 2-core machine every extra
  // OpenMP fork/join (or an MKL call nested in one) cost a scheduler time slice (measured:
  // 16 fork/joins of 256-row blocks + MKL made M = 16 35x slower at 2 threads than at 1).
  static_assert(kTileN == 16, "the outer-product tile is 16 weight rows wide");
  const int64_t n_tiles = (N + kTileN - 1) / kTileN;
  at::parallel_for(0, n_tiles, 1, [&](int64_t t0, int64_t t1) {
    std::vector<float> wbuf(kTileN * K), cbuf(M * kTileN);
#if QK_X86
    static const OuterTable outer;
    std::vector<float> wT(avx2 ? K * kTileN : 0);
#endif
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t n0 = t * kTileN, nt = std::min(kTileN, N - n0);
      for (int64_t i = 0; i < nt; ++i) {
#if QK_X86
        if (avx2) {
          decode_row_avx2_any(w, n0 + i, rnd, wbuf.data() + i * K);
          continue;
        }
#endif
        decode_row_portable(w, n0 + i, rnd, wbuf.data() + i * K);
      }
#if QK_X86
      if (avx2) {
        transpose_rows16(wbuf.data(), K, nt, K, wT.data());
        std::fill(cbuf.begin(), cbuf.end(), 0.0f);
        for (int64_t k0 = 0; k0 < K; k0 += kWoKB) {
          const int64_t kc = std::min(kWoKB, K - k0);
          for (int64_t m0 = 0; m0 < M; m0 += 6) {
            const int mr = static_cast<int>(std::min<int64_t>(6, M - m0));
            outer.fn[mr - 1](X + m0 * K + k0, K, wT.data() + k0 * kTileN, kc, cbuf.data() + m0 * kTileN);
          }
        }
        store_any(st, cbuf.data(), kTileN, M, nt, B ? B + n0 : nullptr, Y + n0 * esize, N);
        continue;
      }
#endif
      for (int64_t m0 = 0; m0 < M; ++m0)
        for (int64_t j = 0; j < nt; ++j)
          cbuf[m0 * kTileN + j] = dot_portable(X + m0 * K, wbuf.data() + j * K, K);
      store_any(st, cbuf.data(), kTileN, M, nt, B ? B + n0 : nullptr, Y + n0 * esize, N);
    }
  });
  return y;
}

// ------------------------------------------------------------------ validation
// Messages mirror quantkernels/_validate.py (and reference.py's order of checks).

std::string shape_str(at::IntArrayRef s) {
  std::string r = "(";
  for (size_t i = 0; i < s.size(); ++i) {
    r += std::to_string(s[i]);
    if (s.size() == 1 || i + 1 < s.size()) r += s.size() == 1 ? "," : ", ";
  }
  return r + ")";
}

constexpr const char* kFloatDtypes = "['torch.float16', 'torch.bfloat16', 'torch.float32']";

bool is_float(at::ScalarType t) { return t == at::kHalf || t == at::kBFloat16 || t == at::kFloat; }

void check_device(const char* op, const char* name, const at::Tensor& t, const char* ref_name, const at::Tensor& ref) {
  TORCH_CHECK_VALUE(t.device() == ref.device(), "quantkernels.", op, ": ", name, " is on ", t.device(), " but ",
                    ref_name, " is on ", ref.device(), "; all tensors must be on one device");
}

void check_x(const char* op, const at::Tensor& x, int64_t K) {
  TORCH_CHECK_TYPE(is_float(x.scalar_type()), "quantkernels.", op, ": x must have dtype in ", kFloatDtypes, ", got ",
                   dtype_name(x.scalar_type()));
  TORCH_CHECK_VALUE(x.dim() >= 2, "quantkernels.", op, ": x must have at least 2 dimension(s), got a ", x.dim(),
                    "-D tensor");
  TORCH_CHECK_VALUE(x.size(-1) > 0, "quantkernels.", op, ": x must have a non-empty last dimension K, got shape ",
                    shape_str(x.sizes()));
  TORCH_CHECK_VALUE(x.dim() == 2, "quantkernels.", op, ": x must be 2-D [M, K] activation, got shape ",
                    shape_str(x.sizes()));
  TORCH_CHECK_VALUE(x.size(1) == K, "quantkernels.", op, ": x has K = ", x.size(1),
                    " columns but the weight has K = ", K, " (x shape ", shape_str(x.sizes()), ")");
}

// Returns bias as contiguous fp32 (undefined if None).
at::Tensor check_bias(const char* op, const std::optional<at::Tensor>& bias, int64_t N, const at::Tensor& x) {
  if (!bias.has_value()) return at::Tensor();
  const at::Tensor& b = *bias;
  TORCH_CHECK_TYPE(is_float(b.scalar_type()), "quantkernels.", op, ": bias must have dtype in ", kFloatDtypes,
                   ", got ", dtype_name(b.scalar_type()));
  TORCH_CHECK_VALUE(b.dim() == 1 && b.size(0) == N, "quantkernels.", op, ": bias must have shape (", N,
                    ",) (one value per output channel N), got ", shape_str(b.sizes()));
  check_device(op, "bias", b, "the other inputs", x);
  return b.to(at::kFloat).contiguous();
}

Path use_path() {
  const Isa isa = active_isa();  // read once per call, on the calling thread
#if QK_X86
  if (!isa_has_avx2(isa) || !cpu_has_f16c()) return Path::Portable;
  if (isa_has_bf16dot(isa)) return Path::Avx512Bf16;
  if (isa_has_avx512(isa)) return Path::Avx512;
  return Path::Avx2;
#else
  (void)isa;
  return Path::Portable;
#endif
}

// ------------------------------------------------------------------ ops

at::Tensor w8a16_gemm_cpu(const at::Tensor& x_in, const at::Tensor& b_in, const at::Tensor& scale_in,
                          const std::optional<at::Tensor>& bias_in) {
  const char* op = "w8a16_gemm";
  TORCH_CHECK_TYPE(b_in.scalar_type() == at::kChar, "quantkernels.", op, ": b must have dtype in ['torch.int8'], got ",
                   dtype_name(b_in.scalar_type()));
  TORCH_CHECK_VALUE(b_in.dim() == 2, "quantkernels.", op, ": b must be 2-D [N, K] weight, got shape ",
                    shape_str(b_in.sizes()));
  const int64_t N = b_in.size(0), K = b_in.size(1);
  check_x(op, x_in, K);
  TORCH_CHECK_TYPE(scale_in.scalar_type() == at::kFloat, "quantkernels.", op,
                   ": scale_b must have dtype in ['torch.float32'], got ", dtype_name(scale_in.scalar_type()));
  TORCH_CHECK_VALUE(scale_in.dim() == 1 && scale_in.size(0) == N, "quantkernels.", op, ": scale_b must have shape (",
                    N, ",) (one per-channel scale per row of b), got ", shape_str(scale_in.sizes()));
  check_device(op, "b", b_in, "x", x_in);
  check_device(op, "scale_b", scale_in, "x", x_in);
  const at::Tensor bias = check_bias(op, bias_in, N, x_in);
  const Path path = use_path();

  const at::Tensor b = b_in.contiguous(), scale = scale_in.contiguous();
  Weight w;
  w.q8 = b.data_ptr<int8_t>();
  w.scale = scale.data_ptr<float>();
  w.N = N;
  w.K = K;
  w.G = K;
  w.Kv = K / 8 * 8;
  return weight_only_gemm(x_in, w, bias, path);
}

at::Tensor w4a16_gemm_cpu(const at::Tensor& x_in, const at::Tensor& b_in, const at::Tensor& scale_in,
                          const std::optional<at::Tensor>& zero_in, const std::optional<at::Tensor>& bias_in) {
  const char* op = "w4a16_gemm";
  TORCH_CHECK_TYPE(b_in.scalar_type() == at::kByte, "quantkernels.", op,
                   ": b_packed must have dtype in ['torch.uint8'], got ", dtype_name(b_in.scalar_type()));
  TORCH_CHECK_VALUE(b_in.dim() == 2, "quantkernels.", op,
                    ": b_packed must be 2-D [N, K/2] (two int4 values per byte along K), got shape ",
                    shape_str(b_in.sizes()));
  const int64_t N = b_in.size(0), K = b_in.size(1) * 2;
  TORCH_CHECK_TYPE(scale_in.scalar_type() == at::kFloat, "quantkernels.", op,
                   ": scale_b must have dtype in ['torch.float32'], got ", dtype_name(scale_in.scalar_type()));
  TORCH_CHECK_VALUE(scale_in.dim() == 2, "quantkernels.", op, ": scale_b must be 2-D [N, K/group_size], got shape ",
                    shape_str(scale_in.sizes()));
  TORCH_CHECK_VALUE(scale_in.size(0) == N, "quantkernels.", op, ": scale_b must have N = ", N, " rows, got shape ",
                    shape_str(scale_in.sizes()));
  const int64_t ng = scale_in.size(1);
  TORCH_CHECK_VALUE(ng > 0 && K % ng == 0, "quantkernels.", op, ": scale_b has ", ng,
                    " groups per row, which does not divide K = ", K);
  const int64_t G = K / ng;
  TORCH_CHECK_VALUE(G == 32 || G == 64 || G == 128 || G == 256 || G == K, "quantkernels.", op,
                    ": scale_b implies group_size = K / ", ng, " = ", G, "; must be one of (32, 64, 128, 256) or K");
  if (zero_in.has_value()) {
    const at::Tensor& z = *zero_in;
    TORCH_CHECK_TYPE(z.scalar_type() == at::kByte, "quantkernels.", op,
                     ": zero_b must have dtype in ['torch.uint8'], got ", dtype_name(z.scalar_type()));
    TORCH_CHECK_VALUE(z.sizes() == scale_in.sizes(), "quantkernels.", op, ": zero_b must have shape ",
                      shape_str(scale_in.sizes()), " (the shape of scale_b), got ", shape_str(z.sizes()));
  }
  check_device(op, "scale_b", scale_in, "b_packed", b_in);
  if (zero_in.has_value()) {
    check_device(op, "zero_b", *zero_in, "b_packed", b_in);
    checks::zero_points(op, "zero_b", *zero_in);
  }
  check_x(op, x_in, K);
  check_device(op, "b_packed", b_in, "x", x_in);
  const at::Tensor bias = check_bias(op, bias_in, N, x_in);
  const Path path = use_path();

  const at::Tensor b = b_in.contiguous(), scale = scale_in.contiguous();
  const at::Tensor zero = zero_in.has_value() ? zero_in->contiguous() : at::Tensor();
  Weight w;
  w.int4 = true;
  w.has_zero = zero.defined();
  w.q4 = b.data_ptr<uint8_t>();
  w.scale = scale.data_ptr<float>();
  w.zero = zero.defined() ? zero.data_ptr<uint8_t>() : nullptr;
  w.N = N;
  w.K = K;
  w.ng = ng;
  w.G = G;
  w.Kv = K / 16 * 16;  // G is a multiple of 16 unless G = K (one group)
  w.gshift = ng > 1 ? __builtin_ctzll(static_cast<unsigned long long>(G)) : 0;
  return weight_only_gemm(x_in, w, bias, path);
}

}  // namespace
}  // namespace cpu
}  // namespace quantkernels

namespace {
// What each op runs per ISA level (quantkernels info).
const bool w8a16_gemm_variant_registered = quantkernels::cpu::register_variant(
    "w8a16_gemm", [](quantkernels::cpu::Isa isa) -> const char* {
      using namespace quantkernels::cpu;
      if (isa_has_bf16dot(isa))
        return "avx512_bf16: bf16 x vdpbf16ps 64x6 tiles (M >= 9) / GEMV (M <= 4: decoded in registers, "
               "vcvtne2ps2bf16), fp32 + fp16 x zmm FMA tiles / GEMV (fp32 x M <= 4: avx2 GEMV)";
      if (isa_has_avx512(isa))
        return "avx512: zmm fp32 FMA 32x12 tiles (M >= 9) / GEMV, all x dtypes (fp32 x M <= 4: avx2 GEMV)";
      return isa_has_avx2(isa) ? "avx2: fp32 FMA tiles / GEMV (f16c conversions)" : "portable: scalar C++ loops";
    });
const bool w4a16_gemm_variant_registered = quantkernels::cpu::register_variant(
    "w4a16_gemm", [](quantkernels::cpu::Isa isa) -> const char* {
      using namespace quantkernels::cpu;
      if (isa_has_bf16dot(isa))
        return "avx512_bf16: bf16 x vdpbf16ps 64x6 tiles (M >= 9) / GEMV (vpermw tables; M <= 4, K % 64 == 0: "
               "decoded in registers), fp32 + fp16 x zmm FMA tiles / GEMV (vpermps tables; fp32 x M <= 4: avx2 GEMV)";
      if (isa_has_avx512(isa))
        return "avx512: zmm fp32 FMA 32x12 tiles (M >= 9) / GEMV, vpermps tables, all x dtypes (fp32 x M <= 4: avx2 GEMV)";
      return isa_has_avx2(isa) ? "avx2: fp32 FMA tiles / GEMV, pshufb tables for bf16/fp16 x" : "portable: scalar C++ loops";
    });
}  // namespace

TORCH_LIBRARY_IMPL(quantkernels, CPU, m) {
  m.impl("w8a16_gemm", &quantkernels::cpu::w8a16_gemm_cpu);
  m.impl("w4a16_gemm", &quantkernels::cpu::w4a16_gemm_cpu);
}
