// Vector stores of fp32 results cast to the output dtype, for the fused epilogues of the int8 GEMMs
// (gemm_int8.cpp: w8a8; llm_int8.cpp; w4a8.cpp). Bit for bit what the scalar
// static_cast<c10::BFloat16 / c10::Half>(float) of those epilogues gives:
//   bf16: round half to even on the top 16 bits (u + 0x7FFF + lsb) >> 16; every NaN -> 0x7FC0
//   fp16: vcvtps2ph with round to nearest even (overflow -> Inf, fp16 subnormals exact, fp32
//         subnormals -> signed zero, as the scalar conversion); every NaN -> sign | 0x7E00
// The scalar casts cost ~1-2 ns per output in the baseline-x86-64 epilogues: at Gemma-3-270M's
// K = 640 a bf16-output w8a8 GEMM took 1.7x the time of the fp32-output one (M = 128, N = 2048).
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <type_traits>

#include "cpu_isa.h"

#if QK_X86
// The helpers' targets: subsets of every AVX-512 target (QK_TARGET_AVX512*, w4a8.cpp's QK_TARGET_VNNI512) and
// AVX2 + F16C target, so that they inline into any kernel of their width; no "fma", so no product
// here can be contracted into an FMA.
#define QK_STORE_AVX512 __attribute__((target("avx2,f16c,avx512f,avx512bw,avx512vl,avx512dq")))
#define QK_STORE_AVX2 __attribute__((target("avx2,f16c")))

namespace quantkernels {
namespace cpu {
namespace store {

// The 16-bit patterns of 16 / 8 floats (in the low 16 bits of each 32-bit lane).
QK_STORE_AVX512 inline __m512i bf16_bits16(__m512 v) {
  const __m512i u = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  const __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF))), 16);
  return _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7FC0));
}

QK_STORE_AVX2 inline __m256i bf16_bits8(__m256 v) {
  const __m256i u = _mm256_castps_si256(v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  const __m256i r = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF))), 16);
  const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
  return _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7FC0), nan);
}

// fp16 words of 16 floats (16-bit lanes), NaNs made sign | 0x7E00.
QK_STORE_AVX512 inline __m256i f16_words16(__m512 v) {
  const __m256i h = _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
  if (nan == 0) return h;
  const __m256i q = _mm256_or_si256(_mm256_and_si256(h, _mm256_set1_epi16(int16_t(0x8000))), _mm256_set1_epi16(0x7E00));
  return _mm256_mask_mov_epi16(h, nan, q);
}

QK_STORE_AVX2 inline __m128i f16_words8(__m256 v) {
  const __m128i h = _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m256 nanv = _mm256_cmp_ps(v, v, _CMP_UNORD_Q);
  if (_mm256_movemask_ps(nanv) == 0) return h;
  const __m128i n16 = _mm_packs_epi32(_mm256_castsi256_si128(_mm256_castps_si256(nanv)),
                                      _mm256_extracti128_si256(_mm256_castps_si256(nanv), 1));  // 0 / -1 words
  const __m128i q = _mm_or_si128(_mm_and_si128(h, _mm_set1_epi16(int16_t(0x8000))), _mm_set1_epi16(0x7E00));
  return _mm_blendv_epi8(h, q, n16);
}

// y[0 .. 15] (lanes of m only) = cast(v).
template <typename out_t>
QK_STORE_AVX512 inline void store16(out_t* y, __mmask16 m, __m512 v) {
  if constexpr (std::is_same<out_t, float>::value) {
    _mm512_mask_storeu_ps(y, m, v);
  } else if constexpr (std::is_same<out_t, c10::BFloat16>::value) {
    _mm256_mask_storeu_epi16(y, m, _mm512_cvtepi32_epi16(bf16_bits16(v)));
  } else {
    static_assert(std::is_same<out_t, c10::Half>::value, "float, c10::BFloat16 or c10::Half");
    _mm256_mask_storeu_epi16(y, m, f16_words16(v));
  }
}

