"""Property-based fuzzing of every op (hypothesis): the generators, the checks and the profiles,
shared by tests/test_fuzz.py (the reference and the C++ CPU kernels at every ISA level) and
tests/test_fuzz_triton.py (the Triton interpreter, a process of its own).

Each case is drawn by hypothesis as *structure* -- shapes (M = 0 and 1, K and N tails, K at the
int32 bound), dtype, layout (contiguous, transposed, strided, offset views, 3-D), group size,
threshold, and which rows are hostile (all-zero, exact rounding ties, subnormal, near the float
limits, NaN, +-Inf) -- plus a seed from which the bulk values come (torch.Generator), so a case
costs milliseconds and still shrinks to a small reproducer.

A backend's output is checked
- against the reference (``quantkernels.reference``): integers, masks and scales bit-exact,
  non-finite outputs in the same places with the same class (NaN / +Inf / -Inf), and
- against ``tests/_spec.py`` (numpy, written from docs/numerics.md): integers exact, float outputs
  within docs/numerics.md section 6 wherever the float64 result is finite; where it is not (a NaN
  or Inf input), the output follows the NaN/Inf policy of docs/numerics.md s.5b.

Profiles (``HYPOTHESIS_PROFILE``): ``ci`` (the default, what ``make test`` runs: derandomized,
a fixed number of cases per test, no example database, so every run is the same) and ``fuzz``
(``make fuzz``: random seeds, many more cases, failures saved in .hypothesis/ and replayed first).
"""

from __future__ import annotations

import os
from typing import Callable

import numpy as np
import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

import _spec as S

_COMMON = dict(deadline=None, print_blob=True,
               suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                      HealthCheck.data_too_large, HealthCheck.filter_too_much])
settings.register_profile("ci", max_examples=150, derandomize=True, database=None, **_COMMON)
settings.register_profile("fuzz", max_examples=int(os.environ.get("QK_FUZZ_EXAMPLES", "3000")), **_COMMON)
PROFILE = os.environ.get("HYPOTHESIS_PROFILE", "ci")
settings.load_profile(PROFILE)


def fuzz_settings(weight: float = 1.0):
    """@settings for one property: the profile's case count times ``weight``."""
    return settings(max_examples=max(1, int(settings.default.max_examples * weight)))


#: Cases run in this process, per test file (printed at the end of the session by conftest).
CASES = {"n": 0}


def count_case():
    CASES["n"] += 1


FLOATS = (torch.float32, torch.float16, torch.bfloat16)
FINFO_MAX = {dt: float(torch.finfo(dt).max) for dt in FLOATS}
FINFO_TINY = {dt: float(torch.finfo(dt).smallest_normal) for dt in FLOATS}
GROUPS = (32, 64, 128, 256)
MAX_K_INT8 = 131_071

T = torch.ops.quantkernels


# --------------------------------------------------------------------------- generators

#: Row kinds. "normal" rows are N(0, 1) times a drawn power of ten; the rest are hostile.
ROW_KINDS = ("normal", "normal", "normal", "zero", "tie", "subnormal", "huge", "nan", "inf", "ninf", "mixed")
#: Hostile kinds that make a GEMM's float64 result non-finite or overflow-prone.
NONFINITE = ("nan", "inf", "ninf", "mixed")


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _ties(n: int, g: torch.Generator, peak: float) -> torch.Tensor:
    """A row whose values sit exactly half-way between two codes: |max| = peak (so the quantizer's
    step is 1) and the rest k + 0.5 below it (exact in every float dtype for peak <= 127)."""
    k = torch.randint(-int(peak), int(peak), (n,), generator=g).float() + 0.5
    k = k.clamp(-peak + 0.5, peak - 0.5)
    if n:
        k[torch.randint(0, n, (1,), generator=g)] = peak if torch.rand(1, generator=g) < 0.5 else -peak
    return k


def float_rows(shape, dtype: torch.dtype, kinds, seed: int, exp: int = 0, tie_peak: float = 127.0,
               flush_bf16_subnormals: bool = False) -> torch.Tensor:
    """A float tensor [..., K] whose rows (flattened leading dims) follow ``kinds`` (cycled).

    ``exp``: the normal rows are N(0, 1) * 10**exp. Values are built in fp32 and cast once to
    ``dtype`` (a fp32 value beyond fp16's range becomes +-Inf there, as a cast does)."""
    g = gen(seed)
    K = shape[-1]
    rows = int(np.prod(shape[:-1])) if len(shape) > 1 else 1
    x = torch.randn(rows, K, generator=g) * (10.0 ** exp)
    big, tiny = FINFO_MAX[dtype], FINFO_TINY[dtype]
    for r in range(rows):
        kind = kinds[r % len(kinds)] if kinds else "normal"
        if kind == "zero":
            x[r] = 0.0
        elif kind == "tie":
            x[r] = _ties(K, g, tie_peak)
        elif kind == "subnormal" and not (flush_bf16_subnormals and dtype == torch.bfloat16):
            # a few subnormal ulps of the input dtype (fp32 subnormals for bf16 too)
            sub = 1e-45 if dtype != torch.float16 else 6e-8
            x[r] = torch.randint(-40, 41, (K,), generator=g).float() * sub
        elif kind == "huge":
            x[r] = torch.rand(K, generator=g) * 2 - 1
            x[r] *= big
            x[r, int(torch.randint(0, K, (1,), generator=g))] = big if r % 2 else -big
        elif kind in ("nan", "inf", "ninf"):
            v = {"nan": float("nan"), "inf": float("inf"), "ninf": float("-inf")}[kind]
            x[r, int(torch.randint(0, K, (1,), generator=g))] = v
        elif kind == "mixed":
            j = torch.randint(0, K, (3,), generator=g)
            sub = tiny if flush_bf16_subnormals and dtype == torch.bfloat16 else tiny / 2
            x[r, j[0]], x[r, j[1]], x[r, j[2]] = float("nan"), float("inf"), sub
    return x.to(dtype).reshape(shape)


