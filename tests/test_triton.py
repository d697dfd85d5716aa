"""The Triton ops (``quantkernels::<op>_triton``) against docs/numerics.md and the reference.

Two ways to run the same checks:
- ``triton_interp``: CPU tensors through the Triton interpreter, small odd shapes. Triton
  decides interpreter vs compiler when it is imported (and the two cannot share a process),
  so this module puts the process's Triton in interpreter mode at collection, before any
  kernel is built (the kernel modules load on the first op call), and then restores
  ``TRITON_INTERPRET`` so that nothing else in the session sees it (``dispatch`` still
  refuses the triton backend for CPU tensors elsewhere). Where that is impossible -- triton
  was imported earlier without the interpreter, or a CUDA GPU is present -- these tests skip
  and ``test_interpreter_suite_in_subprocess`` runs this module in a fresh interpreter-mode
  process instead, so the checks always run once.
- ``cuda``: CUDA tensors at real sizes, fp16 and bf16 (skipped without a GPU).
Integers must be exact; floats are compared with the float64 value of the formula
(docs/numerics.md s.6): fp32 within 1e-5 of its magnitude (the formula with every term replaced
by its absolute value), fp16/bf16 within ``assert_close``'s defaults of the exact result
rounded to the dtype (plus that fp32 allowance for the epilogue before the cast).
"""

from __future__ import annotations

import importlib.util
import itertools
import os
import pathlib
import subprocess
import sys
import types

import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
HAVE_TRITON = importlib.util.find_spec("triton") is not None

# quantkernels/_native.py (the C++ extension loader) lives on another branch until merged.
if not (ROOT / "quantkernels" / "_native.py").exists() and "quantkernels._native" not in sys.modules:
    _shim = types.ModuleType("quantkernels._native")
    _shim.AVAILABLE, _shim.REASON, _shim.load = False, "quantkernels/_native.py not in this tree", lambda: False
    sys.modules["quantkernels._native"] = _shim


def _enter_interpreter() -> str:
    """Puts this process's Triton in interpreter mode; returns why not ('' on success)."""
    if not HAVE_TRITON:
        return "triton is not installed"
    if torch.cuda.is_available():
        return "a CUDA GPU is present, so Triton stays compiled in this process"
    if "triton" in sys.modules:
        import triton
        if getattr(triton, "knobs", None) is not None and triton.knobs.runtime.interpret:
            return ""
        return "triton was imported before this module without TRITON_INTERPRET=1"
    old = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"  # read while triton.language's own @jit helpers are built
    try:
        import triton
        triton.knobs.runtime.interpret = True  # an override: stays after the variable is restored
    finally:
        if old is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = old
    return ""


NO_INTERP = _enter_interpreter()

import quantkernels  # noqa: E402  (after the interpreter decision)
from quantkernels import reference as R  # noqa: E402
from quantkernels import _ops  # noqa: E402

T = torch.ops.quantkernels
HAS_CUDA = torch.cuda.is_available()
FLOATS = (torch.float32, torch.float16, torch.bfloat16)
DT_ID = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}

pytestmark = pytest.mark.skipif(not HAVE_TRITON, reason="triton is not installed")
interp = [pytest.mark.triton_interp,
          pytest.mark.skipif(bool(NO_INTERP), reason=f"not in interpreter mode: {NO_INTERP} "
                             "(test_interpreter_suite_in_subprocess runs these)")]
