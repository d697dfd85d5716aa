"""LoRA adapters on ``QuantLinear`` layers with PEFT (QLoRA-style training on a frozen quantized base).

    import quantkernels as qk
    from peft import LoraConfig, get_peft_model

    qk.peft.enable()                     # once per process: PEFT's LoRA now wraps QuantLinear
    model = get_peft_model(quantized_model, LoraConfig(target_modules=["q_proj", "v_proj"]))

``enable()`` registers :class:`LoraQuantLinear` as the LoRA layer of ``QuantLinear`` in every
``LoraConfig`` PEFT builds from then on (``get_peft_model``, ``PeftModel.from_pretrained``,
``add_adapter``), through PEFT's custom-module mapping (``LoraConfig._register_custom_module``).
The adapters (``lora_A`` / ``lora_B``, float ``nn.Linear``) train; the quantized base stays
frozen and bit-identical (its buffers never change unless you merge). The input gradient
through the base is docs/numerics.md s.10's.

Merging (``merge_adapter`` / ``merge_and_unload``) dequantizes the base weight, adds the
adapters' delta ``B @ A * scaling`` in fp32 and re-quantizes with the layer's scheme, group
size and threshold (round to nearest, docs/numerics.md s.1-3). That is exact as an operation
but the result is a quantized weight: each merge warns with the re-quantization error
(relative Frobenius and max-abs, against the float merged weight) and records it in the base
layer's ``lora_merge_error``. ``unmerge`` restores the original buffers bit for bit.
"""

from __future__ import annotations

import warnings
from typing import Any, Optional

import torch
from torch import Tensor, nn

from .autograd import _dequant_panel
from . import _ops as ops
from .nn import FLOAT4_SCHEMES, INT4_SCHEMES, QuantLinear

__all__ = ["enable", "LoraQuantLinear", "QuantMergeWarning"]


class QuantMergeWarning(UserWarning):
    """Merging LoRA adapters into a quantized layer re-quantized its weight; the message gives the error."""


def dequantized_weight(layer: QuantLinear) -> Tensor:
    """The fp32 ``[N, K]`` weight a QuantLinear's buffers hold (docs/numerics.md s.1-3, s.11)."""
    if not isinstance(layer, QuantLinear):
        raise TypeError(f"quantkernels.peft.dequantized_weight: layer must be a QuantLinear, got {type(layer).__name__}")
    if layer.scheme in FLOAT4_SCHEMES:
        return ops.dequantize_4bit(layer.qweight, layer.weight_scale, layer.scheme, layer.group_size,
                                   layer.nested_absmax, layer.absmax_offset, torch.float32)
    int4 = layer.scheme in INT4_SCHEMES
    K = layer.in_features
    return _dequant_panel(layer.qweight, layer.weight_scale, layer.weight_zero, int4, layer.group_size, 0, K,
                          torch.float32)


def _lora_layer_base():
    from peft.tuners.lora.layer import LoraLayer
    return LoraLayer


