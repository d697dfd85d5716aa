"""NF4 / FP4 (bitsandbytes' 4-bit formats, docs/numerics.md s.11): the reference ops against an
independent numpy spec (tests/_spec.py), bit-compatibility with bitsandbytes' own
``quantize_4bit`` / ``dequantize_4bit`` (skipped with a message where it is not installed),
argument contracts and torch.compile."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch

import _spec as S
from _bnb4 import bnb4_layout
import quantkernels  # noqa: F401  (registers the ops)
from quantkernels import _ops as O
from quantkernels import reference as R

ops = torch.ops.quantkernels
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
QTYPES = ("nf4", "fp4")
INPUT_ERRORS = (TypeError, ValueError, RuntimeError)


def _bnb():
    try:
        import bitsandbytes
        import bitsandbytes.functional as BF
    except Exception as e:  # absent, or a build that does not load here
        pytest.skip(f"bitsandbytes is not usable here ({type(e).__name__}: {e}); "
                    "install it with `pip install -c requirements/constraints.txt bitsandbytes`")
    return bitsandbytes, BF


def _weight(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g) * 0.05
    if shape[0] > 2:
        w[1] = 0.0                          # an all-zero row (whole blocks of zeros when K >= blocksize)
        w[2, ::3] *= 40.0                   # a row with large values
    return w.to(dtype)


def _ours(w, qt, bs, dq):
    packed, absmax = O.quantize_4bit(w, qt, bs)
    if not dq:
        return packed, absmax, None, None
    q, nested, offset = O.double_quantize_absmax(absmax)
    return packed, q, nested, offset


# ----------------------------------------------------------------------------- tables


def test_tables_match_spec_text():
    np.testing.assert_array_equal(S.f32(R.NF4_CODE), S.NF4_TABLE)
    np.testing.assert_array_equal(S.f32(R.FP4_CODE), S.FP4_TABLE)
    assert R.FP4_CODE[8] == 0 and not bool(R.FP4_CODE[8].signbit()) and R.FP4_CODE[0] == 0
    np.testing.assert_array_equal(S.f32(R.DYNAMIC_CODE), S.dynamic_code())
    assert R.DYNAMIC_CODE.shape == (256,) and bool((R.DYNAMIC_CODE.diff() > 0).all())


def test_tables_match_bitsandbytes():
    bnb, BF = _bnb()
    for qt, ours in R.CODES_4BIT.items():
        theirs = BF.get_4bit_type(qt, device="cpu")
        assert torch.equal(theirs, ours) and torch.equal(theirs.signbit(), ours.signbit()), qt
    assert torch.equal(BF.create_dynamic_map(), R.DYNAMIC_CODE)


# ----------------------------------------------------------------------------- bitsandbytes bit-compatibility

COMPAT_CASES = [
    # (shape, blocksize): odd N, K not a multiple of the block (blocks span rows), partial last block
    ((5, 38), 32), ((13, 70), 64), ((3, 130), 128), ((1, 2), 64), ((33, 64), 64), ((7, 300), 256),
    ((4, 1000), 512), ((9, 1030), 1024), ((3, 4096), 2048), ((2, 6000), 4096),
    ((67, 520), 32),                    # 1089 blocks: five nested blocks of 256 under double quant, the last partial
]


@pytest.mark.parametrize("dq", [False, True], ids=["plain", "double"])
@pytest.mark.parametrize("qt", QTYPES)
@pytest.mark.parametrize("shape,bs", COMPAT_CASES, ids=[f"{s[0]}x{s[1]}-b{b}" for s, b in COMPAT_CASES])
def test_bitsandbytes_bit_compatible(shape, bs, qt, dq):
    bnb, BF = _bnb()
    dtype = (torch.float32, torch.float16, torch.bfloat16)[(shape[0] + bs) % 3]
    w = _weight(shape, dtype, seed=shape[1])
    p_ref, st = BF.quantize_4bit(w, blocksize=bs, quant_type=qt, compress_statistics=dq)
    packed, absmax, nested, offset = _ours(w, qt, bs, dq)
    plain = O.quantize_4bit(w, qt, bs)[1]
    assert torch.equal(packed.reshape(-1), p_ref.reshape(-1)), "packed codes differ from bitsandbytes"
    if dq:
        assert torch.equal(nested, st.state2.absmax), "nested absmax differs"
        assert torch.equal(offset, st.offset), "offset (mean) differs"
        assert torch.equal(st.state2.code, R.DYNAMIC_CODE) and st.state2.blocksize == R.NESTED_BLOCKSIZE
        _assert_nested_codes(absmax, st.absmax, plain, nested, offset)
        absmax = st.absmax             # dequantization below: bit-exact from bitsandbytes' own codes
    else:
        assert torch.equal(absmax, st.absmax), "absmax differs from bitsandbytes"
    for out_dtype in FLOAT_DTYPES:
        st.dtype = out_dtype
        d_ref = BF.dequantize_4bit(p_ref, st)
        got = O.dequantize_4bit(packed, absmax, qt, bs, nested, offset, out_dtype=out_dtype)
        assert got.dtype == out_dtype and got.shape == shape
        assert torch.equal(got, d_ref.reshape(shape)), f"dequantized {out_dtype} values differ from bitsandbytes"


def _assert_nested_codes(ours, theirs, plain_absmax, nested, offset):
    """Double-quantized absmax codes: equal to bitsandbytes', except where its CPU 8-bit quantizer (a
    bucketed table search, not an exact nearest-value search) takes the other neighbour of a value
    within 2^-10 (relative to the gap between the two codes) of their midpoint (s.11)."""
    diff = (ours != theirs).nonzero().flatten()
    assert diff.numel() <= max(1, ours.numel() // 100), f"{diff.numel()} of {ours.numel()} codes differ"
    code = R.DYNAMIC_CODE.double()
    for i in diff.tolist():
        a, b = int(ours[i]), int(theirs[i])
        assert abs(a - b) == 1, f"code {i}: ours {a}, bitsandbytes {b}: not neighbours"
        x = (float(plain_absmax[i]) - float(offset)) / float(nested[i // 256])
        lo, hi = code[min(a, b)], code[max(a, b)]
        mid, gap = float(lo + hi) / 2, float(hi - lo)
        assert abs(x - mid) <= gap * 2**-10, f"code {i}: {x} is not a near-tie between {float(lo)} and {float(hi)}"
        assert abs(x - float(code[a])) <= abs(x - float(code[b])), f"code {i}: ours is not the nearer"


@pytest.mark.parametrize("qt", QTYPES)
def test_bitsandbytes_edge_values(qt):
    """Zeros, exact boundaries, subnormals, +-Inf and NaN: the same codes and absmax as bitsandbytes."""
    bnb, BF = _bnb()
    w = _hostile(qt)
    p_ref, st = BF.quantize_4bit(w, blocksize=32, quant_type=qt)
    packed, absmax = O.quantize_4bit(w, qt, 32)
    assert torch.equal(packed.reshape(-1), p_ref.reshape(-1))
    assert bool(((absmax == st.absmax) | (absmax.isnan() & st.absmax.isnan())).all())
    d_ref = BF.dequantize_4bit(p_ref, st).reshape(w.shape)
    got = O.dequantize_4bit(packed, absmax, qt, 32)
    same = (got == d_ref) | (got.isnan() & d_ref.isnan())
    assert bool(same.all())


# ----------------------------------------------------------------------------- the numpy spec


def _hostile(qt, K=64):
    """Rows of 32-value blocks: random, zero, exact decision boundaries (ties), subnormal, Inf, NaN."""
    g = torch.Generator().manual_seed(7)
    rows = [torch.randn(K, generator=g), torch.zeros(K)]
    order = R._ORDER[qt]
    sc = R.CODES_4BIT[qt][order]
    bounds = (sc[:-1] + sc[1:]) / 2
    tie = torch.zeros(K)
    tie[0] = 1.0                                               # absmax 1: scaled values are the values
    tie[1:16] = bounds                                         # exactly on each boundary
    tie[16:31] = bounds.nextafter(torch.tensor(2.0))           # just above
    tie[32] = -1.0
    tie[33:48] = bounds.nextafter(torch.tensor(-2.0))          # just below
    rows.append(tie)
    sub = torch.randn(K, generator=g) * 1e-40                  # subnormal blocks (absmax < 1e-38)
    rows.append(sub)
    inf = torch.randn(K, generator=g)
    inf[3], inf[40] = float("inf"), float("-inf")
    rows.append(inf)
    nan = torch.randn(K, generator=g)
    nan[5] = float("nan")
    rows.append(nan)
    return torch.stack(rows)


@pytest.mark.parametrize("qt", QTYPES)
@pytest.mark.parametrize("bs", [32, 64, 256])
@pytest.mark.parametrize("shape", [(6, 64), (5, 38), (11, 96)])
def test_quantize_matches_spec(shape, bs, qt, device):
    w = _weight(shape, torch.float32, seed=bs) if shape != (6, 64) else _hostile(qt)
    packed, absmax = ops.quantize_4bit(w.to(device), qt, bs)
    nib, am = S.quant_4bit(S.f32(w), qt, bs)
    S.assert_int_equal(packed, S.pack_4bit(nib), "packed")
    got_am = S.f64(absmax)
    np.testing.assert_array_equal(got_am, am.astype(np.float64))
    deq = ops.dequantize_4bit(packed, absmax, qt, bs)
    np.testing.assert_array_equal(S.f32(deq), S.dequant_4bit(nib, am, qt, bs))


def test_ties_go_to_the_lower_code():
    for qt in QTYPES:
        w = _hostile(qt)[2:3]
        packed, _ = O.quantize_4bit(w, qt, 64)
        code = R.CODES_4BIT[qt]
        deq = O.dequantize_4bit(packed, torch.ones(1), qt, 64)[0]
        order = R._ORDER[qt]
        lower, upper = code[order[:-1]], code[order[1:]]
        assert torch.equal(deq[1:16], lower), qt                 # on a boundary: the lower neighbour
        assert torch.equal(deq[16:31], upper), qt                # one ulp above: the upper one
        assert torch.equal(deq[33:48], lower), qt


def test_nonfinite_and_zero_blocks():
    for qt in QTYPES:
        w = _hostile(qt)
        packed, absmax = O.quantize_4bit(w, qt, 32)
        deq = O.dequantize_4bit(packed, absmax, qt, 32)
        assert bool((deq[1] == 0).all()) and bool((absmax[2:4] == 0).all())        # zero blocks: absmax 0
        assert bool(torch.isfinite(deq[[0, 2, 3]]).all())
        assert bool(torch.isinf(absmax[8:10]).all()) and not bool(torch.isfinite(deq[4]).all())
        assert bool(torch.isnan(absmax[10])) and bool(torch.isnan(deq[5, :32]).all())
        assert bool(torch.isfinite(deq[5, 32:]).all())                             # the other block of that row


@pytest.mark.parametrize("n", [1, 5, 256, 300, 1089])
def test_double_quant_matches_spec(n):
    g = torch.Generator().manual_seed(n)
    absmax = torch.rand(n, generator=g) * 0.3
    if n > 5:
        absmax[3] = 0.0
    q, nested, offset = O.double_quantize_absmax(absmax)
    assert offset.shape == () and nested.shape == (-(-n // 256),)
    S.assert_scale(offset, np.mean(S.f64(absmax)), "offset")             # a float32 mean: order unspecified
    sq, sn = S.double_quant(S.f32(absmax), S.f32(offset))               # the rest exactly, given the offset
    np.testing.assert_array_equal(S.f32(nested), sn)
    S.assert_int_equal(q, sq, "double-quantized codes")
    back = R._absmax_4bit(q, nested, offset)
    np.testing.assert_array_equal(S.f32(back), S.undouble_quant(sq, sn, S.f32(offset)))
    assert float((back - absmax).abs().max()) <= 0.3 * 0.02 + 1e-7


def test_double_quant_rejects_nonfinite():
    with pytest.raises(ValueError,
                       match=r"double_quantize_absmax: absmax holds the non-finite value inf at flat index 2"):
        O.double_quantize_absmax(torch.tensor([1.0, 2.0, float("inf")]))


@pytest.mark.parametrize("qt", QTYPES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("dq", [False, True], ids=["plain", "double"])
def test_gemm_4bit_matches_spec(qt, dtype, dq, device):
    N, K, M = 24, 96, 7
    w = _weight((N, K), torch.float32, seed=3)
    packed, absmax, nested, offset = (t.to(device) if t is not None else None for t in _ours(w, qt, 64, dq))
    g = torch.Generator().manual_seed(1)
    x = torch.randn(M, K, generator=g).to(dtype)
    bias = torch.randn(N, generator=g).to(dtype)
    got = ops.gemm_4bit(x.to(device), packed, absmax, qt, 64, nested, offset, bias.to(device))
    wf = S.f32(ops.dequantize_4bit(packed, absmax, qt, 64, nested, offset))
    nib = S.i64(ops.unpack_int4(packed.cpu(), False))
    nib = np.stack([nib[:, 1::2], nib[:, 0::2]], -1).reshape(N, K)        # high nibble first
    am = S.f32(R._absmax_4bit(absmax.cpu(), None if nested is None else nested.cpu(),
                              None if offset is None else offset.cpu()))
    np.testing.assert_array_equal(wf, S.dequant_4bit(nib, am, qt, 64))
    exact, mag = S.weight_only(S.f32(x), S.round_to(wf, dtype), S.f32(bias))
    S.assert_float_output(got, exact, mag, dtype, f"gemm_4bit {qt} {dtype}", underflow_terms=K + 1)


def test_gemm_4bit_sqnr():
    """Quality floor: NF4 beats FP4 on Gaussian weights, both near their design values."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 1024, generator=g)
    w = torch.randn(256, 1024, generator=g) * 0.02
    ref = x.double() @ w.double().t()
    got = {}
    for qt in QTYPES:
        p, a = O.quantize_4bit(w, qt, 64)
        got[qt] = S.sqnr(ref.numpy(), O.gemm_4bit(x, p, a, qt, 64).double().numpy())
    assert 19.0 < got["nf4"] < 23.0 and 16.0 < got["fp4"] < got["nf4"], got


