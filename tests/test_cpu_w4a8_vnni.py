"""w4a8_gemm's VNNI paths (csrc/cpu/w4a8.cpp): the tails of their tiles, integer extremes, and the
same results at every ISA level.

avx512_vnni: panel path (M >= 5 outside the GEMV shapes, G in 32..256) in 2-panel (32-token) x
8-row tiles with a 1-panel tile for an odd panel count; decode GEMV (M <= 4, K % 64 == 0, G = 32
or G % 64 == 0) in 128-k steps with a half-width step for K % 128 == 64; M = 5..12 the GEMV per 4
rows (other levels: 5..8). avx_vnni: the AVX2 layouts with ymm vpdpbusd. Every level runs (tests/_isa.py), at 1 and 2
threads; fp32 outputs against the fp64 formula, and bit for bit against the AVX2 level (the VNNI
paths keep its integer sums and its fp32 order), fp16 / bf16 against the reference.
"""
import itertools

import pytest
import torch

import quantkernels._ops  # noqa: F401
from quantkernels import _native
from quantkernels import reference as R
from _isa import isa, threads  # noqa: F401  (fixtures)

if not _native.load():
    pytest.skip(f"native extension quantkernels._C not available: {_native.REASON}", allow_module_level=True)

from test_cpu_w4a8_llm_int8 import _assert_fp32_close, _w4a8_fp64, _w4a8_inputs  # noqa: E402

OPS = torch.ops.quantkernels


def _same_as_avx2(monkeypatch, isa, out, args):
    # The VNNI paths keep the AVX2 integer sums and fp32 order: bit-identical outputs.
    if isa in ("portable", "avx2") or "avx2" not in _native.cpu_isa_levels():
        return
    monkeypatch.setenv("QUANTKERNELS_CPU_ISA", "avx2")
    want = OPS.w4a8_gemm(*args)
    monkeypatch.setenv("QUANTKERNELS_CPU_ISA", isa)
    assert torch.equal(out, want), f"differs from avx2 at {(out != want).nonzero()[:5].tolist()}"


# Decode GEMV: K % 128 in {0, 64} (the zmm half-width tail step), G = 32 (4 or 2 groups per
# step), 64, 128, 256 and per-channel G = K with and without the tail; N tails of the 4 / 2 / 1-row tiles.
GEMV_NKG = [(7, 320, 32), (13, 256, 32), (6, 192, 64), (5, 512, 64), (9, 384, 128), (11, 1280, 256),
            (3, 448, 448), (10, 640, 640), (2, 64, 64), (4, 4096 + 64, 32)]
GEMV_CASES = list(itertools.product((1, 2, 3, 4, 6, 8, 9, 12), GEMV_NKG, ["sym", "asym"]))


@pytest.mark.parametrize("M,nkg,kind", GEMV_CASES, ids=[f"M{m}-N{n}-K{k}-G{g}-{kd}" for m, (n, k, g), kd in GEMV_CASES])
def test_gemv_tails(M, nkg, kind, isa, threads, monkeypatch):
    N, K, G = nkg
    a, bp, sa, sb, zb, bias = _w4a8_inputs(M, N, K, G, kind, seed=M * 101 + N + K + G, bias_dtype=torch.float32)
    args = (a, bp, sa, sb, zb, bias, None)
    out = OPS.w4a8_gemm(*args)
    _assert_fp32_close(out, *_w4a8_fp64(a, bp, sa, sb, zb, bias))
    if M <= 8:  # M = 9..12: the GEMV chunks at avx512_vnni, the panels at avx2 (another fp32 order)
        _same_as_avx2(monkeypatch, isa, out, args)


# Panel path: panel counts 1, 2, 3 (a 2-panel tile + a 1-panel tile), 9 (2 M blocks of 128
# tokens, the second with 1 ragged panel); N tails of the 8-row (avx512_vnni) and 4-row strips
# (N % 8 = 1, 5, 6, 7; M % 16 = 15);
# K > 2048 (two K blocks) with G = 32 / 64 / 128 / 256; M = 5..8 where the GEMV does not apply.
PANEL_MNKG = [(5, 9, 96, 32), (7, 12, 160, 32), (16, 8, 256, 64), (17, 3, 512, 128), (33, 70, 2048 + 256, 256),
              (48, 13, 2048 + 128, 64), (130, 17, 1024, 128), (144, 1, 256, 32), (40, 16, 96, 32),
              (31, 15, 256, 32), (47, 23, 2048 + 64, 64)]
