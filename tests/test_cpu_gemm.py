"""C++ CPU kernels of quantkernels::int8_gemm and quantkernels::w8a8_gemm (csrc/cpu/gemm_int8.cpp).

Compared with the pure-PyTorch reference functions (imported directly: once the native
library is loaded, the op itself is the C++ kernel). int32 results are exact; the fp32
epilogue is within 1e-5 of the fp64 formula (docs/numerics.md s.6); fp16/bf16 outputs match the
reference within assert_close defaults. Every case runs on every ISA level
(QUANTKERNELS_CPU_ISA=portable .. avx512_bf16, tests/_isa.py; levels the CPU lacks are skipped)
and at 1 and 2 threads. Tails of the VNNI tiles: tests/test_cpu_int8_vnni.py.

The native code comes from quantkernels._C when it is built; otherwise this module JIT-builds
csrc/cpu/gemm_int8.cpp with torch.utils.cpp_extension (needs a C++ compiler and ninja).
"""
import itertools
import os
import pathlib

import pytest
import torch

import quantkernels  # schemas, reference, and quantkernels._C (the C++ kernels)
from quantkernels import reference as R

from _isa import isa, threads  # noqa: F401  (fixtures)

ROOT = pathlib.Path(__file__).resolve().parents[1]
OPS = torch.ops.quantkernels


if not quantkernels._native.AVAILABLE:
    pytest.skip(f"quantkernels._C is not built: {quantkernels._native.REASON}", allow_module_level=True)


def test_native_kernels_are_registered_for_cpu():
    # Otherwise every test below would silently compare the reference with itself.
    for op in ("int8_gemm", "w8a8_gemm"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"quantkernels::{op}", "CPU"), op


def _rand_int8(*shape, lo=-128, gen=None):
    return torch.randint(lo, 128, shape, dtype=torch.int8, generator=gen)


# M x N x K sweep: odd sizes on purpose (not multiples of the 2 x 4 micro-tile, 16-wide K
# steps, the 1024 K block, the 128 x 96 cache blocks).
MS = (0, 1, 3, 17, 67)
NS = (1, 5, 13, 100)
KS = (1, 31, 32, 33, 255, 4096 + 7)
INT8_CASES = list(itertools.product(MS, NS, KS))


@pytest.mark.parametrize("M,N,K", INT8_CASES, ids=[f"M{m}-N{n}-K{k}" for m, n, k in INT8_CASES])
def test_int8_gemm_exact(M, N, K, isa, threads):
    g = torch.Generator().manual_seed(M * 1000003 + N * 1009 + K)
    a, b = _rand_int8(M, K, gen=g), _rand_int8(N, K, gen=g)
    a[:, : min(K, 3)] = -128  # -128 x -128 pairs: the case where u8 x s8 maddubs would saturate
    b[:, : min(K, 2)] = -128
    out = OPS.int8_gemm(a, b)
    assert out.dtype == torch.int32 and out.shape == (M, N)
    torch.testing.assert_close(out, R.int8_gemm(a, b), rtol=0, atol=0)


@pytest.mark.parametrize("M,N,K", [(130, 200, 4100), (257, 97, 1025)])
def test_int8_gemm_exact_multi_block(M, N, K, isa, threads):
    # More than one M block (128), N block (96) and K block (4096) at once.
    g = torch.Generator().manual_seed(7)
    a, b = _rand_int8(M, K, gen=g), _rand_int8(N, K, gen=g)
    torch.testing.assert_close(OPS.int8_gemm(a, b), R.int8_gemm(a, b), rtol=0, atol=0)


