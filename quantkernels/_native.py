"""The native extension ``quantkernels._C``: loading it, and asking which kernels it registered.

Importing ``quantkernels._C`` runs the static ``TORCH_LIBRARY_IMPL`` registrations of the
C++ kernels (CPU, and CUDA where built), which override the pure-PyTorch reference for
their device. Call :func:`load` after ``_ops`` has defined the schemas. It never raises:
if the extension is missing or broken, it warns once and every op keeps running the
reference.

Read the state as ``_native.AVAILABLE`` / ``_native.REASON`` (module attributes, set by
:func:`load`), not via ``from ._native import AVAILABLE``, which would copy the value
before loading.

A package directory without any compiled ``_C`` (e.g. ``python -m quantkernels`` run inside an
unbuilt source checkout, which shadows the installed build) gets a warning that names both
directories and the fix, instead of Python's misleading "circular import" ImportError.

CPU kernels pick their instruction set at every call from ``QUANTKERNELS_CPU_ISA``
(unset/``auto``: AVX2 if the CPU has AVX2+FMA; ``portable``; ``avx2``); see
:func:`cpu_isa`.
"""

from __future__ import annotations

import importlib.machinery
import importlib.metadata
import os
import sys
import warnings
from pathlib import Path
from typing import List, Optional, Tuple

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
        message = None
        try:
            message = _missing_build_message()
        except Exception:  # diagnostics must never break the import
            pass
        if message is not None:
            REASON, text = message
        else:
            text = (f"quantkernels: native extension quantkernels._C not available ({REASON}); "
                    "every op runs the pure-PyTorch reference "
                    "(build it with `pip install --no-build-isolation -e .`)")
        warnings.warn(text, RuntimeWarning, stacklevel=2)
    else:
        _module = _C
        AVAILABLE = True
        REASON = ""
    return AVAILABLE


_FIX = ("run from another directory (so that the installed build is imported), or build in place: "
        "`pip install --no-build-isolation -e .` or `python setup.py build_ext --inplace`")


def _built_extension(pkg_dir: Path) -> Optional[Path]:
    """The compiled ``_C`` module file in the package directory ``pkg_dir``, if there is one."""
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        f = pkg_dir / f"_C{suffix}"
        if f.is_file():
            return f
    return None


def installed_builds(exclude: Path) -> List[Path]:
    """Package directories of other ``quantkernels`` on this interpreter that hold a built ``_C``.

    Looks on every ``sys.path`` entry except ``exclude`` (the directory holding the imported
    package, e.g. a source checkout that is the current directory), in editable-install finders
    on ``sys.meta_path``, and in the files of the installed ``quantkernels`` distribution."""
    exclude = exclude.resolve()
    found: List[Path] = []

    def add(pkg_dir) -> None:
        if pkg_dir is None:
            return
        pkg_dir = Path(pkg_dir).resolve()
        if pkg_dir.parent != exclude and pkg_dir not in found and _built_extension(pkg_dir) is not None:
            found.append(pkg_dir)

    for entry in sys.path:
        try:
            if Path(entry or os.getcwd()).resolve() == exclude:
                continue
            spec = importlib.machinery.PathFinder.find_spec(NAMESPACE, [entry])
        except Exception:
            continue
        for loc in (spec.submodule_search_locations or []) if spec is not None else []:
            add(loc)
    for finder in sys.meta_path:  # setuptools' editable installs map the package with a finder
        if finder is importlib.machinery.PathFinder or not hasattr(finder, "find_spec"):
            continue
        try:
            spec = finder.find_spec(NAMESPACE, None)
        except Exception:
            continue
        for loc in (spec.submodule_search_locations or []) if spec is not None else []:
            add(loc)
    try:
        dist = importlib.metadata.distribution(NAMESPACE)
        for f in dist.files or []:
            if f.parent.name == NAMESPACE and f.name.startswith("_C."):
                add(Path(dist.locate_file(f)).parent)
    except Exception:
        pass
    return found


def _missing_build_message() -> Optional[Tuple[str, str]]:
    """(REASON, warning) when the imported package directory has no compiled ``_C`` at all: the
    import then fails with a misleading "partially initialized module ... circular import"
    error. None when a ``_C`` file is there (and failed to load for another reason)."""
    pkg_dir = Path(__file__).resolve().parent
    if _built_extension(pkg_dir) is not None:
        return None
    root = pkg_dir.parent
    source = (root / "setup.py").is_file() or (root / "pyproject.toml").is_file()
    what = "a source tree" if source else "a copy of the package"
    reason = f"the imported quantkernels at {pkg_dir} is {what} without a built extension (no _C module)"
    others = installed_builds(root)
    if others:
        where = " and ".join(str(p) for p in others)
        text = (f"quantkernels: native extension quantkernels._C not available: the imported quantkernels is "
                f"{what} at {pkg_dir} without a built extension, while an installed build exists at {where} "
                f"(Python imports the package from the current directory first). Every op runs the pure-PyTorch "
                f"reference, over 100x slower at M = 1. To fix: {_FIX}.")
        reason += f"; an installed build exists at {where}"
    else:
        text = (f"quantkernels: native extension quantkernels._C not available: the imported quantkernels is "
                f"{what} at {pkg_dir} without a built extension. Every op runs the pure-PyTorch reference, over "
                f"100x slower at M = 1. Build it in place: `pip install --no-build-isolation -e .` or "
                f"`python setup.py build_ext --inplace` (or `pip install --no-build-isolation .` and run from "
                f"another directory).")
    return reason, text


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
