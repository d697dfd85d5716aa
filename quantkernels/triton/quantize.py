"""Per-token int8 activation quantization (docs/numerics.md s.1) and its LLM.int8() variant with
outlier columns (s.5), bit-exact with ``reference.quantize_int8_rowwise[_outliers]``.

One program per row. absmax in fp32 (exact in any order), ``inv = 127 / absmax`` and
``scale = absmax / 127`` as IEEE divisions (``div_rn``: Triton's ``/`` is ``div.full.f32``,
an approximation, on NVIDIA), ``q = clamp(rne(x * inv), -127, 127)``. Round-half-to-even
is the magic-number round ``(v + 1.5 * 2**23) - 1.5 * 2**23``, exact for |v| < 2**22 in
fp32 and identical in the interpreter and on the GPU (Triton never reassociates float
adds; the clamp between the product and the add keeps the multiply from fusing into an
FMA). Non-finite products (NaN/Inf rows, or ``0 * inf`` when absmax is subnormal) give
``q = 0`` as in the reference's ``nan_to_num``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _common as C

#: Rows of up to this many elements are quantized from registers (one read of x).
MAX_ONE_TILE = 8192
#: Tile width of the two-pass loop for longer rows.
LOOP_BLOCK = 2048
#: 1.5 * 2**23: adding and subtracting it rounds an fp32 |v| < 2**22 to an integer, half to even.
RNE_MAGIC = 12582912.0


@triton.jit
def _absmax_tile(x, absmax, nan_seen):
    a = tl.abs(x)
    isnan = a != a
    absmax = tl.maximum(absmax, tl.max(tl.where(isnan, 0.0, a), axis=0))
    nan_seen = tl.maximum(nan_seen, tl.max(isnan.to(tl.int32), axis=0))
    return absmax, nan_seen


@triton.jit
def _quant_tile(x, inv):
    v = x * inv
    ok = v == v  # NaN (0 * inf, inf * 0, NaN input) -> q = 0
    v = tl.minimum(tl.maximum(v, -127.0), 127.0)
    r = (v + 12582912.0) - 12582912.0
    return tl.where(ok, r, 0.0).to(tl.int8)


@C.single()
@triton.jit
def _quant_rows_kernel(x_ptr, q_ptr, s_ptr, o_ptr, K, stride_xm, stride_xk, stride_qm,
                       HAS_MASK: tl.constexpr, ONE_TILE: tl.constexpr, BLOCK_K: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_K)
    x_row = x_ptr + row * stride_xm
    absmax = tl.zeros((), tl.float32)
    nan_seen = tl.zeros((), tl.int32)
    if ONE_TILE:
        km = offs < K
        x = tl.load(x_row + offs * stride_xk, mask=km, other=0.0).to(tl.float32)
        if HAS_MASK:
            x = tl.where(tl.load(o_ptr + offs, mask=km, other=0) != 0, 0.0, x)
        absmax, nan_seen = _absmax_tile(x, absmax, nan_seen)
    else:
        for k0 in range(0, K, BLOCK_K):
            k = k0 + offs
            km = k < K
            x = tl.load(x_row + k * stride_xk, mask=km, other=0.0).to(tl.float32)
            if HAS_MASK:
                x = tl.where(tl.load(o_ptr + k, mask=km, other=0) != 0, 0.0, x)
            absmax, nan_seen = _absmax_tile(x, absmax, nan_seen)
    absmax = tl.where(nan_seen > 0, float("nan"), absmax)
    is_zero = absmax == 0.0
    c127 = tl.full((), 127.0, tl.float32)
    inv = tl.where(is_zero, 0.0, tl.math.div_rn(c127, absmax))
    scale = tl.where(is_zero, 1.0, tl.math.div_rn(absmax, c127))
    tl.store(s_ptr + row, scale)
    q_row = q_ptr + row * stride_qm
    if ONE_TILE:
        tl.store(q_row + offs, _quant_tile(x, inv), mask=km)
    else:
        for k0 in range(0, K, BLOCK_K):
            k = k0 + offs
            km = k < K
            x = tl.load(x_row + k * stride_xk, mask=km, other=0.0).to(tl.float32)
            if HAS_MASK:
                x = tl.where(tl.load(o_ptr + k, mask=km, other=0) != 0, 0.0, x)
            tl.store(q_row + k, _quant_tile(x, inv), mask=km)


@C.single()
@triton.jit
def _outlier_cols_kernel(x_ptr, o_ptr, M, K, stride_xm, stride_xk, threshold,
                         BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    # One program per BLOCK_K columns: mask[k] = any_m |x[m, k]| >= threshold (written as uint8).
    k = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    km = k < K
    rm = tl.arange(0, BLOCK_M)
    hit = tl.zeros((BLOCK_K,), tl.int32)
    for m0 in range(0, M, BLOCK_M):
        m = m0 + rm
        x = tl.load(x_ptr + m.to(tl.int64)[:, None] * stride_xm + k[None, :] * stride_xk,
                    mask=(m < M)[:, None] & km[None, :], other=0.0).to(tl.float32)
        hit = tl.maximum(hit, tl.max((tl.abs(x) >= threshold).to(tl.int32), axis=0))
    tl.store(o_ptr + k, hit.to(tl.uint8), mask=km)


def _row_launch_params(K: int):
    if K <= MAX_ONE_TILE:
        block = triton.next_power_of_2(K)
        return True, block, (1 if block <= 256 else 4 if block <= 2048 else 8)
    return False, LOOP_BLOCK, 8


def quantize_rows(x2: torch.Tensor, outliers: torch.Tensor | None = None):
    """x2: float [M, K] (any strides) -> (int8 [M, K] contiguous, float32 [M]); ``outliers``:
    optional uint8/bool [K] column mask whose columns are treated as zero."""
    M, K = x2.shape
    q = torch.empty((M, K), dtype=torch.int8, device=x2.device)
    s = torch.empty((M,), dtype=torch.float32, device=x2.device)
    if M == 0:
        return q, s
    one, block, warps = _row_launch_params(K)
    o = outliers.view(torch.uint8) if outliers is not None else q  # dummy pointer when unused
    C.launch(_quant_rows_kernel, (M,), x2, q, s, o, K, x2.stride(0), x2.stride(1), q.stride(0),
             HAS_MASK=outliers is not None, ONE_TILE=one, BLOCK_K=block, num_warps=warps)
    return q, s


def outlier_columns(x2: torch.Tensor, threshold: float) -> torch.Tensor:
    """bool [K]: columns holding any |x| >= threshold (all False for threshold <= 0), on device."""
    M, K = x2.shape
    mask = torch.zeros((K,), dtype=torch.bool, device=x2.device)
    if threshold > 0 and M > 0:
        block_k = 64
        C.launch(_outlier_cols_kernel, (triton.cdiv(K, block_k),), x2, mask.view(torch.uint8), M, K,
                 x2.stride(0), x2.stride(1), float(threshold), BLOCK_M=32, BLOCK_K=block_k, num_warps=4)
    return mask
