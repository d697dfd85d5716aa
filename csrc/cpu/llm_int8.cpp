// LLM.int8() on CPU (docs/numerics.md section 5):
//   quantkernels::quantize_int8_rowwise_outliers   the activation quantizer with outlier columns
//   quantkernels::llm_int8_linear                   int8 GEMM of the inliers + fp32 outlier correction
//
// Outliers O = { k : exists m with |x[m, k]| >= threshold } (none for threshold <= 0); the
// comparison is in fp32 with the threshold rounded to fp32, as torch compares a float32 tensor
// with a Python float. The inliers x_in (outlier columns set to +0) go through the per-row
// quantizer of quantize_int8.cpp (quantize_int8.h: same rounding, NaN/Inf and zero-row rules),
// so q / scale are bit-exact with reference.quantize_int8_rowwise_outliers.
//
// llm_int8_linear. On CPU there is no host synchronisation to avoid, so the outlier columns are
// gathered into a list (usually ~0.5% of K):
//   corr = X[:, O] @ (Wq[:, O] * sw[:, None])^T          fp32 dot products of length |O|, built from the
//                                                         int8 weight columns of each output block
//   Y    = ((C * sx[m]) * sw[n] + corr) + bias             C = int8 GEMM of gemm_int8.cpp (exact int32)
// then cast to x's dtype, all in the GEMM's fused per-block epilogue (gemm_int8.h block_fn), while
// the block's weight rows are still in cache. The dequantized weight is never materialised; the
// only extra memory is X[:, O] ([M, |O|] fp32) and a [block rows, |O|] fp32 scratch per block.
// ISA (cpu_isa.h): avx512 and above find the outliers, zero them and quantize with zmm (16 lanes,
// masked tails) and run the fused block epilogue (corr and the output) on zmm
// (block_outliers_avx512); the inlier GEMM is gemm_driver's (VNNI
// vpdpbusd on avx_vnni / avx512_vnni, see gemm_int8.cpp). Every level gives bit-identical q /
// scale / outliers and (mul and add rounded separately everywhere) the same outputs.
// Differences from the reference only in the fp32 summation order of corr (theirs: a dense masked
// matmul over all of K), and where scale_b holds Inf/NaN (the reference's 0 * Inf in the masked
// columns turns whole output columns into NaN; here only the outlier columns contribute).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <tuple>
#include <vector>

#include "cpu_isa.h"
#include "gemm_int8.h"
#include "qk_checks.h"
#include "qk_store.h"
#include "quantize_int8.h"

