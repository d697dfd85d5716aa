// quantkernels::w4a8_gemm on CPU: int8 activations x group-wise int4 weights (PLAIN format).
//
//   Y[m, n] = sa[m] * sum_g sb[n, g] * c[m, n, g] (+ bias[n]),    docs/numerics.md section 4
//   c[m, n, g] = sum_{k in g} a[m, k] * (q[n, k] - z[n, g])       exact int32 per group
//
// a is int8 [M, K] (any value, -128 included), b_packed uint8 [N, K/2] with byte = lo | hi << 4
// (lo = element 2i, hi = 2i + 1): signed nibbles (z = 0) without zero_b, unsigned [0, 15] with it.
//
// What each ISA level runs (cpu_isa.h; features tested with isa_has_*, never level order):
//   portable             plain C++ loops (run_portable)
//   avx2, avx512         the AVX2 paths below: maddubs panels (M >= 5), hadd-tree GEMV (M <= 4,
//                        M = 5..8 per 4 rows), tiles for the remaining shapes
//   avx_vnni             ymm vpdpbusd in the AVX2 panel layout and GEMV (no int16 step / flush)
//   avx512_vnni, _bf16   zmm vpdpbusd: panels of 32 tokens x 8 weight rows, a 128-k GEMV step
//                        (+ a half-width step for K % 128 == 64), GEMV chunks up to M = 12;
//                        see "VNNI" further down
// Every level uses the AVX2 tiles for G = K at M >= 5 and for K % 64 != 0 at M <= 4 (rare
// per-channel shapes). The VNNI paths keep the AVX2 integer sums and fp32 order: same bits as
// avx2 for the same path (M = 9..12 at avx512_vnni runs GEMV chunks where avx2 runs panels: the
// GEMV's 4 partial sums over the groups, a few ulps apart).
//
// Integer core (AVX2). Every nibble is made unsigned, u = q + 8 for signed weights (nibble ^ 8)
// and u = q for unsigned ones, so that _mm256_maddubs_epi16(u8 weights, s8 activations) is
// exact: a pair sum is at most 2 * 15 * 128 = 3840, far from int16 saturation, and up to 8 such
// results (30720) are summed in int16 before one _mm256_madd_epi16 with ones widens them to
// int32. The offset is removed once per group: c = sum a * u - z' * sum_{k in g} a, with z' = 8
// (signed) or zero[n, g], and the per-(row, group) sums of a are computed once per call.
// 32 weights (16 packed bytes) are unpacked in registers with broadcast + shift + blend + and:
// the low 128-bit lane gets the low nibbles (even k), the high lane the high nibbles (odd k);
// a is permuted once per call into the same order (per 32-chunk: 16 even k, then 16 odd k), so
// no byte interleave is needed in the inner loop.
//
// Float order, as the reference: per group, the exact int32 c -> fp32, times sb[n, g], summed
// over g in order; then times sa[m], then + bias[n]; then the cast. Separate roundings: the AVX2
// code is compiled with target("avx2") but not "fma", so mul + add are never contracted.
// (torch's sum over groups is not sequential, so fp32 outputs match the reference within a
// few ulps, not bit for bit; the tests compare with the fp64 formula, docs/numerics.md s.6.)
//
// Decode (M <= 4, K a multiple of 64, G = 32 or a multiple of 64): a separate GEMV (gemv_tile below), one pass over
// the weights prefetched into L2 >= 32 KB ahead (kPfBytes); the per-group float work is deferred out of the K
// loop. M = 5..8 with the same K and G: the GEMV once per chunk of 4 rows (about 2x faster there
// than the panel path, whose 16-token panels cost as much at M = 5 as at M = 16).
// M >= 5 otherwise, with G in 32 / 64 / 128 / 256: the panel path (run_panel_avx2, ~2x the tiles'
// throughput: no horizontal sums, 16 tokens per weight broadcast). Every other shape (G = K,
// or M <= 4 with K % 64 != 0) uses the tiles below.
//
// Tiling. A micro-tile is MR rows of a x NR rows of b with MR * NR = 8 int16 accumulators, and
// the 8 group sums are reduced together into one vector (hadd tree). M = 1, 2: tiles 1 x 8 and
// 2 x 4, one pass over the weights (GEMV: each weight byte is read once, unpacked in registers);
// M = 3, 4: one 4 x 2 tile row, also a single pass. In these one-pass (decode) cases the next
// tile's weight rows (NR rows further, same offset) are prefetched while a tile runs: a weight
// row is ~2 KB, the hardware prefetchers stop at 4 KB pages, so without it each row start
// waits for DRAM.
// M >= 5 (G = K only, see above): 4 x 2 tiles, M blocked so that the permuted a block stays in L2; with more than one M
// tile, each pair of weight rows is unpacked once per M block into an L1 buffer and reused by
// all of the block's tiles. Threads split (N block, M block) tasks, N outer.
// QUANTKERNELS_CPU_ISA=portable selects a plain C++ path for every shape (same integer results;
// the tiled path's float order).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "cpu_isa.h"
#include "qk_checks.h"
#include "qk_store.h"

#if QK_X86
// No "fma": keeps the fp32 epilogue's multiply and add separately rounded, as in the reference.
#define QK_TARGET_AVX2_NOFMA __attribute__((target("avx2")))
#endif

namespace quantkernels {
namespace cpu {
namespace {

namespace C = checks;

constexpr const char* kOp = "w4a8_gemm";
constexpr int64_t kChunk = 32;   // int4 values per AVX2 step (16 packed bytes)
constexpr int64_t kFlush = 8;    // int16 sums of at most 8 maddubs results: 8 * 3840 < 32767
constexpr int64_t kABlockBytes = 256 * 1024;  // permuted a rows per M block (L2-resident)

struct Problem {
  int64_t M, N, K, ng, G;
  const int8_t* a;        // [M, K]
  const uint8_t* bp;      // [N, K/2]
  const float* sa;        // [M]
  const float* sb;        // [N, ng]
  const uint8_t* zb;      // [N, ng] or nullptr (signed nibbles)
  const float* bias;      // [N] fp32 or nullptr
  void* y;                // [M, N] of out
  at::ScalarType out;
};

inline void store_out(const Problem& p, int64_t m, int64_t n, float v) {
  const int64_t i = m * p.N + n;
  switch (p.out) {
    case at::kFloat: static_cast<float*>(p.y)[i] = v; break;
    case at::kHalf: static_cast<at::Half*>(p.y)[i] = static_cast<at::Half>(v); break;
    default: static_cast<at::BFloat16*>(p.y)[i] = static_cast<at::BFloat16>(v); break;
  }
}

// ------------------------------------------------------------------------------ portable

void run_portable(const Problem& p) {
  const int64_t M = p.M, N = p.N, K = p.K, ng = p.ng, G = p.G;
  at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
    std::vector<int8_t> q(K);            // one unpacked weight row, zero point subtracted later
    std::vector<float> acc(M);
    for (int64_t n = n0; n < n1; ++n) {
      const uint8_t* row = p.bp + n * (K / 2);
      for (int64_t i = 0; i < K / 2; ++i) {
        const int lo = row[i] & 0xF, hi = row[i] >> 4;
        q[2 * i] = static_cast<int8_t>(p.zb ? lo : (lo ^ 8) - 8);
        q[2 * i + 1] = static_cast<int8_t>(p.zb ? hi : (hi ^ 8) - 8);
      }
      std::fill(acc.begin(), acc.end(), 0.0f);
      for (int64_t g = 0; g < ng; ++g) {
        const int32_t z = p.zb ? p.zb[n * ng + g] : 0;
        const float s = p.sb[n * ng + g];
        for (int64_t m = 0; m < M; ++m) {
          const int8_t* a = p.a + m * K + g * G;
          const int8_t* w = q.data() + g * G;
          int32_t c = 0;
          for (int64_t k = 0; k < G; ++k) c += int32_t(a[k]) * (int32_t(w[k]) - z);
          acc[m] = acc[m] + static_cast<float>(c) * s;
        }
      }
      for (int64_t m = 0; m < M; ++m) {
        float v = acc[m] * p.sa[m];
        if (p.bias) v = v + p.bias[n];
        store_out(p, m, n, v);
      }
    }
  });
}

// ------------------------------------------------------------------------------ AVX2

#if QK_X86

struct Prepared {
  std::vector<int8_t> ap;     // [Mpad, lda] a, permuted per 32-chunk (even k, then odd k), zero padded
  std::vector<int32_t> asum;  // [ng, Mpad] sum of a over each group
  int64_t lda = 0, Mpad = 0, nchunks = 0, cpg = 0;
};

// One row of a -> its permuted, zero-padded copy dst [lda] and its group sums asum[g * Mpad].
QK_TARGET_AVX2_NOFMA void prepare_row(const int8_t* src, int64_t K, int64_t ng, int64_t G, int8_t* dst,
                                      int32_t* asum, int64_t Mpad) {
  // Within each 128-bit lane: the 8 even bytes, then the 8 odd ones; then qwords 0, 2, 1, 3.
  const __m256i idx = _mm256_setr_epi8(0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15,
                                       0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15);
  int64_t c = 0;
  for (; (c + 1) * kChunk <= K; ++c) {
    __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + c * kChunk));
    v = _mm256_permute4x64_epi64(_mm256_shuffle_epi8(v, idx), 0xD8);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + c * kChunk), v);
  }
  for (int64_t k = c * kChunk; k < K; ++k) {  // tail chunk (G == K only); the rest stays 0
    const int64_t t = k - c * kChunk;
    dst[c * kChunk + (t & 1 ? 16 + t / 2 : t / 2)] = src[k];
  }
  for (int64_t g = 0; g < ng; ++g) {
    int32_t s = 0;
    for (int64_t k = g * G; k < (g + 1) * G; ++k) s += src[k];
    asum[g * Mpad] = s;
  }
}

void prepare_a(const Problem& p, int64_t mr, Prepared& pr) {
  const int64_t M = p.M, K = p.K;
  pr.nchunks = (K + kChunk - 1) / kChunk;
  pr.lda = pr.nchunks * kChunk;
  pr.Mpad = (M + mr - 1) / mr * mr;
  pr.cpg = (p.G + kChunk - 1) / kChunk;  // G % 32 != 0 only for G == K, i.e. one group
  pr.ap.assign(size_t(pr.Mpad * pr.lda), 0);
  pr.asum.assign(size_t(p.ng * pr.Mpad), 0);
  at::parallel_for(0, M, std::max<int64_t>(1, 16384 / std::max<int64_t>(K, 1)), [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m)
      prepare_row(p.a + m * K, K, p.ng, p.G, pr.ap.data() + m * pr.lda, pr.asum.data() + m, pr.Mpad);
  });
}

// [sum(v0), ..., sum(v7)]
QK_TARGET_AVX2_NOFMA inline __m256i reduce8(const __m256i* v) {
  const __m256i h01 = _mm256_hadd_epi32(v[0], v[1]);
  const __m256i h23 = _mm256_hadd_epi32(v[2], v[3]);
  const __m256i h45 = _mm256_hadd_epi32(v[4], v[5]);
  const __m256i h67 = _mm256_hadd_epi32(v[6], v[7]);
  const __m256i h0123 = _mm256_hadd_epi32(h01, h23);
  const __m256i h4567 = _mm256_hadd_epi32(h45, h67);
  return _mm256_add_epi32(_mm256_permute2x128_si256(h0123, h4567, 0x20),
                          _mm256_permute2x128_si256(h0123, h4567, 0x31));
}

