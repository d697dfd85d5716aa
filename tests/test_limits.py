"""Bounds defined once (csrc/qk_limits.h, mirrored in Python) and the int4 zero-point range check
(issue 15): zero points outside [0, 15] are rejected by every backend's argument checks in eager
mode, and never read (no host synchronisation) under FakeTensor / tracing."""

import pathlib
import re

import pytest
import torch

import quantkernels  # noqa: F401  (registers the ops)
from quantkernels import _contracts, _validate
from quantkernels import reference as R

ROOT = pathlib.Path(__file__).resolve().parents[1]
OPS = torch.ops.quantkernels


def _header_constants():
    """The constexpr values of csrc/qk_limits.h, evaluated from their defining expressions."""
    text = (ROOT / "csrc" / "qk_limits.h").read_text()
    out = {}
    for name, expr in re.findall(r"constexpr int(?:64_t)? (k\w+) = ([^;]+);", text):
        py = re.sub(r"int64_t\((\d+)\)", r"\1", expr).replace("/", "//")
        out[name] = eval(py, {}, {})  # arithmetic on integer literals only (checked below)
        assert re.fullmatch(r"[\d\s()+\-*/<int64_]+", expr), expr
    return out


def test_limits_defined_once_and_agree():
    c = _header_constants()
    assert c["kMaxKInt8"] == _validate.MAX_K_INT8 == 131071
    assert c["kMaxGroupW4A8"] == _contracts.MAX_GROUP_W4A8 == 1118481
    assert c["kMaxZeroInt4"] == _validate.MAX_ZERO_INT4 == 15
    assert 128 * 15 * c["kMaxGroupW4A8"] < 2**31 <= 128 * 15 * (c["kMaxGroupW4A8"] + 1)
    # No C++ file defines its own copy of a bound.
    for src in list((ROOT / "csrc").rglob("*.cpp")) + list((ROOT / "csrc").rglob("*.cu")):
        body = src.read_text()
        assert not re.search(r"<< 31\) / \(128 \* (?:15|128)\)|2147483647LL / \(128", body), src


def _w4a8_case(zero_value, M=5, N=64, K=64, G=32):
    g = torch.Generator().manual_seed(0)
    a = torch.randint(-128, 128, (M, K), dtype=torch.int8, generator=g)
    p = torch.randint(0, 256, (N, K // 2), dtype=torch.uint8, generator=g)
    sa, sb = torch.rand(M, generator=g) + 0.5, torch.rand(N, K // G, generator=g) + 0.5
    z = torch.randint(0, 16, (N, K // G), dtype=torch.uint8, generator=g)
    z[3, 1] = zero_value
    return a, p, sa, sb, z


BACKENDS = {"reference": R, "native": OPS}


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_w4a8_zero_point_200_rejected(backend):
    """The issue's case: M = 5, N = 64, K = 64, G = 32, a zero point of 200."""
    a, p, sa, sb, z = _w4a8_case(200)
    f = BACKENDS[backend]
    with pytest.raises(ValueError, match=r"quantkernels.w4a8_gemm: zero_b must hold int4 zero points in "
                                         r"\[0, 15\], got 200"):
        f.w4a8_gemm(a, p, sa, sb, z)
    with pytest.raises(ValueError, match=r"quantkernels.w4a16_gemm: zero_b .* got 200"):
        f.w4a16_gemm(torch.randn(5, 64), p, sb, z)


def test_dequantize_int4_zero_point_rejected():
    _, p, _, sb, z = _w4a8_case(16)
    with pytest.raises(ValueError, match=r"dequantize_int4: zero .* got 16"):
        OPS.dequantize_int4(p, sb, z)


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_w4a8_zero_point_15_exact(backend):
    """The top of the range is accepted, and the group-wise int32 sums are exact."""
    a, p, sa, sb, z = _w4a8_case(15)
    y = BACKENDS[backend].w4a8_gemm(a, p, sa, torch.ones_like(sb), z)
    q = torch.stack([p & 0xF, p >> 4], -1).reshape(64, 64).to(torch.int64)
    qz = q - z.to(torch.int64).repeat_interleave(32, 1)
    c = a.to(torch.int64).reshape(5, 1, 2, 32) * qz.reshape(1, 64, 2, 32)
    per_group = c.sum(-1).to(torch.float32)  # exact: |C_g| < 2^24
    expect = (per_group[..., 0] + per_group[..., 1]) * sa[:, None]
    torch.testing.assert_close(y, expect, rtol=0, atol=0)


def test_zero_point_check_skipped_without_values():
    """Fake tensors (torch.compile's tracing) carry no values: the check must not read them."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    a, p, sa, sb, z = _w4a8_case(200)
    with FakeTensorMode() as mode:
        args = [mode.from_tensor(t) for t in (a, p, sa, sb, z)]
        y = OPS.w4a8_gemm(*args)
    assert tuple(y.shape) == (5, 64)
    # The compiled op traces without reading zero_b; the eager call at run time still checks it.
    f = torch.compile(lambda *t: OPS.w4a8_gemm(*t), backend="eager", fullgraph=True)
    with pytest.raises(ValueError, match=r"got 200"):
        f(a, p, sa, sb, z)


def test_group_bound_rejected_everywhere():
    """G = K = 1118482 is one past kMaxGroupW4A8; 1118480 (even, packable) is accepted."""
    K = _contracts.MAX_GROUP_W4A8 + 1
    a, p = torch.zeros(1, K, dtype=torch.int8), torch.zeros(1, K // 2, dtype=torch.uint8)
    for f in (R.w4a8_gemm, OPS.w4a8_gemm):
        with pytest.raises(ValueError, match=r"group_size = 1118482 exceeds 1118481"):
            f(a, p, torch.ones(1), torch.ones(1, 1))
    K -= 2
    y = OPS.w4a8_gemm(torch.ones(1, K, dtype=torch.int8), torch.full((1, K // 2), 0x77, dtype=torch.uint8),
                      torch.ones(1), torch.ones(1, 1))
    assert y.item() == 7.0 * K