// y[0 .. 7] = cast(v) (all 8 lanes; AVX-512 VL/BW encodings of the same conversions).
template <typename out_t>
QK_STORE_AVX512 inline void store8_vl(out_t* y, __m256 v) {
  if constexpr (std::is_same<out_t, float>::value) {
    _mm256_storeu_ps(y, v);
  } else {
    store16<out_t>(y, __mmask16(0xFF), _mm512_zextps256_ps512(v));
  }
}

// y[0 .. 7] = cast(v), AVX2 (+F16C).
template <typename out_t>
QK_STORE_AVX2 inline void store8(out_t* y, __m256 v) {
  if constexpr (std::is_same<out_t, float>::value) {
    _mm256_storeu_ps(y, v);
  } else if constexpr (std::is_same<out_t, c10::BFloat16>::value) {
    const __m256i b = bf16_bits8(v);  // values <= 0xFFFF: packus is exact
    const __m128i w = _mm_packus_epi32(_mm256_castsi256_si128(b), _mm256_extracti128_si256(b, 1));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(y), w);
  } else {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(y), f16_words8(v));
  }
}

// mul / add rounded separately (explicit rounding mode: GCC never contracts these into an FMA, even
// inlined into an FMA-enabled kernel).
QK_STORE_AVX512 inline __m512 mul_rn(__m512 a, __m512 b) {
  return _mm512_mul_round_ps(a, b, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
}
QK_STORE_AVX512 inline __m512 add_rn(__m512 a, __m512 b) {
  return _mm512_add_round_ps(a, b, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
}

// One output row of the W8A8 epilogue: y[j] = cast(((float(c[j]) * s) * sb[j]) (+ bias[j])), j < n,
// every product and sum rounded separately, as the reference and the scalar epilogues.
template <typename out_t>
QK_STORE_AVX512 void scale_row_avx512(const int32_t* c, int64_t n, float s, const float* sb, const float* bias,
                                       out_t* y) {
  const __m512 sv = _mm512_set1_ps(s);
  for (int64_t j = 0; j < n; j += 16) {
    const __mmask16 m = n - j >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (n - j)) - 1);
    __m512 v = mul_rn(_mm512_cvtepi32_ps(_mm512_maskz_loadu_epi32(m, c + j)), sv);
    v = mul_rn(v, _mm512_maskz_loadu_ps(m, sb + j));
    if (bias != nullptr) v = add_rn(v, _mm512_maskz_loadu_ps(m, bias + j));
    store16<out_t>(y + j, m, v);
  }
}

// The same on AVX2 (8 lanes, a scalar tail); the target has no FMA, and the empty asm keeps each
// product rounded even if this is ever inlined into a caller that has one.
template <typename out_t>
QK_STORE_AVX2 void scale_row_avx2(const int32_t* c, int64_t n, float s,
                                                                    const float* sb, const float* bias, out_t* y) {
  const __m256 sv = _mm256_set1_ps(s);
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    __m256 v = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(c + j))), sv);
    __asm__("" : "+x"(v));
    v = _mm256_mul_ps(v, _mm256_loadu_ps(sb + j));
    __asm__("" : "+x"(v));
    if (bias != nullptr) v = _mm256_add_ps(v, _mm256_loadu_ps(bias + j));
    store8<out_t>(y + j, v);
  }
  for (; j < n; ++j) {
    float v = static_cast<float>(c[j]) * s;
    __asm__("" : "+x"(v));
    v = v * sb[j];
    __asm__("" : "+x"(v));
    if (bias != nullptr) v = v + bias[j];
    y[j] = static_cast<out_t>(v);
  }
}

}  // namespace store
}  // namespace cpu
}  // namespace quantkernels
#undef QK_STORE_AVX512
#undef QK_STORE_AVX2
#endif  // QK_X86
