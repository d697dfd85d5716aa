"""Registers quantkernels' transformers quantizer (``quantkernels.hf``) without importing
transformers when quantkernels is imported (that would add ~0.8 s to ``import quantkernels``).

``install()`` (called by ``quantkernels/__init__.py``) registers at once when
``transformers.quantizers.auto`` (the module holding transformers' quantizer registry) is already
imported; otherwise the finder of the top-level module ``_quantkernels_hf_autoload`` (on
``sys.meta_path``) registers right after that module is executed, which happens before any
``from_pretrained`` can run (``transformers.modeling_utils`` imports it). Installing twice (a reload
of quantkernels) keeps a single finder. The same finder, started by the ``quantkernels-hf.pth`` file
an install puts in site-packages, imports quantkernels when transformers' registry is first imported,
so ``from_pretrained`` of a saved directory works without ``import quantkernels``.
"""

from __future__ import annotations

import sys
import warnings

import _quantkernels_hf_autoload as _autoload

TARGET = _autoload.TARGET
_MARK = _autoload._MARK


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


def install() -> None:
    _autoload.on_target_import("quantkernels._hf_hook", _register)
