"""An independent evaluation of docs/numerics.md, written from the spec text (not from reference.py).

Everything here is numpy: quantizers reproduce the contract's fp32 steps with numpy
float32 arithmetic (IEEE, one rounding per operation, ``np.round`` is half-to-even) so
that quantized integers can be compared *exactly*; integer GEMMs run in int64 (exact);
GEMM epilogues are evaluated in float64 from the int64 accumulators.

Float outputs are compared (docs/numerics.md s.6) against the float64 value of the formula,
together with its *magnitude*: the same formula evaluated with every term replaced by its
absolute value (|C| |sa| |sb| + |bias|, |X| @ |W|^T + |bias|, ...). An fp32 evaluation of
a sum of products has an error bounded by (a small multiple of) eps32 times that magnitude,
whatever the cancellation, so ``|got - exact| <= 1e-5 * magnitude`` elementwise is the
meaningful form of "fp32 relative error <= 1e-5": it cannot be met by a wrong element
(a misplaced term is a relative error of order 1 in the magnitude) and it does not demand
the impossible where the terms cancel (|exact| << magnitude). On top of it we require a
norm-wise relative error <= 1e-5. fp16/bf16 outputs must lie within the
``torch.testing.assert_close`` defaults of that dtype (one rounding) of the float64 result
rounded to the dtype, plus the same fp32 allowance for the epilogue before the cast.
"""

from __future__ import annotations

import numpy as np
import torch

F32 = np.float32

# --------------------------------------------------------------------------- conversions


def f32(t: torch.Tensor) -> np.ndarray:
    """Float tensor (fp16/bf16/fp32, any device/strides) -> numpy float32 (exact widening)."""
    return t.detach().to("cpu", torch.float32).numpy().copy()


def i64(t: torch.Tensor) -> np.ndarray:
    """Integer tensor -> numpy int64."""
    return t.detach().to("cpu", torch.int64).numpy().copy()


def f64(t: torch.Tensor) -> np.ndarray:
    return t.detach().to("cpu", torch.float64).numpy().copy()


def round_to(x: np.ndarray, dtype: torch.dtype) -> np.ndarray:
    """Round a float32/float64 array to ``dtype`` (round-half-even), returned as float64.

    bf16 rounding is done on the fp32 bit pattern (numpy has no bfloat16): add 0x7FFF plus
    the lowest kept bit, then truncate the low 16 bits. Inputs must be finite.
    """
    if dtype == torch.float32:
        return np.asarray(x, np.float32).astype(np.float64)
    if dtype == torch.float16:
        return np.asarray(x, np.float64).astype(np.float16).astype(np.float64)
    if dtype == torch.bfloat16:
        x32 = np.asarray(x, np.float32)
        assert np.isfinite(x32).all()
        bits = x32.view(np.uint32).astype(np.uint64)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        return bits.astype(np.uint32).view(np.float32).astype(np.float64)
    raise ValueError(dtype)


# --------------------------------------------------------------------------- s.1 symmetric int8


def int8_absmax(x: np.ndarray, per_tensor: bool = False):
    """docs/numerics.md s.1 in fp32: returns (q int64, scale float32) -- rows along the last axis.

    absmax (fp32, exact), inv = 127 / absmax (one fp32 division), q = rne(x * inv) (one fp32
    product), clamp to [-127, 127]; scale = absmax / 127 (one fp32 division). absmax == 0:
    scale 1, q 0. Documented extension: a row holding NaN/Inf gets q = 0 and scale NaN/Inf.
    """
    x = np.asarray(x, np.float32)
    with np.errstate(all="ignore"):
        if per_tensor:
            absmax = np.max(np.abs(x)) if x.size else F32(0)
            absmax = np.asarray(absmax, np.float32)
            ab = absmax
        else:
            absmax = np.max(np.abs(x), axis=-1) if x.shape[-1] else np.zeros(x.shape[:-1], np.float32)
            ab = absmax[..., None]
        absmax = absmax.astype(np.float32)
        zero = ab == 0
        inv = (F32(127) / np.where(zero, F32(1), ab).astype(np.float32)).astype(np.float32)
        v = (x * inv).astype(np.float32)
        q = np.clip(np.round(v), -127, 127)
        # a NaN left after the clamp becomes 0: 0 * Inf when 127 / absmax overflows (s.5b), NaN inputs
        q = np.where(zero | ~np.isfinite(ab) | np.isnan(q), 0, q)
        scale = np.where(absmax == 0, F32(1), (absmax / F32(127)).astype(np.float32)).astype(np.float32)
    return q.astype(np.int64), scale


