"""C++ CPU kernels of quantkernels::w8a16_gemm and quantkernels::w4a16_gemm (csrc/cpu/weight_only.cpp).

The op (torch.ops.quantkernels.*) is the C++ kernel once quantkernels._C is loaded; the
reference functions are imported directly. docs/numerics.md s.6: fp32 output within rel 1e-5 of
the fp64 evaluation of the formula (the kernel factors the scale out of the K-sum for fp32 x,
so it is not bit-identical); fp16/bf16 output within assert_close defaults of the reference,
whose weight is rounded to x's dtype element by element -- test_weight_rounded_per_element
checks that rounding bit-exactly. Every case runs on every ISA level (tests/_isa.py: portable, avx2,
avx_vnni, avx512, avx512_vnni, avx512_bf16; the ones this CPU lacks are skipped); the sweeps alternate
1 and 2 threads between cases, the multi-thread tests run both.
"""
import itertools

import pytest
import torch

import quantkernels._ops  # noqa: F401  (schemas + reference registration)
from quantkernels import _native
from quantkernels import reference as R

from _isa import isa, threads  # noqa: F401  (fixtures)

if not _native.load():
    pytest.skip(f"native extension quantkernels._C not available: {_native.REASON}", allow_module_level=True)

OPS = torch.ops.quantkernels
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
DT_ID = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def test_native_kernels_are_registered_for_cpu():
    # Otherwise every test below would silently compare the reference with itself.
    for op in ("w8a16_gemm", "w4a16_gemm"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"quantkernels::{op}", "CPU"), op


@pytest.fixture
def set_threads():
    """For the big sweeps: the test picks 1 or 2 threads per case (half the cases each)."""
    old = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(old)


def _x(M, K, dtype, g, noncontig=False):
    x = torch.randn(M, K, generator=g) * torch.exp2(torch.randint(-3, 4, (M, 1), generator=g).float())
    x = x.to(dtype)
    if noncontig:
        x = torch.empty(K, M, dtype=dtype).t().copy_(x)
        assert not x.is_contiguous() or M <= 1
    return x


def _bias(N, kind, g):
    if kind == "none":
        return None
    return torch.randn(N, generator=g).to({"fp32": torch.float32, "bf16": torch.bfloat16}[kind])


def _check(out, x, w_rounded, bias, ref):
    """out vs the fp64 formula (fp32) or vs the reference (fp16/bf16)."""
    M, N = x.shape[0], w_rounded.shape[0]
    assert out.dtype == x.dtype and out.shape == (M, N) and out.is_contiguous()
    if x.dtype == torch.float32:
        w = w_rounded.double()
        y = x.double() @ w.t()
        scale = x.double().abs() @ w.abs().t()  # the size of the terms: a cancelling sum keeps a bound
        if bias is not None:
            y, scale = y + bias.double(), scale + bias.double().abs()
        err = (out.double() - y).abs()
        assert bool((err <= 1e-5 * scale + 1e-30).all()), f"max rel err {(err / (scale + 1e-30)).max().item()}"
    else:
        torch.testing.assert_close(out, ref)


# --------------------------------------------------------------------------- w8a16

MS = (0, 1, 2, 3, 4, 5, 7, 8, 17, 67)  # 5..8: the AVX2 GEMV per chunk of 4 rows; 17, 67: tiled
W8_NK = [(1, 8), (7, 33), (13, 256), (37, 1031)]   # N odd; K around the 8-wide vector and the 128 flush
W8_CASES = list(itertools.product(MS, W8_NK, DTYPES))


