"""Each op's argument contract, in one place: the reference, the fake kernels and the Triton
ops all call ``<op>(...)`` here, which validates every argument (metadata only: dtype, shape,
device, group size, K bound) and returns what the output shapes need. The C++ launchers
mirror these messages with TORCH_CHECK."""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from . import _validate as V

#: int32 inside a W4A8 group: |a| <= 128 and |q - zero| <= 15 (csrc/qk_limits.h: kMaxGroupW4A8;
#: tests/test_limits.py checks that both say the same).
MAX_GROUP_W4A8 = (2**31 - 1) // (128 * V.MAX_ZERO_INT4)


# --------------------------------------------------------------------------- shared pieces


def int8_operands(op: str, a: Tensor, b: Tensor, b_is_packed: bool = False) -> Tuple[int, int, int]:
    V.dtype_in(op, "a", a, (torch.int8,))
    V.ndim_is(op, "a", a, 2, "[M, K] activation")
    M, K = a.shape
    if b_is_packed:
        V.int4_packed(op, "b_packed", b)
        N = b.shape[0]
        V.check(b.shape[1] * 2 == K, op,
                lambda: f"b_packed must have shape [N, K/2] = [N, {K // 2}] for a's K = {K}, got {tuple(b.shape)}")
    else:
        V.dtype_in(op, "b", b, (torch.int8,))
        V.ndim_is(op, "b", b, 2, "[N, K] weight")
        N = b.shape[0]
        V.check(b.shape[1] == K, op,
                lambda: f"b must have K = {K} columns to match a {tuple(a.shape)}, got shape {tuple(b.shape)}")
    V.same_device(op, **{"a": a, "b_packed" if b_is_packed else "b": b})
    return M, N, K


def int4_weight(op: str, packed: Tensor, scale: Tensor, zero: Optional[Tensor]) -> Tuple[int, int, int]:
    """A PLAIN int4 weight: uint8 [N, K/2], fp32 scales [N, K/G], optional uint8 zeros; returns N, K, G."""
    pname, sname, zname = ("packed", "scale", "zero") if op == "dequantize_int4" else ("b_packed", "scale_b", "zero_b")
    V.int4_packed(op, pname, packed)
    N, K = packed.shape[0], packed.shape[1] * 2
    G = V.groups_of(op, sname, scale, N, K)
    if zero is not None:
        V.dtype_in(op, zname, zero, (torch.uint8,))
        V.shape_is(op, zname, zero, tuple(scale.shape), f"(the shape of {sname})")
    V.same_device(op, **{pname: packed, sname: scale, zname: zero})
    V.zero_points(op, zname, zero)
    return N, K, G


def scales(op: str, scale_a: Tensor, M: int, scale_b: Tensor, N: int, ref: Tensor, per_group: bool = False):
    V.dtype_in(op, "scale_a", scale_a, (torch.float32,))
    V.shape_is(op, "scale_a", scale_a, (M,), "(one per-token scale per row of a)")
    if not per_group:
        V.dtype_in(op, "scale_b", scale_b, (torch.float32,))
        V.shape_is(op, "scale_b", scale_b, (N,), "(one per-channel scale per row of b)")
    V.same_device(op, a=ref, scale_a=scale_a, scale_b=scale_b)


def weight_only_x(op: str, x: Tensor, K: int):
    V.float_rows(op, "x", x, min_dim=2)
    V.ndim_is(op, "x", x, 2, "[M, K] activation")
    V.check(x.shape[1] == K, op,
            lambda: f"x has K = {x.shape[1]} columns but the weight has K = {K} (x shape {tuple(x.shape)})")


def int8_weight(op: str, x: Tensor, b: Tensor, scale_b: Tensor) -> Tuple[int, int]:
    """x [M, K] float with an int8 weight [N, K] and per-channel scales [N]; returns N, K."""
    V.dtype_in(op, "b", b, (torch.int8,))
    V.ndim_is(op, "b", b, 2, "[N, K] weight")
    N, K = b.shape
    weight_only_x(op, x, K)
    V.dtype_in(op, "scale_b", scale_b, (torch.float32,))
    V.shape_is(op, "scale_b", scale_b, (N,), "(one per-channel scale per row of b)")
    V.same_device(op, x=x, b=b, scale_b=scale_b)
    return N, K


def _threshold(op: str, threshold: float):
    V.check(threshold == threshold, op, lambda: f"threshold must be a number, got {threshold}")


# --------------------------------------------------------------------------- per op


def quantize_int8_rowwise(x: Tensor):
    V.float_rows("quantize_int8_rowwise", "x", x)


