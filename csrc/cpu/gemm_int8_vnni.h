// The VNNI inner-product tile shared by the int8 GEMM (gemm_int8.cpp) and the decode GEMV
// (gemv_int8.cpp): AVX-512 VNNI (zmm, EVEX vpdpbusd) and AVX-VNNI (ymm, VEX vpdpbusd).
//
//   C[t * ldc + r] += sum_{k < kc} A[t * lda + k] * (W[r * ldw + k] + 128)   (mod 2^32)
//   for r < R weight rows and t < T activation rows (zmm: 4 x 6 at most, ymm: 2 x 4)
//
// W and A are read straight from their plain rows (no packing): per 64-byte (zmm) / 32-byte (ymm)
// step, R weight loads, each xor'ed with 0x80 (w ^ 0x80 = w + 128 read as u8: vpdpbusd's first
// operand is unsigned), T activation loads (s8), R * T vpdpbusd; one horizontal reduction per
// call. The caller starts C from -128 * rowsum(a[t]) (int8_row_sums), which makes the result
// exact for every int8 input, -128 included: vpdpbusd adds without saturation (mod 2^32),
// sum a * (w + 128) - 128 * sum a = sum a * w (mod 2^32), and the true result fits int32
// (|sum a * w| <= 128 * 128 * K < 2^31 for K <= 131071), so the wrapped value IS the result
// even where intermediate sums (up to 128 * 255 * K) left int32. Scalar adds here are in uint32.
// K tail: zmm masks both loads (zero past kc: (0 ^ 0x80) * 0 = 0); ymm copies the tail to
// zero-padded stack buffers. PF: prefetch W + pf_ahead into L2 (prefetcht1), one line per weight row
// and 64-byte step; callers pass whole tiles >= kPfBytes ahead (pf_ahead_bytes below).
//
// Prefetch into L2, not L1: with prefetcht0 one tile (16 KB) ahead, the line-fill buffers of L1
// capped the decode GEMV at ~22-29 GB/s from DRAM (4096 x 4096, M = 1, 2 threads, weights rotating
// over 96 MiB); prefetcht1 >= 32 KB ahead: 1.23-1.28x faster (4096 x 4096 / 4096 x 11008), M = 8 /
// 16 GEMM from DRAM 1.16x / 1.06-1.10x, M = 128 1.02-1.03x; 16, 32 and 64 KB within noise
// (one process, interleaved, 2026-12-07). The W4A8 GEMVs (w4a8.cpp) found the same.
//
// The accumulators are named variables (c<r><t>) under if constexpr, not an array: GCC 12 kept
// a 4 x 6 __m512i array on the stack (a store per vpdpbusd). With that and the asm vpdpbusd
// below, 4 x 6 ran at ~375 G multiply-adds/s on one Zen5 core (bench/vnni_int8_micro.cpp, K
// block 2048, thread CPU time), against ~360 for 4 x 5, ~333 for 4 x 4, ~290 for 3 x 6.
#pragma once

#include <cstdint>
#include <cstring>

#include "cpu_isa.h"

