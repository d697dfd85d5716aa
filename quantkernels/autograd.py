"""Backward for the quantkernels ops and ``QuantLinear`` (docs/numerics.md s.10).

- ``quantkernels::quant_linear`` is the whole forward of a ``QuantLinear`` (any scheme, any
  backend) as one op with a registered backward: the gradient with respect to the float input
  is the straight-through estimator ``grad_x = grad_y @ W_deq`` for the schemes that quantize
  activations (w8a8, w4a8, llm_int8) and the exact gradient ``grad_y @ W'`` for the weight-only
  ones (w8a16, w4a16), plus ``grad_bias = sum_m grad_y`` when the bias requires grad.
  ``QuantLinear.forward`` calls it whenever autograd has something to record, and the plain op
  sequence otherwise (inference is unchanged, bit for bit and in speed).
- The float-activation ops ``w8a16_gemm``, ``w4a16_gemm``, ``llm_int8_linear`` (and their
  ``_triton`` variants) get the same backward.
- Every other op that takes a float tensor has no backward and **raises** when one is asked
  for (the quantizers, whose outputs are integer codes; ``w8a8_gemm`` / ``w4a8_gemm`` with
  respect to their scales; ``dequantize_*`` with respect to scales). Quantized weights are
  frozen: integer tensors cannot require grad (PyTorch refuses), and a float weight scale or
  zero that requires grad makes the backward raise.

The backward GEMM reads the packed weight directly: it dequantizes one K-panel of ``W [N, K]``
at a time (``dequantize_int8`` / ``dequantize_int4`` through the dispatcher, so the native
kernel where one is registered) and multiplies ``grad_y [M, N]`` by it in fp32, so at most
``PANEL_ELEMS`` float weights of one layer exist at once. It runs the same on every backend and
device (the dequantization is bit-exact across backends, docs/numerics.md s.6).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import _contracts as C
from . import dispatch

NAMESPACE = "quantkernels"

#: Largest number of float weights one backward panel holds (8 MiB in fp32).
PANEL_ELEMS = 1 << 21

_lib = torch.library.Library(NAMESPACE, "FRAGMENT")
_lib.define("quant_linear(Tensor x, Tensor qweight, Tensor weight_scale, Tensor? weight_zero, Tensor? bias, "
            "str scheme, float threshold=6.0, str backend=\"auto\") -> Tensor")

#: scheme -> kind of the weight: (int4?, unsigned with zero points?)
_WEIGHT_KIND = {
    "w8a8": (False, False),
    "llm_int8": (False, False),
    "w8a16": (False, False),
    "w4a16": (True, True),
    "w4a8": (True, False),
}


class NoBackwardError(RuntimeError):
    """Backward was asked of an op (or an input of an op) that has none; the message says why."""


def _forward(x: Tensor, qweight: Tensor, weight_scale: Tensor, weight_zero: Optional[Tensor],
             bias: Optional[Tensor], scheme: str, threshold: float = 6.0, backend: str = "auto") -> Tensor:
    """The op sequence of docs/numerics.md s.8 for a 2-D ``x [M, K]``; output in x's dtype."""
    def k(op):
        return dispatch.resolve(backend, op, x.device)

    if scheme == "w8a8":
        q, sa = k("quantize_int8_rowwise")(x)
        return k("w8a8_gemm")(q, qweight, sa, weight_scale, bias, x.dtype)
    if scheme == "w4a8":
        q, sa = k("quantize_int8_rowwise")(x)
        return k("w4a8_gemm")(q, qweight, sa, weight_scale, None, bias, x.dtype)
    if scheme == "llm_int8":
        return k("llm_int8_linear")(x, qweight, weight_scale, bias, threshold)
    if scheme == "w8a16":
        return k("w8a16_gemm")(x, qweight, weight_scale, bias)
    if scheme == "w4a16":
        return k("w4a16_gemm")(x, qweight, weight_scale, weight_zero, bias)
    raise ValueError(f"quantkernels.quant_linear: scheme must be one of {tuple(_WEIGHT_KIND)}, got {scheme!r}")