def quantize_int8_tensor(x: Tensor):
    V.float_rows("quantize_int8_tensor", "x", x)


def quantize_int8_rowwise_outliers(x: Tensor, threshold: float):
    op = "quantize_int8_rowwise_outliers"
    V.float_rows(op, "x", x, min_dim=2)
    V.check(x.dim() == 2, op, lambda: f"x must be 2-D [M, K], got shape {tuple(x.shape)}")
    _threshold(op, threshold)


def quantize_int8_asym(x: Tensor):
    V.float_rows("quantize_int8_asym", "x", x)


def dequantize_int8(q: Tensor, scale: Tensor, zero: Optional[Tensor], out_dtype: Optional[torch.dtype]) -> torch.dtype:
    op = "dequantize_int8"
    V.dtype_in(op, "q", q, (torch.int8,))
    V.dtype_in(op, "scale", scale, (torch.float32,))
    dt = V.out_dtype(op, out_dtype)
    V.check(q.dim() >= 1, op, lambda: "q must have at least 1 dimension, got a 0-D tensor")
    V.check(scale.dim() == 0 or tuple(scale.shape) == tuple(q.shape[:-1]), op,
            lambda: f"scale must be 0-D (per-tensor) or have shape q.shape[:-1] = {tuple(q.shape[:-1])} "
                    f"(per-row), got {tuple(scale.shape)}")
    if zero is not None:
        V.dtype_in(op, "zero", zero, (torch.int8,))
        V.shape_is(op, "zero", zero, scale.shape, "(the shape of scale)")
    V.same_device(op, q=q, scale=scale, zero=zero)
    return dt


def pack_int4(q: Tensor):
    V.dtype_in("pack_int4", "q", q, (torch.int8, torch.uint8))
    V.check(q.dim() >= 1 and q.shape[-1] % 2 == 0, "pack_int4",
            lambda: f"q must have an even last dimension K (two values per byte), got shape {tuple(q.shape)}")


def unpack_int4(packed: Tensor):
    V.dtype_in("unpack_int4", "packed", packed, (torch.uint8,))
    V.check(packed.dim() >= 1, "unpack_int4", "packed must have at least 1 dimension, got a 0-D tensor")


def quantize_int4(op: str, w: Tensor, group_size: int) -> Tuple[int, int, int]:
    """quantize_int4_sym / quantize_uint4_asym: returns N, K, G."""
    V.float_rows(op, "w", w, min_dim=2)
    V.ndim_is(op, "w", w, 2, "[N, K] weight")
    N, K = w.shape
    V.check(K % 2 == 0, op, lambda: f"K = {K} must be even to pack two int4 values per byte")
    return N, K, V.group_size(op, group_size, K)


def dequantize_int4(packed: Tensor, scale: Tensor, zero: Optional[Tensor],
                    out_dtype: Optional[torch.dtype]) -> Tuple[int, int, torch.dtype]:
    N, K, _ = int4_weight("dequantize_int4", packed, scale, zero)
    return N, K, V.out_dtype("dequantize_int4", out_dtype)


def int8_gemm(a: Tensor, b: Tensor) -> Tuple[int, int]:
    M, N, K = int8_operands("int8_gemm", a, b)
    V.k_bound("int8_gemm", K)
    return M, N


def w8a8_gemm(a, b, scale_a, scale_b, bias, out_dtype) -> Tuple[int, int, torch.dtype]:
    op = "w8a8_gemm"
    M, N, K = int8_operands(op, a, b)
    V.k_bound(op, K)
    scales(op, scale_a, M, scale_b, N, a)
    V.bias(op, bias, N, a)
    return M, N, V.out_dtype(op, out_dtype)


def w4a8_gemm(a, b_packed, scale_a, scale_b, zero_b, bias, out_dtype) -> Tuple[int, int, int, torch.dtype]:
    op = "w4a8_gemm"
    M, N, K = int8_operands(op, a, b_packed, b_is_packed=True)
    _, _, G = int4_weight(op, b_packed, scale_b, zero_b)
    scales(op, scale_a, M, scale_b, N, a, per_group=True)
    V.k_bound(op, G, limit=MAX_GROUP_W4A8, what="group_size")
    V.bias(op, bias, N, a)
    return M, N, G, V.out_dtype(op, out_dtype)


def w8a16_gemm(x, b, scale_b, bias) -> Tuple[int, int]:
    N, _ = int8_weight("w8a16_gemm", x, b, scale_b)
    V.bias("w8a16_gemm", bias, N, x)
    return x.shape[0], N


