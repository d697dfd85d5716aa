"""Makes transformers know quantkernels checkpoints without ``import quantkernels``.

transformers loads a checkpoint whose ``config.json`` names an unknown ``quant_method`` with a
warning only ("Unknown quantization type ... skip the quantization"): the quantized layers would get
random float weights. So a wheel or editable install of quantkernels puts ``quantkernels-hf.pth`` in
site-packages; Python runs it at start-up, it imports this module (2-3 ms by ``python -X importtime``: no torch,
no transformers, no quantkernels) and ``install()`` puts a finder on ``sys.meta_path``. Only when
``transformers.quantizers.auto`` (transformers' quantizer registry, imported before any
``from_pretrained`` can run) is executed does the finder import quantkernels, which registers its
quantizer with that registry (``quantkernels._hf_hook``). ``import quantkernels`` uses the same finder.

``QUANTKERNELS_NO_AUTOLOAD=1`` turns the start-up part off (then ``import quantkernels`` before
``from_pretrained``, as without the .pth file).
"""

import os
import sys

# Neither importlib.abc nor __future__: both would add milliseconds to every interpreter start.

TARGET = "transformers.quantizers.auto"
_MARK = "_quantkernels_hf_hook"
_callbacks = {}  # name -> callback (a reloaded module replaces its own)


def _after_target() -> None:
    for cb in list(_callbacks.values()):
        cb()


class _Loader:  # the importlib Loader protocol
    def __init__(self, loader):
        self._loader = loader

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        _after_target()


class _Finder:  # the importlib MetaPathFinder protocol
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


def on_target_import(name: str, callback) -> bool:
    """Calls ``callback()`` right after ``transformers.quantizers.auto`` is executed (at once, and
    returns True, if it already is). One finder on sys.meta_path however often this is called."""
    _callbacks[name] = callback
    if TARGET in sys.modules:
        callback()
        return True
    if not any(getattr(f, _MARK, False) for f in sys.meta_path):
        sys.meta_path.insert(0, _Finder())
    return False


def _import_quantkernels() -> None:
    try:
        # TARGET is executed now, so a first import registers at once (quantkernels._hf_hook.install).
        # If quantkernels is already (or partly) imported, its hook's _register is called here as
        # well: registering twice is harmless, and a partly imported one registers when it is done.
        import quantkernels  # noqa: F401

        hook = sys.modules.get("quantkernels._hf_hook")
        if hook is not None and hasattr(hook, "_register"):
            hook._register()
    except Exception as e:  # never break `import transformers`; say why from_pretrained will not know us
        _warn(e)


def _warn(e: BaseException) -> None:
    import warnings

    warnings.warn(f"quantkernels: importing quantkernels to register its transformers quantizer failed "
                  f"({type(e).__name__}: {e}); quantkernels checkpoints will not load with from_pretrained",
                  RuntimeWarning)


def install() -> None:
    """Called by quantkernels-hf.pth at interpreter start-up."""
    if os.environ.get("QUANTKERNELS_NO_AUTOLOAD", "").strip().lower() in ("1", "true", "yes", "on"):
        return
    on_target_import("quantkernels-hf.pth", _import_quantkernels)