// 16 packed bytes -> 32 unsigned nibbles: low lane = low nibbles (even k), high lane = high nibbles.
template <bool kAsym>
QK_TARGET_AVX2_NOFMA inline __m256i unpack32(const uint8_t* src) {
  __m256i v = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src)));
  if (!kAsym) v = _mm256_xor_si256(v, _mm256_set1_epi8(static_cast<char>(0x88)));  // q + 8, both nibbles
  v = _mm256_blend_epi32(v, _mm256_srli_epi16(v, 4), 0xF0);
  return _mm256_and_si256(v, _mm256_set1_epi8(0x0F));
}

// Rows n0 .. n0 + NR - 1 of b (clamped to N - 1) unpacked to unsigned nibbles in a's permuted
// order, [NR, lda] bytes: for the tiled path, which reuses them across all M tiles of a block.
template <bool kAsym>
QK_TARGET_AVX2_NOFMA void unpack_rows(const Problem& p, const Prepared& pr, int64_t n0, int nr, uint8_t* dst) {
  const int64_t K = p.K, full = K / kChunk;
  for (int j = 0; j < nr; ++j) {
    const uint8_t* row = p.bp + std::min(n0 + j, p.N - 1) * (K / 2);
    uint8_t* d = dst + j * pr.lda;
    for (int64_t c = 0; c < pr.nchunks; ++c) {
      __m256i w;
      if (c < full) {
        w = unpack32<kAsym>(row + c * (kChunk / 2));
      } else {
        alignas(16) uint8_t buf[16] = {0};
        std::memcpy(buf, row + c * (kChunk / 2), size_t((K - c * kChunk) / 2));
        w = unpack32<kAsym>(buf);
      }
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(d + c * kChunk), w);
    }
  }
}

// One MR x NR tile (rows m0.., n0..; rows past N are clamped to N - 1 and not stored).
// Writes sa[m] * sum_g sb[n, g] * c (+ bias) to res[i * NR + j]. With wpre (unpack_rows of
// these NR rows) the weights are loaded ready-made, else unpacked here.
template <int MR, int NR, bool kAsym>
QK_TARGET_AVX2_NOFMA void tile_avx2(const Problem& p, const Prepared& pr, int64_t m0, int64_t n0,
                                    const uint8_t* wpre, float* res) {
  static_assert(MR * NR == 8, "one ymm of 8 group sums per tile");
  const int64_t K = p.K, ng = p.ng, ldb = K / 2, nchunks = pr.nchunks, cpg = pr.cpg;
  const int64_t full = K / kChunk;  // chunks without a tail
  const int8_t* arow[MR];
  const uint8_t* brow[NR];
  int64_t nrow[NR];
  for (int i = 0; i < MR; ++i) arow[i] = pr.ap.data() + (m0 + i) * pr.lda;
  for (int j = 0; j < NR; ++j) {
    nrow[j] = std::min(n0 + j, p.N - 1);
    brow[j] = p.bp + nrow[j] * ldb;
  }
  const __m256i ones16 = _mm256_set1_epi16(1);
  __m256 facc = _mm256_setzero_ps();
  for (int64_t g = 0; g < ng; ++g) {
    const int64_t c_end = std::min((g + 1) * cpg, nchunks);
    __m256i gsum = _mm256_setzero_si256();
    for (int64_t cb = g * cpg; cb < c_end; cb += kFlush) {
      const int64_t ce = std::min(cb + kFlush, c_end);
      __m256i acc[8];
#pragma GCC unroll 8
      for (int t = 0; t < 8; ++t) acc[t] = _mm256_setzero_si256();
      for (int64_t c = cb; c < ce; ++c) {
        if (wpre == nullptr && (c & 3) == 0)  // GEMV: prefetch the next tile's rows, a line (4 chunks) each
          for (int j = 0; j < NR; ++j)
            _mm_prefetch(reinterpret_cast<const char*>(brow[j] + c * (kChunk / 2) + NR * ldb), _MM_HINT_T0);
#pragma GCC unroll 8
        for (int j = 0; j < NR; ++j) {
          __m256i w;
          if (wpre != nullptr) {
            w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wpre + j * pr.lda + c * kChunk));
          } else if (c < full) {
            w = unpack32<kAsym>(brow[j] + c * (kChunk / 2));
          } else {  // the last, partial chunk of a G == K row: never read past the row
            alignas(16) uint8_t buf[16] = {0};
            std::memcpy(buf, brow[j] + c * (kChunk / 2), size_t((K - c * kChunk) / 2));
            w = unpack32<kAsym>(buf);
          }
#pragma GCC unroll 8
          for (int i = 0; i < MR; ++i) {
            const __m256i av = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(arow[i] + c * kChunk));
            acc[i * NR + j] = _mm256_add_epi16(acc[i * NR + j], _mm256_maddubs_epi16(w, av));
          }
        }
      }
#pragma GCC unroll 8
      for (int t = 0; t < 8; ++t) acc[t] = _mm256_madd_epi16(acc[t], ones16);
      gsum = _mm256_add_epi32(gsum, reduce8(acc));
    }
    // c = sum a * u - z' * sum a, exact in int32 (wrapping intermediates cancel).
    int32_t zz[NR], as[MR];
    float ss[NR];
    for (int j = 0; j < NR; ++j) {
      zz[j] = kAsym ? p.zb[nrow[j] * ng + g] : 8;
      ss[j] = p.sb[nrow[j] * ng + g];
    }
    for (int i = 0; i < MR; ++i) as[i] = pr.asum[g * pr.Mpad + m0 + i];
    const __m256i zv = _mm256_setr_epi32(zz[0 % NR], zz[1 % NR], zz[2 % NR], zz[3 % NR], zz[4 % NR], zz[5 % NR],
                                         zz[6 % NR], zz[7 % NR]);
    const __m256i av = _mm256_setr_epi32(as[0 / NR], as[1 / NR], as[2 / NR], as[3 / NR], as[4 / NR], as[5 / NR],
                                         as[6 / NR], as[7 / NR]);
    const __m256 sv = _mm256_setr_ps(ss[0 % NR], ss[1 % NR], ss[2 % NR], ss[3 % NR], ss[4 % NR], ss[5 % NR],
                                     ss[6 % NR], ss[7 % NR]);
    gsum = _mm256_sub_epi32(gsum, _mm256_mullo_epi32(zv, av));
    facc = _mm256_add_ps(facc, _mm256_mul_ps(_mm256_cvtepi32_ps(gsum), sv));
  }
  float sa[MR], bs[NR];
  for (int i = 0; i < MR; ++i) sa[i] = p.sa[std::min(m0 + i, p.M - 1)];
  facc = _mm256_mul_ps(facc, _mm256_setr_ps(sa[0 / NR], sa[1 / NR], sa[2 / NR], sa[3 / NR], sa[4 / NR],
                                            sa[5 / NR], sa[6 / NR], sa[7 / NR]));
  if (p.bias) {
    for (int j = 0; j < NR; ++j) bs[j] = p.bias[nrow[j]];
    facc = _mm256_add_ps(facc, _mm256_setr_ps(bs[0 % NR], bs[1 % NR], bs[2 % NR], bs[3 % NR], bs[4 % NR],
                                              bs[5 % NR], bs[6 % NR], bs[7 % NR]));
  }
  _mm256_storeu_ps(res, facc);
}

using TileFn = void (*)(const Problem&, const Prepared&, int64_t, int64_t, const uint8_t*, float*);

template <int MR, int NR>
TileFn pick_tile(bool asym) {
  return asym ? &tile_avx2<MR, NR, true> : &tile_avx2<MR, NR, false>;
}

void run_avx2(const Problem& p) {
  // M = 1, 2: one tile row covers all of a (each weight byte read once); else 4 x 2 tiles.
  const int mr = p.M == 1 ? 1 : p.M == 2 ? 2 : 4;
  const int nr = 8 / mr;
  const bool asym = p.zb != nullptr;
  const TileFn tile = mr == 1 ? pick_tile<1, 8>(asym) : mr == 2 ? pick_tile<2, 4>(asym) : pick_tile<4, 2>(asym);
  Prepared pr;
  prepare_a(p, mr, pr);
  const int64_t m_tiles = pr.Mpad / mr;
  const int64_t n_tiles = (p.N + nr - 1) / nr;
  // M block: its permuted a rows fit in ~256 KB of L2; N block: 64 rows of b.
  const int64_t mb_tiles = std::max<int64_t>(1, kABlockBytes / (pr.lda * mr));
  const int64_t nb_tiles = std::max<int64_t>(1, 64 / nr);
  const int64_t m_blocks = (m_tiles + mb_tiles - 1) / mb_tiles;
  const int64_t n_blocks = (n_tiles + nb_tiles - 1) / nb_tiles;
  // More than one M tile: unpack each pair of b rows once per M block (in L1), not once per tile.
  const bool pre = m_tiles > 1;
  const auto unpack = asym ? &unpack_rows<true> : &unpack_rows<false>;
  at::parallel_for(0, n_blocks * m_blocks, 1, [&](int64_t t0, int64_t t1) {
    alignas(32) float res[8];
    std::vector<uint8_t> wbuf(pre ? size_t(nr * pr.lda) : 0);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t nbk = t / m_blocks, mbk = t % m_blocks;  // N outer: b rows reused across tasks
      const int64_t nt1 = std::min(n_tiles, (nbk + 1) * nb_tiles);
      const int64_t mt1 = std::min(m_tiles, (mbk + 1) * mb_tiles);
      for (int64_t nt = nbk * nb_tiles; nt < nt1; ++nt) {
        if (pre) unpack(p, pr, nt * nr, nr, wbuf.data());
        for (int64_t mt = mbk * mb_tiles; mt < mt1; ++mt) {
          const int64_t m0 = mt * mr, n0 = nt * nr;
          tile(p, pr, m0, n0, pre ? wbuf.data() : nullptr, res);
          for (int i = 0; i < mr && m0 + i < p.M; ++i)
            for (int j = 0; j < nr && n0 + j < p.N; ++j) store_out(p, m0 + i, n0 + j, res[i * nr + j]);
        }
      }
    }
  });
}

