"""LLM.int8() (csrc/cpu/llm_int8.cpp) on every ISA level, beyond tests/test_cpu_w4a8_llm_int8.py:
the zmm outlier mask / quantizer (16-lane tails, fp16/bf16 widening) must stay bit-exact with the
reference, and llm_int8_linear's inlier GEMM runs the VNNI GEMM (M > 4) / GEMV (M <= 4) with the
fp32 outlier correction (zmm on avx512 and above) fused into its blocks. Levels this CPU lacks
are skipped (tests/_isa.py)."""
import itertools

import pytest
import torch

import quantkernels
from quantkernels import reference as R

from _isa import isa, threads  # noqa: F401  (fixtures)

OPS = torch.ops.quantkernels

if not quantkernels._native.AVAILABLE:
    pytest.skip(f"quantkernels._C is not built: {quantkernels._native.REASON}", allow_module_level=True)


def _x(M, K, dtype, seed, ncols=5):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=g)
    cols = torch.randperm(K, generator=g)[: min(ncols, K)]
    if M:
        x[torch.arange(len(cols)) % M, cols] = 8.0 * torch.sign(torch.randn(len(cols), generator=g)) + 1.0
    return x.to(dtype)


def _same_quant(got, want):
    q, s, o = got
    rq, rs, ro = want
    assert torch.equal(q, rq) and torch.equal(o, ro)
    assert torch.equal(s.isnan(), rs.isnan()) and torch.equal(s.nan_to_num(), rs.nan_to_num())


DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# K around 16 lanes and the 1024-column blocks of the outlier pass.
QCASES = list(itertools.product((1, 3, 17), (1, 15, 16, 17, 33, 1025)))


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("M,K", QCASES, ids=[f"M{m}-K{k}" for m, k in QCASES])
def test_quantize_outliers_tails(M, K, dtype, isa):
    x = _x(M, K, dtype, seed=M * 131 + K)
    if K > 3:
        x[0, 2] = float("nan")
    for thr in (6.0, 0.0):
        _same_quant(OPS.quantize_int8_rowwise_outliers(x, thr), R.quantize_int8_rowwise_outliers(x, thr))


def _fp64(x, wq, sw, bias, thr):
    q, sx, o = R.quantize_int8_rowwise_outliers(x, thr)
    main = (q.double() @ wq.double().t()) * sx.double()[:, None] * sw.double()[None, :]
    xo = torch.where(o, x.double(), torch.zeros((), dtype=torch.float64))
    wd = wq.double() * sw.double()[:, None]
    y = main + xo @ wd.t()
    scale = main.abs() + xo.abs() @ wd.abs().t()
    if bias is not None:
        y, scale = y + bias.double(), scale + bias.double().abs()
    return y, scale


# M: GEMV (1, 4) and GEMM (5, 13, 100) paths; N around the 4-row tiles, 32-row GEMV blocks
# and 64-row GEMM tasks; K with 64-byte / 16-lane tails.
LCASES = [(1, 37, 4096 + 5), (4, 65, 300), (5, 67, 2049), (13, 3, 4161), (100, 70, 129)]


@pytest.mark.parametrize("M,N,K", LCASES, ids=[f"M{m}-N{n}-K{k}" for m, n, k in LCASES])
def test_llm_int8_linear_vs_reference(M, N, K, isa, threads):
    g = torch.Generator().manual_seed(M + N + K)
    x = _x(M, K, torch.float32, seed=K, ncols=20)
    wq, sw = R.quantize_int8_rowwise(torch.randn(N, K, generator=g) * 0.02)
    wq[0, :7] = -128  # valid int8 weights outside the quantizer's range
    bias = torch.randn(N, generator=g)
    for thr, b in ((6.0, bias), (6.0, None), (0.0, None)):
        out = OPS.llm_int8_linear(x, wq, sw, b, thr)
        y, scale = _fp64(x, wq, sw, b, thr)
        err = (out.double() - y).abs()
        assert bool((err <= 1e-5 * scale + 1e-6).all()), f"max err {err.max().item()}"
        torch.testing.assert_close(out, R.llm_int8_linear(x, wq, sw, b, thr), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("M", (2, 9))
def test_llm_int8_linear_half_inputs(M, dtype, isa):
    g = torch.Generator().manual_seed(M)
    K, N = 257, 41
    x = _x(M, K, dtype, seed=3, ncols=6)
    wq, sw = R.quantize_int8_rowwise(torch.randn(N, K, generator=g) * 0.02)
    bias = torch.randn(N, generator=g).to(dtype)
    out = OPS.llm_int8_linear(x, wq, sw, bias, 6.0)
    assert out.dtype == dtype
    torch.testing.assert_close(out, R.llm_int8_linear(x, wq, sw, bias, 6.0))


def test_llm_int8_same_on_every_level(monkeypatch):
    # Every level computes the same q / scale / outliers bit for bit and the same outputs (the
    # correction's mul and add are rounded separately on every path).
    g = torch.Generator().manual_seed(0)
    x = _x(7, 1000, torch.float32, seed=1, ncols=20)
    wq, sw = R.quantize_int8_rowwise(torch.randn(50, 1000, generator=g) * 0.02)
    outs = []
    for level in quantkernels._native.cpu_isa_levels():
        monkeypatch.setenv("QUANTKERNELS_CPU_ISA", level)
        outs.append((level, OPS.llm_int8_linear(x, wq, sw, None, 6.0)))
    for level, o in outs[1:]:
        torch.testing.assert_close(o, outs[0][1], rtol=0, atol=0, msg=lambda m: f"{level}: {m}")
