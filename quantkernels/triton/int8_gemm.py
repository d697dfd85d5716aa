"""int8 x int8 -> int32 GEMM on the tensor cores (``tl.dot(..., out_dtype=tl.int32)``: IMMA on
sm_80, IGMMA on sm_90) with a fused epilogue, serving three ops:

- ``int8_gemm``: the exact int32 ``C = A @ B^T``;
- ``w8a8_gemm``: ``Y = C * sa[m] * sb[n] + bias`` in fp32, cast to fp16/bf16/fp32;
- ``llm_int8_linear``: the same, plus the outlier columns in floating point (docs/numerics.md s.5):
  ``Y += (X[:, O] @ Wq[:, O]^T) * sb[n]``. O is a device-side column mask; a K tile with no
  outlier column skips the float product (a uniform branch per program), so there is no
  host synchronisation and the launch is CUDA-graph and ``torch.compile`` friendly. fp16/bf16
  products are exact (|Wq| <= 128 is exact in both), fp32 uses ``input_precision="ieee"``
  (so does bf16 in the interpreter, whose dot cannot multiply bf16: see ``_common.dot_in_fp32``).
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from . import _common as C

#: (BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, num_warps, num_stages). The first is the default
#: (interpreter / QUANTKERNELS_TRITON_AUTOTUNE=0) and must suit every M.
CONFIGS = [
    C.config(BLOCK_M=32, BLOCK_N=64, BLOCK_K=128, GROUP_M=8, num_warps=4, num_stages=4),
    C.config(BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, GROUP_M=1, num_warps=4, num_stages=4),
    C.config(BLOCK_M=16, BLOCK_N=128, BLOCK_K=128, GROUP_M=1, num_warps=4, num_stages=4),
    C.config(BLOCK_M=64, BLOCK_N=128, BLOCK_K=128, GROUP_M=8, num_warps=4, num_stages=4),
    C.config(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=4, num_stages=4),
    C.config(BLOCK_M=128, BLOCK_N=256, BLOCK_K=128, GROUP_M=8, num_warps=8, num_stages=3),
]


@C.autotune(CONFIGS, key=["N", "K", "M_BUCKET"], prune=C.prune_by_smem_and_m(1, 1))
@triton.jit
def _int8_gemm_kernel(a_ptr, b_ptr, c_ptr, sa_ptr, sb_ptr, bias_ptr, x_ptr, o_ptr,
                      M, N, K, M_BUCKET,
                      stride_am, stride_ak, stride_bn, stride_bk, stride_cm, stride_cn, stride_xm, stride_xk,
                      SCALED: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_OUTLIERS: tl.constexpr,
                      X_FP32: tl.constexpr, INTERP: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    # Grouped tile order: GROUP_M row-tiles share each B column-tile while it is in L2.
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
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    acc_o = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + rk
        km = k < K
        a = tl.load(a_rows + k[None, :] * stride_ak, mask=mm[:, None] & km[None, :], other=0)
        b = tl.load(b_cols + k[:, None] * stride_bk, mask=km[:, None] & nm[None, :], other=0)
        acc += tl.dot(a, b, out_dtype=tl.int32)
        if HAS_OUTLIERS:
            o = tl.load(o_ptr + k, mask=km, other=0)
            if tl.max(o, axis=0) > 0:  # uniform per program: only tiles holding an outlier column
                x = tl.load(x_ptr + rm.to(tl.int64)[:, None] * stride_xm + k[None, :] * stride_xk,
                            mask=mm[:, None] & km[None, :], other=0.0)
                x = tl.where(o[None, :] != 0, x, tl.zeros_like(x))
                if X_FP32:
                    acc_o += tl.dot(x.to(tl.float32), b.to(tl.float32), input_precision="ieee")
                else:
                    acc_o += tl.dot(x, b.to(x.dtype))

    c_ptrs = c_ptr + rm.to(tl.int64)[:, None] * stride_cm + rn[None, :] * stride_cn
    cm = mm[:, None] & nm[None, :]
    if SCALED:
        sa = tl.load(sa_ptr + rm, mask=mm, other=0.0)
        sb = tl.load(sb_ptr + rn, mask=nm, other=0.0)
        y = acc.to(tl.float32) * sa[:, None] * sb[None, :]
        if HAS_OUTLIERS:
            y += acc_o * sb[None, :]
        if HAS_BIAS:
            y += tl.load(bias_ptr + rn, mask=nm, other=0.0).to(tl.float32)[None, :]
        tl.store(c_ptrs, C.cast(y, c_ptr.dtype.element_ty, INTERP), mask=cm)
    else:
        tl.store(c_ptrs, acc, mask=cm)


def _grid(M, N):
    return lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)


def gemm(a: torch.Tensor, b: torch.Tensor, scale_a: Optional[torch.Tensor] = None,
         scale_b: Optional[torch.Tensor] = None, bias: Optional[torch.Tensor] = None,
         out_dtype: torch.dtype = torch.int32, x: Optional[torch.Tensor] = None,
         outliers: Optional[torch.Tensor] = None) -> torch.Tensor:
    """a int8 [M, K], b int8 [N, K] (any strides). Without scales: int32 [M, N]. With scales:
    the scaled epilogue in ``out_dtype``; with ``x``/``outliers`` (float [M, K], bool [K]) the
    LLM.int8 outlier correction. Inputs are validated by the caller."""
    M, K = a.shape
    N = b.shape[0]
    out = torch.empty((M, N), dtype=out_dtype, device=a.device)
    if M == 0 or N == 0:
        return out
    if K == 0:
        return out.zero_() if scale_a is None else _empty_k(out, bias)
    scaled = scale_a is not None
    has_out = outliers is not None
    sa = scale_a.contiguous() if scaled else out
    sb = scale_b.contiguous() if scaled else out
    bi = bias.contiguous() if bias is not None else out
    xx = x if has_out else a
    oo = outliers.view(torch.uint8) if has_out else a
    C.launch(_int8_gemm_kernel, _grid(M, N), a, b, out, sa, sb, bi, xx, oo,
             M, N, K, C.m_bucket(M),
             a.stride(0), a.stride(1), b.stride(0), b.stride(1), out.stride(0), out.stride(1),
             xx.stride(0), xx.stride(1),
             SCALED=scaled, HAS_BIAS=bias is not None, HAS_OUTLIERS=has_out,
             X_FP32=has_out and C.dot_in_fp32(x.dtype), INTERP=C.interpreting())
    return out


def _empty_k(out, bias):
    if bias is None:
        return out.zero_()
    return out.copy_(bias.float().expand_as(out))
