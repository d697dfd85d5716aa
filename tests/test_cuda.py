"""The CUDA C++ kernels (csrc/cuda, registered by csrc/cuda_bindings.cpp) against the spec.

Everything here needs a GPU (marked ``cuda``; run by ``make gpu-check``). Integer results
(quantized values, int32 GEMMs, outlier masks) must equal the reference / the numpy spec
exactly; float outputs follow docs/numerics.md s.6 (``_spec.assert_float_output``). Shapes are odd
on purpose: M in (1, 3, 17, 67, 130) crosses the three tile configs (M <= 16, <= 64, > 64) and
their M tails, N and K are not tile multiples, and K % 16 != 0 / misaligned pointers take the
SIMT fallback kernels. The weight-only ops have a GEMV (M <= 8, fp32, unaligned shapes) and a
tensor-core kernel (fp16/bf16, M > 8, optional split-K): the *_tensor_core tests cover M across
that threshold, its tiles and tails, group sizes 32 / 128 / K, and test_weight_only_path_selection
checks (with the profiler's kernel names) which kernel ran. test_ops.py also runs every op on
``cuda`` through the dispatcher.
"""

from __future__ import annotations

import itertools
import os
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

import _spec as S
import quantkernels
from quantkernels import dispatch
from quantkernels import reference as R

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")]

ops = torch.ops.quantkernels
DEV = "cuda"
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
#: Every op csrc/cuda_bindings.cpp registers for the CUDA key.
CUDA_OPS = ("quantize_int8_rowwise", "quantize_int8_rowwise_outliers", "int8_gemm", "w8a8_gemm", "w4a8_gemm",
            "w8a16_gemm", "w4a16_gemm", "llm_int8_linear", "gemm_4bit")

MS = (1, 3, 17, 67, 130)
GEMM_NK = [(8, 32), (37, 48), (200, 4096 + 16), (64, 100), (130, 7)]  # K % 16 != 0 -> SIMT fallback


def dn(dt) -> str:
    return "none" if dt is None else str(dt).replace("torch.", "").replace("float", "f")


@pytest.fixture(autouse=True)
def _registered():
    """A CUDA test must run the CUDA kernel, not silently the reference: fail if it is missing."""
    have = dispatch.native_kernels("CUDA")
    missing = [op for op in CUDA_OPS if op not in have]
    assert not missing, (f"quantkernels._C has no CUDA kernel for {missing}: built without CUDA? "
                         f"({quantkernels._native.REASON or 'extension loaded'})")


def randint8(shape, lo=-128, hi=127):
    t = torch.randint(lo, hi + 1, shape, dtype=torch.int8)
    if len(shape) == 2 and shape[0] >= 3:
        t[1] = 0
    return t


def rand_rows(M, K, dtype):
    x = torch.randn(M, K) * torch.exp(torch.randn(M, 1))
    if M >= 3:
        x[1] = 0
    return x.to(dtype)


def pos_scale(shape, base):
    return (base * torch.exp2(torch.rand(shape) * 2 - 1)).float()


def misaligned(t: torch.Tensor) -> torch.Tensor:
    """The same values, contiguous, at an address that is not 16-byte aligned (SIMT paths)."""
    buf = torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)
    out = buf[1:].view(t.shape)
    out.copy_(t)
    assert out.is_contiguous() and out.data_ptr() % 16 != 0
    return out


# --------------------------------------------------------------------------- quantization


@pytest.mark.parametrize("M,K,dtype", [pytest.param(M, K, dt, id=f"{M}x{K}-{dn(dt)}")
                                       for M, K, dt in itertools.product((1, 3, 17, 67), (1, 7, 256, 4099),
                                                                         FLOAT_DTYPES)])
def test_quantize_rowwise_exact(M, K, dtype):
    x = rand_rows(M, K, dtype)
    q, s = ops.quantize_int8_rowwise(x.to(DEV))
    rq, rs = R.quantize_int8_rowwise(x)  # CPU reference: IEEE fp32 ops, the same as the kernel's
    assert torch.equal(q.cpu(), rq) and torch.equal(s.cpu(), rs)
    eq, es = S.int8_absmax(S.f32(x))
    S.assert_int_equal(q, eq, "q")
    S.assert_scale(s, es, "scale")


def test_quantize_rowwise_nonfinite_and_ties():
    x = torch.randn(6, 300)
    x[0, 5] = float("nan")
    x[2, 7] = float("inf")
    x[3, 9] = -float("inf")
    x[4] = 0
    x[5, :8] = torch.tensor([127.0, 2.5, 3.5, -2.5, -0.5, 1.5, 126.5, -127.0])
    x[5, 8:] = 0
    q, s = ops.quantize_int8_rowwise(x.to(DEV))
    rq, rs = R.quantize_int8_rowwise(x)
    assert torch.equal(q.cpu(), rq)
    assert torch.equal(s.cpu().nan_to_num(nan=-1.0), rs.nan_to_num(nan=-1.0))
    assert torch.isnan(s[0]) and s[2].item() == float("inf") and s[4].item() == 1.0
    assert q[5, :8].tolist() == [127, 2, 4, -2, 0, 2, 126, -127]


def test_quantize_rowwise_3d_noncontiguous():
    x = torch.randn(2, 5, 64, dtype=torch.bfloat16).transpose(0, 1)
    q, s = ops.quantize_int8_rowwise(x.to(DEV))
    rq, rs = R.quantize_int8_rowwise(x)
    assert q.shape == (5, 2, 64) and torch.equal(q.cpu(), rq) and torch.equal(s.cpu(), rs)


@pytest.mark.parametrize("tau", [6.0, 0.0, -1.0])
@pytest.mark.parametrize("M,K,dtype", [(1, 40, torch.float16), (17, 300, torch.bfloat16), (130, 4100, torch.float32)])
def test_quantize_outliers_exact(M, K, dtype, tau):
    x = rand_rows(M, K, dtype).float()
    x[0, 3] = 30.0
    x[M - 1, 20] = -6.0  # >= is inclusive
    x = x.to(dtype)
    q, s, mask = ops.quantize_int8_rowwise_outliers(x.to(DEV), tau)
    rq, rs, rmask = R.quantize_int8_rowwise_outliers(x, tau)
    assert mask.dtype == torch.bool and torch.equal(mask.cpu(), rmask)
    assert torch.equal(q.cpu(), rq) and torch.equal(s.cpu(), rs)
    if tau > 0:
        assert mask[3] and mask[20]