# ----------------------------------------------------------------------------- contracts


def test_argument_errors():
    w = torch.randn(4, 64)
    with pytest.raises(ValueError, match=r"quantize_4bit: quant_type must be one of \('nf4', 'fp4'\), got 'int4'"):
        O.quantize_4bit(w, "int4")
    with pytest.raises(ValueError, match=r"blocksize must be one of .* got 48"):
        O.quantize_4bit(w, "nf4", 48)
    with pytest.raises(ValueError, match=r"blocksize .* got 64.5"):
        O.quantize_4bit(w, "nf4", 64.5)
    with pytest.raises(ValueError, match=r"K = 63 must be even"):
        O.quantize_4bit(torch.randn(4, 63))
    with pytest.raises(TypeError, match=r"w must have dtype"):
        O.quantize_4bit(w.to(torch.int8))
    with pytest.raises(ValueError, match=r"w must be 2-D"):
        O.quantize_4bit(torch.randn(2, 4, 64))
    p, a = O.quantize_4bit(w, "nf4", 64)
    q, n2, off = O.double_quantize_absmax(a)
    x = torch.randn(3, 64)
    with pytest.raises(ValueError, match=r"gemm_4bit: absmax must have shape \(4,\) \(one per block of 64"):
        O.gemm_4bit(x, p, a[:3])
    with pytest.raises(ValueError, match=r"absmax must have shape \(8,\)"):
        O.gemm_4bit(x, p, torch.ones(4), blocksize=32)
    with pytest.raises(TypeError, match=r"absmax must have dtype .*uint8"):
        O.gemm_4bit(x, p, a, nested_absmax=n2, offset=off)
    with pytest.raises(ValueError, match=r"nested_absmax and offset go together"):
        O.gemm_4bit(x, p, q, nested_absmax=n2)
    with pytest.raises(ValueError, match=r"offset must have shape \(\)"):
        O.gemm_4bit(x, p, q, nested_absmax=n2, offset=off.reshape(1))
    with pytest.raises(ValueError, match=r"x has K = 32 columns but the weight has K = 64"):
        O.gemm_4bit(x[:, :32], p, a)
    with pytest.raises(ValueError, match=r"bias must have shape \(4,\)"):
        O.gemm_4bit(x, p, a, bias=torch.ones(5))
    with pytest.raises(TypeError, match=r"out_dtype must be one of"):
        O.dequantize_4bit(p, a, out_dtype=torch.int32)
    with pytest.raises(ValueError, match=r"quant_type .* got 'NF4'"):
        O.dequantize_4bit(p, a, "NF4")
    with pytest.raises(INPUT_ERRORS, match=r"quant_type"):
        ops.gemm_4bit(x, p, a, "af4", 64)                     # through the dispatcher: the contract checks too