namespace quantkernels {
namespace cpu {
namespace {

namespace C = checks;

constexpr int64_t kColBlock = 1024;                                // columns per task of the mask pass

// ------------------------------------------------------------------------------ outlier mask
// lanes[k] = ~0u if column k is an outlier, else 0 (a float-lane mask for the AVX2 zeroing).

template <typename T>
void or_mask_portable(const T* row, int64_t n, float thr, uint32_t* lanes) {
  for (int64_t k = 0; k < n; ++k) {
    lanes[k] |= std::fabs(static_cast<float>(row[k])) >= thr ? ~0u : 0u;  // NaN: false
  }
}

#if QK_X86
QK_TARGET_AVX2 void or_mask_avx2(const float* row, int64_t n, float thr, uint32_t* lanes) {
  const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  const __m256 vthr = _mm256_set1_ps(thr);
  int64_t k = 0;
  for (; k + 8 <= n; k += 8) {
    const __m256 ge = _mm256_cmp_ps(_mm256_and_ps(_mm256_loadu_ps(row + k), absmask), vthr, _CMP_GE_OQ);
    __m256i* dst = reinterpret_cast<__m256i*>(lanes + k);
    _mm256_storeu_si256(dst, _mm256_or_si256(_mm256_loadu_si256(dst), _mm256_castps_si256(ge)));
  }
  or_mask_portable(row + k, n - k, thr, lanes + k);
}

// dst = src with the lanes set in mask replaced by +0.0
QK_TARGET_AVX2 void zero_masked_avx2(const float* src, const uint32_t* lanes, int64_t K, float* dst) {
  int64_t k = 0;
  for (; k + 8 <= K; k += 8) {
    const __m256 m = _mm256_castsi256_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(lanes + k)));
    _mm256_storeu_ps(dst + k, _mm256_andnot_ps(m, _mm256_loadu_ps(src + k)));
  }
  for (; k < K; ++k) dst[k] = lanes[k] ? 0.0f : src[k];
}

// AVX-512: 16 lanes, K tails with opmasks.
QK_TARGET_AVX512 void or_mask_avx512(const float* row, int64_t n, float thr, uint32_t* lanes) {
  const __m512 vthr = _mm512_set1_ps(thr);
  const __m512i ones = _mm512_set1_epi32(-1);
  int64_t k = 0;
  for (; k + 16 <= n; k += 16) {
    const __mmask16 ge = _mm512_cmp_ps_mask(_mm512_abs_ps(_mm512_loadu_ps(row + k)), vthr, _CMP_GE_OQ);  // NaN: false
    _mm512_mask_storeu_epi32(lanes + k, ge, ones);
  }
  if (k < n) {
    const __mmask16 m = __mmask16((1u << (n - k)) - 1);
    const __mmask16 ge = _mm512_mask_cmp_ps_mask(m, _mm512_abs_ps(_mm512_maskz_loadu_ps(m, row + k)), vthr, _CMP_GE_OQ);
    _mm512_mask_storeu_epi32(lanes + k, ge, ones);
  }
}

QK_TARGET_AVX512 void zero_masked_avx512(const float* src, const uint32_t* lanes, int64_t K, float* dst) {
  int64_t k = 0;
  for (; k + 16 <= K; k += 16) {
    const __mmask16 keep = _mm512_testn_epi32_mask(_mm512_loadu_si512(lanes + k), _mm512_loadu_si512(lanes + k));
    _mm512_storeu_ps(dst + k, _mm512_maskz_loadu_ps(keep, src + k));
  }
  for (; k < K; ++k) dst[k] = lanes[k] ? 0.0f : src[k];
}

#endif

void zero_masked(const float* src, const uint32_t* lanes, int64_t K, float* dst, Isa isa) {
#if QK_X86
  if (isa_has_avx512(isa)) return zero_masked_avx512(src, lanes, K, dst);
  if (isa_has_avx2(isa)) return zero_masked_avx2(src, lanes, K, dst);
#endif
  (void)isa;
  for (int64_t k = 0; k < K; ++k) dst[k] = lanes[k] ? 0.0f : src[k];
}

template <typename T>
void outlier_lanes(const T* x, int64_t M, int64_t K, float thr, Isa isa, uint32_t* lanes) {
  const int64_t nblk = (K + kColBlock - 1) / kColBlock;
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 16) / std::max<int64_t>(1, M * kColBlock));
  at::parallel_for(0, nblk, grain, [&](int64_t b0, int64_t b1) {
    std::vector<float> buf(std::is_same<T, float>::value ? 0 : kColBlock);
    for (int64_t blk = b0; blk < b1; ++blk) {
      const int64_t k0 = blk * kColBlock, n = std::min(kColBlock, K - k0);
      std::fill(lanes + k0, lanes + k0 + n, 0u);
      for (int64_t m = 0; m < M; ++m) {
        const T* src = x + m * K + k0;
#if QK_X86
        if (isa_has_avx2(isa)) {
          const float* row;
          if constexpr (std::is_same<T, float>::value) {
            row = src;
          } else {
            widen_row_isa(src, n, buf.data(), isa);
            row = buf.data();
          }
          if (isa_has_avx512(isa)) {
            or_mask_avx512(row, n, thr, lanes + k0);
          } else {
            or_mask_avx2(row, n, thr, lanes + k0);
          }
          continue;
        }
#endif
        or_mask_portable(src, n, thr, lanes + k0);
      }
    }
  });
}

// The quantizer: fills q [M, K], scale [M] and lanes [K]; x is contiguous [M, K].
template <typename T>
void quantize_outliers(const T* x, int64_t M, int64_t K, double threshold, Isa isa, int8_t* q, float* scale,
                       uint32_t* lanes, bool* any_outlier) {
  bool any = false;
  if (threshold > 0 && M > 0) {
    outlier_lanes(x, M, K, static_cast<float>(threshold), isa, lanes);
    for (int64_t k = 0; k < K && !any; ++k) any = lanes[k] != 0;
  } else {
    std::fill(lanes, lanes + K, 0u);
  }
  *any_outlier = any;
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 15) / K);
  at::parallel_for(0, M, grain, [&](int64_t r0, int64_t r1) {
    std::vector<float> wide(std::is_same<T, float>::value ? 0 : K), inl(any ? K : 0);
    for (int64_t r = r0; r < r1; ++r) {
      const float* row;
      if constexpr (std::is_same<T, float>::value) {
        row = x + r * K;
      } else {
        widen_row_isa(x + r * K, K, wide.data(), isa);
        row = wide.data();
      }
      if (any) {  // x_in: outlier columns set to 0, so they count neither in absmax nor in q
        zero_masked(row, lanes, K, inl.data(), isa);
        row = inl.data();
      }
      scale[r] = quantize_row(row, K, row_absmax(row, K, isa), isa, q + r * K);
    }
  });
}