# --------------------------------------------------------------------------- int8 GEMMs


GEMM_PARAMS = [pytest.param(M, N, K, id=f"{M}x{N}x{K}") for M, (N, K) in itertools.product(MS, GEMM_NK)]


@pytest.mark.parametrize("M,N,K", GEMM_PARAMS)
def test_int8_gemm_exact(M, N, K):
    a, b = randint8((M, K)), randint8((N, K))
    c = ops.int8_gemm(a.to(DEV), b.to(DEV))
    assert c.dtype == torch.int32
    S.assert_int_equal(c, S.int_gemm(a.numpy(), b.numpy()), "C")


def test_int8_gemm_extremes_and_fallback():
    # -128 * -128 everywhere at the largest K: the int32 bound must hold, on both paths.
    K = 131071 // 16 * 16
    a = torch.full((3, K), -128, dtype=torch.int8)
    b = torch.full((5, K), -128, dtype=torch.int8)
    expect = S.int_gemm(a.numpy(), b.numpy())
    S.assert_int_equal(ops.int8_gemm(a.to(DEV), b.to(DEV)), expect, "C (tensor cores)")
    S.assert_int_equal(ops.int8_gemm(misaligned(a.to(DEV)), b.to(DEV)), expect, "C (SIMT)")
    a, b = randint8((67, 96)), randint8((37, 96))
    S.assert_int_equal(ops.int8_gemm(misaligned(a.to(DEV)), b.to(DEV)), S.int_gemm(a.numpy(), b.numpy()), "C")


def test_int8_gemm_empty():
    assert ops.int8_gemm(torch.zeros(0, 32, dtype=torch.int8, device=DEV),
                         torch.zeros(5, 32, dtype=torch.int8, device=DEV)).shape == (0, 5)
    c = ops.int8_gemm(torch.zeros(3, 0, dtype=torch.int8, device=DEV), torch.zeros(5, 0, dtype=torch.int8, device=DEV))
    assert c.shape == (3, 5) and not c.any()


W8A8_PARAMS = [
    pytest.param(M, N, K, out, bias, id=f"{M}x{N}x{K}-{dn(out)}-bias_{dn(bias)}")
    for M, (N, K), out, bias in itertools.product((1, 17, 130), [(37, 48), (200, 4112), (64, 100)],
                                                  (None, torch.float16, torch.bfloat16, torch.float32),
                                                  (None, torch.float32, torch.bfloat16))
]


@pytest.mark.parametrize("M,N,K,out,bias_dt", W8A8_PARAMS)
def test_w8a8_gemm(M, N, K, out, bias_dt):
    a, b = randint8((M, K)), randint8((N, K))
    sa, sb = pos_scale((M,), 0.02), pos_scale((N,), 0.003)
    bias = None if bias_dt is None else torch.randn(N).to(bias_dt)
    y = ops.w8a8_gemm(a.to(DEV), b.to(DEV), sa.to(DEV), sb.to(DEV), None if bias is None else bias.to(DEV), out)
    exact, mag, _ = S.w8a8(a.numpy(), b.numpy(), sa.numpy(), sb.numpy(), None if bias is None else S.f32(bias))
    S.assert_float_output(y, exact, mag, out or torch.float32, "Y")


# --------------------------------------------------------------------------- W4A8


W4A8_PARAMS = [
    pytest.param(M, N, K, G, asym, id=f"{M}x{N}x{K}-g{G}-{'asym' if asym else 'sym'}")
    for M, (N, K, G), asym in itertools.product((1, 17, 67, 130),
                                                [(37, 256, 32), (200, 4096, 128), (64, 96, 96), (24, 70, 70)],
                                                (False, True))
]


@pytest.mark.parametrize("M,N,K,G,asym", W4A8_PARAMS)
def test_w4a8_gemm(M, N, K, G, asym):
    a = randint8((M, K))
    w = torch.randn(N, K) * 0.02
    if asym:
        packed, sb, zero = ops.quantize_uint4_asym(w, G)
        q = S.unpack(packed.numpy(), signed=False)
    else:
        (packed, sb), zero = ops.quantize_int4_sym(w, G), None
        q = S.unpack(packed.numpy(), signed=True)
    sa = pos_scale((M,), 0.02)
    bias = torch.randn(N)
    for out in (torch.float16, torch.float32):
        y = ops.w4a8_gemm(a.to(DEV), packed.to(DEV), sa.to(DEV), sb.to(DEV),
                          None if zero is None else zero.to(DEV), bias.to(DEV), out)
        exact, mag = S.w4a8(a.numpy(), q, sa.numpy(), sb.numpy(), None if zero is None else zero.numpy(), bias.numpy())
        S.assert_float_output(y, exact, mag, out, f"Y ({dn(out)})")


# --------------------------------------------------------------------------- weight-only


WO_PARAMS = [
    pytest.param(M, N, K, dt, id=f"{M}x{N}x{K}-{dn(dt)}")
    for M, (N, K), dt in itertools.product((1, 3, 17, 67), [(37, 256), (200, 4096), (64, 70)], FLOAT_DTYPES)
]


@pytest.mark.parametrize("M,N,K,dtype", WO_PARAMS)
@pytest.mark.parametrize("with_bias", [False, True], ids=["nobias", "bias"])
def test_w8a16_gemm(M, N, K, dtype, with_bias):
    x = rand_rows(M, K, dtype)
    b, sb = randint8((N, K)), pos_scale((N,), 0.003)
    bias = torch.randn(N).to(dtype) if with_bias else None
    y = ops.w8a16_gemm(x.to(DEV), b.to(DEV), sb.to(DEV), None if bias is None else bias.to(DEV))
    w = (b.float() * sb[:, None]).to(dtype)  # the dequantized weight rounded to x's dtype
    exact, mag = S.weight_only(S.f32(x), S.f32(w), None if bias is None else S.f32(bias))
    S.assert_float_output(y, exact, mag, dtype, "Y")


