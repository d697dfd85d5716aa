"""C++ CPU kernel of quantkernels::gemm_4bit (csrc/cpu/gemm_4bit.cpp; NF4 / FP4, docs/numerics.md s.11).

The op (torch.ops.quantkernels.gemm_4bit) is the C++ kernel once quantkernels._C is loaded. Every
case runs on every ISA level (tests/_isa.py; the levels this CPU lacks are skipped), the sweep
alternating 1 and 2 threads between cases and test_threads_agree running both. The output is held
to docs/numerics.md s.6 against the numpy spec's float64 product with the weight rounded to x's
dtype (the dequantized weight itself is checked bit-exactly through both paths). Shapes cover
the GEMV (M <= 8) and the tiled path, K % 32 == 0 (decoded in registers) and not (scalar), blocks
that span rows, and double quantization."""

import numpy as np
import pytest
import torch

import _spec as S
import quantkernels._ops  # noqa: F401
from quantkernels import _native
from quantkernels import _ops as O
from quantkernels import reference as R

from _isa import isa, threads  # noqa: F401  (fixtures)

if not _native.load():
    pytest.skip(f"native extension quantkernels._C not available: {_native.REASON}", allow_module_level=True)

OPS = torch.ops.quantkernels
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.fixture
def set_threads():
    old = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(old)


def test_threads_agree(isa, threads):  # noqa: F811
    """The same result at 1 and 2 threads on both paths (rows are split across threads, sums are not)."""
    for M in (1, 9, 40, 64, 100):  # 64, 100 at bf16 / avx512_bf16: the M-in-lanes tiles
        x, packed, absmax, nested, offset, bias = _case(M, 70, 128, "nf4", 64, True, torch.bfloat16, seed=M)
        got = OPS.gemm_4bit(x, packed, absmax, "nf4", 64, nested, offset, bias)
        torch.set_num_threads(1)
        one = OPS.gemm_4bit(x, packed, absmax, "nf4", 64, nested, offset, bias)
        torch.set_num_threads(threads)
        assert torch.equal(got, one), (isa, threads, M)


def test_native_kernel_is_registered_for_cpu():
    assert torch._C._dispatch_has_kernel_for_dispatch_key("quantkernels::gemm_4bit", "CPU")