#if QK_X86
namespace quantkernels {
namespace cpu {
namespace vnni {

constexpr int kMaxR = 4, kMaxT = 6;   // the zmm tile (24 accumulators of 32 zmm)
constexpr int kMaxRY = 2, kMaxTY = 4; // the ymm tile (8 accumulators of 16 ymm)

// The prefetch distance: whole tiles (tile_bytes apart in W), at least kPfBytes.
constexpr int64_t kPfBytes = 32 * 1024;
inline int64_t pf_ahead_bytes(int64_t tile_bytes) {
  return tile_bytes <= 0 ? 0 : (kPfBytes + tile_bytes - 1) / tile_bytes * tile_bytes;
}

// vpdpbusd as inline asm: with the intrinsics GCC 12 copied every accumulator to another register
// and back around each vpdpbusd (and spilled two), ~1.5x slower (bench/vnni_int8_micro.cpp);
// "+v" / "+x" ties the accumulator to the destination. {vex}: the AVX-VNNI encoding (ymm0-15).
QK_TARGET_AVX512VNNI inline __m512i dp512(__m512i acc, __m512i u8, __m512i s8) {
  __asm__("vpdpbusd %2, %1, %0" : "+v"(acc) : "v"(u8), "v"(s8));
  return acc;
}
QK_TARGET_AVXVNNI inline __m256i dp256(__m256i acc, __m256i u8, __m256i s8) {
  __asm__("%{vex%} vpdpbusd %2, %1, %0" : "+x"(acc) : "x"(u8), "x"(s8));
  return acc;
}

QK_TARGET_AVX512VNNI inline __m128i hsum4_512(__m512i v0, __m512i v1, __m512i v2, __m512i v3) {
  const __m512i t0 = _mm512_add_epi32(_mm512_unpacklo_epi32(v0, v1), _mm512_unpackhi_epi32(v0, v1));
  const __m512i t1 = _mm512_add_epi32(_mm512_unpacklo_epi32(v2, v3), _mm512_unpackhi_epi32(v2, v3));
  const __m512i u = _mm512_add_epi32(_mm512_unpacklo_epi64(t0, t1), _mm512_unpackhi_epi64(t0, t1));
  const __m256i h = _mm256_add_epi32(_mm512_castsi512_si256(u), _mm512_extracti64x4_epi64(u, 1));
  return _mm_add_epi32(_mm256_castsi256_si128(h), _mm256_extracti128_si256(h, 1));
}

QK_TARGET_AVXVNNI inline __m128i hsum4_256(__m256i v0, __m256i v1, __m256i v2, __m256i v3) {
  const __m256i t0 = _mm256_add_epi32(_mm256_unpacklo_epi32(v0, v1), _mm256_unpackhi_epi32(v0, v1));
  const __m256i t1 = _mm256_add_epi32(_mm256_unpacklo_epi32(v2, v3), _mm256_unpackhi_epi32(v2, v3));
  const __m256i u = _mm256_add_epi32(_mm256_unpacklo_epi64(t0, t1), _mm256_unpackhi_epi64(t0, t1));
  return _mm_add_epi32(_mm256_castsi256_si128(u), _mm256_extracti128_si256(u, 1));
}

// C[t * ldc + r] += s[r] for r < R (uint32 wrap-around).
template <int R>
inline void add_row(int32_t* c, __m128i s) {
  alignas(16) int32_t v[4];
  _mm_store_si128(reinterpret_cast<__m128i*>(v), s);
  for (int r = 0; r < R; ++r) c[r] = int32_t(uint32_t(c[r]) + uint32_t(v[r]));
}

#define QK_VNNI_DECL(V, r) V c##r##0 = z, c##r##1 = z, c##r##2 = z, c##r##3 = z, c##r##4 = z, c##r##5 = z;
#define QK_VNNI_TOK(V, DP, LOAD, t)                      \
  if constexpr (T > t) {                                 \
    const V a = LOAD(A + t * lda + k);                   \
    if constexpr (R > 0) c0##t = DP(c0##t, w0, a);       \
    if constexpr (R > 1) c1##t = DP(c1##t, w1, a);       \
    if constexpr (R > 2) c2##t = DP(c2##t, w2, a);       \
    if constexpr (R > 3) c3##t = DP(c3##t, w3, a);       \
  }
#define QK_VNNI_STEP(V, DP, XOR, LOAD)                                            \
  {                                                                               \
    const V w0 = XOR(LOAD(W + k), x80);                                           \
    const V w1 = R > 1 ? XOR(LOAD(W + (R > 1 ? 1 : 0) * ldw + k), x80) : z;       \
    const V w2 = R > 2 ? XOR(LOAD(W + (R > 2 ? 2 : 0) * ldw + k), x80) : z;       \
    const V w3 = R > 3 ? XOR(LOAD(W + (R > 3 ? 3 : 0) * ldw + k), x80) : z;       \
    QK_VNNI_TOK(V, DP, LOAD, 0)                                                   \
    QK_VNNI_TOK(V, DP, LOAD, 1) QK_VNNI_TOK(V, DP, LOAD, 2) QK_VNNI_TOK(V, DP, LOAD, 3) \
    QK_VNNI_TOK(V, DP, LOAD, 4) QK_VNNI_TOK(V, DP, LOAD, 5)                             \
  }
#define QK_VNNI_OUT(HSUM, t)                                                              \
  if constexpr (T > t) {                                                                  \
    const __m128i s = HSUM(c0##t, c1##t, c2##t, c3##t);                                   \
    int32_t* c = C + t * ldc;                                                             \
    if constexpr (R == 4) {                                                               \
      _mm_storeu_si128(reinterpret_cast<__m128i*>(c),                                     \
                       _mm_add_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(c)), s)); \
    } else {                                                                              \
      add_row<R>(c, s);                                                                   \
    }                                                                                     \
  }

#define QK_LD512(p) _mm512_loadu_si512(p)
#define QK_LDM512(p) _mm512_maskz_loadu_epi8(m, p)
#define QK_LD256(p) _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))

template <int R, int T, bool PF>
QK_TARGET_AVX512VNNI void tile512(const int8_t* W, int64_t ldw, const int8_t* A, int64_t lda, int64_t kc, int32_t* C,
                                  int64_t ldc, int64_t pf_ahead) {
  const __m512i z = _mm512_setzero_si512();
  const __m512i x80 = _mm512_set1_epi8(int8_t(0x80));
  QK_VNNI_DECL(__m512i, 0) QK_VNNI_DECL(__m512i, 1) QK_VNNI_DECL(__m512i, 2) QK_VNNI_DECL(__m512i, 3)
  int64_t k = 0;
  for (; k + 64 <= kc; k += 64) {
    if constexpr (PF) {
#pragma GCC unroll 4
      for (int r = 0; r < R; ++r) _mm_prefetch(reinterpret_cast<const char*>(W + r * ldw + k + pf_ahead), _MM_HINT_T1);
    }
    QK_VNNI_STEP(__m512i, dp512, _mm512_xor_si512, QK_LD512)
  }
  if (k < kc) {
    const __mmask64 m = _cvtu64_mask64((~uint64_t(0)) >> (64 - (kc - k)));
    QK_VNNI_STEP(__m512i, dp512, _mm512_xor_si512, QK_LDM512)
  }
  QK_VNNI_OUT(hsum4_512, 0) QK_VNNI_OUT(hsum4_512, 1) QK_VNNI_OUT(hsum4_512, 2) QK_VNNI_OUT(hsum4_512, 3)
  QK_VNNI_OUT(hsum4_512, 4) QK_VNNI_OUT(hsum4_512, 5)
}

template <int R, int T, bool PF>
QK_TARGET_AVXVNNI void tile256(const int8_t* W, int64_t ldw, const int8_t* A, int64_t lda, int64_t kc, int32_t* C,
                               int64_t ldc, int64_t pf_ahead) {
  const __m256i z = _mm256_setzero_si256();
  const __m256i x80 = _mm256_set1_epi8(int8_t(0x80));
  QK_VNNI_DECL(__m256i, 0) QK_VNNI_DECL(__m256i, 1) QK_VNNI_DECL(__m256i, 2) QK_VNNI_DECL(__m256i, 3)
  int64_t k = 0;
  for (; k + 32 <= kc; k += 32) {
    if constexpr (PF) {
      if ((k & 63) == 0) {
#pragma GCC unroll 4
        for (int r = 0; r < R; ++r)
          _mm_prefetch(reinterpret_cast<const char*>(W + r * ldw + k + pf_ahead), _MM_HINT_T1);
      }
    }
    QK_VNNI_STEP(__m256i, dp256, _mm256_xor_si256, QK_LD256)
  }
  if (k < kc) {  // < 32 bytes left: zero-padded copies (no opmasks in AVX-VNNI)
    alignas(32) int8_t wb[kMaxR][32] = {}, ab[kMaxT][32] = {};
    for (int r = 0; r < R; ++r) std::memcpy(wb[r], W + r * ldw + k, size_t(kc - k));
    for (int t = 0; t < T; ++t) std::memcpy(ab[t], A + t * lda + k, size_t(kc - k));
    {
      const int8_t* W = &wb[0][0];
      const int8_t* A = &ab[0][0];
      const int64_t ldw = 32, lda = 32;
      const int64_t k = 0;
      QK_VNNI_STEP(__m256i, dp256, _mm256_xor_si256, QK_LD256)
    }
  }
  QK_VNNI_OUT(hsum4_256, 0) QK_VNNI_OUT(hsum4_256, 1) QK_VNNI_OUT(hsum4_256, 2) QK_VNNI_OUT(hsum4_256, 3)
}

#undef QK_VNNI_DECL
#undef QK_VNNI_TOK
#undef QK_VNNI_STEP
#undef QK_VNNI_OUT
#undef QK_LD512
#undef QK_LDM512
#undef QK_LD256

using TileFn = void (*)(const int8_t*, int64_t, const int8_t*, int64_t, int64_t, int32_t*, int64_t, int64_t);

// fn[r - 1][t - 1] for every tail shape r <= kMaxR, t <= kMaxT, zmm or ymm.
// R, T: the largest tile of the ISA (zmm 4 x 6, ymm 2 x 4).
struct TileTable {
  int R = 0, T = 0;
  TileFn fn[kMaxR][kMaxT] = {};
};

template <bool PF, int r = kMaxR, int t = kMaxT>
void fill_table(TileTable& tb, bool zmm) {
  if constexpr (r >= 1 && t >= 1) {
    if (zmm) tb.fn[r - 1][t - 1] = &tile512<r, t, PF>;
    if constexpr (r <= kMaxRY && t <= kMaxTY) {
      if (!zmm) tb.fn[r - 1][t - 1] = &tile256<r, t, PF>;
    }
    fill_table<PF, r, t - 1>(tb, zmm);
  } else if constexpr (r >= 2) {
    fill_table<PF, r - 1, kMaxT>(tb, zmm);
  }
}

template <bool PF>
inline TileTable make_table(bool zmm) {
  TileTable tb;
  tb.R = zmm ? kMaxR : kMaxRY;
  tb.T = zmm ? kMaxT : kMaxTY;
  fill_table<PF>(tb, zmm);
  return tb;
}

}  // namespace vnni
}  // namespace cpu
}  // namespace quantkernels
#endif