@pytest.mark.parametrize("M,N,K,dtype", WO_PARAMS)
@pytest.mark.parametrize("asym", [False, True], ids=["sym", "asym"])
def test_w4a16_gemm(M, N, K, dtype, asym):
    G = 32 if K % 32 == 0 else K
    x = rand_rows(M, K, dtype)
    w = torch.randn(N, K) * 0.02
    if asym:
        packed, sb, zero = ops.quantize_uint4_asym(w, G)
    else:
        (packed, sb), zero = ops.quantize_int4_sym(w, G), None
    bias = torch.randn(N).to(dtype)
    y = ops.w4a16_gemm(x.to(DEV), packed.to(DEV), sb.to(DEV), None if zero is None else zero.to(DEV), bias.to(DEV))
    wdeq = R.dequantize_int4(packed, sb, zero, torch.float32).to(dtype)
    exact, mag = S.weight_only(S.f32(x), S.f32(wdeq), S.f32(bias))
    S.assert_float_output(y, exact, mag, dtype, "Y")


# Tensor-core W4A16 / W8A16 (weight_only_mma_kernel, fp16/bf16, M > 8; weight_only.cu). M = 8 is
# the last GEMV row count, 9 / 16 the BM = 16 tile, 17 / 33 / 64 / 67 / 130 the BM = 32 / 64
# tiles and their M tails; N values are not multiples of the 64 / 128-channel tiles; at small M,
# (200, 4096) and (130, 1056) take the split-K path with its reduce kernel (1056: an uneven last
# split), (37, 256) / (70, 96) a single split; K = 96 and 1056 end inside a 64-wide stage.
TC_MS = (8, 9, 16, 17, 33, 64, 67, 130)
TC_W4_SHAPES = [(37, 256, 32), (37, 256, 128), (37, 256, 256), (200, 4096, 32), (200, 4096, 128),
                (200, 4096, 4096), (70, 96, 32), (70, 96, 96), (130, 1056, 32), (130, 1056, 1056)]
TC_W8_SHAPES = [(37, 256), (200, 4096), (70, 48), (130, 1056)]
HALF_DTYPES = (torch.float16, torch.bfloat16)


def _w4_weight(N, K, G, asym):
    w = torch.randn(N, K) * 0.02
    w[:, 5] *= 40  # a wide group next to ordinary ones
    if asym:
        packed, sb, zero = ops.quantize_uint4_asym(w, G)
    else:
        (packed, sb), zero = ops.quantize_int4_sym(w, G), None
    return packed, sb, zero


def _check_w4a16(x, packed, sb, zero, bias, dtype, what):
    dev = [t.to(DEV) if t is not None else None for t in (x, packed, sb, zero, bias)]
    y = ops.w4a16_gemm(*dev)
    wdeq = R.dequantize_int4(packed, sb, zero, torch.float32).to(dtype)  # rounded to x's dtype, as the spec
    exact, mag = S.weight_only(S.f32(x), S.f32(wdeq), None if bias is None else S.f32(bias))
    S.assert_float_output(y, exact, mag, dtype, what)


@pytest.mark.parametrize("M,N,K,G,dtype,asym", [
    pytest.param(M, N, K, G, dt, asym, id=f"{M}x{N}x{K}-g{G}-{dn(dt)}-{'asym' if asym else 'sym'}")
    for M, (N, K, G), dt, asym in itertools.product(TC_MS, TC_W4_SHAPES, HALF_DTYPES, (False, True))])
def test_w4a16_tensor_core(M, N, K, G, dtype, asym):
    x = rand_rows(M, K, dtype)
    packed, sb, zero = _w4_weight(N, K, G, asym)
    bias = torch.randn(N).to(dtype) if (M + asym) % 2 else None  # on and off across every shape
    _check_w4a16(x, packed, sb, zero, bias, dtype, "Y")


@pytest.mark.parametrize("M,N,K,dtype", [
    pytest.param(M, N, K, dt, id=f"{M}x{N}x{K}-{dn(dt)}")
    for M, (N, K), dt in itertools.product(TC_MS, TC_W8_SHAPES, HALF_DTYPES)])
@pytest.mark.parametrize("with_bias", [False, True], ids=["nobias", "bias"])
def test_w8a16_tensor_core(M, N, K, dtype, with_bias):
    x = rand_rows(M, K, dtype)
    b, sb = randint8((N, K)), pos_scale((N,), 0.003)
    b[:, 3] = -128  # the int8 extremes go through the magic-number dequantization too
    b[:, 4] = 127
    bias = torch.randn(N).to(dtype) if with_bias else None
    y = ops.w8a16_gemm(x.to(DEV), b.to(DEV), sb.to(DEV), None if bias is None else bias.to(DEV))
    w = (b.float() * sb[:, None]).to(dtype)
    exact, mag = S.weight_only(S.f32(x), S.f32(w), None if bias is None else S.f32(bias))
    S.assert_float_output(y, exact, mag, dtype, "Y")


def test_w4a16_tensor_core_dequant_is_bitexact():
    """One nonzero activation per row picks one weight column: the output must be exactly
    T(float(q - z) * s) (times a power of two), i.e. the in-register dequantization matches the
    reference bit for bit (no fp16 scale rounding as in Marlin's HFMA2 form)."""
    M, N, K, G = 16, 96, 512, 32
    for dtype, asym in itertools.product(HALF_DTYPES, (False, True)):
        packed, sb, zero = _w4_weight(N, K, G, asym)
        sb = sb * (1 + torch.rand_like(sb) * 1e-3)  # scales far from any fp16/bf16 value
        x = torch.zeros(M, K, dtype=dtype)
        cols = torch.randperm(K)[:M]
        x[torch.arange(M), cols] = 2.0
        y = ops.w4a16_gemm(x.to(DEV), packed.to(DEV), sb.to(DEV), None if zero is None else zero.to(DEV)).cpu()
        wdeq = R.dequantize_int4(packed, sb, zero, torch.float32).to(dtype)
        expect = (wdeq[:, cols].t().float() * 2).to(dtype)
        assert torch.equal(y, expect), f"{dtype} asym={asym}: {(y.float() - expect.float()).abs().max()}"