void quantize_outliers_any(const at::Tensor& xc, double threshold, Isa isa, int8_t* q, float* scale,
                           uint32_t* lanes, bool* any) {
  const int64_t M = xc.size(0), K = xc.size(1);
  switch (xc.scalar_type()) {
    case at::kFloat: return quantize_outliers(xc.data_ptr<float>(), M, K, threshold, isa, q, scale, lanes, any);
    case at::kHalf: return quantize_outliers(xc.data_ptr<at::Half>(), M, K, threshold, isa, q, scale, lanes, any);
    default: return quantize_outliers(xc.data_ptr<at::BFloat16>(), M, K, threshold, isa, q, scale, lanes, any);
  }
}

void check_threshold(const char* op, double threshold) {
  TORCH_CHECK_VALUE(threshold == threshold, "quantkernels.", op, ": threshold must be a number, got ", threshold);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> quantize_int8_rowwise_outliers_cpu(const at::Tensor& x,
                                                                                   double threshold) {
  const char* op = "quantize_int8_rowwise_outliers";
  C::float_rows(op, "x", x, 2);
  C::ndim_is(op, "x", x, 2, "[M, K]");
  check_threshold(op, threshold);
  const Isa isa = active_isa();  // read once, on the calling thread
  const int64_t M = x.size(0), K = x.size(1);
  at::Tensor q = at::empty({M, K}, x.options().dtype(at::kChar));
  at::Tensor scale = at::empty({M}, x.options().dtype(at::kFloat));
  at::Tensor outliers = at::empty({K}, x.options().dtype(at::kBool));
  std::vector<uint32_t> lanes(K);
  bool any = false;
  quantize_outliers_any(x.contiguous(), threshold, isa, q.data_ptr<int8_t>(), scale.data_ptr<float>(), lanes.data(),
                        &any);
  bool* o = outliers.data_ptr<bool>();
  for (int64_t k = 0; k < K; ++k) o[k] = lanes[k] != 0;
  return {q, scale, outliers};
}

// ------------------------------------------------------------------------------ llm_int8_linear

// Fused epilogue of the outlier path, per finished [mb, nb] block of the int8 GEMM (whose b rows
// n0.. were just streamed, so the gathered outlier weights come from cache):
//   Y = ((C * sx) * sw + corr) + bias,  corr[m, n] = sum_o xo[m, o] * (Wq[n, O[o]] * sw[n])   (fp32)
struct OutlierCtx {
  const int8_t* b;        // [N, K]
  int64_t K, N;
  const float* sx;        // [M]
  const float* sw;        // [N]
  const float* bias;      // [N] or nullptr
  const int64_t* cols;    // outlier columns O
  int64_t nO;
  const float* xo;        // [M, nO] = x[:, O] in fp32
  void* y;                // [M, N]
};

// corr[i][j] = sum_o xo[i][o] * wt[o][j] for the block: the j loop is contiguous (wt is the
// block's outlier weights transposed, [nO][nb]) so the compiler vectorizes it; the o sum runs
// in chunks of kOChunk terms added into the total, so the fp32 error grows with the chunk
// length plus nO / kOChunk, not with nO (Gemma-3 has layers where most columns are outliers).
// (Before: one 8-lane dot product per output, ~16% of llm_int8's time at M = 16 on one thread.)
constexpr int64_t kOChunk = 64;

template <typename out_t>
void block_outliers(const void* ctxv, const int32_t* C, int64_t ldc, int64_t m0, int64_t mb, int64_t n0,
                    int64_t nb) {
  const OutlierCtx& x = *static_cast<const OutlierCtx*>(ctxv);
  const int64_t nO = x.nO;
  // (Wq[n, O] * sw[n]) for this block's rows, as the reference rounds it, transposed: [nO][nb].
  // Per-thread scratch, reused across blocks and calls (the GEMV calls this every 32 rows).
  thread_local std::vector<float> wt, part, corr;
  wt.resize(static_cast<size_t>(nO * nb));
  part.resize(static_cast<size_t>(nb));
  corr.resize(static_cast<size_t>(nb));
  for (int64_t j = 0; j < nb; ++j) {
    const int8_t* row = x.b + (n0 + j) * x.K;
    const float s = x.sw[n0 + j];
    for (int64_t o = 0; o < nO; ++o) wt[size_t(o * nb + j)] = static_cast<float>(row[x.cols[o]]) * s;
  }
  out_t* Y = static_cast<out_t*>(x.y);
  for (int64_t i = 0; i < mb; ++i) {
    const float s = x.sx[m0 + i];
    const float* xr = x.xo + (m0 + i) * nO;
    std::fill(corr.begin(), corr.end(), 0.0f);
    for (int64_t o0 = 0; o0 < nO; o0 += kOChunk) {
      std::fill(part.begin(), part.end(), 0.0f);
      const int64_t o1 = std::min(nO, o0 + kOChunk);
      for (int64_t o = o0; o < o1; ++o) {
        const float xv = xr[o];
        const float* w = wt.data() + o * nb;
        float* pp = part.data();
        for (int64_t j = 0; j < nb; ++j) pp[j] += xv * w[j];
      }
      for (int64_t j = 0; j < nb; ++j) corr[size_t(j)] += part[size_t(j)];
    }
    const int32_t* c = C + i * ldc;
    out_t* y = Y + (m0 + i) * x.N + n0;
    for (int64_t j = 0; j < nb; ++j) {
      float v = static_cast<float>(c[j]) * s;
      v = v * x.sw[n0 + j];
      v = v + corr[size_t(j)];
      if (x.bias != nullptr) v = v + x.bias[n0 + j];
      y[j] = static_cast<out_t>(v);
    }
  }
}

#if QK_X86
// block_outliers on zmm: the same arithmetic in the same order (part = sum over a chunk of
// xv * w, mul and add rounded separately; corr += part; then ((c * s) * sw + corr) + bias), but
// part / corr of 16 columns live in registers instead of a memory array (the memory form was ~20%
// of llm_int8's time at M = 128, 20 outliers of 4096: a store-to-load chain per outlier).
// mul / add with an explicit rounding mode (store::mul_rn / add_rn): GCC never contracts these
// into an FMA. The cast to x's dtype: store::store16 (qk_store.h, bit-identical to the scalar casts).
#define QK_MUL(a, b) store::mul_rn(a, b)
#define QK_ADD(a, b) store::add_rn(a, b)

template <typename out_t>
QK_TARGET_AVX512 void block_outliers_avx512(const void* ctxv, const int32_t* C, int64_t ldc, int64_t m0, int64_t mb,
                                            int64_t n0, int64_t nb) {
  const OutlierCtx& x = *static_cast<const OutlierCtx*>(ctxv);
  const int64_t nO = x.nO;
  thread_local std::vector<float> wt_buf;
  wt_buf.resize(static_cast<size_t>(nO * nb));
  float* const wt = wt_buf.data();
  for (int64_t j = 0; j < nb; ++j) {
    const int8_t* row = x.b + (n0 + j) * x.K;
    const float s = x.sw[n0 + j];
    for (int64_t o = 0; o < nO; ++o) wt[o * nb + j] = static_cast<float>(row[x.cols[o]]) * s;
  }
  out_t* Y = static_cast<out_t*>(x.y);
  auto mask = [nb](int64_t j) -> __mmask16 {
    return j >= nb ? __mmask16(0) : nb - j >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (nb - j)) - 1);
  };
  for (int64_t i = 0; i < mb; ++i) {
    const __m512 s = _mm512_set1_ps(x.sx[m0 + i]);
    const float* xr = x.xo + (m0 + i) * nO;
    const int32_t* c = C + i * ldc;
    out_t* y = Y + (m0 + i) * x.N + n0;
    // 64 columns at a time: four independent add chains over the outliers (one chain of 16
    // columns alone waits on the add latency every outlier).
    for (int64_t j = 0; j < nb; j += 64) {
      const __mmask16 k0 = mask(j), k1 = mask(j + 16), k2 = mask(j + 32), k3 = mask(j + 48);
      __m512 c0 = _mm512_setzero_ps(), c1 = c0, c2 = c0, c3 = c0;
      for (int64_t o0 = 0; o0 < nO; o0 += kOChunk) {
        const int64_t o1 = std::min(nO, o0 + kOChunk);
        __m512 p0 = _mm512_setzero_ps(), p1 = p0, p2 = p0, p3 = p0;
        for (int64_t o = o0; o < o1; ++o) {
          const __m512 xv = _mm512_set1_ps(xr[o]);
          const float* w = wt + o * nb + j;
          p0 = QK_ADD(p0, QK_MUL(xv, _mm512_maskz_loadu_ps(k0, w)));
          p1 = QK_ADD(p1, QK_MUL(xv, _mm512_maskz_loadu_ps(k1, w + 16)));
          p2 = QK_ADD(p2, QK_MUL(xv, _mm512_maskz_loadu_ps(k2, w + 32)));
          p3 = QK_ADD(p3, QK_MUL(xv, _mm512_maskz_loadu_ps(k3, w + 48)));
        }
        c0 = QK_ADD(c0, p0);
        c1 = QK_ADD(c1, p1);
        c2 = QK_ADD(c2, p2);
        c3 = QK_ADD(c3, p3);
      }
      const __m512 cs[4] = {c0, c1, c2, c3};
      const __mmask16 ks[4] = {k0, k1, k2, k3};
      for (int q = 0; q < 4 && j + 16 * q < nb; ++q) {
        const int64_t jj = j + 16 * q;
        const __mmask16 m = ks[q];
        __m512 v = QK_MUL(_mm512_cvtepi32_ps(_mm512_maskz_loadu_epi32(m, c + jj)), s);
        v = QK_MUL(v, _mm512_maskz_loadu_ps(m, x.sw + n0 + jj));
        v = QK_ADD(v, cs[q]);
        if (x.bias != nullptr) v = QK_ADD(v, _mm512_maskz_loadu_ps(m, x.bias + n0 + jj));
        store::store16<out_t>(y + jj, m, v);
      }
    }
  }
}
#undef QK_MUL
#undef QK_ADD
#endif

