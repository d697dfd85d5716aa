"""The CUDA emulator (issue 15): the real ``csrc/cuda/*.cu`` kernels, run on the CPU.

The kernel sources and ``csrc/cuda_bindings.cpp`` are compiled as host C++ against
``csrc/cuda_emu/`` (``QK_CUDA_EMU``): every thread of a block is a fiber, warp collectives
(``mma.sync``, ``ldmatrix``, ``__shfl_xor_sync``, ``__ballot_sync``) and ``__syncthreads``
complete when every participant has arrived, ``cp.async`` copies land only when waited for, and
each memory access of the kernels is checked (shared-memory races between warps, reads of bytes
whose ``cp.async`` is pending, out-of-bounds and misaligned accesses), and so is each launch's
block against the kernel's ``__launch_bounds__`` (which each kernel states again as its first
statement, ``QK_LAUNCH_BOUNDS``). The ops are registered
as ``torch.ops.quantkernels_cuda_emu.<op>`` on CPU tensors, with the CUDA ops' schemas, so they
compare directly with ``quantkernels.reference``. A hazard or launch error raises RuntimeError
naming the kernel, block, warp, lane and address.

Built on first use with ``torch.utils.cpp_extension`` (g++ and ninja; cached in
``build/cuda_emu/``) from the source tree: the emulator is a test tool, not part of the wheel.
What it proves and what only a GPU can: README.md, "CUDA kernels without a GPU".
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import pathlib
from typing import Iterator

import torch

from ._ops import SCHEMAS

NAMESPACE = "quantkernels_cuda_emu"
ROOT = pathlib.Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc"
EMU = CSRC / "cuda_emu"

#: The CUDA ops (csrc/cuda_bindings.cpp registers these for CUDA, and for the emulator).
OPS = ("quantize_int8_rowwise", "quantize_int8_rowwise_outliers", "int8_gemm", "w8a8_gemm", "w4a8_gemm",
       "w8a16_gemm", "w4a16_gemm", "llm_int8_linear", "gemm_4bit")

#: Probe ops (csrc/cuda_emu/probes.cpp): one primitive or one deliberate hazard per launch.
PROBES = {
    "probe_mma": "(Tensor inp, int kind) -> Tensor",
    "probe_ldmatrix": "(Tensor tile, Tensor rows) -> Tensor",
    "probe_warp": "(Tensor v, int lane_mask) -> Tensor",
    "probe_cp_async": "(Tensor src, int zfill, int mode) -> Tensor",
    "probe_hazard": "(Tensor g, int kind, int threads=64, int grid_y=1, int smem=2048, bool optin=False) -> Tensor",
    "probe_convert": "(Tensor x) -> Tensor",
    "probe_bytes": "(Tensor u, Tensor v, Tensor s) -> Tensor",
    "probe_rn": "(Tensor a, Tensor b, Tensor c) -> Tensor",
    "probe_bounds": "(int bx, int by, int kind) -> Tensor",
}

_state: dict = {}


def _build_dir(name: str) -> pathlib.Path:
    d = pathlib.Path(os.environ.get("QUANTKERNELS_CUDA_EMU_BUILD", ROOT / "build" / "cuda_emu")) / name
    d.mkdir(parents=True, exist_ok=True)
    return d


def load(verbose: bool = False):
    """Builds (if needed) and loads the emulator; returns ``torch.ops.quantkernels_cuda_emu``."""
    if "ops" in _state:
        return _state["ops"]
    if not (EMU / "runtime.cpp").exists():
        raise RuntimeError(f"quantkernels.cuda_emu: {EMU} not found; the CUDA emulator builds from a source checkout")
    from torch.utils import cpp_extension

    # -ffp-contract=off: __fmul_rn / __fadd_rn must not fuse into FMAs (the CUDA semantics).
    common = ["-O2", "-ffp-contract=off", "-fno-strict-aliasing", "-DQK_CUDA_EMU", f"-I{EMU / 'include'}",
              f"-I{CSRC}", "-Wno-unknown-pragmas"]
    rt_dir = _build_dir("runtime")
    cpp_extension.load("qk_cuda_emu_runtime", [str(EMU / "runtime.cpp")], extra_cflags=common,
                       build_directory=str(rt_dir), is_python_module=False, verbose=verbose)
    rt_path = rt_dir / "qk_cuda_emu_runtime.so"
    # The kernels (and the bindings' host code) with every load and store instrumented: the
    # runtime above implements the hooks (no sanitizer runtime is linked).
    lib = torch.library.Library(NAMESPACE, "DEF")
    for name in OPS:
        lib.define(name + SCHEMAS[name])
    for name, schema in PROBES.items():
        lib.define(name + schema)
    kernels = sorted(str(p) for p in EMU.glob("k_*.cpp")) + [
        str(EMU / "bindings.cpp"), str(EMU / "probes.cpp"), str(CSRC / "cpu" / "dtype_name.cpp")]
    cpp_extension.load("qk_cuda_emu_ops", kernels,
                       extra_cflags=common + ["-fsanitize=thread", "-fsanitize=alignment"],
                       extra_ldflags=[str(rt_path), f"-Wl,-rpath,{rt_dir}"],
                       build_directory=str(_build_dir("ops")), is_python_module=False, verbose=verbose)
    _state["lib"] = lib
    _state["rt"] = ctypes.CDLL(str(rt_path))
    _state["ops"] = getattr(torch.ops, NAMESPACE)
    configure(80, 108)
    return _state["ops"]


def track_allocations(on: bool):
    """The out-of-bounds check knows the CPU tensors allocated while tracking is on (a wrapper
    around torch's CPU allocator; off until turned on: some torch code asserts the plain
    allocator's pointers, so tests/test_cuda_emu.py turns it on for its own tests only); turn it off to give other code the plain
    allocator back. Tensors from elsewhere (numpy, from_blob) are unknown to it: clone them."""
    load()
    _state["rt"].qk_emu_track_allocations(1 if on else 0)


def configure(arch: int = 80, sm_count: int = 108):
    """The emulated device: ``arch`` 80 (A100: 163 KB shared memory per block, 108 SMs) or 90
    (H100: 227 KB); ``sm_count`` drives the weight-only split-K choice."""
    load()
    if _state["rt"].qk_emu_configure(int(arch), int(sm_count)) != 0:
        raise ValueError(f"quantkernels.cuda_emu.configure: arch must be 80 or 90 and sm_count in [1, 1024], "
                         f"got arch={arch}, sm_count={sm_count}")
    _state["device"] = (int(arch), int(sm_count))


def take_launch_log() -> list:
    """Names of the kernels launched since the last call (demangled, with template arguments),
    in launch order; clears the log."""
    load()
    rt = _state["rt"]
    n = rt.qk_emu_log_size()
    buf = (ctypes.c_uint64 * max(n, 1))()
    n = rt.qk_emu_take_log(buf, n)
    names = _symbols()
    return [names.get(buf[i], f"<kernel at +0x{buf[i]:x}>") for i in range(n)]


def _symbols() -> dict:
    """Offset in the emulator library -> demangled function name (its full symbol table: the
    kernels live in anonymous namespaces, outside the dynamic symbol table)."""
    if "symbols" not in _state:
        import subprocess

        so = _build_dir("ops") / "qk_cuda_emu_ops.so"
        out = subprocess.run(["nm", "--defined-only", "-C", str(so)], capture_output=True, text=True, check=True).stdout
        table = {}
        for line in out.splitlines():
            parts = line.split(" ", 2)
            if len(parts) == 3 and parts[1] in ("t", "T"):
                table[int(parts[0], 16)] = parts[2]
        _state["symbols"] = table
    return _state["symbols"]


@contextlib.contextmanager
def device(arch: int = 80, sm_count: int = 108) -> Iterator[None]:
    """``with cuda_emu.device(90, 132):`` runs the block's calls on that emulated device."""
    load()
    old = _state["device"]
    configure(arch, sm_count)
    try:
        yield
    finally:
        configure(*old)