def _kernel_names(fn) -> str:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return " ".join(e.key for e in prof.key_averages())


@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=dn)
def test_weight_only_path_selection(dtype):
    """M <= 8, fp32, misaligned x, K % 32 != 0 (int4) take the GEMV; M > 8 the tensor cores, with
    the split-K reduce only when the (M, N) tiles leave the GPU idle and K is long enough."""
    packed, sb, zero = (t.to(DEV) for t in _w4_weight(200, 4096, 128, True))
    b8, s8 = randint8((200, 4096)).to(DEV), pos_scale((200,), 0.003).to(DEV)

    def names(M, xdt=dtype, w4=True, mis=False, K=4096, p=packed, s=sb, z=zero):
        x = rand_rows(M, K, xdt).to(DEV)
        x = misaligned(x) if mis else x
        return _kernel_names(lambda: ops.w4a16_gemm(x, p, s, z) if w4 else ops.w8a16_gemm(x, b8, s8))

    for M in (1, 8):
        n = names(M)
        assert "weight_only_gemv_kernel" in n and "weight_only_mma_kernel" not in n, n
    for M in (9, 17, 64, 130):
        for w4 in (True, False):
            n = names(M, w4=w4)
            assert "weight_only_mma_kernel" in n and "weight_only_gemv_kernel" not in n, (M, w4, n)
    assert "splitk_reduce_kernel" in names(16)  # 4 x 1 CTAs of 64 channels for a whole GPU
    assert "weight_only_gemv_kernel" in names(17, xdt=torch.float32)
    assert "weight_only_gemv_kernel" in names(17, mis=True)
    p48, s48, z48 = (t.to(DEV) for t in _w4_weight(64, 48, 48, True))
    assert "weight_only_gemv_kernel" in names(17, K=48, p=p48, s=s48, z=z48)
    p64, s64, z64 = (t.to(DEV) for t in _w4_weight(64, 64, 64, True))
    n = names(17, K=64, p=p64, s=s64, z=z64)
    assert "weight_only_mma_kernel" in n and "splitk_reduce_kernel" not in n, n  # one stage: no split


def test_weight_only_gemv_threshold_env(monkeypatch):
    """QUANTKERNELS_CUDA_WO_GEMV_MAX_M moves the GEMV / tensor-core threshold (read per call):
    0 sends decode M (1, 3, 8) to the tensor cores, with results as the spec; a large value
    keeps M = 17 on the GEMV; a malformed value is a ValueError naming the variable."""
    N, K, G = 200, 1024, 128
    packed, sb, zero = _w4_weight(N, K, G, True)
    b8, s8 = randint8((N, K)), pos_scale((N,), 0.003)
    monkeypatch.setenv("QUANTKERNELS_CUDA_WO_GEMV_MAX_M", "0")
    for M, dtype in itertools.product((1, 3, 8), HALF_DTYPES):
        x = rand_rows(M, K, dtype)
        n = _kernel_names(lambda: _check_w4a16(x, packed, sb, zero, torch.randn(N).to(dtype), dtype, f"Y (M={M})"))
        assert "weight_only_mma_kernel" in n and "weight_only_gemv_kernel" not in n, n
        y = ops.w8a16_gemm(x.to(DEV), b8.to(DEV), s8.to(DEV))
        exact, mag = S.weight_only(S.f32(x), S.f32((b8.float() * s8[:, None]).to(dtype)))
        S.assert_float_output(y, exact, mag, dtype, f"Y w8a16 (M={M})")
    monkeypatch.setenv("QUANTKERNELS_CUDA_WO_GEMV_MAX_M", "100")
    x = rand_rows(17, K, torch.float16).to(DEV)
    n = _kernel_names(lambda: ops.w4a16_gemm(x, packed.to(DEV), sb.to(DEV), zero.to(DEV)))
    assert "weight_only_gemv_kernel" in n and "weight_only_mma_kernel" not in n, n
    monkeypatch.setenv("QUANTKERNELS_CUDA_WO_GEMV_MAX_M", "eight")
    with pytest.raises(ValueError, match=r"QUANTKERNELS_CUDA_WO_GEMV_MAX_M must be an integer.*'eight'"):
        ops.w4a16_gemm(x, packed.to(DEV), sb.to(DEV), zero.to(DEV))


@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=dn)
def test_w4a16_tensor_core_3d_noncontiguous(dtype):
    """QuantLinear on CUDA: a 3-D input (M = 2 * 19 rows) and non-contiguous views reach the
    tensor-core kernel through the bindings' .contiguous(); results as the spec."""
    N, K = 130, 512
    lin = torch.nn.Linear(K, N).to(DEV, dtype)
    ql = quantkernels.QuantLinear.from_linear(lin, "w4a16", group_size=128, backend="cuda")
    base = rand_rows(2 * 19, 2 * K, dtype).to(DEV)
    for x in (base[:, :K].reshape(2, 19, K), base[:, ::2].reshape(2, 19, K),
              base[:, :K].t().contiguous().t().reshape(2, 19, K)):
        y = ql(x)
        assert y.shape == (2, 19, N) and y.dtype == dtype
        x2 = x.reshape(-1, K).cpu()
        wdeq = R.dequantize_int4(ql.qweight.cpu(), ql.weight_scale.cpu(),
                                 None if ql.weight_zero is None else ql.weight_zero.cpu(), torch.float32).to(dtype)
        exact, mag = S.weight_only(S.f32(x2), S.f32(wdeq), S.f32(ql.bias.cpu()))
        S.assert_float_output(y.reshape(-1, N), exact, mag, dtype, "Y")
    # The raw op on a non-contiguous 2-D activation (a column slice: rows 2K apart).
    packed, sb, zero = _w4_weight(N, K, 32, False)
    xs = base[:, K:]
    assert not xs.is_contiguous()
    y = ops.w4a16_gemm(xs, packed.to(DEV), sb.to(DEV))
    wdeq = R.dequantize_int4(packed, sb, None, torch.float32).to(dtype)
    exact, mag = S.weight_only(S.f32(xs.cpu()), S.f32(wdeq))
    S.assert_float_output(y, exact, mag, dtype, "Y (column slice)")