def _make_class():
    LoraLayer = _lora_layer_base()

    class LoraQuantLinear(nn.Module, LoraLayer):
        """PEFT LoRA layer around a ``QuantLinear``: ``y = base(x) + sum_adapters B(A(dropout(x))) * scaling``."""

        def __init__(self, base_layer: nn.Module, adapter_name: str, config, r: int = 0, lora_alpha: int = 1,
                     **kwargs: Any):
            super().__init__()
            LoraLayer.__init__(self, base_layer)
            self._active_adapter = adapter_name
            self.update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config, **kwargs)

        def _get_in_out_features(self, module: nn.Module):
            base = module.get_base_layer() if hasattr(module, "get_base_layer") else module
            return base.in_features, base.out_features

        def resolve_lora_variant(self, *, config, **kwargs):
            for field in ("use_dora", "use_qalora", "use_bdlora", "velora_config", "arrow_config",
                          "alora_invocation_tokens", "monteclora_config", "kasa_config"):
                if getattr(config, field, None):
                    raise ValueError(f"quantkernels.peft: LoRA on QuantLinear supports plain LoRA only, "
                                     f"got {field}={getattr(config, field)!r}")
            return None

        def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
            result = self.base_layer(x, *args, **kwargs)
            if self.disable_adapters or self.merged:
                return result
            dtype = result.dtype
            for name in self.active_adapters:
                if name not in self.lora_A:
                    continue
                lora_A, lora_B = self.lora_A[name], self.lora_B[name]
                xa = self._cast_input_dtype(x, lora_A.weight.dtype)
                result = result + lora_B(lora_A(self.lora_dropout[name](xa))) * self.scaling[name]
            return result.to(dtype)

        def get_delta_weight(self, adapter: str) -> Tensor:
            """``B @ A * scaling`` in fp32, ``[N, K]``."""
            return (self.lora_B[adapter].weight.float() @ self.lora_A[adapter].weight.float()) * self.scaling[adapter]

        def merge(self, safe_merge: bool = False, adapter_names: Optional[list] = None) -> None:
            from peft.tuners.tuners_utils import check_adapters_to_merge
            adapter_names = check_adapters_to_merge(self, adapter_names)
            adapter_names = [a for a in adapter_names if a in self.lora_A]
            if not adapter_names:
                return
            base = self.get_base_layer()
            w = dequantized_weight(base)
            target = w.clone()
            new_bias = None if base.bias is None else base.bias.float().clone()
            for name in adapter_names:
                delta = self.get_delta_weight(name)
                if base.input_scale is not None:  # the base computes (x / s) W^T, the adapter x A^T B^T
                    delta = delta * base.input_scale
                target += delta
                if self.lora_bias[name]:
                    if new_bias is None:
                        raise RuntimeError("quantkernels.peft: cannot merge an adapter with lora_bias=True into a "
                                           "QuantLinear without a bias")
                    new_bias += self.lora_B[name].bias.float() * self.scaling[name]
            if not torch.isfinite(target).all() or (new_bias is not None and not torch.isfinite(new_bias).all()):
                raise ValueError(f"quantkernels.peft: NaN/Inf in the merged weight of adapters {adapter_names}; "
                                 f"the layer was left unchanged")
            lin = nn.Linear(base.in_features, base.out_features, bias=False, device=w.device)
            with torch.no_grad():
                lin.weight.copy_(target)
            merged = QuantLinear.from_linear(lin, base.scheme, group_size=base.group_size, threshold=base.threshold,
                                             backend=base.backend, double_quant=base.double_quant)
            if "quantkernels_unmerged" not in self._caches:
                self._caches["quantkernels_unmerged"] = (base.qweight, base.weight_scale, base.weight_zero,
                                                        None if base.bias is None else base.bias.detach().clone(),
                                                        base.nested_absmax, base.absmax_offset)
            err = dequantized_weight(merged) - target
            report = {"rel_fro": float(err.norm() / target.norm().clamp_min(1e-30)), "max_abs": float(err.abs().max()),
                      "delta_rel_fro": float((target - w).norm() / w.norm().clamp_min(1e-30))}
            with torch.no_grad():
                base.qweight, base.weight_scale, base.weight_zero = merged.qweight, merged.weight_scale, \
                    merged.weight_zero
                base.nested_absmax, base.absmax_offset = merged.nested_absmax, merged.absmax_offset
                if new_bias is not None:
                    base.bias.copy_(new_bias.to(base.bias.dtype))
            base.lora_merge_error = report
            self.merged_adapters.extend(adapter_names)
            warnings.warn(f"quantkernels.peft: merged LoRA adapter(s) {adapter_names} into a {base.scheme} QuantLinear "
                          f"[{base.out_features}, {base.in_features}] by re-quantizing it: error of the quantized "
                          f"merged weight {report['rel_fro']:.3g} relative (Frobenius), max {report['max_abs']:.3g} "
                          f"(the adapters changed the weight by {report['delta_rel_fro']:.3g} relative)",
                          QuantMergeWarning, stacklevel=2)

        def unmerge(self) -> None:
            if not self.merged:
                warnings.warn("Already unmerged. Nothing to do.")
                return
            base = self.get_base_layer()
            qweight, scale, zero, bias, nested, offset = self._caches.pop("quantkernels_unmerged")
            with torch.no_grad():
                base.qweight, base.weight_scale, base.weight_zero = qweight, scale, zero
                base.nested_absmax, base.absmax_offset = nested, offset
                if bias is not None:
                    base.bias.copy_(bias)
            if hasattr(base, "lora_merge_error"):
                del base.lora_merge_error
            self.merged_adapters.clear()

        def __repr__(self) -> str:
            return "lora." + super().__repr__()

    LoraQuantLinear.__module__ = __name__
    LoraQuantLinear.__qualname__ = "LoraQuantLinear"
    return LoraQuantLinear


_CLASS = None


def __getattr__(name: str):
    if name == "LoraQuantLinear":  # built on first use: importing quantkernels must not import peft
        return lora_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def lora_class():
    """The PEFT LoRA layer class for ``QuantLinear`` (imports peft)."""
    global _CLASS
    if _CLASS is None:
        _CLASS = _make_class()
    return _CLASS


def enable() -> None:
    """Makes PEFT's LoRA wrap ``QuantLinear`` layers in every ``LoraConfig`` it uses from now on
    (``get_peft_model``, ``PeftModel.from_pretrained``, ``add_adapter``). Idempotent."""
    try:
        from peft.tuners.lora import LoraModel
    except ImportError as e:
        raise ImportError("quantkernels.peft.enable needs peft: pip install peft") from e
    create = LoraModel._create_new_module
    if getattr(create, "_quantkernels", False):
        return
    cls = lora_class()

    def _create_new_module(lora_config, adapter_name, target, **kwargs):
        if QuantLinear not in (lora_config._custom_modules or {}):
            lora_config._register_custom_module({QuantLinear: cls})
        return create(lora_config, adapter_name, target, **kwargs)

    _create_new_module._quantkernels = True
    LoraModel._create_new_module = staticmethod(_create_new_module)