def outlier_mask(x: np.ndarray, tau: float) -> np.ndarray:
    """s.5: columns j with some |X[i, j]| >= tau; none when tau <= 0. NaN is never an outlier."""
    x = np.asarray(x, np.float32)
    if tau <= 0:
        return np.zeros(x.shape[1], bool)
    with np.errstate(invalid="ignore"):
        return (np.abs(x) >= F32(tau)).any(axis=0)


def int8_outliers(x: np.ndarray, tau: float):
    """s.5 activation side: (q, scale, mask); the absmax runs over X_in (outlier columns zeroed)."""
    mask = outlier_mask(x, tau)
    x_in = np.where(mask[None, :], F32(0), np.asarray(x, np.float32)).astype(np.float32)
    q, s = int8_absmax(x_in)
    return q, s, mask


# --------------------------------------------------------------------------- s.2 asymmetric


def asym_scale(x: np.ndarray, qmin: int, qmax: int):
    """s.2 scale over the last axis, fp32: lo = min(min x, 0), hi = max(max x, 0),
    scale = (hi - lo) / (qmax - qmin) (fp32 subtraction, fp32 division), 1 where hi == lo."""
    x = np.asarray(x, np.float32)
    lo = np.minimum(np.min(x, axis=-1), F32(0)).astype(np.float32)
    hi = np.maximum(np.max(x, axis=-1), F32(0)).astype(np.float32)
    scale = ((hi - lo).astype(np.float32) / F32(qmax - qmin)).astype(np.float32)
    return np.where(hi == lo, F32(1), scale).astype(np.float32), lo


def asym_quant(x: np.ndarray, scale: np.ndarray, qmin: int, qmax: int):
    """s.2 given the (fp32) scale: zero = clamp(rne(qmin - lo / scale)), q = clamp(rne(x / scale) + zero).

    Every step in fp32, as a kernel computes it. Returns (q int64, zero int64)."""
    x = np.asarray(x, np.float32)
    scale = np.asarray(scale, np.float32)
    lo = np.minimum(np.min(x, axis=-1), F32(0)).astype(np.float32)
    t = (lo / scale).astype(np.float32)
    zero = np.clip(np.round((F32(qmin) - t).astype(np.float32)), qmin, qmax)
    zero = np.where(np.isnan(zero), 0, zero)             # a NaN left after either clamp becomes 0 (s.2)
    v = np.round((x / scale[..., None]).astype(np.float32))
    q = np.clip(v + zero[..., None], qmin, qmax)
    q = np.where(np.isnan(q), 0, q)
    return q.astype(np.int64), zero.astype(np.int64)


# --------------------------------------------------------------------------- s.3 int4