def test_weight_only_misaligned_fallback():
    x = rand_rows(3, 256, torch.float16).to(DEV)
    b, sb = randint8((40, 256)).to(DEV), pos_scale((40,), 0.003).to(DEV)
    torch.testing.assert_close(ops.w8a16_gemm(misaligned(x), b, sb), ops.w8a16_gemm(x, b, sb), rtol=1e-3, atol=1e-3)


# --------------------------------------------------------------------------- NF4 / FP4 (gemm_4bit)

# The W4A16 kernels with the code-table decode (weight_only.cu, docs/numerics.md s.11): the GEMV
# (M <= 8, fp32, K % 32 != 0, misaligned) and the tensor-core kernel (fp16 / bf16, M > 8) with its
# tiles, tails and split-K. Blocks of B values of the flattened weight span rows when K % B != 0
# (K = 96 with B = 64, K = 70, B = 4096 > K), double quantization decodes the absmax values first
# (absmax_dq_kernel).
Q4_TYPES = ("nf4", "fp4")
Q4_GEMV = [(37, 256, 64), (64, 70, 32), (130, 1056, 4096)]  # (N, K, blocksize); K = 70: the scalar path
Q4_TC = [(37, 256, 64), (70, 96, 64), (200, 4096, 128), (130, 1056, 32), (64, 160, 2048)]


