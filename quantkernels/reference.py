"""Pure-PyTorch reference of every quantkernels op: the executable form of docs/numerics.md.

Each function here is registered as the device-independent implementation
(``CompositeExplicitAutograd``) of the op of the same name in ``_ops.py``; native
kernels (C++ CPU, CUDA, Triton) override it per device and are tested bit-exact
(integers) or within docs/numerics.md section 6 (floats) against these functions.

Written only with traceable aten ops and no host synchronisation, so that the
reference also runs under ``torch.compile(fullgraph=True)`` and in CUDA graphs.

Integer GEMMs are evaluated in float64: every partial sum of int8 x int8 products is an
integer of magnitude <= 128 * 128 * K < 2**31 (K is bounded by ``MAX_K_INT8``), and
float64 represents every integer below 2**53 exactly, so the result is the exact int32
sum -- unlike float32 emulation, which is wrong beyond 2**24. float64 matmul is also
~20x faster than ``torch._int_mm`` on CPU and works on every device.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from . import _contracts as C
from . import _validate as V

# --------------------------------------------------------------------------- helpers


def _rne(t: Tensor) -> Tensor:
    # torch.round is round-half-to-even.
    return torch.round(t)


def _finite_q(q: Tensor) -> Tensor:
    # Non-finite inputs give NaN products; their quantized value is defined as 0 and the
    # non-finite value lives on in the scale (NaN/Inf), so it propagates to the output.
    return torch.nan_to_num(q, nan=0.0, posinf=0.0, neginf=0.0)


def _const(value: float, like: Tensor) -> Tensor:
    # Divisions by and of constants go through a 0-D tensor so that they are true IEEE
    # divisions on every device: python `127 / t` is `reciprocal(t) * 127`, and on CUDA
    # `t / 127.0` is computed as `t * (1 / 127)`; both differ from a kernel's division.
    return torch.full((), value, dtype=torch.float32, device=like.device)


def _absmax_quant(xf: Tensor, absmax: Tensor) -> Tuple[Tensor, Tensor]:
    """q = clamp(rne(x * (127 / absmax)), -127, 127); scale = absmax / 127 (1 where absmax == 0)."""
    is_zero = absmax == 0
    inv = torch.where(is_zero, torch.zeros_like(absmax), _const(127.0, absmax) / absmax)
    q = _finite_q(_rne(xf * inv.unsqueeze(-1)).clamp(-127, 127)).to(torch.int8)
    scale = torch.where(is_zero, torch.ones_like(absmax), absmax / _const(127.0, absmax))
    return q, scale


# --------------------------------------------------------------------------- int8 quantization


def quantize_int8_rowwise(x: Tensor) -> Tuple[Tensor, Tensor]:
    C.quantize_int8_rowwise(x)
    xf = x.float()
    return _absmax_quant(xf, xf.abs().amax(dim=-1))


def quantize_int8_tensor(x: Tensor) -> Tuple[Tensor, Tensor]:
    C.quantize_int8_tensor(x)
    xf = x.float()
    # a 0 joins the max so that an empty tensor gets absmax 0 (scale 1), as an all-zero one
    absmax = torch.cat((xf.abs().reshape(-1), xf.new_zeros(1))).amax().reshape(1)
    q, scale = _absmax_quant(xf.reshape(1, -1), absmax)
    return q.reshape(x.shape), scale.reshape(())


def quantize_int8_rowwise_outliers(x: Tensor, threshold: float) -> Tuple[Tensor, Tensor, Tensor]:
    C.quantize_int8_rowwise_outliers(x, threshold)
    xf = x.float()
    if threshold > 0:
        outliers = (xf.abs() >= threshold).any(dim=0)
    else:
        outliers = torch.zeros(x.shape[1], dtype=torch.bool, device=x.device)
    x_in = torch.where(outliers, torch.zeros_like(xf), xf)
    q, scale = _absmax_quant(x_in, x_in.abs().amax(dim=-1))
    return q, scale, outliers


def _asym_params(lo: Tensor, hi: Tensor, qmin: int, qmax: int) -> Tuple[Tensor, Tensor]:
    lo = torch.clamp(lo, max=0.0)
    hi = torch.clamp(hi, min=0.0)
    scale = (hi - lo) / _const(float(qmax - qmin), lo)
    scale = torch.where(hi == lo, torch.ones_like(scale), scale)
    zero = _finite_q(_rne(qmin - lo / scale).clamp(qmin, qmax))
    return scale, zero


def quantize_int8_asym(x: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    C.quantize_int8_asym(x)
    xf = x.float()
    scale, zero = _asym_params(xf.amin(dim=-1), xf.amax(dim=-1), -128, 127)
    q = _finite_q((_rne(xf / scale.unsqueeze(-1)) + zero.unsqueeze(-1)).clamp(-128, 127))
    return q.to(torch.int8), scale, zero.to(torch.int8)


def dequantize_int8(q: Tensor, scale: Tensor, zero: Optional[Tensor] = None,
                    out_dtype: Optional[torch.dtype] = None) -> Tensor:
    dt = C.dequantize_int8(q, scale, zero, out_dtype)
    s = scale.unsqueeze(-1) if scale.dim() else scale
    qf = q.float()
    if zero is not None:
        qf = qf - (zero.unsqueeze(-1) if zero.dim() else zero).float()
    return (qf * s).to(dt)


# --------------------------------------------------------------------------- int4


def pack_int4(q: Tensor) -> Tensor:
    op = "pack_int4"
    C.pack_int4(q)
    if not torch.compiler.is_compiling() and q.numel():
        lo, hi = (-8, 7) if q.dtype == torch.int8 else (0, 15)
        bad = (q < lo) | (q > hi)
        if bool(bad.any()):
            v = q[bad][0].item()
            V.check(False, op, f"q holds {v}, outside the int4 range [{lo}, {hi}] of its dtype {q.dtype}")
    q32 = q.to(torch.int32)
    packed = (q32[..., 0::2] & 0xF) | ((q32[..., 1::2] & 0xF) << 4)
    return packed.to(torch.uint8)


def unpack_int4(packed: Tensor, signed: bool = True) -> Tensor:
    C.unpack_int4(packed)
    b = packed.to(torch.int16)
    lo, hi = b & 0xF, b >> 4
    if signed:
        lo, hi = (lo ^ 8) - 8, (hi ^ 8) - 8
    q = torch.stack((lo, hi), dim=-1).flatten(-2)
    return q.to(torch.int8 if signed else torch.uint8)


def _groups(w: Tensor, op: str, group_size: int) -> Tensor:
    N, K, G = C.quantize_int4(op, w, group_size)
    return w.float().reshape(N, K // G, G)


def quantize_int4_sym(w: Tensor, group_size: int) -> Tuple[Tensor, Tensor]:
    wg = _groups(w, "quantize_int4_sym", group_size)
    absmax = wg.abs().amax(dim=-1)
    is_zero = absmax == 0
    scale = torch.where(is_zero, torch.ones_like(absmax), absmax / _const(7.0, absmax))
    q = _finite_q(_rne(wg / scale.unsqueeze(-1)).clamp(-8, 7)).to(torch.int8)
    return pack_int4(q.reshape(w.shape)), scale


def quantize_uint4_asym(w: Tensor, group_size: int) -> Tuple[Tensor, Tensor, Tensor]:
    wg = _groups(w, "quantize_uint4_asym", group_size)
    scale, zero = _asym_params(wg.amin(dim=-1), wg.amax(dim=-1), 0, 15)
    q = _finite_q((_rne(wg / scale.unsqueeze(-1)) + zero.unsqueeze(-1)).clamp(0, 15))
    return pack_int4(q.to(torch.uint8).reshape(w.shape)), scale, zero.to(torch.uint8)


def _int4_weight_float(packed: Tensor, scale: Tensor, zero: Optional[Tensor]) -> Tensor:
    """fp32 [N, K] dequantized int4 weight (signed if zero is None, else unsigned with zero points)."""
    N, K = packed.shape[0], packed.shape[1] * 2
    ng = scale.shape[1]
    q = unpack_int4(packed, signed=zero is None).float().reshape(N, ng, K // ng)
    if zero is not None:
        q = q - zero.float().unsqueeze(-1)
    return (q * scale.unsqueeze(-1)).reshape(N, K)


def dequantize_int4(packed: Tensor, scale: Tensor, zero: Optional[Tensor] = None,
                    out_dtype: Optional[torch.dtype] = None) -> Tensor:
    _, _, dt = C.dequantize_int4(packed, scale, zero, out_dtype)
    return _int4_weight_float(packed, scale, zero).to(dt)


# --------------------------------------------------------------------------- GEMMs


def _exact_int_mm(a: Tensor, b: Tensor) -> Tensor:
    """Exact sum_k a[m, k] * b[n, k] for integer-valued inputs (see the module docstring)."""
    return a.to(torch.float64) @ b.to(torch.float64).t()


def int8_gemm(a: Tensor, b: Tensor) -> Tensor:
    C.int8_gemm(a, b)
    return _exact_int_mm(a, b).to(torch.int32)


def _epilogue(acc: Tensor, bias: Optional[Tensor], dtype: torch.dtype) -> Tensor:
    if bias is not None:
        acc = acc + bias.float()
    return acc.to(dtype)


def w8a8_gemm(a: Tensor, b: Tensor, scale_a: Tensor, scale_b: Tensor, bias: Optional[Tensor] = None,
              out_dtype: Optional[torch.dtype] = None) -> Tensor:
    _, _, dt = C.w8a8_gemm(a, b, scale_a, scale_b, bias, out_dtype)
    c = _exact_int_mm(a, b).to(torch.int32)
    acc = c.float() * scale_a.unsqueeze(1) * scale_b.unsqueeze(0)
    return _epilogue(acc, bias, dt)


def w4a8_gemm(a: Tensor, b_packed: Tensor, scale_a: Tensor, scale_b: Tensor, zero_b: Optional[Tensor] = None,
              bias: Optional[Tensor] = None, out_dtype: Optional[torch.dtype] = None) -> Tensor:
    M, N, G, dt = C.w4a8_gemm(a, b_packed, scale_a, scale_b, zero_b, bias, out_dtype)
    ng = scale_b.shape[1]
    qb = unpack_int4(b_packed, signed=zero_b is None)
    ag = a.to(torch.float64).reshape(M, ng, G).transpose(0, 1)                 # [ng, M, G]
    bg = qb.to(torch.float64).reshape(N, ng, G).permute(1, 2, 0)               # [ng, G, N]
    c = torch.bmm(ag, bg)                                                      # exact int per group
    if zero_b is not None:
        asum = ag.sum(dim=-1)                                                  # [ng, M], exact
        c = c - asum.unsqueeze(-1) * zero_b.t().to(torch.float64).unsqueeze(1)
    c = c.to(torch.int32).float()                                              # int32 inside a group
    acc = (c * scale_b.t().unsqueeze(1)).sum(dim=0)                            # fp32 across groups
    acc = acc * scale_a.unsqueeze(1)
    return _epilogue(acc, bias, dt)


def _weight_only(x: Tensor, w: Tensor, bias: Optional[Tensor]) -> Tensor:
    # Products in the activation dtype (exact in fp32 for fp16/bf16 operands), fp32 accumulation.
    w = w.to(x.dtype).float()
    return _epilogue(x.float() @ w.t(), bias, x.dtype)


def w8a16_gemm(x: Tensor, b: Tensor, scale_b: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    C.w8a16_gemm(x, b, scale_b, bias)
    return _weight_only(x, b.float() * scale_b.unsqueeze(1), bias)


def w4a16_gemm(x: Tensor, b_packed: Tensor, scale_b: Tensor, zero_b: Optional[Tensor] = None,
               bias: Optional[Tensor] = None) -> Tensor:
    C.w4a16_gemm(x, b_packed, scale_b, zero_b, bias)
    return _weight_only(x, _int4_weight_float(b_packed, scale_b, zero_b), bias)


def llm_int8_linear(x: Tensor, b: Tensor, scale_b: Tensor, bias: Optional[Tensor] = None,
                    threshold: float = 6.0) -> Tensor:
    C.llm_int8_linear(x, b, scale_b, bias, threshold)
    q, sx, outliers = quantize_int8_rowwise_outliers(x, threshold)
    acc = _exact_int_mm(q, b).to(torch.int32).float() * sx.unsqueeze(1) * scale_b.unsqueeze(0)
    # Outlier columns in floating point: X[:, O] @ (Wq[:, O] * sw)^T, as a masked dense product
    # (zero columns add exact zeros), so that O never leaves the device.
    x_out = torch.where(outliers, x.float(), torch.zeros((), dtype=torch.float32, device=x.device))
    w_deq = b.float() * scale_b.unsqueeze(1)
    acc = acc + x_out @ w_deq.t()
    return _epilogue(acc, bias, x.dtype)


# --------------------------------------------------------------------------- NF4 / FP4 (docs/numerics.md s.11)
# bitsandbytes' 4-bit float formats: a 16-entry code table, block-wise absmax over the
# row-major flattened weight, nearest code with the tie rule of s.11, two codes per byte
# (high nibble first), and optional double quantization of the absmax values.

#: NF4: quantiles of N(0, 1) normalised to [-1, 1] (the literal float32 values bitsandbytes uses).
NF4_CODE = torch.tensor([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0], dtype=torch.float32)

#: FP4 (1 sign, 2 exponent, 1 mantissa bit, bitsandbytes' bias): the raw values in nibble order,
#: divided by their absmax 12 in float32. Nibble 8 (the sign bit alone) is +0.0, as in bitsandbytes' table.
FP4_CODE = torch.tensor([0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0,
                         0.0, -0.0625, -8.0, -12.0, -4.0, -6.0, -2.0, -3.0],
                        dtype=torch.float32) / torch.tensor(12.0)

#: Nibbles in ascending order of their code value (the two zeros, nibbles 0 and 8: nibble 0 first).
_ORDER = {"nf4": torch.arange(16), "fp4": torch.tensor([11, 10, 13, 12, 15, 14, 9, 0, 8, 1, 6, 7, 4, 5, 2, 3])}
CODES_4BIT = {"nf4": NF4_CODE, "fp4": FP4_CODE}


def _decision_bounds(quant_type: str) -> Tuple[Tensor, Tensor]:
    code, order = CODES_4BIT[quant_type], _ORDER[quant_type]
    sc = code[order]
    return (sc[:-1] + sc[1:]) / torch.tensor(2.0), order


_BOUNDS_4BIT = {qt: _decision_bounds(qt) for qt in CODES_4BIT}


def _dynamic_map() -> Tensor:
    """The signed 8-bit dynamic code of the double quantization (256 sorted float32 values)."""
    data = []
    for i in range(7):
        edges = torch.linspace(0.1, 1, 2**i + 1, dtype=torch.float32)
        mids = (edges[:-1] + edges[1:]) / 2.0
        data += ((10 ** (-6 + i)) * mids).tolist()
        data += (-(10 ** (-6 + i)) * mids).tolist()
    data += [0.0, 1.0]
    return torch.tensor(sorted(data), dtype=torch.float32)


#: 8-bit dynamic code for the absmax values under double quantization.
DYNAMIC_CODE = _dynamic_map()
#: Block size of the double quantization (absmax values per second-level scale).
NESTED_BLOCKSIZE = 256


def _on(t: Tensor, like: Tensor) -> Tensor:
    return t.to(like.device)


def quantize_4bit(w: Tensor, quant_type: str, blocksize: int) -> Tuple[Tensor, Tensor]:
    N, K = C.quantize_4bit(w, quant_type, blocksize)
    flat = w.reshape(-1).float()
    n = N * K
    rem = n % blocksize
    full = n - rem
    blocks = flat[:full].reshape(full // blocksize, blocksize)
    absmax = blocks.abs().amax(dim=-1)
    scaled = torch.clamp(blocks * (1.0 / absmax.clamp(min=1e-38).unsqueeze(-1)), -1, 1).reshape(-1)
    if rem:
        # the last, partial block: a true division, and its absmax stored clamped (s.11)
        am = flat[full:].abs().amax().clamp(min=1e-38)
        absmax = torch.cat([absmax, am.reshape(1)])
        scaled = torch.cat([scaled, torch.clamp(flat[full:] / am, -1, 1)])
    bounds, order = _BOUNDS_4BIT[quant_type]
    q = _on(order, w)[torch.bucketize(scaled, _on(bounds, w))].to(torch.int32)
    packed = (q[0::2] << 4) | q[1::2]
    return packed.to(torch.uint8).reshape(N, K // 2), absmax


def double_quantize_absmax(absmax: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    C.double_quantize_absmax(absmax)
    offset = absmax.mean()
    v = absmax - offset
    n = v.numel()
    nb = -(-n // NESTED_BLOCKSIZE)
    padded = torch.cat([v, v.new_zeros(nb * NESTED_BLOCKSIZE - n)]).reshape(nb, NESTED_BLOCKSIZE)
    absmax2 = padded.abs().amax(dim=-1)
    normed = (padded / absmax2.unsqueeze(-1)).reshape(-1)[:n]
    code = _on(DYNAMIC_CODE, absmax)
    left = (torch.searchsorted(code, normed, right=True) - 1).clamp(0, 255)
    right = (left + 1).clamp(max=255)
    take_right = (normed - code[right]).abs() < (normed - code[left]).abs()
    idx = torch.where(take_right, right, left)
    idx = torch.where(torch.isnan(normed), torch.zeros_like(idx), idx)
    return idx.to(torch.uint8), absmax2, offset


def _absmax_4bit(absmax: Tensor, nested_absmax: Optional[Tensor], offset: Optional[Tensor]) -> Tensor:
    if nested_absmax is None:
        return absmax
    code = _on(DYNAMIC_CODE, absmax)[absmax.long()]
    scale2 = nested_absmax.repeat_interleave(NESTED_BLOCKSIZE)[: absmax.numel()]
    return code * scale2 + offset


def _weight_4bit_float(packed: Tensor, absmax: Tensor, nested_absmax: Optional[Tensor], offset: Optional[Tensor],
                       quant_type: str, blocksize: int) -> Tensor:
    """fp32 [N, K]: code[nibble] * absmax[block] (s.11)."""
    N, K = packed.shape[0], packed.shape[1] * 2
    b = packed.reshape(-1).to(torch.int64)
    nib = torch.stack((b >> 4, b & 0xF), dim=-1).reshape(-1)
    vals = _on(CODES_4BIT[quant_type], packed)[nib]
    am = _absmax_4bit(absmax, nested_absmax, offset)
    scale = am.repeat_interleave(blocksize)[: N * K]
    return (vals * scale).reshape(N, K)


def dequantize_4bit(packed: Tensor, absmax: Tensor, quant_type: str, blocksize: int,
                    nested_absmax: Optional[Tensor] = None, offset: Optional[Tensor] = None,
                    out_dtype: Optional[torch.dtype] = None) -> Tensor:
    _, _, dt = C.dequantize_4bit(packed, absmax, quant_type, blocksize, nested_absmax, offset, out_dtype)
    return _weight_4bit_float(packed, absmax, nested_absmax, offset, quant_type, blocksize).to(dt)


def gemm_4bit(x: Tensor, packed: Tensor, absmax: Tensor, quant_type: str, blocksize: int,
              nested_absmax: Optional[Tensor] = None, offset: Optional[Tensor] = None,
              bias: Optional[Tensor] = None) -> Tensor:
    C.gemm_4bit(x, packed, absmax, quant_type, blocksize, nested_absmax, offset, bias)
    w = _weight_4bit_float(packed, absmax, nested_absmax, offset, quant_type, blocksize)
    return _weight_only(x, w, bias)