// ------------------------------------------------------------------------------ AVX2 panel path
// M >= 5 with G in 32 / 64 / 128 / 256 (the group sizes GPTQ / AWQ checkpoints use). The roles
// of gemm_int8.cpp's panel path, without its sign work: every nibble is unsigned (u = q, or
// q + 8 for signed weights) so it is the u8 operand of _mm256_maddubs_epi16 and the activation,
// any int8 including -128, the s8 operand; a pair sum is at most 2 * 15 * 128 = 3840, so 8 k-quads
// (<= 30720) are summed in int16 before one madd(ones) widens them. Per k-quad and 4 x 16 tile:
// 2 panel loads, 4 weight broadcasts, 8 maddubs, 8 int16 adds (+ 1/8 of a widening): 256
// multiply-adds, against 8 sign + 8 madd + 4 abs more in the int8 panel (measured alone on one
// core, L1/L2 data: ~115-120 G multiply-adds/s here against ~55-68 for the int8 micro-kernel).
//   a  -> panels P[ceil(M / 16)][K / 4][16 tokens][4 bytes] (per call; zero tokens pad the last)
//         and asum[panel][group][16]: the exact sum of a over each group, per token;
//   b  -> per task, a strip of 4 weight rows is unpacked to u8 for one K block (KB = 2048 k, 8 KB
//         in L1) and reused by every panel of the task (MT = 128 tokens);
//   per (panel, strip, group): c = sum_{k in g} a * u exact in int32 -> c - z' * asum (exact) ->
//         fp32 * sb[n, g] added to the output's fp32 sum over the groups (in group order);
//   at the end y = sum * sa[m] (+ bias[n]), separately rounded as in the reference.
constexpr int kPT = 16;            // tokens per panel
constexpr int kPR = 4;             // weight rows per strip
constexpr int64_t kKB = 2048;      // k per K block (a multiple of every panel-path G)
constexpr int64_t kMT = 128;       // tokens per task (multiple of kPT)
constexpr int64_t kNT = 64;        // weight rows per task (multiple of kPR)

bool panel_applies(const Problem& p) { return p.M > 4 && p.G % 32 == 0 && p.G <= 256; }

// Per group of one (panel, strip) tile: facc[r][t] += sb_r * (sum_q U[r][4q..] . P[q][t][..] - z'_r * asum[t]).
#define QK_W4_ROW(r, h0, h1)                                                   \
  {                                                                            \
    int32_t w4;                                                                \
    std::memcpy(&w4, U + (r) * ldu + q * 4, 4);                                \
    const __m256i wb = _mm256_set1_epi32(w4);                                  \
    h0 = _mm256_add_epi16(_mm256_maddubs_epi16(wb, a0), h0);                   \
    h1 = _mm256_add_epi16(_mm256_maddubs_epi16(wb, a1), h1);                   \
  }
// ngr consecutive groups of nq = G / 4 quads each: U, P, asum (kPT per group), s4 and z4 (kPR per
// group) advance group by group; facc is the tile's fp32 sum.
template <bool kAsym>
QK_TARGET_AVX2_NOFMA void panel_groups(const uint8_t* U, int64_t ldu, const int8_t* P, int64_t nq, int64_t ngr,
                                       const int32_t* asum, const float* s4, const int32_t* z4, float* facc) {
  const __m256i ones = _mm256_set1_epi16(1);
  for (int64_t gr = 0; gr < ngr; ++gr, U += nq * 4, P += nq * 64, asum += kPT, s4 += kPR, z4 += kPR) {
    __m256i c[8];
    for (int i = 0; i < 8; ++i) c[i] = _mm256_setzero_si256();
    for (int64_t q8 = 0; q8 < nq; q8 += 8) {  // nq = G / 4 is a multiple of 8
      __m256i h00 = _mm256_setzero_si256(), h01 = h00, h10 = h00, h11 = h00, h20 = h00, h21 = h00, h30 = h00,
              h31 = h00;
      for (int64_t q = q8; q < q8 + 8; ++q) {
        const __m256i a0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(P + q * 64));
        const __m256i a1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(P + q * 64 + 32));
        QK_W4_ROW(0, h00, h01)
        QK_W4_ROW(1, h10, h11)
        QK_W4_ROW(2, h20, h21)
        QK_W4_ROW(3, h30, h31)
      }
      const __m256i h[8] = {h00, h01, h10, h11, h20, h21, h30, h31};
      for (int i = 0; i < 8; ++i) c[i] = _mm256_add_epi32(c[i], _mm256_madd_epi16(h[i], ones));
    }
    for (int r = 0; r < kPR; ++r)
      for (int v = 0; v < 2; ++v) {
        const __m256i as = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(asum + v * 8));
        const __m256i za = kAsym ? _mm256_mullo_epi32(_mm256_set1_epi32(z4[r]), as) : _mm256_slli_epi32(as, 3);
        const __m256 f = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(c[r * 2 + v], za)), _mm256_set1_ps(s4[r]));
        float* o = facc + r * kPT + v * 8;
        _mm256_storeu_ps(o, _mm256_add_ps(_mm256_loadu_ps(o), f));
      }
  }
}
#undef QK_W4_ROW

// a [M, K] -> P [panels][K / 4][16][4] and asum [panels][ng][16] (tokens >= M are zero).
QK_TARGET_AVX2_NOFMA void panel_pack(const Problem& p, int8_t* P, int32_t* asum) {
  const int64_t M = p.M, K = p.K, ng = p.ng, G = p.G, nq = K / 4;
  const int64_t panels = (M + kPT - 1) / kPT;
  at::parallel_for(0, panels, 1, [&](int64_t p0, int64_t p1) {
    for (int64_t pi = p0; pi < p1; ++pi) {
      int8_t* dst = P + pi * nq * kPT * 4;
      int32_t* as = asum + pi * ng * kPT;
      std::memset(dst, 0, size_t(nq * kPT * 4));
      std::memset(as, 0, sizeof(int32_t) * size_t(ng * kPT));
      for (int64_t t = 0; t < kPT && pi * kPT + t < M; ++t) {
        const int8_t* src = p.a + (pi * kPT + t) * K;
        for (int64_t q = 0; q < nq; ++q) std::memcpy(dst + (q * kPT + t) * 4, src + q * 4, 4);
        for (int64_t g = 0; g < ng; ++g) {
          int32_t sum = 0;
          for (int64_t k = g * G; k < (g + 1) * G; ++k) sum += src[k];
          as[g * kPT + t] = sum;
        }
      }
    }
  });
}

// Weight rows n0 .. n0 + 3 (rows >= N are zero), k in [k0, k0 + kn), as u8 u = q (+ 8 if signed).
QK_TARGET_AVX2_NOFMA void panel_unpack(const Problem& p, int64_t n0, int64_t k0, int64_t kn, uint8_t* U,
                                       int64_t ldu) {
  const __m128i m15 = _mm_set1_epi8(0x0F);
  const __m128i flip = _mm_set1_epi8(p.zb ? 0 : static_cast<char>(0x88));
  const __m256i m15y = _mm256_set1_epi8(0x0F);
  const __m256i flipy = _mm256_set1_epi8(p.zb ? 0 : static_cast<char>(0x88));
  for (int r = 0; r < kPR; ++r) {
    uint8_t* dst = U + r * ldu;
    if (n0 + r >= p.N) {
      std::memset(dst, 0, size_t(kn));
      continue;
    }
    const uint8_t* src = p.bp + (n0 + r) * (p.K / 2) + k0 / 2;
    int64_t i = 0;
    // 32 packed bytes (64 k) per step: the in-lane byte interleave gives k 0..15 | 32..47 and
    // k 16..31 | 48..63; two lane permutes restore the k order.
    for (; i + 32 <= kn / 2; i += 32) {
      const __m256i v = _mm256_xor_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + i)), flipy);
      const __m256i lo = _mm256_and_si256(v, m15y), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), m15y);
      const __m256i a = _mm256_unpacklo_epi8(lo, hi), b = _mm256_unpackhi_epi8(lo, hi);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + 2 * i), _mm256_permute2x128_si256(a, b, 0x20));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + 2 * i + 32), _mm256_permute2x128_si256(a, b, 0x31));
    }
    for (; i < kn / 2; i += 16) {  // kn is a multiple of 32
      const __m128i v = _mm_xor_si128(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i)), flip);
      const __m128i lo = _mm_and_si128(v, m15), hi = _mm_and_si128(_mm_srli_epi16(v, 4), m15);
      _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + 2 * i), _mm_unpacklo_epi8(lo, hi));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + 2 * i + 16), _mm_unpackhi_epi8(lo, hi));
    }
  }
}

using PanelGroupsFn = void (*)(const uint8_t*, int64_t, const int8_t*, int64_t, int64_t, const int32_t*, const float*,
                               const int32_t*, float*);

// groups: panel_groups (AVX2) or panel_groups_vnni256 (AVX-VNNI), asym or not: same layouts.
void run_panel_avx2(const Problem& p, PanelGroupsFn groups) {
  const int64_t M = p.M, N = p.N, K = p.K, ng = p.ng, G = p.G, nq = K / 4;
  const int64_t panels = (M + kPT - 1) / kPT;
  // 64-byte aligned (torch's CPU allocator): each k-quad of a panel is one cache line.
  const at::Tensor Pt = at::empty({panels * nq * kPT * 4}, at::kChar);
  std::vector<int32_t> asum(size_t(panels * ng * kPT));
  int8_t* const Pd = Pt.data_ptr<int8_t>();
  panel_pack(p, Pd, asum.data());
  const int64_t n_blocks = (N + kNT - 1) / kNT, m_blocks = (M + kMT - 1) / kMT;
  at::parallel_for(0, n_blocks * m_blocks, 1, [&](int64_t t0, int64_t t1) {
    std::vector<float> facc(size_t(kMT * kNT));  // [panel][strip][4][16] of the task
    std::vector<uint8_t> U(size_t(kPR * kKB));
    std::vector<float> s4(size_t(kKB / 32 * kPR));    // [group of the K block][4]
    std::vector<int32_t> z4(size_t(kKB / 32 * kPR));
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t nbk = t / m_blocks, mbk = t % m_blocks;  // N outer: weight rows reused across tasks
      const int64_t n0 = nbk * kNT, nb = std::min(kNT, N - n0);
      const int64_t m0 = mbk * kMT, mb = std::min(kMT, M - m0);
      const int64_t np = (mb + kPT - 1) / kPT, ns = (nb + kPR - 1) / kPR;
      std::fill(facc.begin(), facc.end(), 0.0f);
      for (int64_t k0 = 0; k0 < K; k0 += kKB) {
        const int64_t kn = std::min(kKB, K - k0);  // a multiple of G
        for (int64_t j = 0; j < ns; ++j) {
          const int64_t nj = n0 + j * kPR;
          panel_unpack(p, nj, k0, kn, U.data(), kKB);
          // The next strip's packed rows (this K block) are prefetched into L2 while this strip
          // computes. perf put ~3/4 of the unpack's samples on its weight loads. In-process A/B at
          // 4096^2: M = 5 / 16 about 7% faster, M = 32 / 128 2-3%. Prefetching into L1 (T0) did
          // not help.
          if (j + 1 < ns)
            for (int r = 0; r < kPR && nj + kPR + r < N; ++r) {
              const uint8_t* row = p.bp + (nj + kPR + r) * (K / 2) + k0 / 2;
              for (int64_t o = 0; o < kn / 2; o += 64) _mm_prefetch(reinterpret_cast<const char*>(row + o), _MM_HINT_T1);
            }
          const int64_t g0 = k0 / G, g1 = (k0 + kn) / G;
          for (int64_t g = g0; g < g1; ++g)  // the strip's scales and zero points for the K block
            for (int r = 0; r < kPR; ++r) {
              const bool in = nj + r < N;
              s4[(g - g0) * kPR + r] = in ? p.sb[(nj + r) * ng + g] : 0.0f;
              z4[(g - g0) * kPR + r] = !in ? 0 : p.zb ? p.zb[(nj + r) * ng + g] : 8;
            }
          for (int64_t i = 0; i < np; ++i) {  // panel by panel: its K block streams in order
            const int64_t pi = m0 / kPT + i;
            groups(U.data(), kKB, Pd + (pi * nq + k0 / 4) * kPT * 4, G / 4, g1 - g0, asum.data() + (pi * ng + g0) * kPT,
                   s4.data(), z4.data(), facc.data() + (i * ns + j) * kPR * kPT);
          }
        }
      }
      for (int64_t i = 0; i < np; ++i)
        for (int64_t j = 0; j < ns; ++j) {
          const float* f = facc.data() + (i * ns + j) * kPR * kPT;
          for (int r = 0; r < kPR; ++r) {
            const int64_t n = n0 + j * kPR + r;
            if (n >= N) break;
            for (int u = 0; u < kPT; ++u) {
              const int64_t m = m0 + i * kPT + u;
              if (m >= M) break;
              float v = f[r * kPT + u] * p.sa[m];
              if (p.bias) v = v + p.bias[n];
              store_out(p, m, n, v);
            }
          }
        }
    }
  });
}

