"""Weight-only GEMMs, W8A16 and W4A16 (docs/numerics.md s.4): ``Y = X @ dequant(W)^T + bias``.

The weight tile is dequantized in registers exactly as the reference does it, ``q * scale``
or ``(q - zero) * scale`` in fp32, rounded once to the activation dtype; products are then
exact on the tensor cores (fp16/bf16 with fp32 accumulation; fp32 activations use
``input_precision="ieee"``). int4 weights are read in the PLAIN format and unpacked in
registers (``(byte >> 4 * (k & 1)) & 0xF``), with the group scale gathered at ``k // G``.

Kernel choice by M (as gemlite): for M <= 16 (decode) a split-K launch with BLOCK_M = 16
spreads K over ``SPLIT_K`` programs per output tile so that a GEMV-shaped problem fills the
GPU; the fp32 partial sums are added in a fixed order (deterministic), then bias and the
cast. Above, the tiled GEMM with a fused epilogue.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch
import triton
import triton.language as tl

from . import _common as C

SMALL_M = 16
MAX_SPLIT_K = 16

#: Configs for M <= 16 (split-K) and for larger M; the first of each is the default.
SMALL_CONFIGS = [
    C.config(BLOCK_M=16, BLOCK_N=64, BLOCK_K=64, GROUP_M=1, num_warps=4, num_stages=4),
    C.config(BLOCK_M=16, BLOCK_N=32, BLOCK_K=128, GROUP_M=1, num_warps=4, num_stages=4),
    C.config(BLOCK_M=16, BLOCK_N=128, BLOCK_K=64, GROUP_M=1, num_warps=4, num_stages=3),
]
LARGE_CONFIGS = [
    C.config(BLOCK_M=32, BLOCK_N=64, BLOCK_K=64, GROUP_M=8, num_warps=4, num_stages=4),
    C.config(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=4, num_stages=4),
    C.config(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3),
    C.config(BLOCK_M=128, BLOCK_N=64, BLOCK_K=32, GROUP_M=8, num_warps=4, num_stages=4),
]
KEY = ["N", "K", "G", "M_BUCKET", "SPLIT_K"]


@triton.jit
def _wo_kernel(x_ptr, b_ptr, s_ptr, z_ptr, bias_ptr, out_ptr,
               M, N, K, G, M_BUCKET, SPLIT_K, K_PER_SPLIT,
               stride_xm, stride_xk, stride_bn, stride_bk, stride_sn, stride_sg,
               stride_os, stride_om, stride_on,
               INT4: tl.constexpr, HAS_ZERO: tl.constexpr, HAS_BIAS: tl.constexpr, X_FP32: tl.constexpr,
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
    b_cols = b_ptr + rn.to(tl.int64)[None, :] * stride_bn
    s_cols = s_ptr + rn.to(tl.int64)[None, :] * stride_sn
    z_cols = z_ptr + rn.to(tl.int64)[None, :] * stride_sn
    k_lo = pid_k * K_PER_SPLIT
    k_hi = min(K, k_lo + K_PER_SPLIT)
    if not INT4:
        s_n = tl.load(s_ptr + rn * stride_sn, mask=nm, other=0.0)  # per-channel scale
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        k = k0 + rk
        km = k < k_hi
        wm = km[:, None] & nm[None, :]
        x = tl.load(x_rows + k[None, :] * stride_xk, mask=mm[:, None] & km[None, :], other=0.0)
        if INT4:
            byte = tl.load(b_cols + (k // 2)[:, None] * stride_bk, mask=wm, other=0)
            q = (byte.to(tl.int32) >> ((k & 1) * 4)[:, None]) & 0xF
            g = (k // G)[:, None] * stride_sg
            s = tl.load(s_cols + g, mask=wm, other=0.0)
            if HAS_ZERO:
                z = tl.load(z_cols + g, mask=wm, other=0)
                w = (q.to(tl.float32) - z.to(tl.float32)) * s
            else:
                w = ((q ^ 8) - 8).to(tl.float32) * s
        else:
            q = tl.load(b_cols + k[:, None] * stride_bk, mask=wm, other=0)
            w = q.to(tl.float32) * s_n[None, :]
        if X_FP32:  # exact products of the x-dtype-rounded weight, in fp32
            acc += tl.dot(x.to(tl.float32), C.cast(w, x_ptr.dtype.element_ty, INTERP).to(tl.float32),
                          input_precision="ieee")
        else:
            acc += tl.dot(x, w.to(x.dtype))

    om = mm[:, None] & nm[None, :]
    o_ptrs = out_ptr + pid_k * stride_os + rm.to(tl.int64)[:, None] * stride_om + rn[None, :] * stride_on
    if PARTIAL:
        tl.store(o_ptrs, acc, mask=om)
    else:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + rn, mask=nm, other=0.0).to(tl.float32)[None, :]
        tl.store(o_ptrs, C.cast(acc, out_ptr.dtype.element_ty, INTERP), mask=om)


_small = C.autotune(SMALL_CONFIGS, KEY, prune=C.prune_by_smem_and_m(2, 1))(_wo_kernel)
_large = C.autotune(LARGE_CONFIGS, KEY, prune=C.prune_by_smem_and_m(2, 1))(_wo_kernel)


@functools.lru_cache(maxsize=None)
def _num_sms(device_index: int) -> int:
    try:
        return torch.cuda.get_device_properties(device_index).multi_processor_count
    except Exception:
        return 4


def choose_split_k(M: int, N: int, K: int, device: torch.device) -> int:
    """Enough programs to fill the GPU for GEMV-shaped problems (about 2 waves of 64-wide N
    tiles), with at least 256 K per split; 1 above M = 16."""
    if M > SMALL_M:
        return 1
    sms = _num_sms(device.index or 0) if device.type == "cuda" else 4
    tiles = triton.cdiv(N, 64)
    return max(1, min(MAX_SPLIT_K, (2 * sms) // max(tiles, 1), K // 256))


def gemm(x: torch.Tensor, b: torch.Tensor, scale_b: torch.Tensor, zero_b: Optional[torch.Tensor],
         bias: Optional[torch.Tensor], int4: bool, split_k: Optional[int] = None) -> torch.Tensor:
    """x float [M, K]; b int8 [N, K] (int4=False, scale_b fp32 [N]) or uint8 [N, K/2] PLAIN
    (int4=True, scale_b fp32 [N, K/G], zero_b uint8 [N, K/G] or None). Output in x's dtype.
    Inputs are validated by the caller; ``split_k`` overrides the heuristic (tests)."""
    M, K = x.shape
    N = b.shape[0]
    out = torch.empty((M, N), dtype=x.dtype, device=x.device)
    if M == 0 or N == 0:
        return out
    G = K // scale_b.shape[1] if int4 else K
    split = choose_split_k(M, N, K, x.device) if split_k is None else max(1, int(split_k))
    k_per = triton.cdiv(triton.cdiv(K, split), 128) * 128  # a multiple of every BLOCK_K
    split = triton.cdiv(K, k_per) if K else 1
    sb = scale_b.contiguous()
    z = zero_b.contiguous() if zero_b is not None else sb
    partial = split > 1
    dst = torch.empty((split, M, N), dtype=torch.float32, device=x.device) if partial else out.unsqueeze(0)
    kernel = _small if M <= SMALL_M else _large
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]), split)  # noqa: E731
    C.launch(kernel, grid, x, b, sb, z, bias.contiguous() if bias is not None else sb, dst,
             M, N, K, G, C.m_bucket(M), split, k_per,
             x.stride(0), x.stride(1), b.stride(0), b.stride(1), sb.stride(0), sb.stride(1) if int4 else 0,
             dst.stride(0), dst.stride(1), dst.stride(2),
             INT4=int4, HAS_ZERO=zero_b is not None, HAS_BIAS=bias is not None,
             X_FP32=C.dot_in_fp32(x.dtype), PARTIAL=partial, INTERP=C.interpreting())
    if partial:
        y = dst.sum(dim=0)
        if bias is not None:
            y = y + bias.float()
        out = y.to(x.dtype)
    return out
