"""transformers integration: ``QuantKernelsConfig`` and its ``HfQuantizer``.

    import quantkernels as qk
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=qk.QuantKernelsConfig("w4a16"))
    model.save_pretrained("out/")                          # safetensors + quantization_config in config.json
    model = AutoModelForCausalLM.from_pretrained("out/")   # after `import quantkernels`: not re-quantized

The quantizer is registered with transformers under ``quant_method = "quantkernels"`` when
``transformers.quantizers.auto`` is imported after ``import quantkernels`` (or at once, when
transformers was imported first): see ``quantkernels/_hf_hook.py``.

Quantize-on-load: before the weights are read, every ``nn.Linear`` (and GPT-2 ``Conv1D``) to
quantize is replaced on the meta device by a ``QuantLinear`` holding a placeholder ``weight``;
transformers then reads each checkpoint tensor ``<layer>.weight`` on its own and hands it to
``QuantKernelsQuantize`` (a ``ConversionOps``), which quantizes it, drops the placeholder and
returns ``<layer>.qweight`` / ``weight_scale`` / ``weight_zero``. So at most one float weight
exists at a time besides the layers kept in float.

Saved checkpoints use the format of ``save_quantized`` (docs/numerics.md s.9.1): the QuantLinear
buffers are the checkpoint keys, and ``config.json``'s ``quantization_config`` holds the same dict
as ``quantization_config.json`` (plus the settings of this config). ``load_quantized`` reads
what ``save_pretrained`` wrote and ``from_pretrained`` reads what ``save_quantized`` wrote.
"""

from __future__ import annotations

import copy
import math
import warnings
from typing import Any, Dict, List, Optional

import torch
import transformers
from torch import nn

from ._hf_hook import MIN_TRANSFORMERS, _supported

if not _supported():
    raise ImportError(f"quantkernels.QuantKernelsConfig needs transformers >= "
                      f"{'.'.join(map(str, MIN_TRANSFORMERS))} (its quantize-on-load API); installed: "
                      f"{transformers.__version__}. quantize_model / save_quantized / load_quantized work with it.")

from transformers.core_model_loading import ConversionOps  # noqa: E402
from transformers.quantizers import auto as _auto  # noqa: E402
from transformers.quantizers.base import HfQuantizer  # noqa: E402
from transformers.quantizers.quantizers_utils import get_module_from_name  # noqa: E402
from transformers.utils.quantization_config import QuantizationConfigMixin  # noqa: E402

from . import _validate as V  # noqa: E402
from .convert import QuantizationReport, _match, quantize_model  # noqa: E402
from .nn import (FLOAT4_SCHEMES, SCHEMES, QuantEmbedding, QuantLinear, _embedding_scale, _is_hf_conv1d,  # noqa: E402
                 all_finite, unsupported_reason)
from .serialization import (QUANT_METHOD, build_quant_layers, checkpoint_config, tied_embedding_modules,  # noqa: E402
                            validate_config)

#: keys of a saved checkpoint's config (serialization.quantization_config) besides scheme/group_size/threshold
CHECKPOINT_KEYS = ("format", "format_version", "quantkernels_version", "weight_format", "packing", "modules",
                   "kept_in_float", "tied_embeddings", "tied")


def _err(msg: str) -> ValueError:
    return ValueError(f"quantkernels.QuantKernelsConfig: {msg}")


