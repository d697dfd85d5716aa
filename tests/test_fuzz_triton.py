"""Property-based fuzzing (hypothesis) of every Triton op (``quantkernels::<op>_triton``) through
the Triton interpreter on CPU tensors, against the reference and tests/_spec.py -- the same
properties as tests/test_fuzz.py (tests/_fuzz.py), on smaller shapes (the interpreter runs each
program instance in numpy).

Triton picks interpreter or compiler mode when it is imported, so this module shares
tests/test_triton.py's switch into interpreter mode and, like it, needs a process of its own
(the Makefile runs both files in a second pytest process). bf16 subnormal inputs are left out
here: the interpreter's bf16 -> fp32 conversion flushes them to zero (a GPU's is exact).
"""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

import _fuzz as F
import _spec as S
import torch
from test_triton import HAVE_TRITON, NO_INTERP  # noqa: F401  (enters interpreter mode first)

import quantkernels  # noqa: E402,F401  (registers the Triton ops)

pytestmark = [pytest.mark.triton_interp,
              pytest.mark.skipif(not HAVE_TRITON, reason="triton is not installed"),
              pytest.mark.skipif(bool(NO_INTERP), reason=f"not in interpreter mode: {NO_INTERP} "
                                 "(run this file in a process of its own, as the Makefile does)")]

T = F.T
W = F.fuzz_settings
SMALL = F.dims(m_max=9, n_max=20, k_max=96)
FLUSH = dict(flush_bf16_subnormals=True)


def op(name):
    return getattr(T, f"{name}_triton").default


@W(0.4)
@given(x=F.quantize_input(shape=SMALL, **FLUSH))
def test_quantize_int8_rowwise_triton(x):
    F.prop_quantize_rowwise(op("quantize_int8_rowwise"), True, x)


@W(0.4)
@given(x=F.quantize_input(two_d=True, shape=SMALL, **FLUSH),
       threshold=st.sampled_from([6.0, 0.0, -2.0, 0.5, 100.0, float("inf")]))
def test_quantize_int8_rowwise_outliers_triton(x, threshold):
    F.prop_outliers(op("quantize_int8_rowwise_outliers"), True, x, threshold)


@W(0.4)
@given(case=F.w8a8_case(shape=SMALL))
def test_int8_gemm_triton(case):
    F.prop_int8_gemm(op("int8_gemm"), True, *case[:2])


@W(0.4)
@given(case=F.w8a8_case(shape=SMALL))
def test_w8a8_gemm_triton(case):
    F.prop_w8a8(op("w8a8_gemm"), True, *case)


@W(0.4)
@given(case=F.w4a8_case(shape=SMALL, k_max_gk=96))
def test_w4a8_gemm_triton(case):
    F.prop_w4a8(op("w4a8_gemm"), True, *case)


@W(0.4)
@given(case=F.weight_only_case(int4=False, shape=SMALL, **FLUSH))
def test_w8a16_gemm_triton(case):
    F.prop_w8a16(op("w8a16_gemm"), True, *case)


@W(0.4)
@given(case=F.weight_only_case(int4=True, shape=SMALL, k_max_gk=96, **FLUSH))
def test_w4a16_gemm_triton(case):
    F.prop_w4a16(op("w4a16_gemm"), True, *case)


@W(0.4)
@given(case=F.llm_int8_case(shape=SMALL, **FLUSH))
def test_llm_int8_linear_triton(case):
    F.prop_llm_int8(op("llm_int8_linear"), True, *case)


@W(0.4)
@given(case=F.gemm_4bit_case(shape=F.dims(m_max=9, n_max=20, k_max=96, even_k=True), flush_bf16_subnormals=True))
def test_gemm_4bit_triton(case):
    F.prop_gemm_4bit(op("gemm_4bit"), True, *case)
