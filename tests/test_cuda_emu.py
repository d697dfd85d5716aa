"""The real CUDA kernels (csrc/cuda/*.cu, csrc/cuda_bindings.cpp) on the CPU, through the CUDA
emulator (quantkernels.cuda_emu, issue 15).

1. Each emulated primitive against a transcription of its definition in NVIDIA's PTX ISA /
   CUDA math API: mma.sync m16n8k32 .s8 and m16n8k16 .f16/.bf16 fragment layouts, ldmatrix .x4,
   cp.async.cg (zero-fill, landing only when waited for), __shfl_xor_sync, __ballot_sync,
   __byte_perm, __vsub4, RNE conversions, __fmul_rn / __fadd_rn / __fdiv_rn.
2. Each hazard check fires, naming kernel, block, warp and address; a block above the kernel's
   __launch_bounds__ fails the launch, and every kernel in csrc/cuda/ states its bound twice
   (`__launch_bounds__(B)` for nvcc, `QK_LAUNCH_BOUNDS(B);` first for the emulator) with one text.
3. tests/test_cuda.py's grid (the GPU suite) with ``ops`` = the emulated ops on CPU tensors:
   the same test functions, the same spec checks. By default a subset that covers every kernel
   variant the host code selects (tile configs, SIMT fallbacks, GEMV, tensor-core weight-only,
   split-K, int4 / int8, signed / unsigned, fp16 / bf16 / fp32); ``make cuda-emu``
   (QUANTKERNELS_CUDA_EMU_FULL=1) runs every case that does not need a real GPU (CUDA graphs,
   the profiler, compute-sanitizer, device placement).
"""

from __future__ import annotations

import importlib.util
import os
import pathlib
import re
import types

import numpy as np
import pytest
import torch

from quantkernels import cuda_emu

FULL = os.environ.get("QUANTKERNELS_CUDA_EMU_FULL", "") == "1"


class _Emu:
    """torch.ops.quantkernels_cuda_emu, built and loaded on first use (not at collection)."""

    def __getattr__(self, name):
        return getattr(cuda_emu.load(), name)


emu = _Emu()


@pytest.fixture(autouse=True, scope="module")
def _allocation_tracking():
    """The out-of-bounds check tracks CPU allocations while this module runs, not after."""
    cuda_emu.track_allocations(True)
    yield
    cuda_emu.track_allocations(False)


# --------------------------------------------------------------------------- 1. primitives


def _lanes():
    lane = np.arange(32)
    return lane, lane >> 2, lane & 3  # lane, groupID, threadID_in_group


def _pack_bytes(vals):  # [..., 4] int -> int32 (byte 0 lowest)
    v = np.asarray(vals, dtype=np.int64) & 0xFF
    return (v[..., 0] | v[..., 1] << 8 | v[..., 2] << 16 | v[..., 3] << 24).astype(np.uint32).view(np.int32)


def _pack_halves(bits):  # [..., 2] uint16 -> int32 (first value in the low half)
    b = np.asarray(bits, dtype=np.int64)
    return (b[..., 0] | b[..., 1] << 16).astype(np.uint32).view(np.int32)


def _c_layout(C):
    """Accumulators c0..c3 of lane (g, t): rows g (c0, c1) / g + 8 (c2, c3), cols 2t + (i & 1)."""
    _, g, t = _lanes()
    rows = np.stack([g, g, g + 8, g + 8], 1)
    cols = np.stack([2 * t, 2 * t + 1, 2 * t, 2 * t + 1], 1)
    return C[rows, cols], rows, cols


def test_mma_m16n8k32_s8_fragments():
    """PTX ISA, "Matrix Fragments for mma.m16n8k32" (.s8): a_i row g for i < 4 or 8 <= i < 12
    else g + 8, col 4t + (i & 3) (+ 16 for i >= 8); b_i row 4t + (i & 3) (+ 16 for i >= 4), col g."""
    rng = np.random.default_rng(0)
    A = rng.integers(-128, 128, (16, 32))
    B = rng.integers(-128, 128, (32, 8))  # K x N
    C = rng.integers(-2**20, 2**20, (16, 8))
    A[0, :] = -128
    B[:, 0] = -128
    _, g, t = _lanes()
    a = np.zeros((32, 16), np.int64)
    for i in range(16):
        row = np.where((i < 4) | ((i >= 8) & (i < 12)), g, g + 8)
        a[:, i] = A[row, 4 * t + (i & 3) + (16 if i >= 8 else 0)]
    b = np.stack([B[4 * t + (i & 3) + (16 if i >= 4 else 0), g] for i in range(8)], 1)
    c, rows, cols = _c_layout(C)
    inp = np.concatenate([_pack_bytes(a.reshape(32, 4, 4)), _pack_bytes(b.reshape(32, 2, 4)), c.astype(np.int32)], 1)
    d = emu.probe_mma(torch.from_numpy(np.ascontiguousarray(inp)).clone(), 0).numpy()
    D = A @ B + C
    assert np.array_equal(d, D[rows, cols])


