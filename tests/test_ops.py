"""The numerics contract (docs/numerics.md) for every ``torch.ops.quantkernels`` op.

Every op is called through the dispatcher (``torch.ops.quantkernels.<name>``), so the same
tests cover the reference today and native kernels (CPU / CUDA) once they register. The
expected values come from ``_spec.py``, an independent numpy evaluation of docs/numerics.md:
integers (quantized values, zero points, packed bytes, int32 accumulators, outlier masks)
must be exactly equal; scales within one fp32 ulp of the spec's single fp32 division
(quantized values are then checked exactly given the op's own scale where the spec's
formula divides by it); float outputs as in docs/numerics.md s.6 (see ``_spec.py``).
"""

from __future__ import annotations

import itertools
import math
import re

import numpy as np
import pytest
import torch

import _spec as S
import quantkernels._ops  # noqa: F401  (defines the ops: schemas, fake kernels, reference)

ops = torch.ops.quantkernels

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
LAYOUTS = ("contiguous", "transposed", "sliced")
INPUT_ERRORS = (TypeError, ValueError, RuntimeError)
HAS_CUDA = torch.cuda.is_available()


def dn(dt) -> str:
    return "default" if dt is None else str(dt).replace("torch.", "").replace("float", "f")  # f16, bf16, f32


def shape_id(shape) -> str:
    return "x".join(map(str, shape))


# --------------------------------------------------------------------------- data


def randn_rows(shape, dtype=torch.float32, spread=True, zero_row=True):
    """N(0,1) rows, per-row magnitudes spread over ~2 decades, one all-zero row (index 1) when
    there are >= 3 rows: zero rows mixed with random ones, never zeros alone."""
    x = torch.randn(*shape)
    rows = x.reshape(-1, shape[-1])
    if spread and rows.shape[0]:
        rows.mul_(torch.exp(torch.randn(rows.shape[0], 1)))
    if zero_row and rows.shape[0] >= 3:
        rows[1] = 0
    return x.to(dtype)


def randint8(shape, lo=-128, hi=127, zero_row=True):
    t = torch.randint(lo, hi + 1, shape, dtype=torch.int8)
    if zero_row and len(shape) == 2 and shape[0] >= 3:
        t[1] = 0
    return t


def pos_scale(shape, base):
    """Positive fp32 scales around ``base`` (a factor-of-4 spread)."""
    return (base * torch.exp2(torch.rand(shape) * 2 - 1)).float()


def with_layout(t: torch.Tensor, layout: str) -> torch.Tensor:
    """The same values in a non-contiguous layout: a transposed view or a strided slice."""
    if layout == "contiguous":
        return t.contiguous()
    if t.dim() == 1:  # 1-D: every other element of a longer buffer
        big = torch.zeros(2 * t.shape[0] + 1, dtype=t.dtype, device=t.device)
        big[1::2] = t
        return big[1::2]
    if layout == "transposed":
        return t.transpose(-1, -2).contiguous().transpose(-1, -2)
    if layout == "sliced":  # every other column of a wider buffer, one row in
        big = torch.zeros(*t.shape[:-2], t.shape[-2] + 1, 2 * t.shape[-1], dtype=t.dtype, device=t.device)
        big[..., 1:, ::2] = t
        return big[..., 1:, ::2]
    raise ValueError(layout)


def planted_outliers(M, K, dtype, tau=6.0, cols=(3, 10, 20), mult=20.0):
    """N(0,1) activations with outlier columns ``cols`` (one value per column x mult), one value
    exactly at tau (>= is inclusive) and an all-zero row."""
    x = torch.randn(M, K)
    if M >= 3:
        x[1] = 0
    if M:
        for i, c in enumerate(cols):
            if c < K:  # rows 0, 2, 4, ...: never the zero row
                x[(2 * i) % M, c] = mult * (1.0 if i % 2 == 0 else -1.0) * (1 + torch.rand(()).item())
        if K > 30:
            x[M - 1, 30] = -tau if tau > 0 else -6.0
    return x.to(dtype)


# --------------------------------------------------------------------------- s.1 / s.2 / s.5 int8 quantizers

QUANT_SHAPES = [(0, 77), (1, 1), (3, 77), (13, 300), (67, 33), (2, 5, 77)]
QUANT_PARAMS = [
    pytest.param(shape, dt, layout, id=f"{shape_id(shape)}-{dn(dt)}-{layout}")
    for shape, dt, layout in itertools.product(QUANT_SHAPES, FLOAT_DTYPES, LAYOUTS)
    if layout == "contiguous" or len(shape) >= 2 and shape[0] > 1
]


@pytest.mark.parametrize("shape,dtype,layout", QUANT_PARAMS)
def test_quantize_int8_rowwise(device, shape, dtype, layout):
    x = with_layout(randn_rows(shape, dtype).to(device), layout)
    q, s = ops.quantize_int8_rowwise(x)
    eq, es = S.int8_absmax(S.f32(x))
    assert q.dtype == torch.int8 and q.device == x.device and tuple(q.shape) == tuple(shape)
    S.assert_int_equal(q, eq, "q")
    S.assert_scale(s, es, "scale")


@pytest.mark.parametrize("shape,dtype,layout", QUANT_PARAMS)
def test_quantize_int8_tensor(device, shape, dtype, layout):
    x = with_layout(randn_rows(shape, dtype).to(device), layout)
    q, s = ops.quantize_int8_tensor(x)
    eq, es = S.int8_absmax(S.f32(x), per_tensor=True)
    assert s.dim() == 0
    S.assert_int_equal(q, np.broadcast_to(eq, shape), "q")
    S.assert_scale(s, es, "scale")


def test_quantize_int8_rounds_half_to_even(device):
    # absmax 127 -> 127 / absmax = 1 exactly, so q = rne(x): ties go to the even neighbour.
    x = torch.tensor([[127.0, 2.5, 3.5, -2.5, -0.5, 1.5, 126.5, -127.0]], device=device)
    q, s = ops.quantize_int8_rowwise(x)
    assert q.tolist() == [[127, 2, 4, -2, 0, 2, 126, -127]]
    assert s.item() == 1.0
    q, s = ops.quantize_int8_rowwise(torch.zeros(2, 4, device=device))  # absmax 0: scale 1, q 0
    assert s.tolist() == [1.0, 1.0] and not q.any()


OUTLIER_PARAMS = [
    pytest.param(M, K, dt, tau, id=f"{M}x{K}-{dn(dt)}-tau{tau}")
    for (M, K), dt, tau in itertools.product([(0, 77), (1, 33), (13, 300), (67, 77)], FLOAT_DTYPES,
                                             (6.0, 2.5, 0.0, -1.0))
]


@pytest.mark.parametrize("M,K,dtype,tau", OUTLIER_PARAMS)
def test_quantize_int8_rowwise_outliers(device, M, K, dtype, tau):
    x = planted_outliers(M, K, dtype).to(device)
    q, s, mask = ops.quantize_int8_rowwise_outliers(x, tau)
    eq, es, emask = S.int8_outliers(S.f32(x), tau)
    assert mask.dtype == torch.bool and mask.device == x.device
    S.assert_int_equal(mask, emask, "outlier mask")
    S.assert_int_equal(q, eq, "q")
    S.assert_scale(s, es, "scale")
    if tau == 6.0 and M >= 3 and K > 30:
        assert mask[[3, 10, 20, 30]].all() and mask.sum() >= 4  # planted columns, including |x| == tau


ASYM_PARAMS = [
    pytest.param(shape, dt, layout, id=f"{shape_id(shape)}-{dn(dt)}-{layout}")
    for shape, dt, layout in itertools.product([(0, 77), (1, 1), (5, 77), (67, 33), (2, 5, 77)], FLOAT_DTYPES,
                                               ("contiguous", "transposed"))
    if layout == "contiguous" or shape[0] > 1
]