cuda = [pytest.mark.cuda, pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")]


def ids(v):
    return DT_ID.get(v, str(v))


# --------------------------------------------------------------------------- comparisons


def assert_float(got: torch.Tensor, exact: torch.Tensor, mag: torch.Tensor, what: str = ""):
    """docs/numerics.md s.6 against the float64 ``exact`` with magnitude ``mag`` (same shape)."""
    assert got.shape == exact.shape, (got.shape, exact.shape)
    g, e, m = got.double().cpu(), exact.double().cpu(), mag.double().cpu()
    fp32_allow = 1e-5 * m
    if got.dtype == torch.float32:
        err = (g - e).abs()
        bad = err > fp32_allow
        assert not bad.any(), (f"{what}: {int(bad.sum())} elements beyond 1e-5 * magnitude; worst at "
                               f"{tuple(int(i) for i in (err - fp32_allow).argmax().unravel_index(err.shape)) if hasattr(err, 'unravel_index') else ''}"
                               f" got {g[bad][:4].tolist()} exact {e[bad][:4].tolist()}")
        assert err.norm() <= 1e-5 * e.norm() + 1e-30, f"{what}: norm-wise relative error {err.norm() / e.norm()}"
    else:
        ref = e.to(got.dtype).double()
        rtol = {torch.float16: 1e-3, torch.bfloat16: 1.6e-2}[got.dtype]
        tol = 1e-5 + rtol * ref.abs() + fp32_allow
        err = (g - ref).abs()
        bad = err > tol
        assert not bad.any(), (f"{what}: {int(bad.sum())} of {err.numel()} elements beyond one {got.dtype} "
                               f"rounding: got {g[bad][:4].tolist()} want {ref[bad][:4].tolist()}")


def _i64(t):
    return t.to(torch.float64)  # exact for the integers here (< 2**53), and fast on every device


def gen(seed=0, device="cpu"):
    return torch.Generator(device="cpu").manual_seed(seed)


def randn(*shape, g, dtype=torch.float32, device="cpu", scale=1.0):
    return (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=dtype)


def randint8(*shape, g, device="cpu", lo=-128):
    return torch.randint(lo, 128, shape, generator=g, dtype=torch.int8).to(device)


# --------------------------------------------------------------------------- cases (device-generic)


def case_quantize(M, K, dtype, device, special=False, layout="contig", seed=0):
    g = gen(seed)
    x = randn(M, K, g=g, scale=3.0)
    if special and M >= 3:
        x[0] = 0.0                                    # all-zero row: scale 1, q 0
        x[1, 0], x[1, 1:5] = 127.0, torch.tensor([0.5, 1.5, -2.5, 126.5])  # exact ties at inv = 1
        x[2, K // 2] = float("nan")
        if M > 3:
            x[3, 1] = float("inf")
        if M > 4 and not (dtype == torch.bfloat16 and device == "cpu"):
            # subnormal absmax (fp32: 127 / absmax overflows to inf). Not bf16 in the interpreter,
            # whose bf16 -> fp32 conversion flushes subnormals to zero (the GPU's is exact).
            x[4] = 1e-40 if dtype != torch.float16 else 3e-7
            x[4, 0] = 0.0
    x = x.to(device=device, dtype=dtype)
    if layout == "3d":
        x = x.reshape(1, M, K)
    elif layout == "strided":
        x = torch.cat([x, x], dim=1)[:, ::2] if K > 1 else x
    q, s = T.quantize_int8_rowwise_triton(x)
    qr, sr = R.quantize_int8_rowwise(x)
    assert q.dtype == torch.int8 and s.dtype == torch.float32
    assert torch.equal(q.cpu(), qr.cpu())
    assert torch.equal(s.cpu(), sr.cpu()) or torch.equal(s.isnan().cpu(), sr.isnan().cpu()) and \
        torch.equal(torch.nan_to_num(s).cpu(), torch.nan_to_num(sr).cpu())


def case_outliers(M, K, dtype, threshold, device, seed=0):
    g = gen(seed)
    x = randn(M, K, g=g, scale=1.5)
    x[:, 3] *= 8.0
    x[M // 2, K - 1] = -7.0
    x[0, 1] = 6.0 if threshold == 6.0 else 1.0    # |x| == threshold counts (>=)
    x = x.to(device=device, dtype=dtype)
    q, s, o = T.quantize_int8_rowwise_outliers_triton(x, threshold)
    qr, sr, orr = R.quantize_int8_rowwise_outliers(x, threshold)
    assert o.dtype == torch.bool and o.device == x.device
    assert torch.equal(o.cpu(), orr.cpu())
    assert torch.equal(q.cpu(), qr.cpu())
    assert torch.equal(s.cpu(), sr.cpu())
    if threshold > 0:
        assert o.any()


def case_int8(M, N, K, device, b_layout="contig", seed=0):
    g = gen(seed)
    a = randint8(M, K, g=g, device=device)
    b = randint8(N, K, g=g, device=device)
    if b_layout == "transposed":
        b = b.t().contiguous().t()        # [N, K] with strides (1, N)
    c = T.int8_gemm_triton(a, b)
    assert c.dtype == torch.int32
    assert torch.equal(c.cpu(), R.int8_gemm(a.cpu(), b.cpu()))


def case_w8a8(M, N, K, out_dtype, bias, device, seed=0):
    g = gen(seed)
    a, b = randint8(M, K, g=g, device=device, lo=-127), randint8(N, K, g=g, device=device, lo=-127)
    sa = (torch.rand(M, generator=g) * 0.05 + 1e-3).to(device)
    sb = (torch.rand(N, generator=g) * 2e-4 + 1e-5).to(device)
    bi = randn(N, g=g, dtype=out_dtype, device=device, scale=0.5) if bias else None
    y = T.w8a8_gemm_triton(a, b, sa, sb, bi, out_dtype)
    assert y.dtype == out_dtype
    c = _i64(a) @ _i64(b).t()
    exact = c * sa.double()[:, None] * sb.double()[None, :]
    mag = c.abs() * sa.double()[:, None] * sb.double()[None, :]
    if bi is not None:
        exact, mag = exact + bi.double(), mag + bi.double().abs()
    assert_float(y, exact, mag, "w8a8")


def _int4_weight(N, K, G, asym, g, device):
    w = randn(N, K, g=g, scale=0.02)
    if asym:
        p, s, z = R.quantize_uint4_asym(w, G)
    else:
        (p, s), z = R.quantize_int4_sym(w, G), None
    return p.to(device), s.to(device), (z.to(device) if z is not None else None)


def case_w4a8(M, N, K, G, asym, out_dtype, bias, device, seed=0):
    g = gen(seed)
    p, s, z = _int4_weight(N, K, G, asym, g, device)
    a = randint8(M, K, g=g, device=device, lo=-127)
    sa = (torch.rand(M, generator=g) * 0.05 + 1e-3).to(device)
    bi = randn(N, g=g, dtype=torch.float32, device=device, scale=0.1) if bias else None
    y = T.w4a8_gemm_triton(a, p, sa, s, z, bi, out_dtype)
    ng = s.shape[1]
    Gs = K // ng
    q = R.unpack_int4(p, signed=z is None).double()
    if z is not None:
        q = q - z.double().repeat_interleave(Gs, dim=1)
    cg = torch.einsum("mgk,ngk->mng", _i64(a).reshape(M, ng, Gs), q.reshape(N, ng, Gs))
    exact = (cg * s.double()[None]).sum(-1) * sa.double()[:, None]
    mag = (cg.abs() * s.double()[None]).sum(-1) * sa.double()[:, None]
    if bi is not None:
        exact, mag = exact + bi.double(), mag + bi.double().abs()
    assert_float(y, exact, mag, "w4a8")


def _weight_only_exact(x, w_x_dtype, bias):
    xd, wd = x.double(), w_x_dtype.double()
    exact, mag = xd @ wd.t(), xd.abs() @ wd.abs().t()
    if bias is not None:
        exact, mag = exact + bias.double(), mag + bias.double().abs()
    return exact, mag


def case_w8a16(M, N, K, dtype, bias, device, split_k=None, seed=0):
    g = gen(seed)
    x = randn(M, K, g=g, dtype=dtype, device=device)
    b = randint8(N, K, g=g, device=device, lo=-127)
    sb = (torch.rand(N, generator=g) * 2e-4 + 1e-5).to(device)
    bi = randn(N, g=g, dtype=dtype, device=device, scale=0.1) if bias else None
    if split_k is None:
        y = T.w8a16_gemm_triton(x, b, sb, bi)
    else:
        from quantkernels.triton import weight_only
        y = weight_only.gemm(x, b, sb, None, bi, int4=False, split_k=split_k)
    assert y.dtype == dtype
    assert_float(y, *_weight_only_exact(x, (b.float() * sb[:, None]).to(dtype), bi), "w8a16")


def case_w4a16(M, N, K, G, asym, dtype, bias, device, split_k=None, seed=0):
    g = gen(seed)
    p, s, z = _int4_weight(N, K, G, asym, g, device)
    x = randn(M, K, g=g, dtype=dtype, device=device)
    bi = randn(N, g=g, dtype=dtype, device=device, scale=0.1) if bias else None
    if split_k is None:
        y = T.w4a16_gemm_triton(x, p, s, z, bi)
    else:
        from quantkernels.triton import weight_only
        y = weight_only.gemm(x, p, s, z, bi, int4=True, split_k=split_k)
    assert y.dtype == dtype
    assert_float(y, *_weight_only_exact(x, R.dequantize_int4(p, s, z).to(dtype), bi), "w4a16")


def case_llm_int8(M, N, K, dtype, threshold, bias, device, seed=0):
    g = gen(seed)
    x = randn(M, K, g=g)
    x[:, 2] *= 20.0
    x[M - 1, K - 3] = 9.0
    x = x.to(device=device, dtype=dtype)
    b = randint8(N, K, g=g, device=device, lo=-127)
    sw = (torch.rand(N, generator=g) * 2e-4 + 1e-5).to(device)
    bi = randn(N, g=g, dtype=dtype, device=device, scale=0.1) if bias else None
    y = T.llm_int8_linear_triton(x, b, sw, bi, threshold)
    assert y.dtype == dtype
    q, sx, o = R.quantize_int8_rowwise_outliers(x, threshold)   # == the Triton quantizer (tested above)
    c = _i64(q) @ _i64(b).t()
    xo = torch.where(o, x.double(), torch.zeros((), dtype=torch.float64, device=x.device))
    wd = _i64(b) * sw.double()[:, None]
    exact = c * sx.double()[:, None] * sw.double()[None, :] + xo @ wd.t()
    mag = c.abs() * sx.double()[:, None] * sw.double()[None, :] + xo.abs() @ wd.abs().t()
    if bi is not None:
        exact, mag = exact + bi.double(), mag + bi.double().abs()
    assert_float(y, exact, mag, "llm_int8")
    if threshold > 0:
        assert o.any()


def _weight_4bit(N, K, quant_type, blocksize, double, g, device):
    w = randn(N, K, g=g, scale=0.05)
    w[0, :3] = torch.tensor([0.0, 1.0, -1.0])   # exact codes at the block's absmax
    p, a = R.quantize_4bit(w, quant_type, blocksize)
    na = off = None
    if double:
        a, na, off = R.double_quantize_absmax(a)
        na, off = na.to(device), off.to(device)
    return p.to(device), a.to(device), na, off


def case_4bit(M, N, K, quant_type, blocksize, double, dtype, bias, device, layout="contig", split_k=None, seed=0):
    g = gen(seed)
    p, a, na, off = _weight_4bit(N, K, quant_type, blocksize, double, g, device)
    x = randn(M, K, g=g, dtype=dtype, device=device)
    if layout == "strided":
        x = torch.cat([x, x], dim=1)[:, ::2]       # [M, K] with strides (2K, 2)
        assert not x.is_contiguous()
    elif layout == "transposed":
        x = x.t().contiguous().t()                 # [M, K] with strides (1, M)
    bi = randn(N, g=g, dtype=dtype, device=device, scale=0.1) if bias else None
    if split_k is None:
        y = T.gemm_4bit_triton(x, p, a, quant_type, blocksize, na, off, bi)
    else:
        from quantkernels.triton import gemm_4bit
        y = gemm_4bit.gemm(x, p, a, quant_type, blocksize, na, off, bi, split_k=split_k)
    assert y.dtype == dtype and y.shape == (M, N)
    w = R.dequantize_4bit(p, a, quant_type, blocksize, na, off, dtype)
    assert_float(y, *_weight_only_exact(x, w, bi), f"gemm_4bit {quant_type} B={blocksize} double={double}")
    torch.testing.assert_close(y, R.gemm_4bit(x, p, a, quant_type, blocksize, na, off, bi),
                               rtol={torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype],
                               atol=1e-4 if dtype == torch.float32 else 2e-3)


# --------------------------------------------------------------------------- interpreter (CPU)

MS = (1, 3, 17)


@pytest.mark.parametrize("M,K,dtype", [(M, 70, d) for M in MS for d in FLOATS] + [(3, 9001, torch.float16)], ids=ids)
def test_quantize_rowwise_interp(M, K, dtype):
    case_quantize(M, K, dtype, "cpu")


@pytest.mark.parametrize("layout", ["contig", "3d", "strided"])
@pytest.mark.parametrize("dtype", FLOATS, ids=ids)
def test_quantize_rowwise_special_rows_interp(dtype, layout):
    case_quantize(6, 37, dtype, "cpu", special=True, layout=layout)


@pytest.mark.parametrize("threshold", [6.0, 0.0])
@pytest.mark.parametrize("dtype", FLOATS, ids=ids)
@pytest.mark.parametrize("M,K", [(1, 70), (3, 70), (17, 130)])
def test_quantize_outliers_interp(M, K, dtype, threshold):
    case_outliers(M, K, dtype, threshold, "cpu")


@pytest.mark.parametrize("M,N,K,layout", [(M, 33, 70, "contig") for M in MS] + [(17, 16, 256, "contig"),
                                                                                  (3, 33, 70, "transposed")])
def test_int8_gemm_interp(M, N, K, layout):
    case_int8(M, N, K, "cpu", layout)


def test_int8_gemm_extremes_interp():
    a = torch.full((3, 300), -128, dtype=torch.int8)
    b = torch.full((5, 300), -128, dtype=torch.int8)
    assert torch.equal(T.int8_gemm_triton(a, b), torch.full((3, 5), 128 * 128 * 300, dtype=torch.int32))


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("out_dtype", FLOATS, ids=ids)
@pytest.mark.parametrize("M", MS)
def test_w8a8_interp(M, out_dtype, bias):
    case_w8a8(M, 33, 70, out_dtype, bias, "cpu")


W4_SHAPES = [(96, 32), (192, 64), (70, 70)]  # (K, G): 3 groups, 3 groups, per-channel with K = 70


@pytest.mark.parametrize("asym", [False, True], ids=["sym", "asym"])
@pytest.mark.parametrize("K,G", W4_SHAPES)
@pytest.mark.parametrize("M", MS)
def test_w4a8_interp(M, K, G, asym):
    case_w4a8(M, 33, K, G, asym, torch.float32, M != 3, "cpu")


@pytest.mark.parametrize("out_dtype", [torch.float16, torch.bfloat16], ids=ids)
def test_w4a8_half_out_interp(out_dtype):
    case_w4a8(17, 33, 128, 32, True, out_dtype, True, "cpu")


@pytest.mark.parametrize("dtype", FLOATS, ids=ids)
@pytest.mark.parametrize("M", MS + (33,))
def test_w8a16_interp(M, dtype):
    case_w8a16(M, 33, 70, dtype, M % 2 == 1, "cpu")


@pytest.mark.parametrize("asym", [False, True], ids=["sym", "asym"])
@pytest.mark.parametrize("dtype", FLOATS, ids=ids)
@pytest.mark.parametrize("K,G", W4_SHAPES)
@pytest.mark.parametrize("M", MS + (33,))
def test_w4a16_interp(M, K, G, dtype, asym):
    case_w4a16(M, 33, K, G, asym, dtype, M != 3, "cpu")


@pytest.mark.parametrize("dtype", FLOATS, ids=ids)
@pytest.mark.parametrize("split_k", [2, 3])
def test_weight_only_split_k_interp(split_k, dtype):
    case_w8a16(3, 33, 384, dtype, True, "cpu", split_k=split_k)
    case_w4a16(1, 33, 384, 128, True, dtype, True, "cpu", split_k=split_k)


# (N, K, blocksize): K % B != 0 with blocks spanning rows (33 x 70 / 32, 5 x 96 / 64), K a multiple of B,
# one partial last block (n % B != 0: 3 x 50 / 64), B larger than a row, and the largest B.
SHAPES_4BIT = ((33, 70, 32), (5, 96, 64), (7, 128, 128), (3, 50, 64), (9, 34, 256), (2, 4096, 4096))


@pytest.mark.parametrize("quant_type", ("nf4", "fp4"))
@pytest.mark.parametrize("double", (False, True), ids=("plain", "double"))
@pytest.mark.parametrize("N,K,blocksize", SHAPES_4BIT[:5])
def test_gemm_4bit_decode_is_exact_interp(N, K, blocksize, quant_type, double):
    """With x = I (fp32) every output is one product with 1 and exact zeros: Y^T is the decoded
    weight, bit for bit equal to dequantize_4bit (s.11.6), blocks spanning rows included."""
    p, a, na, off = _weight_4bit(N, K, quant_type, blocksize, double, gen(5), "cpu")
    y = T.gemm_4bit_triton(torch.eye(K), p, a, quant_type, blocksize, na, off, None)
    assert torch.equal(y.t(), R.dequantize_4bit(p, a, quant_type, blocksize, na, off))


@pytest.mark.parametrize("quant_type", ("nf4", "fp4"))
@pytest.mark.parametrize("double", (False, True), ids=("plain", "double"))
@pytest.mark.parametrize("dtype", FLOATS, ids=ids)
@pytest.mark.parametrize("M,shape", [(1, SHAPES_4BIT[0]), (17, SHAPES_4BIT[1]), (3, SHAPES_4BIT[2]),
                                     (5, SHAPES_4BIT[3]), (2, SHAPES_4BIT[4])], ids=str)
def test_gemm_4bit_interp(M, shape, dtype, double, quant_type):
    N, K, B = shape
    case_4bit(M, N, K, quant_type, B, double, dtype, bias=M != 3, device="cpu")


@pytest.mark.parametrize("layout", ("strided", "transposed"))
@pytest.mark.parametrize("dtype", FLOATS, ids=ids)
def test_gemm_4bit_non_contiguous_x_interp(layout, dtype):
    case_4bit(4, 9, 96, "nf4", 64, True, dtype, True, "cpu", layout=layout)


@pytest.mark.parametrize("split_k", (1, 2, 3))
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=ids)
def test_gemm_4bit_split_k_interp(split_k, dtype):
    case_4bit(1, 9, 384, "fp4", 32, True, dtype, True, "cpu", split_k=split_k)


def test_gemm_4bit_largest_block_interp():
    case_4bit(2, 2, 4096, "nf4", 4096, False, torch.float16, True, "cpu")


def test_gemm_4bit_empty_and_nonfinite_interp():
    p, a, _, _ = _weight_4bit(4, 64, "nf4", 64, False, gen(6), "cpu")
    y = T.gemm_4bit_triton(torch.ones(0, 64), p, a, "nf4", 64, None, None, None)
    assert y.shape == (0, 4)
    a = a.clone()
    a[2] = float("nan")                        # block 2 is row 2: only output column 2 is NaN
    y = T.gemm_4bit_triton(torch.ones(3, 64), p, a, "nf4", 64, None, None, None)
    assert y[:, 2].isnan().all() and not y[:, [0, 1, 3]].isnan().any()


def test_gemm_4bit_errors_name_the_argument_interp():
    p, a, na, off = _weight_4bit(4, 64, "nf4", 64, True, gen(7), "cpu")
    with pytest.raises(ValueError, match=r"gemm_4bit: x must be 2-D \[M, K\] activation, got shape \(1, 2, 64\)"):
        T.gemm_4bit_triton(torch.ones(1, 2, 64), p, a, "nf4", 64, na, off, None)
    with pytest.raises(ValueError, match=r"gemm_4bit.*quant_type must be one of.*'int4'"):
        T.gemm_4bit_triton(torch.ones(2, 64), p, a, "int4", 64, na, off, None)
    with pytest.raises(ValueError, match=r"gemm_4bit.*blocksize must be one of.*got 48"):
        T.gemm_4bit_triton(torch.ones(2, 64), p, a, "nf4", 48, na, off, None)
    with pytest.raises(ValueError, match=r"gemm_4bit.*x has K = 62 columns but the weight has K = 64"):
        T.gemm_4bit_triton(torch.ones(2, 62), p, a, "nf4", 64, na, off, None)
    with pytest.raises(ValueError, match=r"gemm_4bit.*nested_absmax and offset go together"):
        T.gemm_4bit_triton(torch.ones(2, 64), p, a, "nf4", 64, na, None, None)


def test_gemm_4bit_dispatch_and_compile_interp(monkeypatch):
    """The triton backend serves gemm_4bit (dispatch finds ``gemm_4bit_triton``); dynamo captures it
    in one graph."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    from quantkernels import dispatch
    assert dispatch.kernel_table()["gemm_4bit"]["triton"]
    p, a, na, off = _weight_4bit(6, 64, "fp4", 32, True, gen(8), "cpu")
    x = randn(3, 64, g=gen(9))
    f = torch.compile(lambda x: T.gemm_4bit_triton(x, p, a, "fp4", 32, na, off, None), fullgraph=True,
                      backend="eager")
    torch.testing.assert_close(f(x), T.gemm_4bit_triton(x, p, a, "fp4", 32, na, off, None), rtol=0, atol=0)


@pytest.mark.parametrize("threshold", [6.0, 0.0])
@pytest.mark.parametrize("dtype", FLOATS, ids=ids)
@pytest.mark.parametrize("M", MS)
def test_llm_int8_interp(M, dtype, threshold):
    case_llm_int8(M, 33, 200, dtype, threshold, M != 3, "cpu")


def _sample_args(op):
    g = gen(1)
    x = randn(3, 64, g=g)
    a, b = randint8(3, 64, g=g), randint8(5, 64, g=g)
    sa, sb = torch.rand(3) + 0.1, torch.rand(5) + 0.1
    p, s, z = _int4_weight(5, 64, 32, True, g, "cpu")
    p4, a4, na4, off4 = _weight_4bit(5, 64, "nf4", 32, True, g, "cpu")
    return {
        "quantize_int8_rowwise": (x,),
        "quantize_int8_rowwise_outliers": (x * 3, 6.0),
        "int8_gemm": (a, b),
        "w8a8_gemm": (a, b, sa, sb, torch.randn(5), torch.float16),
        "w4a8_gemm": (a, p, sa, s, z, None, torch.bfloat16),
        "w8a16_gemm": (x, b, sb, None),
        "w4a16_gemm": (x, p, s, z, torch.randn(5)),
        "llm_int8_linear": (x * 3, b, sb * 0.01, None, 6.0),
        "gemm_4bit": (x, p4, a4, "nf4", 32, na4, off4, torch.randn(5)),
    }[op]


TRITON_OPS = tuple(quantkernels.triton.OPS) if HAVE_TRITON else ()


def test_every_op_has_a_triton_op_with_the_same_arguments():
    assert set(TRITON_OPS) == {"quantize_int8_rowwise", "quantize_int8_rowwise_outliers", "int8_gemm", "w8a8_gemm",
                               "w4a8_gemm", "w8a16_gemm", "w4a16_gemm", "llm_int8_linear", "gemm_4bit"}
    for op in TRITON_OPS:
        base = getattr(T, op).default._schema
        tri = getattr(T, f"{op}_triton").default._schema
        sig = lambda s: [(a.name, str(a.type), a.default_value) for a in s.arguments]  # noqa: E731
        assert sig(tri) == sig(base), (op, str(tri), str(base))
        assert [str(r.type) for r in tri.returns] == [str(r.type) for r in base.returns]
    from quantkernels import dispatch
    assert set(TRITON_OPS) <= {op for op, k in dispatch.kernel_table().items() if k["triton"]}


@pytest.mark.parametrize("op", TRITON_OPS)
def test_opcheck_interp(op):
    torch.library.opcheck(getattr(T, f"{op}_triton").default, _sample_args(op),
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


def test_errors_name_the_argument_and_value_interp():
    a, b = torch.zeros(3, 64, dtype=torch.int8), torch.zeros(5, 64, dtype=torch.int8)
    with pytest.raises(TypeError, match=r"w8a8_gemm.*scale_a.*float32.*torch.float16"):
        T.w8a8_gemm_triton(a, b, torch.ones(3, dtype=torch.float16), torch.ones(5))
    with pytest.raises(ValueError, match=r"int8_gemm.*b must have K = 64.*\(5, 63\)"):
        T.int8_gemm_triton(a, b[:, :63])
    with pytest.raises(ValueError, match=r"w4a16_gemm.*scale_b.*group_size = K / 3"):
        T.w4a16_gemm_triton(torch.zeros(2, 96), torch.zeros(5, 48, dtype=torch.uint8), torch.ones(5, 3) * 0 + 1,
                            None, None) if False else T.w4a16_gemm_triton(
            torch.zeros(2, 90), torch.zeros(5, 45, dtype=torch.uint8), torch.ones(5, 3))
    with pytest.raises(ValueError, match=r"llm_int8_linear.*threshold must be a number, got nan"):
        T.llm_int8_linear_triton(torch.zeros(2, 64), b, torch.ones(5), None, float("nan"))


def test_zero_points_out_of_range_rejected_interp():
    """issue 15: zero points outside [0, 15] are rejected by the Triton ops too (the shared contract)."""
    a, p = torch.ones(5, 64, dtype=torch.int8), torch.zeros(64, 32, dtype=torch.uint8)
    s, z = torch.ones(64, 2), torch.full((64, 2), 200, dtype=torch.uint8)
    with pytest.raises(ValueError, match=r"w4a8_gemm: zero_b must hold int4 zero points in \[0, 15\], got 200"):
        T.w4a8_gemm_triton(a, p, torch.ones(5), s, z, None, None)
    with pytest.raises(ValueError, match=r"w4a16_gemm: zero_b must hold int4 zero points in \[0, 15\], got 200"):
        T.w4a16_gemm_triton(torch.ones(5, 64), p, s, z, None)


def test_compile_fullgraph_no_graph_break_interp():
    """Dynamo captures the op in one graph (fullgraph=True: no graph break, no host sync in the
    fake-tensor trace of the body). Lowering the interpreted kernels through AOTAutograd does
    not work in the interpreter, so the backend is "eager" here; the CUDA test uses inductor."""
    x, b, sb, _ = _sample_args("llm_int8_linear")[:4]
    f = torch.compile(lambda x: T.llm_int8_linear_triton(x, b, sb, None, 6.0), fullgraph=True, backend="eager")
    torch.testing.assert_close(f(x), T.llm_int8_linear_triton(x, b, sb, None, 6.0), rtol=0, atol=0)


@pytest.mark.parametrize("scheme", ["w8a8", "llm_int8", "w8a16", "w4a16", "w4a8", "nf4", "fp4"])
def test_quantlinear_triton_backend_interp(scheme, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # dispatch serves CPU tensors with triton only then
    g = gen(3)
    lin = torch.nn.Linear(128, 48)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(48, 128, generator=g) * 0.02)
    x = torch.randn(2, 3, 128, generator=g)
    x[..., 5] *= 10
    ref = quantkernels.QuantLinear.from_linear(lin, scheme, backend="reference")(x)
    out = quantkernels.QuantLinear.from_linear(lin, scheme, backend="triton")(x)
    assert_float(out, ref.double(), ref.double().abs() + 1.0, scheme)


@pytest.mark.parametrize("scheme", ["w8a8", "llm_int8", "w8a16", "w4a16", "w4a8", "nf4", "fp4"])
def test_backward_triton_backend_interp(scheme, monkeypatch):
    """docs/numerics.md s.10: the input gradient does not depend on the backend (QuantLinear), and
    the Triton ops carry the same backward as the base ops (or raise, for the quantizer)."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    g = gen(4)
    lin = torch.nn.Linear(128, 48)
    x = torch.randn(2, 3, 128, generator=g)
    grads = []
    for backend in ("reference", "triton"):
        xb = x.clone().requires_grad_()
        quantkernels.QuantLinear.from_linear(lin, scheme, backend=backend)(xb).square().sum().backward()
        grads.append(xb.grad)
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-6, atol=1e-6)
    q = quantkernels.QuantLinear.from_linear(lin, scheme)
    x2 = x.reshape(6, 128).clone().requires_grad_()
    if scheme == "w8a16":
        T.w8a16_gemm_triton(x2, q.qweight, q.weight_scale, None).sum().backward()
        x3 = x2.detach().clone().requires_grad_()
        T.w8a16_gemm(x3, q.qweight, q.weight_scale, None).sum().backward()
        torch.testing.assert_close(x2.grad, x3.grad, rtol=0, atol=0)
    elif scheme == "w8a8":
        with pytest.raises(quantkernels.autograd.NoBackwardError, match="quantize_int8_rowwise has no backward"):
            T.quantize_int8_rowwise_triton(x2)[1].sum().backward()


for _name, _obj in list(globals().items()):
    if _name.startswith("test_") and _name.endswith("_interp"):
        for _m in interp:
            _obj = _m(_obj)
        globals()[_name] = _obj


@pytest.mark.triton_interp
@pytest.mark.skipif(not NO_INTERP or not HAVE_TRITON, reason="the interpreter tests run in this process")
def test_interpreter_suite_in_subprocess():
    env = {k: v for k, v in os.environ.items() if k != "PYTEST_ADDOPTS"}
    env.update(TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="")
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "triton_interp",
                        str(pathlib.Path(__file__))], cwd=ROOT, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-6000:] + r.stderr[-3000:]