@pytest.mark.parametrize("M,NK,dtype", W8_CASES, ids=[f"M{m}-N{n}-K{k}-{DT_ID[d]}" for m, (n, k), d in W8_CASES])
def test_w8a16(M, NK, dtype, isa, set_threads):
    N, K = NK
    set_threads(1 + (M + N + DTYPES.index(dtype)) % 2)
    g = torch.Generator().manual_seed(M * 1009 + N * 31 + K)
    x = _x(M, K, dtype, g, noncontig=M % 2 == 1)
    b = torch.randint(-127, 128, (N, K), dtype=torch.int8, generator=g)
    b[0, :2] = -128                                      # valid int8, outside the quantizer's range
    s = torch.rand(N, generator=g) * 0.01 + 1e-3
    bias = _bias(N, ("none", "fp32", "bf16")[(M + K) % 3], g)
    out = OPS.w8a16_gemm(x, b, s, bias)
    _check(out, x, (b.float() * s[:, None]).to(dtype), bias, R.w8a16_gemm(x, b, s, bias))


# --------------------------------------------------------------------------- w4a16

W4_MS = (0, 1, 2, 3, 4, 5, 8, 17, 67)
# (N, K, G): G in 32/64/128/256 and G = K, including a K that is not a multiple of 16 (only G = K allows it).
W4_NKG = [(5, 256, 32), (6, 544, 32), (3, 512, 64), (13, 384, 128), (9, 512, 256), (7, 200, 200), (11, 38, 38), (1, 2, 2)]
W4_CASES = [(m, nkg, d, z) for m, nkg, d, z in itertools.product(W4_MS, W4_NKG, DTYPES, (False, True))
            if m in (0, 1, 4, 5, 8, 67) or nkg[2] in (32, 200)]


def _int4_weight(N, K, G, zero, g):
    w = torch.randn(N, K, generator=g) * 0.02
    if zero:
        w = w + 0.01  # asymmetric range: zero points away from 8
        return R.quantize_uint4_asym(w, G)
    p, s = R.quantize_int4_sym(w, G)
    return p, s, None


@pytest.mark.parametrize("M,NKG,dtype,zero", W4_CASES,
                         ids=[f"M{m}-N{n}-K{k}-G{gs}-{DT_ID[d]}-{'asym' if z else 'sym'}"
                              for m, (n, k, gs), d, z in W4_CASES])
def test_w4a16(M, NKG, dtype, zero, isa, set_threads):
    N, K, G = NKG
    set_threads(1 + (M + N + DTYPES.index(dtype) + zero) % 2)
    g = torch.Generator().manual_seed(M * 1009 + N * 31 + K + G + zero)
    x = _x(M, K, dtype, g, noncontig=M % 2 == 1)
    p, s, z = _int4_weight(N, K, G, zero, g)
    bias = _bias(N, ("none", "fp32", "bf16")[(M + G) % 3], g)
    out = OPS.w4a16_gemm(x, p, s, z, bias)
    _check(out, x, R.dequantize_int4(p, s, z).to(dtype), bias, R.w4a16_gemm(x, p, s, z, bias))