class QuantKernelsConfig(QuantizationConfigMixin):
    """How ``from_pretrained`` quantizes a model with quantkernels.

    Args:
        scheme: ``"w8a8"``, ``"llm_int8"``, ``"w8a16"``, ``"w4a16"``, ``"w4a8"``, ``"nf4"`` or ``"fp4"``
            (``SCHEMES``).
        group_size: int4 group size, one of 32, 64, 128, 256, or -1 (per output channel); for nf4 /
            fp4 the block size, 32 .. 4096 (bitsandbytes' default is 64: pass it); the int8 schemes
            are always per channel and ignore it.
        threshold: ``llm_int8`` outlier threshold (a number >= 0; ``inf``: no outliers).
        modules_to_not_convert: module-name globs kept in float, matched as ``quantize_model``'s
            ``exclude`` (``"lm_head"`` matches ``lm_head`` and ``model.lm_head``), and a match on a
            module keeps every linear layer under it (``"pooler"`` keeps ``pooler.dense``).
        quantize_lm_head: also quantize the output layer; when it is tied to the input embedding,
            the embedding is then served from the quantized rows (``QuantEmbedding``).
        double_quant: nf4 / fp4 only: also quantize the block absmax values to 8 bits
            (bitsandbytes' ``bnb_4bit_use_double_quant`` / ``compress_statistics``, docs/numerics.md
            s.11.5), as ``quantize_model(..., double_quant=True)``. True with another scheme raises.

    A config read back from a saved checkpoint also holds the checkpoint's layer table
    (``modules``, ``kept_in_float``, ``tied``, ...; ``CHECKPOINT_KEYS``), which ``from_pretrained``
    follows instead of re-quantizing (there each layer's entry says whether it is double-quantized;
    ``double_quant`` is then True when every layer is). Bad values raise ``ValueError`` naming the
    argument.
    """

    def __init__(self, scheme: Optional[str] = None, group_size: int = 128, threshold: float = 6.0,
                 modules_to_not_convert: Optional[List[str]] = None, quantize_lm_head: bool = False,
                 double_quant: bool = False, **checkpoint: Any):
        self.quant_method = QUANT_METHOD
        given = checkpoint.pop("quant_method", QUANT_METHOD)
        if given != QUANT_METHOD:
            raise _err(f"quant_method must be {QUANT_METHOD!r}, got {given!r}")
        # save_quantized's per-tensor SHA-256 (docs/numerics.md s.9): load_quantized verifies them;
        # transformers reads the tensors itself, so here they are not, and save_pretrained writes none
        checkpoint.pop("checksums", None)
        unknown = sorted(set(checkpoint) - set(CHECKPOINT_KEYS))
        if unknown:
            raise _err(f"unknown argument(s) {unknown}; known: scheme, group_size, threshold, "
                       f"modules_to_not_convert, quantize_lm_head, double_quant (and, from a saved checkpoint, "
                       f"{CHECKPOINT_KEYS})")
        self.scheme = scheme
        self.group_size = group_size
        self.threshold = threshold
        self.modules_to_not_convert = modules_to_not_convert
        self.quantize_lm_head = quantize_lm_head
        self.double_quant = double_quant
        for k in CHECKPOINT_KEYS:
            if k in checkpoint:
                setattr(self, k, checkpoint[k])
        self.post_init()

    @property
    def is_checkpoint(self) -> bool:
        """Whether this config describes a saved checkpoint (it lists its quantized layers)."""
        return getattr(self, "modules", None) is not None

    def post_init(self):
        m = self.modules_to_not_convert
        if isinstance(m, str):
            m = [m]
        if m is not None and (not isinstance(m, (list, tuple)) or not all(isinstance(x, str) for x in m)):
            raise _err(f"modules_to_not_convert must be a list of module-name globs, got {m!r}")
        self.modules_to_not_convert = None if m is None else list(m)
        if not isinstance(self.quantize_lm_head, bool):
            raise _err(f"quantize_lm_head must be True or False, got {self.quantize_lm_head!r}")
        if not isinstance(self.double_quant, bool):
            raise _err(f"double_quant must be True or False, got {self.double_quant!r}")
        if self.is_checkpoint:  # read back from config.json: its layer table decides, checked as load_quantized does
            validate_config(self.to_dict(), "config.json quantization_config")
            return
        if self.scheme not in SCHEMES:
            raise _err(f"scheme must be one of {tuple(SCHEMES)}, got {self.scheme!r}")
        g = self.group_size
        if self.scheme in FLOAT4_SCHEMES:
            if isinstance(g, bool) or g not in V.BLOCKSIZES_4BIT:
                raise _err(f"group_size is the block size for {self.scheme}: one of {V.BLOCKSIZES_4BIT}, got {g!r}")
        elif isinstance(g, bool) or not isinstance(g, int) or (g != -1 and g not in V.INT4_GROUP_SIZES):
            raise _err(f"group_size must be one of {V.INT4_GROUP_SIZES} or -1 (per channel), got {g!r}")
        t = self.threshold
        if isinstance(t, bool) or not isinstance(t, (int, float)) or math.isnan(t) or t < 0:
            raise _err(f"threshold must be a number >= 0 (inf: no outlier columns), got {t!r}")
        if self.double_quant and self.scheme not in FLOAT4_SCHEMES:
            raise _err(f"double_quant applies to {FLOAT4_SCHEMES} only (it quantizes their block absmax "
                       f"values), not to scheme {self.scheme!r}")

    def to_dict(self) -> Dict[str, Any]:
        """transformers' dict (``config.json``'s ``quantization_config``). ``double_quant`` is written
        only when True, so a config without it reads as before in a quantkernels that predates it."""
        d = super().to_dict()
        if d.get("double_quant") is False:
            del d["double_quant"]
        return d

    def checkpoint_dict(self) -> Dict[str, Any]:
        """The checkpoint part (what ``quantization_config.json`` holds)."""
        d = self.to_dict()
        d.pop("modules_to_not_convert", None)
        d.pop("quantize_lm_head", None)
        d.pop("double_quant", None)
        return d