def layout(t: torch.Tensor, how: str) -> torch.Tensor:
    """The same values as ``t`` (2-D or more) in another memory layout."""
    if how == "contig" or t.dim() < 2:
        return t
    if how == "transposed":     # column-major storage, a view with strides (1, rows)
        return t.transpose(-1, -2).contiguous().transpose(-1, -2)
    if how == "strided":        # every other column of a wider buffer
        wide = torch.zeros(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype)
        wide[..., ::2] = t
        return wide[..., ::2]
    if how == "offset":         # a view starting 3 elements into its storage, rows padded by 5
        rows, K = int(np.prod(t.shape[:-1])), t.shape[-1]
        buf = torch.full((3 + rows * (K + 5),), 77, dtype=t.dtype)
        v = buf.as_strided((rows, K), (K + 5, 1), 3)
        v.copy_(t.reshape(rows, K))
        return _nd(v, t.shape)
    raise ValueError(how)


def layout_any(t: torch.Tensor, how: str) -> torch.Tensor:
    """``layout`` for tensors of any rank: a 1-D tensor is 'strided' as every other element of a
    wider buffer and 'offset' as a view 3 elements into its storage ('transposed' leaves it)."""
    if t.dim() != 1 or how in ("contig", "transposed"):
        return layout(t, how)
    if how == "strided":
        wide = torch.zeros(2 * t.shape[0], dtype=t.dtype)
        wide[::2] = t
        return wide[::2]
    if how == "offset":
        buf = torch.full((3 + t.shape[0],), 77, dtype=t.dtype)
        buf[3:] = t
        return buf[3:]
    raise ValueError(how)


def relayout_args(draw, args, first: int = 2) -> tuple:
    """``args`` with every tensor from position ``first`` on (scales, zero points, bias) in a drawn
    memory layout: the kernels must not assume them contiguous or aligned."""
    return tuple(layout_any(a, draw(st.sampled_from(LAYOUTS))) if isinstance(a, torch.Tensor) and i >= first else a
                 for i, a in enumerate(args))


@st.composite
def relayout(draw, case, first: int = 2):
    """The drawn ``case`` (a tuple of GEMM arguments) through ``relayout_args``."""
    return relayout_args(draw, draw(case), first)


def _nd(v: torch.Tensor, shape) -> torch.Tensor:
    # [rows, K] padded view -> [..., K] without copying (the leading dims split the row stride)
    strides, s = [], v.stride(0)
    for d in reversed(shape[:-1]):
        strides.insert(0, s)
        s *= d
    return v.as_strided(tuple(shape), tuple(strides) + (1,), v.storage_offset())


LAYOUTS = ("contig", "transposed", "strided", "offset")


def int8_tensor(shape, seed: int, minus128: bool) -> torch.Tensor:
    """Uniform int8 in [-127, 127]; with ``minus128`` a quarter of the values are -128 (and a
    row of only -128 where there is more than one row)."""
    g = gen(seed)
    t = torch.randint(-127, 128, shape, generator=g, dtype=torch.int8)
    if minus128 and t.numel():
        t[torch.rand(shape, generator=g) < 0.25] = -128
        if t.dim():
            t[0] = -128
    return t


def log_uniform(n, seed: int, lo_exp: float, hi_exp: float) -> torch.Tensor:
    g = gen(seed)
    return (10.0 ** (torch.rand(n, generator=g, dtype=torch.float64) * (hi_exp - lo_exp) + lo_exp)).float()


@st.composite
def dims(draw, m_max=40, n_max=40, k_max=300, even_k=False):
    """(M, N, K): M often 0 or 1, N and K with tails (not multiples of any tile)."""
    M = draw(st.one_of(st.sampled_from([0, 1, 2, 3, 4, 5]), st.integers(0, m_max)))
    N = draw(st.one_of(st.sampled_from([1, 2, 3, 15, 16, 17]), st.integers(1, n_max)))
    K = draw(st.one_of(st.sampled_from([1, 2, 7, 8, 31, 32, 33, 63, 64, 65, 127, 129]), st.integers(1, k_max)))
    if even_k:
        K += K % 2
    return M, N, K