# The AVX2 panel path (u8 |b| x s8 sign(a, b) maddubs) runs when a has no -128, as every quantizer
# output; b may hold -128. The cases above put -128 into a, so they exercise the widened fallback.
@pytest.mark.parametrize("M,N,K", INT8_CASES, ids=[f"M{m}-N{n}-K{k}" for m, n, k in INT8_CASES])
def test_int8_gemm_exact_panel_path(M, N, K, isa, threads):
    g = torch.Generator().manual_seed(M * 1000003 + N * 1009 + K + 1)
    a, b = _rand_int8(M, K, lo=-127, gen=g), _rand_int8(N, K, gen=g)
    a[:, : min(K, 3)] = -127
    b[:, : min(K, 2)] = -128  # |b| = 128 with |a| = 127: the largest maddubs pair, 2 * 128 * 127
    torch.testing.assert_close(OPS.int8_gemm(a, b), R.int8_gemm(a, b), rtol=0, atol=0)


@pytest.mark.parametrize("M,N,K", [(130, 201, 4099), (257, 97, 2051), (16, 64, 2048), (8, 4, 4), (9, 3, 2)])
def test_int8_gemm_exact_panel_blocks(M, N, K, isa, threads):
    # Several 128-token, 64-row and 2048-byte K blocks with every tail: tokens (a 9..15-token and
    # a 1..8-token panel), weight rows (N % 4), and K % 4 (the zero-padded tail quad).
    g = torch.Generator().manual_seed(M + N + K)
    a, b = _rand_int8(M, K, lo=-127, gen=g), _rand_int8(N, K, gen=g)
    torch.testing.assert_close(OPS.int8_gemm(a, b), R.int8_gemm(a, b), rtol=0, atol=0)


@pytest.mark.parametrize("a_min", [-128, -127], ids=["widened", "panel"])
def test_int8_gemm_extremes_at_max_k(a_min, isa):
    # The largest sums, still exact in int32, and their negatives: a = -128 (widened path):
    # 128 * 128 * 131071 = 2^31 - 16384; a = -127 (AVX2 panel path): 127 * 128 * 131071.
    K = 131071
    a = torch.full((3, K), a_min, dtype=torch.int8)
    b = torch.full((2, K), -128, dtype=torch.int8)
    b[1] = 127
    a[2, ::2] = 127
    out = OPS.int8_gemm(a, b)
    torch.testing.assert_close(out, R.int8_gemm(a, b), rtol=0, atol=0)
    assert out[0, 0].item() == -a_min * 128 * K


def test_int8_gemm_k0(isa):
    a, b = torch.empty(3, 0, dtype=torch.int8), torch.empty(5, 0, dtype=torch.int8)
    out = OPS.int8_gemm(a, b)
    torch.testing.assert_close(out, torch.zeros(3, 5, dtype=torch.int32), rtol=0, atol=0)


# Decode sizes (M <= 4) run csrc/cpu/gemv_int8.cpp: N tiles of 4 / 2 rows and their tails, the
# 64-byte K steps and the 16-wide K tail, N split over threads (N = 1003 at K = 255 is above
# the grain), the 256-column epilogue blocks.
GEMV_NK = [(1003, 255), (37, 4096 + 7), (261, 64), (6, 16), (2, 1)]
GEMV_CASES = list(itertools.product((1, 2, 3, 4), GEMV_NK))


@pytest.mark.parametrize("a_has_m128", [True, False], ids=["a-128", "a-127"])
@pytest.mark.parametrize("M,NK", GEMV_CASES, ids=[f"M{m}-N{n}-K{k}" for m, (n, k) in GEMV_CASES])
def test_int8_gemv_decode_exact(M, NK, a_has_m128, isa, threads):
    # a with -128: the int16 madd path; a in [-127, 127]: the u8 x s8 maddubs path (AVX2). b holds
    # -128 either way, and a row of b = -128 against a = +-127 gives the largest maddubs pair sums.
    N, K = NK
    g = torch.Generator().manual_seed(M * 7 + N * 1009 + K + a_has_m128)
    a, b = _rand_int8(M, K, lo=-128 if a_has_m128 else -127, gen=g), _rand_int8(N, K, gen=g)
    a[-1, : min(K, 4)] = -127
    a[0, : min(K, 5)] = -128 if a_has_m128 else 127
    b[:, : min(K, 3)] = -128
    b[-1] = -128
    assert bool((a == -128).any()) == a_has_m128
    out = OPS.int8_gemm(a, b)
    torch.testing.assert_close(out, R.int8_gemm(a, b), rtol=0, atol=0)


