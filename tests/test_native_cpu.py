"""The C++ CPU kernels of quantkernels._C against the pure-PyTorch reference (bit-exact).

Every test runs on every CPU instruction-set level (tests/_isa.py: portable .. avx512_bf16, the
ones this CPU lacks skipped), selected per call through QUANTKERNELS_CPU_ISA.
"""

import itertools
import sys

import pytest
import torch

import quantkernels._ops  # noqa: F401  (op schemas first)
from quantkernels import _native
from quantkernels import reference as R

from _isa import isa  # noqa: F401  (fixtures)

if not _native.load():
    pytest.skip(f"native extension quantkernels._C not available: {_native.REASON}", allow_module_level=True)

OP = torch.ops.quantkernels.quantize_int8_rowwise

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DTYPE_IDS = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
# K around the 8-lane AVX2 and 16-lane AVX-512 widths and their tails; M odd and around the
# parallel grain.
KS = (1, 3, 7, 8, 9, 15, 17, 31, 33, 65, 4095, 4096)
MS = (0, 1, 3, 17, 67)
SHAPES = list(itertools.product(MS, KS))


@pytest.fixture
def threads():
    """Restores torch's thread count after a test that changes it."""
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def _randn(shape, dtype, seed=0):
    """Gaussian data with a large dynamic range: per-row and per-element powers of two
    (kept inside fp16's range so no Inf appears by accident)."""
    g = torch.Generator().manual_seed(seed)
    span = 6 if dtype == torch.float16 else 40
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    row = torch.randint(-span, span + 1, (*shape[:-1], 1), generator=g).double() if len(shape) else 0
    elem = torch.randint(-4, 5, shape, generator=g).double()
    return (x * torch.exp2(row + elem)).to(dtype)


def _assert_same(got, want):
    gq, gs = got
    wq, ws = want
    assert gq.dtype == torch.int8 and gq.shape == wq.shape and gq.is_contiguous()
    assert gs.dtype == torch.float32 and gs.shape == ws.shape
    assert torch.equal(gq, wq), f"q differs at {(gq != wq).nonzero()[:8].tolist()}"
    assert torch.equal(gs.isnan(), ws.isnan()), "NaN scales differ"
    # nan_to_num maps NaN / +-Inf the same way on both sides; finite values compare exactly.
    assert torch.equal(gs.nan_to_num(), ws.nan_to_num()), f"scale differs at {(gs != ws).nonzero()[:8].tolist()}"


def _check(x):
    got = OP(x)
    _assert_same(got, R.quantize_int8_rowwise(x))
    return got


def test_cpu_kernel_is_registered():
    assert _native.has_kernel("quantize_int8_rowwise", "CPU")
    assert _native.has_kernel("quantize_int8_rowwise", "CompositeExplicitAutograd")
    # An op without a C++ CPU kernel only has the reference.
    assert not _native.has_kernel("pack_int4", "CPU")
    assert not _native.has_kernel("no_such_op", "CPU")


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("M,K", SHAPES, ids=[f"M{m}-K{k}" for m, k in SHAPES])
def test_matches_reference(isa, M, K, dtype):
    x = _randn((M, K), dtype, seed=M * 10007 + K)
    q, scale = _check(x)
    if M:
        assert q.abs().amax(dim=-1).eq(127).all(), "every row's absmax element must map to +-127"


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("layout", ["transposed", "strided", "sliced", "3d", "3d_permuted", "expanded", "1d", "empty_3d"])
def test_layouts(isa, layout, dtype):
    K = 37
    if layout == "transposed":
        x = _randn((K, 19), dtype).t()
    elif layout == "strided":
        x = _randn((19, 2 * K), dtype)[:, ::2]
    elif layout == "sliced":
        x = _randn((24, K + 9), dtype)[2:-3, 4:-5]
    elif layout == "3d":
        x = _randn((2, 5, K), dtype)
    elif layout == "3d_permuted":
        x = _randn((K, 3, 4), dtype).permute(1, 2, 0)
    elif layout == "expanded":
        x = _randn((1, K), dtype).expand(6, K)
    elif layout == "1d":
        x = _randn((K,), dtype)
    else:
        x = _randn((2, 0, K), dtype)
    q, scale = _check(x)
    assert q.shape == x.shape and scale.shape == x.shape[:-1]