template <typename T>
void gather_x_cols(const T* x, int64_t M, int64_t K, const std::vector<int64_t>& cols, float* out) {
  const int64_t n = int64_t(cols.size());
  for (int64_t m = 0; m < M; ++m)
    for (int64_t j = 0; j < n; ++j) out[m * n + j] = static_cast<float>(x[m * K + cols[j]]);
}

at::Tensor llm_int8_linear_cpu(const at::Tensor& x_in, const at::Tensor& b_in, const at::Tensor& sb_in,
                               const std::optional<at::Tensor>& bias_in, double threshold) {
  const char* op = "llm_int8_linear";
  // The checks of reference.llm_int8_linear, in its order, with _validate.py's messages.
  C::dtype_is(op, "b", b_in, at::kChar);
  C::ndim_is(op, "b", b_in, 2, "[N, K] weight");
  const int64_t N = b_in.size(0), K = b_in.size(1);
  C::float_rows(op, "x", x_in, 2);
  C::ndim_is(op, "x", x_in, 2, "[M, K] activation");
  TORCH_CHECK_VALUE(x_in.size(1) == K, "quantkernels.", op, ": x has K = ", x_in.size(1),
                    " columns but the weight has K = ", K, " (x shape ", C::shape_str(x_in.sizes()), ")");
  C::k_bound(op, K, kMaxKInt8, "K");
  C::dtype_is(op, "scale_b", sb_in, at::kFloat);
  const int64_t sb_shape[1] = {N};
  C::shape_is(op, "scale_b", sb_in, sb_shape, "(one per-channel scale per row of b)");
  C::same_device(op, "b", b_in, "x", x_in);
  C::same_device(op, "scale_b", sb_in, "x", x_in);
  C::bias(op, bias_in, N, x_in);
  check_threshold(op, threshold);
  const Isa isa = active_isa();  // read once, on the calling thread (gemm_driver reads it again)

  const int64_t M = x_in.size(0);
  const at::ScalarType dt = x_in.scalar_type();
  if (M == 0 || N == 0) return at::empty({M, N}, x_in.options());
  const at::Tensor x = x_in.contiguous(), b = b_in.contiguous(), sb = sb_in.contiguous();
  at::Tensor bias;
  if (bias_in.has_value()) bias = bias_in->to(at::kFloat).contiguous();

  // 1. Inliers quantized per row, outlier columns found.
  at::Tensor q = at::empty({M, K}, x.options().dtype(at::kChar));
  at::Tensor sx = at::empty({M}, x.options().dtype(at::kFloat));
  std::vector<uint32_t> lanes(K);
  bool any = false;
  quantize_outliers_any(x, threshold, isa, q.data_ptr<int8_t>(), sx.data_ptr<float>(), lanes.data(), &any);

  Epilogue ep;
  ep.sa = sx.data_ptr<float>();
  ep.sb = sb.data_ptr<float>();
  ep.bias = bias.defined() ? bias.data_ptr<float>() : nullptr;
  at::Tensor y;
  if (!any) {
    // 2a. Plain W8A8 with a fused epilogue straight into x's dtype.
    y = at::empty({M, N}, x.options());
    ep.fn = w8a8_epilogue(dt, isa);
    ep.y = static_cast<char*>(y.data_ptr());
    ep.elem_size = y.element_size();
    gemm_driver(q, b, M, N, K, nullptr, ep);
    return y;
  }

  // 2b. int8 GEMM of the inliers with the fp32 outlier correction fused into its epilogue.
  std::vector<int64_t> cols;
  for (int64_t k = 0; k < K; ++k)
    if (lanes[k]) cols.push_back(k);
  const int64_t nO = int64_t(cols.size());
  std::vector<float> xo(size_t(M * nO));
  switch (dt) {
    case at::kFloat: gather_x_cols(x.data_ptr<float>(), M, K, cols, xo.data()); break;
    case at::kHalf: gather_x_cols(x.data_ptr<at::Half>(), M, K, cols, xo.data()); break;
    default: gather_x_cols(x.data_ptr<at::BFloat16>(), M, K, cols, xo.data()); break;
  }
  y = at::empty({M, N}, x.options());
  OutlierCtx ctx{b.data_ptr<int8_t>(), K, N, ep.sa, ep.sb, ep.bias, cols.data(), nO, xo.data(), y.data_ptr()};
  switch (dt) {
    case at::kFloat: ep.block_fn = &block_outliers<float>; break;
    case at::kHalf: ep.block_fn = &block_outliers<at::Half>; break;
    default: ep.block_fn = &block_outliers<at::BFloat16>; break;
  }
#if QK_X86
  if (isa_has_avx512(isa)) {
    switch (dt) {
      case at::kFloat: ep.block_fn = &block_outliers_avx512<float>; break;
      case at::kHalf: ep.block_fn = &block_outliers_avx512<at::Half>; break;
      default: ep.block_fn = &block_outliers_avx512<at::BFloat16>; break;
    }
  }
#endif
  ep.ctx = &ctx;
  gemm_driver(q, b, M, N, K, nullptr, ep);
  return y;
}

}  // namespace
}  // namespace cpu
}  // namespace quantkernels