// ------------------------------------------------------------------------------ AVX2 decode GEMV
// M <= 4 with K a multiple of 64 and G = 32 or a multiple of 64 (the common group sizes 32 / 64 /
// 128 / 256 and per-channel G = K): one pass over the weights, NR = 4 / M rows per tile (M * NR <= 4 int16 + 4 fp32
// accumulators). 32 packed bytes (64 nibbles) per row and step, unpacked with one and + one
// shift + one and (plus the 0x88 flip for signed nibbles): the low nibbles are the even k of the
// 64-chunk, the high nibbles the odd k, so a is permuted once per call per 64-chunk into
// (32 even k, 32 odd k). maddubs(u4, a) pair sums (<= 3840) are summed in int16 (at most 8,
// <= 30720) and widened with madd(ones) once per group (G <= 256; every 256 otherwise). Per
// group, the S = M * NR outputs' lane-wise int32 sums are reduced by one hadd tree to S exact
// int32 c[g] = sum_{k in g} a * u, stored to a small per-thread buffer; after the K loop one
// vector pass (4 groups per step) takes each output's sum_g sb[n, g] * (c[g] - z' * sum_{k in g} a)
// with the zero-point term exact in int32 and cvt, *, + in fp32 (4 partial sums, then added).
// Doing that float work inside the K loop, per group, cost ~40% of the hot time at G = 128.
constexpr int64_t kGemvChunk = 64;
// Every GEMV (AVX2, AVX-VNNI, AVX512-VNNI) prefetches its weight stream into L2 (prefetcht1), whole
// tiles at least kPfBytes ahead, same offset. Into L1 one tile ahead (8 KB at K = 4096, M = 1), the
// outstanding line fills capped one core at ~10 GB/s from DRAM. avx512_vnni, 1 thread, CPU time,
// 4096^2 g128 M = 1 rotating over 96 MiB, two runs in one process each (2026-12-07,
// bench/results/cpu_weight_only_2026-12-07.md): 0.94 / 0.99 ms (L1, 1 tile) -> 0.51 / 0.56 ms (L2, 32 KB);
// 8 to 256 KB ahead all within the runs' noise (0.44-0.64 ms).
constexpr int64_t kPfBytes = 32 * 1024;
inline int64_t pf_ahead(int64_t tile_bytes) { return (kPfBytes + tile_bytes - 1) / tile_bytes * tile_bytes; }

struct GemvPrep {
  std::vector<int8_t> ap;     // [M, K] permuted per 64-chunk
  std::vector<int32_t> asum;  // [M, ng] sums of a over each group
};

// a permuted per chunk of `chunk` k (the last one may be shorter): its even k, then its odd k.
QK_TARGET_AVX2_NOFMA void gemv_prepare(const Problem& p, GemvPrep& g, int64_t chunk = kGemvChunk) {
  const int64_t M = p.M, K = p.K, ng = p.ng, G = p.G;
  g.ap.resize(size_t(M * K));
  g.asum.assign(size_t(M * ng), 0);
  const __m256i ones8 = _mm256_set1_epi8(1), ones16 = _mm256_set1_epi16(1);
  for (int64_t m = 0; m < M; ++m) {
    const int8_t* src = p.a + m * K;
    int8_t* dst = g.ap.data() + m * K;
    for (int64_t c = 0; c < K; c += chunk) {
      const int64_t half = std::min(chunk, K - c) / 2;
      for (int64_t i = 0; i < half; ++i) {
        dst[c + i] = src[c + 2 * i];
        dst[c + half + i] = src[c + 2 * i + 1];
      }
    }
    for (int64_t gi = 0; gi < ng; ++gi) {
      __m256i s = _mm256_setzero_si256();
      for (int64_t k = gi * G; k < (gi + 1) * G; k += 32) {
        const __m256i av = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + k));  // natural order
        s = _mm256_add_epi32(s, _mm256_madd_epi16(_mm256_maddubs_epi16(ones8, av), ones16));
      }
      const __m128i h = _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256(s, 1));
      const __m128i h2 = _mm_add_epi32(h, _mm_unpackhi_epi64(h, h));
      g.asum[size_t(m * ng + gi)] = _mm_cvtsi128_si32(_mm_add_epi32(h2, _mm_shuffle_epi32(h2, 1)));
    }
  }
}

// Every 64-byte line of [begin, end).
QK_TARGET_AVX2_NOFMA inline void prefetch_lines(const void* begin, const void* end) {
  const uintptr_t e = reinterpret_cast<uintptr_t>(end);
  for (uintptr_t a = reinterpret_cast<uintptr_t>(begin) & ~uintptr_t(63); a < e; a += 64)
    _mm_prefetch(reinterpret_cast<const char*>(a), _MM_HINT_T0);
}

// One 64-chunk of the decode GEMV: c16[m][r] += the 4 maddubs pair sums (lo and hi nibbles).
template <int MM, int NR, bool kAsym>
QK_TARGET_AVX2_NOFMA __attribute__((always_inline)) inline void gemv_step(const uint8_t* const* b, const int8_t* ap,
                                                                          int64_t K, int64_t ldb, int64_t k,
                                                                          __m256i (&c16)[MM][NR]) {
  const __m256i m15 = _mm256_set1_epi8(0x0F), flip = _mm256_set1_epi8(static_cast<char>(0x88));
  if ((k & 127) == 0) {  // rows >= kPfBytes ahead, one 64-byte line (128 nibbles) each
    const int64_t pfd = pf_ahead(NR * ldb);
    for (int r = 0; r < NR; ++r) _mm_prefetch(reinterpret_cast<const char*>(b[r] + k / 2 + pfd), _MM_HINT_T1);
  }
  __m256i alo[MM], ahi[MM];
  for (int m = 0; m < MM; ++m) {
    alo[m] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(ap + m * K + k));
    ahi[m] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(ap + m * K + k + 32));
  }
  for (int r = 0; r < NR; ++r) {
    __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b[r] + k / 2));
    if (!kAsym) v = _mm256_xor_si256(v, flip);  // signed nibbles: u = q + 8
    const __m256i lo = _mm256_and_si256(v, m15);
    const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), m15);
    for (int m = 0; m < MM; ++m) {
      c16[m][r] = _mm256_add_epi16(c16[m][r], _mm256_maddubs_epi16(lo, alo[m]));
      c16[m][r] = _mm256_add_epi16(c16[m][r], _mm256_maddubs_epi16(hi, ahi[m]));
    }
  }
}

template <int MM, int NR, bool kAsym>
QK_TARGET_AVX2_NOFMA void gemv_finish(const Problem& p, const GemvPrep& g, int64_t n0, const int32_t* cbuf);

// The next tile's scales and zero points (read by gemv_finish): lines of their own, not covered
// by the weight prefetches; without this each tile's epilogue waited on DRAM.
template <int NR, bool kAsym>
QK_TARGET_AVX2_NOFMA inline void gemv_prefetch_scales(const Problem& p, int64_t n0) {
  for (int r = 0; r < NR; ++r) {
    const int64_t n = n0 + NR + r;
    if (n >= p.N) break;
    prefetch_lines(p.sb + n * p.ng, p.sb + (n + 1) * p.ng);
    if (kAsym) prefetch_lines(p.zb + n * p.ng, p.zb + (n + 1) * p.ng);
  }
}

template <int MM, int NR, bool kAsym>
QK_TARGET_AVX2_NOFMA void gemv_tile(const Problem& p, const GemvPrep& g, int64_t n0, int32_t* cbuf) {
  const int64_t K = p.K, ng = p.ng, G = p.G, ldb = K / 2;
  const __m256i ones16 = _mm256_set1_epi16(1);
  const uint8_t* b[NR];
  for (int r = 0; r < NR; ++r) b[r] = p.bp + (n0 + r) * ldb;
  constexpr int S = MM * NR;  // output slots (m, r) -> i = m * NR + r; S <= 4
  static_assert(S <= 4, "one 4-wide epilogue vector per tile");
  const int8_t* ap = g.ap.data();
  gemv_prefetch_scales<NR, kAsym>(p, n0);
  const int64_t flush = 4 * kGemvChunk;  // 8 maddubs results (lo + hi per 64-chunk) per int16 sum
  // G = 32: a 64-chunk holds two groups, one per 128-bit lane (lane 0: k 0..31 of the chunk, lane 1:
  // k 32..63, for the weight bytes and the permuted a alike); maddubs, madd and hadd stay in their
  // lane, so the two halves of the hadd tree are the two groups' sums.
  for (int64_t ch = 0; G == 32 && ch < K / kGemvChunk; ++ch) {
    __m256i c16[MM][NR];
    for (int m = 0; m < MM; ++m)
      for (int r = 0; r < NR; ++r) c16[m][r] = _mm256_setzero_si256();
    gemv_step<MM, NR, kAsym>(b, ap, K, ldb, ch * kGemvChunk, c16);
    __m256i v[4];
    for (int i = 0; i < 4; ++i) v[i] = i < S ? _mm256_madd_epi16(c16[i / NR][i % NR], ones16) : _mm256_setzero_si256();
    const __m256i h = _mm256_hadd_epi32(_mm256_hadd_epi32(v[0], v[1]), _mm256_hadd_epi32(v[2], v[3]));
    _mm_store_si128(reinterpret_cast<__m128i*>(cbuf + 2 * ch * 4), _mm256_castsi256_si128(h));
    _mm_store_si128(reinterpret_cast<__m128i*>(cbuf + (2 * ch + 1) * 4), _mm256_extracti128_si256(h, 1));
  }
  for (int64_t gi = 0; G != 32 && gi < ng; ++gi) {
    __m256i v[4];  // per slot: lane-wise int32 sums over the group
    for (int i = 0; i < 4; ++i) v[i] = _mm256_setzero_si256();
    for (int64_t kb = gi * G; kb < (gi + 1) * G; kb += flush) {  // one pass for G <= 256
      const int64_t ke = std::min((gi + 1) * G, kb + flush);
      __m256i c16[MM][NR];
      for (int m = 0; m < MM; ++m)
        for (int r = 0; r < NR; ++r) c16[m][r] = _mm256_setzero_si256();
      for (int64_t k = kb; k < ke; k += kGemvChunk) gemv_step<MM, NR, kAsym>(b, ap, K, ldb, k, c16);
      for (int i = 0; i < S; ++i) v[i] = _mm256_add_epi32(v[i], _mm256_madd_epi16(c16[i / NR][i % NR], ones16));
    }
    // The S lane-wise sums -> one int32 per slot (hadd tree): the exact sum_{k in g} a * u.
    const __m256i h = _mm256_hadd_epi32(_mm256_hadd_epi32(v[0], v[1]), _mm256_hadd_epi32(v[2], v[3]));
    __m128i c = _mm_add_epi32(_mm256_castsi256_si128(h), _mm256_extracti128_si256(h, 1));
    _mm_store_si128(reinterpret_cast<__m128i*>(cbuf + gi * 4), c);
  }
  gemv_finish<MM, NR, kAsym>(p, g, n0, cbuf);
}

