"""Property-based fuzzing (hypothesis) of every op in torch.ops.quantkernels on the backends of
this process: the pure-PyTorch reference (checked against tests/_spec.py) and the C++ CPU kernels
at every ISA level this CPU has (checked against the reference and tests/_spec.py). The Triton
interpreter runs the same properties in tests/test_fuzz_triton.py (a process of its own).

Generators, checks and the ``ci`` / ``fuzz`` profiles: tests/_fuzz.py. ``make test`` runs the
derandomized ``ci`` profile; ``make fuzz`` the long random one. Bugs the fuzzer found are pinned
by the named regression tests at the end of this file.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import _fuzz as F
from _isa import isa_params
from quantkernels import _native
from quantkernels import reference as R
from quantkernels._ops import OP_NAMES

OPS = torch.ops.quantkernels
NATIVE_CPU = {op for op in OP_NAMES if _native.has_kernel(op, "CPU")}

# "reference" runs the reference functions directly; each ISA level runs the op through the
# dispatcher with QUANTKERNELS_CPU_ISA set (the C++ kernel where one is registered).
BACKENDS = [pytest.param("reference", id="reference")] + isa_params()


@pytest.fixture(params=BACKENDS)
def backend(request, monkeypatch):
    if request.param != "reference":
        if not _native.AVAILABLE:
            pytest.skip(f"the C++ extension is not available: {_native.REASON}")
        monkeypatch.setenv("QUANTKERNELS_CPU_ISA", request.param)
        assert _native.cpu_isa() == request.param
    return request.param


def kernel(op: str, backend: str):
    """(callable, check against the reference?) for ``op`` on ``backend``."""
    if backend == "reference":
        return getattr(R, op), False
    if op not in NATIVE_CPU:
        pytest.skip(f"no C++ CPU kernel for {op}: the dispatcher runs the reference (fuzzed as 'reference')")
    return getattr(OPS, op).default, True


W = F.fuzz_settings


# --------------------------------------------------------------------------- quantizers


@W(1.0)
@given(x=F.quantize_input())
def test_quantize_int8_rowwise(backend, x):
    F.prop_quantize_rowwise(*kernel("quantize_int8_rowwise", backend), x)


@W(1.0)
@given(x=F.quantize_input(two_d=True),
       threshold=st.sampled_from([6.0, 0.0, -2.0, 0.5, 1.0, 100.0, 1e-30, float("inf")]),
       at=st.booleans())
def test_quantize_int8_rowwise_outliers(backend, x, threshold, at):
    if at and x.numel() and 0 < threshold < float("inf"):
        x = x.clone()
        x[0, -1] = threshold          # |x| == threshold is an outlier (inclusive)
    F.prop_outliers(*kernel("quantize_int8_rowwise_outliers", backend), x, threshold)


@W(0.5)
@given(x=F.quantize_input())
def test_quantize_int8_tensor(backend, x):
    F.prop_quantize_tensor(*kernel("quantize_int8_tensor", backend), x)


@W(0.5)
@given(x=F.quantize_input())
def test_quantize_int8_asym(backend, x):
    F.prop_quantize_asym(*kernel("quantize_int8_asym", backend), x)


@st.composite
def int4_quant_case(draw):
    K, G = draw(F.group_k())
    N = draw(st.integers(1, 12))
    dtype = draw(F.dtype_st)
    w = F.float_rows((N, K), dtype, draw(F.kinds_st), draw(F.seed_st), exp=draw(F.exp_st), tie_peak=7.0)
    spell = -1 if G == K and draw(st.booleans()) else G
    return F.layout(w, draw(st.sampled_from(F.LAYOUTS))), spell


@W(0.5)
@given(case=int4_quant_case())
def test_quantize_int4_sym(backend, case):
    F.prop_int4_quantizer(kernel("quantize_int4_sym", backend)[0], *case, asym=False)


@W(0.5)
@given(case=int4_quant_case())
def test_quantize_uint4_asym(backend, case):
    F.prop_int4_quantizer(kernel("quantize_uint4_asym", backend)[0], *case, asym=True)


# --------------------------------------------------------------------------- (de)quantize helpers


@st.composite
def dequant8_case(draw):
    M, _, K = draw(F.dims())
    seed = draw(F.seed_st)
    shape = (M, K) if draw(st.booleans()) else (draw(st.integers(0, 3)), M, K)
    q = F.layout(F.int8_tensor(shape, seed, True), draw(st.sampled_from(F.LAYOUTS)))
    per_tensor = draw(st.booleans())
    sshape = () if per_tensor else shape[:-1]
    scale = F.log_uniform(sshape, seed + 1, -40, 36)
    if draw(st.booleans()) and scale.numel():
        scale.view(-1)[0] = draw(st.sampled_from([float("nan"), float("inf"), 0.0, 1e-44]))
    zero = F.int8_tensor(sshape, seed + 2, True) if draw(st.booleans()) else None
    return q, scale, zero, draw(st.sampled_from((None,) + F.FLOATS))


@W(0.3)
@given(case=dequant8_case())
def test_dequantize_int8(backend, case):
    F.prop_dequantize_int8(kernel("dequantize_int8", backend)[0], *case)


@st.composite
def pack_case(draw):
    M, _, K = draw(F.dims(even_k=True))
    shape = (M, K) if draw(st.booleans()) else (draw(st.integers(0, 3)), M, K)
    g = F.gen(draw(F.seed_st))
    if draw(st.booleans()):
        q = torch.randint(-8, 8, shape, generator=g, dtype=torch.int8)
    else:
        q = torch.randint(0, 16, shape, generator=g, dtype=torch.uint8)
    return F.layout(q, draw(st.sampled_from(F.LAYOUTS)))


@W(0.3)
@given(q=pack_case())
def test_pack_unpack_int4(backend, q):
    F.prop_pack(kernel("pack_int4", backend)[0], kernel("unpack_int4", backend)[0], q)


@st.composite
def dequant4_case(draw):
    K, G = draw(F.group_k())
    N = draw(st.integers(1, 12))
    seed = draw(F.seed_st)
    packed, scale, zero = F.int4_weight(N, K, G, seed, draw(st.booleans()), draw(st.sampled_from(["random", "edges"])))
    if draw(st.booleans()):
        scale = F.log_uniform(scale.shape, seed + 1, -44, 36)
    return F.layout(packed, draw(st.sampled_from(F.LAYOUTS))), scale, zero, draw(st.sampled_from((None,) + F.FLOATS))


@W(0.3)
@given(case=dequant4_case())
def test_dequantize_int4(backend, case):
    F.prop_dequantize_int4(kernel("dequantize_int4", backend)[0], *case)


# --------------------------------------------------------------------------- GEMMs


@W(1.0)
@given(case=F.int8_gemm_case())
def test_int8_gemm(backend, case):
    F.prop_int8_gemm(kernel("int8_gemm", backend)[0], True, *case)


@W(0.1)
@given(case=F.int8_gemm_case(near_bound=True), w8a8=F.w8a8_case(near_bound=True),
       llm=F.llm_int8_case(near_bound=True))
def test_int8_gemms_k_at_int32_bound(backend, case, w8a8, llm):
    """K within 40 of 131,071 (s.4), -128 included: int32 accumulation must stay exact."""
    F.prop_int8_gemm(kernel("int8_gemm", backend)[0], True, *case)
    F.prop_w8a8(*kernel("w8a8_gemm", backend), *w8a8)
    F.prop_llm_int8(*kernel("llm_int8_linear", backend), *llm)


@W(1.0)
@given(case=F.w8a8_case())
def test_w8a8_gemm(backend, case):
    F.prop_w8a8(*kernel("w8a8_gemm", backend), *case)


@W(1.0)
@given(case=F.w4a8_case())
def test_w4a8_gemm(backend, case):
    F.prop_w4a8(*kernel("w4a8_gemm", backend), *case)


@W(1.0)
@given(case=F.weight_only_case(int4=False))
def test_w8a16_gemm(backend, case):
    F.prop_w8a16(*kernel("w8a16_gemm", backend), *case)


@W(1.0)
@given(case=F.weight_only_case(int4=True))
def test_w4a16_gemm(backend, case):
    F.prop_w4a16(*kernel("w4a16_gemm", backend), *case)


@W(1.0)
@given(case=F.llm_int8_case())
def test_llm_int8_linear(backend, case):
    F.prop_llm_int8(*kernel("llm_int8_linear", backend), *case)


@W(0.3)  # 45 cases per backend in the ci profile (6 backends: ~15-20 s with the 3-D test, loaded 2-core machine)
@given(case=F.gemm_4bit_case(blocksizes=(32, 64, 128, 256, 1024, 4096), nonfinite_weights=True,
                             stats_layouts=True))
def test_gemm_4bit(backend, case):
    """NF4 / FP4 (docs/numerics.md s.11): random M / N / K (odd M and N, K % 32 != 0 and blocks that
    span rows), block sizes, both quant types, double quantization on and off, every dtype and
    layout, bias or none, hostile activation rows and poisoned weight blocks."""
    F.prop_gemm_4bit(*kernel("gemm_4bit", backend), *case)


@W(0.1)
@given(case=F.gemm_4bit_case(blocksizes=(32, 64, 256)), lead=st.integers(1, 3),
       how=st.sampled_from(F.LAYOUTS))
def test_gemm_4bit_3d_through_quantlinear(backend, case, lead, how):
    """A 3-D, non-contiguous x through QuantLinear (nf4 / fp4): the op itself takes [M, K] only
    and says so; the module flattens the leading dims and gives the 2-D op's result, bit for bit."""
    from quantkernels.nn import QuantLinear
    x, packed, (absmax, nested, offset), quant_type, blocksize, bias, w_deq = case
    M, K = x.shape
    N = packed.shape[0]
    x3 = F.layout(torch.stack([x.roll(i, dims=0) for i in range(lead)]), how)  # each slice its own row order
    x2 = x3.reshape(-1, K)
    fn = kernel("gemm_4bit", backend)[0]
    with pytest.raises(ValueError, match=r"gemm_4bit: x must be 2-D"):
        fn(x3, packed, absmax, quant_type, blocksize, nested, offset, bias)
    mod = QuantLinear(K, N, bias=bias is not None, scheme=quant_type, group_size=blocksize,
                      backend="reference" if backend == "reference" else "auto", double_quant=nested is not None,
                      dtype=bias.dtype if bias is not None else torch.float32)
    mod.qweight, mod.weight_scale = packed.contiguous(), absmax
    mod.nested_absmax, mod.absmax_offset, mod.bias = nested, offset, bias
    y3 = F.call(mod, x3)
    assert y3.shape == (lead, M, N) and y3.dtype == x.dtype
    y2 = F.prop_gemm_4bit(fn, backend != "reference", x2, packed, (absmax, nested, offset), quant_type, blocksize,
                          bias, w_deq)
    F.assert_bitwise(y3.reshape(-1, N), y2, "QuantLinear 3-D vs the 2-D op")


