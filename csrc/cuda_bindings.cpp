// The torch side of the CUDA kernels: validation, contiguity, device guard, current stream,
// and TORCH_LIBRARY_IMPL(quantkernels, CUDA) for the ops implemented in csrc/cuda/*.cu.
//
// Compiled by the host compiler only (nvcc never sees torch headers; ARCHITECTURE.md). Messages
// mirror quantkernels/_validate.py: "quantkernels.<op>: <arg> must ..., got <value>", raised as
// TypeError (dtype) or ValueError (shape / value / device) like the reference.
//
// No op synchronises with the host or allocates outside the caching allocator, so every op
// here can be captured in a CUDA graph. Registered ops: quantize_int8_rowwise,
// quantize_int8_rowwise_outliers, int8_gemm, w8a8_gemm, w4a8_gemm, w8a16_gemm, w4a16_gemm,
// llm_int8_linear, gemm_4bit. The others keep the reference (or Triton via dispatch.py).
//
// QK_CUDA_EMU (csrc/cuda_emu/): the same code, with CPU tensors, drives the CUDA emulator and
// registers the ops as quantkernels_cuda_emu::* on CPU (no device guard or stream there).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>
#ifndef QK_CUDA_EMU
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <optional>
#include <string>
#include <tuple>

#include "cpu/cpu_isa.h"  // dtype_name(): "torch.float32"-style names, as the Python messages
#include "cpu/qk_checks.h"  // zero_points(): the int4 zero-point range check; weight_4bit()
#include "qk_limits.h"      // kMaxKInt8, kMaxGroupW4A8
#include "cuda/qk_cuda.h"

#ifdef QK_CUDA_EMU
#define QK_DEVICE_GUARD(t) (void)(t)
#define QK_ON_DEVICE(t) (t).is_cpu()
#define C10_CUDA_CHECK(expr)                                                          \
  do {                                                                                \
    const cudaError_t qk_err_ = (expr);                                               \
    TORCH_CHECK(qk_err_ == cudaSuccess, ::qk_emu::last_message());                    \
  } while (0)
#else
#define QK_DEVICE_GUARD(t) const c10::cuda::CUDAGuard guard((t).device())
#define QK_ON_DEVICE(t) (t).is_cuda()
#endif