_MALLOC_TRIM = []


def _release_freed_memory() -> None:
    """glibc's ``malloc_trim(0)``: hands the heap pages freed by the previous layers' float copies
    and quantization temporaries back to the OS. Without it glibc keeps them (per-thread arenas, a
    raised mmap threshold), and quantize-on-load of Gemma-3-270M in bf16 peaked ~130 MiB higher
    (bench/results/hf_load_memory_2026-12-02.md). A no-op where there is no glibc."""
    if not _MALLOC_TRIM:
        import ctypes
        import ctypes.util

        try:
            _MALLOC_TRIM.append(ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim)
        except (OSError, AttributeError):
            _MALLOC_TRIM.append(None)
    if _MALLOC_TRIM[0] is not None:
        _MALLOC_TRIM[0](0)


class QuantKernelsQuantize(ConversionOps):
    """Quantizes one checkpoint weight ``<layer>.weight`` into the buffers of the QuantLinear
    ``<layer>`` (``QuantLinear.quantize_weight``) and drops the layer's placeholder ``weight``."""

    def __init__(self, hf_quantizer: "QuantKernelsHfQuantizer"):
        self.hf_quantizer = hf_quantizer

    def convert(self, input_dict: Dict[str, Any], model: Optional[nn.Module] = None,
                full_layer_name: Optional[str] = None, missing_keys=None, **kwargs) -> Dict[str, torch.Tensor]:
        (_, value), = input_dict.items()
        value = value[0] if isinstance(value, list) else value
        module, tensor_name = get_module_from_name(model, full_layer_name)
        if not isinstance(module, QuantLinear) or tensor_name != "weight":
            raise ValueError(f"quantkernels: {full_layer_name} is not the weight of a QuantLinear being loaded")
        if value.dtype not in V.FLOAT_DTYPES:
            raise TypeError(f"quantkernels: checkpoint tensor {full_layer_name} has dtype {value.dtype}; "
                            f"quantize-on-load needs float16, bfloat16 or float32 weights")
        weight = value.t() if getattr(module, "_qk_conv1d", False) else value  # GPT-2 Conv1D stores [in, out]
        expected = (module.out_features, module.in_features)
        if tuple(weight.shape) != expected:
            raise ValueError(f"quantkernels: checkpoint tensor {full_layer_name} holds a weight of shape "
                             f"{tuple(weight.shape)}, the layer needs {expected}")
        if not all_finite(weight):
            raise ValueError(f"quantkernels: checkpoint tensor {full_layer_name} holds NaN or Inf values; "
                             f"refusing to quantize it")
        buffers = module.quantize_weight(weight.contiguous())
        del module._parameters["weight"]  # the placeholder: no float weight stays behind
        _release_freed_memory()  # what the layers before this one freed (transformers still holds this float copy)
        if missing_keys is not None:
            missing_keys.discard(full_layer_name)
        prefix = full_layer_name.rpartition(".")[0]
        return {f"{prefix}.{k}": v for k, v in buffers.items()}