@pytest.mark.parametrize("bf", [False, True], ids=["f16", "bf16"])
def test_mma_m16n8k16_half_fragments(bf):
    """PTX ISA, "mma.m16n8k16" (.f16 / .bf16, .f32 accumulators): a_i row g for i in {0, 1, 4, 5}
    else g + 8, col 2t + (i & 1) (+ 8 for i >= 4); b_i row 2t + (i & 1) (+ 8 for i >= 2), col g."""
    dt = torch.bfloat16 if bf else torch.float16
    A = torch.randn(16, 16).to(dt)
    B = torch.randn(16, 8).to(dt)  # K x N
    C = torch.randn(16, 8)
    bits = lambda x: x.view(torch.int16).numpy().astype(np.int64) & 0xFFFF  # noqa: E731
    Ab, Bb = bits(A), bits(B)
    _, g, t = _lanes()
    a = np.zeros((32, 8), np.int64)
    for i in range(8):
        row = np.where(np.isin(i, (0, 1, 4, 5)), g, g + 8)
        a[:, i] = Ab[row, 2 * t + (i & 1) + (8 if i >= 4 else 0)]
    b = np.stack([Bb[2 * t + (i & 1) + (8 if i >= 2 else 0), g] for i in range(4)], 1)
    c, rows, cols = _c_layout(C.numpy())
    inp = np.concatenate([_pack_halves(a.reshape(32, 4, 2)), _pack_halves(b.reshape(32, 2, 2)),
                          c.astype(np.float32).view(np.int32)], 1)
    d = emu.probe_mma(torch.from_numpy(np.ascontiguousarray(inp)).clone(), 2 if bf else 1).view(torch.float32).numpy()
    exact = A.double().numpy() @ B.double().numpy() + C.double().numpy()
    mag = np.abs(A.double().numpy()) @ np.abs(B.double().numpy()) + np.abs(C.double().numpy())
    # Products are exact in fp32; the sum's order is unspecified: 17 fp32 roundings at most.
    assert np.all(np.abs(d - exact[rows, cols]) <= 17 * 2.0**-24 * mag[rows, cols])


