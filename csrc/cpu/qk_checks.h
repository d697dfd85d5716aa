// Argument checks for the C++ CPU kernels whose messages match quantkernels/_validate.py
// ("quantkernels.<op>: <arg> must ..., got <value>"; TypeError for dtypes, ValueError otherwise).
#pragma once

#include <optional>
#include <string>

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include "cpu_isa.h"
#include "qk_limits.h"

namespace quantkernels {
namespace cpu {
namespace checks {

// Python's tuple repr: (3,), (2, 5), ().
inline std::string shape_str(at::IntArrayRef s) {
  std::string r = "(";
  for (size_t i = 0; i < s.size(); ++i) {
    r += std::to_string(s[i]);
    if (s.size() == 1 || i + 1 < s.size()) r += s.size() == 1 ? "," : ", ";
  }
  return r + ")";
}

inline bool is_float(at::ScalarType t) { return t == at::kFloat || t == at::kHalf || t == at::kBFloat16; }

#define QK_FLOAT_DTYPES "['torch.float16', 'torch.bfloat16', 'torch.float32']"

inline void dtype_is(const char* op, const char* name, const at::Tensor& t, at::ScalarType want) {
  TORCH_CHECK_TYPE(t.scalar_type() == want, "quantkernels.", op, ": ", name, " must have dtype in ['",
                   dtype_name(want), "'], got ", dtype_name(t.scalar_type()));
}

inline void float_dtype(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK_TYPE(is_float(t.scalar_type()), "quantkernels.", op, ": ", name,
                   " must have dtype in " QK_FLOAT_DTYPES ", got ", dtype_name(t.scalar_type()));
}

// _validate.float_rows
inline void float_rows(const char* op, const char* name, const at::Tensor& x, int64_t min_dim) {
  float_dtype(op, name, x);
  TORCH_CHECK_VALUE(x.dim() >= min_dim, "quantkernels.", op, ": ", name, " must have at least ", min_dim,
                    " dimension(s), got a ", x.dim(), "-D tensor");
  TORCH_CHECK_VALUE(x.size(-1) > 0, "quantkernels.", op, ": ", name,
                    " must have a non-empty last dimension K, got shape ", shape_str(x.sizes()));
}

inline void ndim_is(const char* op, const char* name, const at::Tensor& t, int64_t ndim, const char* what) {
  TORCH_CHECK_VALUE(t.dim() == ndim, "quantkernels.", op, ": ", name, " must be ", ndim, "-D ", what,
                    ", got shape ", shape_str(t.sizes()));
}

inline void shape_is(const char* op, const char* name, const at::Tensor& t, at::IntArrayRef shape,
                     const char* what) {
  TORCH_CHECK_VALUE(t.sizes() == shape, "quantkernels.", op, ": ", name, " must have shape ", shape_str(shape),
                    (what[0] ? " " : ""), what, ", got ", shape_str(t.sizes()));
}

inline void same_device(const char* op, const char* name, const at::Tensor& t, const char* first_name,
                        const at::Tensor& first) {
  TORCH_CHECK_VALUE(t.device() == first.device(), "quantkernels.", op, ": ", name, " is on ", t.device(),
                    " but ", first_name, " is on ", first.device(), "; all tensors must be on one device");
}

// _validate.bias
inline void bias(const char* op, const std::optional<at::Tensor>& b, int64_t N, const at::Tensor& ref) {
  if (!b.has_value()) return;
  float_dtype(op, "bias", *b);
  const int64_t shape[1] = {N};
  shape_is(op, "bias", *b, shape, "(one value per output channel N)");
  same_device(op, "the other inputs", ref, "bias", *b);
}

// _validate.k_bound
inline void k_bound(const char* op, int64_t K, int64_t limit, const char* what) {
  TORCH_CHECK_VALUE(K <= limit, "quantkernels.", op, ": ", what, " = ", K, " exceeds ", limit,
                    ", beyond which the int32 accumulator could overflow");
}

// _validate.zero_points: int4 zero points in [0, kMaxZeroInt4]. Reads the values (the one check
// that does), so the CUDA bindings skip it while a CUDA graph is being captured.
inline void zero_points(const char* op, const char* name, const at::Tensor& z) {
  if (z.numel() == 0) return;
  const int64_t mx = z.max().item<int64_t>();
  TORCH_CHECK_VALUE(mx <= kMaxZeroInt4, "quantkernels.", op, ": ", name, " must hold int4 zero points in [0, ",
                    kMaxZeroInt4, "], got ", mx);
}

// _validate.out_dtype
inline at::ScalarType out_dtype(const char* op, std::optional<at::ScalarType> dt) {
  const at::ScalarType t = dt.value_or(at::kFloat);
  TORCH_CHECK_TYPE(is_float(t), "quantkernels.", op, ": out_dtype must be one of float16, bfloat16, float32, got ",
                   dtype_name(t));
  return t;
}

// _contracts.weight_4bit: the NF4 / FP4 weight (packed, absmax, double quantization) of s.11; shared by the
// CPU kernel and the CUDA bindings.
inline void weight_4bit(const char* op, const at::Tensor& packed, const at::Tensor& absmax, const std::string& qt,
                        int64_t bs, const std::optional<at::Tensor>& nested, const std::optional<at::Tensor>& offset) {
  TORCH_CHECK_VALUE(qt == "nf4" || qt == "fp4", "quantkernels.", op,
                    ": quant_type must be one of ('nf4', 'fp4'), got '", qt, "'");
  TORCH_CHECK_VALUE(bs >= 32 && bs <= 4096 && (bs & (bs - 1)) == 0, "quantkernels.", op,
                    ": blocksize must be one of (32, 64, 128, 256, 512, 1024, 2048, 4096) (a power of two from 32 "
                    "to 4096), got ", bs);
  dtype_is(op, "packed", packed, at::kByte);
  ndim_is(op, "packed", packed, 2, "[N, K/2] (two 4-bit codes per byte along K)");
  const int64_t N = packed.size(0), K = packed.size(1) * 2, nb = (N * K + bs - 1) / bs;
  TORCH_CHECK_VALUE(nested.has_value() == offset.has_value(), "quantkernels.", op,
                    ": nested_absmax and offset go together (double quantization): got nested_absmax=",
                    nested.has_value() ? "a tensor" : "None", ", offset=", offset.has_value() ? "a tensor" : "None");
  if (!nested.has_value()) {
    dtype_is(op, "absmax", absmax, at::kFloat);
  } else {
    dtype_is(op, "absmax", absmax, at::kByte);
    dtype_is(op, "nested_absmax", *nested, at::kFloat);
    const int64_t s2[1] = {(nb + 255) / 256};
    const std::string what = "(one scale per 256 blocks of " + std::to_string(bs) + " values)";
    shape_is(op, "nested_absmax", *nested, s2, what.c_str());
    dtype_is(op, "offset", *offset, at::kFloat);
    shape_is(op, "offset", *offset, at::IntArrayRef{}, "(the 0-D mean subtracted from the absmax values)");
  }
  const int64_t s1[1] = {nb};
  const std::string what = "(one per block of " + std::to_string(bs) + " values of the flattened [" +
                           std::to_string(N) + ", " + std::to_string(K) + "] weight)";
  shape_is(op, "absmax", absmax, s1, what.c_str());
  same_device(op, "absmax", absmax, "packed", packed);
  if (nested.has_value()) {
    same_device(op, "nested_absmax", *nested, "packed", packed);
    same_device(op, "offset", *offset, "packed", packed);
  }
}

}  // namespace checks
}  // namespace cpu
}  // namespace quantkernels