class QuantKernelsHfQuantizer(HfQuantizer):
    """The ``HfQuantizer`` of ``QuantKernelsConfig``: quantize-on-load, or loading a saved checkpoint."""

    requires_calibration = False

    def __init__(self, quantization_config: QuantKernelsConfig, **kwargs):
        if isinstance(quantization_config, dict):
            quantization_config = QuantKernelsConfig.from_dict(quantization_config)
        if not isinstance(quantization_config, QuantKernelsConfig):
            raise TypeError(f"quantkernels: the quantization config must be a QuantKernelsConfig, "
                            f"got {type(quantization_config).__name__}")
        # our own copy: the layer table filled in after loading must not leak into the user's object
        super().__init__(copy.deepcopy(quantization_config), **kwargs)
        if not self.pre_quantized and self.quantization_config.is_checkpoint:
            raise ValueError("quantkernels: this QuantKernelsConfig describes a saved checkpoint (it lists "
                             "'modules') but the model being loaded is not quantized; pass "
                             "QuantKernelsConfig(scheme, ...) to quantize it")
        self._placeholders: List[str] = []
        self._tied_lm_heads: List[str] = []
        self._embed_scales: Dict[str, float] = {}
        self._report: Optional[QuantizationReport] = None

    # ------------------------------------------------------------------ transformers' contract

    def validate_environment(self, *args, **kwargs):
        device_map = kwargs.get("device_map")
        if isinstance(device_map, dict) and "disk" in device_map.values():
            raise ValueError("quantkernels: offloading QuantLinear layers to disk (device_map with 'disk') "
                             "is not supported; use device_map='cpu' or a GPU")

    def param_needs_quantization(self, model, param_name: str, **kwargs) -> bool:
        if self.pre_quantized:
            return False
        module, tensor_name = get_module_from_name(model, param_name)
        return isinstance(module, QuantLinear) and tensor_name == "weight" and "weight" in module._parameters

    def get_quantize_ops(self):
        return QuantKernelsQuantize(self)

    def is_serializable(self, *args, **kwargs) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        # Every QuantLinear op has an input gradient (quantkernels/autograd.py), so PEFT adapters train
        # on a model loaded through this quantizer (qk.peft.enable()); the quantized weights stay frozen.
        return True

    @property
    def is_compileable(self) -> bool:
        return True

    def _process_model_before_weight_loading(self, model, **kwargs):
        if self.pre_quantized:
            self._swap_saved_layers(model)
        else:
            self._swap_layers_to_quantize(model)
        return model

    def _process_model_after_weight_loading(self, model, **kwargs):
        left = [n for n in self._placeholders if "weight" in model.get_submodule(n)._parameters]
        if left:
            raise ValueError(f"quantkernels: the checkpoint has no weight for {len(left)} layer(s) to quantize: "
                             f"{left[:5]} (a checkpoint of another model?)")
        for name in self._tied_lm_heads:  # quantize-on-load of a tied lm_head: now that its float rows are loaded
            quantize_model(model, self._report.scheme, include=(name,), exclude=(),
                           group_size=self.quantization_config.group_size,
                           threshold=self.quantization_config.threshold,
                           double_quant=self.quantization_config.double_quant)
            self._report.quantized.append(name)
            self._report.excluded.pop(name, None)
            self._report.tied_embeddings.update(model.quantkernels_report.tied_embeddings)
            _untie(model, (name, *model.quantkernels_report.tied_embeddings))
        for emb_name, scale in self._embed_scales.items():  # non-persistent: transformers left it uninitialised
            emb = model.get_submodule(emb_name)
            emb.embed_scale = torch.tensor(scale, dtype=torch.float32, device=emb.linear.qweight.device)
        model.quantkernels_report = self._report
        cfg = checkpoint_config(model)
        for k in CHECKPOINT_KEYS + ("scheme", "group_size", "threshold"):
            setattr(self.quantization_config, k, cfg[k])
        self.quantization_config.double_quant = _all_double_quant(cfg["modules"])
        return model

    # ------------------------------------------------------------------ layer swaps (meta device)

    def _swap_layers_to_quantize(self, model) -> None:
        cfg = self.quantization_config
        exclude = list(cfg.modules_to_not_convert or []) + list(getattr(model, "_keep_in_fp32_modules", None) or [])
        out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        heads = {n for n, m in model.named_modules() if out is not None and m is out}
        tied_heads = {n for n in heads if _tied_weight_key(model, n + ".weight")}
        report = QuantizationReport(cfg.scheme)
        for name, mod in list(model.named_modules()):
            conv1d = _is_hf_conv1d(mod)
            if not (isinstance(mod, nn.Linear) or conv1d) or not name:
                continue
            if name in heads and not cfg.quantize_lm_head:
                report.excluded[name] = "output layer (quantize_lm_head=False)"
                continue
            pat = _excluded(name, exclude)
            if pat is not None:
                report.excluded[name] = f"matched modules_to_not_convert pattern {pat!r}"
                continue
            K, N = (mod.weight.shape if conv1d else (mod.in_features, mod.out_features))
            why = unsupported_reason(cfg.scheme, K, N, cfg.group_size)
            if why:
                report.skipped[name] = why
                continue
            if name in tied_heads:  # its rows are the embedding's: quantized after loading (quantize_model)
                _embedding_scale(model.get_input_embeddings())  # raises now if the embedding cannot be served
                self._tied_lm_heads.append(name)
                continue
            q = QuantLinear(K, N, bias=mod.bias is not None, scheme=cfg.scheme, group_size=cfg.group_size,
                            threshold=cfg.threshold, device="meta", double_quant=cfg.double_quant,
                            dtype=mod.bias.dtype if mod.bias is not None else mod.weight.dtype)
            # placeholder for the checkpoint's <name>.weight, dropped by QuantKernelsQuantize
            q.weight = nn.Parameter(torch.empty(tuple(mod.weight.shape), dtype=mod.weight.dtype, device="meta"),
                                    requires_grad=False)
            q._qk_conv1d = conv1d
            q.train(mod.training)
            model.set_submodule(name, q)
            _skip_init(model, name)
            self._placeholders.append(name)
            report.quantized.append(name)
        if report.skipped:
            warnings.warn(f"quantkernels: kept {len(report.skipped)} layer(s) in float that scheme {cfg.scheme!r} "
                          f"cannot serve: " + "; ".join(f"{n} ({r})" for n, r in report.skipped.items()),
                          stacklevel=2)
        if not report.quantized and not self._tied_lm_heads:
            raise ValueError(f"quantkernels: no linear layer of {type(model).__name__} to quantize with "
                             f"{cfg.scheme!r} (excluded: {list(report.excluded)[:5]}, cannot serve: "
                             f"{list(report.skipped)[:5]})")
        self._report = report

    def _swap_saved_layers(self, model) -> None:
        cfg = self.quantization_config.checkpoint_dict()
        where = "config.json quantization_config"
        new = build_quant_layers(model, cfg["modules"], "auto", where)
        embeddings = tied_embedding_modules(model, cfg, where)
        for emb_name, emb in embeddings.items():  # check before anything changes
            if _embedding_scale(emb) is not None:
                scale = getattr(emb, "scalar_embed_scale", None)
                if not isinstance(scale, (int, float)):
                    raise ValueError(f"quantkernels: cannot serve {emb_name} ({type(emb).__name__}) from quantized "
                                     f"rows: its embed_scale is not known before loading (no scalar_embed_scale)")
                self._embed_scales[emb_name] = float(scale)
        for name, q in new.items():
            q.train(model.get_submodule(name).training)
            model.set_submodule(name, q)
            _skip_init(model, name)
        for emb_name, emb in embeddings.items():
            lin_name = cfg["tied_embeddings"][emb_name]
            model.set_submodule(emb_name, QuantEmbedding(new[lin_name], emb).train(emb.training))
            _untie(model, (emb_name, lin_name))
        self.quantization_config.double_quant = _all_double_quant(cfg["modules"])
        report = QuantizationReport(cfg.get("scheme") or "mixed", quantized=list(cfg["modules"]))
        report.excluded.update(cfg.get("kept_in_float", {}))
        report.tied_embeddings.update(cfg.get("tied_embeddings", {}))
        self._report = report