// The end of a decode GEMV tile, given cbuf [ng][4]: the S exact sums c[g] = sum_{k in g} a * u
// of each output slot i = m * NR + r (also used by the VNNI GEMVs, so every level rounds alike).
template <int MM, int NR, bool kAsym>
QK_TARGET_AVX2_NOFMA void gemv_finish(const Problem& p, const GemvPrep& g, int64_t n0, const int32_t* cbuf) {
  const int64_t ng = p.ng;
  constexpr int S = MM * NR;
  const int32_t* asum = g.asum.data();
  // Per slot, over the groups (4 at a time, cbuf transposed in registers):
  //   sum_g sb[n, g] * (c[g] - z'[n, g] * sum_{k in g} a[m, k])   (z' = zero, or 8 for signed nibbles)
  // The int32 difference is exact; cvt, * sb, + in fp32 (4 partial sums per slot, then added).
  // Deferred out of the K loop: per group it was ~40% of the hot time at G = 128.
  __m128 acc[4] = {_mm_setzero_ps(), _mm_setzero_ps(), _mm_setzero_ps(), _mm_setzero_ps()};
  int64_t gi = 0;
  for (; gi + 4 <= ng; gi += 4) {
    __m128 t0 = _mm_load_ps(reinterpret_cast<const float*>(cbuf + gi * 4));
    __m128 t1 = _mm_load_ps(reinterpret_cast<const float*>(cbuf + gi * 4 + 4));
    __m128 t2 = _mm_load_ps(reinterpret_cast<const float*>(cbuf + gi * 4 + 8));
    __m128 t3 = _mm_load_ps(reinterpret_cast<const float*>(cbuf + gi * 4 + 12));
    _MM_TRANSPOSE4_PS(t0, t1, t2, t3);  // bit moves only: t_i = slot i's int32 c over 4 groups
    const __m128 t[4] = {t0, t1, t2, t3};
    for (int i = 0; i < S; ++i) {
      const int64_t n = n0 + i % NR;
      const __m128i as = _mm_loadu_si128(reinterpret_cast<const __m128i*>(asum + (i / NR) * ng + gi));
      __m128i za;
      if (kAsym) {
        int32_t z4;
        std::memcpy(&z4, p.zb + n * ng + gi, 4);
        za = _mm_mullo_epi32(_mm_cvtepu8_epi32(_mm_cvtsi32_si128(z4)), as);
      } else {
        za = _mm_slli_epi32(as, 3);
      }
      const __m128i c = _mm_sub_epi32(_mm_castps_si128(t[i]), za);
      acc[i] = _mm_add_ps(acc[i], _mm_mul_ps(_mm_cvtepi32_ps(c), _mm_loadu_ps(p.sb + n * ng + gi)));
    }
  }
  float out[4];
  for (int i = 0; i < S; ++i) {
    __m128 h = _mm_add_ps(acc[i], _mm_movehl_ps(acc[i], acc[i]));
    out[i] = _mm_cvtss_f32(_mm_add_ss(h, _mm_movehdup_ps(h)));
  }
  for (; gi < ng; ++gi)
    for (int i = 0; i < S; ++i) {
      const int64_t n = n0 + i % NR;
      const int32_t z = kAsym ? int32_t(p.zb[n * ng + gi]) : 8;
      out[i] += float(cbuf[gi * 4 + i] - z * asum[(i / NR) * ng + gi]) * p.sb[n * ng + gi];
    }
  for (int i = 0; i < S; ++i) {
    const int m = i / NR, r = i % NR;
    float val = out[i] * p.sa[m];
    if (p.bias) val = val + p.bias[n0 + r];
    store_out(p, m, n0 + r, val);
  }
}

// ------------------------------------------------------------------------------ VNNI (AVX-VNNI, AVX512-VNNI)
// vpdpbusd(acc, u8 x, s8 y) adds the 4 products x[4i..4i+3] * y[4i..4i+3] to the int32 acc[i]
// without saturation: with the unsigned nibble u (0..15) as x and the activation (-128..127) as y
// every product and sum is exact, so there is no int16 step and no flush; the int32 sums of a
// group are bounded by G * 15 * 128 < 2^31 (kMaxGroupW4A8). The offset removal (c - z' * asum), the
// layouts and the fp32 order are those of the AVX2 paths above, so every level gives the same
// integers and, path for path, the same float results bit for bit.
//   avx512_vnni (zmm):  panel path: 2 panels (32 tokens) x 8 weight rows per micro-tile, 16 zmm
//                       accumulators, per k-quad 2 panel loads + 8 dword broadcasts for 16 vpdpbusd;
//                       GEMV: 64 packed bytes (128 k) per row and step, a permuted per 128-chunk
//                       (64 even k, 64 odd k; a K tail of 64 as one half-width chunk, masked loads).
//   avx_vnni (ymm VEX): the AVX2 panel path and GEMV with vpdpbusd in place of maddubs + int16 sums.
// The epilogues' multiply and add are kept apart (avx512f implies FMA to GCC; an empty asm
// between them stops the contraction), as in the reference.

// GCC 12's avx512fintrin.h (_mm512_undefined_epi32: __m512i __Y = __Y) warns maybe-uninitialized
// in every inlined unpack / cast of this section (fixed in GCC 13); the values are defined.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#define QK_TARGET_VNNI512 __attribute__((target("avx2,f16c,avx512f,avx512bw,avx512vl,avx512dq,avx512vnni")))
#define QK_TARGET_VNNI256 __attribute__((target("avx2,f16c,avxvnni")))
#define QK_NO_CONTRACT(x) __asm__("" : "+x"(x))

// acc + vpdpbusd(u8, s8). GCC 12 compiles _mm512_dpbusd_epi32 on accumulator arrays into a
// register copy per instruction plus spills (its tied operand); the asm keeps acc in place.
QK_TARGET_VNNI512 inline __m512i dpbusd512(__m512i acc, __m512i u8, __m512i s8) {
  __asm__("vpdpbusd %2, %1, %0" : "+v"(acc) : "v"(u8), "v"(s8));
  return acc;
}

// The same for the VEX (AVX-VNNI) ymm form: ymm0-15 only ("x").
QK_TARGET_VNNI256 inline __m256i dpbusd256(__m256i acc, __m256i u8, __m256i s8) {
  __asm__("%{vex%} vpdpbusd %2, %1, %0" : "+x"(acc) : "x"(u8), "x"(s8));
  return acc;
}

// ---- avx_vnni panel groups: panel_groups with int32 vpdpbusd sums (no int16 flush).
#define QK_W4_ROW_VNNI(r)                                                         \
  {                                                                               \
    int32_t w4;                                                                   \
    std::memcpy(&w4, U + (r) * ldu + q * 4, 4);                                   \
    const __m256i wb = _mm256_set1_epi32(w4);                                     \
    c[2 * (r)] = dpbusd256(c[2 * (r)], wb, a0);                                   \
    c[2 * (r) + 1] = dpbusd256(c[2 * (r) + 1], wb, a1);                           \
  }
template <bool kAsym>
QK_TARGET_VNNI256 void panel_groups_vnni256(const uint8_t* U, int64_t ldu, const int8_t* P, int64_t nq, int64_t ngr,
                                            const int32_t* asum, const float* s4, const int32_t* z4, float* facc) {
  for (int64_t gr = 0; gr < ngr; ++gr, U += nq * 4, P += nq * 64, asum += kPT, s4 += kPR, z4 += kPR) {
    __m256i c[8];
    for (int i = 0; i < 8; ++i) c[i] = _mm256_setzero_si256();
    for (int64_t q = 0; q < nq; ++q) {
      const __m256i a0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(P + q * 64));
      const __m256i a1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(P + q * 64 + 32));
      QK_W4_ROW_VNNI(0)
      QK_W4_ROW_VNNI(1)
      QK_W4_ROW_VNNI(2)
      QK_W4_ROW_VNNI(3)
    }
    for (int r = 0; r < kPR; ++r)
      for (int v = 0; v < 2; ++v) {
        const __m256i as = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(asum + v * 8));
        const __m256i za = kAsym ? _mm256_mullo_epi32(_mm256_set1_epi32(z4[r]), as) : _mm256_slli_epi32(as, 3);
        __m256 f = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(c[r * 2 + v], za)), _mm256_set1_ps(s4[r]));
        QK_NO_CONTRACT(f);
        float* o = facc + r * kPT + v * 8;
        _mm256_storeu_ps(o, _mm256_add_ps(_mm256_loadu_ps(o), f));
      }
  }
}
#undef QK_W4_ROW_VNNI

// ---- avx512_vnni panel path.
constexpr int kPR512 = 8;  // weight rows per strip (two panel_unpack calls)

// Per group of a (MP panels) x (kPR512 rows) tile: facc[i][r][t] += sb_r * (c - z'_r * asum[i][t]).
// P, asum and facc of panel i are at i * pstride, i * astride and i * fstride.
template <bool kAsym, int MP>
QK_TARGET_VNNI512 void panel_groups_vnni512(const uint8_t* U, int64_t ldu, const int8_t* P, int64_t pstride,
                                            int64_t nq, int64_t ngr, const int32_t* asum, int64_t astride,
                                            const float* s8, const int32_t* z8, float* facc, int64_t fstride) {
  constexpr int R = kPR512;
  for (int64_t gr = 0; gr < ngr; ++gr, U += nq * 4, P += nq * 64, asum += kPT, s8 += R, z8 += R) {
    __m512i c[MP][R];
    for (int i = 0; i < MP; ++i)
      for (int r = 0; r < R; ++r) c[i][r] = _mm512_setzero_si512();
    for (int64_t q = 0; q < nq; ++q) {
      __m512i a[MP];
      for (int i = 0; i < MP; ++i) a[i] = _mm512_loadu_si512(P + i * pstride + q * 64);
      for (int r = 0; r < R; ++r) {
        int32_t w4;
        std::memcpy(&w4, U + r * ldu + q * 4, 4);
        const __m512i wb = _mm512_set1_epi32(w4);
        for (int i = 0; i < MP; ++i) c[i][r] = dpbusd512(c[i][r], wb, a[i]);
      }
    }
    for (int i = 0; i < MP; ++i) {
      const __m512i as = _mm512_loadu_si512(asum + i * astride);
      const __m512i as8 = _mm512_slli_epi32(as, 3);
      for (int r = 0; r < R; ++r) {
        const __m512i za = kAsym ? _mm512_mullo_epi32(_mm512_set1_epi32(z8[r]), as) : as8;
        __m512 f = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(c[i][r], za)), _mm512_set1_ps(s8[r]));
        QK_NO_CONTRACT(f);
        float* o = facc + i * fstride + r * kPT;
        _mm512_storeu_ps(o, _mm512_add_ps(_mm512_loadu_ps(o), f));
      }
    }
  }
}