def groups(w: np.ndarray, G: int) -> np.ndarray:
    N, K = w.shape
    return np.asarray(w, np.float32).reshape(N, K // G, G)


def int4_sym_scale(w: np.ndarray, G: int) -> np.ndarray:
    """scale = absmax_group / 7 (fp32); an all-zero group gets scale 1 (as s.1)."""
    absmax = np.max(np.abs(groups(w, G)), axis=-1)
    return np.where(absmax == 0, F32(1), (absmax / F32(7)).astype(np.float32)).astype(np.float32)


def int4_sym_quant(w: np.ndarray, scale: np.ndarray, G: int) -> np.ndarray:
    """q = clamp(rne(w / scale), -8, 7) with one fp32 division, [N, K] int64."""
    wg = groups(w, G)
    q = np.clip(np.round((wg / scale[..., None]).astype(np.float32)), -8, 7)
    return q.reshape(w.shape).astype(np.int64)


def uint4_asym(w: np.ndarray, G: int, scale: np.ndarray = None):
    """s.2 with qmin, qmax = 0, 15 per group. Returns (q [N, K], scale [N, ng], zero [N, ng])."""
    wg = groups(w, G)
    s_spec, _ = asym_scale(wg, 0, 15)
    s = s_spec if scale is None else np.asarray(scale, np.float32)
    q, z = asym_quant(wg, s, 0, 15)
    return q.reshape(w.shape), s_spec, z


def pack(q: np.ndarray) -> np.ndarray:
    """byte[n, i] = (q[n, 2i] & 0xF) | ((q[n, 2i + 1] & 0xF) << 4)."""
    q = np.asarray(q, np.int64)
    return ((q[..., 0::2] & 0xF) | ((q[..., 1::2] & 0xF) << 4)).astype(np.int64)


def unpack(packed: np.ndarray, signed: bool) -> np.ndarray:
    """lo nibble first; sign_extend4(v) = v - 16 for v >= 8."""
    b = np.asarray(packed, np.int64)
    lo, hi = b % 16, b // 16
    if signed:
        lo = np.where(lo >= 8, lo - 16, lo)
        hi = np.where(hi >= 8, hi - 16, hi)
    out = np.empty(b.shape[:-1] + (2 * b.shape[-1],), np.int64)
    out[..., 0::2], out[..., 1::2] = lo, hi
    return out


def dequant_int4_f32(q: np.ndarray, scale: np.ndarray, zero=None) -> np.ndarray:
    """(q - zero) * scale with one fp32 rounding (the integer difference is exact), float32 [N, K]."""
    N, K = q.shape
    ng = scale.shape[1]
    qg = q.reshape(N, ng, K // ng).astype(np.int64)
    if zero is not None:
        qg = qg - np.asarray(zero, np.int64)[..., None]
    return (qg.astype(np.float32) * np.asarray(scale, np.float32)[..., None]).astype(np.float32).reshape(N, K)


# --------------------------------------------------------------------------- s.4 GEMMs


def int_gemm(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """C[m, n] = sum_k a[m, k] b[n, k] in int64 (exact)."""
    return np.asarray(a, np.int64) @ np.asarray(b, np.int64).T


def _bias(bias, N):
    return np.zeros(N) if bias is None else np.asarray(bias, np.float64)


def w8a8(a, b, sa, sb, bias=None):
    """Y = C sa sb + bias in float64; returns (Y, magnitude, C)."""
    C = int_gemm(a, b)
    sa, sb = np.asarray(sa, np.float64), np.asarray(sb, np.float64)
    bb = _bias(bias, C.shape[1])
    y = C * sa[:, None] * sb[None, :] + bb
    mag = np.abs(C) * np.abs(sa)[:, None] * np.abs(sb)[None, :] + np.abs(bb)
    return y, mag, C


def w4a8(a, q, sa, sb, zero=None, bias=None):
    """Y = sa[m] sum_g sb[n, g] sum_{k in g} a[m, k] (q[n, k] - zero[n, g]) + bias, float64.

    The per-group integer sums are exact int64 and must fit int32 (asserted)."""
    a = np.asarray(a, np.int64)
    M, K = a.shape
    N, ng = sb.shape
    G = K // ng
    qg = np.asarray(q, np.int64).reshape(N, ng, G)
    if zero is not None:
        qg = qg - np.asarray(zero, np.int64)[..., None]
    cg = np.einsum("mgk,ngk->mng", a.reshape(M, ng, G), qg)        # exact int64
    assert np.abs(cg).max(initial=0) < 2**31
    sb64 = np.asarray(sb, np.float64)[None]
    sa64 = np.asarray(sa, np.float64)[:, None]
    bb = _bias(bias, N)
    y = sa64 * (cg * sb64).sum(-1) + bb
    mag = np.abs(sa64) * (np.abs(cg) * np.abs(sb64)).sum(-1) + np.abs(bb)
    return y, mag


def weight_only(x, w, bias=None):
    """Y = X @ W^T + bias in float64, W being the dequantized weight already rounded to x's dtype."""
    x64, w64 = np.asarray(x, np.float64), np.asarray(w, np.float64)
    bb = _bias(bias, w64.shape[0])
    return x64 @ w64.T + bb, np.abs(x64) @ np.abs(w64).T + np.abs(bb)


def llm_int8(x, wq, sw, bias=None, tau=6.0):
    """docs/numerics.md s.5 in float64 (from the exact int64 GEMM of the spec-quantized X_in)."""
    x = np.asarray(x, np.float32)
    q, sx, mask = int8_outliers(x, tau)
    C = int_gemm(q, wq)
    sx64, sw64 = sx.astype(np.float64), np.asarray(sw, np.float64)
    wdeq = np.asarray(wq, np.float64)[:, mask] * sw64[:, None]                  # exact in fp64
    xo = x[:, mask].astype(np.float64)
    bb = _bias(bias, wq.shape[0])
    y = C * sx64[:, None] * sw64[None, :] + xo @ wdeq.T + bb
    mag = np.abs(C) * np.abs(sx64)[:, None] * np.abs(sw64)[None, :] + np.abs(xo) @ np.abs(wdeq).T + np.abs(bb)
    return y, mag, mask


# --------------------------------------------------------------------------- comparisons

FP32_RTOL = 1e-5
#: torch.testing.assert_close defaults (rtol, atol) per output dtype: one rounding of the dtype.
DTYPE_TOL = {torch.float16: (1e-3, 1e-5), torch.bfloat16: (1.6e-2, 1e-5), torch.float32: (1.3e-6, 1e-5)}


def sqnr(ref: np.ndarray, out: np.ndarray) -> float:
    ref, out = np.asarray(ref, np.float64), np.asarray(out, np.float64)
    return float(10 * np.log10(np.mean(ref**2) / np.mean((ref - out) ** 2)))


def ulp_close(got: np.ndarray, exact: np.ndarray, ulps: int = 1) -> np.ndarray:
    """Elementwise: |got - exact| <= ulps fp32 ulps of exact (NaN == NaN, inf == inf)."""
    got, exact = np.asarray(got, np.float64), np.asarray(exact, np.float64)
    with np.errstate(all="ignore"):
        sp = np.spacing(np.abs(exact).astype(np.float32)).astype(np.float64)
        ok = np.abs(got - exact) <= ulps * sp
    return ok | (np.isnan(got) & np.isnan(exact)) | (got == exact)


def assert_scale(got: torch.Tensor, expected: np.ndarray, what: str):
    """fp32 scales: within one fp32 ulp of the spec's single fp32 division."""
    assert got.dtype == torch.float32, f"{what}: dtype {got.dtype}"
    g = f64(got)
    assert g.shape == np.shape(expected), f"{what}: shape {g.shape} != {np.shape(expected)}"
    ok = ulp_close(g, expected)
    if not ok.all():
        i = np.argwhere(~ok)[0]
        raise AssertionError(f"{what}: {int((~ok).sum())} scales off by > 1 ulp; first at {tuple(i)}: "
                             f"got {g[tuple(i)]!r}, spec {np.asarray(expected)[tuple(i)]!r}")


def assert_int_equal(got: torch.Tensor, expected: np.ndarray, what: str):
    """Integer outputs: exactly equal."""
    g = i64(got)
    e = np.asarray(expected, np.int64)
    assert g.shape == e.shape, f"{what}: shape {g.shape} != {e.shape}"
    bad = g != e
    if bad.any():
        i = tuple(np.argwhere(bad)[0])
        raise AssertionError(f"{what}: {int(bad.sum())}/{bad.size} elements differ; first at {i}: "
                             f"got {g[i]}, spec {e[i]}")


#: fp32's smallest subnormal: what one fp32 operation can lose to gradual underflow (s.6).
FP32_SUBNORMAL = 2.0 ** -149


def assert_float_output(got: torch.Tensor, exact: np.ndarray, mag: np.ndarray, dtype: torch.dtype, what: str,
                        underflow_terms: int = 0):
    """docs/numerics.md s.6 for a scaled output of dtype ``dtype`` (see the module docstring).

    fp32: |got - exact| <= 1e-5 * magnitude elementwise and ||got - exact|| <= 1e-5 ||exact||.
    fp16/bf16: |got - round(exact)| <= atol + rtol |round(exact)| + 1e-5 * magnitude, with the
    assert_close defaults (rtol, atol) of the dtype.
    ``underflow_terms``: the number of fp32 operations behind one element (K products and the
    epilogue); each may lose up to one fp32 subnormal (2^-149) to underflow, which s.6 allows on top.
    """
    uf = underflow_terms * FP32_SUBNORMAL
    assert got.dtype == dtype, f"{what}: dtype {got.dtype}, expected {dtype}"
    g = f64(got)
    exact, mag = np.asarray(exact, np.float64), np.asarray(mag, np.float64)
    assert g.shape == exact.shape, f"{what}: shape {g.shape} != {exact.shape}"
    assert np.isfinite(exact).all()
    if dtype == torch.float32:
        e = exact
        tol = FP32_RTOL * mag + uf
        num, den = np.linalg.norm(g - exact), np.linalg.norm(exact)
        assert num <= FP32_RTOL * den + uf * np.sqrt(g.size), \
            f"{what}: norm-wise relative error {num / den:.3g} > {FP32_RTOL}"
    else:
        rtol, atol = DTYPE_TOL[dtype]
        e = round_to(exact, dtype)
        tol = atol + rtol * np.abs(e) + FP32_RTOL * mag + uf
    with np.errstate(invalid="ignore"):
        err = np.abs(g - e)
        bad = ~(err <= tol)
    if bad.any():
        i = tuple(np.argwhere(bad)[0])
        w = np.unravel_index(np.nanargmax(np.where(bad, err / np.maximum(tol, 1e-300), -1)), bad.shape)
        raise AssertionError(
            f"{what} ({dtype}): {int(bad.sum())}/{bad.size} elements out of tolerance; first at {i}: got {g[i]!r}, "
            f"expected {e[i]!r} (exact {exact[i]!r}, tol {tol[i]:.3g}); worst at {tuple(int(j) for j in w)}: "
            f"got {g[w]!r}, expected {e[w]!r}, tol {tol[w]:.3g}")


# --------------------------------------------------------------------------- NF4 / FP4 (s.11)

#: The code tables of s.11, from the text: NF4 as listed, FP4 as raw values / 12 in float32.
NF4_TABLE = np.array([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0], F32)
FP4_TABLE = (np.array([0, 0.0625, 8, 12, 4, 6, 2, 3, 0.0, -0.0625, -8, -12, -4, -6, -2, -3], F32) / F32(12))
TABLES_4BIT = {"nf4": NF4_TABLE, "fp4": FP4_TABLE}


def _ascending(table: np.ndarray) -> np.ndarray:
    # nibbles by ascending value; of equal values (the zeros of FP4, nibbles 0 and 8) the lower nibble first
    return np.array(sorted(range(16), key=lambda i: (float(table[i]), i)))


def quant_4bit(w: np.ndarray, quant_type: str, blocksize: int):
    """s.11 quantization of a float32 [N, K] array -> (nibbles int64 [N, K], absmax float32 [n_blocks])."""
    table = TABLES_4BIT[quant_type]
    order = _ascending(table)
    st = table[order]
    bounds = ((st[:-1] + st[1:]) / F32(2)).astype(F32)
    flat = np.asarray(w, F32).reshape(-1)
    n = flat.size
    nb = -(-n // blocksize)
    absmax = np.empty(nb, F32)
    scaled = np.empty(n, F32)
    with np.errstate(all="ignore"):
        for b in range(nb):
            v = flat[b * blocksize:(b + 1) * blocksize]
            am = F32(np.max(np.abs(v))) if not np.isnan(v).any() else F32(np.nan)
            safe = np.maximum(am, F32(1e-38)) if not np.isnan(am) else am
            if v.size == blocksize:
                absmax[b] = am
                s = v * (F32(1) / safe)            # a reciprocal, then one product
            else:
                absmax[b] = safe                   # the partial last block stores the clamped value
                s = v / safe                       # and uses a true division
            scaled[b * blocksize:b * blocksize + v.size] = np.clip(s, F32(-1), F32(1))
    # the nearest code, ties (and values equal to a boundary) to the lower one; NaN -> the top
    idx = np.where(np.isnan(scaled), 15, np.searchsorted(bounds, scaled, side="left"))
    return order[idx].reshape(np.shape(w)), absmax


def pack_4bit(nib: np.ndarray) -> np.ndarray:
    """Two codes per byte, the first of each pair in the high nibble."""
    nib = np.asarray(nib, np.int64)
    return ((nib[..., 0::2] << 4) | nib[..., 1::2]).astype(np.uint8)


def dequant_4bit(nib: np.ndarray, absmax: np.ndarray, quant_type: str, blocksize: int) -> np.ndarray:
    """float32 code[nibble] * absmax[block] over the flattened weight."""
    flat = np.asarray(nib, np.int64).reshape(-1)
    scale = np.repeat(np.asarray(absmax, F32), blocksize)[: flat.size]
    with np.errstate(all="ignore"):
        return (TABLES_4BIT[quant_type][flat] * scale).astype(F32).reshape(np.shape(nib))


def dynamic_code() -> np.ndarray:
    """The 8-bit dynamic map of s.11: for e = 0..6, the 2^e midpoints of 2^e + 1 float32 points evenly
    spaced on [0.1, 1], times +-10^(e-6) (in float32), plus 0 and 1; sorted. The points are
    torch.linspace's float32 ones (which s.11 names; numpy's differ in the last bit)."""
    vals = [0.0, 1.0]
    for e in range(7):
        pts = torch.linspace(0.1, 1, 2**e + 1, dtype=torch.float32).numpy()
        mids = ((pts[:-1] + pts[1:]) / F32(2)).astype(F32)
        for sgn in (1, -1):
            vals += list((F32(sgn * 10.0 ** (e - 6)) * mids).astype(F32))
    return np.sort(np.array(vals, F32))


def double_quant(absmax: np.ndarray, offset: np.float32):
    """s.11 double quantization given the mean ``offset``: (codes int64, nested_absmax float32)."""
    code = dynamic_code()
    v = (np.asarray(absmax, F32) - F32(offset)).astype(F32)
    nb = -(-v.size // 256)
    nested = np.array([np.max(np.abs(v[i * 256:(i + 1) * 256])) for i in range(nb)], F32)
    q = np.empty(v.size, np.int64)
    with np.errstate(all="ignore"):
        for i, x in enumerate(v):
            r = F32(x / nested[i // 256])
            if np.isnan(r):
                q[i] = 0
                continue
            dist = np.abs((r - code).astype(F32))
            best = np.flatnonzero(dist == dist.min())
            q[i] = best[0]                         # equally near: the lower code
    return q, nested


def undouble_quant(q: np.ndarray, nested: np.ndarray, offset) -> np.ndarray:
    scale = np.repeat(np.asarray(nested, F32), 256)[: np.size(q)]
    return ((dynamic_code()[np.asarray(q, np.int64)] * scale).astype(F32) + F32(offset)).astype(F32)
