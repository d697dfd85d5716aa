"""W4A8: int8 activations x group-wise int4 weights in the PLAIN format (docs/numerics.md s.3-4).

The packed weight is read as bytes at ``k // 2`` and each nibble is selected in registers by
``(byte >> 4 * (k & 1)) & 0xF`` (sign-extended for symmetric weights; unsigned with a zero
point otherwise), so the tile fed to the int8 ``tl.dot`` is the unpacked [BLOCK_K, BLOCK_N]
weight. int32 inside a group; at each group boundary the int32 partial sum (minus
``zero * sum_k a`` for asymmetric weights) is scaled by ``scale_b[n, g]`` and added in fp32.
A K tile never straddles a group: BLOCK_K divides G, or the whole K is one group (G = K).
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from . import _common as C

#: The default (first) config has BLOCK_K = 32, which divides every supported group size.
CONFIGS = [
    C.config(BLOCK_M=32, BLOCK_N=64, BLOCK_K=32, GROUP_M=8, num_warps=4, num_stages=4),
    C.config(BLOCK_M=16, BLOCK_N=64, BLOCK_K=64, GROUP_M=1, num_warps=4, num_stages=4),
    C.config(BLOCK_M=16, BLOCK_N=128, BLOCK_K=128, GROUP_M=1, num_warps=4, num_stages=3),
    C.config(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=4, num_stages=4),
    C.config(BLOCK_M=128, BLOCK_N=128, BLOCK_K=128, GROUP_M=8, num_warps=8, num_stages=3),
]


def _block_k_fits(cfg, named_args):
    G, K = named_args["G"], named_args["K"]
    return G == K or G % cfg.kwargs["BLOCK_K"] == 0


@C.autotune(CONFIGS, key=["N", "K", "G", "M_BUCKET"], prune=C.prune_by_smem_and_m(1, 0.5, _block_k_fits))
@triton.jit
def _w4a8_kernel(a_ptr, b_ptr, sa_ptr, sb_ptr, z_ptr, bias_ptr, c_ptr,
                 M, N, K, G, M_BUCKET,
                 stride_am, stride_ak, stride_bn, stride_bk, stride_sn, stride_sg, stride_cm, stride_cn,
                 HAS_ZERO: tl.constexpr, HAS_BIAS: tl.constexpr, INTERP: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    pid = tl.program_id(0)
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
    a_rows = a_ptr + rm.to(tl.int64)[:, None] * stride_am
    b_cols = b_ptr + rn.to(tl.int64)[None, :] * stride_bn
    s_cols = rn.to(tl.int64) * stride_sn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    a_sum = tl.zeros((BLOCK_M,), dtype=tl.int32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + rk
        km = k < K
        a = tl.load(a_rows + k[None, :] * stride_ak, mask=mm[:, None] & km[None, :], other=0)
        byte = tl.load(b_cols + (k // 2)[:, None] * stride_bk, mask=km[:, None] & nm[None, :], other=0)
        nib = (byte.to(tl.int32) >> ((k & 1) * 4)[:, None]) & 0xF
        if not HAS_ZERO:
            nib = (nib ^ 8) - 8  # sign-extend the symmetric nibble
        acc_g += tl.dot(a, nib.to(tl.int8), out_dtype=tl.int32)
        if HAS_ZERO:
            a_sum += tl.sum(a.to(tl.int32), axis=1)
        if ((k0 + BLOCK_K) % G == 0) | (k0 + BLOCK_K >= K):  # end of group g: fp32 across groups
            g = k0 // G
            sb = tl.load(sb_ptr + s_cols + g * stride_sg, mask=nm, other=0.0)
            if HAS_ZERO:
                z = tl.load(z_ptr + s_cols + g * stride_sg, mask=nm, other=0).to(tl.int32)
                acc_g -= a_sum[:, None] * z[None, :]
                a_sum = tl.zeros((BLOCK_M,), dtype=tl.int32)
            acc += acc_g.to(tl.float32) * sb[None, :]
            acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)

    sa = tl.load(sa_ptr + rm, mask=mm, other=0.0)
    y = acc * sa[:, None]
    if HAS_BIAS:
        y += tl.load(bias_ptr + rn, mask=nm, other=0.0).to(tl.float32)[None, :]
    c_ptrs = c_ptr + rm.to(tl.int64)[:, None] * stride_cm + rn[None, :] * stride_cn
    tl.store(c_ptrs, C.cast(y, c_ptr.dtype.element_ty, INTERP), mask=mm[:, None] & nm[None, :])


def gemm(a: torch.Tensor, b_packed: torch.Tensor, scale_a: torch.Tensor, scale_b: torch.Tensor,
         zero_b: Optional[torch.Tensor], bias: Optional[torch.Tensor], out_dtype: torch.dtype) -> torch.Tensor:
    """a int8 [M, K]; b_packed uint8 [N, K/2] PLAIN; scale_b fp32 [N, K/G]; zero_b uint8 [N, K/G]
    or None. Inputs are validated by the caller."""
    M, K = a.shape
    N = b_packed.shape[0]
    G = K // scale_b.shape[1]
    out = torch.empty((M, N), dtype=out_dtype, device=a.device)
    if M == 0 or N == 0:
        return out
    sb = scale_b.contiguous()
    z = zero_b.contiguous() if zero_b is not None else sb
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)  # noqa: E731
    C.launch(_w4a8_kernel, grid, a, b_packed, scale_a.contiguous(), sb, z,
             bias.contiguous() if bias is not None else sb, out,
             M, N, K, G, C.m_bucket(M),
             a.stride(0), a.stride(1), b_packed.stride(0), b_packed.stride(1), sb.stride(0), sb.stride(1),
             out.stride(0), out.stride(1),
             HAS_ZERO=zero_b is not None, HAS_BIAS=bias is not None, INTERP=C.interpreting())
    return out
