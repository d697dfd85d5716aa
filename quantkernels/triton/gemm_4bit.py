"""NF4 / FP4 weight-only GEMM (docs/numerics.md s.11.6): ``Y = to_x(x @ to_x(W)^T + bias)`` with
``W[n, k] = fp32(code[v] * A[blk])``, ``v`` the nibble of the flat index ``i = n*K + k`` (high nibble
first) and ``blk = i >> log2(B)``.

The weight tile is decoded in registers: the 16-entry code table is a tree of ``tl.where`` selects
on the nibble's bits over float32 literals (the exact table values of ``reference.CODES_4BIT``;
FP4's nibble 8 is +0), multiplied in fp32 by the block's absmax, rounded once to x's dtype, and
multiplied on the tensor cores with fp32 accumulation (fp32 x: ``input_precision="ieee"``), as
the W4A16 kernel. The absmax is gathered per element by the flat block index, so blocks that span
rows (K % B != 0) need no special case.

Double quantization: ``A = fp32(fp32(DYN[q] * a2[blk // 256]) + offset)``. The product is made
by a small pre-pass kernel (one value per block, written to memory) and the main kernel adds
``offset``: so the compiler cannot contract the product and the sum into one FMA (which rounds
once, where s.11.5 rounds twice). Split-K for M <= 16 as ``weight_only``.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch
import triton
import triton.language as tl

from . import _common as C
from . import weight_only as WO
from .. import reference as R

SMALL_CONFIGS = WO.SMALL_CONFIGS
LARGE_CONFIGS = WO.LARGE_CONFIGS
KEY = ["N", "K", "LOG2_B", "M_BUCKET", "SPLIT_K"]
QUANT_TYPES = {"nf4": 0, "fp4": 1}
NESTED_BLOCK = 1024


@triton.jit
def _pick8(b0, b1, b2, c0, c1, c2, c3, c4, c5, c6, c7):
    """c[b2*4 + b1*2 + b0] for boolean bit tensors b0..b2 and scalar constants c0..c7."""
    lo = tl.where(b1, tl.where(b0, c3, c2), tl.where(b0, c1, c0))
    hi = tl.where(b1, tl.where(b0, c7, c6), tl.where(b0, c5, c4))
    return tl.where(b2, hi, lo)


@triton.jit
def _decode(v, QT: tl.constexpr):
    """The float32 code of nibble ``v`` (int32 tensor, 0..15): NF4 (QT = 0) or FP4 (QT = 1)."""
    b0 = (v & 1) != 0
    b1 = (v & 2) != 0
    b2 = (v & 4) != 0
    b3 = (v & 8) != 0
    if QT == 0:
        neg = _pick8(b0, b1, b2, -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
                     -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0)
        pos = _pick8(b0, b1, b2, 0.07958029955625534, 0.16093020141124725, 0.24611230194568634,
                     0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0)
        c = tl.where(b3, pos, neg)
    else:
        mag = _pick8(b0, b1, b2, 0.0, 0.0052083334885537624, 0.6666666865348816, 1.0, 0.3333333432674408,
                     0.5, 0.1666666716337204, 0.25)
        c = tl.where(b3, 0.0 - mag, mag)  # 0 - 0 = +0: nibble 8 is +0, as the table
    return c


@C.single()
@triton.jit
def _nested_kernel(q_ptr, dyn_ptr, a2_ptr, out_ptr, NB, BLOCK: tl.constexpr):
    """out[b] = fp32(DYN[q[b]] * a2[b // 256]) (s.11.5, before the offset is added)."""
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = i < NB
    q = tl.load(q_ptr + i, mask=m, other=0).to(tl.int32)
    d = tl.load(dyn_ptr + q, mask=m, other=0.0)
    s = tl.load(a2_ptr + i // 256, mask=m, other=0.0)
    tl.store(out_ptr + i, d * s, mask=m)


@triton.jit
def _gemm_4bit_kernel(x_ptr, p_ptr, a_ptr, off_ptr, bias_ptr, out_ptr,
                      M, N, K, LOG2_B, M_BUCKET, SPLIT_K, K_PER_SPLIT,
                      stride_xm, stride_xk, stride_pn, stride_pk, stride_os, stride_om, stride_on,
                      QT: tl.constexpr, DOUBLE: tl.constexpr, HAS_BIAS: tl.constexpr, X_FP32: tl.constexpr,
                      PARTIAL: tl.constexpr, INTERP: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    group = pid // (GROUP_M * num_n)
    first_m = group * GROUP_M
    size_m = min(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % (GROUP_M * num_n)) % size_m
    pid_n = (pid % (GROUP_M * num_n)) // size_m

    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    mm = rm < M
    nm = rn < N
    x_rows = x_ptr + rm.to(tl.int64)[:, None] * stride_xm
    p_cols = p_ptr + rn.to(tl.int64)[None, :] * stride_pn
    flat_n = rn.to(tl.int64)[None, :] * K          # flat index of (n, 0) in the row-major weight
    if DOUBLE:
        off = tl.load(off_ptr)
    k_lo = pid_k * K_PER_SPLIT
    k_hi = min(K, k_lo + K_PER_SPLIT)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        k = k0 + rk
        km = k < k_hi
        wm = km[:, None] & nm[None, :]
        x = tl.load(x_rows + k[None, :] * stride_xk, mask=mm[:, None] & km[None, :], other=0.0)
        byte = tl.load(p_cols + (k // 2)[:, None] * stride_pk, mask=wm, other=0).to(tl.int32)
        v = (byte >> (4 - 4 * (k & 1))[:, None]) & 0xF   # even k: the high nibble
        blk = (flat_n + k[:, None]) >> LOG2_B
        a = tl.load(a_ptr + blk, mask=wm, other=0.0)
        if DOUBLE:
            a = a + off
        w = _decode(v, QT) * a
        if X_FP32:  # exact products of the x-dtype-rounded weight, in fp32
            acc += tl.dot(x.to(tl.float32), C.cast(w, x_ptr.dtype.element_ty, INTERP).to(tl.float32),
                          input_precision="ieee")
        else:
            acc += tl.dot(x, C.cast(w, x_ptr.dtype.element_ty, INTERP))

    om = mm[:, None] & nm[None, :]
    o_ptrs = out_ptr + pid_k * stride_os + rm.to(tl.int64)[:, None] * stride_om + rn[None, :] * stride_on
    if PARTIAL:
        tl.store(o_ptrs, acc, mask=om)
    else:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + rn, mask=nm, other=0.0).to(tl.float32)[None, :]
        tl.store(o_ptrs, C.cast(acc, out_ptr.dtype.element_ty, INTERP), mask=om)


_small = C.autotune(SMALL_CONFIGS, KEY, prune=C.prune_by_smem_and_m(2, 0.5))(_gemm_4bit_kernel)
_large = C.autotune(LARGE_CONFIGS, KEY, prune=C.prune_by_smem_and_m(2, 0.5))(_gemm_4bit_kernel)


_DYN_LIST = R.DYNAMIC_CODE.tolist()  # python floats: the float32 values exactly


@functools.lru_cache(maxsize=None)
def _dyn_cached(device: torch.device) -> torch.Tensor:
    return torch.tensor(_DYN_LIST, dtype=torch.float32, device=device)


def _dyn(like: torch.Tensor) -> torch.Tensor:
    """The 256-entry dynamic code on ``like``'s device: cached per device, or built from the python
    list while tracing (fake tensors: a cached real tensor cannot enter the traced graph)."""
    from torch._subclasses.fake_tensor import is_fake
    if is_fake(like) or torch.compiler.is_compiling():
        return torch.tensor(_DYN_LIST, dtype=torch.float32, device=like.device)
    return _dyn_cached(like.device)


def nested_product(absmax: torch.Tensor, nested_absmax: torch.Tensor) -> torch.Tensor:
    """fp32 [nb]: DYN[absmax[b]] * nested_absmax[b // 256], by the pre-pass kernel."""
    nb = absmax.numel()
    out = torch.empty(nb, dtype=torch.float32, device=absmax.device)
    if nb == 0:
        return out
    dyn = _dyn(absmax)
    C.launch(_nested_kernel, (triton.cdiv(nb, NESTED_BLOCK),), absmax.contiguous(), dyn,
             nested_absmax.contiguous(), out, nb, BLOCK=NESTED_BLOCK)
    return out


def gemm(x: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor, quant_type: str, blocksize: int,
         nested_absmax: Optional[torch.Tensor], offset: Optional[torch.Tensor], bias: Optional[torch.Tensor],
         split_k: Optional[int] = None) -> torch.Tensor:
    """x float [M, K] (any strides); packed uint8 [N, K/2]; absmax fp32 [nb] (or uint8 [nb] with
    nested_absmax fp32 [ceil(nb/256)] and a 0-D fp32 offset). Output [M, N] in x's dtype. Inputs
    are validated by the caller (``_contracts.gemm_4bit``); ``split_k`` overrides the heuristic."""
    M, K = x.shape
    N = packed.shape[0]
    out = torch.empty((M, N), dtype=x.dtype, device=x.device)
    if M == 0 or N == 0:
        return out
    log2_b = int(blocksize).bit_length() - 1
    if (1 << log2_b) != blocksize:  # the contract allows powers of two only; never reached through the op
        raise ValueError(f"quantkernels.gemm_4bit_triton: blocksize must be a power of two, got {blocksize}")
    double = nested_absmax is not None
    if double:
        a = nested_product(absmax, nested_absmax)
        off = offset.reshape(1).to(torch.float32)
    else:
        a = absmax.contiguous()
        off = a
    split = WO.choose_split_k(M, N, K, x.device) if split_k is None else max(1, int(split_k))
    k_per = triton.cdiv(triton.cdiv(K, split), 128) * 128  # a multiple of every BLOCK_K
    split = triton.cdiv(K, k_per) if K else 1
    partial = split > 1
    dst = torch.empty((split, M, N), dtype=torch.float32, device=x.device) if partial else out.unsqueeze(0)
    kernel = _small if M <= WO.SMALL_M else _large
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]), split)  # noqa: E731
    C.launch(kernel, grid, x, packed, a, off, bias.contiguous() if bias is not None else a, dst,
             M, N, K, log2_b, C.m_bucket(M), split, k_per,
             x.stride(0), x.stride(1), packed.stride(0), packed.stride(1),
             dst.stride(0), dst.stride(1), dst.stride(2),
             QT=QUANT_TYPES[quant_type], DOUBLE=double, HAS_BIAS=bias is not None,
             X_FP32=C.dot_in_fp32(x.dtype), PARTIAL=partial, INTERP=C.interpreting())
    if partial:
        y = dst.sum(dim=0)
        if bias is not None:
            y = y + bias.float()
        out = y.to(x.dtype)
    return out
