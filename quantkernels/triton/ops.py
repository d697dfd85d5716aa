"""The Triton ops: ``quantkernels::<op>_triton``, one per base op, with the base op's
arguments (names, types, defaults; return values are unnamed, as ``triton_op`` infers the
schema from these annotations). Each validates its inputs with the same contract (``_contracts``)
as the reference, then launches the kernels through ``wrap_triton`` so that
``torch.compile(fullgraph=True)`` traces into them.

Importing this module does not import triton: the kernel modules are imported on the first
call, in whichever mode (GPU or interpreter) the process runs Triton in (see ``_common``).
"""

from __future__ import annotations

import importlib
from typing import Optional, Tuple

import torch
from torch import Tensor

from .. import _contracts as C

NAMESPACE = "quantkernels"

#: Base op name -> Triton op name, for every op this module registers.
OPS = {}


def _mod(name: str):
    return importlib.import_module(f"{__package__}.{name}")


def _device_ok(op: str, t: Tensor) -> None:
    _mod("_common").check_device(op, t)


def _register(base: str):
    def deco(fn):
        name = f"{NAMESPACE}::{base}_triton"
        OPS[base] = f"{base}_triton"
        return torch.library.triton_op(name, fn, mutates_args=())

    return deco


@_register("quantize_int8_rowwise")
def quantize_int8_rowwise_triton(x: Tensor) -> Tuple[Tensor, Tensor]:
    op = "quantize_int8_rowwise"
    C.quantize_int8_rowwise(x)
    _device_ok(op, x)
    q, s = _mod("quantize").quantize_rows(x.reshape(-1, x.shape[-1]))
    return q.reshape(x.shape), s.reshape(x.shape[:-1])


@_register("quantize_int8_rowwise_outliers")
def quantize_int8_rowwise_outliers_triton(x: Tensor, threshold: float) -> Tuple[Tensor, Tensor, Tensor]:
    op = "quantize_int8_rowwise_outliers"
    C.quantize_int8_rowwise_outliers(x, threshold)
    _device_ok(op, x)
    Q = _mod("quantize")
    mask = Q.outlier_columns(x, threshold)
    q, s = Q.quantize_rows(x, mask if threshold > 0 else None)
    return q, s, mask


@_register("int8_gemm")
def int8_gemm_triton(a: Tensor, b: Tensor) -> Tensor:
    op = "int8_gemm"
    C.int8_gemm(a, b)
    _device_ok(op, a)
    return _mod("int8_gemm").gemm(a, b)


@_register("w8a8_gemm")
def w8a8_gemm_triton(a: Tensor, b: Tensor, scale_a: Tensor, scale_b: Tensor, bias: Optional[Tensor] = None,
                     out_dtype: Optional[torch.dtype] = None) -> Tensor:
    op = "w8a8_gemm"
    _, _, dt = C.w8a8_gemm(a, b, scale_a, scale_b, bias, out_dtype)
    _device_ok(op, a)
    return _mod("int8_gemm").gemm(a, b, scale_a, scale_b, bias, dt)


@_register("w4a8_gemm")
def w4a8_gemm_triton(a: Tensor, b_packed: Tensor, scale_a: Tensor, scale_b: Tensor, zero_b: Optional[Tensor] = None,
                     bias: Optional[Tensor] = None, out_dtype: Optional[torch.dtype] = None) -> Tensor:
    op = "w4a8_gemm"
    _, _, _, dt = C.w4a8_gemm(a, b_packed, scale_a, scale_b, zero_b, bias, out_dtype)
    _device_ok(op, a)
    return _mod("w4a8").gemm(a, b_packed, scale_a, scale_b, zero_b, bias, dt)


@_register("w8a16_gemm")
def w8a16_gemm_triton(x: Tensor, b: Tensor, scale_b: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    op = "w8a16_gemm"
    C.w8a16_gemm(x, b, scale_b, bias)
    _device_ok(op, x)
    return _mod("weight_only").gemm(x, b, scale_b, None, bias, int4=False)


@_register("w4a16_gemm")
def w4a16_gemm_triton(x: Tensor, b_packed: Tensor, scale_b: Tensor, zero_b: Optional[Tensor] = None,
                      bias: Optional[Tensor] = None) -> Tensor:
    op = "w4a16_gemm"
    C.w4a16_gemm(x, b_packed, scale_b, zero_b, bias)
    _device_ok(op, x)
    return _mod("weight_only").gemm(x, b_packed, scale_b, zero_b, bias, int4=True)


@_register("llm_int8_linear")
def llm_int8_linear_triton(x: Tensor, b: Tensor, scale_b: Tensor, bias: Optional[Tensor] = None,
                           threshold: float = 6.0) -> Tensor:
    op = "llm_int8_linear"
    C.llm_int8_linear(x, b, scale_b, bias, threshold)
    _device_ok(op, x)
    Q = _mod("quantize")
    if threshold > 0:
        mask = Q.outlier_columns(x, threshold)
        q, sx = Q.quantize_rows(x, mask)
        return _mod("int8_gemm").gemm(q, b, sx, scale_b, bias, x.dtype, x=x, outliers=mask)
    q, sx = Q.quantize_rows(x)
    return _mod("int8_gemm").gemm(q, b, sx, scale_b, bias, x.dtype)


@_register("gemm_4bit")
def gemm_4bit_triton(x: Tensor, packed: Tensor, absmax: Tensor, quant_type: str, blocksize: int,
                     nested_absmax: Optional[Tensor] = None, offset: Optional[Tensor] = None,
                     bias: Optional[Tensor] = None) -> Tensor:
    op = "gemm_4bit"
    C.gemm_4bit(x, packed, absmax, quant_type, blocksize, nested_absmax, offset, bias)
    _device_ok(op, x)
    return _mod("gemm_4bit").gemm(x, packed, absmax, quant_type, int(blocksize), nested_absmax, offset, bias)
