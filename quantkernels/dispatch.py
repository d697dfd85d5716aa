"""Picks the kernel behind each op call: which backend, for which device.

Backends:
- ``"reference"``: the pure-PyTorch functions of ``reference.py``, called directly (any device).
- ``"cpu"`` / ``"cuda"``: the native C++/CUDA kernels registered for that dispatch key in
  ``quantkernels._C``; the op is called through ``torch.ops.quantkernels``.
- ``"triton"``: the Triton op ``quantkernels::<op>_triton`` (CUDA tensors; CPU tensors only
  under ``TRITON_INTERPRET=1``).
- ``"auto"``: per op, the fastest backend that can serve the device: CUDA kernel, else Triton
  (CUDA tensors), else the op through the dispatcher (native CPU kernel where one is
  registered, else the reference). ``QUANTKERNELS_BACKEND`` in the environment overrides ``auto``;
  an invalid value does not break the import: it warns there, and every ``auto`` call raises.

The tables below are plain Python sets filled once at import (``refresh()``), so that
resolving a kernel inside ``forward`` is traceable by ``torch.compile(fullgraph=True)``.
"""

from __future__ import annotations

import os
import warnings
from typing import Callable, Dict, Optional, Set, Tuple

import torch

from . import reference as _reference
from ._ops import OP_NAMES

BACKENDS = ("auto", "reference", "cpu", "triton", "cuda")

#: The ops each QuantLinear scheme calls, in order.
SCHEME_OPS: Dict[str, Tuple[str, ...]] = {
    "w8a8": ("quantize_int8_rowwise", "w8a8_gemm"),
    "llm_int8": ("llm_int8_linear",),
    "w8a16": ("w8a16_gemm",),
    "w4a16": ("w4a16_gemm",),
    "w4a8": ("quantize_int8_rowwise", "w4a8_gemm"),
    "nf4": ("gemm_4bit",),
    "fp4": ("gemm_4bit",),
}

_NATIVE: Dict[str, Set[str]] = {"CPU": set(), "CUDA": set()}
_TRITON: Set[str] = set()
_NATIVE_REASON: str | None = "quantkernels._C was not loaded"  # None once it is
_ENV_BACKEND = None
#: Bumped by every ``refresh()``: callers that cache what ``resolve`` returned key their cache on it.
GENERATION = 0


class BackendUnavailable(RuntimeError):
    """The requested backend cannot serve this call; the message says why."""


def refresh(native_reason: str | None = None) -> None:
    """Re-reads which native and Triton kernels are registered (called at import).

    ``native_reason``: why ``quantkernels._C`` is missing, or None when it loaded."""
    global _NATIVE_REASON, _ENV_BACKEND, GENERATION
    GENERATION += 1
    for key in _NATIVE:
        _NATIVE[key] = {
            op for op in OP_NAMES
            if torch._C._dispatch_has_kernel_for_dispatch_key(f"quantkernels::{op}", key)
        }
    _TRITON.clear()
    _TRITON.update(op for op in OP_NAMES if _has_schema(f"quantkernels::{op}_triton"))
    _NATIVE_REASON = native_reason
    env = os.environ.get("QUANTKERNELS_BACKEND", "").strip()
    _ENV_BACKEND = env or None
    if env and env not in BACKENDS:  # import must not fail: warn now, raise where "auto" is used
        warnings.warn(env_backend_error(), RuntimeWarning, stacklevel=2)


def env_backend_error() -> Optional[str]:
    """Why ``QUANTKERNELS_BACKEND`` (as read at import) cannot serve ``backend="auto"``, or None."""
    if _ENV_BACKEND is None or _ENV_BACKEND in BACKENDS:
        return None
    return (f"quantkernels: QUANTKERNELS_BACKEND must be one of {BACKENDS} (or unset), got {_ENV_BACKEND!r}; "
            f"backend='auto' refuses to run until it is fixed (unset it, or pass backend= explicitly)")


def _has_schema(qualname: str) -> bool:
    try:
        torch._C._dispatch_find_schema_or_throw(qualname, "")
        return True
    except RuntimeError:
        return False


def check_backend(backend: str, what: str = "backend") -> str:
    if backend not in BACKENDS:
        raise ValueError(f"quantkernels: {what} must be one of {BACKENDS}, got {backend!r}")
    return backend


def native_kernels(key: str = "CPU") -> Set[str]:
    """Names of the ops with a native kernel for dispatch key ``key`` ("CPU" or "CUDA")."""
    return set(_NATIVE[key])


def can_implement(backend: str, op: str, device: torch.device) -> Tuple[bool, str]:
    """Whether ``backend`` can run ``op`` on tensors on ``device``, and if not, why."""
    check_backend(backend)
    dev = device.type
    if backend in ("auto", "reference"):
        return True, ""
    if backend in ("cpu", "cuda"):
        if dev != backend:
            return False, f"backend {backend!r} runs {backend.upper()} tensors, but the input is on {device}"
        key = backend.upper()
        if _NATIVE_REASON is not None:
            return False, f"the native extension is not available ({_NATIVE_REASON})"
        if op not in _NATIVE[key]:
            have = ", ".join(sorted(_NATIVE[key])) or "none"
            return False, (f"quantkernels._C has no {key} kernel for quantkernels::{op} "
                           f"(native {key} kernels in this build: {have})")
        return True, ""
    # triton
    interp = os.environ.get("TRITON_INTERPRET") == "1"
    if dev != "cuda" and not (dev == "cpu" and interp):
        return False, f"backend 'triton' runs CUDA tensors (CPU only under TRITON_INTERPRET=1), got {device}"
    if op not in _TRITON:
        return False, f"no Triton kernel is registered for quantkernels::{op} (op quantkernels::{op}_triton)"
    return True, ""


def resolve(backend: str, op: str, device: torch.device) -> Callable:
    """The callable that runs ``op`` for ``backend`` on ``device``; raises BackendUnavailable."""
    if backend == "auto" and _ENV_BACKEND is not None:
        if _ENV_BACKEND not in BACKENDS:
            raise ValueError(env_backend_error())
        backend = _ENV_BACKEND
    if backend == "reference":
        return getattr(_reference, op)
    if backend == "auto":
        if device.type == "cuda" and op not in _NATIVE["CUDA"] and op in _TRITON:
            return getattr(torch.ops.quantkernels, f"{op}_triton").default
        return getattr(torch.ops.quantkernels, op).default
    ok, why = can_implement(backend, op, device)
    if not ok:
        raise BackendUnavailable(f"quantkernels: cannot run {op} with backend={backend!r}: {why}")
    if backend == "triton":
        return getattr(torch.ops.quantkernels, f"{op}_triton").default
    return getattr(torch.ops.quantkernels, op).default


def kernel_table() -> Dict[str, Dict[str, bool]]:
    """{op: {"cpu": bool, "cuda": bool, "triton": bool}} -- what this build can run natively."""
    return {op: {"cpu": op in _NATIVE["CPU"], "cuda": op in _NATIVE["CUDA"], "triton": op in _TRITON}
            for op in OP_NAMES}