def _all_double_quant(modules: Dict[str, Dict[str, Any]]) -> bool:
    """Whether every layer of a checkpoint's table is double-quantized (nf4 / fp4 with
    ``double_quant``): the ``double_quant`` a config read back from it reports."""
    return bool(modules) and all(e.get("double_quant", False) is True for e in modules.values())


def _excluded(name: str, patterns) -> Optional[str]:
    """The pattern that keeps ``name`` in float: one matching the layer (``quantize_model``'s rule)
    or a module above it (``"pooler"`` keeps ``pooler.dense``), as transformers' own
    ``modules_to_not_convert`` does."""
    if not patterns:
        return None
    parts = name.split(".")
    for i in range(len(parts), 0, -1):
        pat = _match(".".join(parts[:i]), patterns)
        if pat is not None:
            return pat
    return None


def _skip_init(model, name: str) -> None:
    """Keeps transformers' weight initialisation (run after loading, for what the checkpoint
    lacked) off a QuantLinear and off its parent when the parent has no tensor of its own: some
    models' ``_init_weights`` reach into a child's ``.weight`` (GPT-2: ``attn.c_proj.weight``),
    which a QuantLinear does not have. A checkpoint lacking a quantized layer's tensors is caught
    by our own checks instead (placeholders left, missing keys)."""
    q = model.get_submodule(name)
    q._is_hf_initialized = True
    parent = model.get_submodule(name.rpartition(".")[0]) if "." in name else model
    if parent is not model and not list(parent.parameters(recurse=False)) and not list(parent.buffers(recurse=False)):
        parent._is_hf_initialized = True