def test_ldmatrix_x4():
    """PTX ISA, ldmatrix .m8n8.x4 .b16: lanes 8i .. 8i + 7 give the row addresses of matrix i;
    lane l receives in register i the elements 2 (l % 4), +1 of row l / 4 of matrix i."""
    tile = torch.randint(0, 256, (512,), dtype=torch.uint8)
    rows = (torch.randperm(32) * 16).to(torch.int32)
    out = emu.probe_ldmatrix(tile, rows).numpy().view(np.uint32)
    tb = tile.numpy()
    for lane in range(32):
        for i in range(4):
            off = int(rows[8 * i + lane // 4]) + 4 * (lane % 4)
            assert out[lane, i] == int.from_bytes(tb[off:off + 4].tobytes(), "little"), (lane, i)
    with pytest.raises(RuntimeError, match=r"misaligned ldmatrix: lane 0 row address 8"):
        emu.probe_ldmatrix(tile, torch.cat([torch.tensor([8], dtype=torch.int32), rows[1:]]))


@pytest.mark.parametrize("lane_mask", [1, 16, 31])
def test_shfl_xor_and_ballot(lane_mask):
    v = torch.randint(-1000, 1000, (32,), dtype=torch.int32)
    out = emu.probe_warp(v, lane_mask)
    assert torch.equal(out[:, 0], v[torch.arange(32) ^ lane_mask])
    ballot = sum(1 << lane for lane in range(32) if int(v[lane]) & 1)
    assert (out[:, 1].numpy().view(np.uint32) == ballot).all()


def test_cp_async_zero_fill_and_wait_group():
    """cp.async.cg 16 bytes: src-size 0 writes zeros; wait_group(1) lands the older group only,
    and reading the younger group's bytes before it lands is a hazard."""
    src = torch.arange(32, dtype=torch.uint8) + 1
    assert emu.probe_cp_async(src, 0, 0)[:32].tolist() == list(range(1, 33))
    assert emu.probe_cp_async(src, 1, 0)[:32].tolist() == list(range(1, 17)) + [0] * 16
    with pytest.raises(RuntimeError, match=r"reads shared byte dynamic\+16 while a cp.async of thread 0 to it is "
                                           r"still pending"):
        emu.probe_cp_async(src, 0, 1)


def test_conversions_round_to_nearest_even():
    """__float2half_rn / __float2bfloat16_rn round to nearest even (torch's casts do the same),
    __float2int_rn too (NaN -> 0, saturating)."""
    special = [0.5, 1.5, 2.5, -2.5, 65504.0, 65520.0, 1e-8, 5.96e-8, float("inf"), -float("inf"),
               1 + 2**-11, 1 + 3 * 2**-11, 1 + 2**-8, 1 + 3 * 2**-8, 2**31, -2**31 - 1e3]
    x = torch.cat([torch.tensor(special), torch.randn(2000) * 10 ** torch.randint(-6, 6, (2000,)).float()])
    out = emu.probe_convert(x)
    assert torch.equal(out[:, 0].to(torch.int16), x.half().view(torch.int16))
    assert torch.equal(out[:, 1].to(torch.int16), x.bfloat16().view(torch.int16))
    expect_i = torch.round(x.double()).clamp(-2**31, 2**31 - 1).to(torch.int64)
    assert torch.equal(out[:, 2].to(torch.int64), expect_i)
    assert emu.probe_convert(torch.tensor([float("nan")]))[0, 2].item() == 0


def test_byte_perm_and_vsub4():
    """prmt.b32 default mode: byte i = byte s[4i+2:4i] of {y, x}; __vsub4: per-byte a - b mod 256."""
    u, v = torch.randint(-2**31, 2**31 - 1, (500,), dtype=torch.int32), torch.randint(-2**31, 2**31 - 1, (500,),
                                                                                      dtype=torch.int32)
    s = torch.randint(0, 2**16, (500,), dtype=torch.int32)
    s[0] = 0x7540  # weight_only.cu's selectors
    out = emu.probe_bytes(u, v, s).numpy().view(np.uint32)
    for i in range(500):
        both = int(u[i]) & 0xFFFFFFFF | (int(v[i]) & 0xFFFFFFFF) << 32
        perm = sum(((both >> (8 * ((int(s[i]) >> (4 * j)) & 7))) & 0xFF) << (8 * j) for j in range(4))
        sub = sum(((((int(u[i]) >> (8 * j)) - (int(v[i]) >> (8 * j))) & 0xFF) << (8 * j)) for j in range(4))
        assert out[i, 0] == perm and out[i, 1] == sub


def test_rn_arithmetic_is_not_contracted():
    """__fadd_rn(__fmul_rn(a, b), c) rounds twice (no FMA); __fdiv_rn is IEEE division."""
    a, b, c = torch.randn(4000), torch.randn(4000), torch.randn(4000)
    out = emu.probe_rn(a, b, c).numpy()
    an, bn, cn = a.numpy(), b.numpy(), c.numpy()
    assert np.array_equal(out[:, 0], (an * bn).astype(np.float32) + cn)
    fused = (an.astype(np.float64) * bn + cn).astype(np.float32)
    assert not np.array_equal(out[:, 0], fused)  # the two differ somewhere in 4000 draws
    assert np.array_equal(out[:, 1], an / bn)


# --------------------------------------------------------------------------- 2. hazards


HAZARDS = [
    (1, r"shared-memory race: warp 1 writes dynamic\+0, written by warp 0 with no __syncthreads"),
    (2, r"shared-memory race: warp 1 reads dynamic\+400, written by warp 0"),
    (3, r"out-of-bounds global load of 4 bytes at 0x"),
    (4, r"misaligned access"),
    (5, r"__shfl_xor_sync \(mask 0xffffffff\) reached by lanes \{0,.*,30\} only; lanes \{31\} exited"),
    (6, r"__syncthreads reached by 32 of 64 threads; 32 exited before it"),
    (7, r"__ballot_sync executed by lane 16 with member mask 0x0000ffff, which excludes it"),
    (8, r"thread exits with 1 cp.async copies still pending"),
]


@pytest.mark.parametrize("kind,msg", HAZARDS, ids=[str(k) for k, _ in HAZARDS])
def test_hazard_detected(kind, msg):
    g = torch.ones(64)
    emu.probe_hazard(g, 0)  # the same kernel without the seeded hazard runs clean
    with pytest.raises(RuntimeError, match=msg) as e:
        emu.probe_hazard(g, kind)
    text = str(e.value)
    assert "kernel: kernel" in text and "launched by: " in text and "at block (0, 0, 0)" in text
    if kind not in (6,):
        assert "warp" in text and "lane" in text


def test_launch_limits():
    g = torch.ones(64)
    with pytest.raises(RuntimeError, match=r"invalid block \(2048, 1, 1\)"):
        emu.probe_hazard(g, 0, threads=2048)
    with pytest.raises(RuntimeError, match=r"invalid grid \(1, 70000, 1\)"):
        emu.probe_hazard(g, 0, grid_y=70000)
    with pytest.raises(RuntimeError, match=r"60000 bytes of dynamic shared memory exceed 48 KB without the opt-in"):
        emu.probe_hazard(g, 0, smem=60000)
    emu.probe_hazard(g, 0, smem=60000, optin=True)
    with pytest.raises(RuntimeError, match=r"200000\) exceeds sm_80's 166912 bytes"):
        emu.probe_hazard(g, 0, smem=200000, optin=True)
    with cuda_emu.device(90, 132):
        emu.probe_hazard(g, 0, smem=200000, optin=True)  # sm_90: 227 KB


def test_launch_bounds_enforced():
    """A block above the kernel's __launch_bounds__ fails the launch as on a GPU (cudaErrorLaunchOutOfResources,
    701), naming the kernel, the block and the bound; at the bound it runs. probe_bounds_kernel<128>'s bound is
    written `kBound / 2 * 2` (a template-dependent expression, like imma_gemm_kernel's)."""
    assert torch.equal(emu.probe_bounds(128, 1, 0), torch.arange(128, dtype=torch.int32))
    assert torch.equal(emu.probe_bounds(32, 4, 0), torch.arange(128, dtype=torch.int32))  # 2-D block, 128 threads
    for bx, by in ((129, 1), (32, 5), (256, 1)):
        with pytest.raises(RuntimeError, match=rf"cudaError 701: .*block \({bx}, {by}, 1\) of {bx * by} threads "
                           r"exceeds the kernel's __launch_bounds__\(128\): a GPU refuses this launch") as e:
            emu.probe_bounds(bx, by, 0)
        text = str(e.value)
        assert "kernel: probe_bounds_kernel<128>" in text and "at block (0, 0, 0), warp 0, lane 0" in text, text
    # The rule the check relies on: QK_LAUNCH_BOUNDS first, in every kernel (probes.cpp breaks it twice).
    with pytest.raises(RuntimeError, match=r"cudaError 719: .*the kernel reads threadIdx before QK_LAUNCH_BOUNDS"):
        emu.probe_bounds(32, 1, 1)
    with pytest.raises(RuntimeError, match=r"cudaError 719: .*the kernel returns before QK_LAUNCH_BOUNDS"):
        emu.probe_bounds(32, 1, 2)


def _strip_comments(src: str) -> str:
    return re.sub(r"//[^\n]*|/\*.*?\*/", " ", src, flags=re.S)


def _balanced(src: str, i: int) -> int:
    """Index just past the bracket that closes the one at src[i]."""
    pairs = {"(": ")", "{": "}", "[": "]"}
    stack = []
    for j in range(i, len(src)):
        c = src[j]
        if c in pairs:
            stack.append(pairs[c])
        elif stack and c == stack[-1]:
            stack.pop()
            if not stack:
                return j + 1
    raise ValueError(f"unbalanced bracket at offset {i}")


def launch_bounds_problems(src: str, where: str = "") -> tuple[list, list]:
    """The __global__ functions of a C++ / CUDA source text and what is wrong with their launch bounds: each must
    be `__global__ void __launch_bounds__(B) name(...) { QK_LAUNCH_BOUNDS(B); ...` with the same text B (spaces
    aside). Returns (names, problems)."""
    src = _strip_comments(src)
    norm = lambda t: re.sub(r"\s+", "", t)  # noqa: E731
    names, problems = [], []
    for m in re.finditer(r"\b__global__\b", src):
        head = re.compile(r"\s*void\s+(?:__launch_bounds__\s*(?=\())?").match(src, m.end())
        bound, name = None, None
        if head is not None:
            i = head.end()
            if src[i] == "(":
                j = _balanced(src, i)
                bound, i = src[i + 1:j - 1], j
            name = re.compile(r"\s*(\w+)\s*(?=\()").match(src, i)
        if name is None:
            problems.append(f"{where}: cannot parse the __global__ declaration at {src[m.start():m.start() + 80]!r}")
            continue
        names.append(name.group(1))
        i = _balanced(src, name.end())
        body = re.compile(r"\s*\{\s*").match(src, i)
        if body is None:
            continue  # a declaration: its definition is checked
        first = re.compile(r"QK_LAUNCH_BOUNDS\s*(?=\()").match(src, body.end())
        stated = None
        if first is not None:
            j = _balanced(src, first.end())
            stated = src[first.end() + 1:j - 1] if src[j:j + 1] == ";" else None
        if bound is None:
            problems.append(f"{where}: {name.group(1)} has no __launch_bounds__")
        elif stated is None:
            problems.append(f"{where}: {name.group(1)}'s first statement is not QK_LAUNCH_BOUNDS({bound.strip()});")
        elif norm(stated) != norm(bound):
            problems.append(f"{where}: {name.group(1)}: __launch_bounds__({bound.strip()}) but "
                            f"QK_LAUNCH_BOUNDS({stated.strip()})")
    return names, problems


def test_launch_bounds_stated_in_every_kernel():
    """Every __global__ kernel in csrc/cuda/ declares __launch_bounds__(B) (what nvcc compiles against) and starts
    with QK_LAUNCH_BOUNDS(B), the same text (what the emulator checks each launch against): a new kernel without
    the pair, or a bound edited in one place only, fails here."""
    names, problems = [], []
    for p in sorted((cuda_emu.CSRC / "cuda").iterdir()):
        if p.suffix in (".cu", ".cuh", ".h"):
            n, pr = launch_bounds_problems(p.read_text(), p.name)
            names += n
            problems += pr
    assert not problems, "; ".join(problems)
    assert sorted(names) == sorted(
        ["imma_gemm_kernel", "simt_gemm_kernel", "simt_w4a8_kernel", "llm_int8_correct_kernel",
         "quantize_rowwise_kernel", "outlier_columns_kernel", "weight_only_gemv_kernel", "weight_only_mma_kernel",
         "splitk_reduce_kernel", "absmax_dq_kernel"]), names
    # The parser itself: each way to break the rule is reported.
    ok = ("template <int B>\n__global__ void __launch_bounds__(B * 32)\nk(int* a, Foo<(1 > 0)> f) {\n"
          "  QK_LAUNCH_BOUNDS(B*32);\n}")
    assert launch_bounds_problems(ok) == (["k"], [])
    assert launch_bounds_problems("__global__ void k(int* a) {\n  QK_LAUNCH_BOUNDS(64);\n}")[1] == [
        ": k has no __launch_bounds__"]
    assert launch_bounds_problems("__global__ void __launch_bounds__(64) k(int* a) {\n  int i = threadIdx.x;\n"
                                  "  QK_LAUNCH_BOUNDS(64);\n}")[1] == [
        ": k's first statement is not QK_LAUNCH_BOUNDS(64);"]
    assert launch_bounds_problems("__global__ void __launch_bounds__(kT) k() { QK_LAUNCH_BOUNDS(kT / 2); }")[1] == [
        ": k: __launch_bounds__(kT) but QK_LAUNCH_BOUNDS(kT / 2)"]
    # probes.cpp breaks the rule on purpose in two kernels (test_launch_bounds_enforced runs them), and only there.
    assert launch_bounds_problems((cuda_emu.EMU / "probes.cpp").read_text(), "probes.cpp")[1] == [
        "probes.cpp: probe_late_bounds_kernel's first statement is not QK_LAUNCH_BOUNDS(128);",
        "probes.cpp: probe_unbounded_kernel has no __launch_bounds__"]
    # /* ... */ and // comments are not code.
    assert launch_bounds_problems("// __global__ void k()\n/* __global__ void j() {} */") == ([], [])


# --------------------------------------------------------------------------- 3. the GPU grid


def _grid_module():
    """tests/test_cuda.py loaded as a module of its own whose ``ops`` are the emulated CUDA ops
    (the other ops, e.g. the weight quantizers, stay quantkernels'), on CPU tensors."""
    spec = importlib.util.spec_from_file_location("_test_cuda_on_emulator",
                                                  pathlib.Path(__file__).with_name("test_cuda.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)

    class _Ops:
        def __getattr__(self, name):
            return getattr(emu if name in cuda_emu.OPS else torch.ops.quantkernels, name)

    mod.ops = _Ops()
    mod.DEV = "cpu"

    def kernel_names(fn):  # the profiler's kernel names, from the emulator's launch log
        cuda_emu.take_launch_log()
        fn()
        return " ".join(cuda_emu.take_launch_log())

    mod._kernel_names = kernel_names
    return mod


G = _grid_module()


def _emulated(fn, keep=None):
    """fn (a tests/test_cuda.py test) as a test here; outside FULL runs, keep(params) picks
    the cases of its shape parametrization (the mark whose names start with M)."""
    new = types.FunctionType(fn.__code__, fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)
    marks = []
    for m in getattr(fn, "pytestmark", []):
        if m.name == "parametrize" and keep is not None and not FULL and m.args[0].startswith("M"):
            values = [p for p in m.args[1] if keep(*(p.values if hasattr(p, "values") else p))]
            m = pytest.mark.parametrize(m.args[0], values, **m.kwargs).mark
        marks.append(m)
    new.pytestmark = marks
    new.__doc__ = fn.__doc__
    return new


# Every kernel variant the host code can select runs in the default subset:
#   quantize_rowwise_kernel (3 dtypes), outlier_columns_kernel; imma_gemm_kernel's three tile
#   configs (M <= 16 / <= 64 / > 64) for int8 (int32, fp16/bf16/fp32 out) and W4A8 (signed,
#   unsigned), simt_gemm_kernel and simt_w4a8_kernel (K % 16 / G % 32 != 0, misaligned);
#   weight_only_gemv_kernel (int4 / int8, 16-byte and scalar paths, fp32/fp16/bf16),
#   weight_only_mma_kernel's three tiles (BM 16 / 32 / 64) for fp16 / bf16, int4 (signed,
#   unsigned) / int8, with and without split-K + splitk_reduce_kernel; llm_int8_correct_kernel;
#   gemm_4bit (NF4 / FP4): the same GEMV and tensor-core tiles with the code-table decode, blocks
#   that span rows, double quantization (absmax_dq_kernel), split-K.
test_quantize_rowwise_exact = _emulated(G.test_quantize_rowwise_exact, lambda M, K, dt: M in (3, 17) and K in (7, 256))
test_quantize_rowwise_nonfinite_and_ties = _emulated(G.test_quantize_rowwise_nonfinite_and_ties)
test_quantize_rowwise_3d_noncontiguous = _emulated(G.test_quantize_rowwise_3d_noncontiguous)
test_quantize_outliers_exact = _emulated(G.test_quantize_outliers_exact, lambda M, K, dt: M < 130)
test_int8_gemm_exact = _emulated(G.test_int8_gemm_exact, lambda M, N, K: M in (3, 17, 67, 130) and K <= 100)
test_int8_gemm_empty = _emulated(G.test_int8_gemm_empty)
test_w8a8_gemm = _emulated(G.test_w8a8_gemm, lambda M, N, K, out, bias: N != 200 and (M, out) in {
    (1, None), (17, torch.float16), (130, torch.bfloat16), (17, torch.float32), (1, torch.bfloat16)})
test_w4a8_gemm = _emulated(G.test_w4a8_gemm, lambda M, N, K, Gs, asym: N != 200 and M in (1, 17, 67, 130)
                           and (M, N) not in {(130, 37), (67, 64)})
test_w8a16_gemm = _emulated(G.test_w8a16_gemm, lambda M, N, K, dt: N != 200 and M in (1, 3))
test_w4a16_gemm = _emulated(G.test_w4a16_gemm, lambda M, N, K, dt: N != 200 and M in (1, 3))
test_w4a16_tensor_core = _emulated(G.test_w4a16_tensor_core, lambda M, N, K, Gs, dt, asym: (
    (M, N, K, Gs) in {(9, 37, 256, 32), (17, 70, 96, 96), (33, 130, 1056, 32), (67, 37, 256, 128),
                      (16, 130, 1056, 1056)}))
test_w8a16_tensor_core = _emulated(G.test_w8a16_tensor_core, lambda M, N, K, dt: (M, N) in {
    (9, 37), (33, 70), (67, 130)})
test_w4a16_tensor_core_dequant_is_bitexact = _emulated(G.test_w4a16_tensor_core_dequant_is_bitexact)
test_weight_only_misaligned_fallback = _emulated(G.test_weight_only_misaligned_fallback)
test_llm_int8_linear = _emulated(G.test_llm_int8_linear, lambda M, N, K, dt, tau: N != 200 and M in (3, 17))
test_llm_int8_many_outliers = _emulated(G.test_llm_int8_many_outliers)
if FULL:  # long single cases: the K = 131056 extremes, the path selection at K = 4096
    test_int8_gemm_extremes_and_fallback = _emulated(G.test_int8_gemm_extremes_and_fallback)
    test_weight_only_path_selection = _emulated(G.test_weight_only_path_selection)
test_weight_only_gemv_threshold_env = _emulated(G.test_weight_only_gemv_threshold_env)
test_gemm_4bit_gemv = _emulated(G.test_gemm_4bit_gemv, lambda M, N, K, bs, dt, qt, dq: (
    (M, N, dt, qt, dq) in {(1, 37, torch.float16, "nf4", False), (3, 37, torch.bfloat16, "fp4", True),
                           (1, 64, torch.float32, "nf4", True), (3, 64, torch.float16, "fp4", False),
                           (8, 64, torch.bfloat16, "nf4", False), (1, 130, torch.float32, "fp4", True),
                           (3, 130, torch.bfloat16, "nf4", False)}))
test_gemm_4bit_tensor_core = _emulated(G.test_gemm_4bit_tensor_core, lambda M, N, K, bs, dt, qt, dq: (
    (M, N, dt, qt, dq) in {(9, 37, torch.float16, "nf4", False), (17, 70, torch.bfloat16, "fp4", True),
                           (33, 70, torch.float16, "nf4", True), (16, 130, torch.bfloat16, "fp4", False),
                           (67, 37, torch.bfloat16, "nf4", True), (9, 64, torch.float16, "fp4", True),
                           (130, 64, torch.float16, "nf4", False)}))
test_gemm_4bit_fp32_large_m = _emulated(G.test_gemm_4bit_fp32_large_m)
test_gemm_4bit_dequant_is_bitexact = _emulated(G.test_gemm_4bit_dequant_is_bitexact)
test_gemm_4bit_nonfinite_block_propagates = _emulated(G.test_gemm_4bit_nonfinite_block_propagates)
test_gemm_4bit_empty_noncontiguous_and_errors = _emulated(G.test_gemm_4bit_empty_noncontiguous_and_errors)
if FULL:
    test_gemm_4bit_path_selection = _emulated(G.test_gemm_4bit_path_selection)


def test_every_cuda_op_runs_on_the_emulator():
    assert set(cuda_emu.OPS) == set(G.CUDA_OPS)


def test_split_k_selected_by_sm_count():
    """The weight-only host code sizes split-K from the device's SM count: a bigger emulated GPU
    splits a decode-shaped K more ways (the reduce kernel then runs), a 1-SM one not at all."""
    x = G.rand_rows(16, 2048, torch.float16)
    packed, sb, zero = G._w4_weight(256, 2048, 128, True)  # 4 CTAs of 64 channels
    runs = {}
    for sms in (1, 132):
        with cuda_emu.device(90, sms):
            cuda_emu.take_launch_log()
            G._check_w4a16(x, packed, sb, zero, None, torch.float16, f"Y ({sms} SMs)")
            runs[sms] = " ".join(cuda_emu.take_launch_log())
    assert "weight_only_mma_kernel" in runs[1] and "splitk_reduce_kernel" not in runs[1], runs[1]
    assert "splitk_reduce_kernel" in runs[132], runs[132]


def test_zero_point_out_of_range_rejected():
    """issue 15's case on the CUDA kernel's own bindings."""
    a = torch.ones(5, 64, dtype=torch.int8)
    p, s = torch.zeros(64, 32, dtype=torch.uint8), torch.ones(64, 2)
    with pytest.raises(ValueError, match=r"w4a8_gemm: zero_b must hold int4 zero points in \[0, 15\], got 200"):
        emu.w4a8_gemm(a, p, torch.ones(5), s, torch.full((64, 2), 200, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"group_size = 1118482 exceeds 1118481"):
        emu.w4a8_gemm(torch.zeros(1, 1118482, dtype=torch.int8), torch.zeros(1, 559241, dtype=torch.uint8),
                      torch.ones(1), torch.ones(1, 1))


def test_every_kernel_template_launches():
    """Small calls reach every __global__ function of csrc/cuda/*.cu and each tile config of the
    two tensor-core GEMMs (the emulator's launch log has the instantiated names)."""
    kernels = set()
    for p in (cuda_emu.CSRC / "cuda").glob("*.cu"):
        kernels.update(launch_bounds_problems(p.read_text(), p.name)[0])
    assert len(kernels) == 10, kernels
    cuda_emu.take_launch_log()
    x = torch.randn(70, 96)
    x[0, 3] = 50.0
    emu.quantize_int8_rowwise(x.half())
    emu.llm_int8_linear(x, G.randint8((40, 96)), torch.ones(40), None, 6.0)  # outliers, quantize, gemm, correction
    for M in (3, 40, 70):
        emu.int8_gemm(G.randint8((M, 64)), G.randint8((40, 64)))
        emu.w4a8_gemm(G.randint8((M, 64)), torch.zeros(40, 32, dtype=torch.uint8), torch.ones(M), torch.ones(40, 2))
    emu.int8_gemm(G.randint8((3, 7)), G.randint8((5, 7)))
    emu.w4a8_gemm(G.randint8((3, 70)), torch.zeros(5, 35, dtype=torch.uint8), torch.ones(3), torch.ones(5, 1))
    emu.w8a16_gemm(torch.randn(1, 64), G.randint8((40, 64)), torch.ones(40))
    for M in (9, 17, 33):
        emu.w4a16_gemm(torch.randn(M, 1024).half(), torch.zeros(40, 512, dtype=torch.uint8), torch.ones(40, 8))
    q4, a4 = torch.randint(0, 256, (40, 512), dtype=torch.uint8), torch.rand(640) + 0.5
    for M in (1, 9, 17, 33):
        emu.gemm_4bit(torch.randn(M, 1024).bfloat16(), q4, a4, "nf4", 64)
    emu.gemm_4bit(torch.randn(2, 1024), q4, torch.randint(0, 256, (640,), dtype=torch.uint8), "fp4", 64,
                  torch.rand(3) + 0.5, torch.tensor(0.25))
    log = "\n".join(cuda_emu.take_launch_log())
    for k in kernels:
        assert f"::{k}<" in log or f"::{k}(" in log, (k, log)
    for tile in ("imma_gemm_kernel<16, 64, 1, 4, 4, false", "imma_gemm_kernel<64, 128, 2, 2, 4, false",
                 "imma_gemm_kernel<128, 128, 2, 4, 4, false", "imma_gemm_kernel<16, 64, 1, 4, 4, true",
                 "imma_gemm_kernel<64, 64, 2, 2, 4, true", "imma_gemm_kernel<128, 128, 2, 4, 4, true",
                 "weight_only_mma_kernel<__half, true, 16, 2, 6, false>",
                 "weight_only_mma_kernel<__half, true, 32, 2, 5, false>",
                 "weight_only_mma_kernel<__half, true, 64, 4, 4, false>",
                 "weight_only_mma_kernel<__nv_bfloat16, true, 16, 2, 6, true>",
                 "weight_only_mma_kernel<__nv_bfloat16, true, 32, 2, 5, true>",
                 "weight_only_mma_kernel<__nv_bfloat16, true, 64, 4, 4, true>",
                 "weight_only_gemv_kernel<__nv_bfloat16, true, true>", "weight_only_gemv_kernel<float, true, true>"):
        assert tile in log, (tile, log)