@pytest.mark.parametrize("shape,dtype,layout", ASYM_PARAMS)
def test_quantize_int8_asym(device, shape, dtype, layout):
    x = randn_rows(shape, torch.float32)
    rows = x.reshape(-1, shape[-1])
    if rows.shape[0] >= 5:  # all-positive, all-negative and shifted rows, next to the zero row
        rows[0].abs_()
        rows[2] = -rows[2].abs()
        rows[3] += 3.0
    x = with_layout(x.to(dtype).to(device), layout)
    q, s, z = ops.quantize_int8_asym(x)
    assert q.dtype == torch.int8 and z.dtype == torch.int8
    es, _ = S.asym_scale(S.f32(x), -128, 127)
    S.assert_scale(s, es, "scale")
    eq, ez = S.asym_quant(S.f32(x), S.f32(s), -128, 127)  # exact, given the op's (<= 1 ulp) scale
    S.assert_int_equal(z, ez, "zero")
    S.assert_int_equal(q, eq, "q")


DEQ8_PARAMS = [
    pytest.param(kind, shape, dt, id=f"{kind}-{shape_id(shape)}-{dn(dt)}")
    for kind, shape, dt in itertools.product(("row", "row-zero", "tensor"), [(0, 7), (13, 77), (2, 5, 33)],
                                             (None,) + FLOAT_DTYPES)
]


@pytest.mark.parametrize("kind,shape,out_dtype", DEQ8_PARAMS)
def test_dequantize_int8(device, kind, shape, out_dtype):
    q = torch.randint(-128, 128, shape, dtype=torch.int8)
    scale = pos_scale(() if kind == "tensor" else shape[:-1], 0.02)
    zero = torch.randint(-128, 128, shape[:-1], dtype=torch.int8) if kind == "row-zero" else None
    out = ops.dequantize_int8(q.to(device), scale.to(device), None if zero is None else zero.to(device), out_dtype)
    qq = S.i64(q) - (S.i64(zero)[..., None] if zero is not None else 0)
    s64 = S.f64(scale)[..., None] if scale.dim() else S.f64(scale)
    exact = qq * s64
    S.assert_float_output(out, exact, np.abs(exact), out_dtype or torch.float32, "dequantize_int8")


# --------------------------------------------------------------------------- s.3 int4


@pytest.mark.parametrize("signed", [True, False], ids=["signed", "unsigned"])
def test_pack_unpack_int4_all_values(device, signed):
    vals = torch.arange(-8, 8) if signed else torch.arange(16)
    lo, hi = torch.meshgrid(vals, vals, indexing="ij")
    q = torch.stack([lo.flatten(), hi.flatten()], -1).to(torch.int8 if signed else torch.uint8)  # [256, 2]
    packed = ops.pack_int4(q.to(device))
    assert packed.dtype == torch.uint8 and tuple(packed.shape) == (256, 1)
    S.assert_int_equal(packed, S.pack(S.i64(q)), "packed")
    assert sorted(S.i64(packed).ravel().tolist()) == list(range(256))  # a bijection onto the bytes
    back = ops.unpack_int4(packed, signed)
    assert back.dtype == (torch.int8 if signed else torch.uint8)
    S.assert_int_equal(back, S.i64(q), "unpack(pack(q))")
    S.assert_int_equal(back, S.unpack(S.i64(packed), signed), "unpack")


def test_pack_int4_byte_layout(device):
    # byte = lo | hi << 4, the element at the even index in the low nibble.
    p = ops.pack_int4(torch.tensor([[1, 2, -1, -8, 7, 0]], dtype=torch.int8, device=device))
    assert p.tolist() == [[0x21, 0x8F, 0x07]]
    p = ops.pack_int4(torch.tensor([[15, 0, 3, 12]], dtype=torch.uint8, device=device))
    assert p.tolist() == [[0x0F, 0xC3]]
    assert ops.unpack_int4(torch.tensor([[0x8F]], dtype=torch.uint8, device=device), True).tolist() == [[-1, -8]]
    assert ops.unpack_int4(torch.tensor([[0x8F]], dtype=torch.uint8, device=device), False).tolist() == [[15, 8]]


@pytest.mark.parametrize("shape,layout", [
    pytest.param(s, l, id=f"{shape_id(s)}-{l}")
    for s, l in itertools.product([(0, 8), (1, 2), (37, 66), (3, 4, 10)], LAYOUTS)
    if l == "contiguous" or s[0] > 1
])
@pytest.mark.parametrize("signed", [True, False], ids=["signed", "unsigned"])
def test_pack_unpack_int4_roundtrip(device, shape, layout, signed):
    q = torch.randint(-8, 8, shape, dtype=torch.int8) if signed else torch.randint(0, 16, shape, dtype=torch.uint8)
    packed = ops.pack_int4(with_layout(q.to(device), layout))
    S.assert_int_equal(packed, S.pack(S.i64(q)), "packed")
    S.assert_int_equal(ops.unpack_int4(with_layout(packed, layout), signed), S.i64(q), "unpack(pack(q))")


#: (K, G): G in 32/64/128/256, G = K (also given as -1), K not a power of two where allowed.
INT4_KG = [(64, 32), (192, 64), (384, 128), (512, 256), (96, 96), (34, 34), (160, -1)]


def int4_weight(N, K, G, dtype):
    """N(0, 0.02^2) weight with per-row spread, an all-zero row and an all-zero group."""
    w = randn_rows((N, K), torch.float32) * 0.02
    if N >= 3:
        w[2, : (K if G == -1 else G)] = 0
    return w.to(dtype)


INT4_Q_PARAMS = [
    pytest.param(N, K, G, dt, layout, id=f"{N}x{K}-g{G}-{dn(dt)}-{layout}")
    for N, (K, G), dt, layout in itertools.product((1, 37), INT4_KG, FLOAT_DTYPES, ("contiguous", "transposed"))
    if layout == "contiguous" or (N > 1 and dt == torch.float32)
]