def near_bound_dims():
    """(M, N, K) with K within 40 of the int32 bound of the int8 GEMMs (131,071), M <= 2, N <= 3."""
    return st.tuples(st.integers(0, 2), st.integers(1, 3), st.integers(MAX_K_INT8 - 40, MAX_K_INT8))


kinds_st = st.lists(st.sampled_from(ROW_KINDS), min_size=1, max_size=6)
dtype_st = st.sampled_from(FLOATS)
seed_st = st.integers(0, 2**31 - 1)
exp_st = st.integers(-4, 3)


# --------------------------------------------------------------------------- checks


def nonfinite_class(t: np.ndarray) -> np.ndarray:
    """0 finite, 1 NaN, 2 +Inf, 3 -Inf."""
    t = np.asarray(t, np.float64)
    return np.where(np.isnan(t), 1, np.where(t == np.inf, 2, np.where(t == -np.inf, 3, 0)))


def assert_bitwise(got: torch.Tensor, ref: torch.Tensor, what: str):
    """Same dtype, shape and values (NaN equal to NaN; +0 and -0 equal)."""
    assert got.dtype == ref.dtype, f"{what}: dtype {got.dtype}, reference {ref.dtype}"
    assert got.shape == ref.shape, f"{what}: shape {tuple(got.shape)}, reference {tuple(ref.shape)}"
    if got.dtype.is_floating_point:
        same = (got == ref) | (got.isnan() & ref.isnan())
    else:
        same = got == ref
    if not bool(same.all()):
        i = tuple(int(j) for j in (~same).nonzero()[0])
        raise AssertionError(f"{what}: {int((~same).sum())}/{same.numel()} differ from the reference; "
                             f"first at {i}: got {got[i].item()!r}, reference {ref[i].item()!r}")


def assert_same_nonfinite(got: torch.Tensor, ref: torch.Tensor, what: str, exact_class: bool = True):
    """NaN where the reference has NaN, the same-signed Inf where it has Inf, finite elsewhere.
    ``exact_class=False`` (the weight-only GEMMs, docs/numerics.md s.5b): NaN may stand for an
    Inf of the reference (an Inf activation times a subnormal bf16 weight read as zero)."""
    g, r = nonfinite_class(S.f64(got)), nonfinite_class(S.f64(ref))
    if not exact_class:
        g = np.where((g == 1) & (r >= 2), r, g)
    bad = g != r
    if bad.any():
        i = tuple(np.argwhere(bad)[0])
        names = ("finite", "NaN", "+Inf", "-Inf")
        raise AssertionError(f"{what}: non-finite pattern differs from the reference at {int(bad.sum())} "
                             f"elements; first at {i}: got {names[g[i]]} ({S.f64(got)[i]!r}), "
                             f"reference {names[r[i]]} ({S.f64(ref)[i]!r})")


def assert_output(got: torch.Tensor, exact: np.ndarray, mag: np.ndarray, dtype: torch.dtype, what: str,
                  terms: int):
    """docs/numerics.md s.6 on the elements whose float64 result is finite (and representable in
    ``dtype``); the rest must be non-finite in ``got`` too (their class is checked against the
    reference by assert_same_nonfinite)."""
    assert got.dtype == dtype, f"{what}: dtype {got.dtype}, expected {dtype}"
    exact, mag = np.asarray(exact, np.float64), np.asarray(mag, np.float64)
    assert tuple(got.shape) == exact.shape, f"{what}: shape {tuple(got.shape)} != {exact.shape}"
    with np.errstate(all="ignore"):
        fin = np.isfinite(exact) & np.isfinite(mag) & (np.abs(exact) <= FINFO_MAX[dtype] * 0.99)
    if fin.all():
        if got.numel():
            S.assert_float_output(got, exact, mag, dtype, what, terms)
        return
    g = S.f64(got)
    notfin = ~np.isfinite(exact)
    assert not np.isfinite(g[notfin]).any(), (
        f"{what}: finite output where the exact result is not: got {g[notfin][np.isfinite(g[notfin])][:4]}")
    if fin.any():
        # the finite part, as a 1-D selection (the norm-wise check then covers only those)
        sel = torch.from_numpy(fin)
        S.assert_float_output(got[sel], exact[fin], mag[fin], dtype, what + " (finite elements)", terms)


def call(fn: Callable, *args, **kw):
    count_case()
    return fn(*args, **kw)


# --------------------------------------------------------------------------- per-op properties
# Each takes ``fn`` (the backend's callable: a reference function, torch.ops.quantkernels.<op>
# or the Triton op), ``check_ref`` (compare with the reference: False when fn *is* the reference)
# and the drawn case, and checks everything the contract says about it.