// panel_unpack with 64 packed bytes (128 k) per zmm step (about half its instructions; at M = 16
// the unpack is a large part of the work): rows n0 .. n0 + nr - 1 (>= N: zero), k in [k0, k0 + kn).
QK_TARGET_VNNI512 void panel_unpack512(const Problem& p, int64_t n0, int nr, int64_t k0, int64_t kn, uint8_t* U,
                                       int64_t ldu) {
  const __m512i m15 = _mm512_set1_epi8(0x0F), flip = _mm512_set1_epi8(p.zb ? 0 : static_cast<char>(0x88));
  const __m128i m15x = _mm_set1_epi8(0x0F), flipx = _mm_set1_epi8(p.zb ? 0 : static_cast<char>(0x88));
  // unpacklo/hi_epi8 give lanes [k 0-15 | 32-47 | 64-79 | 96-111] and [16-31 | 48-63 | 80-95 | 112-127].
  const __m512i i0 = _mm512_setr_epi64(0, 1, 8, 9, 2, 3, 10, 11), i1 = _mm512_setr_epi64(4, 5, 12, 13, 6, 7, 14, 15);
  for (int r = 0; r < nr; ++r) {
    uint8_t* dst = U + r * ldu;
    if (n0 + r >= p.N) {
      std::memset(dst, 0, size_t(kn));
      continue;
    }
    const uint8_t* src = p.bp + (n0 + r) * (p.K / 2) + k0 / 2;
    int64_t i = 0;
    for (; i + 64 <= kn / 2; i += 64) {
      const __m512i v = _mm512_xor_si512(_mm512_loadu_si512(src + i), flip);
      const __m512i lo = _mm512_and_si512(v, m15), hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), m15);
      const __m512i a = _mm512_unpacklo_epi8(lo, hi), b = _mm512_unpackhi_epi8(lo, hi);
      _mm512_storeu_si512(dst + 2 * i, _mm512_permutex2var_epi64(a, i0, b));
      _mm512_storeu_si512(dst + 2 * i + 64, _mm512_permutex2var_epi64(a, i1, b));
    }
    for (; i < kn / 2; i += 16) {  // kn is a multiple of 32
      const __m128i v = _mm_xor_si128(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i)), flipx);
      const __m128i lo = _mm_and_si128(v, m15x), hi = _mm_and_si128(_mm_srli_epi16(v, 4), m15x);
      _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + 2 * i), _mm_unpacklo_epi8(lo, hi));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + 2 * i + 16), _mm_unpackhi_epi8(lo, hi));
    }
  }
}

// y[m0 + u, n0 + r] = f[r][u] * sa[m0 + u] (+ bias[n0 + r]) for a whole (16 tokens) x (8 rows) tile:
// the products and sums of the scalar epilogue (same roundings), stored through two 8 x 8 transposes
// and cast to out_t as store_out does, bit for bit (qk_store.h). The scalar stores cost ~15% of the
// M = 512 time with fp32 outputs; with bf16 ones (scalar casts) w4a8 at Gemma-3-270M's K = 640, N = 2048,
// M = 128 took 1.8x w8a8's time.
template <typename out_t>
QK_TARGET_VNNI512 void panel_store(const Problem& p, const float* f, int64_t m0, int64_t n0) {
  const __m512 sa = _mm512_loadu_ps(p.sa + m0);
  __m256 lo[8], hi[8];
  for (int r = 0; r < 8; ++r) {
    __m512 v = _mm512_mul_ps(_mm512_loadu_ps(f + r * kPT), sa);
    QK_NO_CONTRACT(v);
    if (p.bias) v = _mm512_add_ps(v, _mm512_set1_ps(p.bias[n0 + r]));
    lo[r] = _mm512_castps512_ps256(v);
    hi[r] = _mm512_extractf32x8_ps(v, 1);
  }
  out_t* y = static_cast<out_t*>(p.y) + m0 * p.N + n0;
  for (int h = 0; h < 2; ++h) {
    const __m256* x = h ? hi : lo;
    __m256 t[8], s[8];
    for (int i = 0; i < 4; ++i) {
      t[2 * i] = _mm256_unpacklo_ps(x[2 * i], x[2 * i + 1]);
      t[2 * i + 1] = _mm256_unpackhi_ps(x[2 * i], x[2 * i + 1]);
    }
    for (int i = 0; i < 2; ++i) {  // rows 4i .. 4i + 3
      s[4 * i] = _mm256_shuffle_ps(t[4 * i], t[4 * i + 2], 0x44);
      s[4 * i + 1] = _mm256_shuffle_ps(t[4 * i], t[4 * i + 2], 0xEE);
      s[4 * i + 2] = _mm256_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0x44);
      s[4 * i + 3] = _mm256_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0xEE);
    }
    for (int u = 0; u < 4; ++u) {
      store::store8_vl<out_t>(y + (8 * h + u) * p.N, _mm256_permute2f128_ps(s[u], s[4 + u], 0x20));
      store::store8_vl<out_t>(y + (8 * h + u + 4) * p.N, _mm256_permute2f128_ps(s[u], s[4 + u], 0x31));
    }
  }
}

// As run_panel_avx2 (same packing, unpack, K blocks and tasks), with 8-row strips and 2-panel tiles.
void run_panel_vnni512(const Problem& p) {
  constexpr int R = kPR512;
  const int64_t M = p.M, N = p.N, K = p.K, ng = p.ng, G = p.G, nq = K / 4;
  const int64_t panels = (M + kPT - 1) / kPT;
  const at::Tensor Pt = at::empty({panels * nq * kPT * 4}, at::kChar);
  std::vector<int32_t> asum(size_t(panels * ng * kPT));
  int8_t* const Pd = Pt.data_ptr<int8_t>();
  panel_pack(p, Pd, asum.data());
  const auto grp2 = p.zb ? &panel_groups_vnni512<true, 2> : &panel_groups_vnni512<false, 2>;
  const auto grp1 = p.zb ? &panel_groups_vnni512<true, 1> : &panel_groups_vnni512<false, 1>;
  const int64_t n_blocks = (N + kNT - 1) / kNT, m_blocks = (M + kMT - 1) / kMT;
  at::parallel_for(0, n_blocks * m_blocks, 1, [&](int64_t t0, int64_t t1) {
    std::vector<float> facc(size_t(kMT * kNT));  // [panel][strip][8][16] of the task
    std::vector<uint8_t> U(size_t(R * kKB));
    std::vector<float> s8(size_t(kKB / 32 * R));    // [group of the K block][8]
    std::vector<int32_t> z8(size_t(kKB / 32 * R));
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t nbk = t / m_blocks, mbk = t % m_blocks;  // N outer: weight rows reused across tasks
      const int64_t n0 = nbk * kNT, nb = std::min(kNT, N - n0);
      const int64_t m0 = mbk * kMT, mb = std::min(kMT, M - m0);
      const int64_t np = (mb + kPT - 1) / kPT, ns = (nb + R - 1) / R;
      const int64_t fstride = ns * R * kPT;  // facc floats per panel
      std::fill(facc.begin(), facc.end(), 0.0f);
      for (int64_t k0 = 0; k0 < K; k0 += kKB) {
        const int64_t kn = std::min(kKB, K - k0);  // a multiple of G
        for (int64_t j = 0; j < ns; ++j) {
          const int64_t nj = n0 + j * R;
          panel_unpack512(p, nj, R, k0, kn, U.data(), kKB);
          if (j + 1 < ns)  // the next strip's packed rows into L2 (as run_panel_avx2)
            for (int r = 0; r < R && nj + R + r < N; ++r) {
              const uint8_t* row = p.bp + (nj + R + r) * (K / 2) + k0 / 2;
              for (int64_t o = 0; o < kn / 2; o += 64) _mm_prefetch(reinterpret_cast<const char*>(row + o), _MM_HINT_T1);
            }
          const int64_t g0 = k0 / G, g1 = (k0 + kn) / G;
          for (int64_t g = g0; g < g1; ++g)
            for (int r = 0; r < R; ++r) {
              const bool in = nj + r < N;
              s8[(g - g0) * R + r] = in ? p.sb[(nj + r) * ng + g] : 0.0f;
              z8[(g - g0) * R + r] = !in ? 0 : p.zb ? p.zb[(nj + r) * ng + g] : 8;
            }
          for (int64_t i = 0; i < np;) {
            const int64_t pi = m0 / kPT + i;
            const auto fn = i + 2 <= np ? grp2 : grp1;
            fn(U.data(), kKB, Pd + (pi * nq + k0 / 4) * kPT * 4, nq * kPT * 4, G / 4, g1 - g0,
               asum.data() + (pi * ng + g0) * kPT, ng * kPT, s8.data(), z8.data(),
               facc.data() + i * fstride + j * R * kPT, fstride);
            i += i + 2 <= np ? 2 : 1;
          }
        }
      }
      for (int64_t i = 0; i < np; ++i)
        for (int64_t j = 0; j < ns; ++j) {
          const float* f = facc.data() + i * fstride + j * R * kPT;
          if (m0 + (i + 1) * kPT <= M && n0 + (j + 1) * R <= N) {
            const auto st = p.out == at::kFloat ? &panel_store<float>
                            : p.out == at::kHalf ? &panel_store<c10::Half> : &panel_store<c10::BFloat16>;
            st(p, f, m0 + i * kPT, n0 + j * R);
            continue;
          }
          for (int r = 0; r < R; ++r) {
            const int64_t n = n0 + j * R + r;
            if (n >= N) break;
            for (int u = 0; u < kPT; ++u) {
              const int64_t m = m0 + i * kPT + u;
              if (m >= M) break;
              float v = f[r * kPT + u] * p.sa[m];
              if (p.bias) v = v + p.bias[n];
              store_out(p, m, n, v);
            }
          }
        }
    }
  });
}

// ---- avx512_vnni decode GEMV: gemv_tile with 128-k steps and int32 vpdpbusd sums.
// Reduction of the S <= 4 slot accumulators: per 128-bit lane j, [sum of slot 0's lane j, ...,
// slot 3's]; lane j covers k in [32j, 32j + 32) of the chunk, so G = 32 keeps the 4 lanes as 4
// groups, G = 64 adds lane pairs, G >= 128 all 4 lanes (after summing the group's chunks).
QK_TARGET_VNNI512 inline __m512i lanes4(__m512i v0, __m512i v1, __m512i v2, __m512i v3) {
  const __m512i t0 = _mm512_add_epi32(_mm512_unpacklo_epi32(v0, v1), _mm512_unpackhi_epi32(v0, v1));
  const __m512i t1 = _mm512_add_epi32(_mm512_unpacklo_epi32(v2, v3), _mm512_unpackhi_epi32(v2, v3));
  return _mm512_add_epi32(_mm512_unpacklo_epi64(t0, t1), _mm512_unpackhi_epi64(t0, t1));
}

