"""Triton kernels for every quantkernels scheme, registered as ``quantkernels::<op>_triton``.

One module per kernel family: ``quantize`` (per-token int8 and LLM.int8 outlier
quantization), ``int8_gemm`` (int8 GEMM, W8A8, LLM.int8), ``w4a8``, ``weight_only``
(W8A16, W4A16), ``gemm_4bit`` (NF4 / FP4). ``ops`` registers the ops; ``dispatch.py`` picks them for CUDA tensors
where no CUDA C++ kernel exists. ``compile_check`` compiles every kernel and autotune
config for sm_80 / sm_90 without a GPU.

Importing this package registers the ops without importing triton (the kernels load on
first use); it does nothing when triton is not installed.
"""

import importlib.util as _ilu

AVAILABLE = _ilu.find_spec("triton") is not None
OPS = {}
if AVAILABLE:
    from .ops import OPS  # noqa: F811  (registers the ops)