@pytest.mark.parametrize("N,K,G,dtype,layout", INT4_Q_PARAMS)
def test_quantize_int4_sym(device, N, K, G, dtype, layout):
    w = with_layout(int4_weight(N, K, G, dtype).to(device), layout)
    packed, s = ops.quantize_int4_sym(w, G)
    Ge = K if G == -1 else G
    assert packed.dtype == torch.uint8 and tuple(packed.shape) == (N, K // 2)
    S.assert_scale(s, S.int4_sym_scale(S.f32(w), Ge), "scale")
    eq = S.int4_sym_quant(S.f32(w), S.f32(s), Ge)           # exact, given the op's scale
    assert eq.min(initial=0) >= -7 and eq.max(initial=0) <= 7
    S.assert_int_equal(packed, S.pack(eq), "packed")


@pytest.mark.parametrize("N,K,G,dtype,layout", INT4_Q_PARAMS)
def test_quantize_uint4_asym(device, N, K, G, dtype, layout):
    w = int4_weight(N, K, G, torch.float32)
    if N >= 5:
        w[3] = w[3].abs()      # all-positive and all-negative rows: zero point at the range ends
        w[4] = -w[4].abs()
    w = with_layout(w.to(dtype).to(device), layout)
    packed, s, z = ops.quantize_uint4_asym(w, G)
    Ge = K if G == -1 else G
    assert z.dtype == torch.uint8 and tuple(z.shape) == (N, K // Ge)
    eq, es, ez = S.uint4_asym(S.f32(w), Ge, scale=S.f32(s))
    S.assert_scale(s, es, "scale")
    S.assert_int_equal(z, ez, "zero")
    S.assert_int_equal(packed, S.pack(eq), "packed")


@pytest.mark.parametrize("N,K,G,asym,out_dtype", [
    pytest.param(N, K, G, asym, dt, id=f"{N}x{K}-g{G}-{'asym' if asym else 'sym'}-{dn(dt)}")
    for (N, (K, G)), asym, dt in itertools.product([(37, (64, 32)), (5, (384, 128)), (3, (34, 34))], (False, True),
                                                   (None,) + FLOAT_DTYPES)
])
def test_dequantize_int4(device, N, K, G, asym, out_dtype):
    ng = K // G
    packed = torch.randint(0, 256, (N, K // 2), dtype=torch.uint8)
    scale = pos_scale((N, ng), 0.003)
    zero = torch.randint(0, 16, (N, ng), dtype=torch.uint8) if asym else None
    out = ops.dequantize_int4(packed.to(device), scale.to(device), None if zero is None else zero.to(device), out_dtype)
    q = S.unpack(S.i64(packed), signed=not asym).reshape(N, ng, G)
    if asym:
        q = q - S.i64(zero)[..., None]
    exact = (q * S.f64(scale)[..., None]).reshape(N, K)
    S.assert_float_output(out, exact, np.abs(exact), out_dtype or torch.float32, "dequantize_int4")


# Round trips: |x - dequant(quant(x))| <= scale / 2 (plus fp32 slack) elementwise.


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dn)
def test_roundtrip_int8(device, dtype):
    x = randn_rows((67, 300), dtype).to(device)
    x64 = S.f64(x)
    q, s = ops.quantize_int8_rowwise(x)
    err = np.abs(x64 - S.f64(ops.dequantize_int8(q, s)))
    bound = S.f64(s)[:, None] * (0.5 + 2e-5) + 2**-23 * np.abs(x64)
    assert (err <= bound).all(), f"sym: max err/scale {np.max(err / S.f64(s)[:, None]):.6f}"
    assert (err[1] == 0).all()  # the zero row
    q, s, z = ops.quantize_int8_asym(x)
    err = np.abs(x64 - S.f64(ops.dequantize_int8(q, s, z)))
    bound = S.f64(s)[:, None] * (0.5 + 1e-4) + 2**-23 * np.abs(x64)
    assert (err <= bound).all(), f"asym: max err/scale {np.max(err / S.f64(s)[:, None]):.6f}"
    q, s = ops.quantize_int8_tensor(x)
    err = np.abs(x64 - S.f64(ops.dequantize_int8(q, s)))
    assert (err <= s.item() * (0.5 + 2e-5) + 2**-23 * np.abs(x64)).all()


@pytest.mark.parametrize("G", [32, 128, -1])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dn)
def test_roundtrip_int4(device, dtype, G):
    K = 256
    w = int4_weight(37, K, G, dtype).to(device)
    Ge = K if G == -1 else G
    w64 = S.f64(w).reshape(37, K // Ge, Ge)
    packed, s = ops.quantize_int4_sym(w, G)
    err = np.abs(w64 - S.f64(ops.dequantize_int4(packed, s)).reshape(w64.shape))
    bound = S.f64(s)[..., None] * (0.5 + 2e-5) + 2**-23 * np.abs(w64)
    assert (err <= bound).all(), f"sym: max err/scale {np.max(err / S.f64(s)[..., None]):.6f}"
    packed, s, z = ops.quantize_uint4_asym(w, G)
    err = np.abs(w64 - S.f64(ops.dequantize_int4(packed, s, z)).reshape(w64.shape))
    bound = S.f64(s)[..., None] * (0.5 + 1e-4) + 2**-23 * np.abs(w64)
    assert (err <= bound).all(), f"asym: max err/scale {np.max(err / S.f64(s)[..., None]):.6f}"
    assert (err[2, 0] == 0).all()  # the zero group: 0.0 is exactly representable


# --------------------------------------------------------------------------- s.4 int8_gemm

INT8_GEMM_PARAMS = [
    pytest.param(M, N, K, "contiguous", id=f"M{M}-N{N}-K{K}")
    for M, N, K in itertools.product((0, 1, 3, 13, 67), (1, 37), (1, 77, 300))
] + [
    pytest.param(M, N, K, layout, id=f"M{M}-N{N}-K{K}-{layout}")
    for (M, N, K), layout in itertools.product([(13, 37, 77), (67, 5, 300)], ("transposed", "sliced"))
]


@pytest.mark.parametrize("M,N,K,layout", INT8_GEMM_PARAMS)
def test_int8_gemm(device, M, N, K, layout):
    a, b = randint8((M, K)), randint8((N, K))
    c = ops.int8_gemm(with_layout(a.to(device), layout), with_layout(b.to(device), layout))
    assert c.dtype == torch.int32 and c.device.type == torch.device(device).type
    S.assert_int_equal(c, S.int_gemm(S.i64(a), S.i64(b)), "C")


def test_int8_gemm_beyond_fp32_exact_range(device):
    # |C| up to 127 * 127 * 2048 = 3.3e7 > 2**24 with odd sums: fp32 cannot hold them, so an
    # fp32-emulated GEMM fails here while an int32 (or fp64) accumulation passes.
    M, N, K = 3, 5, 2048
    a = torch.randint(110, 128, (M, K), dtype=torch.int8)
    b = torch.randint(110, 128, (N, K), dtype=torch.int8)
    a[1] = -a[1]
    b[2, ::3] = -b[2, ::3]
    expected = S.int_gemm(S.i64(a), S.i64(b))
    assert np.abs(expected).max() > 2**24 and (expected % 2 == 1).any()
    assert (expected.astype(np.float32).astype(np.int64) != expected).any()  # not fp32-representable
    S.assert_int_equal(ops.int8_gemm(a.to(device), b.to(device)), expected, "C")


def test_int8_gemm_k_bound(device):
    # The largest K that cannot overflow for any int8 input (128 * 128 * K < 2**31), at its worst case.
    K = (2**31 - 1) // (128 * 128)
    assert K == 131071
    a = torch.full((1, K), -128, dtype=torch.int8, device=device)
    S.assert_int_equal(ops.int8_gemm(a, a), np.array([[128 * 128 * K]]), "C at the int32 bound")
    big = torch.zeros(1, K + 1, dtype=torch.int8, device=device)
    with pytest.raises(INPUT_ERRORS, match=r"K = 131072"):
        ops.int8_gemm(big, big)
    with pytest.raises(INPUT_ERRORS, match=r"K = 131072"):
        ops.w8a8_gemm(big, big, torch.ones(1, device=device), torch.ones(1, device=device))
    with pytest.raises(INPUT_ERRORS, match=r"K = 131072"):
        ops.llm_int8_linear(big.half(), big, torch.ones(1, device=device), None, 6.0)


# --------------------------------------------------------------------------- W8A8 / W4A8

#: (bias dtype or None, out_dtype or None = the default fp32).
EPILOGUES = [(None, None), (torch.float32, None), (torch.float16, torch.float16), (torch.bfloat16, torch.bfloat16),
             (torch.float32, torch.bfloat16), (None, torch.float32), (torch.float16, torch.float32)]


def ep_id(ep):
    return f"bias-{dn(ep[0]) if ep[0] else 'none'}-out-{dn(ep[1])}"


W8A8_PARAMS = [
    pytest.param(M, N, K, ep, "contiguous", id=f"M{M}-N{N}-K{K}-{ep_id(ep)}")
    for M, (N, K), ep in itertools.product((1, 13, 67), [(37, 77), (5, 300)], EPILOGUES)
] + [
    pytest.param(13, 37, 77, EPILOGUES[2], layout, id=f"M13-N37-K77-{ep_id(EPILOGUES[2])}-{layout}")
    for layout in ("transposed", "sliced")
]


@pytest.mark.parametrize("M,N,K,epilogue,layout", W8A8_PARAMS)
def test_w8a8_gemm(device, M, N, K, epilogue, layout):
    bias_dtype, out_dtype = epilogue
    a, b = randint8((M, K)), randint8((N, K), -127, 127)
    sa, sb = pos_scale(M, 0.02), pos_scale(N, 0.0005)
    if M >= 3:
        sa[1] = 1.0  # the zero row, as the quantizer leaves it
    bias = None if bias_dtype is None else torch.randn(N).to(bias_dtype)
    L = lambda t: None if t is None else with_layout(t.to(device), layout)  # noqa: E731
    y = ops.w8a8_gemm(L(a), L(b), L(sa), L(sb), L(bias), out_dtype)
    exact, mag, _ = S.w8a8(S.i64(a), S.i64(b), S.f64(sa), S.f64(sb), None if bias is None else S.f64(bias))
    S.assert_float_output(y, exact, mag, out_dtype or torch.float32, "w8a8_gemm")


W4A8_PARAMS = [
    pytest.param(M, K, G, asym, ep, "contiguous", id=f"M{M}-K{K}-g{G}-{'asym' if asym else 'sym'}-{ep_id(ep)}")
    for M, (K, G), asym, ep in itertools.product((1, 13, 67), [kg for kg in INT4_KG if kg[1] != -1], (False, True),
                                                 (EPILOGUES[0], EPILOGUES[2], EPILOGUES[4]))
] + [
    pytest.param(13, 192, 64, asym, EPILOGUES[1], layout, id=f"M13-K192-g64-{'asym' if asym else 'sym'}-{layout}")
    for asym, layout in itertools.product((False, True), ("transposed", "sliced"))
]


@pytest.mark.parametrize("M,K,G,asym,epilogue,layout", W4A8_PARAMS)
def test_w4a8_gemm(device, M, K, G, asym, epilogue, layout):
    bias_dtype, out_dtype = epilogue
    N, ng = 37, K // G
    a = randint8((M, K))
    packed = torch.randint(0, 256, (N, K // 2), dtype=torch.uint8)     # every nibble value
    sa, sb = pos_scale(M, 0.02), pos_scale((N, ng), 0.003)
    zero = torch.randint(0, 16, (N, ng), dtype=torch.uint8) if asym else None
    bias = None if bias_dtype is None else torch.randn(N).to(bias_dtype)
    L = lambda t: None if t is None else with_layout(t.to(device), layout)  # noqa: E731
    y = ops.w4a8_gemm(L(a), L(packed), L(sa), L(sb), L(zero), L(bias), out_dtype)
    q = S.unpack(S.i64(packed), signed=not asym)
    exact, mag = S.w4a8(S.i64(a), q, S.f64(sa), S.f64(sb), None if zero is None else S.i64(zero),
                        None if bias is None else S.f64(bias))
    S.assert_float_output(y, exact, mag, out_dtype or torch.float32, "w4a8_gemm")


# --------------------------------------------------------------------------- weight-only


W8A16_PARAMS = [
    pytest.param(M, N, K, dt, bias, "contiguous", id=f"M{M}-N{N}-K{K}-{dn(dt)}-{'bias' if bias else 'nobias'}")
    for M, (N, K), dt, bias in itertools.product((1, 13, 67), [(37, 77), (5, 300), (64, 129)], FLOAT_DTYPES,
                                                 (False, True))
] + [
    pytest.param(13, 37, 77, dt, True, layout, id=f"M13-N37-K77-{dn(dt)}-bias-{layout}")
    for dt, layout in itertools.product((torch.float16, torch.float32), ("transposed", "sliced"))
]


@pytest.mark.parametrize("M,N,K,dtype,has_bias,layout", W8A16_PARAMS)
def test_w8a16_gemm(device, M, N, K, dtype, has_bias, layout):
    x = randn_rows((M, K), dtype)
    b, sb = randint8((N, K), -127, 127), pos_scale(N, 0.0005)
    bias = torch.randn(N).to(dtype) if has_bias else None
    L = lambda t: None if t is None else with_layout(t.to(device), layout)  # noqa: E731
    y = ops.w8a16_gemm(L(x), L(b), L(sb), L(bias))
    # dequant(W) = q * scale (one fp32 product), rounded to the activation dtype.
    w = S.round_to(S.i64(b).astype(np.float32) * S.f32(sb)[:, None], dtype)
    exact, mag = S.weight_only(S.f64(x), w, None if bias is None else S.f64(bias))
    S.assert_float_output(y, exact, mag, dtype, "w8a16_gemm")


W4A16_PARAMS = [
    pytest.param(M, K, G, dt, asym, bias, id=f"M{M}-K{K}-g{G}-{dn(dt)}-{'asym' if asym else 'sym'}"
                                             f"-{'bias' if bias else 'nobias'}")
    for M, (K, G), dt, asym, bias in itertools.product((1, 13, 67), [(64, 32), (384, 128), (512, 256), (96, 96),
                                                                     (34, 34)], FLOAT_DTYPES, (False, True),
                                                       (False, True))
]


@pytest.mark.parametrize("M,K,G,dtype,asym,has_bias", W4A16_PARAMS)
def test_w4a16_gemm(device, M, K, G, dtype, asym, has_bias):
    N, ng = 37, K // G
    x = randn_rows((M, K), dtype)
    packed = torch.randint(0, 256, (N, K // 2), dtype=torch.uint8)
    sb = pos_scale((N, ng), 0.003)
    zero = torch.randint(0, 16, (N, ng), dtype=torch.uint8) if asym else None
    bias = torch.randn(N).to(dtype) if has_bias else None
    D = lambda t: None if t is None else t.to(device)  # noqa: E731
    y = ops.w4a16_gemm(D(x), D(packed), D(sb), D(zero), D(bias))
    q = S.unpack(S.i64(packed), signed=not asym)
    w = S.round_to(S.dequant_int4_f32(q, S.f32(sb), None if zero is None else S.i64(zero)), dtype)
    exact, mag = S.weight_only(S.f64(x), w, None if bias is None else S.f64(bias))
    S.assert_float_output(y, exact, mag, dtype, "w4a16_gemm")


def test_w4a16_gemm_noncontiguous(device):
    M, N, K, G = 13, 37, 192, 64
    x = randn_rows((M, K), torch.float16)
    packed = torch.randint(0, 256, (N, K // 2), dtype=torch.uint8)
    sb, zero = pos_scale((N, K // G), 0.003), torch.randint(0, 16, (N, K // G), dtype=torch.uint8)
    bias = torch.randn(N).half()
    for layout in ("transposed", "sliced"):
        L = lambda t: with_layout(t.to(device), layout)  # noqa: E731
        y = ops.w4a16_gemm(L(x), L(packed), L(sb), L(zero), L(bias))
        w = S.round_to(S.dequant_int4_f32(S.unpack(S.i64(packed), False), S.f32(sb), S.i64(zero)), torch.float16)
        exact, mag = S.weight_only(S.f64(x), w, S.f64(bias))
        S.assert_float_output(y, exact, mag, torch.float16, f"w4a16_gemm {layout}")


# --------------------------------------------------------------------------- s.5 LLM.int8()

LLM_PARAMS = [
    pytest.param(M, N, K, dt, bias, tau, "contiguous",
                 id=f"M{M}-N{N}-K{K}-{dn(dt)}-{'bias' if bias else 'nobias'}-tau{tau}")
    for M, (N, K), dt, bias, tau in itertools.product((1, 13, 67), [(37, 77), (5, 300)], FLOAT_DTYPES,
                                                      (False, True), (6.0, 0.0))
] + [
    pytest.param(13, 37, 77, dt, True, 6.0, layout, id=f"M13-N37-K77-{dn(dt)}-bias-tau6.0-{layout}")
    for dt, layout in itertools.product((torch.bfloat16, torch.float32), ("transposed", "sliced"))
]


@pytest.mark.parametrize("M,N,K,dtype,has_bias,tau,layout", LLM_PARAMS)
def test_llm_int8_linear(device, M, N, K, dtype, has_bias, tau, layout):
    x = planted_outliers(M, K, dtype)
    b, sb = randint8((N, K), -127, 127), pos_scale(N, 0.0005)
    bias = torch.randn(N).to(dtype) if has_bias else None
    L = lambda t: None if t is None else with_layout(t.to(device), layout)  # noqa: E731
    y = ops.llm_int8_linear(L(x), L(b), L(sb), L(bias), tau)
    exact, mag, mask = S.llm_int8(S.f32(x), S.i64(b), S.f64(sb), None if bias is None else S.f64(bias), tau)
    if tau > 0 and M > 1:
        assert mask.sum() >= 3
    S.assert_float_output(y, exact, mag, dtype, "llm_int8_linear")


# --------------------------------------------------------------------------- empty batch


def _gemm_inputs(op, M, N=37, K=64, G=32, dtype=torch.float16, device="cpu", asym=True, bias=True):
    """Representative, valid arguments for each GEMM op (on ``device``)."""
    ng = K // G
    xa = randint8((M, K))
    x = randn_rows((M, K), dtype)
    b8 = randint8((N, K), -127, 127)
    packed = torch.randint(0, 256, (N, K // 2), dtype=torch.uint8)
    sa, sb, sbg = pos_scale(M, 0.02), pos_scale(N, 0.0005), pos_scale((N, ng), 0.003)
    zero = torch.randint(0, 16, (N, ng), dtype=torch.uint8) if asym else None
    bi = torch.randn(N).to(dtype) if bias else None
    args = {
        "int8_gemm": (xa, b8),
        "w8a8_gemm": (xa, b8, sa, sb, bi, dtype),
        "w4a8_gemm": (xa, packed, sa, sbg, zero, bi, dtype),
        "w8a16_gemm": (x, b8, sb, bi),
        "w4a16_gemm": (x, packed, sbg, zero, bi),
        "llm_int8_linear": (x, b8, sb, bi, 6.0),
    }[op]
    return tuple(a.to(device) if isinstance(a, torch.Tensor) else a for a in args)


GEMM_OPS = ("int8_gemm", "w8a8_gemm", "w4a8_gemm", "w8a16_gemm", "w4a16_gemm", "llm_int8_linear")


@pytest.mark.parametrize("op", GEMM_OPS)
def test_gemm_empty_batch(device, op):
    args = _gemm_inputs(op, 0, device=device)
    y = getattr(ops, op)(*args)
    assert tuple(y.shape) == (0, 37)
    assert y.dtype == (torch.int32 if op == "int8_gemm" else torch.float16)


# --------------------------------------------------------------------------- SQNR (docs/numerics.md s.6)


@pytest.fixture(scope="module")
def sqnr_data():
    g = torch.Generator().manual_seed(0)
    M, K, N = 256, 4096, 1024
    x = torch.randn(M, K, generator=g)
    w = torch.randn(N, K, generator=g) * 0.02
    x_out = x.clone()
    x_out[:, [17, 1000, 3333]] *= 60  # 3 planted outlier columns
    w64 = w.double().numpy()
    return {"x": x, "w": w, "x_out": x_out,
            "ref": x.double().numpy() @ w64.T, "ref_out": x_out.double().numpy() @ w64.T}


def _w8a8(x, w):
    qw, sw = ops.quantize_int8_rowwise(w)
    qx, sx = ops.quantize_int8_rowwise(x)
    return ops.w8a8_gemm(qx, qw, sx, sw, None, None)


def _w4a8(x, w, G):
    pw, sw = ops.quantize_int4_sym(w, G)
    qx, sx = ops.quantize_int8_rowwise(x)
    return ops.w4a8_gemm(qx, pw, sx, sw, None, None, None)


def _w4a16(x, w, G, asym):
    if asym:
        pw, sw, zw = ops.quantize_uint4_asym(w, G)
        return ops.w4a16_gemm(x, pw, sw, zw, None)
    pw, sw = ops.quantize_int4_sym(w, G)
    return ops.w4a16_gemm(x, pw, sw, None, None)


def _w8a16(x, w):
    qw, sw = ops.quantize_int8_rowwise(w)
    return ops.w8a16_gemm(x, qw, sw, None)


def _llm_int8(x, w):
    qw, sw = ops.quantize_int8_rowwise(w)
    return ops.llm_int8_linear(x, qw, sw, None, 6.0)


#: (scheme, function, floor dB). docs/numerics.md s.6 values in the comments; floors ~1.5 dB below
#: what this seed measures (printed on failure), never so low they cannot fail.
SQNR_CASES = [
    ("W8A8", _w8a8, 36.5),                                         # 38.2
    ("W8A16", _w8a16, 39.5),                                       # 41.2
    ("W4A16-g128-sym", lambda x, w: _w4a16(x, w, 128, False), 17.0),  # 18.6
    ("W4A16-g128-asym", lambda x, w: _w4a16(x, w, 128, True), 18.5),  # 20.0
    ("W4A16-g32-sym", lambda x, w: _w4a16(x, w, 32, False), 18.5),    # 20.2
    ("W4A16-g32-asym", lambda x, w: _w4a16(x, w, 32, True), 20.0),    # 21.8
    ("W4A8-g128", lambda x, w: _w4a8(x, w, 128), 17.0),               # 18.6
]


@pytest.mark.parametrize("scheme,fn,floor", [pytest.param(*c, id=c[0]) for c in SQNR_CASES])
def test_sqnr_floor(device, sqnr_data, scheme, fn, floor):
    out = fn(sqnr_data["x"].to(device), sqnr_data["w"].to(device))
    db = S.sqnr(sqnr_data["ref"], S.f64(out))
    assert db >= floor, f"{scheme}: SQNR {db:.2f} dB < floor {floor} dB"
    assert db < floor + 6, f"{scheme}: SQNR {db:.2f} dB implausibly high (floor {floor}): is it quantizing?"


def test_sqnr_llm_int8_outliers(device, sqnr_data):
    x, w = sqnr_data["x_out"].to(device), sqnr_data["w"].to(device)
    db_llm = S.sqnr(sqnr_data["ref_out"], S.f64(_llm_int8(x, w)))
    db_w8a8 = S.sqnr(sqnr_data["ref_out"], S.f64(_w8a8(x, w)))
    msg = f"LLM.int8 {db_llm:.2f} dB, plain W8A8 {db_w8a8:.2f} dB on 3 planted x60 outlier columns"
    assert db_llm >= 38.0, msg
    assert db_w8a8 <= 22.0, msg
    assert db_llm - db_w8a8 >= 15.0, msg


# --------------------------------------------------------------------------- non-finite activations

BAD_VALUES = [pytest.param(v, id=i) for v, i in ((math.nan, "nan"), (math.inf, "inf"), (-math.inf, "-inf"))]


@pytest.mark.parametrize("bad", BAD_VALUES)
def test_nonfinite_row_w8a8(device, bad):
    M, N, K = 5, 7, 64
    x = torch.randn(M, K)
    x_bad = x.clone()
    x_bad[2, 7] = bad
    qw, sw = ops.quantize_int8_rowwise((torch.randn(N, K) * 0.02).to(device))
    bias = torch.randn(N, device=device)
    q, s = ops.quantize_int8_rowwise(x_bad.to(device))
    q0, s0 = ops.quantize_int8_rowwise(x.to(device))
    assert not q[2].any(), "a row holding NaN/Inf quantizes to q = 0"
    assert (s[2].isnan() if math.isnan(bad) else s[2].isinf()), f"scale of the bad row: {s[2].item()}"
    keep = [0, 1, 3, 4]
    assert torch.equal(q[keep], q0[keep]) and torch.equal(s[keep], s0[keep])
    y = ops.w8a8_gemm(q, qw, s, sw, bias, None)
    y0 = ops.w8a8_gemm(q0, qw, s0, sw, bias, None)
    assert y[2].isnan().all(), f"the bad token's output row must be NaN, got {y[2]}"
    assert torch.equal(y[keep], y0[keep]), "rows without NaN/Inf must be unaffected"


@pytest.mark.parametrize("bad", BAD_VALUES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dn)
def test_nonfinite_llm_int8(device, bad, dtype):
    M, N, K, col = 5, 7, 64, 10
    x = planted_outliers(M, K, torch.float32, cols=(3, 20))
    # Inf is an outlier (|inf| >= tau): compare with the same column made an outlier by a finite value.
    # NaN is not (NaN >= tau is false): compare with an ordinary inlier value there.
    x_ref = x.clone()
    x_ref[2, col] = 0.5 if math.isnan(bad) else 100.0 * (1 if bad > 0 else -1)
    x_bad = x.clone()
    x_bad[2, col] = bad
    x_ref, x_bad = x_ref.to(dtype).to(device), x_bad.to(dtype).to(device)
    b, sb = randint8((N, K), -127, 127).to(device), pos_scale(N, 0.0005).to(device)
    bias = torch.randn(N).to(dtype).to(device)
    _, s, mask = ops.quantize_int8_rowwise_outliers(x_bad, 6.0)
    _, _, mask_ref = ops.quantize_int8_rowwise_outliers(x_ref, 6.0)
    assert torch.equal(mask, mask_ref) and bool(mask[col]) == (not math.isnan(bad))
    y = ops.llm_int8_linear(x_bad, b, sb, bias, 6.0)
    y_ref = ops.llm_int8_linear(x_ref, b, sb, bias, 6.0)
    keep = [0, 1, 3, 4]
    if math.isnan(bad):
        assert s[2].isnan() and y[2].isnan().all(), f"NaN stays an inlier: the row is NaN, got {y[2]}"
    else:
        assert s[2].isfinite() and not y[2].isfinite().any(), f"Inf takes the float path: got {y[2]}"
    assert torch.equal(y[keep], y_ref[keep]), "rows without NaN/Inf must be unaffected"


# --------------------------------------------------------------------------- opcheck


def _opcheck_cases():
    f16, bf16 = torch.float16, torch.bfloat16
    x = lambda *s, dt=torch.float32: randn_rows(s, dt)  # noqa: E731
    cases = {
        "quantize_int8_rowwise": [(x(13, 77),), (x(2, 3, 40, dt=bf16),)],
        "quantize_int8_tensor": [(x(13, 77),), (x(5, 8, dt=f16),)],
        "quantize_int8_rowwise_outliers": [(planted_outliers(13, 77, torch.float32), 6.0),
                                           (planted_outliers(3, 40, f16), 0.0)],
        "quantize_int8_asym": [(x(13, 77),), (x(2, 3, 40, dt=bf16),)],
        "dequantize_int8": [(randint8((13, 77)), pos_scale(13, 0.02), None, None),
                            (randint8((13, 77)), pos_scale(13, 0.02), randint8((13,)), f16)],
        "pack_int4": [(torch.randint(-8, 8, (5, 64), dtype=torch.int8),),
                      (torch.randint(0, 16, (2, 3, 8), dtype=torch.uint8),)],
        "unpack_int4": [(torch.randint(0, 256, (5, 32), dtype=torch.uint8), True),
                        (torch.randint(0, 256, (5, 32), dtype=torch.uint8), False)],
        "quantize_int4_sym": [(x(37, 256) * 0.02, 128), (x(5, 96, dt=f16), -1)],
        "quantize_uint4_asym": [(x(37, 256) * 0.02, 32), (x(5, 96, dt=bf16), 96)],
        "dequantize_int4": [(torch.randint(0, 256, (37, 32), dtype=torch.uint8), pos_scale((37, 2), 0.003), None, None),
                            (torch.randint(0, 256, (37, 32), dtype=torch.uint8), pos_scale((37, 2), 0.003),
                             torch.randint(0, 16, (37, 2), dtype=torch.uint8), bf16)],
    }
    w4 = x(37, 96) * 0.02
    p4, a4 = quantkernels._ops.quantize_4bit(w4, "nf4", 64)
    q4, n4, o4 = quantkernels._ops.double_quantize_absmax(a4)
    pf, af = quantkernels._ops.quantize_4bit(w4, "fp4", 32)
    cases.update({
        "quantize_4bit": [(w4, "nf4", 64), (x(5, 70, dt=bf16), "fp4", 32)],
        "double_quantize_absmax": [(a4,), (pos_scale(300, 0.1),)],
        "dequantize_4bit": [(p4, a4, "nf4", 64, None, None, None), (p4, q4, "nf4", 64, n4, o4, bf16)],
        "gemm_4bit": [(x(13, 96), p4, q4, "nf4", 64, n4, o4, None),
                      (x(3, 96, dt=f16), pf, af, "fp4", 32, None, None, torch.randn(37).half())],
    })
    for op in GEMM_OPS:
        cases[op] = [_gemm_inputs(op, 13, dtype=torch.float32, asym=False, bias=False),
                     _gemm_inputs(op, 3, dtype=f16, asym=True, bias=True)]
    return cases


@pytest.mark.parametrize("op", sorted(quantkernels._ops.OP_NAMES))
def test_opcheck(device, op):
    cases = _opcheck_cases()
    assert set(cases) == set(quantkernels._ops.OP_NAMES), "every op needs opcheck inputs"
    for args in cases[op]:
        args = tuple(a.to(device) if isinstance(a, torch.Tensor) else a for a in args)
        torch.library.opcheck(getattr(ops, op).default, args)


# --------------------------------------------------------------------------- torch.compile


def test_compile_llm_int8_fullgraph_inductor(device):
    x = planted_outliers(13, 96, torch.float16).to(device)
    b, sb = randint8((37, 96), -127, 127).to(device), pos_scale(37, 0.0005).to(device)
    bias = torch.randn(37).half().to(device)

    def f(x, b, sb, bias):
        return torch.relu(ops.llm_int8_linear(x * 2, b, sb, bias, 6.0)) + 1

    torch._dynamo.reset()
    got = torch.compile(f, fullgraph=True, backend="inductor")(x, b, sb, bias)
    torch.testing.assert_close(got, f(x, b, sb, bias), rtol=0, atol=0)


def test_compile_w4a8_fullgraph_aot_eager(device):
    x = randn_rows((13, 256)).to(device)
    pw, sw = ops.quantize_int4_sym((torch.randn(37, 256) * 0.02).to(device), 128)

    def f(x, pw, sw):
        q, s = ops.quantize_int8_rowwise(x)
        return ops.w4a8_gemm(q, pw, s, sw, None, None, torch.bfloat16).float().sum(-1)

    torch._dynamo.reset()
    got = torch.compile(f, fullgraph=True, backend="aot_eager")(x, pw, sw)
    torch.testing.assert_close(got, f(x, pw, sw), rtol=0, atol=0)


# --------------------------------------------------------------------------- bad inputs


def names(arg: str, value) -> str:
    """Regex: the message names ``arg`` and the offending ``value`` (in either order)."""
    return rf"(?s)(?=.*\b{re.escape(arg)}\b)(?=.*(?<!\w){re.escape(str(value))}(?!\w))"


def _t(*shape, dt=torch.float32):
    return torch.randn(*shape).to(dt) if dt.is_floating_point else torch.randint(-8, 8, shape).to(dt)


i8, u8, f32, f16, f64, i32 = torch.int8, torch.uint8, torch.float32, torch.float16, torch.float64, torch.int32

BAD_INPUTS = [
    # quantizers: dtypes, shapes, group sizes
    ("q8row-x-float64", lambda: ops.quantize_int8_rowwise(_t(3, 8, dt=f64)), names("x", "float64")),
    ("q8row-x-int8", lambda: ops.quantize_int8_rowwise(_t(3, 8, dt=i8)), names("x", "int8")),
    ("q8row-x-empty-K", lambda: ops.quantize_int8_rowwise(_t(3, 0)), names("x", "(3, 0)")),
    ("q8tensor-x-float64", lambda: ops.quantize_int8_tensor(_t(3, 8, dt=f64)), names("x", "float64")),
    ("q8asym-x-int32", lambda: ops.quantize_int8_asym(_t(3, 8, dt=i32)), names("x", "int32")),
    ("q8out-x-3d", lambda: ops.quantize_int8_rowwise_outliers(_t(2, 3, 8), 6.0), names("x", "(2, 3, 8)")),
    ("q8out-x-float64", lambda: ops.quantize_int8_rowwise_outliers(_t(3, 8, dt=f64), 6.0), names("x", "float64")),
    ("deq8-q-int32", lambda: ops.dequantize_int8(_t(3, 8, dt=i32), _t(3)), names("q", "int32")),
    ("deq8-scale-fp16", lambda: ops.dequantize_int8(_t(3, 8, dt=i8), _t(3, dt=f16)), names("scale", "float16")),
    ("deq8-scale-shape", lambda: ops.dequantize_int8(_t(3, 8, dt=i8), _t(5)), names("scale", "(5,)")),
    ("deq8-zero-uint8", lambda: ops.dequantize_int8(_t(3, 8, dt=i8), _t(3), _t(3, dt=u8)), names("zero", "uint8")),
    ("deq8-zero-shape", lambda: ops.dequantize_int8(_t(3, 8, dt=i8), _t(3), _t(4, dt=i8)), names("zero", "(4,)")),
    ("deq8-out-int8", lambda: ops.dequantize_int8(_t(3, 8, dt=i8), _t(3), None, i8), names("out_dtype", "int8")),
    ("pack-q-out-of-range-signed", lambda: ops.pack_int4(torch.tensor([[1, 8]], dtype=i8)), names("q", 8)),
    ("pack-q-out-of-range-neg", lambda: ops.pack_int4(torch.tensor([[-9, 0]], dtype=i8)), names("q", -9)),
    ("pack-q-out-of-range-unsigned", lambda: ops.pack_int4(torch.tensor([[16, 0]], dtype=u8)), names("q", 16)),
    ("pack-q-odd-K", lambda: ops.pack_int4(_t(2, 5, dt=i8)), names("q", "(2, 5)")),
    ("pack-q-float", lambda: ops.pack_int4(_t(2, 4)), names("q", "float32")),
    ("unpack-packed-int8", lambda: ops.unpack_int4(_t(2, 4, dt=i8), True), names("packed", "int8")),
    ("q4-group-48", lambda: ops.quantize_int4_sym(_t(4, 96), 48), names("group_size", 48)),
    ("q4-group-0", lambda: ops.quantize_int4_sym(_t(4, 96), 0), names("group_size", 0)),
    ("q4-K-not-multiple-of-G", lambda: ops.quantize_int4_sym(_t(4, 96), 64), r"K = 96.*group_size = 64"),
    ("q4-odd-K", lambda: ops.quantize_int4_sym(_t(4, 33), 33), names("K", 33)),
    ("q4-w-1d", lambda: ops.quantize_int4_sym(_t(64), 32), names("w", "1-D")),
    ("q4-w-float64", lambda: ops.quantize_int4_sym(_t(4, 64, dt=f64), 32), names("w", "float64")),
    ("u4-group-48", lambda: ops.quantize_uint4_asym(_t(4, 96), 48), names("group_size", 48)),
    ("u4-K-not-multiple-of-G", lambda: ops.quantize_uint4_asym(_t(4, 160), 128), r"K = 160.*group_size = 128"),
    ("u4-odd-K", lambda: ops.quantize_uint4_asym(_t(4, 33), -1), names("K", 33)),
    ("deq4-packed-int8", lambda: ops.dequantize_int4(_t(4, 32, dt=i8), _t(4, 2)), names("packed", "int8")),
    ("deq4-scale-rows", lambda: ops.dequantize_int4(_t(4, 32, dt=u8), _t(5, 2)), names("scale", "(5, 2)")),
    ("deq4-scale-group-48", lambda: ops.dequantize_int4(_t(4, 48, dt=u8), _t(4, 2)), names("scale", 48)),
    ("deq4-zero-int8", lambda: ops.dequantize_int4(_t(4, 32, dt=u8), _t(4, 2), _t(4, 2, dt=i8)), names("zero", "int8")),
    ("deq4-out-int8", lambda: ops.dequantize_int4(_t(4, 32, dt=u8), _t(4, 2), None, i8), names("out_dtype", "int8")),
    # int8_gemm / w8a8
    ("int8mm-a-float", lambda: ops.int8_gemm(_t(3, 8), _t(5, 8, dt=i8)), names("a", "float32")),
    ("int8mm-b-int32", lambda: ops.int8_gemm(_t(3, 8, dt=i8), _t(5, 8, dt=i32)), names("b", "int32")),
    ("int8mm-K-mismatch", lambda: ops.int8_gemm(_t(3, 8, dt=i8), _t(5, 7, dt=i8)), names("b", "(5, 7)")),
    ("int8mm-b-1d", lambda: ops.int8_gemm(_t(3, 8, dt=i8), _t(8, dt=i8)), names("b", "(8,)")),
    ("int8mm-a-3d", lambda: ops.int8_gemm(_t(2, 3, 8, dt=i8), _t(5, 8, dt=i8)), names("a", "(2, 3, 8)")),
    ("w8a8-scale_a-fp16", lambda: ops.w8a8_gemm(_t(3, 8, dt=i8), _t(5, 8, dt=i8), _t(3, dt=f16), _t(5)),
     names("scale_a", "float16")),
    ("w8a8-scale_a-shape", lambda: ops.w8a8_gemm(_t(3, 8, dt=i8), _t(5, 8, dt=i8), _t(3, 1), _t(5)),
     names("scale_a", "(3, 1)")),
    ("w8a8-scale_b-shape", lambda: ops.w8a8_gemm(_t(3, 8, dt=i8), _t(5, 8, dt=i8), _t(3), _t(4)),
     names("scale_b", "(4,)")),
    ("w8a8-bias-shape", lambda: ops.w8a8_gemm(_t(3, 8, dt=i8), _t(5, 8, dt=i8), _t(3), _t(5), _t(4)),
     names("bias", "(4,)")),
    ("w8a8-bias-int32", lambda: ops.w8a8_gemm(_t(3, 8, dt=i8), _t(5, 8, dt=i8), _t(3), _t(5), _t(5, dt=i32)),
     names("bias", "int32")),
    ("w8a8-out-int8", lambda: ops.w8a8_gemm(_t(3, 8, dt=i8), _t(5, 8, dt=i8), _t(3), _t(5), None, i8),
     names("out_dtype", "int8")),
    # w4a8
    ("w4a8-packed-K-mismatch", lambda: ops.w4a8_gemm(_t(3, 64, dt=i8), _t(5, 31, dt=u8), _t(3), _t(5, 2)),
     names("b_packed", "(5, 31)")),
    ("w4a8-packed-int8", lambda: ops.w4a8_gemm(_t(3, 64, dt=i8), _t(5, 32, dt=i8), _t(3), _t(5, 2)),
     names("b_packed", "int8")),
    ("w4a8-scale_b-group-48", lambda: ops.w4a8_gemm(_t(3, 96, dt=i8), _t(5, 48, dt=u8), _t(3), _t(5, 2)),
     names("scale_b", 48)),
    ("w4a8-scale_b-rows", lambda: ops.w4a8_gemm(_t(3, 64, dt=i8), _t(5, 32, dt=u8), _t(3), _t(4, 2)),
     names("scale_b", "(4, 2)")),
    ("w4a8-scale_b-fp16", lambda: ops.w4a8_gemm(_t(3, 64, dt=i8), _t(5, 32, dt=u8), _t(3), _t(5, 2, dt=f16)),
     names("scale_b", "float16")),
    ("w4a8-zero_b-int8", lambda: ops.w4a8_gemm(_t(3, 64, dt=i8), _t(5, 32, dt=u8), _t(3), _t(5, 2), _t(5, 2, dt=i8)),
     names("zero_b", "int8")),
    ("w4a8-zero_b-shape", lambda: ops.w4a8_gemm(_t(3, 64, dt=i8), _t(5, 32, dt=u8), _t(3), _t(5, 2), _t(5, 1, dt=u8)),
     names("zero_b", "(5, 1)")),
    ("w4a8-scale_a-shape", lambda: ops.w4a8_gemm(_t(3, 64, dt=i8), _t(5, 32, dt=u8), _t(4), _t(5, 2)),
     names("scale_a", "(4,)")),
    ("w4a8-out-int8", lambda: ops.w4a8_gemm(_t(3, 64, dt=i8), _t(5, 32, dt=u8), _t(3), _t(5, 2), None, None, i8),
     names("out_dtype", "int8")),
    # w8a16 / w4a16
    ("w8a16-x-float64", lambda: ops.w8a16_gemm(_t(3, 8, dt=f64), _t(5, 8, dt=i8), _t(5)), names("x", "float64")),
    ("w8a16-b-int32", lambda: ops.w8a16_gemm(_t(3, 8), _t(5, 8, dt=i32), _t(5)), names("b", "int32")),
    ("w8a16-b-1d", lambda: ops.w8a16_gemm(_t(3, 8), _t(8, dt=i8), _t(5)), names("b", "(8,)")),
    ("w8a16-K-mismatch", lambda: ops.w8a16_gemm(_t(3, 7), _t(5, 8, dt=i8), _t(5)), names("x", "(3, 7)")),
    ("w8a16-scale_b-fp16", lambda: ops.w8a16_gemm(_t(3, 8), _t(5, 8, dt=i8), _t(5, dt=f16)),
     names("scale_b", "float16")),
    ("w8a16-scale_b-shape", lambda: ops.w8a16_gemm(_t(3, 8), _t(5, 8, dt=i8), _t(5, 1)), names("scale_b", "(5, 1)")),
    ("w8a16-bias-shape", lambda: ops.w8a16_gemm(_t(3, 8), _t(5, 8, dt=i8), _t(5), _t(6)), names("bias", "(6,)")),
    ("w4a16-x-K-mismatch", lambda: ops.w4a16_gemm(_t(3, 32), _t(5, 32, dt=u8), _t(5, 2)), names("x", "(3, 32)")),
    ("w4a16-x-float64", lambda: ops.w4a16_gemm(_t(3, 64, dt=f64), _t(5, 32, dt=u8), _t(5, 2)), names("x", "float64")),
    ("w4a16-packed-1d", lambda: ops.w4a16_gemm(_t(3, 64), _t(32, dt=u8), _t(5, 2)), names("b_packed", "(32,)")),
    ("w4a16-scale_b-group-48", lambda: ops.w4a16_gemm(_t(3, 96), _t(5, 48, dt=u8), _t(5, 2)), names("scale_b", 48)),
    ("w4a16-zero_b-int8", lambda: ops.w4a16_gemm(_t(3, 64), _t(5, 32, dt=u8), _t(5, 2), _t(5, 2, dt=i8)),
     names("zero_b", "int8")),
    ("w4a16-bias-shape", lambda: ops.w4a16_gemm(_t(3, 64), _t(5, 32, dt=u8), _t(5, 2), None, _t(4)),
     names("bias", "(4,)")),
    # llm_int8_linear
    ("llm-x-float64", lambda: ops.llm_int8_linear(_t(3, 8, dt=f64), _t(5, 8, dt=i8), _t(5), None, 6.0),
     names("x", "float64")),
    ("llm-b-1d", lambda: ops.llm_int8_linear(_t(3, 8), _t(8, dt=i8), _t(5), None, 6.0), names("b", "(8,)")),
    ("llm-b-int32", lambda: ops.llm_int8_linear(_t(3, 8), _t(5, 8, dt=i32), _t(5), None, 6.0), names("b", "int32")),
    ("llm-K-mismatch", lambda: ops.llm_int8_linear(_t(3, 9), _t(5, 8, dt=i8), _t(5), None, 6.0), names("x", "(3, 9)")),
    ("llm-scale_b-shape", lambda: ops.llm_int8_linear(_t(3, 8), _t(5, 8, dt=i8), _t(4), None, 6.0),
     names("scale_b", "(4,)")),
    ("llm-bias-shape", lambda: ops.llm_int8_linear(_t(3, 8), _t(5, 8, dt=i8), _t(5), _t(6), 6.0),
     names("bias", "(6,)")),
    ("llm-threshold-nan", lambda: ops.llm_int8_linear(_t(3, 8), _t(5, 8, dt=i8), _t(5), None, math.nan),
     names("threshold", "nan")),
]


@pytest.mark.parametrize("call,match", [pytest.param(c, m, id=i) for i, c, m in BAD_INPUTS])
def test_bad_inputs(call, match):
    with pytest.raises(INPUT_ERRORS, match=match):
        call()


#: (op, the tensor arguments in schema order): each one in turn goes to another device.
DEVICE_ARGS = {
    "int8_gemm": ("a", "b"),
    "w8a8_gemm": ("a", "b", "scale_a", "scale_b", "bias"),
    "w4a8_gemm": ("a", "b_packed", "scale_a", "scale_b", "zero_b", "bias"),
    "w8a16_gemm": ("x", "b", "scale_b", "bias"),
    "w4a16_gemm": ("x", "b_packed", "scale_b", "zero_b", "bias"),
    "llm_int8_linear": ("x", "b", "scale_b", "bias"),
}
OTHER_DEVICES = ["meta", pytest.param("cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(not HAS_CUDA,
                                                                                          reason="no CUDA device")])]


@pytest.mark.parametrize("other", OTHER_DEVICES)
@pytest.mark.parametrize("op,arg", [pytest.param(op, a, id=f"{op}-{a}") for op, args in DEVICE_ARGS.items()
                                    for a in args])
def test_device_mismatch(op, arg, other):
    args = list(_gemm_inputs(op, 3, device="cpu", asym=True, bias=True))
    tensor_pos = [i for i, a in enumerate(args) if isinstance(a, torch.Tensor)]
    i = tensor_pos[DEVICE_ARGS[op].index(arg)]
    args[i] = args[i].to(other)
    with pytest.raises(INPUT_ERRORS, match=names(arg, other)):
        getattr(ops, op)(*args)


@pytest.mark.parametrize("other", OTHER_DEVICES)
@pytest.mark.parametrize("op,arg", [("dequantize_int8", "scale"), ("dequantize_int8", "zero"),
                                    ("dequantize_int4", "scale"), ("dequantize_int4", "zero")])
def test_device_mismatch_dequantize(op, arg, other):
    if op == "dequantize_int8":
        args = {"q": randint8((3, 8)), "scale": pos_scale(3, 0.02), "zero": randint8((3,))}
    else:
        args = {"packed": torch.randint(0, 256, (5, 32), dtype=u8), "scale": pos_scale((5, 2), 0.003),
                "zero": torch.randint(0, 16, (5, 2), dtype=u8)}
    args[arg] = args[arg].to(other)
    with pytest.raises(INPUT_ERRORS, match=names(arg, other)):
        getattr(ops, op)(*args.values())


# --------------------------------------------------------------------------- empty quantizer inputs


@pytest.mark.parametrize("op", ["quantize_int8_rowwise", "quantize_int8_tensor", "quantize_int8_asym"])
def test_quantizers_empty_batch(device, op):
    x = torch.randn(0, 77, device=device)
    out = getattr(ops, op)(x)
    assert tuple(out[0].shape) == (0, 77) and out[0].dtype == torch.int8
    if op == "quantize_int8_tensor":
        assert out[1].dim() == 0 and out[1].item() == 1.0, "absmax of nothing is 0: scale 1"
