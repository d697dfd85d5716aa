"""The VNNI int8 paths (csrc/cpu/gemm_int8_vnni.h: AVX-512 VNNI zmm / AVX-VNNI ymm) at their edges.

Every ISA level runs (tests/_isa.py; the levels this CPU lacks are skipped), so the same cases
also check the avx2 and portable paths. The tiles are 4 weight rows x 4 tokens, K in 64-byte (zmm)
or 32-byte (ymm) steps with a masked / zero-padded tail, K blocks of 2048, tasks of 64 weight rows
x 96 tokens; the GEMV (M <= 4) uses the same tile with all M rows of a. The weight is offset by
+128 in-register and the sums start from -128 * rowsum(a): int32 sums wrap mod 2^32 on the way,
so the large-K cases with extreme values check that the wrapped result is exact.
"""
import itertools

import pytest
import torch

import quantkernels
from quantkernels import reference as R

from _isa import isa, threads  # noqa: F401  (fixtures)

OPS = torch.ops.quantkernels

if not quantkernels._native.AVAILABLE:
    pytest.skip(f"quantkernels._C is not built: {quantkernels._native.REASON}", allow_module_level=True)


def _rand(shape, g):
    return torch.randint(-128, 128, shape, dtype=torch.int8, generator=g)


# M: GEMV (1..4), one tile (4), tile tails (5, 6, 7), the 96-token task edge (95, 97).
# N: tile tails (1, 3, 5), the 64-row task edge (63, 65). K: the 32 / 64-byte steps and their
# tails, the 2048 K block and its tails.
TAIL_MS = (1, 2, 3, 4, 5, 7, 97)
TAIL_NS = (1, 3, 65)
TAIL_KS = (1, 31, 33, 63, 64, 65, 2047, 2049, 4161)
TAIL_CASES = list(itertools.product(TAIL_MS, TAIL_NS, TAIL_KS))


@pytest.mark.parametrize("M,N,K", TAIL_CASES, ids=[f"M{m}-N{n}-K{k}" for m, n, k in TAIL_CASES])
def test_int8_gemm_tails_exact(M, N, K, isa):
    g = torch.Generator().manual_seed(M * 1000003 + N * 1009 + K)
    a, b = _rand((M, K), g), _rand((N, K), g)
    a[0, : min(K, 7)] = -128  # -128 in both operands (valid for the raw int8_gemm op)
    b[-1, -min(K, 5):] = -128
    torch.testing.assert_close(OPS.int8_gemm(a, b), R.int8_gemm(a, b), rtol=0, atol=0)


@pytest.mark.parametrize("M,N,K", [(6, 130, 4100), (96, 64, 2048), (100, 70, 2111), (4, 67, 6000), (1, 9, 129)])
def test_int8_gemm_tails_threads(M, N, K, isa, threads):
    g = torch.Generator().manual_seed(M + N + K)
    a, b = _rand((M, K), g), _rand((N, K), g)
    torch.testing.assert_close(OPS.int8_gemm(a, b), R.int8_gemm(a, b), rtol=0, atol=0)


@pytest.mark.parametrize("M", (1, 4, 5, 9))
def test_int8_gemm_max_k_extremes(M, isa):
    # K = 131071 (the largest allowed). a = 127 against b = 127: sum a * (b + 128) = 127 * 255 * K
    # > 2^32 wraps inside the VNNI accumulators, yet the result 127 * 127 * K is exact; a = -128
    # against b = -128 gives 2^31 - 16384, the largest int32 result; a = -128 against b = 127 a
    # large negative one.
    K = 131071
    a = torch.full((M, K), 127, dtype=torch.int8)
    a[M // 2] = -128
    a[-1, ::3] = -128
    b = torch.full((5, K), 127, dtype=torch.int8)
    b[1] = -128
    b[2, ::2] = -128
    b[3, 1::7] = 0
    b[4, -1] = -128
    out = OPS.int8_gemm(a, b)
    torch.testing.assert_close(out, R.int8_gemm(a, b), rtol=0, atol=0)
    if M > 2:  # row 0 stays all 127
        assert out[0, 0].item() == 127 * 127 * K
    assert out[M // 2, 1].item() == 128 * 128 * K == 2 ** 31 - 16384


@pytest.mark.parametrize("M", (1, 3, 4, 5, 18))
def test_w8a8_gemm_tails_and_bias(M, isa, threads):
    g = torch.Generator().manual_seed(M)
    N, K = 67, 2049 + 64 + 3
    a = torch.randint(-127, 128, (M, K), dtype=torch.int8, generator=g)
    b = _rand((N, K), g)
    sa, sb = torch.rand(M, generator=g) + 1e-3, torch.rand(N, generator=g) * 0.01 + 1e-4
    bias = torch.randn(N, generator=g)
    for dt in (None, torch.bfloat16, torch.float16):
        torch.testing.assert_close(OPS.w8a8_gemm(a, b, sa, sb, bias, dt), R.w8a8_gemm(a, b, sa, sb, bias, dt),
                                   rtol=0, atol=0)


@pytest.mark.parametrize("M", (2, 7))
def test_int8_gemm_non_contiguous_tails(M, isa):
    g = torch.Generator().manual_seed(5)
    K, N = 97, 11
    a = _rand((K, M), g).t()          # transposed a
    b = _rand((2 * N, K + 3), g)[::2, 1 : K + 1]  # strided, offset b
    assert not a.is_contiguous() and not b.is_contiguous()
    torch.testing.assert_close(OPS.int8_gemm(a, b), R.int8_gemm(a, b), rtol=0, atol=0)


def test_quantize_then_w8a8_3d(isa):
    # QuantLinear's path: 3-D activations through quantize_int8_rowwise (N-D), then w8a8_gemm.
    g = torch.Generator().manual_seed(9)
    x = torch.randn(2, 5, 200, generator=g)[:, :, ::2]  # non-contiguous 3-D, K = 100
    q, s = OPS.quantize_int8_rowwise(x)
    rq, rs = R.quantize_int8_rowwise(x)
    assert torch.equal(q, rq) and torch.equal(s, rs)
    w = torch.randn(33, 100, generator=g)
    wq, ws = OPS.quantize_int8_rowwise(w)
    out = OPS.w8a8_gemm(q.reshape(-1, 100), wq, s.reshape(-1), ws, None, None)
    torch.testing.assert_close(out, R.w8a8_gemm(rq.reshape(-1, 100), wq, rs.reshape(-1), ws), rtol=0, atol=0)


def test_variant_strings_name_the_path(monkeypatch):
    levels = quantkernels._native.cpu_isa_levels()
    for level in levels:
        monkeypatch.setenv("QUANTKERNELS_CPU_ISA", level)
        v = dict(quantkernels._native.cpu_kernel_variants())
        if level in ("avx512_vnni", "avx512_bf16"):
            assert "vpdpbusd" in v["int8_gemm"] and "zmm" in v["int8_gemm"], v["int8_gemm"]
            assert "zmm" in v["quantize_int8_rowwise"], v["quantize_int8_rowwise"]
        elif level == "avx_vnni":
            assert "vpdpbusd" in v["int8_gemm"] and "ymm" in v["int8_gemm"], v["int8_gemm"]
