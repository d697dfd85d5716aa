"""SmoothQuant (Xiao et al., 2023) for the int8-activation schemes (w8a8, w4a8, llm_int8).

Per input channel ``j`` of a linear layer (or of a group of layers reading the same input),
``s_j = max|X_j|^alpha / max_i |W_ij|^(1 - alpha)``; the layer computes
``(X / s) (W * s)^T``, which is the same product with the activation outliers migrated into
the weights (``alpha``: the migration strength; 0.5 by default, higher for models with
stronger outliers). Channels never active in the calibration data (or with all-zero weights)
keep ``s_j = 1``.

Where the architecture allows, ``1 / s`` is *folded* into the producer of ``X`` at no run-time
cost: a LayerNorm / RMSNorm whose output feeds only these layers (pre-norm decoders: Llama,
Mistral, Qwen, Gemma; Gemma's ``(1 + weight)`` convention is handled), or a linear layer whose
output reaches ``X`` through per-channel operations only (``v_proj -> o_proj`` without grouped
KV heads, ``up_proj -> down_proj`` through ``act(gate) * up``, BERT's ``value -> attention.output``).
Everywhere else (e.g. BERT's post-norm residual stream, GELU before ``output.dense``, a pooler)
``s`` is stored in ``QuantLinear.input_scale`` and the forward divides ``x`` by it before the
per-token quantization (``save_quantized`` / ``load_quantized`` keep that buffer).

``alpha`` is one number for the whole model, or ``"auto"``: per smoothing group, the candidate
alpha (or no smoothing) whose quantized layers reproduce the float outputs best on calibration
rows. ``groups="norm"`` restricts smoothing to the layers read from a norm (q/k/v, gate/up), as
the SmoothQuant authors' code does.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Optional, Tuple, Union

import torch
from torch import Tensor, nn

from .calibration import collect_stats, find_blocks, is_linear, linear_weight, select_linears
from .convert import quantize_model
from .nn import _check_scheme, check_threshold, quantizable_weight, unsupported_reason

#: the schemes SmoothQuant serves: those with int8 activations
SMOOTH_SCHEMES = ("w8a8", "w4a8", "llm_int8")


@dataclass
class SmoothGroup:
    """Linear layers reading one input, and the module producing it that can absorb ``1/s`` (or None)."""

    consumers: List[str]
    producer: Optional[str] = None
    scale: Optional[Tensor] = None   # s, float32 [K], once computed


def _has(block: nn.Module, path: str) -> bool:
    try:
        block.get_submodule(path)
        return True
    except AttributeError:
        return False


def _block_groups(block: nn.Module) -> List[Tuple[Optional[str], List[str]]]:
    """(producer, consumers) pairs, paths relative to the block, for the architectures we know."""
    g: List[Tuple[Optional[str], List[str]]] = []
    if _has(block, "self_attn.q_proj") and _has(block, "input_layernorm"):       # Llama / Gemma / Qwen
        attn = block.get_submodule("self_attn")
        qkv = [f"self_attn.{p}" for p in ("q_proj", "k_proj", "v_proj") if _has(block, f"self_attn.{p}")]
        g.append(("input_layernorm", qkv))
        if _has(block, "self_attn.o_proj"):
            v, o = attn.get_submodule("v_proj"), attn.get_submodule("o_proj")
            # v -> o is per-channel only when no KV head is shared by several query heads
            ok = linear_weight(v).shape[0] == linear_weight(o).shape[1]
            g.append(("self_attn.v_proj" if ok else None, ["self_attn.o_proj"]))
        mlp_norm = next((n for n in ("pre_feedforward_layernorm", "post_attention_layernorm") if _has(block, n)), None)
        mlp = [f"mlp.{p}" for p in ("gate_proj", "up_proj") if _has(block, f"mlp.{p}")]
        if mlp:
            g.append((mlp_norm, mlp))
        if _has(block, "mlp.down_proj"):
            g.append(("mlp.up_proj" if _has(block, "mlp.up_proj") else None, ["mlp.down_proj"]))
    elif _has(block, "attention.self.query") and _has(block, "attention.output.dense"):   # BERT (post-norm)
        g.append((None, [f"attention.self.{p}" for p in ("query", "key", "value")]))
        g.append(("attention.self.value", ["attention.output.dense"]))
    return g


def smoothing_groups(model: nn.Module, fold: bool = True) -> List[SmoothGroup]:
    """The smoothing groups of every linear layer of ``model``: known block structures give shared
    groups with fold targets; every other linear layer is a group of its own without one."""
    groups: List[SmoothGroup] = []
    covered = set()
    try:
        prefix, blocks = find_blocks(model)
    except ValueError:
        blocks = []
    for i, block in enumerate(blocks):
        for prod, cons in _block_groups(block):
            names = [f"{prefix}.{i}.{c}" for c in cons]
            groups.append(SmoothGroup(names, f"{prefix}.{i}.{prod}" if (prod and fold) else None))
            covered.update(names)
    for n, m in model.named_modules():
        if is_linear(m) and n not in covered and n != "":
            groups.append(SmoothGroup([n]))
    return groups


def smoothing_scale(act_absmax: Tensor, weights: Iterable[Tensor], alpha: float) -> Tensor:
    """``s = max|X|^alpha / max|W|^(1-alpha)`` per input channel (float32), 1 on dead channels."""
    a = act_absmax.float()
    w = torch.stack([linear_weight_abs_max(W) for W in weights]).amax(dim=0).to(a.device)
    s = a.clamp(min=1e-5).pow(alpha) / w.clamp(min=1e-5).pow(1 - alpha)
    s = torch.where((a > 0) & (w > 0) & torch.isfinite(s), s, torch.ones_like(s))
    return s


def linear_weight_abs_max(W: Tensor) -> Tensor:
    return W.detach().abs().amax(dim=0).float()


@torch.no_grad()
def _fold_into(producer: nn.Module, s: Tensor) -> None:
    """Divides the producer's output channels by ``s``."""
    if is_linear(producer):
        W = linear_weight(producer)          # a view for Conv1D: in-place ops reach the parameter
        W.div_(s.to(W.dtype).unsqueeze(1))
        if producer.bias is not None:
            producer.bias.div_(s.to(producer.bias.dtype))
        return
    w = getattr(producer, "weight", None)
    if not isinstance(w, Tensor) or w.shape != s.shape:
        raise TypeError(f"quantkernels.smoothquant: cannot fold into {type(producer).__name__}")
    if type(producer).__name__.startswith("Gemma"):   # Gemma RMSNorm scales by (1 + weight)
        w.copy_((1 + w.float()) / s - 1)
    else:
        w.div_(s.to(w.dtype))
    b = getattr(producer, "bias", None)
    if isinstance(b, Tensor):
        b.div_(s.to(b.dtype))


