// CPU kernels for quantkernels::int8_gemm and quantkernels::w8a8_gemm (plain layout).
//
//   int8_gemm:  C[m, n] = sum_k a[m, k] * b[n, k]                  int8 x int8 -> int32, exact
//   w8a8_gemm:  Y[m, n] = C[m, n] * scale_a[m] * scale_b[n] + bias[n]   fp32 epilogue, then cast
//
// a is int8 [M, K] (activations), b is int8 [N, K] (weights, F.linear layout, plain row-major).
// M <= 4 goes to gemv_int8.cpp. Per ISA level (cpu_isa.h; QUANTKERNELS_CPU_ISA, read per call):
// - avx512_vnni / avx512_bf16: the VNNI path (below, gemm_driver_vnni; tile in gemm_int8_vnni.h):
//   zmm vpdpbusd, 4 weight rows x 6 tokens straight from the plain rows, weight offset +128
//   in-register, sums started from -128 * rowsum(a). Exact for every int8 input, -128 included.
//   Why: vpdpbusd does 64 multiply-adds in one instruction where AVX2 needs maddubs + madd + add
//   (+ sign / abs), and fbgemm (torch.ao quantize_dynamic) uses VNNI: issue 14.
// - avx_vnni: the same path on ymm with the VEX vpdpbusd (2 x 4 tiles, 16 ymm registers).
// - avx2 / avx512 (no VNNI): the AVX2 panel path (gemm_driver_panel), or the widened path when
//   a holds -128 (both as before issue 14).
// - portable: the widened path with plain C++ micro-kernels.
// The AVX2 paths:
// - AVX2 "panel" path (below, gemm_driver_panel): weight rows broadcast, activations packed per
//   call into 16-token panels, u8 x s8 _mm256_maddubs_epi16 with the sign moved onto a
//   (sign(a, w) * |w|), exact because the packer checks that a holds no -128 (every quantizer's
//   output is in [-127, 127]); see the comment above panel_micro for the bound and the cost.
// - the widened path: a widened to int16 once per call, b rows sign-extended in registers,
//   _mm256_madd_epi16 (|2 * 128 * 128| = 32768 fits in int32). Used by the portable ISA (plain
//   C++ micro-kernels) and, on AVX2, when a holds -128 (only the raw int8_gemm op can see that).
//   Micro-kernel MR = 2 rows of a x NR = 4 rows of b, K in steps of 16, one horizontal reduction
//   per K block; cache blocks KC = 4096, MC = 128, NC = 96.
// K <= 131071 keeps every int32 result in range (128 * 128 * K < 2^31).
//
// ISA code is compiled per function with the QK_TARGET_* attributes (no -march=native).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "gemm_int8.h"
#include "gemm_int8_vnni.h"
#include "qk_store.h"
#include "gemv_int8.h"

#include "cpu_isa.h"
#include "qk_limits.h"