@W(0.5)
@given(x=F.quantize_input(two_d=True), case=F.w8a8_case())
def test_w8a8_chain_nonfinite_rows(backend, x, case):
    """QuantLinear's w8a8 path (quantize the activation, then the GEMM) on hostile activations:
    a token row holding NaN/Inf gives a NaN output row and leaves every other row finite (s.5b)."""
    _, b, _, sb, bias, out_dtype = case
    if b.shape[1] != x.shape[1]:
        b = F.int8_tensor((b.shape[0], x.shape[1]), 3, True)
    quant, _ = kernel("quantize_int8_rowwise", backend)
    gemm, check_ref = kernel("w8a8_gemm", backend)
    finite_rows = torch.isfinite(x.float()).all(dim=1)
    # keep the finite rows' outputs inside fp16: |y| <= 127 * 127 * K * sa * sb
    xs = torch.where(finite_rows[:, None], x.float().clamp(-1e3, 1e3), x.float()).to(x.dtype)
    q, sa = F.call(quant, xs)
    sb = sb / 1e3
    F.prop_w8a8(gemm, check_ref, q, b, sa, sb, bias, out_dtype)
    y = gemm(q, b, sa, sb, bias, out_dtype)
    assert bool(y[~finite_rows].isnan().all()), "a NaN/Inf token row must give a NaN output row"
    assert bool(torch.isfinite(y[finite_rows]).all()), "finite token rows must stay finite"


