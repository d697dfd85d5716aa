// quantkernels::quantize_int8_rowwise on CPU: symmetric absmax int8, one scale per row
// (docs/numerics.md section 1), bit-exact with reference.py quantize_int8_rowwise.
//
// Per row r of x viewed as [M, K], all in fp32 (fp16/bf16 inputs are widened first, exactly):
//   absmax = max_k |x[k]|, and NaN if any x[k] is NaN           (torch.amax propagates NaN)
//   absmax == 0: inv = 0,             scale = 1
//   otherwise:   inv = 127 / absmax,  scale = absmax / 127      (true fp32 divisions; so an
//                Inf row has inv = 0, a NaN row inv = NaN, a subnormal absmax may give inv = Inf)
//   q[k] = clamp(rne(x[k] * inv), -127, 127), and 0 where x[k] * inv is NaN
//                                                              (reference: nan_to_num after clamp)
// Consequences: a row with NaN gets q = 0 and scale NaN; a row with +-Inf (no NaN) gets
// q = 0 everywhere (finite * 0 = 0, Inf * 0 = NaN -> 0) and scale Inf.
//
// ISA (cpu_isa.h): avx512 and above run 16-lane zmm loops with masked K tails (and widen fp16 /
// bf16 rows with zmm); avx2 / avx_vnni the 8-lane AVX2 loops; portable plain C++. Every path
// gives the same bits (the rules above are exact per element; the absmax is a max).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <sstream>
#include <string>
#include <tuple>
#include <vector>

#include "cpu_isa.h"
#include "quantize_int8.h"

namespace quantkernels {
namespace cpu {
namespace {

constexpr float kQMax = 127.0f;
// Rows per parallel chunk hold at least this many elements, so small inputs stay on one thread.
constexpr int64_t kGrainElems = 1 << 15;

// ------------------------------------------------------------------ portable (plain C++)

float absmax_portable(const float* x, int64_t K) {
  float m = 0.0f;
  bool nan = false;
  for (int64_t k = 0; k < K; ++k) {
    const float a = std::fabs(x[k]);
    nan |= std::isnan(a);
    m = a > m ? a : m;
  }
  return nan ? std::numeric_limits<float>::quiet_NaN() : m;
}

inline int8_t quant_one(float v, float inv) {
  float p = v * inv;
  p = std::isnan(p) ? 0.0f : p;
  // Clamping before rounding is the same as after (+-127 are integers), and keeps |p| small
  // for the magic-number round half to even below: exact for |p| <= 2^22 in the default
  // rounding mode, and vectorizable with plain SSE2 (std::nearbyint is a libm call there).
  p = std::min(std::max(p, -kQMax), kQMax);
  constexpr float kMagic = 12582912.0f;  // 1.5 * 2^23
  const float r = (p + kMagic) - kMagic;
  return static_cast<int8_t>(r);
}

void quant_row_portable(const float* x, int64_t K, float inv, int8_t* q) {
  for (int64_t k = 0; k < K; ++k) {
    q[k] = quant_one(x[k], inv);
  }
}

// ------------------------------------------------------------------ AVX2

#if QK_X86
QK_TARGET_AVX2 float absmax_avx2(const float* x, int64_t K) {
  const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  __m256 vmax = _mm256_setzero_ps();
  __m256 vnan = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 8 <= K; k += 8) {
    const __m256 a = _mm256_and_ps(_mm256_loadu_ps(x + k), absmask);
    // maxps drops NaN depending on operand order, so NaN is tracked on the side.
    vnan = _mm256_or_ps(vnan, _mm256_cmp_ps(a, a, _CMP_UNORD_Q));
    vmax = _mm256_max_ps(vmax, a);
  }
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, vmax);
  bool nan = _mm256_movemask_ps(vnan) != 0;
  float m = 0.0f;
  for (float v : lanes) {
    m = v > m ? v : m;
  }
  for (; k < K; ++k) {
    const float a = std::fabs(x[k]);
    nan |= std::isnan(a);
    m = a > m ? a : m;
  }
  return nan ? std::numeric_limits<float>::quiet_NaN() : m;
}

QK_TARGET_AVX2 void quant_row_avx2(const float* x, int64_t K, float inv, int8_t* q) {
  const __m256 vinv = _mm256_set1_ps(inv);
  const __m256 lo = _mm256_set1_ps(-kQMax);
  const __m256 hi = _mm256_set1_ps(kQMax);
  int64_t k = 0;
  for (; k + 8 <= K; k += 8) {
    __m256 p = _mm256_mul_ps(_mm256_loadu_ps(x + k), vinv);
    p = _mm256_and_ps(p, _mm256_cmp_ps(p, p, _CMP_ORD_Q));  // NaN -> 0
    __m256 r = _mm256_round_ps(p, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    r = _mm256_min_ps(_mm256_max_ps(r, lo), hi);  // +-Inf -> +-127
    const __m256i i32 = _mm256_cvtps_epi32(r);     // exact: r is an integer in [-127, 127]
    const __m128i i16 = _mm_packs_epi32(_mm256_castsi256_si128(i32), _mm256_extracti128_si256(i32, 1));
    _mm_storel_epi64(reinterpret_cast<__m128i*>(q + k), _mm_packs_epi16(i16, i16));
  }
  for (; k < K; ++k) {
    q[k] = quant_one(x[k], inv);
  }
}

// ------------------------------------------------------------------ AVX-512 (F/BW/VL/DQ)
// 16 lanes, the K tail with opmasks (masked-off lanes load as +0, which changes neither the
// absmax nor the NaN flag), the int8 results stored by vpmovsdb with a mask. Same rules as
// above: NaN tracked on the side, p = x * inv, NaN -> 0, rne (vrndscaleps), clamp to +-127.

QK_TARGET_AVX512 float absmax_avx512(const float* x, int64_t K) {
  __m512 vmax = _mm512_setzero_ps();
  __mmask16 nan = 0;
  int64_t k = 0;
  for (; k + 16 <= K; k += 16) {
    const __m512 a = _mm512_abs_ps(_mm512_loadu_ps(x + k));
    nan |= _mm512_cmp_ps_mask(a, a, _CMP_UNORD_Q);
    vmax = _mm512_max_ps(vmax, a);
  }
  if (k < K) {
    const __mmask16 m = __mmask16((1u << (K - k)) - 1);
    const __m512 a = _mm512_abs_ps(_mm512_maskz_loadu_ps(m, x + k));
    nan |= _mm512_cmp_ps_mask(a, a, _CMP_UNORD_Q);
    vmax = _mm512_max_ps(vmax, a);
  }
  if (nan) return std::numeric_limits<float>::quiet_NaN();
  return _mm512_reduce_max_ps(vmax);
}

QK_TARGET_AVX512 inline __m512i quant16_avx512(__m512 x, __m512 vinv) {
  __m512 p = _mm512_mul_ps(x, vinv);
  p = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(p, p, _CMP_ORD_Q), p);  // NaN -> 0
  __m512 r = _mm512_roundscale_ps(p, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  r = _mm512_min_ps(_mm512_max_ps(r, _mm512_set1_ps(-kQMax)), _mm512_set1_ps(kQMax));  // +-Inf -> +-127
  return _mm512_cvtps_epi32(r);  // exact: r is an integer in [-127, 127]
}

QK_TARGET_AVX512 void quant_row_avx512(const float* x, int64_t K, float inv, int8_t* q) {
  const __m512 vinv = _mm512_set1_ps(inv);
  int64_t k = 0;
  for (; k + 16 <= K; k += 16) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(q + k), _mm512_cvtsepi32_epi8(quant16_avx512(_mm512_loadu_ps(x + k), vinv)));
  }
  if (k < K) {
    const __mmask16 m = __mmask16((1u << (K - k)) - 1);
    _mm512_mask_cvtsepi32_storeu_epi8(q + k, m, quant16_avx512(_mm512_maskz_loadu_ps(m, x + k), vinv));
  }
}