namespace quantkernels {
namespace cpu {
namespace {

std::string gemm_dtype_name(c10::ScalarType t) { return dtype_name(t); }

constexpr int MR = 2;        // rows of a per micro-kernel
constexpr int NR = 4;        // rows of b per micro-kernel
constexpr int64_t KC = 4096; // K block (multiple of 16)
constexpr int64_t MC = 128;  // M block
constexpr int64_t NC = 96;   // N block (multiple of NR)
constexpr int64_t MAX_K = kMaxKInt8;  // csrc/qk_limits.h

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

#if QK_X86
// The same epilogue on zmm / ymm (qk_store.h: same roundings, casts bit-identical to the scalar ones).
template <typename out_t>
void epilogue_avx512(const int32_t* C, int64_t ldc, int64_t mb, int64_t nb, const float* sa, const float* sb,
                     const float* bias, void* Y, int64_t ldy) {
  for (int64_t i = 0; i < mb; ++i)
    store::scale_row_avx512<out_t>(C + i * ldc, nb, sa[i], sb, bias, static_cast<out_t*>(Y) + i * ldy);
}

template <typename out_t>
void epilogue_avx2(const int32_t* C, int64_t ldc, int64_t mb, int64_t nb, const float* sa, const float* sb,
                   const float* bias, void* Y, int64_t ldy) {
  for (int64_t i = 0; i < mb; ++i)
    store::scale_row_avx2<out_t>(C + i * ldc, nb, sa[i], sb, bias, static_cast<out_t*>(Y) + i * ldy);
}
#endif

template <typename out_t>
EpilogueFn pick_epilogue(Isa isa) {
#if QK_X86
  if (isa_has_avx512(isa)) return &epilogue_avx512<out_t>;
  if (isa_has_avx2(isa)) return &epilogue_avx2<out_t>;
#endif
  (void)isa;
  return &epilogue_erased<out_t>;
}

}  // namespace

EpilogueFn w8a8_epilogue(at::ScalarType out, Isa isa) {
  switch (out) {
    case at::kFloat: return pick_epilogue<float>(isa);
    case at::kHalf: return pick_epilogue<c10::Half>(isa);
    default: return pick_epilogue<c10::BFloat16>(isa);
  }
}

namespace {

// The widened-int16 driver: the portable path, and the AVX2 fallback when a holds -128.
void gemm_driver_widened(const at::Tensor& a, const at::Tensor& b, int64_t M, int64_t N, int64_t K, int32_t* c_out,
                         const Epilogue& ep, bool avx2) {
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

// ------------------------------------------------------------------------------ panel path (AVX2)
// The fast AVX2 path. Roles are swapped relative to a textbook GEMM so that the weight stays in
// the PLAIN layout (no repacked format, no per-call weight copy): for a tile of PR = 4 weight rows
// and up to PT = 16 tokens,
//   acc[r][v] (8 int32 lanes = 8 tokens) += sum over a k-quad of b[n + r, k..k+3] * a[t, k..k+3]
// where the 4 weight bytes of row n + r are broadcast to every 32-bit lane and the activations
// come from a per-call packed panel P[quad][16 tokens][4 bytes] (a is small: M x K).
// Exactness: _mm256_maddubs_epi16(u8, s8) multiplies unsigned by signed bytes and adds adjacent
// pairs into int16 with saturation. We feed u8 = |w| (abs of the broadcast weight, 0..128) and
// s8 = sign(a, w) = a * sgn(w). With a in [-127, 127] (checked while packing: a's -128 cannot be
// negated, so such a call takes the widened path) every pair sum is at most 2 * 128 * 127 = 32512
// < 32767: no saturation, and the product |w| * a * sgn(w) = w * a exactly. _mm256_madd_epi16
// with ones widens each pair sum to int32 (exact). K <= 131071 keeps the int32 sums in range.
// Cost per k-quad and 4 x 16 tile: 2 panel loads, 4 broadcast loads, 4 abs, 8 sign, 8 maddubs,
// 8 madd, 8 add: 256 multiply-adds. Measured alone on one Zen3 core (bench/panel_micro.cpp: 1024
// quads, data in L1/L2, noisy shared machine): ~55-68 G multiply-adds/s; 4 x 16 beat 3, 5 and 6 weight rows (5 and 6 spill on 16 ymm registers).
// Why fbgemm (torch.ao quantize_dynamic) still runs ~15-25% faster per core: its dynamic Linear
// quantizes activations to 7 bits (reduce_range=True: u8 in [0, 127]), so maddubs cannot saturate
// without any sign handling and it spends 3 vector ops per 32 multiply-adds (maddubs, madd, add)
// against our 4 (+ abs per broadcast); Zen3 has no VNNI. Measured alone (bench/panel_micro.cpp): the same loop
// without sign and abs (wrong results) runs at ~70-90 G/s, without the abs only at ~55-76 G/s. docs/numerics.md s.1 fixes
// 8-bit activations in [-127, 127], which this path computes exactly.
// Blocking: KQ = 512 quads (2048 bytes of K: a 4-row weight strip is 8 KB in L1, a 16-token panel
// 32 KB from L2), MT = 128 tokens (8 panels = 256 KB in L2 per K block), NT = 64 weight rows per
// task; tasks (N outer, M inner) go to threads by at::parallel_for.

constexpr int PT = 16;          // tokens per panel
constexpr int PR = 4;           // weight rows per micro-kernel
constexpr int64_t KQ = 512;     // k-quads per K block
constexpr int64_t MT = 128;     // tokens per task (multiple of PT)
constexpr int64_t NT = 64;      // weight rows per task (multiple of PR)

#if QK_X86
// Tile[r][t] = sum over nq quads of W[r * ldw + 4q + j] * P[q * 64 + t * 4 + j], r < mr, t < 8 * NV.
template <int mr, int NV>
QK_TARGET_AVX2 void panel_micro(const int8_t* W, int64_t ldw, const int8_t* P, int64_t nq, int32_t* tile) {
  __m256i acc[mr][NV];
#pragma GCC unroll 4
  for (int r = 0; r < mr; ++r)
#pragma GCC unroll 2
    for (int v = 0; v < NV; ++v) acc[r][v] = _mm256_setzero_si256();
  const __m256i ones = _mm256_set1_epi16(1);
  for (int64_t q = 0; q < nq; ++q) {
    __m256i av[NV];
#pragma GCC unroll 2
    for (int v = 0; v < NV; ++v) av[v] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(P + q * 64 + v * 32));
#pragma GCC unroll 4
    for (int r = 0; r < mr; ++r) {
      int32_t w4;
      std::memcpy(&w4, W + r * ldw + q * 4, 4);
      const __m256i wb = _mm256_set1_epi32(w4);
      const __m256i wa = _mm256_abs_epi8(wb);
#pragma GCC unroll 2
      for (int v = 0; v < NV; ++v) {
        const __m256i p = _mm256_maddubs_epi16(wa, _mm256_sign_epi8(av[v], wb));
        acc[r][v] = _mm256_add_epi32(acc[r][v], _mm256_madd_epi16(p, ones));
      }
    }
  }
#pragma GCC unroll 4
  for (int r = 0; r < mr; ++r)
#pragma GCC unroll 2
    for (int v = 0; v < NV; ++v) _mm256_storeu_si256(reinterpret_cast<__m256i*>(tile + r * PT + v * 8), acc[r][v]);
}

// The full 4 x 16 tile, written out with named accumulators: GCC 12 keeps the array form of the
// template above in registers poorly (it stored accumulators to the stack every iteration,
// ~10% slower); this form compiles to 38 instructions per k-quad and no stack traffic.
#define QK_PANEL_ROW(r, acc0, acc1)                                                  \
  {                                                                                  \
    int32_t w4;                                                                      \
    std::memcpy(&w4, W + (r) * ldw + q * 4, 4);                                      \
    const __m256i wb = _mm256_set1_epi32(w4);                                        \
    const __m256i wa = _mm256_abs_epi8(wb);                                          \
    __m256i s0 = _mm256_sign_epi8(a0, wb);                                           \
    __m256i s1 = _mm256_sign_epi8(a1, wb);                                           \
    s0 = _mm256_madd_epi16(_mm256_maddubs_epi16(wa, s0), ones);                      \
    s1 = _mm256_madd_epi16(_mm256_maddubs_epi16(wa, s1), ones);                      \
    acc0 = _mm256_add_epi32(acc0, s0);                                               \
    acc1 = _mm256_add_epi32(acc1, s1);                                               \
  }
template <>
QK_TARGET_AVX2 void panel_micro<4, 2>(const int8_t* W, int64_t ldw, const int8_t* P, int64_t nq, int32_t* tile) {
  __m256i c00 = _mm256_setzero_si256(), c01 = c00, c10 = c00, c11 = c00, c20 = c00, c21 = c00, c30 = c00,
          c31 = c00;
  const __m256i ones = _mm256_set1_epi16(1);
  for (int64_t q = 0; q < nq; ++q) {
    const __m256i a0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(P + q * 64));
    const __m256i a1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(P + q * 64 + 32));
    QK_PANEL_ROW(0, c00, c01)
    QK_PANEL_ROW(1, c10, c11)
    QK_PANEL_ROW(2, c20, c21)
    QK_PANEL_ROW(3, c30, c31)
  }
  __m256i* t = reinterpret_cast<__m256i*>(tile);
  _mm256_storeu_si256(t + 0, c00); _mm256_storeu_si256(t + 1, c01);
  _mm256_storeu_si256(t + 2, c10); _mm256_storeu_si256(t + 3, c11);
  _mm256_storeu_si256(t + 4, c20); _mm256_storeu_si256(t + 5, c21);
  _mm256_storeu_si256(t + 6, c30); _mm256_storeu_si256(t + 7, c31);
}
#undef QK_PANEL_ROW

using PanelFn = void (*)(const int8_t*, int64_t, const int8_t*, int64_t, int32_t*);

struct PanelTable {
  PanelFn fn[PR][2];  // [mr - 1][NV - 1]
  PanelTable() {
    fn[0][0] = &panel_micro<1, 1>; fn[0][1] = &panel_micro<1, 2>;
    fn[1][0] = &panel_micro<2, 1>; fn[1][1] = &panel_micro<2, 2>;
    fn[2][0] = &panel_micro<3, 1>; fn[2][1] = &panel_micro<3, 2>;
    fn[3][0] = &panel_micro<4, 1>; fn[3][1] = &panel_micro<4, 2>;
  }
};
static_assert(PR == 4, "update PanelTable");

// Packs a [M, K] into panels [ceil(M / 16)][nq][16][4] (zero padding for the token and K tails).
// Returns false (and the caller takes the widened path) if a holds -128.
bool pack_panels(const int8_t* a, int64_t M, int64_t K, int64_t nq, int8_t* P) {
  const int64_t panels = (M + PT - 1) / PT;
  std::atomic<bool> has_min{false};
  at::parallel_for(0, panels, 1, [&](int64_t p0, int64_t p1) {
    bool found = false;
    for (int64_t p = p0; p < p1; ++p) {
      int8_t* dst = P + p * nq * PT * 4;
      std::memset(dst, 0, size_t(nq * PT * 4));
      const int64_t t1 = std::min<int64_t>(PT, M - p * PT);
      for (int64_t t = 0; t < t1; ++t) {
        const int8_t* src = a + (p * PT + t) * K;
        int64_t k = 0;
        for (; k + 4 <= K; k += 4) {
          int32_t v;
          std::memcpy(&v, src + k, 4);
          std::memcpy(dst + (k / 4) * PT * 4 + t * 4, &v, 4);
          // a byte equal to 0x80 (-128): (v ^ 0x80808080) has a zero byte there
          const uint32_t x = uint32_t(v) ^ 0x80808080u;
          found |= ((x - 0x01010101u) & ~x & 0x80808080u) != 0;
        }
        for (; k < K; ++k) {
          dst[(k / 4) * PT * 4 + t * 4 + (k % 4)] = src[k];
          found |= src[k] == -128;
        }
      }
    }
    if (found) has_min.store(true, std::memory_order_relaxed);
  });
  return !has_min.load();
}

void gemm_driver_panel(const int8_t* Pk, const at::Tensor& b, int64_t M, int64_t N, int64_t K, int32_t* c_out,
                       const Epilogue& ep) {
  const int64_t nq = (K + 3) / 4;   // quads in the panel (K tail zero-padded)
  const int64_t nq_full = K / 4;    // quads that can be read straight from b's rows
  const int8_t* B = b.data_ptr<int8_t>();
  // b's K tail (K % 4 bytes per row) zero-padded to one quad per row: [N][4].
  std::vector<int8_t> btail;
  if (nq != nq_full) {
    btail.assign(size_t(N * 4), 0);
    for (int64_t n = 0; n < N; ++n)
      for (int64_t k = nq_full * 4; k < K; ++k) btail[size_t(n * 4 + (k - nq_full * 4))] = B[n * K + k];
  }
  const PanelTable table;
  const int64_t n_blocks = (N + NT - 1) / NT;
  const int64_t m_blocks = (M + MT - 1) / MT;
  const bool fused = ep.fn != nullptr || ep.block_fn != nullptr;
  at::parallel_for(0, n_blocks * m_blocks, 1, [&](int64_t t0, int64_t t1) {
    std::vector<int32_t> cbuf(fused ? size_t(MT * NT) : size_t(0));
    alignas(32) int32_t tile[PR * PT];
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t nbk = t / m_blocks, mbk = t % m_blocks;
      const int64_t n0 = nbk * NT, nb = std::min(NT, N - n0);
      const int64_t m0 = mbk * MT, mb = std::min(MT, M - m0);
      int32_t* C;
      int64_t ldc;
      if (fused) {
        C = cbuf.data();
        ldc = NT;
      } else {
        C = c_out + m0 * N + n0;
        ldc = N;
      }
      for (int64_t i = 0; i < mb; ++i) std::fill(C + i * ldc, C + i * ldc + nb, 0);
      for (int64_t q0 = 0; q0 < nq; q0 += KQ) {
        const int64_t q1 = std::min(nq, q0 + KQ);
        const int64_t qf = std::min(q1, nq_full);  // quads [q0, qf) from b, [qf, q1) from btail
        for (int64_t j = 0; j < nb; j += PR) {
          const int mr = int(std::min<int64_t>(PR, nb - j));
          for (int64_t i = 0; i < mb; i += PT) {
            const int64_t tb = std::min<int64_t>(PT, mb - i);
            const int nv = tb > 8 ? 2 : 1;
            const int8_t* Pp = Pk + ((m0 + i) / PT) * nq * PT * 4;
            if (qf > q0) {
              table.fn[mr - 1][nv - 1](B + (n0 + j) * K + q0 * 4, K, Pp + q0 * PT * 4, qf - q0, tile);
            } else {
              std::memset(tile, 0, sizeof(tile));
            }
            if (q1 > qf) {  // the zero-padded K tail quad (at most one, in the last K block)
              alignas(32) int32_t tail[PR * PT];
              table.fn[mr - 1][nv - 1](btail.data() + (n0 + j) * 4, 4, Pp + qf * PT * 4, q1 - qf, tail);
              // only the lanes the kernel wrote (r < mr, u < tb): the rest of tile and tail is
              // uninitialized, and adding it was a signed overflow (UBSan, make sanitize)
              for (int r = 0; r < mr; ++r)
                for (int64_t u = 0; u < tb; ++u) tile[r * PT + u] += tail[r * PT + u];
            }
            for (int r = 0; r < mr; ++r)
              for (int64_t u = 0; u < tb; ++u) C[(i + u) * ldc + j + r] += tile[r * PT + u];
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
#endif

// ------------------------------------------------------------------------------ VNNI path
// AVX-512 VNNI (zmm) and AVX-VNNI (ymm, VEX): the inner-product tiles of gemm_int8_vnni.h over the
// PLAIN layouts, nothing packed: 4 weight rows x 6 tokens per tile (ymm: 2 x 4), 64 (32) bytes of K per step
// straight from the rows, weight offset in-register (w ^ 0x80 = w + 128 as u8) with s8
// activations, one horizontal reduction per tile and K block. Formulation (b) of issue 14: the
// int32 sums start from -128 * rowsum(a[m]) (M * K once per call); (a) (u8 activations) would
// need the weight row sums, a pass over N * K bytes per call or a second vpdpbusd per weight
// load. Exact for every int8 input: see gemm_int8_vnni.h.
// Blocking: KV = 4096 bytes of K per tile call (the 4-row weight strip, 16 KB, stays in L1 while
// the task's tokens stream from L2), tasks of NV = 64 weight rows x MV = 96 tokens (N outer, M
// inner) split over threads by at::parallel_for. Measured in the op (int8_gemm, one thread, thread
// CPU time, 4096 x 4096 at M = 128 / 4096 x 11008 at M = 512): KV 4096 5.85 / 60.9 ms against
// 6.31 / 63.1 for 2048, 7.2 / 69.0 for 1024, 5.88 / 61.2 for 8192; NV 32 or 128 and MV 48 or
// 192 within noise; without the next-strip prefetch M = 16 took 1.33 ms against 1.10.

constexpr int64_t KV = 4096;        // K block of the VNNI path (bytes; multiple of 64)
constexpr int64_t NV = 64;          // weight rows per task (multiple of vnni::kMaxR)
constexpr int64_t MV = 96;          // tokens per task (multiple of vnni::kMaxT)

}  // namespace

// sum_k a[m, k] for every row (exact in int32: |sum| <= 128 * K < 2^24).
void int8_row_sums(const int8_t* a, int64_t M, int64_t K, int32_t* out) {
  at::parallel_for(0, M, std::max<int64_t>(1, (int64_t(1) << 16) / std::max<int64_t>(K, 1)),
                   [&](int64_t m0, int64_t m1) {
                     for (int64_t m = m0; m < m1; ++m) {
                       const int8_t* r = a + m * K;
                       int32_t s = 0;
                       for (int64_t k = 0; k < K; ++k) s += r[k];
                       out[m] = s;
                     }
                   });
}

namespace {

#if QK_X86
void gemm_driver_vnni(const at::Tensor& a, const at::Tensor& b, int64_t M, int64_t N, int64_t K, int32_t* c_out,
                      const Epilogue& ep, bool zmm) {
  // tbp (first token group of each weight strip) also prefetches into L2 the strip >= 32 KB further
  // on (2 strips at K = 4096; same offset): without a prefetch, M = 16 at 4096 x 4096 (weights from
  // L3) ran at half the MAC rate of the same shape with the weights in L2 (one thread, 124 vs 230 G
  // multiply-adds/s); L2 rather than L1 (the next strip): 1.06-1.16x at M = 8-16 from DRAM.
  const vnni::TileTable tb = vnni::make_table<false>(zmm), tbp = vnni::make_table<true>(zmm);
  const int TR = tb.R, TT = tb.T;
  const int64_t pf = vnni::pf_ahead_bytes(TR * K);  // whole strips >= 32 KB ahead, into L2
  const int8_t* A = a.data_ptr<int8_t>();
  const int8_t* B = b.data_ptr<int8_t>();
  std::vector<int32_t> asum(static_cast<size_t>(M));
  int8_row_sums(A, M, K, asum.data());
  const int64_t n_blocks = (N + NV - 1) / NV;
  const int64_t m_blocks = (M + MV - 1) / MV;
  const bool fused = ep.fn != nullptr || ep.block_fn != nullptr;
  at::parallel_for(0, n_blocks * m_blocks, 1, [&](int64_t t0, int64_t t1) {
    std::vector<int32_t> cbuf(fused ? size_t(MV * NV) : size_t(0));
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t nbk = t / m_blocks, mbk = t % m_blocks;
      const int64_t n0 = nbk * NV, nb = std::min(NV, N - n0);
      const int64_t m0 = mbk * MV, mb = std::min(MV, M - m0);
      int32_t* C;
      int64_t ldc;
      if (fused) {
        C = cbuf.data();
        ldc = NV;
      } else {
        C = c_out + m0 * N + n0;
        ldc = N;
      }
      // Start from -128 * rowsum(a[m]) (exact: |.| < 2^31), see the exactness note above.
      for (int64_t i = 0; i < mb; ++i) std::fill(C + i * ldc, C + i * ldc + nb, -128 * asum[size_t(m0 + i)]);
      for (int64_t k0 = 0; k0 < K; k0 += KV) {
        const int64_t kc = std::min(KV, K - k0);
        for (int64_t j = 0; j < nb; j += TR) {
          const int r = int(std::min<int64_t>(TR, nb - j));
          const int8_t* Wt = B + (n0 + j) * K + k0;
          for (int64_t i = 0; i < mb; i += TT) {
            const int tt = int(std::min<int64_t>(TT, mb - i));
            (i == 0 ? tbp : tb).fn[r - 1][tt - 1](Wt, K, A + (m0 + i) * K + k0, K, kc, C + i * ldc + j, ldc, pf);
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
#endif

}  // namespace

// The GEMM over plain a [M, K] (int8) and b [N, K] (int8), declared in gemm_int8.h. If ep.fn is
// null, the int32 result goes to c_out [M, N]; otherwise each finished block goes through ep.fn
// into ep.y. M <= 4: gemv_int8 (gemv_int8.cpp); else AVX2: the panel path (a packed per call),
// or the widened path if a holds -128; portable: the widened path with plain C++ micro-kernels.
void gemm_driver(const at::Tensor& a, const at::Tensor& b, int64_t M, int64_t N, int64_t K, int32_t* c_out,
                 const Epilogue& ep) {
  if (M <= kGemvInt8MaxM) {  // decode: one pass over b for all rows (gemv_int8.cpp)
    gemv_int8(a, b, M, N, K, c_out, ep);
    return;
  }
  const Isa isa = active_isa();  // read on the calling thread, once per call
  const bool avx2 = isa_has_avx2(isa);
#if QK_X86
  if (isa_has_vnni256(isa) && K > 0) {  // exact for every int8 input, -128 included
    gemm_driver_vnni(a, b, M, N, K, c_out, ep, isa_has_vnni512(isa));
    return;
  }
  if (avx2 && K > 0) {
    const int64_t nq = (K + 3) / 4;
    at::Tensor panels = at::empty({(M + PT - 1) / PT * nq * PT * 4}, a.options());
    if (pack_panels(a.data_ptr<int8_t>(), M, K, nq, panels.data_ptr<int8_t>())) {
      gemm_driver_panel(panels.data_ptr<int8_t>(), b, M, N, K, c_out, ep);
      return;
    }
  }
#endif
  gemm_driver_widened(a, b, M, N, K, c_out, ep, avx2);
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
  gemm_driver(a, b, M, N, K, c.data_ptr<int32_t>(), Epilogue{});
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
  ep.fn = w8a8_epilogue(dt, active_isa());
  gemm_driver(a, b, M, N, K, nullptr, ep);
  return y;
}

}  // namespace
}  // namespace cpu
}  // namespace quantkernels

namespace {
// What each op runs per ISA level (quantkernels info).
const bool int8_gemm_variant_registered = quantkernels::cpu::register_variant(
    "int8_gemm", [](quantkernels::cpu::Isa isa) -> const char* {
      using namespace quantkernels::cpu;
      if (isa_has_vnni512(isa))
        return "avx512_vnni: zmm vpdpbusd, 4 x 6 inner-product tiles on the plain layout, weight +128 in-register "
               "(M <= 4: zmm vpdpbusd GEMV)";
      if (isa_has_vnni256(isa))
        return "avx_vnni: ymm VEX vpdpbusd, 2 x 4 inner-product tiles, weight +128 in-register (M <= 4: ymm GEMV)";
      return isa_has_avx2(isa) ? "avx2: 16-token panels, maddubs with the sign on one operand" : "portable: scalar C++ loops";
    });
const bool w8a8_gemm_variant_registered = quantkernels::cpu::register_variant(
    "w8a8_gemm", [](quantkernels::cpu::Isa isa) -> const char* {
      using namespace quantkernels::cpu;
      if (isa_has_vnni512(isa)) return "avx512_vnni: int8 GEMM/GEMV (zmm vpdpbusd) + fp32 epilogue";
      if (isa_has_vnni256(isa)) return "avx_vnni: int8 GEMM/GEMV (ymm VEX vpdpbusd) + fp32 epilogue";
      return isa_has_avx2(isa) ? "avx2: int8 GEMM (maddubs, sign trick) + fp32 epilogue" : "portable: scalar C++ loops";
    });
}  // namespace

TORCH_LIBRARY_IMPL(quantkernels, CPU, m) {
  m.impl("int8_gemm", &quantkernels::cpu::int8_gemm_cpu);
  m.impl("w8a8_gemm", &quantkernels::cpu::w8a8_gemm_cpu);
}
