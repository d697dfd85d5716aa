"""Calibration: run a model over calibration batches and collect per-layer input statistics.

Two statistics, both of a linear layer's *input* ``X`` (flattened to ``[tokens, K]``):
  - ``xtx``: ``sum X^T X`` (``[K, K]``), the GPTQ Hessian up to a factor: each batch's product in
    float32, the sum over batches in float64;
  - ``absmax``: ``max |X[:, k]|`` per input channel (``[K]``), SmoothQuant's activation statistic.

A *batch* is whatever the model takes: a mapping of keyword arguments (a tokenizer's output),
a tuple of positional arguments, or a single tensor. Padding tokens are included unless the
batch dict holds an ``attention_mask`` and ``mask_padding=True`` (the default): then only the
rows of unmasked tokens count, for layers whose input keeps the ``[batch, seq, K]`` shape.

Memory: ``collect_stats`` holds the statistics of every layer it watches at once (fine for the
absmax vector; ``K^2`` float64 per layer for the Hessian). ``BlockwiseRunner`` instead walks the
model's repeated blocks (transformer layers) one at a time, so that only one block's Hessians
exist at any moment, and replays each block on the outputs of the already processed
(e.g. quantized) blocks before it -- the sequential scheme of the GPTQ paper.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

from collections.abc import Mapping

import torch
from torch import Tensor, nn

Batch = Any


@dataclass
class LayerStats:
    """Input statistics of one linear layer. ``n`` counts the token rows seen."""

    in_features: int
    n: int = 0
    xtx: Optional[Tensor] = None      # float64 [K, K]: sum over batches of (X^T X in float32)
    absmax: Optional[Tensor] = None   # float32 [K]: max_t |x_t|

    def hessian(self) -> Tensor:
        """``X^T X / n`` in float64 (the GPTQ paper's ``2 X X^T`` without the constant factor)."""
        if self.xtx is None:
            raise ValueError("quantkernels.calibration: no Hessian was collected for this layer")
        return self.xtx / max(self.n, 1)

    def update(self, x: Tensor, hessian: bool, absmax: bool, xtx: Optional[Tensor] = None) -> None:
        """Adds the rows of ``x`` [..., K]; ``xtx``: their ``X^T X`` if already computed."""
        x = x.detach().reshape(-1, self.in_features)
        if x.shape[0] == 0:
            return
        if hessian:
            upd = batch_xtx(x) if xtx is None else xtx
            self.xtx = upd.clone() if self.xtx is None else self.xtx.add_(upd)
        if absmax:
            m = x.abs().amax(dim=0).float()
            self.absmax = m if self.absmax is None else torch.maximum(self.absmax, m)
        self.n += x.shape[0]


def batch_xtx(x: Tensor) -> Tensor:
    """``X^T X`` of one batch [T, K]: the product in float32 (float64 inputs stay float64), returned in
    float64 for the accumulation over batches, whose sum is where rounding would pile up."""
    xf = x.to(torch.float64 if x.dtype == torch.float64 else torch.float32)
    return (xf.t() @ xf).to(torch.float64)


def is_linear(m: nn.Module) -> bool:
    """nn.Linear or a Hugging Face GPT-2 ``Conv1D`` (weight ``[in, out]``)."""
    from .nn import _is_hf_conv1d

    return isinstance(m, nn.Linear) or _is_hf_conv1d(m)


def linear_in_features(m: nn.Module) -> int:
    return m.in_features if isinstance(m, nn.Linear) else m.weight.shape[0]


def linear_weight(m: nn.Module) -> Tensor:
    """The weight in the ``F.linear`` convention ``[N, K]`` (a view for Conv1D)."""
    return m.weight if isinstance(m, nn.Linear) else m.weight.t()


def call_model(model: nn.Module, batch: Batch):
    if isinstance(batch, Mapping):  # a dict or a tokenizer's BatchEncoding
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    return model(batch)


def _token_mask(batch: Batch) -> Optional[Tensor]:
    if isinstance(batch, Mapping) and isinstance(batch.get("attention_mask"), Tensor):
        m = batch["attention_mask"]
        if m.dim() == 2:
            return m.bool()
    return None


def _progress(it, total: Optional[int], desc: str, enabled: bool):
    if not enabled:
        return it
    from tqdm.auto import tqdm

    return tqdm(it, total=total, desc=desc, leave=False)


class _Watcher:
    """Forward hooks that feed a layer's input into its LayerStats."""

    def __init__(self, modules: Dict[str, nn.Module], hessian: bool, absmax: bool):
        self.modules = modules
        self.hessian, self.absmax = hessian, absmax
        self.stats = {n: LayerStats(linear_in_features(m)) for n, m in modules.items()}
        self.mask: Optional[Tensor] = None  # [batch, seq] bool of the current batch, if known
        self._handles = []
        self._last = (None, None)  # (input tensor, its X^T X): q, k, v read one tensor, compute once

    def _hook(self, name):
        def hook(mod, args, kwargs):
            x_in = args[0] if args else next(iter(kwargs.values()))
            x = x_in
            if self.mask is not None and x.dim() == 3 and tuple(x.shape[:2]) == tuple(self.mask.shape):
                x = x[self.mask.to(x.device)]
            xtx = None
            if self.hessian:
                if self._last[0] is x_in:
                    xtx = self._last[1]
                else:
                    xtx = batch_xtx(x.detach().reshape(-1, x.shape[-1]))
                    self._last = (x_in, xtx)
            self.stats[name].update(x, self.hessian, self.absmax, xtx)
        return hook

    def __enter__(self):
        for n, m in self.modules.items():
            self._handles.append(m.register_forward_pre_hook(self._hook(n), with_kwargs=True))
        return self

    def __exit__(self, *exc):
        self._last = (None, None)
        for h in self._handles:
            h.remove()
        self._handles.clear()


def select_linears(model: nn.Module, include=None, exclude=("lm_head",)) -> Dict[str, nn.Module]:
    """name -> linear layer, filtered by ``quantize_model``'s include/exclude glob rules."""
    from .convert import _match, _patterns

    inc, exc = _patterns(include, "include"), _patterns(exclude, "exclude") or ()
    out = {}
    for n, m in model.named_modules():
        if not is_linear(m) or n == "":
            continue
        if inc is not None and _match(n, inc) is None:
            continue
        if _match(n, exc) is not None:
            continue
        out[n] = m
    return out


@torch.no_grad()
def collect_stats(model: nn.Module, batches: Iterable[Batch], *, layers: Optional[Dict[str, nn.Module]] = None,
                  hessian: bool = True, absmax: bool = True, mask_padding: bool = True,
                  progress: bool = True, desc: str = "calibration") -> Dict[str, LayerStats]:
    """One pass of ``model`` over ``batches``; returns name -> LayerStats for ``layers``
    (default: every linear layer except ``lm_head``). All layers' statistics live at once."""
    layers = select_linears(model) if layers is None else layers
    batches = list(batches)
    with _Watcher(layers, hessian, absmax) as w:
        for b in _progress(batches, len(batches), desc, progress):
            w.mask = _token_mask(b) if mask_padding else None
            call_model(model, b)
    return w.stats


# --------------------------------------------------------------------------- block-wise


def find_blocks(model: nn.Module) -> Tuple[str, nn.ModuleList]:
    """The model's repeated blocks: the longest ``nn.ModuleList`` whose members share one class
    and contain linear layers (``encoder.layer`` in BERT, ``model.layers`` in Llama/Gemma,
    ``transformer.h`` in GPT-2). Raises ValueError when there is none."""
    best = None
    for n, m in model.named_modules():
        if isinstance(m, nn.ModuleList) and len(m) > 0 and len({type(b) for b in m}) == 1:
            if any(is_linear(x) for x in m[0].modules()):
                if best is None or len(m) > len(best[1]):
                    best = (n, m)
    if best is None:
        raise ValueError("quantkernels.calibration: found no nn.ModuleList of repeated blocks in the model")
    return best


class _Stop(Exception):
    pass


_CACHE_KWARGS = ("past_key_value", "past_key_values", "layer_past", "cache")


def _is_kv_cache(value) -> bool:
    """A transformers KV cache object (``Cache`` and its subclasses: DynamicCache, StaticCache, ...),
    recognised by class, so transformers is never imported here."""
    return any(c.__name__ == "Cache" and c.__module__.startswith("transformers") for c in type(value).__mro__)


def _clean_kwargs(kwargs: dict) -> dict:
    # A KV cache would grow each time a block is replayed: replay without one. transformers
    # renamed the block argument over time (past_key_value(s), then `cache` in 5.24), so any
    # argument holding a Cache object is dropped too, whatever its name.
    kw = dict(kwargs)
    for key, value in kwargs.items():
        if key in _CACHE_KWARGS or _is_kv_cache(value):
            kw[key] = None
    if "use_cache" in kw:
        kw["use_cache"] = False
    return kw


def _block_output(out) -> Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


class BlockwiseRunner:
    """Walks a model's blocks one at a time over cached calibration inputs.

    ``__init__`` runs the model once over ``batches`` and records, for every batch, the
    hidden states entering block 0 and the other arguments of every block (attention masks,
    position embeddings; each block keeps its own, as Gemma-3 alternates sliding-window and
    global masks). Iterating yields ``(index, prefix, block)``; the caller collects statistics
    with ``stats(block, ...)``, may modify the block (quantize it), then calls ``advance()``,
    which replays the block on every batch to get the next block's inputs.
    Memory: one ``[tokens, hidden]`` activation per batch plus the statistics of one block.
    """

    def __init__(self, model: nn.Module, batches: Iterable[Batch], blocks: Optional[str] = None,
                 mask_padding: bool = True, progress: bool = True):
        self.model = model
        if blocks is None:
            self.prefix, self.blocks = find_blocks(model)
        else:
            self.prefix, self.blocks = blocks, model.get_submodule(blocks)
        self.progress = progress
        batches = list(batches)
        self.masks = [_token_mask(b) if mask_padding else None for b in batches]
        nb = len(self.blocks)
        self.hidden: List[Tensor] = []
        self.args: List[List[Tuple[tuple, dict]]] = [[] for _ in range(nb)]  # [block][batch]
        handles = []

        def pre(i):
            def hook(mod, args, kwargs):
                kwargs = dict(kwargs)
                if args:
                    h, args = args[0], tuple(args[1:])
                else:
                    h = kwargs.pop("hidden_states")
                if i == 0:
                    self.hidden.append(h.detach())
                self.args[i].append((args, _clean_kwargs(kwargs)))
                if i == nb - 1:
                    raise _Stop
            return hook

        for i, b in enumerate(self.blocks):
            handles.append(b.register_forward_pre_hook(pre(i), with_kwargs=True))
        try:
            with torch.no_grad():
                for b in _progress(batches, len(batches), "calibration inputs", progress):
                    try:
                        call_model(model, b)
                    except _Stop:
                        pass
        finally:
            for h in handles:
                h.remove()
        if len(self.hidden) != len(batches) or any(len(a) != len(batches) for a in self.args):
            raise RuntimeError("quantkernels.calibration: the blocks were not each called once per batch; "
                               "pass blocks= explicitly or use collect_stats")
        self.index = 0

    def __len__(self):
        return len(self.blocks)

    def _run_block(self, i: int, j: int) -> Tensor:
        args, kwargs = self.args[i][j]
        return _block_output(self.blocks[i](self.hidden[j], *args, **kwargs))

    @torch.no_grad()
    def stats(self, layers: Dict[str, nn.Module], hessian: bool = True, absmax: bool = True) -> Dict[str, LayerStats]:
        """Statistics of ``layers`` (modules inside the current block) over all batches."""
        i = self.index
        with _Watcher(layers, hessian, absmax) as w:
            for j in range(len(self.hidden)):
                w.mask = self.masks[j]
                self._run_block(i, j)
        return w.stats

    @torch.no_grad()
    def advance(self) -> None:
        """Replays the current block (as it is now) to produce the next block's inputs."""
        i = self.index
        self.hidden = [self._run_block(i, j).detach() for j in range(len(self.hidden))]
        self.args[i] = []  # this block's arguments are no longer needed
        self.index += 1

    def __iter__(self) -> Iterator[Tuple[int, str, nn.Module]]:
        it = range(self.index, len(self.blocks))
        for i in _progress(it, len(it), "blocks", self.progress):
            assert i == self.index, "call advance() once per block"
            yield i, f"{self.prefix}.{i}" if self.prefix else str(i), self.blocks[i]


def sequential_stats(model: nn.Module, batches: Sequence[Batch], layers: Dict[str, nn.Module],
                     on_block: Callable[[Dict[str, LayerStats], Dict[str, nn.Module]], None], *,
                     hessian: bool = True, absmax: bool = False, blocks: Optional[str] = "auto",
                     mask_padding: bool = True, progress: bool = True) -> None:
    """Calls ``on_block(stats, layers_of_block)`` block by block (``BlockwiseRunner``), then once for
    the ``layers`` outside every block (e.g. a pooler) with statistics from a full pass of the
    model as the earlier callbacks left it. ``blocks=None`` skips the block walk (one full pass
    for all layers, every statistic in memory at once); ``"auto"`` finds the blocks
    (``find_blocks``) and falls back to one pass when there are none."""
    remaining = dict(layers)
    runner = None
    if blocks is not None:
        try:
            runner = BlockwiseRunner(model, batches, None if blocks == "auto" else blocks,
                                     mask_padding=mask_padding, progress=progress)
        except ValueError:
            if blocks != "auto":
                raise
    if runner is not None:
        for _, prefix, block in runner:
            mine = {n: m for n, m in remaining.items() if n.startswith(prefix + ".")}
            if mine:
                on_block(runner.stats(mine, hessian, absmax), mine)
                for n in mine:
                    remaining.pop(n)
            runner.advance()
        del runner
    if remaining:
        on_block(collect_stats(model, batches, layers=remaining, hessian=hessian, absmax=absmax,
                               mask_padding=mask_padding, progress=progress, desc="calibration (rest)"),
                 remaining)


# --------------------------------------------------------------------------- offline text


def offline_paragraphs(min_words: int = 12, max_words: int = 60) -> List[str]:
    """English prose that every Python install carries (the language reference in
    ``pydoc_data.topics``), split into paragraphs with code and headings removed, in a fixed
    order. A calibration / evaluation corpus for machines without a network; real calibration
    should use text from the model's own domain."""
    import re

    from pydoc_data.topics import topics

    out = []
    for key in sorted(topics):
        for para in re.split(r"\n\s*\n", topics[key]):
            lines = [ln.strip() for ln in para.splitlines()]
            if not lines or any(ln.startswith((">>>", "...", "*", "=", "-", "+", "|")) for ln in lines):
                continue
            if para.startswith((" ", "\t")):  # indented: code, grammar or a table
                continue
            text = " ".join(lines)
            words = text.split()
            if len(words) < min_words or not text[0].isupper() or "::=" in text:
                continue
            out.append(" ".join(words[:max_words]))
    return out