namespace quantkernels {
namespace cuda {
namespace {

using cpu::dtype_name;

#ifdef QK_CUDA_EMU
cudaStream_t stream_of(const at::Tensor&) { return nullptr; }
// Whether zero_b's values may be read (a host synchronisation): eager only, not during capture.
bool values_readable(const at::Tensor&) { return true; }
#else
cudaStream_t stream_of(const at::Tensor& t) { return c10::cuda::getCurrentCUDAStream(t.get_device()).stream(); }
bool values_readable(const at::Tensor& t) {
  return t.is_cuda() && c10::cuda::currentStreamCaptureStatusMayInitCtx() == c10::cuda::CaptureStatus::None;
}
#endif

constexpr int64_t kMaxGridY = 65535;

std::string shape_str(at::IntArrayRef s) {
  std::string r = "(";
  for (size_t i = 0; i < s.size(); ++i) {
    r += std::to_string(s[i]);
    if (s.size() == 1 || i + 1 < s.size()) r += s.size() == 1 ? "," : ", ";
  }
  return r + ")";
}

const char* kFloatDtypes = "['torch.float16', 'torch.bfloat16', 'torch.float32']";

bool is_float(at::ScalarType t) { return t == at::kHalf || t == at::kBFloat16 || t == at::kFloat; }

DType to_dtype(at::ScalarType t) {
  return t == at::kHalf ? DType::F16 : (t == at::kBFloat16 ? DType::BF16 : DType::F32);
}

void check_dtype(const char* op, const char* name, const at::Tensor& t, at::ScalarType want) {
  TORCH_CHECK_TYPE(t.scalar_type() == want, "quantkernels.", op, ": ", name, " must have dtype in ['",
                   dtype_name(want), "'], got ", dtype_name(t.scalar_type()));
}

void check_ndim(const char* op, const char* name, const at::Tensor& t, int64_t ndim, const char* what) {
  TORCH_CHECK_VALUE(t.dim() == ndim, "quantkernels.", op, ": ", name, " must be ", ndim, "-D ", what,
                    ", got shape ", shape_str(t.sizes()));
}

void check_shape1(const char* op, const char* name, const at::Tensor& t, int64_t n, const char* what) {
  TORCH_CHECK_VALUE(t.dim() == 1 && t.size(0) == n, "quantkernels.", op, ": ", name, " must have shape (", n,
                    ",) ", what, ", got ", shape_str(t.sizes()));
}

// Every tensor on first's device (a CUDA device: this is the CUDA kernel).
void check_device(const char* op, const char* first_name, const at::Tensor& first,
                  std::initializer_list<std::pair<const char*, const at::Tensor*>> others) {
  TORCH_CHECK_VALUE(QK_ON_DEVICE(first), "quantkernels.", op, ": ", first_name, " is on ", first.device(),
                    " but this is the CUDA kernel; all tensors must be on one CUDA device");
  for (const auto& [name, t] : others) {
    if (t == nullptr || !t->defined()) continue;
    TORCH_CHECK_VALUE(t->device() == first.device(), "quantkernels.", op, ": ", name, " is on ", t->device(),
                      " but ", first_name, " is on ", first.device(), "; all tensors must be on one device");
  }
}

void check_float_rows(const char* op, const char* name, const at::Tensor& x, int64_t min_dim) {
  TORCH_CHECK_TYPE(is_float(x.scalar_type()), "quantkernels.", op, ": ", name, " must have dtype in ", kFloatDtypes,
                   ", got ", dtype_name(x.scalar_type()));
  TORCH_CHECK_VALUE(x.dim() >= min_dim, "quantkernels.", op, ": ", name, " must have at least ", min_dim,
                    " dimension(s), got a ", x.dim(), "-D tensor");
  TORCH_CHECK_VALUE(x.size(-1) > 0, "quantkernels.", op, ": ", name,
                    " must have a non-empty last dimension K, got shape ", shape_str(x.sizes()));
}

// Validated bias as contiguous fp32 (fp16 / bf16 widen exactly), or an undefined tensor.
at::Tensor bias_f32(const char* op, const std::optional<at::Tensor>& bias, int64_t N, const at::Tensor& ref) {
  if (!bias.has_value()) return at::Tensor();
  const at::Tensor& b = *bias;
  TORCH_CHECK_TYPE(is_float(b.scalar_type()), "quantkernels.", op, ": bias must have dtype in ", kFloatDtypes,
                   ", got ", dtype_name(b.scalar_type()));
  check_shape1(op, "bias", b, N, "(one value per output channel N)");
  TORCH_CHECK_VALUE(b.device() == ref.device(), "quantkernels.", op, ": bias is on ", b.device(),
                    " but the other inputs is on ", ref.device(), "; all tensors must be on one device");
  return b.to(at::kFloat).contiguous();
}

at::ScalarType out_dtype_or(const char* op, std::optional<at::ScalarType> dt, at::ScalarType def) {
  const at::ScalarType t = dt.value_or(def);
  TORCH_CHECK_TYPE(is_float(t), "quantkernels.", op, ": out_dtype must be one of float16, bfloat16, float32, got ",
                   dtype_name(t));
  return t;
}

void check_k_bound(const char* op, int64_t K, int64_t limit = kMaxKInt8, const char* what = "K") {
  TORCH_CHECK_VALUE(K <= limit, "quantkernels.", op, ": ", what, " = ", K, " exceeds ", limit,
                    ", beyond which the int32 accumulator could overflow");
}

// The grids put N (or M for the GEMVs) on gridDim.y: at most 65535 blocks.
void check_grid(const char* op, const char* what, int64_t v, int64_t per_block) {
  TORCH_CHECK_VALUE((v + per_block - 1) / per_block <= kMaxGridY, "quantkernels.", op, ": ", what, " = ", v,
                    " exceeds this CUDA kernel's limit of ", kMaxGridY * per_block);
}

// int8 a [M, K] with b int8 [N, K] (or packed uint8 [N, K/2]).
void check_int8_operands(const char* op, const at::Tensor& a, const at::Tensor& b, bool packed) {
  check_dtype(op, "a", a, at::kChar);
  check_ndim(op, "a", a, 2, "[M, K] activation");
  const int64_t K = a.size(1);
  if (packed) {
    check_dtype(op, "b_packed", b, at::kByte);
    check_ndim(op, "b_packed", b, 2, "[N, K/2] (two int4 values per byte along K)");
    TORCH_CHECK_VALUE(b.size(1) * 2 == K, "quantkernels.", op, ": b_packed must have shape [N, K/2] = [N, ", K / 2,
                      "] for a's K = ", K, ", got ", shape_str(b.sizes()));
  } else {
    check_dtype(op, "b", b, at::kChar);
    check_ndim(op, "b", b, 2, "[N, K] weight");
    TORCH_CHECK_VALUE(b.size(1) == K, "quantkernels.", op, ": b must have K = ", K, " columns to match a ",
                      shape_str(a.sizes()), ", got shape ", shape_str(b.sizes()));
  }
}

// PLAIN int4 weight [N, K/2] with fp32 scale [N, K/G] and optional uint8 zero; returns num_groups.
int64_t check_int4_weight(const char* op, const at::Tensor& packed, const at::Tensor& scale,
                          const std::optional<at::Tensor>& zero) {
  check_dtype(op, "b_packed", packed, at::kByte);
  check_ndim(op, "b_packed", packed, 2, "[N, K/2] (two int4 values per byte along K)");
  const int64_t N = packed.size(0), K = packed.size(1) * 2;
  check_dtype(op, "scale_b", scale, at::kFloat);
  check_ndim(op, "scale_b", scale, 2, "[N, K/group_size]");
  TORCH_CHECK_VALUE(scale.size(0) == N, "quantkernels.", op, ": scale_b must have N = ", N, " rows, got shape ",
                    shape_str(scale.sizes()));
  const int64_t ng = scale.size(1);
  TORCH_CHECK_VALUE(ng > 0 && K % ng == 0, "quantkernels.", op, ": scale_b has ", ng,
                    " groups per row, which does not divide K = ", K);
  const int64_t G = K / ng;
  TORCH_CHECK_VALUE(G == 32 || G == 64 || G == 128 || G == 256 || G == K, "quantkernels.", op,
                    ": scale_b implies group_size = K / ", ng, " = ", G, "; must be one of (32, 64, 128, 256) or K");
  if (zero.has_value()) {
    check_dtype(op, "zero_b", *zero, at::kByte);
    TORCH_CHECK_VALUE(zero->sizes() == scale.sizes(), "quantkernels.", op, ": zero_b must have shape ",
                      shape_str(scale.sizes()), " (the shape of scale_b), got ", shape_str(zero->sizes()));
    // The value check syncs with the host: eager only, never while a CUDA graph is captured.
    if (values_readable(*zero)) cpu::checks::zero_points(op, "zero_b", *zero);
  }
  return ng;
}


const uint8_t* u8_or_null(const at::Tensor& t) {
  return t.defined() ? static_cast<const uint8_t*>(t.data_ptr()) : nullptr;
}
const float* f32_or_null(const at::Tensor& t) { return t.defined() ? t.data_ptr<float>() : nullptr; }

// ------------------------------------------------------------------ ops

std::tuple<at::Tensor, at::Tensor> quantize_int8_rowwise_cuda(const at::Tensor& x_in) {
  const char* op = "quantize_int8_rowwise";
  check_float_rows(op, "x", x_in, 1);
  check_device(op, "x", x_in, {});
  QK_DEVICE_GUARD(x_in);
  const at::Tensor x = x_in.contiguous();
  const int64_t K = x.size(-1), M = x.numel() / K;
  TORCH_CHECK_VALUE(M <= INT32_MAX, "quantkernels.", op, ": ", M, " rows exceed this CUDA kernel's limit of ",
                    INT32_MAX);
  at::Tensor q = at::empty(x.sizes(), x.options().dtype(at::kChar));
  at::Tensor scale = at::empty(x.sizes().slice(0, x.dim() - 1), x.options().dtype(at::kFloat));
  C10_CUDA_CHECK(quantize_rowwise(x.data_ptr(), to_dtype(x.scalar_type()), M, K, nullptr, q.data_ptr<int8_t>(),
                                  scale.data_ptr<float>(), stream_of(x)));
  return {q, scale};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> quantize_int8_rowwise_outliers_cuda(const at::Tensor& x_in,
                                                                                   double threshold) {
  const char* op = "quantize_int8_rowwise_outliers";
  check_float_rows(op, "x", x_in, 2);
  TORCH_CHECK_VALUE(x_in.dim() == 2, "quantkernels.", op, ": x must be 2-D [M, K], got shape ",
                    shape_str(x_in.sizes()));
  TORCH_CHECK_VALUE(!std::isnan(threshold), "quantkernels.", op, ": threshold must be a number, got nan");
  check_device(op, "x", x_in, {});
  QK_DEVICE_GUARD(x_in);
  const at::Tensor x = x_in.contiguous();
  const int64_t M = x.size(0), K = x.size(1);
  TORCH_CHECK_VALUE(M <= INT32_MAX, "quantkernels.", op, ": ", M, " rows exceed this CUDA kernel's limit of ",
                    INT32_MAX);
  const DType xt = to_dtype(x.scalar_type());
  const cudaStream_t stream = stream_of(x);
  at::Tensor q = at::empty({M, K}, x.options().dtype(at::kChar));
  at::Tensor scale = at::empty({M}, x.options().dtype(at::kFloat));
  at::Tensor mask = at::empty({K}, x.options().dtype(at::kBool));
  uint8_t* mp = static_cast<uint8_t*>(mask.data_ptr());
  C10_CUDA_CHECK(outlier_columns(x.data_ptr(), xt, M, K, threshold, mp, stream));
  C10_CUDA_CHECK(quantize_rowwise(x.data_ptr(), xt, M, K, threshold > 0 ? mp : nullptr, q.data_ptr<int8_t>(),
                                  scale.data_ptr<float>(), stream));
  return {q, scale, mask};
}

at::Tensor int8_gemm_cuda(const at::Tensor& a_in, const at::Tensor& b_in) {
  const char* op = "int8_gemm";
  check_int8_operands(op, a_in, b_in, false);
  check_device(op, "a", a_in, {{"b", &b_in}});
  const int64_t M = a_in.size(0), N = b_in.size(0), K = a_in.size(1);
  check_k_bound(op, K);
  check_grid(op, "N", N, 64);
  QK_DEVICE_GUARD(a_in);
  const at::Tensor a = a_in.contiguous(), b = b_in.contiguous();
  at::Tensor c = at::empty({M, N}, a.options().dtype(at::kInt));
  C10_CUDA_CHECK(int8_gemm(a.data_ptr<int8_t>(), b.data_ptr<int8_t>(), M, N, K, nullptr, nullptr, nullptr,
                           c.data_ptr(), DType::F32, stream_of(a)));
  return c;
}

at::Tensor w8a8_gemm_cuda(const at::Tensor& a_in, const at::Tensor& b_in, const at::Tensor& sa_in,
                          const at::Tensor& sb_in, const std::optional<at::Tensor>& bias_in,
                          std::optional<at::ScalarType> out_dtype) {
  const char* op = "w8a8_gemm";
  check_int8_operands(op, a_in, b_in, false);
  const int64_t M = a_in.size(0), N = b_in.size(0), K = a_in.size(1);
  check_k_bound(op, K);
  check_dtype(op, "scale_a", sa_in, at::kFloat);
  check_shape1(op, "scale_a", sa_in, M, "(one per-token scale per row of a)");
  check_dtype(op, "scale_b", sb_in, at::kFloat);
  check_shape1(op, "scale_b", sb_in, N, "(one per-channel scale per row of b)");
  check_device(op, "a", a_in, {{"b", &b_in}, {"scale_a", &sa_in}, {"scale_b", &sb_in}});
  QK_DEVICE_GUARD(a_in);
  const at::Tensor bias = bias_f32(op, bias_in, N, a_in);
  const at::ScalarType dt = out_dtype_or(op, out_dtype, at::kFloat);
  check_grid(op, "N", N, 64);
  const at::Tensor a = a_in.contiguous(), b = b_in.contiguous(), sa = sa_in.contiguous(), sb = sb_in.contiguous();
  at::Tensor y = at::empty({M, N}, a.options().dtype(dt));
  C10_CUDA_CHECK(int8_gemm(a.data_ptr<int8_t>(), b.data_ptr<int8_t>(), M, N, K, sa.data_ptr<float>(),
                           sb.data_ptr<float>(), f32_or_null(bias), y.data_ptr(), to_dtype(dt), stream_of(a)));
  return y;
}

at::Tensor w4a8_gemm_cuda(const at::Tensor& a_in, const at::Tensor& b_in, const at::Tensor& sa_in,
                          const at::Tensor& sb_in, const std::optional<at::Tensor>& zero_in,
                          const std::optional<at::Tensor>& bias_in, std::optional<at::ScalarType> out_dtype) {
  const char* op = "w4a8_gemm";
  check_int8_operands(op, a_in, b_in, true);
  const int64_t M = a_in.size(0), N = b_in.size(0), K = a_in.size(1);
  const int64_t ng = check_int4_weight(op, b_in, sb_in, zero_in);
  check_dtype(op, "scale_a", sa_in, at::kFloat);
  check_shape1(op, "scale_a", sa_in, M, "(one per-token scale per row of a)");
  const at::Tensor zero_ref = zero_in.has_value() ? *zero_in : at::Tensor();
  check_device(op, "a", a_in, {{"b_packed", &b_in}, {"scale_a", &sa_in}, {"scale_b", &sb_in}, {"zero_b", &zero_ref}});
  check_k_bound(op, K / ng, kMaxGroupW4A8, "group_size");
  QK_DEVICE_GUARD(a_in);
  const at::Tensor bias = bias_f32(op, bias_in, N, a_in);
  const at::ScalarType dt = out_dtype_or(op, out_dtype, at::kFloat);
  check_grid(op, "N", N, 64);
  const at::Tensor a = a_in.contiguous(), b = b_in.contiguous(), sa = sa_in.contiguous(), sb = sb_in.contiguous();
  const at::Tensor zero = zero_ref.defined() ? zero_ref.contiguous() : at::Tensor();
  at::Tensor y = at::empty({M, N}, a.options().dtype(dt));
  C10_CUDA_CHECK(w4a8_gemm(a.data_ptr<int8_t>(), static_cast<const uint8_t*>(b.data_ptr()), M, N, K, ng,
                           sa.data_ptr<float>(), sb.data_ptr<float>(), u8_or_null(zero), f32_or_null(bias),
                           y.data_ptr(), to_dtype(dt), stream_of(a)));
  return y;
}

// x float [M, K] for the weight-only ops and LLM.int8.
void check_activation(const char* op, const at::Tensor& x, int64_t K) {
  check_float_rows(op, "x", x, 2);
  check_ndim(op, "x", x, 2, "[M, K] activation");
  TORCH_CHECK_VALUE(x.size(1) == K, "quantkernels.", op, ": x has K = ", x.size(1),
                    " columns but the weight has K = ", K, " (x shape ", shape_str(x.sizes()), ")");
}

// QUANTKERNELS_CUDA_WO_GEMV_MAX_M: the largest M the weight-only ops send to the GEMV (fp16 /
// bf16; default 8, above it the tensor-core kernel). Read on every call, like
// QUANTKERNELS_CPU_ISA, so that benchmarks and tests can compare both kernels in one process.
int wo_gemv_max_m(const char* op) {
  const char* env = std::getenv("QUANTKERNELS_CUDA_WO_GEMV_MAX_M");
  if (env == nullptr || *env == '\0') return -1;  // the kernel's default
  char* end = nullptr;
  const long v = std::strtol(env, &end, 10);
  TORCH_CHECK_VALUE(end != env && *end == '\0' && v >= 0 && v <= 1000000, "quantkernels.", op,
                    ": QUANTKERNELS_CUDA_WO_GEMV_MAX_M must be an integer in [0, 1000000], got '", env, "'");
  return static_cast<int>(v);
}

at::Tensor weight_only(const char* op, const at::Tensor& x_in, const at::Tensor& w_in, bool int4,
                       const at::Tensor& sb_in, const at::Tensor& zero_in, int64_t ng,
                       const std::optional<at::Tensor>& bias_in, int64_t N, int64_t K) {
  QK_DEVICE_GUARD(x_in);
  const at::Tensor bias = bias_f32(op, bias_in, N, x_in);
  const at::Tensor x = x_in.contiguous(), w = w_in.contiguous(), sb = sb_in.contiguous();
  const at::Tensor zero = zero_in.defined() ? zero_in.contiguous() : at::Tensor();
  const int64_t M = x.size(0);
  check_grid(op, "M", M, 8);
  at::Tensor y = at::empty({M, N}, x.options());
  // GEMV (splits == 0) or the tensor-core kernel, split-K `splits` ways (weight_only.cu). The
  // workspace comes from the caching allocator on the current stream: graph-capturable.
  const DType xt = to_dtype(x.scalar_type());
  const int splits = weight_only_splits(xt, int4, x.data_ptr(), w.data_ptr(), M, N, K, ng, wo_gemv_max_m(op));
  at::Tensor ws = splits > 1 ? at::empty({splits, M, N}, x.options().dtype(at::kFloat)) : at::Tensor();
  C10_CUDA_CHECK(weight_only_gemm(x.data_ptr(), xt, w.data_ptr(), int4, sb.data_ptr<float>(), u8_or_null(zero), ng,
                                  f32_or_null(bias), M, N, K, y.data_ptr(), splits,
                                  ws.defined() ? ws.data_ptr<float>() : nullptr, stream_of(x)));
  return y;
}

at::Tensor w8a16_gemm_cuda(const at::Tensor& x, const at::Tensor& b, const at::Tensor& sb,
                           const std::optional<at::Tensor>& bias) {
  const char* op = "w8a16_gemm";
  check_dtype(op, "b", b, at::kChar);
  check_ndim(op, "b", b, 2, "[N, K] weight");
  const int64_t N = b.size(0), K = b.size(1);
  check_activation(op, x, K);
  check_dtype(op, "scale_b", sb, at::kFloat);
  check_shape1(op, "scale_b", sb, N, "(one per-channel scale per row of b)");
  check_device(op, "x", x, {{"b", &b}, {"scale_b", &sb}});
  return weight_only(op, x, b, false, sb, at::Tensor(), 1, bias, N, K);
}

at::Tensor w4a16_gemm_cuda(const at::Tensor& x, const at::Tensor& bp, const at::Tensor& sb,
                           const std::optional<at::Tensor>& zero, const std::optional<at::Tensor>& bias) {
  const char* op = "w4a16_gemm";
  const int64_t ng = check_int4_weight(op, bp, sb, zero);
  const int64_t N = bp.size(0), K = bp.size(1) * 2;
  check_activation(op, x, K);
  const at::Tensor zero_ref = zero.has_value() ? *zero : at::Tensor();
  check_device(op, "x", x, {{"b_packed", &bp}, {"scale_b", &sb}, {"zero_b", &zero_ref}});
  return weight_only(op, x, bp, true, sb, zero_ref, ng, bias, N, K);
}

// NF4 / FP4 (docs/numerics.md s.11): the W4A16 kernels with the code-table decode (weight_only.cu).
// Double quantization decodes the absmax values on the device first (an fp32 [nb] buffer from the
// caching allocator; offset is read by the kernel, not the host).
at::Tensor gemm_4bit_cuda(const at::Tensor& x_in, const at::Tensor& packed_in, const at::Tensor& absmax_in,
                          c10::string_view quant_type, int64_t blocksize, const std::optional<at::Tensor>& nested,
                          const std::optional<at::Tensor>& offset, const std::optional<at::Tensor>& bias_in) {
  const char* op = "gemm_4bit";
  const std::string qt(quant_type);
  cpu::checks::weight_4bit(op, packed_in, absmax_in, qt, blocksize, nested, offset);
  const int64_t N = packed_in.size(0), K = packed_in.size(1) * 2;
  check_activation(op, x_in, K);
  const at::Tensor nested_ref = nested.has_value() ? *nested : at::Tensor();
  const at::Tensor offset_ref = offset.has_value() ? *offset : at::Tensor();
  check_device(op, "x", x_in,
               {{"packed", &packed_in}, {"absmax", &absmax_in}, {"nested_absmax", &nested_ref},
                {"offset", &offset_ref}});
  QK_DEVICE_GUARD(x_in);
  const at::Tensor bias = bias_f32(op, bias_in, N, x_in);
  const at::Tensor x = x_in.contiguous(), packed = packed_in.contiguous();
  const int64_t M = x.size(0);
  check_grid(op, "M", M, 8);
  at::Tensor y = at::empty({M, N}, x.options());
  if (M == 0 || N == 0) return y;
  const cudaStream_t stream = stream_of(x);
  at::Tensor am;
  if (nested.has_value()) {
    const at::Tensor q = absmax_in.contiguous(), n2 = nested->contiguous(), off = offset->contiguous();
    am = at::empty({q.numel()}, x.options().dtype(at::kFloat));
    C10_CUDA_CHECK(decode_absmax_4bit(static_cast<const uint8_t*>(q.data_ptr()), n2.data_ptr<float>(),
                                      off.data_ptr<float>(), q.numel(), am.data_ptr<float>(), stream));
  } else {
    am = absmax_in.contiguous();
  }
  const DType xt = to_dtype(x.scalar_type());
  const uint8_t* wp = static_cast<const uint8_t*>(packed.data_ptr());
  const int splits = weight_only_splits(xt, true, x.data_ptr(), wp, M, N, K, 1, wo_gemv_max_m(op));
  at::Tensor ws = splits > 1 ? at::empty({splits, M, N}, x.options().dtype(at::kFloat)) : at::Tensor();
  C10_CUDA_CHECK(gemm_4bit(x.data_ptr(), xt, wp, qt == "nf4", am.data_ptr<float>(), blocksize, f32_or_null(bias), M, N,
                           K, y.data_ptr(), splits, ws.defined() ? ws.data_ptr<float>() : nullptr, stream));
  return y;
}

at::Tensor llm_int8_linear_cuda(const at::Tensor& x_in, const at::Tensor& b_in, const at::Tensor& sb_in,
                                const std::optional<at::Tensor>& bias_in, double threshold) {
  const char* op = "llm_int8_linear";
  check_dtype(op, "b", b_in, at::kChar);
  check_ndim(op, "b", b_in, 2, "[N, K] weight");
  const int64_t N = b_in.size(0), K = b_in.size(1);
  check_activation(op, x_in, K);
  check_k_bound(op, K);
  check_dtype(op, "scale_b", sb_in, at::kFloat);
  check_shape1(op, "scale_b", sb_in, N, "(one per-channel scale per row of b)");
  check_device(op, "x", x_in, {{"b", &b_in}, {"scale_b", &sb_in}});
  QK_DEVICE_GUARD(x_in);
  const at::Tensor bias = bias_f32(op, bias_in, N, x_in);
  TORCH_CHECK_VALUE(!std::isnan(threshold), "quantkernels.", op, ": threshold must be a number, got nan");
  check_grid(op, "N", N, 64);
  const at::Tensor x = x_in.contiguous(), b = b_in.contiguous(), sb = sb_in.contiguous();
  const int64_t M = x.size(0);
  TORCH_CHECK_VALUE(M <= INT32_MAX, "quantkernels.", op, ": ", M, " rows exceed this CUDA kernel's limit of ",
                    INT32_MAX);
  const DType xt = to_dtype(x.scalar_type());
  const cudaStream_t stream = stream_of(x);
  at::Tensor q = at::empty({M, K}, x.options().dtype(at::kChar));
  at::Tensor sx = at::empty({M}, x.options().dtype(at::kFloat));
  at::Tensor y = at::empty({M, N}, x.options());
  if (!(threshold > 0)) {  // plain W8A8: quantize, GEMM with the fused bias / cast epilogue
    C10_CUDA_CHECK(quantize_rowwise(x.data_ptr(), xt, M, K, nullptr, q.data_ptr<int8_t>(), sx.data_ptr<float>(), stream));
    C10_CUDA_CHECK(int8_gemm(q.data_ptr<int8_t>(), b.data_ptr<int8_t>(), M, N, K, sx.data_ptr<float>(),
                             sb.data_ptr<float>(), f32_or_null(bias), y.data_ptr(), xt, stream));
    return y;
  }
  // mask -> inlier quantization -> fp32 int8 GEMM (no bias) -> outlier correction + bias + cast
  at::Tensor mask = at::empty({K}, x.options().dtype(at::kByte));
  uint8_t* mp = mask.data_ptr<uint8_t>();
  C10_CUDA_CHECK(outlier_columns(x.data_ptr(), xt, M, K, threshold, mp, stream));
  C10_CUDA_CHECK(quantize_rowwise(x.data_ptr(), xt, M, K, mp, q.data_ptr<int8_t>(), sx.data_ptr<float>(), stream));
  at::Tensor acc = xt == DType::F32 ? y : at::empty({M, N}, x.options().dtype(at::kFloat));
  C10_CUDA_CHECK(int8_gemm(q.data_ptr<int8_t>(), b.data_ptr<int8_t>(), M, N, K, sx.data_ptr<float>(),
                           sb.data_ptr<float>(), nullptr, acc.data_ptr(), DType::F32, stream));
  C10_CUDA_CHECK(llm_int8_correct(acc.data_ptr<float>(), x.data_ptr(), xt, b.data_ptr<int8_t>(), sb.data_ptr<float>(),
                                  mp, f32_or_null(bias), M, N, K, y.data_ptr(), stream));
  return y;
}

}  // namespace
}  // namespace cuda
}  // namespace quantkernels

#ifdef QK_CUDA_EMU
TORCH_LIBRARY_IMPL(quantkernels_cuda_emu, CPU, m) {
#else
TORCH_LIBRARY_IMPL(quantkernels, CUDA, m) {
#endif
  m.impl("quantize_int8_rowwise", &quantkernels::cuda::quantize_int8_rowwise_cuda);
  m.impl("quantize_int8_rowwise_outliers", &quantkernels::cuda::quantize_int8_rowwise_outliers_cuda);
  m.impl("int8_gemm", &quantkernels::cuda::int8_gemm_cuda);
  m.impl("w8a8_gemm", &quantkernels::cuda::w8a8_gemm_cuda);
  m.impl("w4a8_gemm", &quantkernels::cuda::w4a8_gemm_cuda);
  m.impl("w8a16_gemm", &quantkernels::cuda::w8a16_gemm_cuda);
  m.impl("w4a16_gemm", &quantkernels::cuda::w4a16_gemm_cuda);
  m.impl("llm_int8_linear", &quantkernels::cuda::llm_int8_linear_cuda);
  m.impl("gemm_4bit", &quantkernels::cuda::gemm_4bit_cuda);
}