def _case(M, N, K, qt, bs, dq, dtype, seed, bias=True, noncontig=False):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(N, K, generator=g) * 0.05
    w[N // 2] = 0.0
    packed, absmax = O.quantize_4bit(w, qt, bs)
    nested = offset = None
    if dq:
        absmax, nested, offset = O.double_quantize_absmax(absmax)
    x = (torch.randn(M, K, generator=g) * 2.0).to(dtype)
    if noncontig:
        x = torch.empty(K, M, dtype=dtype).t().copy_(x)
    b = torch.randn(N, generator=g).to(dtype) if bias else None
    return x, packed, absmax, nested, offset, b


def _spec_weight(packed, absmax, nested, offset, qt, bs, N, K):
    b = S.i64(packed)
    nib = np.stack([b >> 4, b & 15], -1).reshape(N, K)
    am = S.f32(absmax) if nested is None else S.undouble_quant(S.i64(absmax), S.f32(nested), S.f32(offset))
    return S.dequant_4bit(nib, am, qt, bs)


CASES = [
    # M, N, K, qt, bs, dq
    (1, 37, 64, "nf4", 64, False), (1, 13, 96, "fp4", 64, True),      # K % 64 != 0: blocks span rows
    (3, 40, 130, "nf4", 32, False),                                     # K % 32 != 0: scalar decode
    (8, 19, 256, "fp4", 128, False), (9, 37, 96, "nf4", 32, True),      # GEMV / tiled boundary
    (33, 130, 128, "fp4", 256, True), (17, 300, 192, "nf4", 64, False),  # several panels of 128 rows
    (2, 5, 4096, "nf4", 4096, True), (0, 7, 64, "nf4", 64, False),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("case", CASES, ids=[f"M{c[0]}-N{c[1]}-K{c[2]}-{c[3]}-b{c[4]}{'-dq' if c[5] else ''}"
                                             for c in CASES])
def test_gemm_4bit_matches_spec(isa, set_threads, case, dtype):  # noqa: F811
    M, N, K, qt, bs, dq = case
    set_threads(1 + (CASES.index(case) + DTYPES.index(dtype)) % 2)  # half the cases at 1 thread, half at 2
    x, packed, absmax, nested, offset, bias = _case(M, N, K, qt, bs, dq, dtype, seed=M * 1000 + K,
                                                    noncontig=(N % 2 == 1))
    got = OPS.gemm_4bit(x, packed, absmax, qt, bs, nested, offset, bias)
    assert got.dtype == dtype and got.shape == (M, N)
    if M == 0:
        return
    wx = S.round_to(_spec_weight(packed, absmax, nested, offset, qt, bs, N, K), dtype)
    exact, mag = S.weight_only(S.f32(x), wx, S.f32(bias))
    S.assert_float_output(got, exact, mag, dtype, f"gemm_4bit[{isa}] {case}", underflow_terms=K + 1)
    ref = R.gemm_4bit(x, packed, absmax, qt, bs, nested, offset, bias)
    if dtype == torch.float32:
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("qt", ["nf4", "fp4"])
def test_decoded_weight_is_bit_exact(isa, qt):  # noqa: F811
    """x = identity rows through the tiled path: y = the weight rounded to x's dtype, exactly."""
    N, K, bs = 40, 96, 32
    for dq in (False, True):
        _, packed, absmax, nested, offset, _ = _case(1, N, K, qt, bs, dq, torch.float32, seed=5)
        want = R.dequantize_4bit(packed, absmax, qt, bs, nested, offset)
        for dtype in DTYPES:
            eye = torch.eye(K, dtype=dtype)                            # M = K = 96 > 8: the tiled path
            got = OPS.gemm_4bit(eye, packed, absmax, qt, bs, nested, offset, None)
            assert torch.equal(got.t(), want.to(dtype)), (isa, qt, dq, dtype)
            one = torch.zeros(1, K, dtype=dtype)                       # M = 1: the GEMV path, one column at a time
            for k in (0, 1, 31, 32, 95):
                one.zero_()
                one[0, k] = 1
                col = OPS.gemm_4bit(one, packed, absmax, qt, bs, nested, offset, None)[0]
                assert torch.equal(col, want[:, k].to(dtype)), (isa, qt, dq, dtype, k)


def test_nonfinite_absmax_propagates(isa):  # noqa: F811
    w = torch.randn(8, 64)
    w[2, 5] = float("nan")
    w[5, 1] = float("inf")
    packed, absmax = O.quantize_4bit(w, "nf4", 32)
    for M in (1, 12):
        y = OPS.gemm_4bit(torch.randn(M, 64), packed, absmax, "nf4", 32, None, None, None)
        ref = R.gemm_4bit(torch.randn(M, 64), packed, absmax, "nf4", 32)
        assert bool(y[:, 2].isnan().all()) and not bool(y[:, 5].isfinite().any())
        assert bool(y[:, [0, 1, 3, 4, 6, 7]].isfinite().all()) and bool(ref[:, [0, 1, 3, 4, 6, 7]].isfinite().all())


def test_variant_named_per_isa(isa):  # noqa: F811
    v = _native.cpu_kernel_variants()["gemm_4bit"]
    assert v.startswith("portable" if isa == "portable" else ("avx2" if isa in ("avx2", "avx_vnni") else "avx512")), v


def test_dynamic_table_matches_reference(isa):  # noqa: F811
    """The C++ copy of the 8-bit dynamic map (s.11.5): every entry, through absmax codes 0..255."""
    q = torch.arange(256, dtype=torch.uint8)                   # one block of 32 values per row
    packed = torch.full((256, 16), 0xFF, dtype=torch.uint8)    # nibble 15: NF4 code 1.0
    x = torch.zeros(1, 32)
    x[0, 3] = 1.0
    y = OPS.gemm_4bit(x, packed, q, "nf4", 32, torch.ones(1), torch.zeros(()), None)[0]
    assert torch.equal(y, R.DYNAMIC_CODE), (y - R.DYNAMIC_CODE).abs().max()


@pytest.mark.parametrize("scale", [1.0, 1e-20, 1e-36], ids=["normal", "tiny", "near-underflow"])
def test_bf16_tiles_and_underflow(isa, scale):  # noqa: F811
    """bf16 x at M > 8: vdpbf16ps tiles at avx512_bf16 (which flush subnormals) only when no product can
    underflow; tiny activations take the fp32 tiles. Both within s.6 of the float64 product."""
    M, N, K = 20, 48, 128
    x, packed, absmax, nested, offset, bias = _case(M, N, K, "nf4", 64, False, torch.bfloat16, seed=11, bias=False)
    x = (x.float() * scale).to(torch.bfloat16)
    got = OPS.gemm_4bit(x, packed, absmax, "nf4", 64, None, None, None)
    wx = S.round_to(_spec_weight(packed, absmax, None, None, "nf4", 64, N, K), torch.bfloat16)
    exact, mag = S.weight_only(S.f32(x), wx, None)
    S.assert_float_output(got, exact, mag, torch.bfloat16, f"bf16 tiles [{isa}] x{scale}", underflow_terms=K + 1)


GEMV64_CASES = [
    # M, N, K, qt, bs, dq: the 64-value GEMV steps (avx512, block >= 64, K % 64 == 0); N not a multiple of the
    # 4 / 2 rows per tile (tails), blocks spanning rows (bs > K) and several blocks per row
    (1, 7, 64, "nf4", 128, False), (2, 9, 192, "fp4", 64, True), (3, 5, 128, "nf4", 64, False),
    (4, 11, 256, "nf4", 256, True), (5, 3, 64, "fp4", 64, False), (6, 7, 320, "nf4", 64, False),
    (7, 6, 128, "nf4", 1024, True), (8, 13, 192, "fp4", 128, False),
]


@pytest.mark.parametrize("case", GEMV64_CASES, ids=[f"M{c[0]}-N{c[1]}-K{c[2]}-{c[3]}-b{c[4]}" for c in GEMV64_CASES])
def test_gemv64_every_m(isa, set_threads, case):  # noqa: F811
    """Every M of the GEMV (each is its own instantiation), all three dtypes, against s.6."""
    M, N, K, qt, bs, dq = case
    set_threads(1 + M % 2)
    for dtype in DTYPES:
        x, packed, absmax, nested, offset, bias = _case(M, N, K, qt, bs, dq, dtype, seed=M * 7 + K)
        got = OPS.gemm_4bit(x, packed, absmax, qt, bs, nested, offset, bias)
        wx = S.round_to(_spec_weight(packed, absmax, nested, offset, qt, bs, N, K), dtype)
        exact, mag = S.weight_only(S.f32(x), wx, S.f32(bias))
        S.assert_float_output(got, exact, mag, dtype, f"gemv64[{isa}] {case}", underflow_terms=K + 1)


@pytest.mark.parametrize("bs", [64, 256])
def test_gemv64_decoded_weight_is_bit_exact(isa, bs):  # noqa: F811
    """One-hot rows through the GEMV at M = 1..8: every column of the weight (each of the four nibble
    phases of a 64-value step, both halves of a byte) comes back exactly, in every row of the output."""
    N, K = 9, 128
    _, packed, absmax, nested, offset, _ = _case(1, N, K, "nf4", bs, True, torch.float32, seed=bs)
    want = R.dequantize_4bit(packed, absmax, "nf4", bs, nested, offset)
    for dtype in DTYPES:
        for M in (1, 3, 8):
            for k0 in range(0, K, M):
                ks = [k for k in range(k0, k0 + M) if k < K]
                one = torch.zeros(M, K, dtype=dtype)
                one[torch.arange(len(ks)), torch.tensor(ks)] = 1
                got = OPS.gemm_4bit(one, packed, absmax, "nf4", bs, nested, offset, None)
                assert torch.equal(got[: len(ks)], want[:, ks].t().to(dtype)), (isa, bs, dtype, M, ks)


@pytest.mark.parametrize("bs", [32, 64, 128])
def test_bf16_words_decoded_weight_is_bit_exact(isa, set_threads, bs):  # noqa: F811
    """bf16 x, K % 64 == 0 (at avx512_bf16: the weight decoded to bf16 words into vdpbf16ps; block 32 puts a
    step's two blocks in the table's two halves, 128 spans rows at K = 192): identity rows through the tiles
    (M = K) and one-hot rows through the GEMV (M = 1, 3, 8) give the weight rounded to bf16 exactly."""
    N, K = 29, 192  # N: tails of the 4 / 2-row GEMV tiles and of the 24-row panels
    for dq in (False, True):
        set_threads(1 + dq)
        _, packed, absmax, nested, offset, _ = _case(1, N, K, "nf4", bs, dq, torch.float32, seed=bs + dq)
        want = R.dequantize_4bit(packed, absmax, "nf4", bs, nested, offset).to(torch.bfloat16)
        eye = torch.eye(K, dtype=torch.bfloat16)
        got = OPS.gemm_4bit(eye, packed, absmax, "nf4", bs, nested, offset, None)
        assert torch.equal(got.t(), want), (isa, bs, dq)
        for M in (1, 3, 8):
            for k0 in (0, 29, 62, 63, 64, 127, K - M):
                ks = list(range(k0, k0 + M))
                one = torch.zeros(M, K, dtype=torch.bfloat16)
                one[torch.arange(M), torch.tensor(ks)] = 1
                got = OPS.gemm_4bit(one, packed, absmax, "nf4", bs, nested, offset, None)
                assert torch.equal(got, want[:, ks].t()), (isa, bs, dq, M, ks)


LANE_CASES = [
    # M, N, K, qt, bs, dq, threads: bf16 x at avx512_bf16, the M-in-lanes tiles (M >= 32, near a multiple of 16):
    # 2 x 12 / 3 x 8 / 4 x 6 tiles, ragged M rows (100: 4 past 96); K = 1152: two K blocks of 512 pairs
    (32, 29, 64, "nf4", 64, False, 1), (48, 53, 192, "fp4", 32, False, 2), (100, 75, 1152, "nf4", 64, True, 2),
    (128, 200, 640, "nf4", 128, False, 1),
]


@pytest.mark.parametrize("case", LANE_CASES, ids=[f"M{c[0]}-N{c[1]}-K{c[2]}-{c[3]}-b{c[4]}" for c in LANE_CASES])
def test_bf16_lane_tiles_match_spec(isa, set_threads, case):  # noqa: F811
    M, N, K, qt, bs, dq, t = case
    set_threads(t)
    x, packed, absmax, nested, offset, bias = _case(M, N, K, qt, bs, dq, torch.bfloat16, seed=M * 1000 + K)
    got = OPS.gemm_4bit(x, packed, absmax, qt, bs, nested, offset, bias)
    assert got.dtype == torch.bfloat16 and got.shape == (M, N)
    wx = S.round_to(_spec_weight(packed, absmax, nested, offset, qt, bs, N, K), torch.bfloat16)
    exact, mag = S.weight_only(S.f32(x), wx, S.f32(bias))
    S.assert_float_output(got, exact, mag, torch.bfloat16, f"lane tiles [{isa}] {case}", underflow_terms=K + 1)


def test_bf16_lane_tiles_decoded_weight_is_bit_exact(isa, set_threads):  # noqa: F811
    """bf16 x, M-in-lanes tiles (M = 64, 112; K = 1152: two K blocks of 512 pairs, the second partial): one-hot
    rows picking M consecutive columns, in either block and across the boundary, give the weight rounded to bf16
    exactly, at 1 and 2 threads; N = 101: chunk tails and a ragged 16-row store."""
    N, K = 101, 1152
    _, packed, absmax, nested, offset, _ = _case(1, N, K, "nf4", 64, True, torch.float32, seed=5)
    want = R.dequantize_4bit(packed, absmax, "nf4", 64, nested, offset).to(torch.bfloat16)
    for t, M in ((1, 64), (2, 112)):
        set_threads(t)
        for k0 in (0, 1000, K - M, 1024 - M // 2):
            ks = list(range(k0, k0 + M))
            one = torch.zeros(M, K, dtype=torch.bfloat16)
            one[torch.arange(M), torch.tensor(ks)] = 1
            got = OPS.gemm_4bit(one, packed, absmax, "nf4", 64, nested, offset, None)
            assert torch.equal(got, want[:, ks].t()), (isa, t, M, k0)


@pytest.mark.parametrize("bs", [32, 64])
def test_bf16_guard_tiny_rows_and_denormal_x(isa, set_threads, bs):  # noqa: F811
    """vcvtne2ps2bf16 and vdpbf16ps read denormals as zero: rows whose scaled code table has a denormal entry
    (absmax ~1e-38), or entries so small that a product could underflow (absmax ~1e-30), go to the fp32 path
    row by row; an x holding a denormal sends the whole call there. Checked against the reference relative to
    those rows' own scale (a flush would give zeros), against s.6, and at 1 and 2 threads alike."""
    N, K = 30, 128
    g = torch.Generator().manual_seed(bs)
    w = torch.randn(N, K, generator=g) * 0.05
    tiny, small = [3, 17, 25], [8, 9]
    w[tiny] *= 1e-37
    w[small] *= 1e-30
    packed, absmax = O.quantize_4bit(w, "nf4", bs)
    assert float(absmax.view(N, -1)[tiny].min()) < 1.2e-38 / 0.07  # some table entries are denormal
    for M in (1, 3, 20, 48):  # 48: the M-in-lanes tiles
        x = torch.randn(M, K, generator=g).to(torch.bfloat16)
        outs = []
        for t in (1, 2):
            set_threads(t)
            outs.append(OPS.gemm_4bit(x, packed, absmax, "nf4", bs, None, None, None))
        assert torch.equal(outs[0], outs[1]), (isa, bs, M)
        got, ref = outs[0].double(), R.gemm_4bit(x, packed, absmax, "nf4", bs).double()
        for rows in (tiny, small):
            err, scale = (got[:, rows] - ref[:, rows]).norm(), ref[:, rows].norm()
            assert scale > 0 and err <= 2e-2 * scale, (isa, bs, M, rows, float(err), float(scale))
        wx = S.round_to(_spec_weight(packed, absmax, None, None, "nf4", bs, N, K), torch.bfloat16)
        exact, mag = S.weight_only(S.f32(x), wx, None)
        S.assert_float_output(outs[0], exact, mag, torch.bfloat16, f"guard [{isa}] b{bs} M{M}", underflow_terms=K + 1)
    # a denormal x value (bf16 keeps fp32's exponent range) times weights so large that every row passes the
    # weight guard (entries >= 2^-100 / |x|): the product is normal and nonzero, vdpbf16ps would drop it
    big = torch.randn(N, K, generator=g) * 1e10
    packed, absmax = O.quantize_4bit(big, "nf4", bs)
    for M in (1, 20, 48):
        x = torch.randn(M, K, generator=g).to(torch.bfloat16)
        x[0] = 0
        x[0, 5] = 5e-39
        assert 0 < float(x[0, 5].abs()) < 1.18e-38
        got = OPS.gemm_4bit(x, packed, absmax, "nf4", bs, None, None, None)[0].double()
        ref = R.gemm_4bit(x, packed, absmax, "nf4", bs)[0].double()
        assert ref.norm() > 0 and (got - ref).norm() <= 2e-2 * ref.norm(), (isa, bs, M)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_nonfinite_absmax_propagates_k128(isa, dtype):  # noqa: F811
    """NaN / Inf weights with K % 64 == 0 (the bf16-word paths for bf16 x), blocks 32 and 64."""
    for bs in (32, 64):
        w = torch.randn(8, 128)
        w[2, 70] = float("nan")
        w[5, 1] = float("inf")
        packed, absmax = O.quantize_4bit(w, "nf4", bs)
        for M in (1, 12):
            x = torch.randn(M, 128).to(dtype)
            y = OPS.gemm_4bit(x, packed, absmax, "nf4", bs, None, None, None)
            assert bool(y[:, 2].isnan().all()) and not bool(y[:, 5].isfinite().any()), (isa, bs, M)
            assert bool(y[:, [0, 1, 3, 4, 6, 7]].isfinite().all()), (isa, bs, M)