// fp16 / bf16 -> fp32, exact (vcvtph2ps; bf16 is the high half of an fp32).
QK_TARGET_AVX512 void widen_half_avx512(const at::Half* src, int64_t K, float* dst) {
  const uint16_t* s = reinterpret_cast<const uint16_t*>(src);
  int64_t k = 0;
  for (; k + 16 <= K; k += 16)
    _mm512_storeu_ps(dst + k, _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(s + k))));
  if (k < K) {
    const __mmask16 m = __mmask16((1u << (K - k)) - 1);
    _mm512_mask_storeu_ps(dst + k, m, _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, s + k)));
  }
}

QK_TARGET_AVX512 void widen_bf16_avx512(const at::BFloat16* src, int64_t K, float* dst) {
  const uint16_t* s = reinterpret_cast<const uint16_t*>(src);
  int64_t k = 0;
  for (; k + 16 <= K; k += 16) {
    const __m512i v = _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(s + k))), 16);
    _mm512_storeu_ps(dst + k, _mm512_castsi512_ps(v));
  }
  if (k < K) {
    const __mmask16 m = __mmask16((1u << (K - k)) - 1);
    const __m512i v = _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, s + k)), 16);
    _mm512_mask_storeu_ps(dst + k, m, _mm512_castsi512_ps(v));
  }
}
#endif

}  // namespace

// Exposed in quantize_int8.h: fp16 / bf16 rows widened with zmm where the level has AVX-512.
void widen_row_isa(const at::Half* src, int64_t K, float* dst, Isa isa) {
#if QK_X86
  if (isa_has_avx512(isa)) return widen_half_avx512(src, K, dst);
#endif
  (void)isa;
  widen_row(src, K, dst);
}

void widen_row_isa(const at::BFloat16* src, int64_t K, float* dst, Isa isa) {
#if QK_X86
  if (isa_has_avx512(isa)) return widen_bf16_avx512(src, K, dst);
#endif
  (void)isa;
  widen_row(src, K, dst);
}

namespace {

// ------------------------------------------------------------------ driver

}  // namespace