def _special_rows(K, dtype):
    """Rows that exercise every branch of the reference, with the special value at the
    front, in the 8-wide body and in the scalar tail."""
    base = _randn((1, K), torch.float32, seed=K)[0]
    rows = [base.clone()]
    rows.append(torch.zeros(K))                                 # absmax 0 -> scale 1, q 0
    rows.append(torch.full((K,), -0.0))                         # -0.0 is also absmax 0
    for pos in {0, K // 2, K - 1}:
        for v in (float("nan"), float("inf"), float("-inf")):
            r = base.clone()
            r[pos] = v
            rows.append(r)
    r = base.clone()
    r[0], r[-1] = float("inf"), float("nan")                     # Inf and NaN: NaN wins
    rows.append(r)
    rows.append(torch.full((K,), float("inf")))
    # Exact ties: absmax 127 gives inv = 1, so x * inv lands on .5 and must round to even.
    ties = torch.tensor([127.0, 0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 126.5, -126.5, 3.5, 4.5, -127.0])
    rows.append(ties.repeat(K // ties.numel() + 1)[:K] if K > 1 else torch.tensor([127.0]))
    # absmax 63.5 gives inv = 2: ties at x = 0.25, 0.75, ...
    t2 = torch.tensor([63.5, 0.25, 0.75, -0.25, -0.75, 1.25, 62.25])
    rows.append(t2.repeat(K // t2.numel() + 1)[:K] if K > 1 else torch.tensor([63.5]))
    # Tiny absmax: 127 / absmax overflows to Inf (x * Inf = +-Inf -> +-127, 0 * Inf = NaN -> 0);
    # subnormal values exercise the no-flush-to-zero path.
    rows.append(torch.tensor([1e-40, -3e-41, 0.0, 1e-45] * (K // 4 + 1))[:K])
    rows.append(torch.tensor([1e-37, -5e-38, 0.0, 2e-39] * (K // 4 + 1))[:K])
    rows.append(base * 1e30)
    rows.append(torch.full((K,), 3.0e38))
    return torch.stack(rows).to(dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("K", (1, 7, 8, 9, 33, 4095))
def test_special_values(isa, K, dtype):
    x = _special_rows(K, dtype)
    q, scale = _check(x)
    assert scale[1] == 1 and q[1].eq(0).all()  # the all-zero row


def test_special_values_spelled_out(isa):
    x = torch.tensor([[0.0, 0.0, 0.0],
                      [1.0, float("nan"), -2.0],
                      [1.0, float("inf"), -2.0],
                      [127.0, 0.5, 1.5],
                      [127.0, 2.5, -2.5]])
    q, scale = _check(x)
    assert q.tolist() == [[0, 0, 0], [0, 0, 0], [0, 0, 0], [127, 0, 2], [127, 2, -2]]
    assert scale[0] == 1 and scale[1].isnan() and scale[2] == float("inf") and scale[3] == 1 and scale[4] == 1


@pytest.mark.parametrize("nthreads", (1, 2))
@pytest.mark.parametrize("M,K", [(67, 4096), (4096, 33), (1000, 257)])
def test_threads(isa, threads, nthreads, M, K):
    torch.set_num_threads(nthreads)
    x = _randn((M, K), torch.float32, seed=nthreads)
    x[5, 3] = float("nan")
    x[M - 1] = 0
    _check(x)
    _check(x.to(torch.bfloat16))


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
def test_opcheck(isa, dtype):
    for shape in ((5, 33), (2, 3, 8), (0, 7)):
        torch.library.opcheck(OP.default, (_randn(shape, dtype),))


@pytest.mark.parametrize("dtype", [torch.int32, torch.float64, torch.int8])
def test_bad_dtype(isa, dtype):
    x = torch.zeros(3, 8, dtype=dtype)
    with pytest.raises(TypeError, match=rf"\bx\b.*{dtype}") as native:
        OP(x)
    with pytest.raises(TypeError) as ref:
        R.quantize_int8_rowwise(x)
    assert str(native.value) == str(ref.value)


@pytest.mark.parametrize("x", [torch.tensor(1.0), torch.zeros(3, 0), torch.zeros(0)], ids=["0d", "K0", "1d_K0"])
def test_bad_shape(isa, x):
    with pytest.raises(ValueError, match=r"\bx\b") as native:
        OP(x)
    with pytest.raises(ValueError) as ref:
        R.quantize_int8_rowwise(x)
    assert str(native.value) == str(ref.value)


def test_bad_isa_value(monkeypatch):
    monkeypatch.setenv("QUANTKERNELS_CPU_ISA", "sse9")
    with pytest.raises(RuntimeError, match="QUANTKERNELS_CPU_ISA.*sse9"):
        OP(torch.ones(2, 8))
    with pytest.raises(RuntimeError, match="QUANTKERNELS_CPU_ISA"):
        _native.cpu_isa()


def test_auto_isa(monkeypatch):
    levels = _native.cpu_isa_levels()
    assert levels[0] == "portable" and all(lv in _native.ISA_LEVELS for lv in levels)
    assert ("avx2" in levels) == _native.cpu_has_avx2()
    monkeypatch.delenv("QUANTKERNELS_CPU_ISA", raising=False)
    assert _native.cpu_isa() == levels[-1]
    monkeypatch.setenv("QUANTKERNELS_CPU_ISA", "auto")
    assert _native.cpu_isa() == levels[-1]


def test_isa_levels_match_proc_cpuinfo():
    """The CPUID reading agrees with the kernel's view of this CPU (/proc/cpuinfo flags)."""
    import pathlib
    info = pathlib.Path("/proc/cpuinfo")
    if not info.exists():
        pytest.skip("no /proc/cpuinfo on this OS")
    flags = set()
    for line in info.read_text().splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            break
    avx512 = {"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= flags
    expect = {"avx2": {"avx2", "fma", "f16c"} <= flags}
    expect["avx_vnni"] = expect["avx2"] and "avx_vnni" in flags
    expect["avx512"] = expect["avx2"] and avx512
    expect["avx512_vnni"] = expect["avx512"] and "avx512_vnni" in flags
    expect["avx512_bf16"] = expect["avx512_vnni"] and "avx512_bf16" in flags
    levels = set(_native.cpu_isa_levels())
    for level, want in expect.items():
        assert (level in levels) == want, (level, sorted(levels))


@pytest.mark.parametrize("level", [lv for lv in _native.ISA_LEVELS if lv not in _native.cpu_isa_levels()])
def test_unsupported_level_is_a_clear_error(monkeypatch, level):
    monkeypatch.setenv("QUANTKERNELS_CPU_ISA", level)
    with pytest.raises(RuntimeError, match=f"QUANTKERNELS_CPU_ISA={level} but this CPU"):
        OP(torch.ones(2, 8))


@pytest.mark.skipif(_native.cpu_has_avx2(), reason="needs a CPU without AVX2 to see the error")
def test_avx2_forced_without_avx2(monkeypatch):
    monkeypatch.setenv("QUANTKERNELS_CPU_ISA", "avx2")
    with pytest.raises(RuntimeError, match="AVX2"):
        OP(torch.ones(2, 8))


def test_missing_extension_warns_once_and_falls_back():
    """Without _C (simulated by blocking the import), load() warns once, never raises, and
    the op still runs the reference."""
    import subprocess
    import sys

    code = (
        "import sys, warnings\n"
        "sys.modules['quantkernels._C'] = None\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    import quantkernels._ops\n"
        "    from quantkernels import _native\n"
        "    _native.load(); _native.load()\n"
        "msgs = [str(m.message) for m in w if 'native extension quantkernels._C' in str(m.message)]\n"
        "import torch\n"
        "q, s = torch.ops.quantkernels.quantize_int8_rowwise(torch.tensor([[127.0, 2.5]]))\n"
        "print(len(msgs), _native.AVAILABLE, _native.has_kernel('quantize_int8_rowwise', 'CPU'), q.tolist())\n"
        "print(_native.REASON)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    first, reason = out.splitlines()[:2]
    assert first == "1 False False [[127, 2]]", out
    assert "ImportError" in reason or "ModuleNotFoundError" in reason, out


@pytest.mark.skipif(not sys.platform.startswith("linux") or "OpenMP" not in torch.__config__.parallel_info(),
                    reason="torch without OpenMP, or not Linux")
def test_extension_is_built_with_torchs_openmp():
    # at::parallel_for compiles its `#pragma omp parallel` into our objects: without -fopenmp every
    # kernel runs on one thread whatever torch.set_num_threads says (it did, until this test).
    import quantkernels._C as ext

    blob = open(ext.__file__, "rb").read()
    assert b"GOMP_parallel" in blob and b"libgomp.so.1" in blob, "quantkernels._C was built without -fopenmp"
    # ... and it shares torch's OpenMP runtime (one libgomp in the process), so set_num_threads applies.
    loaded = {line.split()[-1] for line in open("/proc/self/maps") if "libgomp" in line}
    assert len(loaded) == 1, f"more than one OpenMP runtime loaded: {sorted(loaded)}"
