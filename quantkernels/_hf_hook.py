"""Registers quantkernels' transformers quantizer (``quantkernels.hf``) without importing
transformers when quantkernels is imported (that would add ~0.8 s to ``import quantkernels``).

``install()`` (called by ``quantkernels/__init__.py``) registers at once when
``transformers.quantizers.auto`` (the module holding transformers' quantizer registry) is already
imported; otherwise it puts a finder on ``sys.meta_path`` that registers right after that module
is executed, which happens before any ``from_pretrained`` can run (``transformers.modeling_utils``
imports it). Installing twice (a reload of quantkernels) keeps a single finder.
"""

from __future__ import annotations

import importlib.abc
import sys
import warnings

TARGET = "transformers.quantizers.auto"
_MARK = "_quantkernels_hf_hook"


def _register() -> None:
    if not _supported():
        return  # transformers 4.x: no quantize-on-load API to plug into; quantkernels.hf says so when used
    mod = sys.modules.get(__package__ + ".hf")
    if mod is not None and not hasattr(mod, "register"):
        return  # quantkernels.hf is being imported (it imported transformers): it registers when it is done
    try:
        from . import hf

        hf.register()
    except Exception as e:  # never break `import transformers`; say why from_pretrained will not know us
        warnings.warn(f"quantkernels: could not register the transformers quantizer "
                      f"({type(e).__name__}: {e}); from_pretrained(quantization_config=QuantKernelsConfig(...)) "
                      f"and loading quantkernels checkpoints with from_pretrained will not work", RuntimeWarning)


#: the oldest transformers whose loader has the quantize-on-load API (core_model_loading.ConversionOps)
MIN_TRANSFORMERS = (5, 0)


def _supported() -> bool:
    version = getattr(sys.modules.get("transformers"), "__version__", "0")
    try:
        return tuple(int(x) for x in version.split(".")[:2]) >= MIN_TRANSFORMERS
    except ValueError:
        return True  # a development version: try, and warn if it fails


class _Loader(importlib.abc.Loader):
    def __init__(self, loader):
        self._loader = loader

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        _register()


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):
        if fullname != TARGET:
            return None
        for finder in sys.meta_path:
            if getattr(finder, _MARK, False) or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _Loader(spec.loader)
                return spec
        return None


setattr(_Finder, _MARK, True)


def install() -> None:
    if TARGET in sys.modules:
        _register()
        return
    if not any(getattr(f, _MARK, False) for f in sys.meta_path):
        sys.meta_path.insert(0, _Finder())