def test_empty_weight_and_batch():
    p, a = O.quantize_4bit(torch.randn(0, 64))
    assert p.shape == (0, 32) and a.shape == (0,)
    p, a = O.quantize_4bit(torch.randn(3, 64))
    assert O.gemm_4bit(torch.randn(0, 64), p, a).shape == (0, 3)


@pytest.mark.parametrize("dq", [False, True], ids=["plain", "double"])
def test_compile_fullgraph(dq):
    w = _weight((16, 128), torch.float32)
    x = torch.randn(5, 128, dtype=torch.bfloat16)

    def f(x, w):
        p, a = ops.quantize_4bit(w, "nf4", 64)
        if dq:
            q, n2, off = ops.double_quantize_absmax(a)
            return ops.gemm_4bit(x, p, q, "nf4", 64, n2, off, None)
        return ops.gemm_4bit(x, p, a, "nf4", 64, None, None, None)

    got = torch.compile(f, fullgraph=True, backend="aot_eager")(x, w)
    assert torch.equal(got, f(x, w))


# ----------------------------------------------------------------------------- backward (s.10)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("dq", [False, True], ids=["plain", "double"])
def test_gemm_4bit_backward(dtype, dq):
    """grad_X = grad_Y @ to_x(W) (fp32 accumulation), grad_bias = sum_m grad_Y; absmax etc. frozen."""
    N, K, M = 40, 128, 6
    w = _weight((N, K), torch.float32, seed=5)
    packed, absmax, nested, offset = _ours(w, "nf4", 64, dq)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(M, K, generator=g).to(dtype).requires_grad_()
    bias = torch.randn(N, generator=g).to(dtype).requires_grad_()
    gy = torch.randn(M, N, generator=g).to(dtype)
    y = O.gemm_4bit(x, packed, absmax, "nf4", 64, nested, offset, bias)
    y.backward(gy)
    wx = S.round_to(S.f32(O.dequantize_4bit(packed, absmax, "nf4", 64, nested, offset)), dtype)
    gy64 = S.f64(gy)
    S.assert_float_output(x.grad, gy64 @ wx.astype(np.float64), np.abs(gy64) @ np.abs(wx.astype(np.float64)),
                          dtype, "grad_x", underflow_terms=N)
    S.assert_float_output(bias.grad, gy64.sum(0), np.abs(gy64).sum(0), dtype, "grad_bias", underflow_terms=M)
    if not dq:
        a = absmax.clone().requires_grad_()
        with pytest.raises(quantkernels.autograd.NoBackwardError,
                           match=r"gemm_4bit: no gradient with respect to absmax"):
            O.gemm_4bit(x.detach(), packed, a, "nf4", 64).sum().backward()
        with pytest.raises(quantkernels.autograd.NoBackwardError, match=r"quantize_4bit has no backward"):
            O.quantize_4bit(w.clone().requires_grad_())[1].sum().backward()