def _needs_autograd(*tensors: Optional[Tensor]) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def quant_linear(x: Tensor, qweight: Tensor, weight_scale: Tensor, weight_zero: Optional[Tensor],
                 bias: Optional[Tensor], scheme: str, threshold: float = 6.0, backend: str = "auto") -> Tensor:
    """``y = x @ W^T + bias`` for a 2-D ``x [M, K]`` and a quantized ``W`` in ``scheme``'s format
    (the buffers of a ``QuantLinear``), run by ``backend``. Differentiable with respect to ``x``
    and ``bias`` (docs/numerics.md s.10); plain op calls when nothing requires grad."""
    if _needs_autograd(x, bias, weight_scale, weight_zero):
        return torch.ops.quantkernels.quant_linear(x, qweight, weight_scale, weight_zero, bias, scheme,
                                                   float(threshold), backend)
    return _forward(x, qweight, weight_scale, weight_zero, bias, scheme, threshold, backend)


_lib.impl("quant_linear", _forward, "CompositeExplicitAutograd")


@torch.library.register_fake(f"{NAMESPACE}::quant_linear", lib=_lib)
def _(x, qweight, weight_scale, weight_zero, bias, scheme, threshold=6.0, backend="auto"):
    dispatch.check_backend(backend)
    if scheme in ("w8a8", "w4a8"):
        C.quantize_int8_rowwise(x)
        a = x.new_empty(x.shape, dtype=torch.int8)
        sa = x.new_empty(x.shape[:-1], dtype=torch.float32)
        if scheme == "w8a8":
            C.w8a8_gemm(a, qweight, sa, weight_scale, bias, x.dtype)
        else:
            C.w4a8_gemm(a, qweight, sa, weight_scale, None, bias, x.dtype)
    elif scheme == "llm_int8":
        C.llm_int8_linear(x, qweight, weight_scale, bias, threshold)
    elif scheme == "w8a16":
        C.w8a16_gemm(x, qweight, weight_scale, bias)
    elif scheme == "w4a16":
        C.w4a16_gemm(x, qweight, weight_scale, weight_zero, bias)
    else:
        raise ValueError(f"quantkernels.quant_linear: scheme must be one of {tuple(_WEIGHT_KIND)}, got {scheme!r}")
    return x.new_empty((x.shape[0], qweight.shape[0]))


# --------------------------------------------------------------------------- the backward GEMM


#: Narrowest panel: below it the backward GEMM re-reads grad_y too often (only for N > PANEL_ELEMS / 16).
MIN_PANEL = 16