@dataclass
class SmoothReport:
    alpha: float
    folded: Dict[str, str] = field(default_factory=dict)        # consumer -> producer that absorbed 1/s
    input_scale: List[str] = field(default_factory=list)        # layers dividing x by s at run time
    scales: Dict[str, Tensor] = field(default_factory=dict)     # consumer -> s
    # alpha="auto": first consumer of each group -> the alpha chosen (None: left unsmoothed)
    alphas: Dict[str, Optional[float]] = field(default_factory=dict)


#: the migration strengths ``alpha="auto"`` tries for each group (plus "no smoothing")
AUTO_ALPHAS = (0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


class _Sampler:
    """Forward pre-hooks keeping up to ``max_rows`` input rows (evenly spaced over all the tokens
    seen) of one layer per smoothing group: the data ``alpha="auto"`` scores candidates on."""

    def __init__(self, modules: Dict[str, nn.Module], max_rows: int):
        self.modules, self.max_rows = modules, max_rows
        self.rows: Dict[str, List[Tensor]] = {n: [] for n in modules}
        self.mask: Optional[Tensor] = None
        self._handles = []

    def _hook(self, name):
        def hook(mod, args, kwargs):
            x = args[0] if args else next(iter(kwargs.values()))
            if self.mask is not None and x.dim() == 3 and tuple(x.shape[:2]) == tuple(self.mask.shape):
                x = x[self.mask.to(x.device)]
            self.rows[name].append(x.detach().reshape(-1, x.shape[-1]).float().cpu())
        return hook

    def __enter__(self):
        for n, m in self.modules.items():
            self._handles.append(m.register_forward_pre_hook(self._hook(n), with_kwargs=True))
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def samples(self) -> Dict[str, Tensor]:
        out = {}
        for n, parts in self.rows.items():
            if not parts:
                continue
            x = torch.cat(parts)
            if x.shape[0] > self.max_rows:
                x = x[torch.linspace(0, x.shape[0] - 1, self.max_rows).round().long()]
            out[n] = x
        return out


@torch.no_grad()
def collect_smoothing_samples(model: nn.Module, batches: Iterable, groups: List[SmoothGroup], *,
                              max_rows: int = 512, mask_padding: bool = True) -> Dict[str, Tensor]:
    """Input rows of each group's first consumer (``max_rows`` at most, evenly spaced), float32 on the CPU."""
    from .calibration import _token_mask, call_model

    mods = {g.consumers[0]: model.get_submodule(g.consumers[0]) for g in groups}
    with _Sampler(mods, max_rows) as s:
        for b in batches:
            s.mask = _token_mask(b) if mask_padding else None
            call_model(model, b)
    return s.samples()


@torch.no_grad()
def _group_error(x: Tensor, weights: List[Tensor], s: Optional[Tensor], scheme: str, group_size: int,
                 threshold: float, backend: str) -> float:
    """Sum over the group's layers of ||x W^T - QuantLinear(W * s)(x / s)||^2 / ||x W^T||^2."""
    from .nn import QuantLinear

    err = 0.0
    for W in weights:   # biases cancel in the difference: left out
        W = W.detach().float()
        ref = x @ W.t()
        lin = nn.utils.skip_init(nn.Linear, W.shape[1], W.shape[0], bias=False)
        lin.weight = nn.Parameter(W * s.unsqueeze(0) if s is not None else W.clone(), requires_grad=False)
        ql = QuantLinear.from_linear(lin, scheme, group_size=group_size, threshold=threshold, backend=backend)
        out = ql(x / s if s is not None else x)
        err += ((ref - out).double().pow(2).sum() / ref.double().pow(2).sum().clamp(min=1e-30)).item()
    return err


@torch.no_grad()
def choose_alpha(x: Tensor, act_absmax: Tensor, weights: List[Tensor], *, scheme: str = "w8a8",
                 candidates: Iterable[float] = AUTO_ALPHAS, group_size: int = 128, threshold: float = 6.0,
                 backend: str = "auto") -> Tuple[Optional[float], Dict[Optional[float], float]]:
    """The migration strength minimizing the group's relative output error on the sample rows ``x``
    (quantized as ``scheme`` would), among ``candidates`` and None (no smoothing, ``s = 1``).
    Returns (best, {candidate: error})."""
    errs: Dict[Optional[float], float] = {None: _group_error(x, weights, None, scheme, group_size, threshold,
                                                             backend)}
    for a in candidates:
        s = smoothing_scale(act_absmax, weights, float(a))
        errs[float(a)] = _group_error(x, weights, s, scheme, group_size, threshold, backend)
    best = min(errs, key=lambda k: errs[k])
    return best, errs


def _check_alpha(alpha, where: str) -> bool:
    """True for ``alpha="auto"``, False for a number in [0, 1]; raises for anything else."""
    if alpha == "auto":
        return True
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 <= alpha <= 1:
        raise ValueError(f"quantkernels.{where}: alpha must be a number in [0, 1] or 'auto', got {alpha!r}")
    return False


@torch.no_grad()
def smooth_model(model: nn.Module, act_absmax: Dict[str, Tensor], alpha: Union[float, str] = 0.5, *,
                 layers: Optional[Iterable[str]] = None, fold: bool = True,
                 samples: Optional[Dict[str, Tensor]] = None, scheme: str = "w8a8",
                 candidates: Iterable[float] = AUTO_ALPHAS, group_size: int = 128, threshold: float = 6.0,
                 backend: str = "auto", groups: str = "all") -> SmoothReport:
    """Applies SmoothQuant to the *float* model in place: multiplies the weights of the ``layers``
    (default: every layer in ``act_absmax``) by ``s`` and folds ``1/s`` into producers where
    possible. Layers whose ``1/s`` could not be folded are listed in ``report.input_scale``: the
    caller must divide their input by ``report.scales[name]`` (``smoothquant_quantize_model``
    stores it in ``QuantLinear.input_scale``). The float model stays equivalent only after that.

    ``alpha="auto"``: per smoothing group, the alpha among ``candidates`` (or no smoothing at all)
    whose ``scheme``-quantized layers reproduce the float outputs best on ``samples`` (input rows
    of each group's first consumer: ``collect_smoothing_samples``); ``report.alphas`` lists the
    choices. The other arguments (``group_size``, ``threshold``, ``backend``) are those of the
    quantization that follows.

    ``groups="norm"`` smooths only the layers read from a LayerNorm / RMSNorm (q/k/v and gate/up
    or fc1 in pre-norm decoders), as the SmoothQuant authors' code does; ``"all"`` (default) also
    smooths the layers after a linear one (o_proj, down_proj: folded or ``input_scale``) and
    every other linear layer (``input_scale``)."""
    if groups not in ("all", "norm"):
        raise ValueError(f"quantkernels.smoothquant: groups must be 'all' or 'norm', got {groups!r}")
    auto = _check_alpha(alpha, "smoothquant")
    candidates = tuple(float(c) for c in candidates)
    if auto:
        if samples is None:
            raise ValueError("quantkernels.smoothquant: alpha='auto' needs samples= (collect_smoothing_samples)")
        if not candidates or not all(0 <= c <= 1 for c in candidates):
            raise ValueError(f"quantkernels.smoothquant: candidates must be alphas in [0, 1], got {candidates}")
    wanted = set(act_absmax if layers is None else layers)
    rep = SmoothReport(float("nan") if auto else float(alpha))

    def scale_for(names: List[str], mods: List[nn.Module], a_max: Tensor, sampled: str) -> Optional[Tensor]:
        """``sampled``: the group's first consumer, whose input rows were kept (every consumer of a
        group reads the same input)."""
        Ws = [linear_weight(m) for m in mods]
        if not auto:
            return smoothing_scale(a_max, Ws, alpha)
        x = samples.get(sampled)
        if x is None:
            raise ValueError(f"quantkernels.smoothquant: alpha='auto' has no input samples for {sampled}")
        best, _ = choose_alpha(x.to(Ws[0].device), a_max, Ws, scheme=scheme, candidates=candidates,
                               group_size=group_size, threshold=threshold, backend=backend)
        rep.alphas[names[0]] = best
        return None if best is None else smoothing_scale(a_max, Ws, best)

    for grp in smoothing_groups(model, fold):
        if groups == "norm" and (grp.producer is None or is_linear(model.get_submodule(grp.producer))):
            continue
        if grp.producer is not None:
            # folding changes the producer's output for every consumer: all must be smoothed
            if not all(c in act_absmax for c in grp.consumers) or not any(c in wanted for c in grp.consumers):
                continue
            mods = [model.get_submodule(c) for c in grp.consumers]
            a = torch.stack([act_absmax[c].float() for c in grp.consumers]).amax(dim=0)
            s = scale_for(grp.consumers, mods, a, grp.consumers[0])
            if s is None:
                continue
            _fold_into(model.get_submodule(grp.producer), s)
            for c, m in zip(grp.consumers, mods):
                W = linear_weight(m)
                W.mul_(s.to(W.dtype).unsqueeze(0))
                rep.folded[c] = grp.producer
                rep.scales[c] = s
        else:
            for c in grp.consumers:  # each layer can carry its own input_scale
                if c not in wanted or c not in act_absmax:
                    continue
                m = model.get_submodule(c)
                s = scale_for([c], [m], act_absmax[c].float(), grp.consumers[0])
                if s is None:
                    continue
                W = linear_weight(m)
                W.mul_(s.to(W.dtype).unsqueeze(0))
                rep.input_scale.append(c)
                rep.scales[c] = s
    return rep


@torch.no_grad()
def smoothquant_quantize_model(model: nn.Module, batches: Iterable, scheme: str = "w8a8", *,
                               alpha: Union[float, str] = 0.5, fold: bool = True, include=None,
                               exclude=("lm_head",), group_size: int = 128, threshold: float = 6.0,
                               backend: str = "auto", mask_padding: bool = True, progress: bool = True,
                               act_absmax: Optional[Dict[str, Tensor]] = None,
                               candidates: Iterable[float] = AUTO_ALPHAS, auto_rows: int = 512,
                               groups: str = "all") -> nn.Module:
    """Calibrates (per-channel input absmax, one pass), smooths (``smooth_model``), then
    ``quantize_model(model, scheme, ...)``; layers whose smoothing is not folded get
    ``QuantLinear.input_scale``. In place; ``model.quantkernels_report.smoothquant`` holds the
    ``SmoothReport``.

    ``act_absmax``: statistics already collected on this very (float) model over ``batches``
    (``collect_stats(..., absmax=True)`` of every linear layer), e.g. to sweep ``alpha`` without
    recalibrating. ``alpha="auto"`` picks each group's alpha among ``candidates`` (or none) on
    up to ``auto_rows`` input rows per group (one more pass over ``batches``). ``groups``: which
    layers are smoothed (``smooth_model``)."""
    _check_scheme(scheme)
    if scheme not in SMOOTH_SCHEMES:
        raise ValueError(f"quantkernels.smoothquant_quantize_model: scheme must be one of {SMOOTH_SCHEMES} "
                         f"(SmoothQuant moves activation outliers into the weights, which only helps when the "
                         f"activations are quantized to int8), got {scheme!r}")
    _check_alpha(alpha, "smoothquant_quantize_model")
    check_threshold("smoothquant_quantize_model", threshold)
    batches = list(batches)
    if not batches and act_absmax is None:
        raise ValueError("quantkernels.smoothquant_quantize_model: batches is empty; SmoothQuant needs calibration "
                         "batches (tokenizer outputs, tuples or tensors the model takes)")
    if not batches and alpha == "auto":
        raise ValueError("quantkernels.smoothquant_quantize_model: alpha='auto' needs calibration batches, "
                         "got none")
    layers = select_linears(model, include, exclude)
    targets = {}
    for n, m in layers.items():
        W = linear_weight(m)
        if unsupported_reason(scheme, W.shape[1], W.shape[0], group_size) is None:
            quantizable_weight(m, f"smoothquant_quantize_model: layer {n!r}")  # before smoothing edits weights
            targets[n] = m
    if not targets:
        raise ValueError(f"quantkernels.smoothquant_quantize_model: scheme {scheme!r} (group_size={group_size}) can "
                         f"serve none of the {len(layers)} selected linear layer(s); nothing was changed")
    if act_absmax is None:
        # statistics for every linear layer: a fold group needs all of its consumers' inputs
        stats = collect_stats(model, batches, layers=select_linears(model, None, ()), hessian=False, absmax=True,
                              mask_padding=mask_padding, progress=progress, desc="smoothquant calibration")
        absmax = {n: st.absmax for n, st in stats.items() if st.absmax is not None}
    else:
        absmax = dict(act_absmax)
    samples = None
    if alpha == "auto":
        sgroups = [g for g in smoothing_groups(model, fold) if any(c in targets for c in g.consumers)
                   and all(c in absmax for c in g.consumers)]
        samples = collect_smoothing_samples(model, batches, sgroups, max_rows=auto_rows, mask_padding=mask_padding)
    rep = smooth_model(model, absmax, alpha, layers=list(targets), fold=fold, samples=samples, scheme=scheme,
                       candidates=candidates, group_size=group_size, threshold=threshold, backend=backend,
                       groups=groups)
    quantize_model(model, scheme, include=include, exclude=exclude, group_size=group_size, threshold=threshold,
                   backend=backend)
    qrep = model.quantkernels_report
    for n in rep.input_scale:
        if n not in qrep.quantized:  # cannot happen: input_scale layers are all quantization targets
            raise RuntimeError(f"quantkernels.smoothquant: {n} was smoothed but not quantized")
        ql = model.get_submodule(n)
        ql.input_scale = rep.scales[n].to(ql.qweight.device, torch.float32).contiguous()
    qrep.smoothquant = rep
    return model


__all__ = ["smoothquant_quantize_model", "smooth_model", "smoothing_groups", "smoothing_scale", "SmoothGroup",
           "SmoothReport", "choose_alpha", "collect_smoothing_samples", "AUTO_ALPHAS"]