# ----------------------------------------------------------------------------- the module layer


class _Toy(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(64, 96)
        self.up = torch.nn.Linear(96, 200)
        self.down = torch.nn.Linear(200, 96, bias=False)     # N*K = 19200: blocks span rows for B = 128
        self.lm_head = torch.nn.Linear(96, 64, bias=False)
        self.lm_head.weight = self.embed.weight

    def forward(self, ids):
        h = self.embed(ids)
        return self.lm_head(h + self.down(torch.relu(self.up(h))))


IDS = torch.tensor([[1, 5, 9, 33, 63], [0, 2, 4, 6, 8]])


def _quantized_toy(qt, dq, bs=128, exclude=()):
    torch.manual_seed(0)
    return quantkernels.quantize_model(_Toy().eval(), qt, group_size=bs, double_quant=dq, exclude=exclude)


@pytest.mark.parametrize("dq", [False, True], ids=["plain", "double"])
@pytest.mark.parametrize("qt", QTYPES)
def test_quantize_model_buffers_forward_and_tied_embedding(qt, dq):
    torch.manual_seed(0)
    ref_model = _Toy().eval()
    m = _quantized_toy(qt, dq)
    up = m.up
    assert isinstance(up, quantkernels.QuantLinear) and up.scheme == qt and up.group_size == 128
    assert up.weight_format.value == qt and up.double_quant == dq
    nb = -(-200 * 96 // 128)
    assert up.qweight.shape == (200, 48) and up.qweight.dtype == torch.uint8
    assert up.weight_scale.shape == (nb,) and up.weight_scale.dtype == (torch.uint8 if dq else torch.float32)
    if dq:
        assert up.nested_absmax.shape == (1,) and up.absmax_offset.shape == ()
    else:
        assert up.nested_absmax is None and up.absmax_offset is None
    # the buffers are exactly the ops' output for the float weight
    p, a, n2, off = _ours(ref_model.up.weight.detach(), qt, 128, dq)
    assert torch.equal(up.qweight, p) and torch.equal(up.weight_scale, a)
    x = torch.randn(2, 3, 96)
    want = O.gemm_4bit(x.reshape(6, 96), p, a, qt, 128, n2, off, ref_model.up.bias.detach()).reshape(2, 3, 200)
    assert torch.equal(up(x), want)
    # the tied lm_head serves the embedding from its nf4 rows
    assert isinstance(m.embed, quantkernels.QuantEmbedding)
    rows = O.dequantize_4bit(m.lm_head.qweight, m.lm_head.weight_scale, qt, 128, m.lm_head.nested_absmax,
                             m.lm_head.absmax_offset)
    assert torch.equal(m.embed(IDS), rows[IDS])
    assert "nf4" in repr(m.up) or "fp4" in repr(m.up)
    assert bool(torch.isfinite(m(IDS)).all())


@pytest.mark.parametrize("dq", [False, True], ids=["plain", "double"])
def test_cast_keeps_quantized_buffers(dq):
    m = _quantized_toy("nf4", dq)
    before = {k: v.clone() for k, v in m.state_dict().items() if k.startswith(("up.", "down."))}
    m.to(torch.bfloat16)
    for k, v in before.items():
        now = m.state_dict()[k]
        if k.endswith("bias"):
            assert now.dtype == torch.bfloat16
        else:
            assert now.dtype == v.dtype and torch.equal(now, v), k
    assert m(IDS).dtype == torch.bfloat16


@pytest.mark.parametrize("dq", [False, True], ids=["plain", "double"])
def test_save_load_round_trip(tmp_path, dq):
    pytest.importorskip("safetensors")
    m = _quantized_toy("fp4", dq, exclude=("lm_head",))
    ref = m(IDS)
    quantkernels.save_quantized(m, tmp_path)
    cfg = __import__("json").loads((tmp_path / "quantization_config.json").read_text())
    assert cfg["modules"]["up"].get("double_quant", False) == dq and cfg["modules"]["up"]["scheme"] == "fp4"
    assert ("up.nested_absmax" in cfg["checksums"]["tensors"]) == dq      # v2 per-tensor SHA-256
    with quantkernels.init_empty_weights():
        sk = _Toy().eval()
    quantkernels.load_quantized(sk, tmp_path)
    assert sk.up.double_quant == dq
    for k, v in m.state_dict().items():
        assert torch.equal(sk.state_dict()[k], v), k
    assert torch.equal(sk(IDS), ref)


def test_module_argument_errors():
    lin = torch.nn.Linear(64, 8)
    with pytest.raises(ValueError, match=r"double_quant applies to \('nf4', 'fp4'\) only, not to scheme 'w4a16'"):
        quantkernels.QuantLinear.from_linear(lin, "w4a16", group_size=32, double_quant=True)
    with pytest.raises(ValueError, match=r"double_quant applies to .* not to scheme 'w8a8'"):
        quantkernels.quantize_model(torch.nn.Sequential(lin), "w8a8", double_quant=True)
    with pytest.raises(TypeError, match=r"double_quant must be True or False, got 1"):
        quantkernels.QuantLinear.from_linear(lin, "nf4", double_quant=1)
    with pytest.raises(ValueError, match=r"group_size \(the block size\) must be one of .* for nf4, got 48"):
        quantkernels.QuantLinear.from_linear(lin, "nf4", group_size=48)
    with pytest.raises(ValueError, match=r"in_features = 63 is odd"):
        quantkernels.QuantLinear.from_linear(torch.nn.Linear(63, 8), "fp4", group_size=64)
    q = quantkernels.QuantLinear.from_linear(lin, "nf4", group_size=64)
    with pytest.raises(TypeError, match=r"cannot convert qweight"):
        q.type(torch.float16)


def test_peft_dequantized_weight_and_merge():
    pytest.importorskip("peft")
    from quantkernels import peft as qpeft

    lin = torch.nn.Linear(128, 32)
    q = quantkernels.QuantLinear.from_linear(lin, "nf4", group_size=64, double_quant=True)
    w = qpeft.dequantized_weight(q)
    assert torch.equal(w, O.dequantize_4bit(q.qweight, q.weight_scale, "nf4", 64, q.nested_absmax, q.absmax_offset))
    rel = float((w - lin.weight.detach()).norm() / lin.weight.detach().norm())
    assert rel < 0.15, rel


# ----------------------------------------------------------------------------- load_bnb_4bit


class _Two(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a = torch.nn.Linear(64, 128)
        self.norm = torch.nn.LayerNorm(128)
        self.b = torch.nn.Linear(128, 31, bias=False)    # 3968 values: blocks of 256 span rows, the last is partial

    def forward(self, x):
        return self.b(self.norm(self.a(x)))


def _skeleton():
    with quantkernels.init_empty_weights():
        return _Two().eval()


@pytest.mark.parametrize("dq", [False, True], ids=["plain", "double"])
def test_load_bnb_4bit_documented_layout(tmp_path, dq):
    torch.manual_seed(0)
    src = _Two().eval()
    sd = {"norm.weight": src.norm.weight.detach(), "norm.bias": src.norm.bias.detach()}
    sd.update(bnb4_layout("a", src.a.weight.detach(), "nf4", 64, dq, src.a.bias.detach()))
    sd.update(bnb4_layout("b", src.b.weight.detach(), "fp4", 256, dq))
    sk = quantkernels.load_bnb_4bit(_skeleton(), sd)
    assert sk.a.scheme == "nf4" and sk.b.scheme == "fp4" and sk.a.double_quant == dq and sk.b.group_size == 256
    ref = quantkernels.quantize_model(copy.deepcopy(src), "nf4", group_size=64, double_quant=dq, include=("a",))
    for k in ("qweight", "weight_scale", "nested_absmax", "absmax_offset", "bias"):
        a, b = getattr(sk.a, k), getattr(ref.a, k)
        assert (a is None and b is None) or torch.equal(a, b), k
    x = torch.randn(5, 64)
    with torch.no_grad():
        y = sk(x)
    assert y.shape == (5, 31) and bool(torch.isfinite(y).all())
    assert quantkernels.save_quantized is not None and sk.quantkernels_report.quantized == ["a", "b"]


def test_load_bnb_4bit_refuses_what_it_cannot_represent():
    torch.manual_seed(0)
    src = _Two().eval()
    base = {"norm.weight": src.norm.weight.detach(), "norm.bias": src.norm.bias.detach()}
    base.update(bnb4_layout("a", src.a.weight.detach(), "nf4", 64, True, src.a.bias.detach()))
    base.update(bnb4_layout("b", src.b.weight.detach(), "fp4", 64, False))

    def refused(mutate, match):
        sd = dict(base)
        mutate(sd)
        sk = _skeleton()
        before = {k: (v.device.type, v.dtype) for k, v in sk.state_dict().items()}
        with pytest.raises(quantkernels.CheckpointError, match=match):
            quantkernels.load_bnb_4bit(sk, sd)
        assert isinstance(sk.a, torch.nn.Linear) and {k: (v.device.type, v.dtype) for k, v in
                                                      sk.state_dict().items()} == before

    def state(sd, name, qt, **kw):
        key = f"{name}.weight.quant_state.bitsandbytes__{qt}"
        st = json.loads(bytes(sd[key].tolist()).decode())
        st.update(kw)
        sd[key] = torch.tensor(list(json.dumps(st).encode()), dtype=torch.uint8)

    def custom_map(sd):
        sd["b.weight.quant_map"] = sd["b.weight.quant_map"] * 0.5

    refused(custom_map, r"layer 'b': quant_map is not bitsandbytes' fp4 table")
    refused(lambda sd: sd.__setitem__("a.weight.nested_quant_map", torch.linspace(-1, 1, 256)),
            r"nested_quant_map is not bitsandbytes' 8-bit dynamic map")
    refused(lambda sd: state(sd, "b", "fp4", blocksize=48), r"blocksize 48 is not one of")
    refused(lambda sd: state(sd, "b", "fp4", shape=[31, 96]), r"quant_state shape \[31, 96\], but the model's layer")
    refused(lambda sd: state(sd, "a", "nf4", nested_blocksize=128), r"nested_blocksize 128")
    refused(lambda sd: state(sd, "a", "nf4", nested_offset=float("nan")), r"nested_offset must be a finite number")
    refused(lambda sd: sd.__setitem__("b.weight", sd["b.weight"].view(torch.int8)), r"weight is torch.int8")
    refused(lambda sd: sd.__setitem__("b.weight.absmax", sd["b.weight.absmax"][:-1]), r"absmax must be float32 \[62\]")
    refused(lambda sd: sd.__setitem__("b.weight.quant_state.bitsandbytes__fp4", torch.tensor([1, 2, 255],
                                                                                             dtype=torch.uint8)),
            r"unreadable quant_state")
    refused(lambda sd: sd.pop("a.weight.absmax"), r"the checkpoint has no a.weight.absmax")
    refused(lambda sd: sd.pop("norm.bias"), r"missing \['norm.bias'\]")
    with pytest.raises(quantkernels.CheckpointError, match=r"not a 4-bit bitsandbytes checkpoint"):
        quantkernels.load_bnb_4bit(_skeleton(), {"norm.weight": torch.ones(96)})


@pytest.mark.parametrize("dq", [False, True], ids=["plain", "double"])
def test_load_bnb_4bit_real_checkpoint(tmp_path, dq):
    """A checkpoint written by bitsandbytes itself (its CPU backend quantizes on .to("cpu")): the
    same bytes, and outputs equal to bitsandbytes' Linear4bit within docs/numerics.md s.6."""
    bnb, BF = _bnb()
    safetensors = pytest.importorskip("safetensors.torch")
    torch.manual_seed(0)
    src = _Two().eval()
    m = torch.nn.Module()
    m.a = bnb.nn.Linear4bit(64, 128, bias=True, compute_dtype=torch.float32, compress_statistics=dq, quant_type="nf4")
    m.norm = torch.nn.LayerNorm(128)
    m.b = bnb.nn.Linear4bit(128, 31, bias=False, compute_dtype=torch.float32, compress_statistics=dq,
                            quant_type="fp4", quant_storage=torch.uint8)
    m.load_state_dict(src.state_dict())
    m = m.to("cpu")                                        # bitsandbytes quantizes here
    if m.a.weight.dtype != torch.uint8:
        pytest.skip(f"bitsandbytes {bnb.__version__} did not quantize on the CPU")
    sd = {k: v.contiguous() for k, v in m.state_dict().items()}
    safetensors.save_file(sd, str(tmp_path / "model.safetensors"))
    sk = quantkernels.load_bnb_4bit(_skeleton(), tmp_path)
    assert torch.equal(sk.a.qweight.reshape(-1), sd["a.weight"].reshape(-1))
    assert torch.equal(sk.a.weight_scale, sd["a.weight.absmax"])
    assert torch.equal(sk.b.weight_scale, sd["b.weight.absmax"])
    g = torch.Generator().manual_seed(3)
    for layer, ours, K in ((m.a, sk.a, 64), (m.b, sk.b, 128)):
        # bitsandbytes' own dequantization of its state = ours, bit for bit
        st = layer.weight.quant_state
        w_theirs = BF.dequantize_4bit(layer.weight, st)
        w_ours = O.dequantize_4bit(ours.qweight, ours.weight_scale, ours.scheme, ours.group_size, ours.nested_absmax,
                                   ours.absmax_offset)
        assert torch.equal(w_ours, w_theirs.reshape(w_ours.shape))
        for dtype in (torch.float32, torch.bfloat16):
            x = torch.randn(7, K, generator=g).to(dtype)
            with torch.no_grad():
                theirs = _bnb_forward(layer, x)
                got = ours(x)
            wx = S.round_to(S.f32(w_ours), dtype)
            bias = None if ours.bias is None else S.f32(ours.bias)
            exact, mag = S.weight_only(S.f32(x), wx, bias)
            S.assert_float_output(got, exact, mag, dtype, f"ours {ours.scheme} {dtype}", underflow_terms=K + 1)
            if dtype == torch.float32:   # bitsandbytes in fp32: within the same contract
                S.assert_float_output(theirs, exact, mag, dtype, f"bitsandbytes {ours.scheme}", underflow_terms=K + 1)
            else:                        # its bf16 path rounds more (bf16 GEMM / bias): two bf16 steps of the magnitude
                assert theirs.dtype == dtype
                err = np.abs(S.f64(got) - S.f64(theirs))
                assert (err <= 2.0**-7 * mag).all(), float((err / mag).max())


def test_bitsandbytes_cpu_dequant_when_blocks_span_rows():
    """K not a multiple of the block size (blocks span rows): bitsandbytes' pure-PyTorch backend
    dequantizes its own codes as s.11 says (= ours); its CPU C++ kernel does not for some such
    shapes (s.11.6), so those are compared with the former."""
    bnb, BF = _bnb()
    from bitsandbytes.backends.default.ops import _dequantize_4bit_compute

    for shape, bs, qt in (((4, 96), 64, "nf4"), ((30, 96), 64, "fp4"), ((3, 160), 128, "nf4")):
        w = _weight(shape, torch.float32, seed=shape[1])
        p, st = BF.quantize_4bit(w, blocksize=bs, quant_type=qt)
        want = _dequantize_4bit_compute(p.reshape(-1), st.absmax, BF.get_4bit_type(qt, device="cpu"), bs, shape,
                                        torch.float32)
        packed, absmax = O.quantize_4bit(w, qt, bs)
        assert torch.equal(packed.reshape(-1), p.reshape(-1)) and torch.equal(absmax, st.absmax)
        assert torch.equal(O.dequantize_4bit(packed, absmax, qt, bs), want)


def _bnb_forward(layer, x):
    # Linear4bit computes in its compute_dtype; give it the activation's
    layer.compute_dtype = x.dtype
    return layer(x)
