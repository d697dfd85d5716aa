"""Property-based fuzzing (hypothesis) of every CUDA op -- the real csrc/cuda/*.cu kernels and
csrc/cuda_bindings.cpp -- through the CUDA emulator (quantkernels.cuda_emu: every thread a fiber,
every memory access checked) against the reference and tests/_spec.py: the same generators and
properties as tests/test_fuzz.py and tests/test_fuzz_triton.py (tests/_fuzz.py).

Scales, zero points and biases come in every memory layout too (strided, offset and so
misaligned views: ``_fuzz.relayout``). Shapes are smaller than the CPU fuzz (the emulator runs
each thread of a block as a fiber), but M reaches past 64 so the three tile configs of the
tensor-core GEMMs, the SIMT fallbacks (K or G tails, misaligned views), the GEMV and the split-K
weight-only paths are all drawn; each case also draws the emulated device (sm_80 with 108 SMs,
sm_90 with 132 or 1 SM: the weight-only split-K is sized from the SM count). A hazard the
emulator detects (a shared-memory race, an out-of-bounds or misaligned access, a pending
cp.async) raises RuntimeError and fails the case.

``make test`` runs the derandomized ``ci`` profile (``QK_FUZZ_CUDA_EMU_WEIGHT`` cases per op
relative to the profile's count, default 0.5 x 150 = 75); ``make fuzz`` the long random one.
A failure the fuzzer finds becomes a named regression test at the end of this file; none so far
(2026-12-07: the ci profile and 17,471 random cases passed; bench/results/reliability.md).
"""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import _fuzz as F
from quantkernels import cuda_emu

#: Cases per op relative to the profile's max_examples (ci: 150 -> 75 per op).
WEIGHT = float(os.environ.get("QK_FUZZ_CUDA_EMU_WEIGHT", "0.5"))
W = F.fuzz_settings

#: M up to 70 (the int8 tensor-core GEMMs switch tiles at 16 and 64), N and K with tails.
EMU_DIMS = F.dims(m_max=70, n_max=40, k_max=160)
#: The weight-only tensor-core kernel's shapes: M > 8 in each tile range, K a multiple of 16 up to
#: 1024 (so split-K has k tiles to split). Drawn with fp16 / bf16 only: fp32 always takes the GEMV.
TC_DIMS = st.tuples(st.one_of(st.integers(9, 16), st.integers(17, 32), st.integers(33, 48)), st.integers(1, 40),
                    st.integers(1, 64).map(lambda k: 16 * k))
#: The int8 tensor-core GEMMs' shapes (K a multiple of 32): M in each of the three tile ranges.
IMMA_DIMS = st.tuples(st.one_of(st.integers(1, 16), st.integers(17, 64), st.integers(65, 140)),
                      st.integers(1, 40), st.integers(1, 8).map(lambda k: 32 * k))
#: (arch, SM count) of the emulated device.
DEVICES = ((80, 108), (90, 132), (90, 1))
device_st = st.sampled_from(DEVICES)


class _Emu:
    """torch.ops.quantkernels_cuda_emu, built and loaded on first use (not at collection)."""

    def __getattr__(self, name):
        return getattr(cuda_emu.load(), name).default


emu = _Emu()


@pytest.fixture(autouse=True, scope="module")
def _allocation_tracking():
    """The out-of-bounds check knows the CPU tensors allocated while this module runs (as in
    tests/test_cuda_emu.py); the plain allocator comes back after it."""
    cuda_emu.track_allocations(True)
    yield
    cuda_emu.track_allocations(False)


#: Every kernel instantiation the drawn cases launched (from the emulator's launch log).
LAUNCHED: set = set()


def on(dev, prop, op: str, *args):
    """Runs ``prop`` with the emulated ``op`` on the emulated device ``dev``."""
    with cuda_emu.device(*dev):
        try:
            prop(getattr(emu, op), True, *args)
        finally:
            LAUNCHED.update(cuda_emu.take_launch_log())


# --------------------------------------------------------------------------- quantizers


@W(WEIGHT)
@given(x=F.quantize_input(shape=EMU_DIMS), dev=device_st)
def test_quantize_int8_rowwise_emu(x, dev):
    on(dev, F.prop_quantize_rowwise, "quantize_int8_rowwise", x)


@W(WEIGHT)
@given(x=F.quantize_input(two_d=True, shape=EMU_DIMS),
       threshold=st.sampled_from([6.0, 0.0, -2.0, 0.5, 1.0, 100.0, 1e-30, float("inf")]),
       at=st.booleans(), dev=device_st)
def test_quantize_int8_rowwise_outliers_emu(x, threshold, at, dev):
    if at and x.numel() and 0 < threshold < float("inf"):
        x = x.clone()
        x[0, -1] = threshold          # |x| == threshold is an outlier (inclusive)
    on(dev, F.prop_outliers, "quantize_int8_rowwise_outliers", x, threshold)


# --------------------------------------------------------------------------- GEMMs