@pytest.mark.parametrize("M", (1, 4))
def test_int8_gemv_extremes(M, isa):
    # Whole rows of +-127 x -128 over a long K: every int16 pair sum is +-32512 (the maddubs
    # bound) and the int32 totals are large; exact. The same with -128 in a (the int16 path).
    K = 8192 + 64 + 5
    b = torch.full((6, K), -128, dtype=torch.int8)
    b[1] = 127
    b[2, ::2] = 127
    for lo in (-127, -128):
        a = torch.full((M, K), lo, dtype=torch.int8)
        a[0] = 127
        torch.testing.assert_close(OPS.int8_gemm(a, b), R.int8_gemm(a, b), rtol=0, atol=0)


@pytest.mark.parametrize("layout", ["transposed_a", "strided_b"])
@pytest.mark.parametrize("M", (1, 2, 3, 4))
def test_int8_gemv_decode_non_contiguous(M, layout, isa, threads):
    g = torch.Generator().manual_seed(M)
    N, K = 515, 301
    if layout == "transposed_a":
        a, b = _rand_int8(K, M, gen=g).t(), _rand_int8(N, K, gen=g)
    else:
        a, b = _rand_int8(M, K, gen=g), _rand_int8(2 * N, K, gen=g)[::2]
    assert not (a.is_contiguous() and b.is_contiguous()) or M == 1
    torch.testing.assert_close(OPS.int8_gemm(a, b), R.int8_gemm(a, b), rtol=0, atol=0)


@pytest.mark.parametrize("layout", ["strided_a", "transposed_a", "strided_b"])
def test_int8_gemm_non_contiguous(layout, isa, threads):
    g = torch.Generator().manual_seed(3)
    M, N, K = 19, 23, 301
    if layout == "strided_a":
        a = _rand_int8(M, 2 * K, gen=g)[:, ::2]
        b = _rand_int8(N, K, gen=g)
    elif layout == "transposed_a":
        a = _rand_int8(K, M, gen=g).t()
        b = _rand_int8(N, K, gen=g)
    else:
        a = _rand_int8(M, K, gen=g)
        b = _rand_int8(2 * N, K, gen=g)[::2]
    assert not (a.is_contiguous() and b.is_contiguous())
    torch.testing.assert_close(OPS.int8_gemm(a, b), R.int8_gemm(a, b), rtol=0, atol=0)


# --------------------------------------------------------------------------- w8a8

W8A8_SHAPES = [(0, 7, 33), (1, 13, 4103), (3, 100, 255), (17, 5, 31), (67, 97, 1025)]
OUT_DTYPES = [None, torch.float32, torch.float16, torch.bfloat16]
BIASES = ["none", "fp32", "bf16"]


def _w8a8_inputs(M, N, K, bias_kind, seed):
    g = torch.Generator().manual_seed(seed)
    a = _rand_int8(M, K, lo=-127, gen=g)   # what our quantizers produce: [-127, 127]
    b = _rand_int8(N, K, lo=-127, gen=g)
    sa = torch.rand(M, generator=g) * 0.05 + 1e-3
    sb = torch.rand(N, generator=g) * 0.01 + 1e-4
    bias = None
    if bias_kind != "none":
        bias = torch.randn(N, generator=g).to(torch.float32 if bias_kind == "fp32" else torch.bfloat16)
    return a, b, sa, sb, bias


def _formula_fp64(a, b, sa, sb, bias):
    c = a.double() @ b.double().t()
    prod = c * sa.double()[:, None] * sb.double()[None, :]
    y = prod + (bias.double() if bias is not None else 0.0)
    # Error scale: the size of the terms, so a cancelling bias does not make the bound 0.
    scale = prod.abs() + (bias.double().abs() if bias is not None else 0.0)
    return y, scale