// One 128-k chunk at k (kTail: the last 64 k of a K % 128 == 64 row, as zmm with zero upper half).
template <int MM, int NR, bool kAsym, bool kTail>
QK_TARGET_VNNI512 __attribute__((always_inline)) inline void gemv512_step(const uint8_t* const* b, const int8_t* ap,
                                                                          int64_t K, int64_t ldb, int64_t k,
                                                                          __m512i (&acc)[MM][NR]) {
  const __m512i m15 = _mm512_set1_epi8(0x0F), flip = _mm512_set1_epi8(static_cast<char>(0x88));
  constexpr __mmask64 half = 0xFFFFFFFFull;
  const int64_t pfd = pf_ahead(NR * ldb);  // into L2, see kPfBytes
  for (int r = 0; r < NR; ++r) _mm_prefetch(reinterpret_cast<const char*>(b[r] + k / 2 + pfd), _MM_HINT_T1);
  __m512i alo[MM], ahi[MM];
  for (int m = 0; m < MM; ++m) {
    if (kTail) {
      alo[m] = _mm512_maskz_loadu_epi8(half, ap + m * K + k);
      ahi[m] = _mm512_maskz_loadu_epi8(half, ap + m * K + k + 32);
    } else {
      alo[m] = _mm512_loadu_si512(ap + m * K + k);
      ahi[m] = _mm512_loadu_si512(ap + m * K + k + 64);
    }
  }
  for (int r = 0; r < NR; ++r) {
    __m512i v = kTail ? _mm512_maskz_loadu_epi8(half, b[r] + k / 2) : _mm512_loadu_si512(b[r] + k / 2);
    if (!kAsym) v = _mm512_xor_si512(v, flip);  // signed nibbles: u = q + 8 (tail: times a = 0)
    const __m512i lo = _mm512_and_si512(v, m15);
    const __m512i hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), m15);
    for (int m = 0; m < MM; ++m) {
      acc[m][r] = dpbusd512(acc[m][r], lo, alo[m]);
      acc[m][r] = dpbusd512(acc[m][r], hi, ahi[m]);
    }
  }
}

// The 4-slot lane sums of half h (rows h * NR .. h * NR + NR - 1 of the tile): slot i = m * NR + r.
template <int MM, int NR, int NRT>
QK_TARGET_VNNI512 __attribute__((always_inline)) inline __m512i gemv512_lanes(const __m512i (&acc)[MM][NRT], int h) {
  constexpr int S = MM * NR;
  __m512i v[4];
  for (int i = 0; i < 4; ++i) v[i] = i < S ? acc[i / NR][h * NR + i % NR] : _mm512_setzero_si512();
  return lanes4(v[0], v[1], v[2], v[3]);
}

// H halves of NR rows each (H = 2: 4 / 2 rows for M = 2 / 3..4: the activation loads and unpacks
// shared by twice the rows); each half has its own cbuf
// ([ng][4] at cbuf + h * 4 * ng) and its own gemv_finish, so the float work is gemv_tile's.
template <int MM, int NR, bool kAsym, int H>
QK_TARGET_VNNI512 void gemv512_tile(const Problem& p, const GemvPrep& g, int64_t n0, int32_t* cbuf) {
  constexpr int NRT = NR * H;
  const int64_t K = p.K, ng = p.ng, G = p.G, ldb = K / 2, full = K / 128;
  const bool tail = K % 128 != 0;  // K % 64 == 0 (gemv_applies)
  const uint8_t* b[NRT];
  for (int r = 0; r < NRT; ++r) b[r] = p.bp + (n0 + r) * ldb;
  const int8_t* ap = g.ap.data();
  gemv_prefetch_scales<NRT, kAsym>(p, n0);
  __m512i acc[MM][NRT];
  auto zero = [&]() QK_TARGET_VNNI512 {
    for (int m = 0; m < MM; ++m)
      for (int r = 0; r < NRT; ++r) acc[m][r] = _mm512_setzero_si512();
  };
  if (G == 32 || G == 64) {  // 4 (G = 32) or 2 (G = 64) groups per chunk; the tail chunk holds half
    for (int64_t ch = 0; ch <= full; ++ch) {
      if (ch == full && !tail) break;
      zero();
      if (ch < full) gemv512_step<MM, NRT, kAsym, false>(b, ap, K, ldb, ch * 128, acc);
      else gemv512_step<MM, NRT, kAsym, true>(b, ap, K, ldb, ch * 128, acc);
      for (int h = 0; h < H; ++h) {
        int32_t* cb = cbuf + h * 4 * ng;
        const __m512i u = gemv512_lanes<MM, NR, NRT>(acc, h);
        if (G == 32) {
          if (ch < full) _mm512_storeu_si512(cb + ch * 16, u);
          else _mm256_storeu_si256(reinterpret_cast<__m256i*>(cb + ch * 16), _mm512_castsi512_si256(u));
        } else {
          const __m512i w = _mm512_add_epi32(u, _mm512_shuffle_i32x4(u, u, _MM_SHUFFLE(2, 3, 0, 1)));
          _mm_storeu_si128(reinterpret_cast<__m128i*>(cb + ch * 8), _mm512_castsi512_si128(w));
          if (ch < full) _mm_storeu_si128(reinterpret_cast<__m128i*>(cb + ch * 8 + 4), _mm512_extracti32x4_epi32(w, 2));
        }
      }
    }
  } else {  // G a multiple of 128, or G = K (per-channel, possibly with the tail chunk)
    for (int64_t gi = 0; gi < ng; ++gi) {
      zero();
      for (int64_t k = gi * G; k < (gi + 1) * G; k += 128) {
        if (k + 128 <= K) gemv512_step<MM, NRT, kAsym, false>(b, ap, K, ldb, k, acc);
        else gemv512_step<MM, NRT, kAsym, true>(b, ap, K, ldb, k, acc);
      }
      for (int h = 0; h < H; ++h) {
        const __m512i u = gemv512_lanes<MM, NR, NRT>(acc, h);
        const __m256i x = _mm256_add_epi32(_mm512_castsi512_si256(u), _mm512_extracti64x4_epi64(u, 1));
        _mm_storeu_si128(reinterpret_cast<__m128i*>(cbuf + h * 4 * ng + gi * 4),
                         _mm_add_epi32(_mm256_castsi256_si128(x), _mm256_extracti128_si256(x, 1)));
      }
    }
  }
  for (int h = 0; h < H; ++h) gemv_finish<MM, NR, kAsym>(p, g, n0 + h * NR, cbuf + h * 4 * ng);
}

// ---- avx_vnni decode GEMV: gemv_tile's 64-k steps with int32 vpdpbusd sums (ymm lanes: 32 k each).
template <int MM, int NR, bool kAsym>
QK_TARGET_VNNI256 __attribute__((always_inline)) inline void gemv256_step(const uint8_t* const* b, const int8_t* ap,
                                                                          int64_t K, int64_t ldb, int64_t k,
                                                                          __m256i (&acc)[MM][NR]) {
  const __m256i m15 = _mm256_set1_epi8(0x0F), flip = _mm256_set1_epi8(static_cast<char>(0x88));
  if ((k & 127) == 0) {
    const int64_t pfd = pf_ahead(NR * ldb);  // into L2, see kPfBytes
    for (int r = 0; r < NR; ++r) _mm_prefetch(reinterpret_cast<const char*>(b[r] + k / 2 + pfd), _MM_HINT_T1);
  }
  __m256i alo[MM], ahi[MM];
  for (int m = 0; m < MM; ++m) {
    alo[m] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(ap + m * K + k));
    ahi[m] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(ap + m * K + k + 32));
  }
  for (int r = 0; r < NR; ++r) {
    __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b[r] + k / 2));
    if (!kAsym) v = _mm256_xor_si256(v, flip);
    const __m256i lo = _mm256_and_si256(v, m15);
    const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), m15);
    for (int m = 0; m < MM; ++m) {
      acc[m][r] = dpbusd256(acc[m][r], lo, alo[m]);
      acc[m][r] = dpbusd256(acc[m][r], hi, ahi[m]);
    }
  }
}

template <int MM, int NR, bool kAsym>
QK_TARGET_VNNI256 void gemv256_tile(const Problem& p, const GemvPrep& g, int64_t n0, int32_t* cbuf) {
  const int64_t K = p.K, ng = p.ng, G = p.G, ldb = K / 2;
  constexpr int S = MM * NR;
  const uint8_t* b[NR];
  for (int r = 0; r < NR; ++r) b[r] = p.bp + (n0 + r) * ldb;
  const int8_t* ap = g.ap.data();
  gemv_prefetch_scales<NR, kAsym>(p, n0);
  const int64_t unit = G == 32 ? kGemvChunk : G;  // k per reduction: a chunk (2 groups) or a group
  for (int64_t u0 = 0; u0 < K; u0 += unit) {
    __m256i acc[MM][NR];
    for (int m = 0; m < MM; ++m)
      for (int r = 0; r < NR; ++r) acc[m][r] = _mm256_setzero_si256();
    for (int64_t k = u0; k < u0 + unit; k += kGemvChunk) gemv256_step<MM, NR, kAsym>(b, ap, K, ldb, k, acc);
    __m256i v[4];
    for (int i = 0; i < 4; ++i) v[i] = i < S ? acc[i / NR][i % NR] : _mm256_setzero_si256();
    const __m256i t0 = _mm256_add_epi32(_mm256_unpacklo_epi32(v[0], v[1]), _mm256_unpackhi_epi32(v[0], v[1]));
    const __m256i t1 = _mm256_add_epi32(_mm256_unpacklo_epi32(v[2], v[3]), _mm256_unpackhi_epi32(v[2], v[3]));
    const __m256i h = _mm256_add_epi32(_mm256_unpacklo_epi64(t0, t1), _mm256_unpackhi_epi64(t0, t1));
    if (G == 32) {  // lane 0: group 2 * chunk, lane 1: the next
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(cbuf + (u0 / 32) * 4), h);
    } else {
      _mm_storeu_si128(reinterpret_cast<__m128i*>(cbuf + (u0 / G) * 4),
                       _mm_add_epi32(_mm256_castsi256_si128(h), _mm256_extracti128_si256(h, 1)));
    }
  }
  (void)ng;
  gemv_finish<MM, NR, kAsym>(p, g, n0, cbuf);
}

enum class Gv { Avx2, Vnni256, Vnni512 };

template <Gv V, int MM, int NR, bool kAsym>
inline void gemv_tile_any(const Problem& p, const GemvPrep& g, int64_t n0, int32_t* cbuf) {
  if constexpr (V == Gv::Vnni512) gemv512_tile<MM, NR, kAsym, 1>(p, g, n0, cbuf);
  else if constexpr (V == Gv::Vnni256) gemv256_tile<MM, NR, kAsym>(p, g, n0, cbuf);
  else gemv_tile<MM, NR, kAsym>(p, g, n0, cbuf);
}