def _tied_weight_key(model, key: str) -> bool:
    tied = getattr(model, "all_tied_weights_keys", None) or {}
    return key in tied or key in tied.values()


def _untie(model, names) -> None:
    """Drops transformers' tie entries of these modules' ``weight`` (they have none now)."""
    tied = getattr(model, "all_tied_weights_keys", None)
    if not tied:
        return
    keys = {n + ".weight" for n in names}
    for target, source in list(tied.items()):
        if target in keys or source in keys:
            del tied[target]


def register() -> None:
    """Registers ``QuantKernelsConfig`` and its quantizer with transformers under
    ``"quantkernels"`` (``register_quantization_config`` / ``register_quantizer``). Idempotent: a
    re-imported or reloaded ``quantkernels.hf`` replaces its own earlier entries; a class of another
    package registered under the name raises."""
    for mapping, cls, register_fn in (
            (_auto.AUTO_QUANTIZATION_CONFIG_MAPPING, QuantKernelsConfig, _auto.register_quantization_config),
            (_auto.AUTO_QUANTIZER_MAPPING, QuantKernelsHfQuantizer, _auto.register_quantizer)):
        old = mapping.get(QUANT_METHOD)
        if old is None:
            register_fn(QUANT_METHOD)(cls)
        elif old is not cls:
            if getattr(old, "__module__", None) != __name__:
                raise RuntimeError(f"quantkernels: transformers already has a quantizer named {QUANT_METHOD!r}: "
                                   f"{old.__module__}.{old.__qualname__}")
            mapping[QUANT_METHOD] = cls  # our own class from an earlier import of this module


register()