@W(WEIGHT)
@given(case=F.int8_gemm_case(shape=EMU_DIMS), dev=device_st)
def test_int8_gemm_emu(case, dev):
    on(dev, F.prop_int8_gemm, "int8_gemm", *case)


@W(WEIGHT)
@given(case=F.relayout(F.w8a8_case(shape=EMU_DIMS)), dev=device_st)
def test_w8a8_gemm_emu(case, dev):
    on(dev, F.prop_w8a8, "w8a8_gemm", *case)


@W(WEIGHT)
@given(case=F.relayout(F.w4a8_case(shape=EMU_DIMS, k_max_gk=160)), dev=device_st)
def test_w4a8_gemm_emu(case, dev):
    on(dev, F.prop_w4a8, "w4a8_gemm", *case)


@W(WEIGHT)
@given(case=F.relayout(F.weight_only_case(int4=False, shape=EMU_DIMS)), dev=device_st)
def test_w8a16_gemm_emu(case, dev):
    on(dev, F.prop_w8a16, "w8a16_gemm", *case)


@W(WEIGHT)
@given(case=F.relayout(F.weight_only_case(int4=True, shape=EMU_DIMS, k_max_gk=160)), dev=device_st)
def test_w4a16_gemm_emu(case, dev):
    on(dev, F.prop_w4a16, "w4a16_gemm", *case)


@W(0.03)
@given(case=F.int8_gemm_case(near_bound=True), w8a8=F.w8a8_case(near_bound=True),
       llm=F.llm_int8_case(near_bound=True), dev=device_st)
def test_int8_gemms_k_at_int32_bound_emu(case, w8a8, llm, dev):
    """K within 40 of 131,071 (s.4), -128 included: the int32 accumulators stay exact (a few
    cases: one such GEMM on the tensor cores takes seconds on the emulator)."""
    on(dev, F.prop_int8_gemm, "int8_gemm", *case)
    on(dev, F.prop_w8a8, "w8a8_gemm", *w8a8)
    on(dev, F.prop_llm_int8, "llm_int8_linear", *llm)


@W(WEIGHT / 2)
@given(op=st.sampled_from(["int8_gemm", "w8a8_gemm", "w4a8_gemm"]), data=st.data(), dev=device_st)
def test_int8_tensor_core_emu(op, data, dev):
    """int8_gemm / w8a8_gemm / w4a8_gemm at the IMMA kernel's shapes: its three tile configs
    (M <= 16, <= 64, > 64), int32 and float epilogues, signed and unsigned int4."""
    if op == "int8_gemm":
        on(dev, F.prop_int8_gemm, op, *data.draw(F.int8_gemm_case(shape=IMMA_DIMS)))
    elif op == "w8a8_gemm":
        on(dev, F.prop_w8a8, op, *data.draw(F.relayout(F.w8a8_case(shape=IMMA_DIMS))))
    else:
        on(dev, F.prop_w4a8, op, *data.draw(F.relayout(F.w4a8_case(shape=IMMA_DIMS, k_max_gk=256))))


@W(WEIGHT / 2)
@given(int4=st.booleans(), data=st.data(), dev=device_st)
def test_weight_only_tensor_core_emu(int4, data, dev):
    """w8a16 / w4a16 at the tensor-core kernel's shapes: its three tile configs, split-K (by the
    emulated SM count) and the reduce kernel."""
    case = data.draw(F.relayout(F.weight_only_case(int4=int4, shape=TC_DIMS, k_max_gk=1024,
                                                   dtypes=(torch.float16, torch.bfloat16))))
    on(dev, F.prop_w4a16 if int4 else F.prop_w8a16, "w4a16_gemm" if int4 else "w8a16_gemm", *case)


@W(WEIGHT / 2)
@given(case=F.gemm_4bit_case(shape=EMU_DIMS), dev=device_st)
def test_gemm_4bit_emu(case, dev):
    """NF4 / FP4: the GEMV (M <= 8, fp32, odd K, misaligned layouts) and, for larger M, the tensor cores."""
    on(dev, F.prop_gemm_4bit, "gemm_4bit", *case)


@W(WEIGHT / 2)
@given(case=F.gemm_4bit_case(shape=TC_DIMS, dtypes=(torch.float16, torch.bfloat16), k_mult=32), dev=device_st)
def test_gemm_4bit_tensor_core_emu(case, dev):
    """NF4 / FP4 at the tensor-core kernel's shapes (K % 32 == 0): its three tiles, split-K, the code
    table decode, flat blocks spanning rows, double quantization."""
    on(dev, F.prop_gemm_4bit, "gemm_4bit", *case)


@W(WEIGHT)
@given(case=F.relayout(F.llm_int8_case(shape=EMU_DIMS)), dev=device_st)
def test_llm_int8_linear_emu(case, dev):
    on(dev, F.prop_llm_int8, "llm_int8_linear", *case)


# --------------------------------------------------------------------------- bad input