def _panel_width(N: int, K: int, G: int, int4: bool) -> int:
    """Columns of W per backward panel: about PANEL_ELEMS / N (at least MIN_PANEL), at most K; for
    int4 even and either a multiple of the group size G or a power of two dividing it (a panel
    never straddles a group boundary)."""
    width = max(MIN_PANEL, PANEL_ELEMS // max(N, 1))
    if int4 and G < K:
        width = width // G * G if width >= G else 1 << (width.bit_length() - 1)
    elif int4:
        width -= width % 2
    return min(K, width)


def _dequant_panel(qweight: Tensor, weight_scale: Tensor, weight_zero: Optional[Tensor], int4: bool, G: int,
                   k0: int, k1: int, dtype: torch.dtype) -> Tensor:
    """Columns k0..k1 of the dequantized weight, [N, k1 - k0] in ``dtype`` (k0..k1 whole groups, or
    a part of one group, when G < K)."""
    if not int4:
        return torch.ops.quantkernels.dequantize_int8.default(qweight[:, k0:k1], weight_scale, None, dtype)
    K = qweight.shape[1] * 2
    if G == K:
        g0, g1 = 0, 1
    elif k1 - k0 >= G:
        g0, g1 = k0 // G, k1 // G
    else:  # inside one group: its scale is the panel's per-channel scale
        g0, g1 = k0 // G, k0 // G + 1
    zero = None if weight_zero is None else weight_zero[:, g0:g1]
    return torch.ops.quantkernels.dequantize_int4.default(qweight[:, k0 // 2:k1 // 2], weight_scale[:, g0:g1], zero,
                                                          dtype)


def grad_input(grad_y: Tensor, qweight: Tensor, weight_scale: Tensor, weight_zero: Optional[Tensor],
               int4: bool, dtype: torch.dtype) -> Tensor:
    """``grad_y [M, N] @ W' [N, K]`` with fp32 products and accumulation, in ``dtype`` (x's),
    reading the quantized weight one K-panel at a time (docs/numerics.md s.10). ``W'`` is
    ``fp32(q * scale)`` (int8) or ``fp32((q - zero) * scale)`` per group (int4; signed nibbles
    when ``weight_zero`` is None), rounded to ``dtype``. For bf16 on the CPU the GEMM runs in bf16
    (oneDNN: exact products, fp32 accumulation, one rounding), several times faster than fp32."""
    N = qweight.shape[0]
    K = qweight.shape[1] * 2 if int4 else qweight.shape[1]
    M = grad_y.shape[0]
    native_bf16 = dtype == torch.bfloat16 and grad_y.device.type == "cpu"
    gy = grad_y.to(dtype) if native_bf16 else grad_y.float()
    out = torch.empty((M, K), dtype=gy.dtype, device=grad_y.device)
    G = K // weight_scale.shape[1] if int4 else K
    step = _panel_width(N, K, G, int4)
    for k0 in range(0, K, step):
        k1 = min(K, k0 + step)
        panel = _dequant_panel(qweight, weight_scale, weight_zero, int4, G, k0, k1, dtype)
        out[:, k0:k1] = gy @ panel.to(gy.dtype)
    return out.to(dtype)


def _arg(seq, i):
    """``seq[i]``, or None where the dispatcher dropped trailing arguments equal to their defaults."""
    return seq[i] if i is not None and i < len(seq) else None


def _frozen(op: str, name: str) -> NoBackwardError:
    return NoBackwardError(f"quantkernels.{op}: no gradient with respect to {name}: quantized weights and their "
                           f"scales are frozen (docs/numerics.md s.10); train adapters (quantkernels.peft) instead")


def _bias_grad(gy: Tensor, bias: Tensor) -> Tensor:
    return gy.float().sum(0).to(bias.dtype)


# --------------------------------------------------------------------------- per-op autograd


def _linear_op(op: str, pos, kind, scale_name: str, zero_name: str):
    """setup_context and backward of a float-activation linear op. ``pos``: the positions of
    (x, weight, scale, zero, bias) among the op's inputs (None: the op has no such input);
    ``kind(inputs)``: (int4, unsigned with zero points)."""
    ix, iw, iscale, izero, ibias = pos

    def setup(ctx, inputs, output):
        ctx.n_inputs = len(inputs)
        ctx.x_dtype = inputs[ix].dtype
        ctx.kind = kind(inputs)
        ctx.save_for_backward(*(_arg(inputs, i) for i in (iw, iscale, izero, ibias)))

    def backward(ctx, grad_y):
        qweight, scale, zero, bias = ctx.saved_tensors
        need = ctx.needs_input_grad
        if _arg(need, iscale):
            raise _frozen(op, scale_name)
        if _arg(need, izero):
            raise _frozen(op, zero_name)
        int4, unsigned = ctx.kind
        grads = [None] * ctx.n_inputs
        if need[ix]:
            grads[ix] = grad_input(grad_y, qweight, scale, zero if unsigned else None, int4, ctx.x_dtype)
        if _arg(need, ibias) and bias is not None:
            grads[ibias] = _bias_grad(grad_y, bias)
        return tuple(grads)

    return setup, backward


def _setup_none(ctx, inputs, output):
    pass


def _raising_backward(op: str, why: str):
    def backward(ctx, *grads):
        raise NoBackwardError(f"quantkernels.{op} has no backward: {why}")
    return backward


def _setup_scaled_gemm(bias_index: int):
    def setup(ctx, inputs, output):
        ctx.save_for_backward(_arg(inputs, bias_index))
        ctx.n_inputs = len(inputs)
    return setup


def _scaled_gemm_backward(op: str, bias_index: int, scale_names):
    def backward(ctx, grad_y):
        (bias,) = ctx.saved_tensors
        for i, name in scale_names:
            if _arg(ctx.needs_input_grad, i):
                raise NoBackwardError(
                    f"quantkernels.{op} has no backward with respect to {name}: its activations are integer codes, "
                    f"so no gradient reaches them; for training, QuantLinear (quantkernels::quant_linear) "
                    f"defines the straight-through gradient of quantize + GEMM (docs/numerics.md s.10)")
        grads = [None] * ctx.n_inputs
        if _arg(ctx.needs_input_grad, bias_index) and bias is not None:
            grads[bias_index] = _bias_grad(grad_y, bias)
        return tuple(grads)
    return backward


_QUANTIZER_WHY = ("its outputs are integer codes (the rounding has zero derivative almost everywhere); "
                  "for training, QuantLinear (quantkernels::quant_linear) defines the straight-through "
                  "gradient of quantize + GEMM (docs/numerics.md s.10)")
_DEQUANT_WHY = "quantized weights and their scales are frozen (docs/numerics.md s.10)"


def _setup_gemm_4bit(ctx, inputs, output):
    x, packed, absmax, quant_type, blocksize = inputs[:5]
    nested, offset, bias = (_arg(inputs, i) for i in (5, 6, 7))
    ctx.n_inputs, ctx.x_dtype, ctx.qt, ctx.bs = len(inputs), x.dtype, quant_type, blocksize
    ctx.save_for_backward(packed, absmax, nested, offset, bias)


def _gemm_4bit_backward(ctx, grad_y):
    """grad_X = grad_Y @ to_x(W) with fp32 products and accumulation (docs/numerics.md s.10, s.11)."""
    packed, absmax, nested, offset, bias = ctx.saved_tensors
    need = ctx.needs_input_grad
    for i, name in ((2, "absmax"), (5, "nested_absmax"), (6, "offset")):
        if _arg(need, i):
            raise _frozen("gemm_4bit", name)
    grads = [None] * ctx.n_inputs
    if need[0]:
        w = torch.ops.quantkernels.dequantize_4bit(packed, absmax, ctx.qt, ctx.bs, nested, offset, ctx.x_dtype)
        grads[0] = (grad_y.float() @ w.float()).to(ctx.x_dtype)
    if _arg(need, 7) and bias is not None:
        grads[7] = _bias_grad(grad_y, bias)
    return tuple(grads)


def _registrations():
    """(op, setup_context, backward) for every op that takes a float tensor."""
    regs = [
        ("w8a16_gemm", *_linear_op("w8a16_gemm", (0, 1, 2, None, 3), lambda i: _WEIGHT_KIND["w8a16"],
                                   "scale_b", "zero_b")),
        ("w4a16_gemm", *_linear_op("w4a16_gemm", (0, 1, 2, 3, 4), lambda i: (True, _arg(i, 3) is not None),
                                   "scale_b", "zero_b")),
        ("llm_int8_linear", *_linear_op("llm_int8_linear", (0, 1, 2, None, 3), lambda i: _WEIGHT_KIND["llm_int8"],
                                        "scale_b", "zero_b")),
        ("w8a8_gemm", _setup_scaled_gemm(4), _scaled_gemm_backward("w8a8_gemm", 4, ((2, "scale_a"), (3, "scale_b")))),
        ("w4a8_gemm", _setup_scaled_gemm(5), _scaled_gemm_backward("w4a8_gemm", 5, ((2, "scale_a"), (3, "scale_b")))),
    ]
    for name in ("quantize_int8_rowwise", "quantize_int8_tensor", "quantize_int8_rowwise_outliers",
                 "quantize_int8_asym", "quantize_int4_sym", "quantize_uint4_asym"):
        regs.append((name, _setup_none, _raising_backward(name, _QUANTIZER_WHY)))
    regs.append(("gemm_4bit", _setup_gemm_4bit, _gemm_4bit_backward))
    for name in ("quantize_4bit", "double_quantize_absmax"):
        regs.append((name, _setup_none, _raising_backward(name, _QUANTIZER_WHY)))
    for name in ("dequantize_int8", "dequantize_int4", "dequantize_4bit"):
        regs.append((name, _setup_none, _raising_backward(name, _DEQUANT_WHY)))
    return regs


_REGISTERED = set()


def register() -> None:
    """Registers the backward of ``quant_linear`` and of every op above, including the
    ``<op>_triton`` variants that exist (called by ``import quantkernels`` after the Triton ops
    are defined; idempotent)."""
    regs = [("quant_linear", *_linear_op("quant_linear", (0, 1, 2, 3, 4), lambda i: _WEIGHT_KIND[i[5]],
                                         "weight_scale", "weight_zero"))]
    for base, setup, backward in regs + _registrations():
        for name in (base, f"{base}_triton"):
            if name in _REGISTERED or not dispatch._has_schema(f"{NAMESPACE}::{name}"):
                continue
            torch.library.register_autograd(f"{NAMESPACE}::{name}", backward, setup_context=setup, lib=_lib)
            _REGISTERED.add(name)