# --------------------------------------------------------------------------- CUDA (real sizes)

CUDA_MS = (1, 16, 17, 128, 333)
HALF = (torch.float16, torch.bfloat16)


@pytest.mark.parametrize("dtype", HALF, ids=ids)
@pytest.mark.parametrize("M", CUDA_MS)
def test_quantize_cuda(M, dtype):
    case_quantize(M, 4096, dtype, "cuda")
    case_quantize(M, 11008, dtype, "cuda", seed=1)
    case_outliers(M, 4096, dtype, 6.0, "cuda")


@pytest.mark.parametrize("dtype", HALF, ids=ids)
@pytest.mark.parametrize("M", CUDA_MS)
def test_int8_gemms_cuda(M, dtype):
    case_int8(M, 4096, 4096, "cuda")
    case_int8(M, 1000, 1030, "cuda", "transposed")
    case_w8a8(M, 4096, 4096, dtype, True, "cuda")
    case_w8a8(M, 1000, 1030, dtype, False, "cuda")
    case_llm_int8(M, 4096, 4096, dtype, 6.0, True, "cuda")
    case_llm_int8(M, 1000, 1030, dtype, 0.0, False, "cuda")


@pytest.mark.parametrize("dtype", HALF, ids=ids)
@pytest.mark.parametrize("M", CUDA_MS)
def test_int4_and_weight_only_cuda(M, dtype):
    for G, asym in ((128, False), (128, True), (32, False), (4096, True)):
        case_w4a8(M, 4096, 4096, G, asym, dtype, True, "cuda")
        case_w4a16(M, 4096, 4096, G, asym, dtype, True, "cuda")
    case_w4a16(M, 1000, 1536, 64, True, dtype, False, "cuda")
    case_w8a16(M, 4096, 4096, dtype, True, "cuda")
    case_w8a16(M, 1000, 1030, dtype, False, "cuda")