PANEL_CASES = list(itertools.product(PANEL_MNKG, ["sym", "asym"]))


@pytest.mark.parametrize("mnkg,kind", PANEL_CASES, ids=[f"M{m}-N{n}-K{k}-G{g}-{kd}" for (m, n, k, g), kd in PANEL_CASES])
def test_panel_tails(mnkg, kind, isa, threads, monkeypatch):
    M, N, K, G = mnkg
    a, bp, sa, sb, zb, bias = _w4a8_inputs(M, N, K, G, kind, seed=M + 3 * N + K + G, bias_dtype=torch.bfloat16)
    args = (a, bp, sa, sb, zb, bias, None)
    out = OPS.w4a8_gemm(*args)
    _assert_fp32_close(out, *_w4a8_fp64(a, bp, sa, sb, zb, bias))
    _same_as_avx2(monkeypatch, isa, out, args)


def _extreme(M, N, K, G, sym):
    # a = -128 / 127 against nibbles 0 / 15 (codes; signed: -8 / 7), zero points 0 / 15.
    a = torch.full((M, K), -128, dtype=torch.int8)
    a[1::3] = 127
    a[2::3, ::2] = 127
    if sym:
        q = torch.full((N, K), -8, dtype=torch.int8)
        q[1::3] = 7
        q[2::3, 1::2] = 7
        return a, R.pack_int4(q), None
    q = torch.full((N, K), 15, dtype=torch.uint8)
    q[1::3] = 0
    q[2::3, ::2] = 0
    z = torch.full((N, K // G), 15, dtype=torch.uint8)
    z[::2] = 0
    return a, R.pack_int4(q), z


EXT = list(itertools.product([(1, 9, 448, 448), (3, 5, 320, 32), (4, 6, 192, 64), (2, 9, 512, 256), (7, 9, 384, 128),
                              (20, 11, 512, 256), (37, 9, 2048 + 64, 32), (33, 17, 256, 64), (5, 9, 96, 32)],
                             [True, False]))


@pytest.mark.parametrize("mnkg,sym", EXT, ids=[f"M{m}-N{n}-K{k}-G{g}-{'sym' if s else 'asym'}" for (m, n, k, g), s in EXT])
def test_extremes_exact(mnkg, sym, isa):
    # Every sum is an integer below 2^24 with unit scales: exact in fp32, so compared with == .
    M, N, K, G = mnkg
    a, bp, zb = _extreme(M, N, K, G, sym)
    sa, sb = torch.ones(M), torch.ones(N, K // G)
    out = OPS.w4a8_gemm(a, bp, sa, sb, zb, None, None)
    y64, _ = _w4a8_fp64(a, bp, sa, sb, zb, None)
    torch.testing.assert_close(out.double(), y64, rtol=0, atol=0)


@pytest.mark.parametrize("out_dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("M,K,G", [(1, 448, 64), (3, 256, 32), (6, 512, 128), (21, 256, 256), (40, 192, 64)])
def test_half_outputs(M, K, G, out_dtype, isa):
    a, bp, sa, sb, zb, bias = _w4a8_inputs(M, 21, K, G, "asym", seed=M + K, bias_dtype=torch.float32)
    out = OPS.w4a8_gemm(a, bp, sa, sb, zb, bias, out_dtype)
    assert out.dtype == out_dtype
    torch.testing.assert_close(out, R.w4a8_gemm(a, bp, sa, sb, zb, bias, out_dtype))


def test_variant_string(isa):
    # quantkernels info: what w4a8_gemm runs at each level.
    v = _native.cpu_kernel_variants()["w4a8_gemm"]
    want = {"portable": "portable", "avx2": "avx2", "avx_vnni": "avx_vnni", "avx512": "avx2",
            "avx512_vnni": "avx512_vnni", "avx512_bf16": "avx512_vnni"}[isa]
    assert v.startswith(want + ":"), v
