// The vdpbf16ps micro tile shared by the bf16-x tiled paths: weight_only.cpp (w8a16 / w4a16, tiled512)
// and gemm_4bit.cpp (NF4 / FP4, M > 8). Both keep M in the vector lanes: x packed per 16 rows as bf16
// pairs [U][16] (unit u of the 16 rows in the lanes), the decoded weight rows as bf16 pairs KCU units
// apart, one weight pair broadcast per row and unit, C kept transposed (c[r * ldc + lane]); no horizontal
// sums. Each output is one fp32 chain over the units in order (the first call of a K block sequence
// starts from zero), so results do not depend on the tiling of N or the thread count.
#pragma once

#include <cstdint>

#include "cpu_isa.h"

#if QK_X86
#include <immintrin.h>

namespace quantkernels {
namespace cpu {
namespace bf16_tiles {

// 16 * MZ rows of x (MZ zmm loads, xs units apart) x NR weight rows (broadcasts) per pair unit,
// MZ * NR accumulators; the decoded weight rows are KCU units apart.
template <int MZ, int NR, int KCU>
QK_TARGET_AVX512BF16 void micro_bf16(const uint32_t* xa, int64_t xs, const uint32_t* wt, int64_t uc, float* c,
                                     int64_t ldc, bool first) {
  __m512 acc[NR][MZ];
  for (int r = 0; r < NR; ++r)
    for (int z = 0; z < MZ; ++z) acc[r][z] = first ? _mm512_setzero_ps() : _mm512_loadu_ps(c + r * ldc + 16 * z);
  for (int64_t u = 0; u < uc; ++u) {
    __m512i xv[MZ];
    for (int z = 0; z < MZ; ++z) xv[z] = _mm512_loadu_si512(xa + z * xs + u * 16);
#pragma GCC unroll 12
    for (int r = 0; r < NR; ++r) {
      const __m512i wv = _mm512_set1_epi32(static_cast<int>(wt[r * KCU + u]));
      for (int z = 0; z < MZ; ++z) acc[r][z] = _mm512_dpbf16_ps(acc[r][z], (__m512bh)xv[z], (__m512bh)wv);
    }
  }
  for (int r = 0; r < NR; ++r)
    for (int z = 0; z < MZ; ++z) _mm512_storeu_ps(c + r * ldc + 16 * z, acc[r][z]);
}

using MicroFn = void (*)(const uint32_t*, int64_t, const uint32_t*, int64_t, float*, int64_t, bool);

// The tile for the rows of x left from m0 (Mp - m0, a multiple of 16): 4 x 6 (64 rows of x x 6 weight
// rows: 24 accumulators, 10 loads per 24 vdpbf16ps), the last 48 / 32 / 16 rows 3 x 8, 2 x 12, 1 x 12.
// Weight rows come in whole multiples of 24 (the lcm of the tile rows).
struct Tile {
  MicroFn fn;
  int64_t rows, nr;  // rows of x (16 * MZ), weight rows
};

template <int KCU>
inline Tile tile_for(int64_t left) {
  if (left >= 64) return Tile{&micro_bf16<4, 6, KCU>, 64, 6};
  if (left == 48) return Tile{&micro_bf16<3, 8, KCU>, 48, 8};
  if (left >= 32) return Tile{&micro_bf16<2, 12, KCU>, 32, 12};
  return Tile{&micro_bf16<1, 12, KCU>, 16, 12};
}

// In-register 16 x 16 transpose of 32-bit lanes: afterwards r[i] lane j = (before) r[j] lane i.
QK_TARGET_AVX512 inline void transpose16x16(__m512 r[16]) {
  __m512 t[16];
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 4; ++i) {  // r[4i + k], 128-bit lane L: column 4L + k of rows 4i .. 4i + 3
    r[4 * i + 0] = _mm512_shuffle_ps(t[4 * i], t[4 * i + 2], 0x44);
    r[4 * i + 1] = _mm512_shuffle_ps(t[4 * i], t[4 * i + 2], 0xEE);
    r[4 * i + 2] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0x44);
    r[4 * i + 3] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0xEE);
  }
  for (int k = 0; k < 4; ++k) {
    const __m512 v0 = _mm512_shuffle_f32x4(r[k], r[4 + k], 0x88), w0 = _mm512_shuffle_f32x4(r[k], r[4 + k], 0xDD);
    const __m512 v1 = _mm512_shuffle_f32x4(r[8 + k], r[12 + k], 0x88);
    const __m512 w1 = _mm512_shuffle_f32x4(r[8 + k], r[12 + k], 0xDD);
    t[k] = _mm512_shuffle_f32x4(v0, v1, 0x88);
    t[4 + k] = _mm512_shuffle_f32x4(w0, w1, 0x88);
    t[8 + k] = _mm512_shuffle_f32x4(v0, v1, 0xDD);
    t[12 + k] = _mm512_shuffle_f32x4(w0, w1, 0xDD);
  }
  for (int i = 0; i < 16; ++i) r[i] = t[i];
}

}  // namespace bf16_tiles
}  // namespace cpu
}  // namespace quantkernels
#endif  // QK_X86