def w4a16_gemm(x, b_packed, scale_b, zero_b, bias) -> Tuple[int, int]:
    op = "w4a16_gemm"
    N, K, _ = int4_weight(op, b_packed, scale_b, zero_b)
    weight_only_x(op, x, K)
    V.same_device(op, x=x, b_packed=b_packed)
    V.bias(op, bias, N, x)
    return x.shape[0], N


def llm_int8_linear(x, b, scale_b, bias, threshold) -> Tuple[int, int]:
    op = "llm_int8_linear"
    N, K = int8_weight(op, x, b, scale_b)
    V.k_bound(op, K)
    V.bias(op, bias, N, x)
    _threshold(op, threshold)
    return x.shape[0], N


# --------------------------------------------------------------------------- NF4 / FP4 (docs/numerics.md s.11)


def quantize_4bit(w: Tensor, quant_type: str, blocksize: int) -> Tuple[int, int]:
    op = "quantize_4bit"
    V.float_rows(op, "w", w, min_dim=2)
    V.ndim_is(op, "w", w, 2, "[N, K] weight")
    N, K = w.shape
    V.check(K % 2 == 0, op, lambda: f"K = {K} must be even to pack two 4-bit codes per byte (w shape {tuple(w.shape)})")
    V.quant_type_4bit(op, quant_type)
    V.blocksize_4bit(op, blocksize)
    return N, K


def double_quantize_absmax(absmax: Tensor) -> int:
    op = "double_quantize_absmax"
    V.dtype_in(op, "absmax", absmax, (torch.float32,))
    V.ndim_is(op, "absmax", absmax, 1, "[n_blocks] vector of block absmax values")
    V.check(absmax.numel() > 0, op, "absmax must hold at least one value, got an empty tensor")
    V.all_finite(op, "absmax", absmax, "double quantization needs finite absmax values (their mean is subtracted)")
    return -(-absmax.numel() // 256)


def weight_4bit(op: str, packed: Tensor, absmax: Tensor, quant_type: str, blocksize: int,
                nested_absmax: Optional[Tensor], offset: Optional[Tensor]) -> Tuple[int, int]:
    """A packed NF4/FP4 weight: uint8 [N, K/2], block absmax (fp32, or uint8 codes with nested_absmax
    and offset under double quantization); returns N, K."""
    V.quant_type_4bit(op, quant_type)
    V.blocksize_4bit(op, blocksize)
    V.dtype_in(op, "packed", packed, (torch.uint8,))
    V.ndim_is(op, "packed", packed, 2, "[N, K/2] (two 4-bit codes per byte along K)")
    N, K = packed.shape[0], packed.shape[1] * 2
    nb = -(-(N * K) // blocksize)
    V.check((nested_absmax is None) == (offset is None), op,
            lambda: "nested_absmax and offset go together (double quantization): got "
                    f"nested_absmax={'None' if nested_absmax is None else 'a tensor'}, "
                    f"offset={'None' if offset is None else 'a tensor'}")
    if nested_absmax is None:
        V.dtype_in(op, "absmax", absmax, (torch.float32,))
    else:
        V.dtype_in(op, "absmax", absmax, (torch.uint8,))
        V.dtype_in(op, "nested_absmax", nested_absmax, (torch.float32,))
        V.shape_is(op, "nested_absmax", nested_absmax, (-(-nb // 256),),
                   f"(one scale per 256 blocks of {blocksize} values)")
        V.dtype_in(op, "offset", offset, (torch.float32,))
        V.shape_is(op, "offset", offset, (), "(the 0-D mean subtracted from the absmax values)")
    V.shape_is(op, "absmax", absmax, (nb,), f"(one per block of {blocksize} values of the flattened [{N}, {K}] weight)")
    V.same_device(op, packed=packed, absmax=absmax, nested_absmax=nested_absmax, offset=offset)
    return N, K


def dequantize_4bit(packed, absmax, quant_type, blocksize, nested_absmax, offset, out_dtype):
    op = "dequantize_4bit"
    N, K = weight_4bit(op, packed, absmax, quant_type, blocksize, nested_absmax, offset)
    return N, K, V.out_dtype(op, out_dtype)


def gemm_4bit(x, packed, absmax, quant_type, blocksize, nested_absmax, offset, bias) -> Tuple[int, int]:
    op = "gemm_4bit"
    N, K = weight_4bit(op, packed, absmax, quant_type, blocksize, nested_absmax, offset)
    weight_only_x(op, x, K)
    V.same_device(op, x=x, packed=packed)
    V.bias(op, bias, N, x)
    return x.shape[0], N