// Exposed in quantize_int8.h (shared with the LLM.int8() outlier quantizer).
float row_absmax(const float* x, int64_t K, Isa isa) {
#if QK_X86
  if (isa_has_avx512(isa)) return absmax_avx512(x, K);
  return isa_has_avx2(isa) ? absmax_avx2(x, K) : absmax_portable(x, K);
#else
  (void)isa;
  return absmax_portable(x, K);
#endif
}

float quantize_row(const float* x, int64_t K, float absmax, Isa isa, int8_t* q) {
  float inv, sc;
  if (absmax == 0.0f) {
    inv = 0.0f;
    sc = 1.0f;
  } else {  // also NaN / Inf absmax, as in the reference
    inv = kQMax / absmax;
    sc = absmax / kQMax;
  }
#if QK_X86
  if (isa_has_avx512(isa)) {
    quant_row_avx512(x, K, inv, q);
  } else if (isa_has_avx2(isa)) {
    quant_row_avx2(x, K, inv, q);
  } else {
    quant_row_portable(x, K, inv, q);
  }
#else
  (void)isa;
  quant_row_portable(x, K, inv, q);
#endif
  return sc;
}

namespace {

template <typename T>
void quantize_rows(const T* x, int64_t M, int64_t K, Isa isa, int8_t* q, float* scale) {
  const int64_t grain = std::max<int64_t>(1, kGrainElems / K);
  at::parallel_for(0, M, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> buf(std::is_same<T, float>::value ? 0 : K);
    for (int64_t r = begin; r < end; ++r) {
      const float* row;
      if constexpr (std::is_same<T, float>::value) {
        row = x + r * K;
      } else {
        widen_row_isa(x + r * K, K, buf.data(), isa);
        row = buf.data();
      }
      scale[r] = quantize_row(row, K, row_absmax(row, K, isa), isa, q + r * K);
    }
  });
}

std::string shape_str(at::IntArrayRef s) {
  std::ostringstream os;
  os << "(";
  for (size_t i = 0; i < s.size(); ++i) {
    os << s[i] << (i + 1 < s.size() || s.size() == 1 ? "," : "") << (i + 1 < s.size() ? " " : "");
  }
  os << ")";
  return os.str();
}

std::tuple<at::Tensor, at::Tensor> quantize_int8_rowwise_cpu(const at::Tensor& x) {
  // The same checks and messages as _validate.float_rows (TypeError / ValueError in Python).
  const auto st = x.scalar_type();
  TORCH_CHECK_TYPE(st == at::kFloat || st == at::kHalf || st == at::kBFloat16,
                   "quantkernels.quantize_int8_rowwise: x must have dtype in "
                   "['torch.float16', 'torch.bfloat16', 'torch.float32'], got ",
                   dtype_name(st));
  TORCH_CHECK_VALUE(x.dim() >= 1,
                    "quantkernels.quantize_int8_rowwise: x must have at least 1 dimension(s), got a 0-D tensor");
  TORCH_CHECK_VALUE(x.size(-1) > 0,
                    "quantkernels.quantize_int8_rowwise: x must have a non-empty last dimension K, got shape ",
                    shape_str(x.sizes()));
  const Isa isa = active_isa();  // read once, on the calling thread

  const int64_t K = x.size(-1);
  const int64_t M = x.numel() / K;
  at::Tensor q = at::empty(x.sizes(), x.options().dtype(at::kChar));
  at::Tensor scale = at::empty(x.sizes().slice(0, x.dim() - 1), x.options().dtype(at::kFloat));
  if (M == 0) {
    return {q, scale};
  }
  const at::Tensor xc = x.contiguous();
  int8_t* qp = q.data_ptr<int8_t>();
  float* sp = scale.data_ptr<float>();
  switch (st) {
    case at::kFloat:
      quantize_rows(xc.data_ptr<float>(), M, K, isa, qp, sp);
      break;
    case at::kHalf:
      quantize_rows(xc.data_ptr<at::Half>(), M, K, isa, qp, sp);
      break;
    default:
      quantize_rows(xc.data_ptr<at::BFloat16>(), M, K, isa, qp, sp);
      break;
  }
  return {q, scale};
}

}  // namespace
}  // namespace cpu
}  // namespace quantkernels

namespace {
// What each op runs per ISA level (quantkernels info).
const bool quantize_int8_rowwise_variant_registered = quantkernels::cpu::register_variant(
    "quantize_int8_rowwise", [](quantkernels::cpu::Isa isa) -> const char* {
      if (quantkernels::cpu::isa_has_avx512(isa)) return "avx512: zmm absmax + rne, 16 lanes, masked K tail, zmm fp16/bf16 widening";
      return quantkernels::cpu::isa_has_avx2(isa) ? "avx2: absmax + rne, 8 lanes" : "portable: scalar C++ loops";
    });
}  // namespace

TORCH_LIBRARY_IMPL(quantkernels, CPU, m) {
  m.impl("quantize_int8_rowwise", &quantkernels::cpu::quantize_int8_rowwise_cpu);
}