template <Gv V, int MM, bool kAsym>
void gemv_rows(const Problem& p, const GemvPrep& g, int64_t n0, int64_t n1) {
  constexpr int NR = MM == 1 ? 4 : (MM == 2 ? 2 : 1);
  // per tile: the S exact group sums of every group, [ng][4] int32 (16-byte aligned rows)
  std::vector<__m128i> cbuf_store(size_t(2 * p.ng));  // 2 halves (gemv512_tile<..., 2>)
  int32_t* cbuf = reinterpret_cast<int32_t*>(cbuf_store.data());
  int64_t n = n0;
  // zmm, M >= 2: tiles of two halves first (in-process A/B, 4096^2 g128 hot, 1 thread: M = 2 / 4 / 8
  // 0.35 -> 0.25 / 0.54 -> 0.48 / 1.09 -> 0.96 ms; M = 1 0.18 -> 0.21 ms hot, equal from DRAM: not used).
  if constexpr (V == Gv::Vnni512 && MM >= 2)
    for (; n + 2 * NR <= n1; n += 2 * NR) gemv512_tile<MM, NR, kAsym, 2>(p, g, n, cbuf);
  for (; n + NR <= n1; n += NR) gemv_tile_any<V, MM, NR, kAsym>(p, g, n, cbuf);
  for (; n < n1; ++n) gemv_tile_any<V, MM, 1, kAsym>(p, g, n, cbuf);
}

template <Gv V, bool kAsym>
void gemv_rows_any(const Problem& p, const GemvPrep& g, int64_t n0, int64_t n1) {
  switch (p.M) {
    case 1: gemv_rows<V, 1, kAsym>(p, g, n0, n1); break;
    case 2: gemv_rows<V, 2, kAsym>(p, g, n0, n1); break;
    case 3: gemv_rows<V, 3, kAsym>(p, g, n0, n1); break;
    default: gemv_rows<V, 4, kAsym>(p, g, n0, n1); break;
  }
}

bool gemv_applies(const Problem& p) {
  return p.M <= 4 && p.K % kGemvChunk == 0 && (p.G % kGemvChunk == 0 || p.G == 32);
}

template <Gv V>
void run_gemv(const Problem& p) {
  GemvPrep g;
  gemv_prepare(p, g, V == Gv::Vnni512 ? 128 : kGemvChunk);
  const int64_t grain = std::max<int64_t>(16, (int64_t(1) << 16) / p.K);  // small layers: one thread
  at::parallel_for(0, p.N, grain, [&](int64_t n0, int64_t n1) {
    if (p.zb) gemv_rows_any<V, true>(p, g, n0, n1);
    else gemv_rows_any<V, false>(p, g, n0, n1);
  });
}

// 4 < M <= 8 (small batches): the GEMV on row chunks of 4 (it reads the weights once per chunk)
// beats the panel path, whose 16-token panels cost the same from M = 5 to 16.
// zmm: up to M = 12 (in-process A/B, 1 thread, g128: M = 9 / 12 1.59 -> 1.26 / 1.68 -> 1.45 ms at
// 4096^2, 4.63 -> 3.57 / 4.71 -> 4.19 ms at 4096 x 11008; M = 16 is 25% slower than the panels).
constexpr int64_t kGemvSplitM = 8, kGemvSplitM512 = 12;
bool gemv_split_applies(const Problem& p, Gv gv) {
  Problem q = p;
  q.M = 4;
  return p.M > 4 && p.M <= (gv == Gv::Vnni512 ? kGemvSplitM512 : kGemvSplitM) && gemv_applies(q);
}
template <Gv V>
void run_gemv_split(const Problem& p) {
  const size_t row_bytes = size_t(p.N) * c10::elementSize(p.out);
  for (int64_t m0 = 0; m0 < p.M; m0 += 4) {
    Problem q = p;
    q.M = std::min<int64_t>(4, p.M - m0);
    q.a = p.a + m0 * p.K;
    q.sa = p.sa + m0;
    q.y = static_cast<char*>(p.y) + size_t(m0) * row_bytes;
    run_gemv<V>(q);
  }
}

// Which GEMV a level runs (features, not level order: see cpu_isa.h).
Gv gemv_variant(Isa isa) {
  return isa_has_vnni512(isa) ? Gv::Vnni512 : isa_has_vnni256(isa) ? Gv::Vnni256 : Gv::Avx2;
}

#pragma GCC diagnostic pop

#endif  // QK_X86

// ------------------------------------------------------------------------------ op

at::Tensor w4a8_gemm_cpu(const at::Tensor& a_in, const at::Tensor& b_in, const at::Tensor& sa_in,
                         const at::Tensor& sb_in, const std::optional<at::Tensor>& zb_in,
                         const std::optional<at::Tensor>& bias_in, std::optional<at::ScalarType> out_dtype) {
  // The checks of reference.w4a8_gemm, in its order, with _validate.py's messages.
  C::dtype_is(kOp, "a", a_in, at::kChar);
  C::ndim_is(kOp, "a", a_in, 2, "[M, K] activation");
  const int64_t M = a_in.size(0), K = a_in.size(1);
  C::dtype_is(kOp, "b_packed", b_in, at::kByte);
  C::ndim_is(kOp, "b_packed", b_in, 2, "[N, K/2] (two int4 values per byte along K)");
  const int64_t N = b_in.size(0);
  TORCH_CHECK_VALUE(b_in.size(1) * 2 == K, "quantkernels.", kOp, ": b_packed must have shape [N, K/2] = [N, ", K / 2,
                    "] for a's K = ", K, ", got ", C::shape_str(b_in.sizes()));
  C::same_device(kOp, "b_packed", b_in, "a", a_in);
  C::dtype_is(kOp, "scale_b", sb_in, at::kFloat);
  C::ndim_is(kOp, "scale_b", sb_in, 2, "[N, K/group_size]");
  TORCH_CHECK_VALUE(sb_in.size(0) == N, "quantkernels.", kOp, ": scale_b must have N = ", N, " rows, got shape ",
                    C::shape_str(sb_in.sizes()));
  const int64_t ng = sb_in.size(1);
  TORCH_CHECK_VALUE(ng > 0 && K % ng == 0, "quantkernels.", kOp, ": scale_b has ", ng,
                    " groups per row, which does not divide K = ", K);
  const int64_t G = K / ng;
  TORCH_CHECK_VALUE(G == 32 || G == 64 || G == 128 || G == 256 || G == K, "quantkernels.", kOp,
                    ": scale_b implies group_size = K / ", ng, " = ", G, "; must be one of (32, 64, 128, 256) or K");
  if (zb_in.has_value()) {
    C::dtype_is(kOp, "zero_b", *zb_in, at::kByte);
    C::shape_is(kOp, "zero_b", *zb_in, sb_in.sizes(), "(the shape of scale_b)");
    C::same_device(kOp, "zero_b", *zb_in, "b_packed", b_in);
    C::zero_points(kOp, "zero_b", *zb_in);
  }
  C::same_device(kOp, "scale_b", sb_in, "b_packed", b_in);
  C::dtype_is(kOp, "scale_a", sa_in, at::kFloat);
  const int64_t sa_shape[1] = {M};
  C::shape_is(kOp, "scale_a", sa_in, sa_shape, "(one per-token scale per row of a)");
  C::same_device(kOp, "scale_a", sa_in, "a", a_in);
  C::same_device(kOp, "scale_b", sb_in, "a", a_in);
  C::k_bound(kOp, G, kMaxGroupW4A8, "group_size");
  C::bias(kOp, bias_in, N, a_in);
  const at::ScalarType dt = C::out_dtype(kOp, out_dtype);
  const Isa isa = active_isa();  // read once, on the calling thread

  at::Tensor y = at::empty({M, N}, a_in.options().dtype(dt));
  if (M == 0 || N == 0) return y;
  const at::Tensor a = a_in.contiguous(), b = b_in.contiguous();
  const at::Tensor sa = sa_in.contiguous(), sb = sb_in.contiguous();
  at::Tensor zb, bias;
  if (zb_in.has_value()) zb = zb_in->contiguous();
  if (bias_in.has_value()) bias = bias_in->to(at::kFloat).contiguous();
  Problem p;
  p.M = M; p.N = N; p.K = K; p.ng = ng; p.G = G;
  p.a = a.data_ptr<int8_t>();
  p.bp = b.data_ptr<uint8_t>();
  p.sa = sa.data_ptr<float>();
  p.sb = sb.data_ptr<float>();
  p.zb = zb.defined() ? zb.data_ptr<uint8_t>() : nullptr;
  p.bias = bias.defined() ? bias.data_ptr<float>() : nullptr;
  p.y = y.data_ptr();
  p.out = dt;
#if QK_X86
  if (isa_has_avx2(isa) && K > 0) {
    const Gv gv = gemv_variant(isa);
    if (gemv_applies(p)) {  // decode: M <= 4, K % 64 == 0, G = 32 or G % 64 == 0
      if (gv == Gv::Vnni512) run_gemv<Gv::Vnni512>(p);
      else if (gv == Gv::Vnni256) run_gemv<Gv::Vnni256>(p);
      else run_gemv<Gv::Avx2>(p);
    } else if (gemv_split_applies(p, gv)) {  // M = 5..8 (zmm: 5..12): the GEMV per 4 rows
      if (gv == Gv::Vnni512) run_gemv_split<Gv::Vnni512>(p);
      else if (gv == Gv::Vnni256) run_gemv_split<Gv::Vnni256>(p);
      else run_gemv_split<Gv::Avx2>(p);
    } else if (panel_applies(p)) {  // M >= 5, G in 32 / 64 / 128 / 256
      if (gv == Gv::Vnni512) run_panel_vnni512(p);
      else if (gv == Gv::Vnni256) run_panel_avx2(p, p.zb ? &panel_groups_vnni256<true> : &panel_groups_vnni256<false>);
      else run_panel_avx2(p, p.zb ? &panel_groups<true> : &panel_groups<false>);
    } else {
      run_avx2(p);  // the AVX2 tiles at every level (G = K with K % 64 != 0, or M >= 5 per-channel)
    }
    return y;
  }
#endif
  (void)isa;
  run_portable(p);
  return y;
}

}  // namespace
}  // namespace cpu
}  // namespace quantkernels

namespace {
// What each op runs per ISA level (quantkernels info).
const bool w4a8_gemm_variant_registered = quantkernels::cpu::register_variant(
    "w4a8_gemm", [](quantkernels::cpu::Isa isa) -> const char* {
      using namespace quantkernels::cpu;
      if (isa_has_vnni512(isa))
        return "avx512_vnni: zmm vpdpbusd nibble panels 32 tokens x 8 rows (M >= 5), 128-k vpdpbusd GEMV (M <= 4, "
               "5..12 chunked); avx2 tiles for G = K at M >= 5 or K % 64 != 0";
      if (isa_has_vnni256(isa))
        return "avx_vnni: ymm vpdpbusd nibble panels (M >= 5), 64-k vpdpbusd GEMV (M <= 4, 5..8 chunked); avx2 tiles "
               "for G = K at M >= 5 or K % 64 != 0";
      return isa_has_avx2(isa) ? "avx2: maddubs nibble panels (M >= 5), hadd-tree GEMV (M <= 4, 5..8 chunked)"
                               : "portable: scalar C++ loops";
    });
}  // namespace

TORCH_LIBRARY_IMPL(quantkernels, CPU, m) {
  m.impl("w4a8_gemm", &quantkernels::cpu::w4a8_gemm_cpu);
}
