"""quantize_model(): walks a model and replaces its linear layers by QuantLinear, in place."""

from __future__ import annotations

import fnmatch
import sys
import warnings
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Optional, Union

from torch import nn

from . import dispatch
from .nn import (FLOAT4_SCHEMES, INT4_SCHEMES, QuantEmbedding, QuantLinear, _check_scheme, _embedding_scale,
                 _is_hf_conv1d,
                 check_threshold, quantizable_weight, unsupported_reason)

Patterns = Optional[Union[str, Iterable[str]]]


@dataclass
class QuantizationReport:
    """What ``quantize_model`` did; stored as ``model.quantkernels_report``."""

    scheme: str
    quantized: List[str] = field(default_factory=list)
    #: layer name -> why it stayed in float (shape the scheme cannot serve)
    skipped: Dict[str, str] = field(default_factory=dict)
    #: layer name -> the include/exclude rule that left it alone
    excluded: Dict[str, str] = field(default_factory=dict)
    #: embedding name -> the quantized linear layer (a tied lm_head) whose rows now serve it
    tied_embeddings: Dict[str, str] = field(default_factory=dict)
    #: memory_footprint(model) before and after (None where not measured)
    bytes_before: Optional[int] = None
    bytes_after: Optional[int] = None

    def summary(self) -> str:
        """A few lines: what was replaced, what was kept in float and why, the memory saved."""
        lines = [f"quantkernels: {self.scheme}: replaced {len(self.quantized)} linear layer(s), kept "
                 f"{len(self.skipped) + len(self.excluded)} in float"]
        for what, d in (("excluded", self.excluded), ("cannot serve", self.skipped)):
            reasons: Dict[str, List[str]] = {}
            for n, why in d.items():
                reasons.setdefault(why, []).append(n)
            for why, names in reasons.items():
                shown = ", ".join(names[:4]) + (f" (+{len(names) - 4} more)" if len(names) > 4 else "")
                lines.append(f"  kept ({what}: {why}): {shown}")
        for emb, lin in self.tied_embeddings.items():
            lines.append(f"  {emb}: served from the quantized rows of the tied {lin} (no float copy kept)")
        if self.bytes_before is not None and self.bytes_after is not None:
            mb = 2**20
            lines.append(f"  memory {self.bytes_before / mb:.1f} MiB -> {self.bytes_after / mb:.1f} MiB "
                         f"(saved {(self.bytes_before - self.bytes_after) / mb:.1f} MiB, "
                         f"{self.bytes_after / max(self.bytes_before, 1):.2f}x)")
        return "\n".join(lines)


def _patterns(p: Patterns, what: str, where: str = "quantize_model"):
    if p is None:
        return None
    if isinstance(p, str):
        return (p,)
    try:
        p = tuple(p)
    except TypeError:
        raise TypeError(f"quantkernels.{where}: {what} must be a module-name pattern (str), an iterable of "
                        f"them or None, got {p!r}") from None
    for item in p:
        if not isinstance(item, str):
            raise TypeError(f"quantkernels.{where}: {what} must hold strings, got {item!r}")
    return p


def _match(name: str, patterns) -> Optional[str]:
    """A pattern (fnmatch glob) matches a dotted module name in full or as a suffix after a dot:
    ``lm_head`` matches ``lm_head`` and ``model.lm_head``; ``*.attention.*`` any attention layer."""
    for pat in patterns:
        if fnmatch.fnmatchcase(name, pat) or fnmatch.fnmatchcase(name, "*." + pat):
            return pat
    return None


