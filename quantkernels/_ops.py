"""The op contract: schemas (one place), fake kernels, the reference registration, and a
typed, documented Python wrapper per op.

Every op lives in the ``quantkernels`` namespace (``torch.ops.quantkernels.<name>``).
The pure-PyTorch reference (``reference.py``) is registered for every device under
``CompositeExplicitAutograd``; native kernels register for the ``CPU`` / ``CUDA`` keys
and override it. Shapes follow ``F.linear``: weights are ``[N, K]``, activations
``[M, K]``. Numerics: ``docs/numerics.md`` (repeated in each docstring where it matters).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from . import _contracts as C
from . import _validate as V
from . import reference as R

NAMESPACE = "quantkernels"

#: Every op's schema, in one place.
SCHEMAS = {
    "quantize_int8_rowwise": "(Tensor x) -> (Tensor q, Tensor scale)",
    "quantize_int8_tensor": "(Tensor x) -> (Tensor q, Tensor scale)",
    "quantize_int8_rowwise_outliers": "(Tensor x, float threshold) -> (Tensor q, Tensor scale, Tensor outliers)",
    "quantize_int8_asym": "(Tensor x) -> (Tensor q, Tensor scale, Tensor zero)",
    "dequantize_int8": "(Tensor q, Tensor scale, Tensor? zero=None, ScalarType? out_dtype=None) -> Tensor",
    "pack_int4": "(Tensor q) -> Tensor",
    "unpack_int4": "(Tensor packed, bool signed=True) -> Tensor",
    "quantize_int4_sym": "(Tensor w, int group_size) -> (Tensor packed, Tensor scale)",
    "quantize_uint4_asym": "(Tensor w, int group_size) -> (Tensor packed, Tensor scale, Tensor zero)",
    "dequantize_int4": "(Tensor packed, Tensor scale, Tensor? zero=None, ScalarType? out_dtype=None) -> Tensor",
    "int8_gemm": "(Tensor a, Tensor b) -> Tensor",
    "w8a8_gemm": "(Tensor a, Tensor b, Tensor scale_a, Tensor scale_b, Tensor? bias=None, "
                 "ScalarType? out_dtype=None) -> Tensor",
    "w4a8_gemm": "(Tensor a, Tensor b_packed, Tensor scale_a, Tensor scale_b, Tensor? zero_b=None, "
                 "Tensor? bias=None, ScalarType? out_dtype=None) -> Tensor",
    "w8a16_gemm": "(Tensor x, Tensor b, Tensor scale_b, Tensor? bias=None) -> Tensor",
    "w4a16_gemm": "(Tensor x, Tensor b_packed, Tensor scale_b, Tensor? zero_b=None, Tensor? bias=None) -> Tensor",
    "llm_int8_linear": "(Tensor x, Tensor b, Tensor scale_b, Tensor? bias=None, float threshold=6.0) -> Tensor",
    "quantize_4bit": "(Tensor w, str quant_type, int blocksize) -> (Tensor packed, Tensor absmax)",
    "double_quantize_absmax": "(Tensor absmax) -> (Tensor q, Tensor nested_absmax, Tensor offset)",
    "dequantize_4bit": "(Tensor packed, Tensor absmax, str quant_type, int blocksize, Tensor? nested_absmax=None, "
                       "Tensor? offset=None, ScalarType? out_dtype=None) -> Tensor",
    "gemm_4bit": "(Tensor x, Tensor packed, Tensor absmax, str quant_type, int blocksize, "
                 "Tensor? nested_absmax=None, Tensor? offset=None, Tensor? bias=None) -> Tensor",
}

_lib = torch.library.Library(NAMESPACE, "DEF")
for _name, _schema in SCHEMAS.items():
    _lib.define(_name + _schema)
    _lib.impl(_name, getattr(R, _name), "CompositeExplicitAutograd")


def _fake(name):
    return torch.library.register_fake(f"{NAMESPACE}::{name}", lib=_lib)


def _empty(like: Tensor, shape, dtype) -> Tensor:
    return like.new_empty(tuple(shape), dtype=dtype)


# --------------------------------------------------------------------------- fake kernels
# Each validates through the same contract as the reference (``_contracts``) and derives
# the output shapes from the (packed) input shapes.


@_fake("quantize_int8_rowwise")
def _(x):
    C.quantize_int8_rowwise(x)
    return _empty(x, x.shape, torch.int8), _empty(x, x.shape[:-1], torch.float32)


@_fake("quantize_int8_tensor")
def _(x):
    C.quantize_int8_tensor(x)
    return _empty(x, x.shape, torch.int8), _empty(x, (), torch.float32)


@_fake("quantize_int8_rowwise_outliers")
def _(x, threshold):
    C.quantize_int8_rowwise_outliers(x, threshold)
    return (_empty(x, x.shape, torch.int8), _empty(x, x.shape[:1], torch.float32),
            _empty(x, x.shape[1:], torch.bool))


@_fake("quantize_int8_asym")
def _(x):
    C.quantize_int8_asym(x)
    return (_empty(x, x.shape, torch.int8), _empty(x, x.shape[:-1], torch.float32),
            _empty(x, x.shape[:-1], torch.int8))


@_fake("dequantize_int8")
def _(q, scale, zero=None, out_dtype=None):
    return _empty(q, q.shape, C.dequantize_int8(q, scale, zero, out_dtype))


@_fake("pack_int4")
def _(q):
    C.pack_int4(q)
    return _empty(q, (*q.shape[:-1], q.shape[-1] // 2), torch.uint8)


@_fake("unpack_int4")
def _(packed, signed=True):
    C.unpack_int4(packed)
    return _empty(packed, (*packed.shape[:-1], packed.shape[-1] * 2), torch.int8 if signed else torch.uint8)


@_fake("quantize_int4_sym")
def _(w, group_size):
    N, K, G = C.quantize_int4("quantize_int4_sym", w, group_size)
    return _empty(w, (N, K // 2), torch.uint8), _empty(w, (N, K // G), torch.float32)


@_fake("quantize_uint4_asym")
def _(w, group_size):
    N, K, G = C.quantize_int4("quantize_uint4_asym", w, group_size)
    return (_empty(w, (N, K // 2), torch.uint8), _empty(w, (N, K // G), torch.float32),
            _empty(w, (N, K // G), torch.uint8))


@_fake("dequantize_int4")
def _(packed, scale, zero=None, out_dtype=None):
    N, K, dt = C.dequantize_int4(packed, scale, zero, out_dtype)
    return _empty(packed, (N, K), dt)


@_fake("int8_gemm")
def _(a, b):
    return _empty(a, C.int8_gemm(a, b), torch.int32)


@_fake("w8a8_gemm")
def _(a, b, scale_a, scale_b, bias=None, out_dtype=None):
    M, N, dt = C.w8a8_gemm(a, b, scale_a, scale_b, bias, out_dtype)
    return _empty(a, (M, N), dt)


@_fake("w4a8_gemm")
def _(a, b_packed, scale_a, scale_b, zero_b=None, bias=None, out_dtype=None):
    M, N, _, dt = C.w4a8_gemm(a, b_packed, scale_a, scale_b, zero_b, bias, out_dtype)
    return _empty(a, (M, N), dt)


@_fake("w8a16_gemm")
def _(x, b, scale_b, bias=None):
    return _empty(x, C.w8a16_gemm(x, b, scale_b, bias), x.dtype)


@_fake("w4a16_gemm")
def _(x, b_packed, scale_b, zero_b=None, bias=None):
    return _empty(x, C.w4a16_gemm(x, b_packed, scale_b, zero_b, bias), x.dtype)


@_fake("llm_int8_linear")
def _(x, b, scale_b, bias=None, threshold=6.0):
    return _empty(x, C.llm_int8_linear(x, b, scale_b, bias, threshold), x.dtype)


@_fake("quantize_4bit")
def _(w, quant_type, blocksize):
    N, K = C.quantize_4bit(w, quant_type, blocksize)
    return _empty(w, (N, K // 2), torch.uint8), _empty(w, (-(-(N * K) // blocksize),), torch.float32)


@_fake("double_quantize_absmax")
def _(absmax):
    nb2 = C.double_quantize_absmax(absmax)
    return (_empty(absmax, absmax.shape, torch.uint8), _empty(absmax, (nb2,), torch.float32),
            _empty(absmax, (), torch.float32))


@_fake("dequantize_4bit")
def _(packed, absmax, quant_type, blocksize, nested_absmax=None, offset=None, out_dtype=None):
    N, K, dt = C.dequantize_4bit(packed, absmax, quant_type, blocksize, nested_absmax, offset, out_dtype)
    return _empty(packed, (N, K), dt)


@_fake("gemm_4bit")
def _(x, packed, absmax, quant_type, blocksize, nested_absmax=None, offset=None, bias=None):
    return _empty(x, C.gemm_4bit(x, packed, absmax, quant_type, blocksize, nested_absmax, offset, bias), x.dtype)


# --------------------------------------------------------------------------- typed wrappers

_ops = torch.ops.quantkernels


def quantize_int8_rowwise(x: Tensor) -> Tuple[Tensor, Tensor]:
    """Symmetric absmax int8 quantization of each row (per-token / per-channel), docs/numerics.md s.1.

    Args:
        x: float16/bfloat16/float32 ``[..., K]`` (any strides), K >= 1.
    Returns:
        ``q``: int8 ``[..., K]`` in [-127, 127]; ``scale``: float32 ``[...]`` with
        ``x ~= q * scale[..., None]``. All-zero rows get ``scale = 1`` and ``q = 0``. A row
        holding NaN/Inf gets ``q = 0`` and a NaN/Inf scale, so it propagates to outputs.
    """
    return _ops.quantize_int8_rowwise(x)


def quantize_int8_tensor(x: Tensor) -> Tuple[Tensor, Tensor]:
    """Symmetric absmax int8 quantization with one scale for the whole tensor.

    Args:
        x: float16/bfloat16/float32, any shape with a non-empty last dimension.
    Returns:
        ``q``: int8 like ``x``; ``scale``: 0-D float32.
    """
    return _ops.quantize_int8_tensor(x)


def quantize_int8_rowwise_outliers(x: Tensor, threshold: float = 6.0) -> Tuple[Tensor, Tensor, Tensor]:
    """The LLM.int8() activation quantizer (docs/numerics.md s.5), without host synchronisation.

    Args:
        x: float16/bfloat16/float32 ``[M, K]``.
        threshold: columns with any ``|x| >= threshold`` are outliers; ``<= 0`` means none.
    Returns:
        ``q``: int8 ``[M, K]`` of ``x`` with outlier columns zeroed; ``scale``: float32 ``[M]``
        (absmax over the inlier columns only); ``outliers``: bool ``[K]`` column mask, on x's device.
    """
    return _ops.quantize_int8_rowwise_outliers(x, float(threshold))


def quantize_int8_asym(x: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """Asymmetric (min-max, zero-point) int8 quantization of each row, docs/numerics.md s.2.

    Returns:
        ``q``: int8 ``[..., K]`` in [-128, 127]; ``scale``: float32 ``[...]``; ``zero``: int8 ``[...]``,
        with ``x ~= (q - zero) * scale``. 0.0 is exactly representable.
    """
    return _ops.quantize_int8_asym(x)


def dequantize_int8(q: Tensor, scale: Tensor, zero: Optional[Tensor] = None,
                    out_dtype: Optional[torch.dtype] = None) -> Tensor:
    """``(q - zero) * scale`` for int8 ``q [..., K]``.

    Args:
        q: int8 ``[..., K]``.
        scale: float32, 0-D (per-tensor) or ``q.shape[:-1]`` (per-row).
        zero: optional int8 of ``scale``'s shape (asymmetric); None for symmetric.
        out_dtype: float16/bfloat16/float32 (default float32).
    """
    return _ops.dequantize_int8(q, scale, zero, out_dtype)


def pack_int4(q: Tensor) -> Tensor:
    """Packs int4 values two per byte along the last dim (the PLAIN format, docs/numerics.md s.3).

    Args:
        q: int8 in [-8, 7] (signed) or uint8 in [0, 15] (unsigned), ``[..., K]`` with K even.
    Returns:
        uint8 ``[..., K/2]``: ``byte[i] = (q[2i] & 0xF) | (q[2i+1] & 0xF) << 4``.
    """
    return _ops.pack_int4(q)


def unpack_int4(packed: Tensor, signed: bool = True) -> Tensor:
    """Inverse of :func:`pack_int4`: uint8 ``[..., K/2]`` -> int8 (signed) or uint8 ``[..., K]``."""
    return _ops.unpack_int4(packed, signed)


def quantize_int4_sym(w: Tensor, group_size: int = 128) -> Tuple[Tensor, Tensor]:
    """Symmetric group-wise int4 quantization of a weight, docs/numerics.md s.3.

    Args:
        w: float16/bfloat16/float32 ``[N, K]``, K even and a multiple of ``group_size``.
        group_size: 32, 64, 128, 256, or K / -1 (per-channel).
    Returns:
        ``packed``: uint8 ``[N, K/2]`` (PLAIN, signed nibbles); ``scale``: float32 ``[N, K/G]``.
    """
    return _ops.quantize_int4_sym(w, group_size)


def quantize_uint4_asym(w: Tensor, group_size: int = 128) -> Tuple[Tensor, Tensor, Tensor]:
    """Asymmetric group-wise uint4 quantization (GPTQ/AWQ style), docs/numerics.md s.2-3.

    Returns:
        ``packed``: uint8 ``[N, K/2]`` (PLAIN, unsigned nibbles); ``scale``: float32 ``[N, K/G]``;
        ``zero``: uint8 ``[N, K/G]`` in [0, 15], with ``w ~= (q - zero) * scale``.
    """
    return _ops.quantize_uint4_asym(w, group_size)


def dequantize_int4(packed: Tensor, scale: Tensor, zero: Optional[Tensor] = None,
                    out_dtype: Optional[torch.dtype] = None) -> Tensor:
    """Dequantizes a PLAIN int4 weight: uint8 ``[N, K/2]``, float32 scale ``[N, K/G]``, optional
    uint8 zero ``[N, K/G]`` (unsigned nibbles when given, signed otherwise) -> ``[N, K]``."""
    return _ops.dequantize_int4(packed, scale, zero, out_dtype)


def int8_gemm(a: Tensor, b: Tensor) -> Tensor:
    """Exact ``C[m, n] = sum_k a[m, k] * b[n, k]``.

    Args:
        a: int8 ``[M, K]``; b: int8 ``[N, K]`` (F.linear layout); K <= 131071 (int32 bound).
    Returns:
        int32 ``[M, N]``.
    """
    return _ops.int8_gemm(a, b)


def w8a8_gemm(a: Tensor, b: Tensor, scale_a: Tensor, scale_b: Tensor, bias: Optional[Tensor] = None,
              out_dtype: Optional[torch.dtype] = None) -> Tensor:
    """``Y = int8_gemm(a, b) * scale_a[:, None] * scale_b[None, :] + bias`` (fp32 epilogue).

    Args:
        a: int8 ``[M, K]`` (per-token quantized); b: int8 ``[N, K]``;
        scale_a: float32 ``[M]``; scale_b: float32 ``[N]``; bias: optional float ``[N]``;
        out_dtype: float16/bfloat16/float32 (default float32).
    """
    return _ops.w8a8_gemm(a, b, scale_a, scale_b, bias, out_dtype)


def w4a8_gemm(a: Tensor, b_packed: Tensor, scale_a: Tensor, scale_b: Tensor, zero_b: Optional[Tensor] = None,
              bias: Optional[Tensor] = None, out_dtype: Optional[torch.dtype] = None) -> Tensor:
    """Group-wise W4A8: ``Y = scale_a[m] * sum_g scale_b[n, g] * sum_{k in g} a[m, k] * (q[n, k] - zero[n, g])``.

    int32 inside a group, fp32 across groups.

    Args:
        a: int8 ``[M, K]``; b_packed: uint8 ``[N, K/2]`` PLAIN int4 (signed, or unsigned if
        ``zero_b`` is given); scale_a: float32 ``[M]``; scale_b: float32 ``[N, K/G]``;
        zero_b: optional uint8 ``[N, K/G]``; bias: optional ``[N]``; out_dtype as in w8a8_gemm.
    """
    return _ops.w4a8_gemm(a, b_packed, scale_a, scale_b, zero_b, bias, out_dtype)


def w8a16_gemm(x: Tensor, b: Tensor, scale_b: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """Weight-only int8: ``Y = x @ (b * scale_b[:, None])^T + bias`` in x's dtype.

    Args:
        x: float16/bfloat16/float32 ``[M, K]``; b: int8 ``[N, K]``; scale_b: float32 ``[N]``.
    """
    return _ops.w8a16_gemm(x, b, scale_b, bias)


def w4a16_gemm(x: Tensor, b_packed: Tensor, scale_b: Tensor, zero_b: Optional[Tensor] = None,
               bias: Optional[Tensor] = None) -> Tensor:
    """Weight-only int4: ``Y = x @ dequantize_int4(b_packed, scale_b, zero_b)^T + bias`` in x's dtype.

    Args:
        x: float16/bfloat16/float32 ``[M, K]``; b_packed: uint8 ``[N, K/2]`` PLAIN;
        scale_b: float32 ``[N, K/G]``; zero_b: optional uint8 ``[N, K/G]`` (asymmetric uint4).
    """
    return _ops.w4a16_gemm(x, b_packed, scale_b, zero_b, bias)


def llm_int8_linear(x: Tensor, b: Tensor, scale_b: Tensor, bias: Optional[Tensor] = None,
                    threshold: float = 6.0) -> Tensor:
    """LLM.int8() linear with outlier decomposition (docs/numerics.md s.5), no host synchronisation.

    Args:
        x: float16/bfloat16/float32 ``[M, K]``; b: int8 ``[N, K]``; scale_b: float32 ``[N]``;
        bias: optional ``[N]``; threshold: outlier threshold (``<= 0``: plain W8A8).
    Returns:
        ``[M, N]`` in x's dtype.
    """
    return _ops.llm_int8_linear(x, b, scale_b, bias, float(threshold))


def _check_4bit_args(op: str, quant_type, blocksize):
    # before the dispatcher, so that a float or string block size gets our message, not a schema error
    V.quant_type_4bit(op, quant_type)
    V.blocksize_4bit(op, blocksize)


def quantize_4bit(w: Tensor, quant_type: str = "nf4", blocksize: int = 64) -> Tuple[Tensor, Tensor]:
    """NF4 / FP4 block-wise quantization of a weight, bit-compatible with bitsandbytes (docs/numerics.md s.11).

    Args:
        w: float16/bfloat16/float32 ``[N, K]``, K even. Blocks of ``blocksize`` consecutive values
            of the row-major flattened weight (a block may span rows; the last may be partial).
        quant_type: ``"nf4"`` or ``"fp4"``.
        blocksize: 32, 64, 128, 256, 512, 1024, 2048 or 4096.
    Returns:
        ``packed``: uint8 ``[N, K/2]``, ``byte = code[2i] << 4 | code[2i+1]`` (high nibble first);
        ``absmax``: float32 ``[ceil(N*K / blocksize)]``.
    """
    _check_4bit_args("quantize_4bit", quant_type, blocksize)
    return _ops.quantize_4bit(w, quant_type, int(blocksize))


def double_quantize_absmax(absmax: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """Double quantization of 4-bit block absmax values (bitsandbytes' ``compress_statistics``, s.11).

    Returns:
        ``q``: uint8 codes of the 8-bit dynamic map (``reference.DYNAMIC_CODE``), like ``absmax``;
        ``nested_absmax``: float32 ``[ceil(n / 256)]``; ``offset``: 0-D float32, the mean subtracted.
    """
    return _ops.double_quantize_absmax(absmax)


def dequantize_4bit(packed: Tensor, absmax: Tensor, quant_type: str = "nf4", blocksize: int = 64,
                    nested_absmax: Optional[Tensor] = None, offset: Optional[Tensor] = None,
                    out_dtype: Optional[torch.dtype] = None) -> Tensor:
    """``code[nibble] * absmax[block]`` -> ``[N, K]`` in ``out_dtype`` (default float32), s.11.

    With double quantization ``absmax`` is the uint8 output of :func:`double_quantize_absmax` and
    ``nested_absmax`` / ``offset`` must be given."""
    _check_4bit_args("dequantize_4bit", quant_type, blocksize)
    return _ops.dequantize_4bit(packed, absmax, quant_type, int(blocksize), nested_absmax, offset, out_dtype)


def gemm_4bit(x: Tensor, packed: Tensor, absmax: Tensor, quant_type: str = "nf4", blocksize: int = 64,
              nested_absmax: Optional[Tensor] = None, offset: Optional[Tensor] = None,
              bias: Optional[Tensor] = None) -> Tensor:
    """Weight-only NF4/FP4: ``Y = x @ dequantize_4bit(...)^T + bias`` in x's dtype (s.4 and s.11).

    Args:
        x: float16/bfloat16/float32 ``[M, K]``; the weight as returned by :func:`quantize_4bit`
        (and :func:`double_quantize_absmax`); bias: optional ``[N]``.
    """
    _check_4bit_args("gemm_4bit", quant_type, blocksize)
    return _ops.gemm_4bit(x, packed, absmax, quant_type, int(blocksize), nested_absmax, offset, bias)


OP_NAMES = tuple(SCHEMAS)