@pytest.mark.parametrize("out_dtype", OUT_DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("bias_kind", BIASES)
@pytest.mark.parametrize("M,N,K", W8A8_SHAPES, ids=[f"M{m}-N{n}-K{k}" for m, n, k in W8A8_SHAPES])
def test_w8a8_gemm(M, N, K, bias_kind, out_dtype, isa, threads):
    a, b, sa, sb, bias = _w8a8_inputs(M, N, K, bias_kind, seed=M + 31 * N + K)
    out = OPS.w8a8_gemm(a, b, sa, sb, bias, out_dtype)
    dt = out_dtype or torch.float32
    assert out.dtype == dt and out.shape == (M, N)
    ref = R.w8a8_gemm(a, b, sa, sb, bias, out_dtype)
    if dt == torch.float32:
        y64, scale = _formula_fp64(a, b, sa, sb, bias)
        err = (out.double() - y64).abs()
        assert bool((err <= 1e-5 * scale + 1e-30).all()), f"max rel err {(err / (scale + 1e-30)).max().item()}"
        # Same operation order as the reference ((c * sa) * sb + bias, no FMA): bit-identical.
        torch.testing.assert_close(out, ref, rtol=0, atol=0)
    else:
        torch.testing.assert_close(out, ref)


@pytest.mark.parametrize("out_dtype", OUT_DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("bias_kind", BIASES)
@pytest.mark.parametrize("M", (1, 2, 3, 4))
def test_w8a8_gemv_decode(M, bias_kind, out_dtype, isa, threads):
    # M <= 4 (gemv_int8.cpp): N = 1001 spans several 256-column epilogue blocks and both threads.
    N, K = 1001, 100
    a, b, sa, sb, bias = _w8a8_inputs(M, N, K, bias_kind, seed=M * 17 + len(bias_kind))
    b[: M + 1, : 2 * M + 1] = -128  # valid int8 weight values outside the quantizer's range
    out = OPS.w8a8_gemm(a, b, sa, sb, bias, out_dtype)
    dt = out_dtype or torch.float32
    assert out.dtype == dt and out.shape == (M, N)
    ref = R.w8a8_gemm(a, b, sa, sb, bias, out_dtype)
    if dt == torch.float32:
        y64, scale = _formula_fp64(a, b, sa, sb, bias)
        assert bool(((out.double() - y64).abs() <= 1e-5 * scale + 1e-30).all())
        torch.testing.assert_close(out, ref, rtol=0, atol=0)  # same epilogue order: bit-identical
    else:
        torch.testing.assert_close(out, ref)


def test_w8a8_gemv_decode_non_contiguous(isa, threads):
    M, N, K = 3, 300, 515
    a, b, sa, sb, bias = _w8a8_inputs(M, N, K, "bf16", seed=12)
    a_nc = torch.empty(K, M, dtype=torch.int8).t().copy_(a)
    b_nc = torch.empty(2 * N, K, dtype=torch.int8)[1::2].copy_(b)
    sb_nc = torch.empty(N, 3)[:, 1].copy_(sb)
    assert not any(t.is_contiguous() for t in (a_nc, b_nc, sb_nc))
    out = OPS.w8a8_gemm(a_nc, b_nc, sa, sb_nc, bias, torch.bfloat16)
    torch.testing.assert_close(out, R.w8a8_gemm(a, b, sa, sb, bias, torch.bfloat16), rtol=0, atol=0)


def test_w8a8_gemm_non_contiguous(isa, threads):
    M, N, K = 13, 29, 515
    a, b, sa, sb, bias = _w8a8_inputs(M, N, K, "fp32", seed=11)
    a_nc = torch.empty(K, M, dtype=torch.int8).t().copy_(a)
    sa_nc = torch.empty(M, 2)[:, 0].copy_(sa)
    assert not a_nc.is_contiguous() and not sa_nc.is_contiguous()
    out = OPS.w8a8_gemm(a_nc, b, sa_nc, sb, bias, None)
    torch.testing.assert_close(out, R.w8a8_gemm(a, b, sa, sb, bias), rtol=0, atol=0)


def test_w8a8_gemm_handles_minus_128(isa):
    # Outside the quantizers' range but valid int8: still exact.
    a = torch.full((2, 77), -128, dtype=torch.int8)
    b = torch.full((3, 77), -128, dtype=torch.int8)
    sa, sb = torch.ones(2), torch.ones(3)
    out = OPS.w8a8_gemm(a, b, sa, sb, None, None)
    torch.testing.assert_close(out, torch.full((2, 3), 128.0 * 128 * 77), rtol=0, atol=0)


def test_end_to_end_sqnr():
    # Quality against the unquantized F.linear (docs/numerics.md s.6 table: W8A8 38.2 dB).
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 4096, generator=g)
    w = torch.randn(1024, 4096, generator=g) * 0.02
    xq, sx = R.quantize_int8_rowwise(x)
    wq, sw = R.quantize_int8_rowwise(w)
    out = OPS.w8a8_gemm(xq, wq, sx, sw, None, None)
    ref = x.double() @ w.double().t()
    sqnr = 10 * torch.log10(ref.pow(2).mean() / (ref - out.double()).pow(2).mean())
    assert sqnr.item() > 35.0


# --------------------------------------------------------------------------- validation


def _raises(exc, match, fn, *args):
    with pytest.raises(exc, match=match):
        fn(*args)


def test_validation_messages():
    a = torch.zeros(4, 8, dtype=torch.int8)
    b = torch.zeros(3, 8, dtype=torch.int8)
    sa, sb = torch.ones(4), torch.ones(3)
    i8, w8 = OPS.int8_gemm, OPS.w8a8_gemm
    _raises(TypeError, r"int8_gemm: a must have dtype in \['torch.int8'\], got torch.float32", i8, a.float(), b)
    _raises(TypeError, r"int8_gemm: b must have dtype in \['torch.int8'\], got torch.uint8", i8, a, b.to(torch.uint8))
    _raises(ValueError, r"a must be 2-D \[M, K\] activation, got shape \(2, 2, 8\)", i8, a.reshape(2, 2, 8), b)
    _raises(ValueError, r"b must have K = 8 columns to match a \(4, 8\), got shape \(3, 9\)",
            i8, a, torch.zeros(3, 9, dtype=torch.int8))
    _raises(ValueError, r"K = 131072 exceeds 131071", i8,
            torch.zeros(1, 131072, dtype=torch.int8), torch.zeros(1, 131072, dtype=torch.int8))
    _raises(TypeError, r"w8a8_gemm: scale_a must have dtype in \['torch.float32'\], got torch.float16",
            w8a8_args := w8, a, b, sa.half(), sb, None, None)
    _raises(ValueError, r"scale_b must have shape \(3,\) \(one per-channel scale per row of b\), got \(4,\)",
            w8a8_args, a, b, sa, torch.ones(4), None, None)
    _raises(ValueError, r"bias must have shape \(3,\)", w8a8_args, a, b, sa, sb, torch.ones(5), None)
    _raises(TypeError, r"bias must have dtype in", w8a8_args, a, b, sa, sb, torch.ones(3, dtype=torch.int32), None)
    _raises(TypeError, r"out_dtype must be one of float16, bfloat16, float32, got torch.int32",
            w8a8_args, a, b, sa, sb, None, torch.int32)


def test_bad_isa_env_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("QUANTKERNELS_CPU_ISA", "avx1024")
    with pytest.raises(RuntimeError, match="QUANTKERNELS_CPU_ISA.*avx1024"):
        OPS.int8_gemm(torch.zeros(2, 3, dtype=torch.int8), torch.zeros(2, 3, dtype=torch.int8))


def test_opcheck():
    g = torch.Generator().manual_seed(5)
    a, b = _rand_int8(5, 37, gen=g), _rand_int8(6, 37, gen=g)
    torch.library.opcheck(OPS.int8_gemm, (a, b))
    sa, sb = torch.rand(5, generator=g), torch.rand(6, generator=g)
    torch.library.opcheck(OPS.w8a8_gemm, (a, b, sa, sb, torch.randn(6, generator=g), torch.bfloat16))