def quantize_model(model: nn.Module, scheme: str = "w8a8", *, include: Patterns = None,
                   exclude: Patterns = ("lm_head",), group_size: int = 128, threshold: float = 6.0,
                   backend: str = "auto", progress: bool = False, double_quant: bool = False) -> nn.Module:
    """Replaces every ``nn.Linear`` and Hugging Face ``Conv1D`` of ``model`` by a QuantLinear.

    Args:
        scheme: ``"w8a8"``, ``"llm_int8"``, ``"w8a16"``, ``"w4a16"``, ``"w4a8"``, ``"nf4"`` or ``"fp4"``.
        include: module-name patterns to quantize (None: every linear layer).
        exclude: module-name patterns to leave in float (default ``("lm_head",)``).
        group_size, threshold, backend: passed to ``QuantLinear.from_linear``. For nf4 / fp4
            ``group_size`` is bitsandbytes' block size (32 .. 4096; its default is 64, pass it).
        double_quant: nf4 / fp4 only: also quantize the block absmax values (bitsandbytes'
            ``compress_statistics``, docs/numerics.md s.11).
        progress: show a tqdm progress bar over the linear layers (when tqdm is installed) and
            print ``report.summary()`` (replaced, kept and why, memory saved) to stderr.
    Layers whose shape the scheme cannot serve (e.g. K not a multiple of the group size) stay
    in float and are reported with a warning and in ``model.quantkernels_report``. A call that
    would quantize no layer at all (the scheme / group size serves none of them, include/exclude
    leave none, or the model is already quantized) raises ValueError instead. Every selected
    layer is checked (weight dtype, NaN/Inf, tied embedding) before the first one is replaced,
    so a failing call leaves the model as it was.

    Tied ``lm_head``: ``lm_head`` is excluded by default; with ``exclude=()`` (or an ``include``
    that matches it) it is quantized, and when its weight is tied to an input embedding (Gemma,
    Llama-3.2, GPT-2...), that embedding is replaced by a ``QuantEmbedding`` that looks its rows
    up in the same quantized weight, so no float copy of the matrix is kept
    (``report.tied_embeddings``). An embedding whose forward cannot be reproduced raises.
    Returns the same (modified) model.
    """
    _check_scheme(scheme)
    dispatch.check_backend(backend)
    check_threshold("quantize_model", threshold)
    if isinstance(group_size, bool) or not isinstance(group_size, int):
        raise TypeError(f"quantkernels.quantize_model: group_size must be an int, got {group_size!r}")
    if not isinstance(double_quant, bool):
        raise TypeError(f"quantkernels.quantize_model: double_quant must be True or False, got {double_quant!r}")
    if double_quant and scheme not in FLOAT4_SCHEMES:
        raise ValueError(f"quantkernels.quantize_model: double_quant applies to {FLOAT4_SCHEMES} only, "
                         f"not to scheme {scheme!r}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"quantkernels.quantize_model: model must be a torch.nn.Module, got {type(model).__name__}")
    if isinstance(model, QuantLinear):
        raise TypeError("quantkernels.quantize_model: model is already a QuantLinear")
    inc, exc = _patterns(include, "include"), _patterns(exclude, "exclude") or ()
    report = QuantizationReport(scheme)
    targets = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear) or _is_hf_conv1d(m)]
    # embeddings by weight, to find a linear layer tied to one (same Parameter object)
    embeddings = {id(m.weight): (n, m) for n, m in model.named_modules()
                  if isinstance(m, nn.Embedding) and not isinstance(m, QuantEmbedding)}
    # 1. Plan and validate every layer before the model changes: a bad layer raises with the model
    #    as it was (no half-quantized model).
    plan = []
    for name, mod in targets:
        if inc is not None and _match(name, inc) is None:
            report.excluded[name] = "not matched by include"
            continue
        pat = _match(name, exc)
        if pat is not None:
            report.excluded[name] = f"matched exclude pattern {pat!r}"
            continue
        if _is_hf_conv1d(mod):
            K, N = mod.weight.shape
        else:
            N, K = mod.out_features, mod.in_features
        why = unsupported_reason(scheme, K, N, group_size)
        if why:
            report.skipped[name] = why
            continue
        if name == "":
            raise TypeError("quantkernels.quantize_model: model is itself a linear layer; "
                            "use QuantLinear.from_linear(model, ...) instead")
        quantizable_weight(mod, f"quantize_model: layer {name!r}")
        tied = embeddings.get(id(mod.weight)) if isinstance(mod, nn.Linear) else None
        if tied is not None:
            _embedding_scale(tied[1])  # raises before anything changes if it cannot be served
        plan.append((name, mod, tied))
    if not plan:
        raise ValueError(_nothing_to_do(model, scheme, group_size, report))
    if progress:
        report.bytes_before = memory_footprint(model)
        try:
            from tqdm.auto import tqdm
            plan = tqdm(plan, desc=f"quantize {scheme}", unit="layer")
        except ImportError:
            pass
    # 2. Replace.
    for name, mod, tied in plan:
        new = QuantLinear.from_linear(mod, scheme, group_size=group_size, threshold=threshold, backend=backend,
                                      double_quant=double_quant)
        new.train(mod.training)
        _replace(model, name, new)
        report.quantized.append(name)
        if tied is not None:
            emb_name, emb = tied
            _replace(model, emb_name, QuantEmbedding(new, emb).train(emb.training))
            report.tied_embeddings[emb_name] = name
    if report.skipped:
        detail = "; ".join(f"{n} ({r})" for n, r in report.skipped.items())
        warnings.warn(f"quantkernels.quantize_model: kept {len(report.skipped)} layer(s) in float "
                      f"that scheme {scheme!r} cannot serve: {detail}", stacklevel=2)
    model.quantkernels_report = report
    if progress:
        report.bytes_after = memory_footprint(model)
        print(report.summary(), file=sys.stderr)
    return model


def _nothing_to_do(model: nn.Module, scheme: str, group_size: int, report: QuantizationReport) -> str:
    """The error of a quantize_model call that would quantize no layer at all."""
    head = f"quantkernels.quantize_model: scheme {scheme!r}"
    if scheme in INT4_SCHEMES or scheme in FLOAT4_SCHEMES:
        head += f" with group_size={group_size}"
    done = [n for n, m in model.named_modules() if isinstance(m, QuantLinear)]
    if report.skipped:
        reasons = sorted(set(report.skipped.values()))
        return (f"{head} can serve none of the {len(report.skipped)} selected linear layer(s) "
                f"({'; '.join(reasons[:3])}); nothing was changed")
    if done:
        schemes = sorted({model.get_submodule(n).scheme for n in done})
        return (f"{head}: the model is already quantized ({len(done)} QuantLinear layer(s), scheme "
                f"{', '.join(schemes)}) and no float linear layer is left to quantize; start from the float model")
    if report.excluded:
        return (f"{head}: include/exclude left no linear layer to quantize (all {len(report.excluded)} "
                f"excluded); nothing was changed")
    return f"{head}: the model has no torch.nn.Linear (or transformers Conv1D) layer to quantize"


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def memory_footprint(model: nn.Module) -> int:
    """Bytes held by the model's parameters and buffers (transformers' ``get_memory_footprint()``)."""
    params = sum(p.nelement() * p.element_size() for p in model.parameters())
    buffers = sum(b.nelement() * b.element_size() for b in model.buffers())
    return params + buffers