def _spoil(draw, op: str, args: list):
    """One argument of a valid call made invalid: a 3-D activation (the GEMMs take [M, K]), another
    dtype, a scale or bias of the wrong length, a weight with another K. Returns (args, what)."""
    kinds = ["3-D activation", "activation dtype", "weight K", "scale length", "scale dtype"]
    if op in ("w8a8_gemm", "w4a8_gemm", "w8a16_gemm", "w4a16_gemm", "llm_int8_linear", "gemm_4bit"):
        kinds.append("bias length")
    kind = draw(st.sampled_from(kinds))
    a = list(args)
    if kind == "3-D activation":
        a[0] = a[0].reshape(1, *a[0].shape)
    elif kind == "activation dtype":
        a[0] = a[0].to(torch.int32 if a[0].is_floating_point() else torch.float16)
    elif kind == "weight K":
        a[1] = torch.cat([a[1], a[1][:, :1]], dim=1)
    else:
        si = {"int8_gemm": None, "w8a8_gemm": 3, "w4a8_gemm": 3, "w8a16_gemm": 2, "w4a16_gemm": 2,
              "llm_int8_linear": 2, "gemm_4bit": 2}[op]
        if si is None:
            kind = "weight K"
            a[1] = torch.cat([a[1], a[1][:, :1]], dim=1)
        elif kind == "scale length":
            a[si] = torch.cat([a[si], a[si][:1]])
        elif kind == "scale dtype":
            a[si] = a[si].to(torch.float64)
        else:
            bi = {"w8a8_gemm": 4, "w4a8_gemm": 5, "w8a16_gemm": 3, "w4a16_gemm": 4, "llm_int8_linear": 3,
                  "gemm_4bit": 7}[op]
            a[bi] = torch.ones(a[1].shape[0] + 1)
    return a, kind


@W(WEIGHT / 3)
@given(op=st.sampled_from(["int8_gemm", "w8a8_gemm", "w4a8_gemm", "w8a16_gemm", "w4a16_gemm", "llm_int8_linear",
                           "gemm_4bit"]),
       data=st.data())
def test_bad_input_refused_like_the_reference_emu(op, data):
    """A call with one spoiled argument: the CUDA bindings refuse it with the reference's error
    (same exception type, same message naming the argument and the value), never a crash, a
    hazard or a result."""
    from quantkernels import reference as R

    small = F.dims(m_max=9, n_max=9, k_max=64)
    case = {"int8_gemm": lambda: F.int8_gemm_case(shape=small), "w8a8_gemm": lambda: F.w8a8_case(shape=small),
            "w4a8_gemm": lambda: F.w4a8_case(shape=small, k_max_gk=64),
            "w8a16_gemm": lambda: F.weight_only_case(int4=False, shape=small),
            "w4a16_gemm": lambda: F.weight_only_case(int4=True, shape=small, k_max_gk=64),
            "llm_int8_linear": lambda: F.llm_int8_case(shape=small),
            "gemm_4bit": lambda: F.gemm_4bit_case(shape=small).map(
                lambda c: (c[0], c[1], c[2][0], c[3], c[4], c[2][1], c[2][2], c[5]))}[op]
    args, kind = _spoil(data.draw, op, list(data.draw(case())))
    if op == "llm_int8_linear" and kind == "activation dtype":
        args[0] = args[0].to(torch.int32)
    with pytest.raises((ValueError, TypeError)) as want:
        getattr(R, op)(*args)
    F.count_case()
    with pytest.raises(want.type) as got:
        getattr(emu, op)(*args)
    assert str(got.value) == str(want.value), (kind, str(got.value), str(want.value))


# --------------------------------------------------------------------------- coverage


def test_fuzz_reached_every_kernel_variant():
    """The drawn cases above (this runs after them) launched every __global__ kernel of
    csrc/cuda/*.cu and every tile config of the two tensor-core GEMMs: the shapes are not so
    small that a path is never fuzzed."""
    import re

    if not LAUNCHED:
        pytest.skip("run with the fuzz tests above (none ran in this session)")
    src = "".join(p.read_text() for p in (cuda_emu.CSRC / "cuda").glob("*.cu"))
    kernels = set(re.findall(r"__global__ void(?: __launch_bounds__\([^)]*\))?\s+(\w+)\(", src))
    log = "\n".join(sorted(LAUNCHED))
    missing = [k for k in sorted(kernels) if f"::{k}<" not in log and f"::{k}(" not in log]
    assert not missing, f"never launched: {missing}\nlaunched:\n{log}"
    tiles = [f"imma_gemm_kernel<{t}, {i4}" for i4 in ("false", "true") for t in (
        "16, 64, 1, 4, 4", "64, 128, 2, 2, 4" if i4 == "false" else "64, 64, 2, 2, 4", "128, 128, 2, 4, 4")]
    tiles += [rf"weight_only_mma_kernel<\w+, true, {t}, {code}>" for code in ("false", "true")
              for t in ("16, 2, 6", "32, 2, 5", "64, 4, 4")]
    tiles += [r"weight_only_mma_kernel<\w+, false, 16, 2, 6, false>", r"weight_only_gemv_kernel<\w+, true, true>"]
    missing = [t for t in tiles if not re.search(t, log)]
    assert not missing, f"tile configs never launched: {missing}\nlaunched:\n{log}"
