"""quantkernels: quantized int8/int4 GEMM kernels for LLM inference.

    import quantkernels as qk
    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=qk.QuantKernelsConfig("w8a8"))
    model = qk.quantize_model(model, "w8a8")      # a model in memory; or llm_int8, w8a16, w4a16, w4a8

Ops live in ``torch.ops.quantkernels`` (typed wrappers in ``quantkernels.ops``); the
pure-PyTorch reference (``quantkernels.reference``) is their executable spec.
"""

import importlib
import importlib.util
import warnings

from . import _ops as ops  # defines every op's schema, fake and reference first
from . import _native, autograd, dispatch, reference
from .convert import QuantizationReport, memory_footprint, quantize_model
from .formats import WeightFormat
from .nn import SCHEMES, QuantEmbedding, QuantLinear
from . import calibration, peft
from .gptq import gptq_quantize_model, load_gptq_checkpoint, save_gptq_checkpoint
from .smoothquant import smoothquant_quantize_model
from .serialization import (CheckpointError, init_empty_weights, load_bnb_4bit, load_bnb_int8, load_quantized,
                            save_quantized)
from . import _hf_hook

__version__ = "0.1.0"

_native.load()  # registers the C++ kernels (if built) over the reference
if importlib.util.find_spec("triton") is not None:
    try:
        from . import triton as _triton  # noqa: F401  registers quantkernels::<op>_triton (kernels load lazily)
    except Exception as _e:  # a broken triton install must not break the package
        warnings.warn(f"quantkernels: Triton ops not registered ({type(_e).__name__}: {_e})", RuntimeWarning)
dispatch.refresh(None if _native.AVAILABLE else _native.REASON)
autograd.register()  # backward of every op that takes a float tensor, the Triton variants included
_hf_hook.install()  # registers QuantKernelsConfig with transformers, lazily (transformers not imported here)


def __getattr__(name):
    if name == "QuantKernelsConfig":  # needs transformers: imported on first use
        return importlib.import_module(__name__ + ".hf").QuantKernelsConfig
    raise AttributeError(f"module 'quantkernels' has no attribute {name!r}")


BACKENDS = dispatch.BACKENDS

__all__ = [
    "QuantLinear", "QuantEmbedding", "quantize_model", "memory_footprint", "QuantizationReport", "WeightFormat",
    "SCHEMES", "BACKENDS", "ops", "reference", "dispatch", "autograd", "__version__",
    "calibration", "peft", "gptq_quantize_model", "smoothquant_quantize_model", "save_gptq_checkpoint",
    "load_gptq_checkpoint",
    "save_quantized", "load_quantized", "load_bnb_int8", "load_bnb_4bit", "init_empty_weights", "CheckpointError",
    "QuantKernelsConfig",
]
