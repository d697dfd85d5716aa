"""C++ CPU kernels of w4a8_gemm (csrc/cpu/w4a8.cpp), quantize_int8_rowwise_outliers and
llm_int8_linear (csrc/cpu/llm_int8.cpp) against the pure-PyTorch reference (imported directly:
once quantkernels._C is loaded, torch.ops.quantkernels.<op> is the C++ kernel) and fp64 formulas.

Integers (q, outliers) exactly; fp32 outputs within 1e-5 of the fp64 formula relative to the size
of its terms (docs/numerics.md s.6); fp16/bf16 outputs vs the reference with assert_close defaults.
Every case runs on every ISA level (tests/_isa.py; levels the CPU lacks are skipped) and at 1 and 2 threads.
"""
import itertools

import pytest
import torch

import quantkernels._ops  # noqa: F401  (op schemas first)
from quantkernels import _native
from quantkernels import reference as R
from _isa import isa, threads  # noqa: F401  (fixtures)

if not _native.load():
    pytest.skip(f"native extension quantkernels._C not available: {_native.REASON}", allow_module_level=True)

OPS = torch.ops.quantkernels
# Every ISA level (tests/_isa.py): those this CPU lacks are skipped, with a message.
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DT_ID = {None: "default", torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def test_kernels_are_registered_for_cpu():
    # Otherwise every test below would compare the reference with itself.
    for op in ("w4a8_gemm", "quantize_int8_rowwise_outliers", "llm_int8_linear"):
        assert _native.has_kernel(op, "CPU"), op


def _assert_fp32_close(out, y64, scale, tol=1e-5):
    err = (out.double() - y64).abs()
    bad = ~(err <= tol * scale + 1e-30)
    assert not bool(bad.any()), f"max rel err {(err / (scale + 1e-30)).max().item()} at {bad.nonzero()[:5].tolist()}"


# --------------------------------------------------------------------------- w4a8_gemm

MS = (0, 1, 2, 3, 4, 5, 17, 67)
# (N, K, G): odd N; G in 32/64/128/256 and G = K, including K not a multiple of 32 (G = K only).
NKG = [(7, 256, 32), (13, 256, 64), (5, 512, 128), (3, 512, 256), (9, 96, 96), (11, 100, 100), (1, 2, 2),
       (19, 4096 + 64, 64)]
W4A8_CASES = list(itertools.product(MS, NKG, ["sym", "asym"]))


def _w4a8_inputs(M, N, K, G, kind, seed, bias_dtype=None):
    g = torch.Generator().manual_seed(seed)
    a = torch.randint(-128, 128, (M, K), dtype=torch.int8, generator=g)
    a[:, : min(K, 2)] = -128  # any int8 is exact, -128 included
    w = torch.randn(N, K, generator=g)
    if kind == "sym":
        (bp, sb), zb = R.quantize_int4_sym(w, G), None
    else:
        bp, sb, zb = R.quantize_uint4_asym(w, G)
    sa = torch.rand(M, generator=g) * 0.05 + 1e-3
    bias = None if bias_dtype is None else torch.randn(N, generator=g).to(bias_dtype)
    return a, bp, sa, sb, zb, bias


def _w4a8_fp64(a, bp, sa, sb, zb, bias):
    M, K = a.shape
    N, ng = sb.shape
    G = K // ng
    q = R.unpack_int4(bp, signed=zb is None).double().reshape(N, ng, G)
    if zb is not None:
        q = q - zb.double().unsqueeze(-1)
    c = torch.einsum("mgk,ngk->mng", a.double().reshape(M, ng, G), q)          # exact integers
    terms = c * sb.double().unsqueeze(0) * sa.double()[:, None, None]
    y = terms.sum(-1)
    scale = terms.abs().sum(-1)
    if bias is not None:
        y = y + bias.double()
        scale = scale + bias.double().abs()
    return y, scale


@pytest.mark.parametrize("M,nkg,kind", W4A8_CASES,
                         ids=[f"M{m}-N{n}-K{k}-G{g}-{kd}" for m, (n, k, g), kd in W4A8_CASES])
def test_w4a8_gemm(M, nkg, kind, isa, threads):
    N, K, G = nkg
    a, bp, sa, sb, zb, bias = _w4a8_inputs(M, N, K, G, kind, seed=M * 7919 + N * 31 + K + G)
    out = OPS.w4a8_gemm(a, bp, sa, sb, zb, bias, None)
    assert out.dtype == torch.float32 and out.shape == (M, N)
    _assert_fp32_close(out, *_w4a8_fp64(a, bp, sa, sb, zb, bias))


# K a multiple of 64 with G = 32 or a multiple of 64 takes the decode GEMV (w4a8.cpp): G = 32 (two
# groups per 64-chunk), 64 / 128 / 256 and per-channel G = K = 640 (int16 flushes inside a group);
# K = 200 and K = 96 (G = 32) the tiled path.
DECODE_NKG = [(515, 512, 32), (7, 96, 32), (203, 4096, 128), (67, 200, 200), (37, 512, 64), (6, 448, 64),
              (21, 768, 256), (9, 640, 640)]
DECODE_CASES = list(itertools.product((1, 2, 3, 4), DECODE_NKG, ["sym", "asym"]))


@pytest.mark.parametrize("M,nkg,kind", DECODE_CASES,
                         ids=[f"M{m}-N{n}-K{k}-G{g}-{kd}" for m, (n, k, g), kd in DECODE_CASES])
def test_w4a8_gemm_decode(M, nkg, kind, isa, threads):
    # Decode (M <= 4, one pass over the weights with the next tile prefetched): several 64-row
    # N blocks split over the threads, ragged N tails, bias on.
    N, K, G = nkg
    a, bp, sa, sb, zb, bias = _w4a8_inputs(M, N, K, G, kind, seed=M * 3 + N + G, bias_dtype=torch.float32)
    out = OPS.w4a8_gemm(a, bp, sa, sb, zb, bias, None)
    _assert_fp32_close(out, *_w4a8_fp64(a, bp, sa, sb, zb, bias))


# M >= 9 (M >= 5 where the GEMV does not apply) with G in 32..256 takes the panel path (w4a8.cpp):
# several 128-token M blocks with a
# ragged last 16-token panel, 64-row N blocks with an N tail of 1, 2048-wide K blocks plus a tail;
# a K tail of 96 (48 packed bytes: one 32-byte unpack step and one 16-byte step).
PANEL_CASES = list(itertools.product([(131, 133, 2048 + 256, 32), (37, 70, 2048 + 256, 256), (5, 3, 128, 128),
                                      (19, 9, 2048 + 96, 32)],
                                     ["sym", "asym"]))


@pytest.mark.parametrize("mnkg,kind", PANEL_CASES, ids=[f"M{m}-N{n}-K{k}-G{g}-{kd}" for (m, n, k, g), kd in PANEL_CASES])
def test_w4a8_gemm_panel_blocks(mnkg, kind, isa, threads):
    M, N, K, G = mnkg
    a, bp, sa, sb, zb, bias = _w4a8_inputs(M, N, K, G, kind, seed=M + N + G, bias_dtype=torch.bfloat16)
    out = OPS.w4a8_gemm(a, bp, sa, sb, zb, bias, None)
    _assert_fp32_close(out, *_w4a8_fp64(a, bp, sa, sb, zb, bias))


# 4 < M <= 8 with K % 64 == 0 and G = 32 or G % 64 == 0 runs the decode GEMV on row chunks of 4
# (w4a8.cpp, run_gemv_split_avx2): every chunk writes its own output rows.
SPLIT_CASES = list(itertools.product([5, 6, 7, 8], [(70, 320, 32), (9, 384, 128)], ["sym", "asym"]))


@pytest.mark.parametrize("M,nkg,kind", SPLIT_CASES, ids=[f"M{m}-N{n}-K{k}-G{g}-{kd}" for m, (n, k, g), kd in SPLIT_CASES])
def test_w4a8_gemm_small_batch_gemv_chunks(M, nkg, kind, isa, threads):
    N, K, G = nkg
    a, bp, sa, sb, zb, bias = _w4a8_inputs(M, N, K, G, kind, seed=M * 7 + G, bias_dtype=torch.float32)
    out = OPS.w4a8_gemm(a, bp, sa, sb, zb, bias, None)
    _assert_fp32_close(out, *_w4a8_fp64(a, bp, sa, sb, zb, bias))
    for dt in (torch.float16, torch.bfloat16):  # 2-byte outputs: the chunks' row offsets in elements
        torch.testing.assert_close(OPS.w4a8_gemm(a, bp, sa, sb, zb, bias, dt), R.w4a8_gemm(a, bp, sa, sb, zb, bias, dt))


@pytest.mark.parametrize("out_dtype", [None, torch.float32, torch.float16, torch.bfloat16], ids=DT_ID.get)
@pytest.mark.parametrize("bias_dtype", [None, torch.float32, torch.bfloat16], ids=DT_ID.get)
@pytest.mark.parametrize("M", (1, 2, 5, 8))
def test_w4a8_gemm_dtypes_bias(M, bias_dtype, out_dtype, isa):
    a, bp, sa, sb, zb, bias = _w4a8_inputs(M, 13, 256, 128, "asym", seed=M, bias_dtype=bias_dtype)
    out = OPS.w4a8_gemm(a, bp, sa, sb, zb, bias, out_dtype)
    dt = out_dtype or torch.float32
    assert out.dtype == dt and out.shape == (M, 13)
    if dt == torch.float32:
        _assert_fp32_close(out, *_w4a8_fp64(a, bp, sa, sb, zb, bias))
    else:
        torch.testing.assert_close(out, R.w4a8_gemm(a, bp, sa, sb, zb, bias, out_dtype))


@pytest.mark.parametrize("M", (4, 20))
def test_w4a8_gemm_extremes(M, isa):
    # Every nibble at its extreme and a = -128 / 127 over a whole G = 256 group: the int16
    # sums inside the kernel reach their bound (8 * 2 * 15 * 128 = 30720) without saturating.
    # M = 4: the decode GEMV; M = 20: the panel path (two 16-token panels, the second ragged).
    N, K, G = 6, 512, 256
    a = torch.full((M, K), -128, dtype=torch.int8)
    a[1] = 127
    a[2, ::2] = 127
    q_sym = torch.full((N, K), -8, dtype=torch.int8)
    q_sym[1] = 7
    q_sym[2, 1::2] = 7
    q_asym = torch.full((N, K), 15, dtype=torch.uint8)
    q_asym[1] = 0
    for bp, zb in [(R.pack_int4(q_sym), None), (R.pack_int4(q_asym), torch.randint(0, 16, (N, 2), dtype=torch.uint8))]:
        sa, sb = torch.ones(M), torch.ones(N, 2)
        out = OPS.w4a8_gemm(a, bp, sa, sb, zb, None, None)
        y64, _ = _w4a8_fp64(a, bp, sa, sb, zb, None)
        torch.testing.assert_close(out.double(), y64, rtol=0, atol=0)  # integers < 2^24: exact in fp32


@pytest.mark.parametrize("M", (1, 2, 3, 4))
def test_w4a8_gemv_extremes(M, isa):
    # Decode GEMV bounds: a = -128 / 127 against nibbles 0 / 15 over a per-channel K = 1024 group
    # (int16 sums of 8 maddubs results reach 8 * 2 * 15 * 128 = 30720), zero points 0 and 15.
    N, K = 5, 1024
    a = torch.full((M, K), -128, dtype=torch.int8)
    a[0, 1::2] = 127
    q_sym = torch.full((N, K), -8, dtype=torch.int8)
    q_sym[1] = 7
    q_sym[2, ::2] = 7
    q_asym = torch.full((N, K), 15, dtype=torch.uint8)
    q_asym[1] = 0
    z = torch.tensor([[0], [15], [0], [15], [7]], dtype=torch.uint8)
    for bp, zb in [(R.pack_int4(q_sym), None), (R.pack_int4(q_asym), z)]:
        sa, sb = torch.ones(M), torch.ones(N, 1)
        out = OPS.w4a8_gemm(a, bp, sa, sb, zb, None, None)
        y64, _ = _w4a8_fp64(a, bp, sa, sb, zb, None)
        torch.testing.assert_close(out.double(), y64, rtol=0, atol=0)  # integers < 2^24: exact in fp32


def test_w4a8_gemm_non_contiguous(isa, threads):
    M, N, K, G = 13, 29, 512, 64
    a, bp, sa, sb, zb, bias = _w4a8_inputs(M, N, K, G, "asym", seed=5, bias_dtype=torch.float32)
    a_nc = torch.empty(K, M, dtype=torch.int8).t().copy_(a)
    bp_nc = torch.empty(2 * N, K // 2, dtype=torch.uint8)[::2].copy_(bp)
    sb_nc = torch.empty(sb.shape[1], N).t().copy_(sb)
    sa_nc = torch.empty(M, 2)[:, 0].copy_(sa)
    assert not any(t.is_contiguous() for t in (a_nc, bp_nc, sb_nc, sa_nc))
    out = OPS.w4a8_gemm(a_nc, bp_nc, sa_nc, sb_nc, zb, bias, None)
    torch.testing.assert_close(out, OPS.w4a8_gemm(a, bp, sa, sb, zb, bias, None), rtol=0, atol=0)


def test_w4a8_matches_reference_and_sqnr():
    # The table of docs/numerics.md s.6: W4A8 g128 18.6 dB against the unquantized F.linear.
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 4096, generator=g)
    w = torch.randn(256, 4096, generator=g) * 0.02
    xq, sx = R.quantize_int8_rowwise(x)
    bp, sb = R.quantize_int4_sym(w, 128)
    out = OPS.w4a8_gemm(xq, bp, sx, sb, None, None, None)
    torch.testing.assert_close(out, R.w4a8_gemm(xq, bp, sx, sb), rtol=1e-5, atol=1e-5)
    ref = x.double() @ w.double().t()
    sqnr = 10 * torch.log10(ref.pow(2).mean() / (ref - out.double()).pow(2).mean())
    assert sqnr.item() > 17.0


# --------------------------------------------------------------------------- quantize_int8_rowwise_outliers


def _planted(M, K, dtype, seed, cols=(3, 17), scale=60.0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=g)
    for c in cols:
        if c < K:
            x[:, c] *= scale
    if M > 2 and K > 40:
        x[M // 2, 40] = 6.0       # exactly the threshold: an outlier (>=)
        x[M // 3, K - 1] = -5.99  # just below it: an inlier
    return x.to(dtype)


def _assert_quant_same(got, want):
    (gq, gs, go), (wq, ws, wo) = got, want
    assert gq.dtype == torch.int8 and gs.dtype == torch.float32 and go.dtype == torch.bool
    assert torch.equal(go, wo), f"outliers differ at {(go != wo).nonzero()[:8].tolist()}"
    assert torch.equal(gq, wq), f"q differs at {(gq != wq).nonzero()[:8].tolist()}"
    assert torch.equal(gs.isnan(), ws.isnan())
    assert torch.equal(gs.nan_to_num(), ws.nan_to_num())


QO_CASES = list(itertools.product((0, 1, 3, 4, 5, 17, 67), (1, 41, 4096 + 9)))


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_ID.get)
@pytest.mark.parametrize("M,K", QO_CASES, ids=[f"M{m}-K{k}" for m, k in QO_CASES])
def test_quantize_outliers(M, K, dtype, isa):
    x = _planted(M, K, dtype, seed=M * 131 + K)
    for thr in (6.0, 0.0, -1.0, 2.5):
        got = OPS.quantize_int8_rowwise_outliers(x, thr)
        _assert_quant_same(got, R.quantize_int8_rowwise_outliers(x, thr))
        if thr <= 0:
            assert not got[2].any()
    if M > 0 and K > 17:
        assert OPS.quantize_int8_rowwise_outliers(x, 6.0)[2][[3, 17]].all()


def test_quantize_outliers_threads(isa, threads):
    # Several column blocks (1024) of the outlier pass and row chunks of the quantizer per thread.
    x = _planted(67, 3 * 1024 + 5, torch.float32, seed=8, cols=(3, 1500, 3000))
    _assert_quant_same(OPS.quantize_int8_rowwise_outliers(x, 6.0), R.quantize_int8_rowwise_outliers(x, 6.0))


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_ID.get)
def test_quantize_outliers_special_values(dtype, isa):
    K = 45
    x = _planted(12, K, torch.float32, seed=1)
    x[0, 6] = float("nan")            # NaN is never an outlier: the row's scale becomes NaN, q = 0
    x[1, 9] = float("inf")            # Inf is an outlier column: zeroed, row stays finite
    x[2, 3] = float("nan")            # NaN inside an outlier column: zeroed with it
    x[3] = 0.0                        # all-zero row: scale 1
    x[4, :] = 0.0
    x[4, 17] = 100.0                  # only outliers: inlier absmax 0 -> scale 1, q = 0
    x[5, 30] = -float("inf")
    x[6] = torch.tensor([127.0, 0.5, 1.5, 2.5, -0.5] * 9)  # rounding ties
    x = x.to(dtype)
    for thr in (6.0, 0.0, float("inf"), 1e-50):
        _assert_quant_same(OPS.quantize_int8_rowwise_outliers(x, thr), R.quantize_int8_rowwise_outliers(x, thr))
    q, s, o = OPS.quantize_int8_rowwise_outliers(x, 6.0)
    assert s[0].isnan() and not q[0].any() and o[9] and o[30] and s[1].isfinite() and s[3] == 1 and s[4] == 1


@pytest.mark.parametrize("layout", ["transposed", "strided"])
def test_quantize_outliers_non_contiguous(layout, isa):
    x = _planted(19, 77, torch.float32, seed=2)
    x_nc = torch.empty(77, 19).t().copy_(x) if layout == "transposed" else torch.empty(19, 154)[:, ::2].copy_(x)
    assert not x_nc.is_contiguous()
    _assert_quant_same(OPS.quantize_int8_rowwise_outliers(x_nc, 6.0), R.quantize_int8_rowwise_outliers(x, 6.0))


# --------------------------------------------------------------------------- llm_int8_linear


def _llm_inputs(M, N, K, dtype, seed, bias_dtype=None):
    g = torch.Generator().manual_seed(seed + 1)
    x = _planted(M, K, dtype, seed, cols=(3, 17, K // 2))
    wq, sw = R.quantize_int8_rowwise(torch.randn(N, K, generator=g) * 0.02)
    bias = None if bias_dtype is None else torch.randn(N, generator=g).to(bias_dtype)
    return x, wq, sw, bias


def _llm_fp64(x, wq, sw, bias, thr):
    # docs/numerics.md s.5 in fp64 given the (bit-exact, tested above) quantizer output.
    q, sx, o = R.quantize_int8_rowwise_outliers(x, thr)
    main = (q.double() @ wq.double().t()) * sx.double()[:, None] * sw.double()[None, :]
    xo = torch.where(o, x.double(), torch.zeros((), dtype=torch.float64))
    wd = wq.double() * sw.double()[:, None]
    corr = xo @ wd.t()
    y = main + corr
    scale = main.abs() + xo.abs() @ wd.abs().t()
    if bias is not None:
        y, scale = y + bias.double(), scale + bias.double().abs()
    return y, scale


LLM_CASES = list(itertools.product((0, 1, 3, 4, 5, 17, 67), (1, 13, 101), (64, 1000)))


@pytest.mark.parametrize("M,N,K", LLM_CASES, ids=[f"M{m}-N{n}-K{k}" for m, n, k in LLM_CASES])
def test_llm_int8_linear_fp32(M, N, K, isa, threads):
    x, wq, sw, bias = _llm_inputs(M, N, K, torch.float32, seed=M * 17 + N * 3 + K, bias_dtype=torch.float32)
    for thr, b in ((6.0, bias), (6.0, None), (0.0, bias)):
        out = OPS.llm_int8_linear(x, wq, sw, b, thr)
        assert out.dtype == torch.float32 and out.shape == (M, N)
        _assert_fp32_close(out, *_llm_fp64(x, wq, sw, b, thr))


@pytest.mark.parametrize("bias_dtype", [None, torch.float32, torch.bfloat16], ids=DT_ID.get)
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_ID.get)
def test_llm_int8_linear_dtypes(dtype, bias_dtype, isa):
    x, wq, sw, bias = _llm_inputs(67, 131, 1000, dtype, seed=3, bias_dtype=bias_dtype)
    for thr in (6.0, 0.0):
        out = OPS.llm_int8_linear(x, wq, sw, bias, thr)
        ref = R.llm_int8_linear(x, wq, sw, bias, thr)
        assert out.dtype == dtype and out.shape == ref.shape
        torch.testing.assert_close(out, ref)


def test_llm_int8_linear_more_blocks(isa, threads):
    # More than one M block (128) and N block (96) of the int8 GEMM, and K beyond 4096.
    x, wq, sw, bias = _llm_inputs(130, 200, 4100, torch.float32, seed=9, bias_dtype=torch.float32)
    _assert_fp32_close(OPS.llm_int8_linear(x, wq, sw, bias, 6.0), *_llm_fp64(x, wq, sw, bias, 6.0))


def test_llm_int8_linear_special_values(isa):
    x, wq, sw, bias = _llm_inputs(9, 23, 64, torch.float32, seed=4, bias_dtype=torch.float32)
    x[0, 5] = float("nan")        # NaN inlier: the whole row is NaN (scale NaN), as in the reference
    x[1, 9] = float("inf")        # Inf: an outlier column, Inf/NaN through the correction
    x[2, 3] = float("nan")        # NaN inside an outlier column: NaN row through the correction
    x[4] = 0.0
    for thr in (6.0, 0.0):
        out, ref = OPS.llm_int8_linear(x, wq, sw, bias, thr), R.llm_int8_linear(x, wq, sw, bias, thr)
        assert torch.equal(out.isnan(), ref.isnan()) and torch.equal(out.isinf(), ref.isinf())
        fin = ref.isfinite()
        torch.testing.assert_close(out[fin], ref[fin], rtol=1e-5, atol=1e-5)
    assert OPS.llm_int8_linear(x, wq, sw, bias, 6.0)[0].isnan().all()


def test_llm_int8_linear_non_contiguous(isa, threads):
    x, wq, sw, bias = _llm_inputs(13, 29, 515, torch.float32, seed=6, bias_dtype=torch.float32)
    x_nc = torch.empty(515, 13).t().copy_(x)
    wq_nc = torch.empty(58, 515, dtype=torch.int8)[::2].copy_(wq)
    sw_nc = torch.empty(29, 2)[:, 0].copy_(sw)
    assert not any(t.is_contiguous() for t in (x_nc, wq_nc, sw_nc))
    torch.testing.assert_close(OPS.llm_int8_linear(x_nc, wq_nc, sw_nc, bias, 6.0),
                               OPS.llm_int8_linear(x, wq, sw, bias, 6.0), rtol=0, atol=0)


def test_llm_int8_sqnr():
    # docs/numerics.md s.6: W8A8 with 3 planted x60 outlier columns 19.8 dB, LLM.int8 40.1 dB.
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 4096, generator=g)
    x[:, [7, 1000, 3333]] *= 60
    w = torch.randn(1024, 4096, generator=g) * 0.02
    wq, sw = R.quantize_int8_rowwise(w)
    ref = x.double() @ w.double().t()

    def sqnr(out):
        return (10 * torch.log10(ref.pow(2).mean() / (ref - out.double()).pow(2).mean())).item()

    assert sqnr(OPS.llm_int8_linear(x, wq, sw, None, 6.0)) > 38.0
    assert sqnr(OPS.llm_int8_linear(x, wq, sw, None, 0.0)) < 22.0


# --------------------------------------------------------------------------- validation


def _raises(exc, match, fn, *args):
    with pytest.raises(exc, match=match):
        fn(*args)


@pytest.mark.parametrize("op", ["w4a8_gemm", "quantize_int8_rowwise_outliers", "llm_int8_linear"])
def test_validation_messages_match_reference(op):
    # The same exception type and message as the reference (which raises via _validate.py).
    a = torch.zeros(4, 64, dtype=torch.int8)
    bp = torch.zeros(3, 32, dtype=torch.uint8)
    sa, sb = torch.ones(4), torch.ones(3, 2)
    x, w, sw = torch.randn(4, 64), torch.zeros(3, 64, dtype=torch.int8), torch.ones(3)
    bad = {
        "w4a8_gemm": [
            (a.float(), bp, sa, sb, None, None, None), (a.reshape(2, 2, 64), bp, sa, sb, None, None, None),
            (a, bp.to(torch.int8), sa, sb, None, None, None), (a, bp[:, :31], sa, sb, None, None, None),
            (a, bp, sa, sb.half(), None, None, None), (a, bp, sa, torch.ones(3, 3), None, None, None),
            (a, bp, sa, torch.ones(3, 64), None, None, None), (a, bp, sa, torch.ones(2, 2), None, None, None),
            (a, bp, sa, sb, torch.zeros(3, 2, dtype=torch.int8), None, None),
            (a, bp, sa, sb, torch.zeros(3, 3, dtype=torch.uint8), None, None),
            (a, bp, torch.ones(5), sb, None, None, None), (a, bp, sa.double(), sb, None, None, None),
            (a, bp, sa, sb, None, torch.ones(4), None), (a, bp, sa, sb, None, torch.ones(3, dtype=torch.int32), None),
            (a, bp, sa, sb, None, None, torch.int32),
        ],
        "quantize_int8_rowwise_outliers": [
            (x.double(), 6.0), (x[0], 6.0), (x.reshape(2, 2, 64), 6.0), (x[:, :0], 6.0), (x, float("nan")),
        ],
        "llm_int8_linear": [
            (x, w.float(), sw, None, 6.0), (x, w[0], sw, None, 6.0), (x.to(torch.int32), w, sw, None, 6.0),
            (x[0], w, sw, None, 6.0), (x[:, :63], w, sw, None, 6.0), (x, w, sw.half(), None, 6.0),
            (x, w, torch.ones(4), None, 6.0), (x, w, sw, torch.ones(2), 6.0),
            (x, w, sw, torch.ones(3, dtype=torch.int8), 6.0), (x, w, sw, None, float("nan")),
            (torch.zeros(1, 131072), torch.zeros(1, 131072, dtype=torch.int8), torch.ones(1), None, 6.0),
        ],
    }[op]
    for args in bad:
        with pytest.raises((TypeError, ValueError)) as want:
            getattr(R, op)(*args)
        with pytest.raises(want.type) as got:
            getattr(OPS, op)(*args)
        assert str(want.value) in str(got.value), (args, str(want.value), str(got.value))


def test_opcheck():
    a, bp, sa, sb, zb, bias = _w4a8_inputs(5, 7, 64, 32, "asym", seed=1, bias_dtype=torch.float32)
    torch.library.opcheck(OPS.w4a8_gemm, (a, bp, sa, sb, zb, bias, torch.bfloat16))
    x, wq, sw, bias = _llm_inputs(5, 7, 64, torch.float32, seed=2, bias_dtype=torch.float32)
    torch.library.opcheck(OPS.quantize_int8_rowwise_outliers, (x, 6.0))
    torch.library.opcheck(OPS.llm_int8_linear, (x, wq, sw, bias, 6.0))