namespace {
// What each op runs per ISA level (quantkernels info).
const bool quantize_int8_rowwise_outliers_variant_registered = quantkernels::cpu::register_variant(
    "quantize_int8_rowwise_outliers", [](quantkernels::cpu::Isa isa) -> const char* {
      if (quantkernels::cpu::isa_has_avx512(isa)) return "avx512: zmm outlier mask (16 lanes), masked absmax + rne";
      return quantkernels::cpu::isa_has_avx2(isa) ? "avx2: masked absmax + rne" : "portable: scalar C++ loops";
    });
const bool llm_int8_linear_variant_registered = quantkernels::cpu::register_variant(
    "llm_int8_linear", [](quantkernels::cpu::Isa isa) -> const char* {
      using namespace quantkernels::cpu;
      if (isa_has_vnni512(isa)) return "avx512_vnni: zmm quantizer + int8 GEMM/GEMV (zmm vpdpbusd) + zmm fp32 outlier correction";
      if (isa_has_avx512(isa)) return "avx512: zmm quantizer + int8 GEMM/GEMV (avx2 maddubs) + zmm fp32 outlier correction";
      if (isa_has_vnni256(isa)) return "avx_vnni: avx2 quantizer + int8 GEMM/GEMV (ymm vpdpbusd) + fp32 outlier correction";
      return isa_has_avx2(isa) ? "avx2: int8 GEMM/GEMV + fp32 outlier correction" : "portable: scalar C++ loops";
    });
}  // namespace

TORCH_LIBRARY_IMPL(quantkernels, CPU, m) {
  m.impl("quantize_int8_rowwise_outliers", &quantkernels::cpu::quantize_int8_rowwise_outliers_cpu);
  m.impl("llm_int8_linear", &quantkernels::cpu::llm_int8_linear_cpu);
}