def _bitwise_vs_reference(check_ref: bool, got, op: str, args, names):
    """Every output of ``op`` bit-identical to the reference's (the quantizers, s.1 - s.5)."""
    if check_ref:
        from quantkernels import reference as R
        for g, r, what in zip(got, getattr(R, op)(*args), names):
            assert_bitwise(g, r, what)


def prop_quantize_rowwise(fn, check_ref: bool, x: torch.Tensor):
    q, s = call(fn, x)
    _bitwise_vs_reference(check_ref, (q, s), "quantize_int8_rowwise", (x,), ("q", "scale"))
    qs, ss = S.int8_absmax(S.f32(x))
    S.assert_int_equal(q, qs, "q vs spec")
    S.assert_scale(s, ss, "scale vs spec")
    _nonfinite_rows_policy(x, q, s)


def _nonfinite_rows_policy(x, q, s):
    """s.5b: a row with NaN/Inf quantizes to q = 0 with a NaN (any NaN) or +Inf scale."""
    xf = S.f32(x).reshape(-1, x.shape[-1]) if x.dim() else S.f32(x).reshape(1, -1)
    qn, sn = S.i64(q).reshape(xf.shape), S.f64(s).reshape(-1)
    bad = ~np.isfinite(xf).all(axis=-1)
    if bad.any():
        assert (qn[bad] == 0).all(), "a row holding NaN/Inf must quantize to q = 0"
        has_nan = np.isnan(xf).any(axis=-1)
        assert np.isnan(sn[bad & has_nan]).all(), "a row holding NaN must get a NaN scale"
        assert (sn[bad & ~has_nan] == np.inf).all(), "a row holding +-Inf (no NaN) must get scale +Inf"


def prop_quantize_tensor(fn, check_ref: bool, x: torch.Tensor):
    q, s = call(fn, x)
    _bitwise_vs_reference(check_ref, (q, s), "quantize_int8_tensor", (x,), ("q", "scale"))
    qs, ss = S.int8_absmax(S.f32(x), per_tensor=True)
    S.assert_int_equal(q, qs, "q vs spec")
    S.assert_scale(s, np.asarray(ss, np.float32), "scale vs spec")


def prop_outliers(fn, check_ref: bool, x: torch.Tensor, threshold: float):
    q, s, o = call(fn, x, threshold)
    _bitwise_vs_reference(check_ref, (q, s, o), "quantize_int8_rowwise_outliers", (x, threshold),
                          ("q", "scale", "outliers"))
    qs, ss, ms = S.int8_outliers(S.f32(x), threshold)
    S.assert_int_equal(o, ms, "outliers vs spec")
    S.assert_int_equal(q, qs, "q vs spec")
    S.assert_scale(s, ss, "scale vs spec")


def prop_quantize_asym(fn, check_ref: bool, x: torch.Tensor):
    q, s, z = call(fn, x)
    _bitwise_vs_reference(check_ref, (q, s, z), "quantize_int8_asym", (x,), ("q", "scale", "zero"))
    xf = S.f32(x).reshape(-1, x.shape[-1])
    fin = np.isfinite(xf).all(axis=-1)
    qn, sn, zn = S.i64(q).reshape(xf.shape), S.f64(s).reshape(-1), S.i64(z).reshape(-1)
    with np.errstate(all="ignore"):
        ss, _ = S.asym_scale(xf, -128, 127)
    S.assert_scale(torch.from_numpy(sn[fin].astype(np.float32)), ss[fin], "scale vs spec")
    qs, zs = S.asym_quant(xf[fin], sn[fin].astype(np.float32), -128, 127)
    assert (qn[fin] == qs).all() and (zn[fin] == zs).all(), "q / zero vs spec"
    # s.5b: NaN codes become 0, the scale becomes Inf or NaN
    assert not np.isfinite(sn[~fin]).any(), "a row holding NaN/Inf must get a non-finite scale"
    assert ((qn >= -128) & (qn <= 127)).all()


def prop_dequantize_int8(fn, q, scale, zero, out_dtype):
    y = call(fn, q, scale, zero, out_dtype)
    dt = out_dtype or torch.float32
    qn = S.i64(q).astype(np.float32)
    sn = S.f32(scale)
    if zero is not None:
        qn = (S.i64(q) - (S.i64(zero)[..., None] if zero.dim() else S.i64(zero))).astype(np.float32)
    exp = (qn * (sn[..., None] if scale.dim() else sn)).astype(np.float32)
    want = torch.from_numpy(np.ascontiguousarray(exp)).to(dt)
    assert_bitwise(y, want, "dequantize_int8 vs fp32(q * scale) cast once")


def prop_pack(fn_pack, fn_unpack, q: torch.Tensor):
    p = call(fn_pack, q)
    S.assert_int_equal(p, S.pack(S.i64(q)), "pack vs spec")
    u = call(fn_unpack, p, q.dtype == torch.int8)
    assert_bitwise(u, q.contiguous(), "unpack(pack(q))")


