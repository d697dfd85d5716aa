"""Shared plumbing for the Triton kernels: interpreter mode, autotune config lists,
shared-memory pruning, the M bucket, and launching through ``torch.library.wrap_triton``.

Interpreter vs GPU. ``@triton.jit`` decides at decoration time (``triton.knobs.runtime.interpret``,
i.e. ``TRITON_INTERPRET=1`` when triton is first imported) whether a kernel is compiled or
interpreted, and the interpreter and the compiler cannot share one process (the interpreter
patches ``triton.language``). The kernel modules are therefore imported lazily, on the first
call of a ``*_triton`` op, and every kernel is built in whichever mode the process is in. In
the interpreter each autotuned kernel keeps exactly one config (no benchmarking on CPU), so
tests stay fast; ``QUANTKERNELS_TRITON_AUTOTUNE=0`` does the same on a GPU.
"""

from __future__ import annotations

import functools
import os
from typing import Dict, List, Sequence

import torch
import triton
import triton.language as tl
from triton.runtime.autotuner import Autotuner
from triton.runtime.jit import JITFunction


def interpreting() -> bool:
    """True if this process runs Triton kernels in the interpreter (CPU tensors)."""
    knobs = getattr(triton, "knobs", None)
    if knobs is not None:
        return bool(knobs.runtime.interpret)
    return os.environ.get("TRITON_INTERPRET", "0") == "1"  # triton < 3.4


def autotune_enabled() -> bool:
    return not interpreting() and os.environ.get("QUANTKERNELS_TRITON_AUTOTUNE", "1") != "0"


def config(num_warps: int = 4, num_stages: int = 3, **meta) -> triton.Config:
    return triton.Config(dict(meta), num_warps=num_warps, num_stages=num_stages)


def autotune(configs: Sequence[triton.Config], key: Sequence[str], prune=None):
    """``triton.autotune`` over ``configs``; only ``configs[0]`` (the default, which must be
    valid for every shape) in the interpreter or with ``QUANTKERNELS_TRITON_AUTOTUNE=0``."""
    configs = list(configs) if autotune_enabled() else [configs[0]]
    kw = {"prune_configs_by": {"early_config_prune": prune}} if prune is not None and len(configs) > 1 else {}

    def deco(fn):
        return triton.autotune(configs=configs, key=list(key), **kw)(fn)

    return deco


def single(num_warps: int = 4):
    """A kernel launched with one fixed config (its block sizes are call arguments). Wrapped
    in a one-config Autotuner in the interpreter, since ``wrap_triton`` only accepts
    ``JITFunction``/``Autotuner`` objects."""

    def deco(fn):
        if isinstance(fn, JITFunction):
            return fn
        return triton.autotune(configs=[triton.Config({}, num_warps=num_warps)], key=[])(fn)

    return deco


def launch(kernel, grid, *args, **kwargs):
    """Launch ``kernel`` so that ``torch.compile`` / ``make_fx`` see it (``wrap_triton``)."""
    if interpreting():
        kwargs.pop("num_warps", None)
        kwargs.pop("num_stages", None)
        from torch._subclasses.fake_tensor import is_fake
        if any(isinstance(a, torch.Tensor) and is_fake(a) for a in args):
            return None  # tracing (fake tensors): the interpreter would touch data; outputs are allocated
    if isinstance(kernel, (JITFunction, Autotuner)):
        kernel = torch.library.wrap_triton(kernel)
    return kernel[grid](*args, **kwargs)


def m_bucket(M: int, cap: int = 256) -> int:
    """Autotune key for M: the next power of two, capped (one tuning per bucket, not per M)."""
    return min(triton.next_power_of_2(max(int(M), 1)), cap)


@functools.lru_cache(maxsize=None)
def _smem_limit(device_index: int) -> int:
    try:
        props = torch.cuda.get_device_properties(device_index)
        optin = getattr(props, "shared_memory_per_block_optin", 0)
        if optin:
            return int(optin)
        major = props.major
    except Exception:
        return 160 * 1024
    return {8: 163 * 1024, 9: 227 * 1024}.get(major, 99 * 1024)


def smem_bytes(cfg: triton.Config, a_bytes: float, b_bytes: float) -> float:
    """Pipelined shared memory of a [BLOCK_M, BLOCK_K] x [BLOCK_K, BLOCK_N] main loop."""
    kw = cfg.kwargs
    return cfg.num_stages * kw["BLOCK_K"] * (kw["BLOCK_M"] * a_bytes + kw["BLOCK_N"] * b_bytes)


def prune_by_smem_and_m(a_bytes: float, b_bytes: float, extra=None):
    """Early-prune function: drops configs whose pipelined tiles exceed the device's shared
    memory, and (by the M bucket) configs whose BLOCK_M is far larger than M; ``extra``
    (cfg, named_args) -> bool may reject more. Never returns an empty list."""

    def prune(configs: List[triton.Config], named_args: Dict, **kwargs) -> List[triton.Config]:
        dev = next((v.device for v in named_args.values() if isinstance(v, torch.Tensor)), None)
        limit = _smem_limit(dev.index or 0) if dev is not None and dev.type == "cuda" else 160 * 1024
        mb = named_args.get("M_BUCKET", kwargs.get("M_BUCKET", 256))
        keep = [c for c in configs
                if smem_bytes(c, a_bytes, b_bytes) <= limit
                and c.kwargs["BLOCK_M"] <= max(16, 2 * mb)
                and (extra is None or extra(c, named_args))]
        if not keep:
            keep = [min(configs, key=lambda c: smem_bytes(c, a_bytes, b_bytes))]
        return keep

    return prune


def dot_in_fp32(dtype: torch.dtype) -> bool:
    """Whether a float ``tl.dot`` on ``dtype`` operands runs as an fp32 IEEE dot: always for
    fp32; for bf16 only in the interpreter, whose numpy dot cannot multiply bf16 (it holds
    them as raw 16-bit integers). Same result: bf16 products are exact in fp32."""
    return dtype == torch.float32 or (dtype == torch.bfloat16 and interpreting())


def check_device(op: str, *tensors: torch.Tensor) -> None:
    """Triton kernels run CUDA tensors, or CPU tensors in the interpreter."""
    dev = tensors[0].device
    if dev.type == "meta":
        return
    ok = dev.type == "cuda" or (dev.type == "cpu" and interpreting())
    if not ok:
        raise ValueError(f"quantkernels.{op}_triton: Triton kernels run CUDA tensors (CPU tensors only "
                         f"when triton runs in the interpreter, TRITON_INTERPRET=1), got a tensor on {dev}")


@triton.jit
def cast(x, dtype: tl.constexpr, INTERP: tl.constexpr):
    """``x.to(dtype)``, except fp32 -> bf16 in the interpreter, which truncates where the GPU
    (``cvt.rn.bf16.f32``) and torch round half to even: there the rounding is done on the
    bits (finite values; NaN stays NaN)."""
    if INTERP and dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        rounded = tl.where(x != x, 0x7FC0, rounded)
        return rounded.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(dtype)
