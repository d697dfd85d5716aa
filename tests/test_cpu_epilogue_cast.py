"""The vectorized casts of the int8 GEMMs' fused epilogues (csrc/cpu/qk_store.h) against the scalar ones.

w8a8_gemm, llm_int8_linear and w4a8_gemm write bf16 / fp16 outputs through zmm (avx512 and above) or
ymm (avx2) casts; the portable level keeps the scalar c10 casts. Every level must give the same bits,
NaN payloads included, and each must equal its own fp32 output cast by torch (NaN-aware): outputs that
round half to even, overflow fp16 to Inf, land in fp16's subnormals, or are NaN / Inf from the scales
or the bias.
"""
import pytest
import torch

import quantkernels
from quantkernels import _native
from quantkernels import reference as R

OPS = torch.ops.quantkernels

if not _native.AVAILABLE:
    pytest.skip(f"quantkernels._C is not built: {_native.REASON}", allow_module_level=True)

LEVELS = [lv for lv in _native.ISA_LEVELS if lv in set(_native.cpu_isa_levels())]


def _bits(t):
    return t.view(torch.int16)


def _check_levels(monkeypatch, pair, dtypes=(torch.bfloat16, torch.float16)):
    """pair(dt) -> (output in dt, the same call's fp32 output cast by torch), at every level this CPU has:
    each level's output equals its cast fp32 output (NaN positions equal), and all levels give the same bits."""
    for dt in dtypes:
        outs = {}
        for lv in LEVELS:
            monkeypatch.setenv("QUANTKERNELS_CPU_ISA", lv)
            y, ref = pair(dt)
            assert torch.equal(y.isnan(), ref.isnan()), (lv, dt)
            keep = ~y.isnan()
            assert torch.equal(_bits(y)[keep], _bits(ref)[keep]), (lv, dt)
            outs[lv] = y
        base = outs[LEVELS[0]]
        for lv, y in outs.items():
            assert torch.equal(_bits(y), _bits(base)), f"{lv} differs from {LEVELS[0]} for {dt}"


def _out_pair(fn):
    """For ops with an out_dtype argument: fn(dt) against fn(float32) cast to dt."""
    return lambda dt: (fn(dt), fn(torch.float32).to(dt))


def _scales_with_specials(N, g):
    sb = torch.rand(N, generator=g) * 0.01 + 1e-4
    sb[0], sb[1], sb[2], sb[3], sb[4], sb[5] = float("inf"), float("nan"), 1e30, 3e-9, 0.0, -1e-3
    bias = torch.randn(N, generator=g)
    bias[6], bias[7], bias[8] = float("nan"), -float("inf"), 70000.0  # NaN, -Inf, past fp16's max
    # NaNs with payloads (a hardware conversion keeps some payload bits; the scalar casts do not)
    bias[9:11] = torch.tensor([0x7FC12345, -0x3EDCBB], dtype=torch.int32).view(torch.float32)
    return sb, bias


@pytest.mark.parametrize("M", (1, 3, 5, 17, 130))
@pytest.mark.parametrize("N", (11, 37, 70))
def test_w8a8_epilogue_casts(M, N, monkeypatch):
    g = torch.Generator().manual_seed(M * 100 + N)
    K = 200
    a = torch.randint(-127, 128, (M, K), dtype=torch.int8, generator=g)
    b = torch.randint(-128, 128, (N, K), dtype=torch.int8, generator=g)
    sa = torch.rand(M, generator=g) + 0.5
    sb, bias = _scales_with_specials(N, g)
    for with_bias in (True, False):
        bb = bias if with_bias else None
        _check_levels(monkeypatch, _out_pair(lambda dt: OPS.w8a8_gemm(a, b, sa, sb, bb, dt)))


def test_w8a8_epilogue_rounding_edges(monkeypatch):
    # Outputs exactly halfway between two bf16 / fp16 values (ties to even both ways) and in fp16's
    # subnormal range: c = 1 per element (a one-hot row times a one-hot weight row) so y = sa * sb.
    K, N = 64, 64
    a = torch.zeros(1, K, dtype=torch.int8)
    a[0, 0] = 1
    b = torch.zeros(N, K, dtype=torch.int8)
    b[:, 0] = 1
    sa = torch.ones(1)
    ties_bf16 = [1.0 + 2.0 ** -8 * k for k in (1, 3)]          # bf16 halfway points (round down / up)
    ties_f16 = [1.0 + 2.0 ** -11 * k for k in (1, 3)]          # fp16 halfway points
    subn = [2.0 ** -20, 3 * 2.0 ** -25, 2.0 ** -26, 2.0 ** -30]  # fp16 subnormals / underflow to 0
    big = [65504.0, 65520.0, 65519.99, 3.4e38]                   # fp16 max, first value rounding to Inf
    vals = ties_bf16 + ties_f16 + subn + big
    sb = torch.tensor((vals + [-v for v in vals]) * 4)[:N]
    _check_levels(monkeypatch, _out_pair(lambda dt: OPS.w8a8_gemm(a, b, sa, sb, None, dt)))


@pytest.mark.parametrize("M", (2, 20))
@pytest.mark.parametrize("outliers", (False, True))
def test_llm_int8_epilogue_casts(M, outliers, monkeypatch):
    # llm_int8_linear writes x's dtype: a bf16 / fp16 x against the same values as fp32 (same q, same
    # outlier correction), whose output cast by torch must be the same bits. No outliers: the plain
    # W8A8 epilogue; outliers: the fused outlier epilogue (block_outliers_avx512 at avx512 and above).
    g = torch.Generator().manual_seed(M + 7 * outliers)
    N, K = 37, 96
    w = torch.randn(N, K, generator=g)
    wq, _ = OPS.quantize_int8_rowwise(w)
    sb, bias = _scales_with_specials(N, g)
    x = torch.randn(M, K, generator=g)
    if outliers:
        x[:, 5] = 9.0
    _check_levels(monkeypatch, lambda xdt: (OPS.llm_int8_linear(x.to(xdt), wq, sb, bias, 6.0),
                                            OPS.llm_int8_linear(x.to(xdt).float(), wq, sb, bias, 6.0).to(xdt)))


@pytest.mark.parametrize("M,N", [(32, 16), (48, 24), (33, 17), (130, 40)])
def test_w4a8_epilogue_casts(M, N, monkeypatch):
    # M and N multiples of 16 / 8: the avx512_vnni panel path's full-tile vector stores; 33 x 17: its
    # scalar edge stores next to them.
    g = torch.Generator().manual_seed(M + N)
    K = 256
    w = torch.randn(N, K, generator=g)
    bp, sbg = R.quantize_int4_sym(w, 128)
    sbg[0, 0], sbg[1, 1], sbg[2, 0] = float("inf"), float("nan"), 1e30
    bias = torch.randn(N, generator=g)
    bias[3], bias[4] = float("nan"), 70000.0
    bias[5:7] = torch.tensor([0x7FC12345, -0x3EDCBB], dtype=torch.int32).view(torch.float32)
    x = torch.randn(M, K, generator=g)
    q, sx = OPS.quantize_int8_rowwise(x)
    _check_levels(monkeypatch, _out_pair(lambda dt: OPS.w4a8_gemm(q, bp, sx, sbg, None, bias, dt)))