def prop_int4_quantizer(fn, w: torch.Tensor, G: int, asym: bool):
    out = call(fn, w, G)
    N, K = w.shape
    Ge = K if G == -1 else G
    wf = S.f32(w)
    fin_g = np.isfinite(S.groups(wf, Ge)).all(axis=-1)           # [N, ng]
    if asym:
        packed, s, z = out
        q = S.unpack(S.i64(packed), signed=False)
        with np.errstate(all="ignore"):
            qs, ss, zs = S.uint4_asym(wf, Ge, scale=S.f32(s))
        S.assert_scale(torch.from_numpy(S.f32(s)[fin_g]), ss[fin_g], "scale vs spec")
        assert (S.i64(z)[fin_g] == zs[fin_g]).all(), "zero vs spec"
        assert ((S.i64(z) >= 0) & (S.i64(z) <= 15)).all()
    else:
        packed, s = out
        q = S.unpack(S.i64(packed), signed=True)
        with np.errstate(all="ignore"):
            ss = S.int4_sym_scale(wf, Ge)
            qs = S.int4_sym_quant(wf, S.f32(s), Ge)
        S.assert_scale(torch.from_numpy(S.f32(s)[fin_g]), ss[fin_g], "scale vs spec")
    qg = q.reshape(N, K // Ge, Ge)
    assert (qg[fin_g] == qs.reshape(N, K // Ge, Ge)[fin_g]).all(), "q vs spec"
    if (~fin_g).any():
        assert not np.isfinite(S.f64(s)[~fin_g]).any(), "a group holding NaN/Inf must get a non-finite scale"


def prop_dequantize_int4(fn, packed, scale, zero, out_dtype):
    y = call(fn, packed, scale, zero, out_dtype)
    q = S.unpack(S.i64(packed), signed=zero is None)
    exp = S.dequant_int4_f32(q, S.f32(scale), None if zero is None else S.i64(zero))
    want = torch.from_numpy(exp).to(out_dtype or torch.float32)
    assert_bitwise(y, want, "dequantize_int4 vs fp32((q - zero) * scale) cast once")


def prop_int8_gemm(fn, check_ref: bool, a, b):
    c = call(fn, a, b)
    assert c.dtype == torch.int32
    S.assert_int_equal(c, S.int_gemm(S.i64(a), S.i64(b)), "int8_gemm vs exact int64")


def _ref_compare(check_ref: bool, y, ref_fn, args, what, exact_class=True):
    if check_ref:
        yr = ref_fn(*args)
        assert y.dtype == yr.dtype and y.shape == yr.shape, (y.dtype, yr.dtype, y.shape, yr.shape)
        assert_same_nonfinite(y, yr, what, exact_class)


def prop_w8a8(fn, check_ref: bool, a, b, sa, sb, bias, out_dtype):
    from quantkernels import reference as R
    y = call(fn, a, b, sa, sb, bias, out_dtype)
    _ref_compare(check_ref, y, R.w8a8_gemm, (a, b, sa, sb, bias, out_dtype), "w8a8_gemm")
    with np.errstate(all="ignore"):
        exact, mag, _ = S.w8a8(S.i64(a), S.i64(b), S.f64(sa), S.f64(sb), None if bias is None else S.f64(bias))
    assert_output(y, exact, mag, out_dtype or torch.float32, "w8a8_gemm", 4)


def prop_w4a8(fn, check_ref: bool, a, packed, sa, sb, zero, bias, out_dtype):
    from quantkernels import reference as R
    y = call(fn, a, packed, sa, sb, zero, bias, out_dtype)
    _ref_compare(check_ref, y, R.w4a8_gemm, (a, packed, sa, sb, zero, bias, out_dtype), "w4a8_gemm")
    q = S.unpack(S.i64(packed), signed=zero is None)
    with np.errstate(all="ignore"):
        exact, mag = S.w4a8(S.i64(a), q, S.f64(sa), S.f64(sb), None if zero is None else S.i64(zero),
                            None if bias is None else S.f64(bias))
    assert_output(y, exact, mag, out_dtype or torch.float32, "w4a8_gemm", 2 * sb.shape[1] + 3)


def _weight_only_check(y, x, w_deq_f32: np.ndarray, bias, what):
    # the dequantized weight is rounded to x's dtype before any product (s.4)
    wx = S.f64(torch.from_numpy(w_deq_f32).to(x.dtype))
    with np.errstate(all="ignore"):
        exact, mag = S.weight_only(S.f64(x), wx, None if bias is None else S.f64(bias))
    assert_output(y, exact, mag, x.dtype, what, x.shape[1] + 2)


def prop_w8a16(fn, check_ref: bool, x, b, sb, bias):
    from quantkernels import reference as R
    y = call(fn, x, b, sb, bias)
    _ref_compare(check_ref, y, R.w8a16_gemm, (x, b, sb, bias), "w8a16_gemm", exact_class=False)
    w = (S.i64(b).astype(np.float32) * S.f32(sb)[:, None]).astype(np.float32)
    _weight_only_check(y, x, w, bias, "w8a16_gemm")


def prop_w4a16(fn, check_ref: bool, x, packed, sb, zero, bias):
    from quantkernels import reference as R
    y = call(fn, x, packed, sb, zero, bias)
    _ref_compare(check_ref, y, R.w4a16_gemm, (x, packed, sb, zero, bias), "w4a16_gemm", exact_class=False)
    q = S.unpack(S.i64(packed), signed=zero is None)
    w = S.dequant_int4_f32(q, S.f32(sb), None if zero is None else S.i64(zero))
    _weight_only_check(y, x, w, bias, "w4a16_gemm")


def prop_llm_int8(fn, check_ref: bool, x, b, sb, bias, threshold):
    from quantkernels import reference as R
    y = call(fn, x, b, sb, bias, threshold)
    _ref_compare(check_ref, y, R.llm_int8_linear, (x, b, sb, bias, threshold), "llm_int8_linear")
    with np.errstate(all="ignore"):
        exact, mag, _ = S.llm_int8(S.f32(x), S.i64(b), S.f64(sb), None if bias is None else S.f64(bias), threshold)
    assert_output(y, exact, mag, x.dtype, "llm_int8_linear", x.shape[1] + 4)


# --------------------------------------------------------------------------- case builders
# Build the arguments of each GEMM from a drawn structure (used by both test modules).


@st.composite
def w8a8_case(draw, near_bound=False, shape=None):
    M, N, K = draw(near_bound_dims() if near_bound else shape if shape is not None else dims())
    seed = draw(seed_st)
    a = layout(int8_tensor((M, K), seed, draw(st.booleans())), draw(st.sampled_from(LAYOUTS)))
    b = layout(int8_tensor((N, K), seed + 1, draw(st.booleans())), draw(st.sampled_from(LAYOUTS)))
    e = draw(st.integers(-10, -3))
    sa = log_uniform(M, seed + 2, e - 2, e) / max(1, K) ** 0.5
    sb = log_uniform(N, seed + 3, e - 2, e) / max(1, K) ** 0.5
    a, sa, bias, out_dtype = _int8_activation_extras(draw, a, sa, N, seed + 4, 0.1)
    return a, b, sa, sb, bias, out_dtype


@st.composite
def int8_gemm_case(draw, near_bound=False, shape=None):
    """(a, b) of int8_gemm: int8 [M, K] and [N, K], -128 included, in any layout; near the int32
    bound, sometimes all -128 (C = 2^14 K, just below 2^31)."""
    M, N, K = draw(near_bound_dims() if near_bound else shape if shape is not None else dims(k_max=400))
    seed = draw(seed_st)
    a = layout(int8_tensor((M, K), seed, draw(st.booleans())), draw(st.sampled_from(LAYOUTS)))
    b = layout(int8_tensor((N, K), seed + 1, draw(st.booleans())), draw(st.sampled_from(LAYOUTS)))
    if near_bound and draw(st.booleans()):
        a, b = torch.full_like(a, -128), torch.full_like(b, -128)
    return a, b


def _int8_activation_extras(draw, a, sa, N, seed, bias_scale):
    """Maybe a token row that held NaN / Inf (s.5b: q = 0, scale NaN or +Inf); the bias (none or
    fp16 / bf16 / fp32) and the out_dtype (None or a float dtype) of an int8-activation GEMM."""
    M = a.shape[0]
    if M and draw(st.booleans()):
        r = draw(st.integers(0, M - 1))
        a = a.clone()
        a[r] = 0
        sa[r] = draw(st.sampled_from([float("nan"), float("inf")]))
    out_dtype = draw(st.sampled_from((None,) + FLOATS))
    bias = draw(st.sampled_from((None,) + FLOATS))
    bias = None if bias is None else (torch.randn(N, generator=gen(seed)) * bias_scale).to(bias)
    return a, sa, bias, out_dtype


@st.composite
def group_k(draw, k_max_gk=600):
    """(K, G): G one of 32..256 with 1..5 groups, or G = K with K even."""
    if draw(st.booleans()):
        G = draw(st.sampled_from(GROUPS))
        return G * draw(st.integers(1, 5)), G
    K = 2 * draw(st.integers(1, k_max_gk // 2))
    return K, K


def int4_weight(N, K, G, seed, signed, zero_kind="random"):
    """packed uint8 [N, K/2] (random nibbles), scales [N, K/G], zero points in [0, 15] or None."""
    g = gen(seed)
    nib = torch.randint(0, 16, (N, K), generator=g, dtype=torch.uint8)
    packed = (nib[:, 0::2] | (nib[:, 1::2] << 4)).to(torch.uint8)
    scale = log_uniform((N, K // G), seed + 1, -4, -1)
    zero = None
    if not signed:
        zero = torch.randint(0, 16, (N, K // G), generator=g, dtype=torch.uint8)
        if zero_kind == "edges":
            zero = torch.where(torch.rand(zero.shape, generator=g) < 0.5, 0, 15).to(torch.uint8)
    return packed, scale, zero


@st.composite
def w4a8_case(draw, shape=None, k_max_gk=600):
    K, G = draw(group_k(k_max_gk))
    M, N, _ = draw(shape if shape is not None else dims())
    seed = draw(seed_st)
    signed = draw(st.booleans())
    packed, sb, zero = int4_weight(N, K, G, seed, signed, draw(st.sampled_from(["random", "edges"])))
    a = layout(int8_tensor((M, K), seed + 5, draw(st.booleans())), draw(st.sampled_from(LAYOUTS)))
    packed = layout(packed, draw(st.sampled_from(LAYOUTS)))
    sa = log_uniform(M, seed + 6, -6, -2)
    a, sa, bias, out_dtype = _int8_activation_extras(draw, a, sa, N, seed + 7, 1.0)
    return a, packed, sa, sb, zero, bias, out_dtype


def _activation_kinds(draw, finite_only=False):
    kinds = draw(kinds_st)
    # no "huge" rows in a GEMM: a finite overflow in the fp32 accumulation is order-dependent
    kinds = [k for k in kinds if k != "huge" and not (finite_only and k in NONFINITE)] or ["normal"]
    return kinds


@st.composite
def weight_only_case(draw, int4: bool, flush_bf16_subnormals=False, shape=None, k_max_gk=600, dtypes=FLOATS):
    dtype = draw(st.sampled_from(dtypes))
    if int4:
        K, G = draw(group_k(k_max_gk))
        M, N, _ = draw(shape if shape is not None else dims())
    else:
        M, N, K = draw(shape if shape is not None else dims())
    seed = draw(seed_st)
    x = float_rows((M, K), dtype, _activation_kinds(draw), seed, exp=draw(st.integers(-3, 1)),
                   tie_peak=7.0, flush_bf16_subnormals=flush_bf16_subnormals)
    x = layout(x, draw(st.sampled_from(LAYOUTS)))
    if int4:
        signed = draw(st.booleans())
        packed, sb, zero = int4_weight(N, K, G, seed, signed)
        w = (layout(packed, draw(st.sampled_from(LAYOUTS))), sb, zero)
    else:
        b = layout(int8_tensor((N, K), seed + 1, draw(st.booleans())), draw(st.sampled_from(LAYOUTS)))
        sb = log_uniform(N, seed + 2, -5, -2)
        if draw(st.integers(0, 9)) == 0:
            sb[0] = 1e-41                                     # a subnormal scale
        w = (b, sb)
    bias = draw(st.sampled_from((None,) + FLOATS))
    bias = None if bias is None else (torch.randn(N, generator=gen(seed + 3))).to(bias)
    return (x, *w, bias)


@st.composite
def llm_int8_case(draw, near_bound=False, flush_bf16_subnormals=False, shape=None):
    dtype = draw(dtype_st)
    M, N, K = draw(near_bound_dims() if near_bound else shape if shape is not None else dims())
    seed = draw(seed_st)
    x = float_rows((M, K), dtype, _activation_kinds(draw), seed, exp=draw(st.integers(-2, 0)),
                   flush_bf16_subnormals=flush_bf16_subnormals)
    # outlier columns: a few columns scaled up, and one value exactly at the threshold
    threshold = draw(st.sampled_from([6.0, 6.0, 0.0, -1.0, 0.5, 3.0, float("inf")]))
    if M and K and draw(st.booleans()):
        g = gen(seed + 9)
        cols = torch.randint(0, K, (min(3, K),), generator=g)
        x = x.float()
        x[:, cols] *= 20.0
        if 0 < threshold < float("inf"):
            x[int(torch.randint(0, M, (1,), generator=g)), int(cols[0])] = threshold
        x = x.to(dtype)
    x = layout(x, draw(st.sampled_from(LAYOUTS)))
    b = layout(int8_tensor((N, K), seed + 1, False), draw(st.sampled_from(LAYOUTS)))
    sb = log_uniform(N, seed + 2, -4, -2) / max(1, K) ** 0.5
    bias = draw(st.sampled_from((None,) + FLOATS))
    bias = None if bias is None else (torch.randn(N, generator=gen(seed + 3))).to(bias)
    return x, b, sb, bias, threshold


@st.composite
def quantize_input(draw, allow_3d=True, two_d=False, flush_bf16_subnormals=False, shape=None):
    dtype = draw(dtype_st)
    M, _, K = draw(shape if shape is not None else dims())
    shape = (M, K)
    if allow_3d and not two_d and draw(st.booleans()):
        shape = (draw(st.integers(0, 3)), M, K) if draw(st.booleans()) else (K,)
    seed = draw(seed_st)
    x = float_rows(shape, dtype, draw(kinds_st), seed, exp=draw(exp_st), flush_bf16_subnormals=flush_bf16_subnormals)
    return layout(x, draw(st.sampled_from(LAYOUTS)))


# --------------------------------------------------------------------------- NF4 / FP4 (docs/numerics.md s.11)

#: K for gemm_4bit (even): multiples of 32 and 64 (the C++ kernel's vector decode and its avx512
#: GEMV's 64-value steps) and their tails, or any even K
K_4BIT = st.one_of(st.sampled_from([2, 6, 30, 32, 34, 62, 64, 66, 96, 128, 130, 192, 256, 320]),
                   st.integers(1, 160).map(lambda h: 2 * h))


@st.composite
def dims_4bit(draw, m_max=40, n_max=40):
    """(M, N, K) for gemm_4bit: M across the GEMV (<= 8) and the 16-row panels with tails, N across
    the 4 x 4 register tiles with tails, K from K_4BIT."""
    M = draw(st.one_of(st.sampled_from([0, 1, 2, 3, 4, 5, 8, 9, 16, 17, 33]), st.integers(0, m_max)))
    N = draw(st.one_of(st.sampled_from([1, 2, 3, 4, 5, 15, 16, 17]), st.integers(1, n_max)))
    return M, N, draw(K_4BIT)


@st.composite
def gemm_4bit_case(draw, shape=None, flush_bf16_subnormals=False, blocksizes=GROUPS, nonfinite_weights=False,
                   stats_layouts=False, dtypes=FLOATS, k_mult=2):
    """A gemm_4bit case: the weight quantized by tests/_spec.py (blocks spanning rows whenever
    K % B != 0), plain or double-quantized absmax, activations with hostile rows, any layout of x
    and of the packed weight. ``nonfinite_weights``: sometimes a NaN or +-Inf weight (plain absmax
    only: the double quantization refuses them, s.11.5), which poisons its block (s.11.3).
    ``stats_layouts``: the absmax / nested absmax as strided or offset 1-D views too. ``shape`` draws
    (M, N, K); K is rounded up to a multiple of ``k_mult`` (2: the format's own rule).
    Returns (x, packed, (absmax, nested, offset), quant_type, blocksize, bias, dequantized float32 W)."""
    dtype = draw(st.sampled_from(dtypes))
    M, N, K = draw(shape if shape is not None else dims_4bit())
    K += -K % k_mult
    seed = draw(seed_st)
    x = float_rows((M, K), dtype, _activation_kinds(draw), seed, exp=draw(st.integers(-3, 1)),
                   tie_peak=7.0, flush_bf16_subnormals=flush_bf16_subnormals)
    x = layout(x, draw(st.sampled_from(LAYOUTS)))
    quant_type = draw(st.sampled_from(("nf4", "fp4")))
    blocksize = draw(st.sampled_from(blocksizes))
    w = (torch.randn(N, K, generator=gen(seed + 1)) * 10.0 ** draw(st.integers(-3, 1))).numpy()
    if draw(st.booleans()):
        w[draw(st.integers(0, N - 1))] = 0.0                  # a zero row: zero blocks decode to exact zeros
    dq = draw(st.booleans())
    if nonfinite_weights and not dq and draw(st.integers(0, 5)) == 0:
        w[draw(st.integers(0, N - 1)), draw(st.integers(0, K - 1))] = draw(
            st.sampled_from([float("nan"), float("inf"), float("-inf")]))
    with np.errstate(all="ignore"):
        nib, absmax = S.quant_4bit(w, quant_type, blocksize)
    # clone(): torch-allocated memory (the CUDA emulator's out-of-bounds check knows only that)
    packed = layout(torch.from_numpy(S.pack_4bit(nib)).clone(), draw(st.sampled_from(LAYOUTS)))
    absmax = torch.from_numpy(absmax).clone()
    if dq:
        from quantkernels import reference as R
        q, nested, offset = R.double_quantize_absmax(absmax)
        scale = S.undouble_quant(S.i64(q), S.f32(nested), S.f32(offset))
        stats = (q, nested, offset)
    else:
        scale, stats = absmax.numpy(), (absmax, None, None)
    if stats_layouts:
        how = draw(st.sampled_from(("contig", "strided", "offset")))  # 1-D: 'transposed' would be 'contig'
        stats = tuple(t if t is None or t.dim() != 1 else layout_any(t, how) for t in stats)
    bias = draw(st.sampled_from((None,) + FLOATS))
    bias = None if bias is None else torch.randn(N, generator=gen(seed + 3)).to(bias)
    with np.errstate(all="ignore"):
        w_deq = S.dequant_4bit(nib, scale, quant_type, blocksize)
    return x, packed, stats, quant_type, blocksize, bias, w_deq


def prop_gemm_4bit(fn, check_ref: bool, x, packed, stats, quant_type, blocksize, bias, w_deq):
    """gemm_4bit (s.11.6): a weight-only GEMM with the decoded weight rounded to x's dtype; against
    the reference the non-finite pattern matches (NaN may stand for +-Inf, s.5b)."""
    from quantkernels import reference as R
    absmax, nested, offset = stats
    args = (x, packed, absmax, quant_type, blocksize, nested, offset, bias)
    y = call(fn, *args)
    _ref_compare(check_ref, y, R.gemm_4bit, args, "gemm_4bit", exact_class=False)
    _weight_only_check(y, x, w_deq, bias, "gemm_4bit")
    return y