def _w4bit(N, K, qt, bs, dq, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(N, K, generator=g) * 0.02
    w[:, 5] *= 40  # a wide block next to ordinary ones
    packed, absmax = ops.quantize_4bit(w, qt, bs)
    if dq:
        absmax, nested, offset = ops.double_quantize_absmax(absmax)
        return packed, absmax, nested, offset
    return packed, absmax, None, None


def _check_4bit(x, wq, qt, bs, bias, what):
    """gemm_4bit on DEV against s.11.6: x @ to_x(dequantize_4bit(...))^T + bias, s.6 tolerances."""
    packed, absmax, nested, offset = wq
    d = lambda t: None if t is None else t.to(DEV)  # noqa: E731
    y = ops.gemm_4bit(d(x), d(packed), d(absmax), qt, bs, d(nested), d(offset), d(bias))
    wdeq = R.dequantize_4bit(packed, absmax, qt, bs, nested, offset).to(x.dtype)
    exact, mag = S.weight_only(S.f32(x), S.f32(wdeq), None if bias is None else S.f32(bias))
    S.assert_float_output(y, exact, mag, x.dtype, what)
    return y


@pytest.mark.parametrize("M,N,K,bs,dtype,qt,dq", [
    pytest.param(M, N, K, bs, dt, qt, dq, id=f"{M}x{N}x{K}-b{bs}-{dn(dt)}-{qt}{'-dq' if dq else ''}")
    for M, (N, K, bs), dt, (qt, dq) in itertools.product(
        (1, 3, 8), Q4_GEMV, FLOAT_DTYPES, [("nf4", False), ("fp4", True), ("nf4", True), ("fp4", False)])])
def test_gemm_4bit_gemv(M, N, K, bs, dtype, qt, dq):
    x = rand_rows(M, K, dtype)
    bias = torch.randn(N).to(dtype) if (M + dq) % 2 else None
    _check_4bit(x, _w4bit(N, K, qt, bs, dq), qt, bs, bias, "Y")


@pytest.mark.parametrize("M,N,K,bs,dtype,qt,dq", [
    pytest.param(M, N, K, bs, dt, qt, dq, id=f"{M}x{N}x{K}-b{bs}-{dn(dt)}-{qt}{'-dq' if dq else ''}")
    for M, (N, K, bs), dt, (qt, dq) in itertools.product(
        (9, 16, 17, 33, 67, 130), Q4_TC, HALF_DTYPES, [("nf4", False), ("fp4", True), ("nf4", True),
                                                      ("fp4", False)])])
def test_gemm_4bit_tensor_core(M, N, K, bs, dtype, qt, dq):
    x = rand_rows(M, K, dtype)
    bias = torch.randn(N).to(dtype) if (M + dq) % 2 else None
    _check_4bit(x, _w4bit(N, K, qt, bs, dq), qt, bs, bias, "Y")


def test_gemm_4bit_fp32_large_m():
    """fp32 activations never take the tensor cores (tf32 would change the numbers): the GEMV at any M."""
    for qt, dq in (("nf4", True), ("fp4", False)):
        _check_4bit(rand_rows(17, 256, torch.float32), _w4bit(40, 256, qt, 64, dq), qt, 64, torch.randn(40), "Y")


def test_gemm_4bit_dequant_is_bitexact():
    """One nonzero activation per row selects one weight column: both kernels must give exactly
    to_x(fp32(code[v] * absmax)) (x 2), i.e. the decode and the double-quantized absmax
    (two roundings, no FMA) are bit for bit dequantize_4bit's."""
    N, K, bs = 40, 256, 64
    for (M, dtype), qt, dq in itertools.product(((16, torch.float16), (16, torch.bfloat16), (5, torch.float16),
                                                 (5, torch.float32)), Q4_TYPES, (False, True)):
        packed, absmax, nested, offset = _w4bit(N, K, qt, bs, dq)
        if not dq:
            absmax = absmax * (1 + torch.rand_like(absmax) * 1e-3)  # absmax far from any fp16 / bf16 value
        x = torch.zeros(M, K, dtype=dtype)
        cols = torch.randperm(K)[:M]
        x[torch.arange(M), cols] = 2.0
        d = lambda t: None if t is None else t.to(DEV)  # noqa: E731
        y = ops.gemm_4bit(d(x), d(packed), d(absmax), qt, bs, d(nested), d(offset)).cpu()
        wdeq = R.dequantize_4bit(packed, absmax, qt, bs, nested, offset).to(dtype)
        expect = (wdeq[:, cols].t().float() * 2).to(dtype)
        assert torch.equal(y, expect), f"M={M} {dtype} {qt} dq={dq}: {(y.float() - expect.float()).abs().max()}"


def test_gemm_4bit_nonfinite_block_propagates():
    """A NaN / Inf absmax (s.11.3): that block's weights are NaN / +-Inf / NaN, so the output
    columns it feeds are non-finite exactly where the reference's are; other columns are finite."""
    N, K, bs = 40, 256, 64
    for M, dtype in ((3, torch.float16), (17, torch.bfloat16)):
        packed, absmax, _, _ = _w4bit(N, K, "nf4", bs, False)
        absmax[3 * K // bs] = float("nan")  # row 3's first block
        absmax[7 * K // bs + 1] = float("inf")  # row 7's second block
        x = rand_rows(M, K, dtype)
        y = ops.gemm_4bit(x.to(DEV), packed.to(DEV), absmax.to(DEV), "nf4", bs).cpu().float()
        ref = R.gemm_4bit(x, packed, absmax, "nf4", bs).float()
        assert torch.equal(torch.isnan(y), torch.isnan(ref)) and torch.equal(torch.isinf(y), torch.isinf(ref))
        assert torch.isfinite(y[:, [c for c in range(N) if c not in (3, 7)]]).all()
        assert (~torch.isfinite(y[2:, 3])).all()  # rows 0 / 1 of x may be zero (rand_rows zeroes row 1)


def test_gemm_4bit_empty_noncontiguous_and_errors():
    """M = 0 gives [0, N]; a non-contiguous 2-D x (a column slice) goes through the bindings'
    .contiguous(); bad arguments are errors naming the argument and the value."""
    N, K, bs = 40, 256, 64
    wq = _w4bit(N, K, "fp4", bs, True)
    d = [t.to(DEV) for t in wq]
    y = ops.gemm_4bit(torch.zeros(0, K, dtype=torch.float16, device=DEV), d[0], d[1], "fp4", bs, d[2], d[3])
    assert y.shape == (0, N) and y.dtype == torch.float16
    base = rand_rows(17, 2 * K, torch.bfloat16)
    for xs in (base[:, K:], base[:3, ::2]):
        assert not xs.is_contiguous()
        _check_4bit(xs, wq, "fp4", bs, None, "Y (non-contiguous x)")
    x = torch.randn(3, K, device=DEV)
    with pytest.raises(ValueError, match=r"gemm_4bit: quant_type must be one of \('nf4', 'fp4'\), got 'int4'"):
        ops.gemm_4bit(x, d[0], d[1], "int4", bs, d[2], d[3])
    with pytest.raises(ValueError, match=r"gemm_4bit: blocksize must be one of .*got 48"):
        ops.gemm_4bit(x, d[0], d[1], "fp4", 48, d[2], d[3])
    with pytest.raises(ValueError, match=r"gemm_4bit: x has K = 128 columns but the weight has K = 256"):
        ops.gemm_4bit(x[:, :128], d[0], d[1], "fp4", bs, d[2], d[3])
    with pytest.raises(ValueError, match=r"gemm_4bit: x must be 2-D"):
        ops.gemm_4bit(x.reshape(1, 3, K), d[0], d[1], "fp4", bs, d[2], d[3])
    with pytest.raises(ValueError, match=r"nested_absmax and offset go together"):
        ops.gemm_4bit(x, d[0], d[1], "fp4", bs, d[2], None)
    with pytest.raises(TypeError, match=r"gemm_4bit: absmax must have dtype in \['torch.float32'\]"):
        ops.gemm_4bit(x, d[0], d[1], "fp4", bs)  # uint8 codes without the double quantization
    with pytest.raises(ValueError, match=r"gemm_4bit: absmax must have shape \(160,\)"):
        ops.gemm_4bit(x, d[0], d[1][:-1].float(), "fp4", bs)
    if DEV != "cpu":  # the emulator runs the CUDA bindings on CPU tensors
        with pytest.raises(ValueError, match=r"is on cpu"):
            ops.gemm_4bit(x, d[0], wq[1], "fp4", bs, d[2], d[3])


def test_gemm_4bit_path_selection():
    """Which kernels gemm_4bit launches: the GEMV for M <= 8, fp32, K % 32 != 0 or a misaligned x;
    the tensor cores (with the split-K reduce at decode-like shapes) otherwise; absmax_dq_kernel
    first under double quantization only."""
    dq = [t.to(DEV) for t in _w4bit(200, 4096, "nf4", 64, True)]
    plain = [t.to(DEV) for t in _w4bit(200, 4096, "nf4", 64, False)[:2]] + [None, None]
    odd = [t.to(DEV) for t in _w4bit(64, 70, "nf4", 64, False)[:2]] + [None, None]

    def names(M, xdt=torch.float16, w=dq, mis=False):
        x = rand_rows(M, w[0].shape[1] * 2, xdt).to(DEV)
        x = misaligned(x) if mis else x
        return _kernel_names(lambda: ops.gemm_4bit(x, w[0], w[1], "nf4", 64, w[2], w[3]))

    for M in (1, 8):
        n = names(M)
        assert "weight_only_gemv_kernel" in n and "weight_only_mma_kernel" not in n and "absmax_dq_kernel" in n, n
    for M in (9, 17, 130):
        n = names(M, w=plain)
        assert "weight_only_mma_kernel" in n and "weight_only_gemv_kernel" not in n, (M, n)
        assert "absmax_dq_kernel" not in n, n
    assert "splitk_reduce_kernel" in names(16)
    assert "weight_only_gemv_kernel" in names(17, xdt=torch.float32)
    assert "weight_only_gemv_kernel" in names(17, mis=True)
    assert "weight_only_gemv_kernel" in names(17, w=odd)


@pytest.mark.parametrize("scheme", ["nf4", "fp4"])
def test_gemm_4bit_quantlinear_3d(scheme):
    """QuantLinear on CUDA with a 3-D input (M = 2 * 19) and a non-contiguous view: backend "cuda"
    and "auto" both run the CUDA C++ kernel (auto prefers it to Triton); results as the spec."""
    N, K = 130, 512
    lin = torch.nn.Linear(K, N).to(DEV, torch.bfloat16)
    base = rand_rows(2 * 19, 2 * K, torch.bfloat16).to(DEV)
    for backend in ("cuda", "auto"):
        ql = quantkernels.QuantLinear.from_linear(lin, scheme, group_size=64, backend=backend, double_quant=True)
        wdeq = R.dequantize_4bit(ql.qweight.cpu(), ql.weight_scale.cpu(), scheme, 64, ql.nested_absmax.cpu(),
                                 ql.absmax_offset.cpu()).to(torch.bfloat16)
        for x in (base[:, :K].reshape(2, 19, K), base[:, ::2].reshape(2, 19, K)):
            n = _kernel_names(lambda: ql(x))
            assert "weight_only_mma_kernel" in n and "absmax_dq_kernel" in n, n
            y = ql(x)
            assert y.shape == (2, 19, N) and y.dtype == torch.bfloat16
            exact, mag = S.weight_only(S.f32(x.reshape(-1, K).cpu()), S.f32(wdeq), S.f32(ql.bias.cpu()))
            S.assert_float_output(y.reshape(-1, N), exact, mag, torch.bfloat16, f"Y ({backend})")


# --------------------------------------------------------------------------- LLM.int8


LLM_PARAMS = [
    pytest.param(M, N, K, dt, tau, id=f"{M}x{N}x{K}-{dn(dt)}-tau{tau}")
    for M, (N, K), dt, tau in itertools.product((1, 3, 17, 67), [(37, 64), (200, 1040), (64, 100)], FLOAT_DTYPES,
                                                (6.0, 0.0))
]


def planted(M, K, dtype, cols=(3, 10, 20, 300, 301, 1000)):
    x = torch.randn(M, K)
    if M >= 3:
        x[1] = 0
    for i, c in enumerate(cols):
        if c < K:
            x[(2 * i) % M, c] = 40.0 * (-1) ** i
    return x.to(dtype)


@pytest.mark.parametrize("M,N,K,dtype,tau", LLM_PARAMS)
def test_llm_int8_linear(M, N, K, dtype, tau):
    x = planted(M, K, dtype)
    wq, sw = randint8((N, K), -127, 127), pos_scale((N,), 0.003)
    bias = torch.randn(N).to(dtype)
    y = ops.llm_int8_linear(x.to(DEV), wq.to(DEV), sw.to(DEV), bias.to(DEV), tau)
    exact, mag, _ = S.llm_int8(S.f32(x), wq.numpy(), sw.numpy(), S.f32(bias), tau)
    S.assert_float_output(y, exact, mag, dtype, "Y")


def test_llm_int8_many_outliers():
    # More outlier columns than one 128-column chunk of the correction kernel, spread over K.
    M, N, K = 5, 33, 700
    x = torch.randn(M, K)
    x[0, ::3] = 50.0
    wq, sw = randint8((N, K), -127, 127), pos_scale((N,), 0.003)
    y = ops.llm_int8_linear(x.to(DEV), wq.to(DEV), sw.to(DEV), None, 6.0)
    exact, mag, mask = S.llm_int8(S.f32(x), wq.numpy(), sw.numpy(), None, 6.0)
    assert mask.sum() > 128
    S.assert_float_output(y, exact, mag, torch.float32, "Y")


# --------------------------------------------------------------------------- CUDA graphs


def _graph_check(fn, make_inputs):
    """Captures fn on static inputs, replays on new data, compares with eager."""
    static = [t.to(DEV) for t in make_inputs()]
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):  # warm-up outside the capture (allocator, lazy init)
        fn(*static)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = fn(*static)
    for _ in range(2):
        new = make_inputs()
        for dst, src in zip(static, new):
            dst.copy_(src)
        g.replay()
        torch.cuda.synchronize()
        expect = fn(*[t.to(DEV) for t in new])
        torch.testing.assert_close(out, expect, rtol=0, atol=0)


def test_cuda_graph_llm_int8():
    M, N, K = 17, 96, 512
    _graph_check(lambda x, w, s, b: ops.llm_int8_linear(x, w, s, b, 6.0),
                 lambda: (planted(M, K, torch.float16, cols=tuple(torch.randint(0, K, (4,)).tolist())),
                          randint8((N, K), -127, 127), pos_scale((N,), 0.003), torch.randn(N, dtype=torch.float16)))


def test_cuda_graph_w8a8():
    M, N, K = 67, 200, 4096

    def fn(x, w, sw, bias):
        q, sx = ops.quantize_int8_rowwise(x)
        return ops.w8a8_gemm(q, w, sx, sw, bias, torch.bfloat16)

    _graph_check(fn, lambda: (torch.randn(M, K, dtype=torch.bfloat16), randint8((N, K)), pos_scale((N,), 0.003),
                              torch.randn(N)))


@pytest.mark.parametrize("M", [17, 67])
def test_cuda_graph_w4a16_tensor_core(M):
    """The tensor-core path with split-K (its fp32 workspace comes from the caching allocator)."""
    N, K, G = 200, 4096, 128

    def make():
        w = torch.randn(N, K) * 0.02
        p, s, z = ops.quantize_uint4_asym(w, G)
        return torch.randn(M, K, dtype=torch.bfloat16), p, s, z, torch.randn(N, dtype=torch.bfloat16)

    _graph_check(lambda x, p, s, z, b: ops.w4a16_gemm(x, p, s, z, b), make)


@pytest.mark.parametrize("M", [3, 17])
def test_cuda_graph_gemm_4bit(M):
    """NF4 with double quantization: the absmax decode reads offset on the device and the split-K
    workspace and decoded-absmax buffer come from the caching allocator, so the op captures."""
    N, K, bs = 200, 4096, 64

    def make():
        w = torch.randn(N, K) * 0.02
        p, a = ops.quantize_4bit(w, "nf4", bs)
        q, n2, off = ops.double_quantize_absmax(a)
        return torch.randn(M, K, dtype=torch.bfloat16), p, q, n2, off, torch.randn(N, dtype=torch.bfloat16)

    _graph_check(lambda x, p, q, n2, off, b: ops.gemm_4bit(x, p, q, "nf4", bs, n2, off, b), make)


def test_cuda_graph_w8a16_tensor_core():
    M, N, K = 33, 130, 1056
    _graph_check(lambda x, b, s: ops.w8a16_gemm(x, b, s),
                 lambda: (torch.randn(M, K, dtype=torch.float16), randint8((N, K)), pos_scale((N,), 0.003)))


# --------------------------------------------------------------------------- dispatch, errors, opcheck


@pytest.mark.parametrize("op", CUDA_OPS)
def test_dispatch_picks_cuda_kernel(op):
    ok, why = dispatch.can_implement("cuda", op, torch.device(DEV))
    assert ok, why
    assert dispatch.resolve("cuda", op, torch.device(DEV)) is getattr(ops, op).default


def test_dispatch_cuda_result_matches_reference():
    a, b = randint8((17, 64)).to(DEV), randint8((40, 64)).to(DEV)
    c = dispatch.resolve("cuda", "int8_gemm", a.device)(a, b)
    assert torch.equal(c, R.int8_gemm(a, b))


def test_errors_name_the_argument():
    a, b = randint8((4, 32)).to(DEV), randint8((5, 32)).to(DEV)
    with pytest.raises(TypeError, match=r"quantkernels\.int8_gemm: a must have dtype"):
        ops.int8_gemm(a.float(), b)
    with pytest.raises(ValueError, match=r"b must have K = 32 columns"):
        ops.int8_gemm(a, b[:, :16])
    with pytest.raises(ValueError, match=r"scale_b must have shape \(5,\)"):
        ops.w8a8_gemm(a, b, torch.ones(4, device=DEV), torch.ones(4, device=DEV))
    with pytest.raises(ValueError, match=r"is on cpu"):
        ops.w8a8_gemm(a, b, torch.ones(4, device=DEV), torch.ones(5))
    with pytest.raises(ValueError, match=r"exceeds 131071"):
        ops.int8_gemm(torch.zeros(1, 131072, dtype=torch.int8, device=DEV),
                      torch.zeros(1, 131072, dtype=torch.int8, device=DEV))


def test_opcheck():
    a, b = randint8((17, 64)).to(DEV), randint8((40, 64)).to(DEV)
    sa, sb = pos_scale((17,), 0.02).to(DEV), pos_scale((40,), 0.003).to(DEV)
    torch.library.opcheck(ops.int8_gemm, (a, b))
    torch.library.opcheck(ops.w8a8_gemm, (a, b, sa, sb, torch.randn(40, device=DEV), torch.float16))
    torch.library.opcheck(ops.quantize_int8_rowwise, (torch.randn(3, 64, device=DEV),))
    x = planted(17, 64, torch.float16).to(DEV)
    torch.library.opcheck(ops.llm_int8_linear, (x, b, sb, None, 6.0))
    # The weight-only tensor-core path (M > 8) with split-K and its workspace.
    xh = rand_rows(17, 1024, torch.float16).to(DEV)
    p, s, z = (t.to(DEV) for t in _w4_weight(40, 1024, 32, True))
    torch.library.opcheck(ops.w4a16_gemm, (xh, p, s, z, torch.randn(40, device=DEV)))
    torch.library.opcheck(ops.w8a16_gemm, (xh, randint8((40, 1024)).to(DEV), pos_scale((40,), 0.003).to(DEV)))
    p4, a4, n4, o4 = (t.to(DEV) for t in _w4bit(40, 1024, "nf4", 64, True))
    torch.library.opcheck(ops.gemm_4bit, (xh, p4, a4, "nf4", 64, n4, o4, torch.randn(40, device=DEV)))


# --------------------------------------------------------------------------- compute-sanitizer


def _sanitizer():
    cand = [shutil.which("compute-sanitizer")]
    for home in (os.environ.get("CUDA_HOME"), "/usr/local/cuda", "/usr/local/cuda-13.0"):
        if home:
            cand.append(os.path.join(home, "bin", "compute-sanitizer"))
            cand.append(os.path.join(home, "compute-sanitizer", "compute-sanitizer"))
    return next((c for c in cand if c and os.path.isfile(c) and os.access(c, os.X_OK)), None)


SANITIZE_SCRIPT = textwrap.dedent("""
    import torch, quantkernels
    ops = torch.ops.quantkernels
    d = "cuda"
    torch.manual_seed(0)
    # tails, fallback, all configs; (17, 200, 1024): weight-only tensor cores with split-K
    for M, N, K in [(3, 37, 48), (17, 70, 100), (67, 130, 160), (17, 200, 1024)]:
        a = torch.randint(-128, 128, (M, K), dtype=torch.int8, device=d)
        b = torch.randint(-128, 128, (N, K), dtype=torch.int8, device=d)
        sa, sb = torch.rand(M, device=d), torch.rand(N, device=d)
        ops.int8_gemm(a, b)
        ops.w8a8_gemm(a, b, sa, sb, torch.randn(N, device=d), torch.float16)
        x = torch.randn(M, K, device=d, dtype=torch.bfloat16)
        x[0, 5] = 40
        ops.quantize_int8_rowwise_outliers(x, 6.0)
        ops.llm_int8_linear(x, b, sb, None, 6.0)
        ops.w8a16_gemm(x, b, sb)
        G = 32 if K % 32 == 0 else K
        p, s, z = ops.quantize_uint4_asym(torch.randn(N, K, device=d), G)
        ops.w4a16_gemm(x, p, s, z)
        ops.w4a16_gemm(x.half(), p, s, None, torch.randn(N, device=d))
        ops.w4a8_gemm(a, p, sa, s, z, None, torch.float32)
    torch.cuda.synchronize()
    print("SANITIZE-OK")
""")


def test_compute_sanitizer_memcheck(tmp_path):
    tool = _sanitizer()
    if tool is None:
        pytest.skip("compute-sanitizer not found (PATH, $CUDA_HOME/bin, /usr/local/cuda*/bin)")
    script = tmp_path / "sanitize_cuda.py"
    script.write_text(SANITIZE_SCRIPT)
    r = subprocess.run([tool, "--tool", "memcheck", "--error-exitcode", "99", sys.executable, str(script)],
                       capture_output=True, text=True, timeout=900)
    out = r.stdout + r.stderr
    assert r.returncode == 0 and "SANITIZE-OK" in out, out[-6000:]
    assert "ERROR SUMMARY: 0 errors" in out, out[-6000:]