# --------------------------------------------------------------------------- regressions
# Each failure the fuzzer found, pinned as a plain test (bench/results/reliability_fuzz.md).


def test_regression_tiny_absmax_row_with_an_exact_zero(backend):
    """Found by test_quantize_int8_rowwise: a row of fp32 subnormals (127 / absmax overflows to
    Inf, s.5b) holding an exact 0. 0 * Inf = NaN must become q = 0; tests/_spec.py's oracle cast
    that NaN to int64 (a garbage code) and now zeroes it, as the contract says."""
    x = torch.tensor([[2.8026e-44, -4.0638e-44, 0.0, 4.2039e-45, -2.8026e-45]])
    q, s = kernel("quantize_int8_rowwise", backend)[0](x)
    assert q.tolist() == [[127, -127, 0, 127, -127]]
    qs, ss = F.S.int8_absmax(F.S.f32(x))
    F.S.assert_int_equal(q, qs, "q vs spec")
    F.S.assert_scale(s, ss, "scale vs spec")


def test_regression_asym_scale_underflows_to_zero():
    """Found by test_quantize_int8_asym: a one-element row 5.5e-44 has (hi - lo) / 255 == 0, so
    lo / scale = 0 / 0 = NaN: the zero point is 0 (a NaN after the clamp becomes 0) and q clamps
    to 127. tests/_spec.py's asym_quant now zeroes those NaNs too."""
    x = torch.tensor([[5.4651e-44]])
    q, s, z = R.quantize_int8_asym(x)
    assert (q.item(), s.item(), z.item()) == (127, 0.0, 0)
    qs, zs = F.S.asym_quant(F.S.f32(x), F.S.f32(s), -128, 127)
    assert (qs.tolist(), zs.tolist()) == ([[127]], [0])


