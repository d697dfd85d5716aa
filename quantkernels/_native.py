"""The native extension ``quantkernels._C``: loading it, and asking which kernels it registered.

Importing ``quantkernels._C`` runs the static ``TORCH_LIBRARY_IMPL`` registrations of the
C++ kernels (CPU, and CUDA where built), which override the pure-PyTorch reference for
their device. Call :func:`load` after ``_ops`` has defined the schemas. It never raises:
if the extension is missing or broken, it warns once and every op keeps running the
reference.

Read the state as ``_native.AVAILABLE`` / ``_native.REASON`` (module attributes, set by
:func:`load`), not via ``from ._native import AVAILABLE``, which would copy the value
before loading.

CPU kernels pick their instruction set at every call from ``QUANTKERNELS_CPU_ISA``
(unset/``auto``: AVX2 if the CPU has AVX2+FMA; ``portable``; ``avx2``); see
:func:`cpu_isa`.
"""

from __future__ import annotations

import warnings
from typing import Optional

import torch

NAMESPACE = "quantkernels"

#: True once ``quantkernels._C`` imported successfully.
AVAILABLE: bool = False
#: Why the extension is unavailable ("" when it is available).
REASON: str = "quantkernels._native.load() has not been called"

_loaded = False
_module = None


def load() -> bool:
    """Imports ``quantkernels._C`` once; returns :data:`AVAILABLE`. Never raises."""
    global AVAILABLE, REASON, _loaded, _module
    if _loaded:
        return AVAILABLE
    _loaded = True
    try:
        from . import _C  # noqa: F401  (the import registers the C++ kernels)
    except Exception as e:  # ImportError, undefined symbols from a torch ABI mismatch, ...
        AVAILABLE = False
        REASON = f"{type(e).__name__}: {e}"
        warnings.warn(
            f"quantkernels: native extension quantkernels._C not available ({REASON}); "
            "every op runs the pure-PyTorch reference "
            "(build it with `pip install --no-build-isolation -e .`)",
            RuntimeWarning,
            stacklevel=2,
        )
    else:
        _module = _C
        AVAILABLE = True
        REASON = ""
    return AVAILABLE


def has_kernel(op_name: str, dispatch_key: str) -> bool:
    """True if ``quantkernels::<op_name>`` has a kernel registered directly for ``dispatch_key``
    (e.g. ``"CPU"``, ``"CUDA"``). The reference, registered under ``CompositeExplicitAutograd``,
    does not count for ``"CPU"``/``"CUDA"``. False for unknown ops or keys."""
    try:
        return bool(torch._C._dispatch_has_kernel_for_dispatch_key(f"{NAMESPACE}::{op_name}", dispatch_key))
    except Exception:
        return False


#: Every CPU ISA level the C++ kernels know, lowest first (values of ``QUANTKERNELS_CPU_ISA``).
ISA_LEVELS = ("portable", "avx2", "avx_vnni", "avx512", "avx512_vnni", "avx512_bf16")


def cpu_isa() -> Optional[str]:
    """The instruction-set level the next C++ CPU kernel call uses (one of :data:`ISA_LEVELS`),
    or None without the extension. Raises RuntimeError for a bad ``QUANTKERNELS_CPU_ISA``."""
    if not AVAILABLE or _module is None:
        return None
    return _module.cpu_isa()


def cpu_isa_levels() -> tuple:
    """The ISA levels this CPU and OS support (CPUID + XGETBV), lowest first; () without the extension."""
    if not AVAILABLE or _module is None:
        return ()
    return tuple(_module.cpu_isa_levels())


def cpu_kernel_variants() -> dict:
    """``{op name: the C++ kernel variant it runs}`` at the active ISA level ({} without the
    extension). Raises RuntimeError for a bad ``QUANTKERNELS_CPU_ISA``."""
    if not AVAILABLE or _module is None:
        return {}
    return dict(_module.cpu_kernel_variants())


def cpu_has_avx2() -> bool:
    """True if the extension is loaded and CPUID reports AVX2 and FMA."""
    return bool(AVAILABLE and _module is not None and _module.cpu_has_avx2())