def test_llm_int8_cuda_graph_and_compile_cuda():
    x, b, sb = _sample_args("llm_int8_linear")[:3]
    x, b, sb = x.cuda().half(), b.cuda(), sb.cuda()
    eager = T.llm_int8_linear_triton(x, b, sb, None, 6.0)
    graph = torch.cuda.CUDAGraph()
    T.llm_int8_linear_triton(x, b, sb, None, 6.0)  # warm-up (autotune) outside the capture
    with torch.cuda.graph(graph):
        out = T.llm_int8_linear_triton(x, b, sb, None, 6.0)
    graph.replay()
    torch.testing.assert_close(out, eager, rtol=0, atol=0)
    f = torch.compile(lambda x: T.llm_int8_linear_triton(x, b, sb, None, 6.0), fullgraph=True)
    torch.testing.assert_close(f(x), eager)



@pytest.mark.parametrize("dtype", HALF, ids=ids)
@pytest.mark.parametrize("M", CUDA_MS)
def test_gemm_4bit_cuda(M, dtype):
    for qt, B, double in (("nf4", 64, True), ("fp4", 64, False), ("nf4", 4096, False), ("fp4", 32, True)):
        case_4bit(M, 4096, 4096, qt, B, double, dtype, True, "cuda")
    case_4bit(M, 1000, 1000, "nf4", 64, True, dtype, False, "cuda")    # blocks spanning rows
    case_4bit(M, 1000, 1536, "fp4", 128, False, dtype, True, "cuda", layout="transposed")


def test_gemm_4bit_decode_exact_and_compile_cuda():
    for qt, double in (("nf4", True), ("fp4", False)):
        p, a, na, off = _weight_4bit(300, 1000, qt, 64, double, gen(11), "cuda")
        y = T.gemm_4bit_triton(torch.eye(1000, device="cuda"), p, a, qt, 64, na, off, None)
        assert torch.equal(y.t(), R.dequantize_4bit(p, a, qt, 64, na, off))
        x = torch.randn(17, 1000, device="cuda", dtype=torch.float16)
        f = torch.compile(lambda x: T.gemm_4bit_triton(x, p, a, qt, 64, na, off, None), fullgraph=True)
        torch.testing.assert_close(f(x), T.gemm_4bit_triton(x, p, a, qt, 64, na, off, None), rtol=0, atol=0)

for _name, _obj in list(globals().items()):
    if _name.startswith("test_") and _name.endswith("_cuda"):
        for _m in cuda:
            _obj = _m(_obj)
        globals()[_name] = _obj