@pytest.mark.parametrize("M", (1, 3, 67))
def test_w4a16_full_nibble_range(M, isa):
    # Every nibble 0..15 in every position, signed (-8..7) and with extreme zero points (0, 15).
    g = torch.Generator().manual_seed(M)
    N, K, G = 17, 256, 32
    p = torch.randint(0, 256, (N, K // 2), dtype=torch.uint8, generator=g)
    p[0] = torch.arange(128, dtype=torch.uint8) * 2 + 1  # all byte values in row 0
    s = torch.rand(N, K // G, generator=g) + 0.5
    z = torch.randint(0, 16, (N, K // G), dtype=torch.uint8, generator=g)
    z[1], z[2] = 0, 15
    x = _x(M, K, torch.float32, g)
    for zz in (None, z):
        out = OPS.w4a16_gemm(x, p, s, zz, None)
        _check(out, x, R.dequantize_int4(p, s, zz), None, R.w4a16_gemm(x, p, s, zz, None))


# --------------------------------------------------------------------------- tails of the AVX-512 tiles
# The AVX-512 paths (avx512 .. avx512_bf16): the GEMV for M <= 8; tiled for M >= 9 with x in blocks
# of 16 rows (fp32: 32 per micro tile x 12 weight rows; bf16: 64 x 6, the last 48 / 32 / 16 rows 3 x 8 /
# 2 x 12 / 1 x 12), chunks of 48 weight rows, K blocks of 256 fp32 units / 512 bf16 pairs (1024 K;
# an odd K pads one pair), int4 in 64- and 32-element chunks with a natural-order tail (G = K). (M, N) are cycled over the K / G cases, as are the x layouts:
# contiguous, transposed, and a 2-D slice of a 3-D tensor (row stride 2 K).
TAIL_MN = [(9, 13), (16, 48), (17, 49), (31, 61), (33, 97), (47, 12), (1, 13), (6, 50), (8, 9), (64, 100)]
TAIL_W8_K = [8, 31, 255, 512, 513, 1030]
TAIL_W4_KG = [(96, 32), (160, 32), (544, 32), (576, 64), (640, 128), (768, 256), (1024, 1024), (1000, 1000), (72, 72)]
X_KINDS = ("contig", "transposed", "slice3d")


def _x_kind(M, K, dtype, g, kind):
    if kind == "contig":
        return _x(M, K, dtype, g)
    if kind == "transposed":
        return _x(M, K, dtype, g, noncontig=True)
    x3 = torch.stack([_x(M, K, dtype, g), _x(M, K, dtype, g)], dim=1)  # [M, 2, K]
    return x3[:, 1]


W8_TAIL = [(i, k, d) for i, (k, d) in enumerate(itertools.product(TAIL_W8_K, DTYPES))]


@pytest.mark.parametrize("i,K,dtype", W8_TAIL, ids=[f"K{k}-{DT_ID[d]}-{i}" for i, k, d in W8_TAIL])
def test_w8a16_tails(i, K, dtype, isa, set_threads):
    M, N = TAIL_MN[i % len(TAIL_MN)]
    set_threads(1 + i % 2)
    g = torch.Generator().manual_seed(i * 7 + K)
    x = _x_kind(M, K, dtype, g, X_KINDS[i % 3])
    b = torch.randint(-128, 128, (N, K), dtype=torch.int8, generator=g)
    s = torch.rand(N, generator=g) * 0.01 + 1e-3
    bias = _bias(N, ("none", "fp32", "bf16")[i % 3], g)
    out = OPS.w8a16_gemm(x, b, s, bias)
    _check(out, x, (b.float() * s[:, None]).to(dtype), bias, R.w8a16_gemm(x, b, s, bias))


W4_TAIL = [(i, kg, d, z) for i, (kg, d, z) in enumerate(itertools.product(TAIL_W4_KG, DTYPES, (False, True)))]


@pytest.mark.parametrize("i,KG,dtype,zero", W4_TAIL,
                         ids=[f"K{k}-G{gs}-{DT_ID[d]}-{'asym' if z else 'sym'}-{i}" for i, (k, gs), d, z in W4_TAIL])
def test_w4a16_tails(i, KG, dtype, zero, isa, set_threads):
    K, G = KG
    M, N = TAIL_MN[(i * 3 + zero) % len(TAIL_MN)]
    set_threads(1 + i % 2)
    g = torch.Generator().manual_seed(i * 11 + K + G)
    x = _x_kind(M, K, dtype, g, X_KINDS[i % 3])
    p, s, z = _int4_weight(N, K, G, zero, g)
    bias = _bias(N, ("none", "fp32", "bf16")[(i // 3) % 3], g)
    out = OPS.w4a16_gemm(x, p, s, z, bias)
    _check(out, x, R.dequantize_int4(p, s, z).to(dtype), bias, R.w4a16_gemm(x, p, s, z, bias))


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_ID.get)
def test_tiled_large_chunks(dtype, isa, set_threads):
    # M > 32 and N >= 12 chunks x 192 rows on 1 thread: the AVX-512 tiled path's 4x chunks (with a
    # ragged last chunk and micro tile), K with an odd pair and a 32-chunk tail.
    set_threads(1)
    g = torch.Generator().manual_seed(11)
    M, N, K = 33, 12 * 192 + 17, 98
    x = _x(M, K, dtype, g)
    b = torch.randint(-128, 128, (N, K), dtype=torch.int8, generator=g)
    s = torch.rand(N, generator=g) * 0.01 + 1e-3
    bias = _bias(N, "fp32", g)
    _check(OPS.w8a16_gemm(x, b, s, bias), x, (b.float() * s[:, None]).to(dtype), bias, R.w8a16_gemm(x, b, s, bias))
    p, s4, z = _int4_weight(N, K, K, True, g)
    _check(OPS.w4a16_gemm(x, p, s4, z), x, R.dequantize_int4(p, s4, z).to(dtype), None, R.w4a16_gemm(x, p, s4, z))


# bf16 tiled path: every mix of its micro tiles (Mp = M rounded up to 16: 80 = 64 + 16, 96 = 64 + 32,
# 112 = 64 + 48, 144 = 64 + 64 + 16), N not a multiple of the 24 decoded rows, two K blocks (the second
# partial; int8 with an odd K, int4 with G = 64 and with a natural-order tail G = K), the x layouts.
TILE_MIX = [(72, 53, 1031, None), (95, 30, 1088, 64), (100, 101, 1050, 1050), (130, 25, 1030, None),
            (112, 7, 1152, 128), (80, 49, 1152, 32)]


@pytest.mark.parametrize("i", range(len(TILE_MIX)))
def test_bf16_tile_mix(i, isa, set_threads):
    M, N, K, G = TILE_MIX[i]
    set_threads(1 + i % 2)
    g = torch.Generator().manual_seed(100 + i)
    x = _x_kind(M, K, torch.bfloat16, g, X_KINDS[i % 3])
    bias = _bias(N, ("none", "fp32", "bf16")[i % 3], g)
    if G is None:
        b = torch.randint(-128, 128, (N, K), dtype=torch.int8, generator=g)
        s = torch.rand(N, generator=g) * 0.01 + 1e-3
        _check(OPS.w8a16_gemm(x, b, s, bias), x, (b.float() * s[:, None]).to(x.dtype), bias, R.w8a16_gemm(x, b, s, bias))
    else:
        p, s, z = _int4_weight(N, K, G, i % 2 == 1, g)
        _check(OPS.w4a16_gemm(x, p, s, z, bias), x, R.dequantize_int4(p, s, z).to(x.dtype), bias,
               R.w4a16_gemm(x, p, s, z, bias))


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_ID.get)
@pytest.mark.parametrize("M", (1, 17))
def test_nonfinite_x_propagates(M, dtype, isa):
    """Inf / NaN in x give NaN / Inf where the reference does (the zero padding of the tiles adds
    nothing: a padded x element is 0 and so is its weight)."""
    g = torch.Generator().manual_seed(3)
    N, K = 13, 96
    x = _x(M, K, dtype, g)
    x[0, 5] = float("inf")
    x[-1, 40] = float("nan")
    b = torch.randint(-127, 128, (N, K), dtype=torch.int8, generator=g)
    s = torch.rand(N, generator=g) * 0.01 + 1e-3
    torch.testing.assert_close(OPS.w8a16_gemm(x, b, s), R.w8a16_gemm(x, b, s), equal_nan=True)
    p, s4, z = _int4_weight(N, K, 32, True, g)
    torch.testing.assert_close(OPS.w4a16_gemm(x, p, s4, z), R.w4a16_gemm(x, p, s4, z), equal_nan=True)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=DT_ID.get)
@pytest.mark.parametrize("M", (1, 4, 5, 8, 9, 17, 67))
def test_weight_rounded_per_element(M, dtype, isa):
    """x rows with two ones: y = W[n, a] + W[n, b], exact in fp32, so the output equals the
    reference bit for bit only if each weight was rounded to x's dtype before the sum (rounding
    the sum once instead differs for many (a, b))."""
    g = torch.Generator().manual_seed(M)
    N, K = 33, 256
    x = torch.zeros(M, K, dtype=dtype)
    for m in range(M):
        x[m, torch.randperm(K, generator=g)[:2]] = 1
    b = torch.randint(-127, 128, (N, K), dtype=torch.int8, generator=g)
    s = torch.rand(N, generator=g) * 0.01 + 1e-3
    torch.testing.assert_close(OPS.w8a16_gemm(x, b, s), R.w8a16_gemm(x, b, s), rtol=0, atol=0)
    for p, s4, z in (_int4_weight(N, K, 32, False, g), _int4_weight(N, K, 64, True, g)):
        s4 = s4 * (1 + torch.rand(s4.shape, generator=g))  # scales with many mantissa bits
        torch.testing.assert_close(OPS.w4a16_gemm(x, p, s4, z), R.w4a16_gemm(x, p, s4, z), rtol=0, atol=0)


# bf16 x, M <= 4 at avx512_bf16: the register-decode GEMV (tiles of 4 weight rows, int4 in 64-element
# steps with per-(row, group) vpermw tables, int8 in 32-element steps with a masked K tail). N = 7: one
# tile and three single rows; int4: G = 32 (two groups per step), 64..256 and G = K; int8: K tails.
GEMV_BF16_CASES = [("w4", 256, 32), ("w4", 256, 64), ("w4", 384, 128), ("w4", 512, 256), ("w4", 192, 192),
                   ("w8", 256, 0), ("w8", 97, 0), ("w8", 48, 0), ("w8", 15, 0)]


@pytest.mark.parametrize("kind,K,G", GEMV_BF16_CASES, ids=[f"{k}-K{kk}-G{g}" for k, kk, g in GEMV_BF16_CASES])
@pytest.mark.parametrize("M", (1, 2, 3, 4))
def test_bf16_gemv_rows_exact(M, kind, K, G, isa):
    """x rows with two ones (as test_weight_rounded_per_element): bit-exact against the reference for
    every weight row of a tile and of the row tail, every K step and tail, asym and sym int4."""
    g = torch.Generator().manual_seed(M * 100 + K + G)
    N = 7
    x = torch.zeros(M, K, dtype=torch.bfloat16)
    for m in range(M):
        x[m, torch.randperm(K, generator=g)[:2]] = 1
    x[0, K - 1] = 1  # the last K position (int8: the masked tail)
    if kind == "w8":
        b = torch.randint(-128, 128, (N, K), dtype=torch.int8, generator=g)
        s = (torch.rand(N, generator=g) + 0.5) * 0.01
        torch.testing.assert_close(OPS.w8a16_gemm(x, b, s), R.w8a16_gemm(x, b, s), rtol=0, atol=0)
        return
    for zero in (False, True):
        p, s4, z = _int4_weight(N, K, G, zero, g)
        s4 = s4 * (1 + torch.rand(s4.shape, generator=g))  # scales with many mantissa bits
        torch.testing.assert_close(OPS.w4a16_gemm(x, p, s4, z), R.w4a16_gemm(x, p, s4, z), rtol=0, atol=0)


@pytest.mark.parametrize("M", (1, 4))
def test_bf16_gemv_denormal_scales(M, isa):
    """Denormal scales (the GEMV then rounds the weights with integer RNE instead of vcvtne2ps2bf16):
    within the vdpbf16ps contract (terms below 2^-126 may be dropped), NaN-free."""
    g = torch.Generator().manual_seed(M)
    N, K = 6, 128
    x = torch.randn(M, K, generator=g).to(torch.bfloat16)
    b = torch.randint(-128, 128, (N, K), dtype=torch.int8, generator=g)
    s = torch.rand(N, generator=g) * 0.01 + 1e-3
    s[1] = 2.0 ** -130
    torch.testing.assert_close(OPS.w8a16_gemm(x, b, s), R.w8a16_gemm(x, b, s), rtol=1.6e-2, atol=1e-36)
    for G, zero in ((32, False), (64, True)):
        p, s4, z = _int4_weight(N, K, G, zero, g)
        s4[2, 0] = 2.0 ** -131
        s4[4, -1] = 3 * 2.0 ** -133
        torch.testing.assert_close(OPS.w4a16_gemm(x, p, s4, z), R.w4a16_gemm(x, p, s4, z), rtol=1.6e-2, atol=1e-36)


@pytest.mark.parametrize("M", (2, 7))
def test_large_k_fp32_accuracy(M, isa):
    # Per-channel int4 (G = K) and int8 at a large K (GEMV and tiled): the long sums stay within 1e-5.
    g = torch.Generator().manual_seed(5)
    N, K = 9, 8192 + 6
    x = _x(M, K, torch.float32, g)
    p, s, z = _int4_weight(N, K, K, True, g)
    _check(OPS.w4a16_gemm(x, p, s, z), x, R.dequantize_int4(p, s, z), None, R.w4a16_gemm(x, p, s, z))
    b = torch.randint(-127, 128, (N, K), dtype=torch.int8, generator=g)
    sb = torch.rand(N, generator=g)
    _check(OPS.w8a16_gemm(x, b, sb), x, b.float() * sb[:, None], None, R.w8a16_gemm(x, b, sb))


@pytest.mark.parametrize("M", (1, 67))
def test_multi_thread_large_n(M, isa, threads):
    # Enough rows that 2 threads split the work (GEMV grain, tiled N tiles) with a ragged tail.
    g = torch.Generator().manual_seed(M)
    N, K = 1000 + 3, 512
    x = _x(M, K, torch.float32, g)
    p, s, z = _int4_weight(N, K, 128, True, g)
    _check(OPS.w4a16_gemm(x, p, s, z), x, R.dequantize_int4(p, s, z), None, R.w4a16_gemm(x, p, s, z))
    b = torch.randint(-127, 128, (N, K), dtype=torch.int8, generator=g)
    sb = torch.rand(N, generator=g) * 0.01
    _check(OPS.w8a16_gemm(x, b, sb), x, b.float() * sb[:, None], None, R.w8a16_gemm(x, b, sb))


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_ID.get)
def test_tiled_thread_split_is_exact(dtype, isa, set_threads):
    # The tiled path (M >= 9) gives each thread an equal contiguous range of weight rows (bounds rounded
    # to 16 rows) and walks it in chunks. Every output is one micro tile's sum over all of K, whatever
    # the split: 1, 2 and 3 threads must give the same bits. N = 33 on 3 threads leaves the middle
    # thread no rows (bounds 0, 16, 16, 33); N = 40 gives 16 / 16 / 8 rows; N = 600 at M = 80 uses the
    # 2x / 4x chunks (ragged last chunk per thread).
    g = torch.Generator().manual_seed(21)
    K = 128
    for M, N in ((9, 33), (17, 40), (80, 600)):
        x = _x(M, K, dtype, g)
        b = torch.randint(-127, 128, (N, K), dtype=torch.int8, generator=g)
        s = torch.rand(N, generator=g) * 0.01 + 1e-3
        p, s4, z = _int4_weight(N, K, 64, True, g)
        outs = []
        for t in (1, 2, 3):
            set_threads(t)
            outs.append((OPS.w8a16_gemm(x, b, s), OPS.w4a16_gemm(x, p, s4, z)))
        for o8, o4 in outs[1:]:
            assert torch.equal(o8, outs[0][0]) and torch.equal(o4, outs[0][1]), (M, N)
        _check(outs[0][0], x, (b.float() * s[:, None]).to(dtype), None, R.w8a16_gemm(x, b, s))
        _check(outs[0][1], x, R.dequantize_int4(p, s4, z).to(dtype), None, R.w4a16_gemm(x, p, s4, z))


def test_non_contiguous_weights(isa):
    g = torch.Generator().manual_seed(9)
    M, N, K = 3, 7, 64
    x = _x(M, K, torch.float32, g)
    b = torch.randint(-127, 128, (2 * N, K), dtype=torch.int8, generator=g)[::2]
    s = (torch.rand(2 * N, generator=g) * 0.01)[::2]
    _check(OPS.w8a16_gemm(x, b, s), x, b.float() * s[:, None], None, R.w8a16_gemm(x, b, s))
    p, s4, z = _int4_weight(N, K, 32, True, g)
    pt = torch.empty(K // 2, N, dtype=torch.uint8).t().copy_(p)
    assert not pt.is_contiguous()
    _check(OPS.w4a16_gemm(x, pt, s4, z), x, R.dequantize_int4(p, s4, z), None, R.w4a16_gemm(x, p, s4, z))


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_ID.get)
def test_opcheck(dtype):
    g = torch.Generator().manual_seed(0)
    x = _x(3, 64, dtype, g)
    b = torch.randint(-127, 128, (5, 64), dtype=torch.int8, generator=g)
    torch.library.opcheck(OPS.w8a16_gemm.default, (x, b, torch.rand(5), torch.randn(5)))
    p, s, z = _int4_weight(5, 64, 32, True, g)
    torch.library.opcheck(OPS.w4a16_gemm.default, (x, p, s, z, None))


# --------------------------------------------------------------------------- errors: the reference's messages


def _same_error(exc, fn_native, fn_ref):
    with pytest.raises(exc) as native:
        fn_native()
    with pytest.raises(exc) as ref:
        fn_ref()
    assert str(native.value) == str(ref.value)


def _w8_bad():
    x, b, s = torch.randn(3, 8), torch.zeros(5, 8, dtype=torch.int8), torch.ones(5)
    return [
        (TypeError, (x, b.float(), s, None)),
        (ValueError, (x, b[0], s, None)),
        (TypeError, (x.double(), b, s, None)),
        (ValueError, (x[0], b, s, None)),
        (ValueError, (torch.randn(3, 0), b, s, None)),
        (ValueError, (x[None], b, s, None)),
        (ValueError, (torch.randn(3, 9), b, s, None)),
        (TypeError, (x, b, s.double(), None)),
        (ValueError, (x, b, torch.ones(4), None)),
        (TypeError, (x, b, s, torch.zeros(5, dtype=torch.int32))),
        (ValueError, (x, b, s, torch.zeros(6))),
    ]


@pytest.mark.parametrize("case", range(len(_w8_bad())))
def test_w8a16_errors(case):
    exc, args = _w8_bad()[case]
    _same_error(exc, lambda: OPS.w8a16_gemm(*args), lambda: R.w8a16_gemm(*args))


def _w4_bad():
    x, p = torch.randn(3, 64), torch.zeros(5, 32, dtype=torch.uint8)
    s, z = torch.ones(5, 2), torch.zeros(5, 2, dtype=torch.uint8)
    return [
        (TypeError, (x, p.to(torch.int8), s, z, None)),
        (ValueError, (x, p[0], s, z, None)),
        (TypeError, (x, p, s.half(), z, None)),
        (ValueError, (x, p, s[0], z, None)),
        (ValueError, (x, p, torch.ones(4, 2), z, None)),
        (ValueError, (x, p, torch.ones(5, 3), None, None)),    # 3 groups do not divide K = 64
        (ValueError, (x, p, torch.ones(5, 4), None, None)),    # G = 16
        (TypeError, (x, p, s, z.to(torch.int8), None)),
        (ValueError, (x, p, s, z[:, :1], None)),
        (TypeError, (x.to(torch.int8), p, s, z, None)),
        (ValueError, (torch.randn(3, 62), p, s, z, None)),
        (ValueError, (x, p, s, z, torch.zeros(5, 1))),
        (TypeError, (x, p, s, None, torch.zeros(5, dtype=torch.float64))),
    ]


@pytest.mark.parametrize("case", range(len(_w4_bad())))
def test_w4a16_errors(case):
    exc, args = _w4_bad()[case]
    _same_error(exc, lambda: OPS.w4a16_gemm(*args), lambda: R.w4a16_gemm(*args))