def test_regression_fp32_underflow_allowance(backend):
    """Found by test_w4a16_gemm: fp32 products of subnormal activations (2e-44 * 4e-4) underflow
    to 0 in every fp32 kernel, while the float64 result is ~1e-47. docs/numerics.md s.6 now allows
    one fp32 subnormal per operation; the result must still be within it."""
    x = torch.tensor([[-2.1019e-44, -2.2421e-44]])
    packed, sb, zero = torch.tensor([[252]], dtype=torch.uint8), torch.tensor([[2e-4]]), torch.tensor([[5]], dtype=torch.uint8)
    F.prop_w4a16(*kernel("w4a16_gemm", backend), x, packed, sb, zero, None)
    y = kernel("w4a16_gemm", backend)[0](x, packed, sb, zero)
    assert abs(y.item()) <= 4 * 2.0 ** -149


@pytest.mark.parametrize("M", [1, 3, 5])
@pytest.mark.parametrize("asym", [False, True], ids=["sym", "asym"])
def test_regression_w4a16_fp32_gemv_inf_activation(backend, M, asym):
    """Found by test_w4a16_gemm (avx2 and up): the fp32 int4 GEMV (M <= 4 or so) factors the zero
    point out, s * (sum x q - z sum x), so an Inf activation gave Inf - Inf = NaN where IEEE (and
    the reference) give +-Inf. Fixed in csrc/cpu/weight_only.cpp: a batch holding NaN/Inf runs the
    element-by-element GEMV. The non-finite pattern must now match the reference exactly."""
    g = F.gen(7)
    x = torch.randn(M, 64, generator=g)
    x[0, 19] = float("inf")
    x[M - 1, 3] = float("-inf") if M > 1 else x[M - 1, 3]
    packed = torch.randint(0, 256, (8, 32), generator=g, dtype=torch.uint8)
    sb = torch.rand(8, 2, generator=g) * 1e-2 + 1e-3
    zero = torch.randint(0, 16, (8, 2), generator=g, dtype=torch.uint8) if asym else None
    y = kernel("w4a16_gemm", backend)[0](x, packed, sb, zero)
    yr = R.w4a16_gemm(x, packed, sb, zero)
    assert bool(torch.isinf(yr[0]).any()), "the case must hold an IEEE +-Inf output"
    F.assert_same_nonfinite(y, yr, "w4a16_gemm", exact_class=True)


@pytest.mark.parametrize("dtype", F.FLOATS, ids=str)
def test_regression_inf_activation_times_subnormal_weight(backend, dtype):
    """Found by test_w8a16_gemm (avx512_bf16, bf16 x): Inf * a subnormal dequantized weight
    (-57 * 1e-41) is -Inf by IEEE, but vdpbf16ps reads the subnormal bf16 weight as zero and gives
    NaN. docs/numerics.md s.5b documents this one exception: NaN may stand for +-Inf there, never
    a finite value or the other Inf."""
    x = torch.tensor([[float("inf"), 1.0]], dtype=dtype)
    b = torch.tensor([[-57, 3], [2, 5]], dtype=torch.int8)
    sb = torch.tensor([1e-41, 1e-2])
    y = kernel("w8a16_gemm", backend)[0](x, b, sb)
    yr = R.w8a16_gemm(x, b, sb)
    F.assert_same_nonfinite(y, yr, "w8a16_gemm", exact_class=False)
    if backend != "avx512_bf16" or dtype != torch.bfloat16:
        F.assert_same_nonfinite(y, yr, "w8a16_gemm", exact_class=True)


@pytest.mark.parametrize("M,N,K", [(1, 1, 5), (3, 5, 7), (9, 3, 130), (17, 13, 259), (2, 6, 131_070)])
def test_regression_int8_gemm_k_tail_partial_panel(backend, M, N, K):
    """Found by `make sanitize` (UBSan) on test_int8_gemm[avx2]: the AVX2 panel GEMM added the
    zero-padded K-tail tile to the main tile over all PR x PT lanes, including lanes the kernel
    never wrote (N or M not a multiple of the panel): a signed overflow of uninitialized values
    (csrc/cpu/gemm_int8.cpp; only the written lanes are added now). The result never used those
    lanes, so outside a sanitizer this checks exactness; `make sanitize` runs it instrumented."""
    g = F.gen(M * 1000 + K)
    a = torch.randint(-128, 128, (M, K), generator=g, dtype=torch.int8)
    b = torch.randint(-128, 128, (N, K), generator=g, dtype=torch.int8)
    F.prop_int8_gemm(kernel("int8_gemm", backend)[0], True, a, b)
