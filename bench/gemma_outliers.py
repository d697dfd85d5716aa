"""Where Gemma-3-270M's activation outliers are, and what a per-layer threshold or SmoothQuant
would change.

    python -m bench.gemma_outliers [--tokens 512] [--ppl-tokens 128] [--out bench/results]

1. Hooks every linear layer's input on the packaged text and reports, per layer, the fraction
   of input columns with some |x| >= 6 (LLM.int8()'s outlier columns) and the largest |x|.
2. Perplexity of w8a8 and llm_int8 (threshold 6) against two remedies, all with our kernels:
   - llm_int8 with a per-layer threshold: the 99th percentile of that layer's column absmax
     (so about 1% of columns go to the float path), never below 6;
   - SmoothQuant (alpha = 0.5): x' = x / s, W' = W * s with s_j = max|x_j|^a / max|W_j|^(1-a),
     calibrated on the same text (in-sample: an optimistic estimate), then w8a8.
"""

from __future__ import annotations

import argparse
import copy
import sys
from collections import defaultdict
from pathlib import Path

import torch
from torch import nn

import quantkernels as qk
from quantkernels import models


@torch.inference_mode()
def column_absmax(model, windows):
    """{linear name: per-input-column max |x| over all tokens}."""
    stats, hooks = {}, []
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear) and not name.endswith("lm_head"):
            def hook(mod, inp, _out, name=name):
                a = inp[0].detach().reshape(-1, inp[0].shape[-1]).abs().amax(0).float()
                stats[name] = torch.maximum(stats[name], a) if name in stats else a
            hooks.append(m.register_forward_hook(hook))
    for ids in windows:
        model(ids)
    for h in hooks:
        h.remove()
    return stats


class Smoothed(nn.Module):
    """SmoothQuant folded at run time: y = QuantLinear(W * s)(x / s) (the division would fold
    into the preceding norm or linear in a deployment)."""

    def __init__(self, lin: nn.Linear, xmax: torch.Tensor, alpha: float, scheme: str):
        super().__init__()
        wmax = lin.weight.detach().abs().amax(0).clamp_min(1e-5)
        s = (xmax.clamp_min(1e-5) ** alpha / wmax ** (1 - alpha)).clamp_min(1e-5)
        scaled = nn.Linear(lin.in_features, lin.out_features, bias=lin.bias is not None)
        with torch.no_grad():
            scaled.weight.copy_(lin.weight * s)
            if lin.bias is not None:
                scaled.bias.copy_(lin.bias)
        self.register_buffer("inv_s", 1.0 / s)
        self.q = qk.QuantLinear.from_linear(scaled, scheme)

    def forward(self, x):
        return self.q(x * self.inv_s.to(x.dtype))


def replace(model, fn):
    for name, m in list(model.named_modules()):
        if isinstance(m, nn.Linear) and not name.endswith("lm_head"):
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, fn(name, m))
    return model


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=512, help="tokens for the outlier statistics")
    p.add_argument("--ppl-tokens", type=int, default=128, help="tokens for the perplexity comparison")
    p.add_argument("--threshold", type=float, default=6.0)
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    a = p.parse_args(argv)
    base, tok, _ = models.load_float_model(models.resolve_model(models.GEMMA))
    windows = models.token_windows(tok, models.eval_text(), a.tokens)
    stats = column_absmax(base, windows)
    thr = a.threshold
    frac = {n: (v >= thr).float().mean().item() for n, v in stats.items()}
    lines = [f"# Gemma-3-270M activation outliers ({a.tokens} tokens of quantkernels/data/eval_text.txt)", "",
             f"Fraction of each linear layer's input columns with some |x| >= {thr:g} (LLM.int8()'s outlier "
             f"columns), mean over layers: {100 * sum(frac.values()) / len(frac):.1f}%.", "",
             "| layer (input shared by) | mean outlier columns | min / max over the 18 blocks | max abs x | "
             "p99 column absmax (median over blocks) |", "|---|---|---|---|---|"]
    by_kind = defaultdict(list)
    for n, f in frac.items():
        by_kind[n.rsplit(".", 1)[-1]].append((n, f))
    shared = {"q_proj": "q/k/v_proj", "gate_proj": "gate/up_proj", "o_proj": "o_proj", "down_proj": "down_proj"}
    for kind, label in shared.items():
        items = by_kind.get(kind, [])
        if not items:
            continue
        fs = [f for _, f in items]
        mx = max(stats[n].max().item() for n, _ in items)
        p99 = sorted(torch.quantile(stats[n], 0.99).item() for n, _ in items)[len(items) // 2]
        lines.append(f"| {label} | {100 * sum(fs) / len(fs):.1f}% | {100 * min(fs):.0f}% / {100 * max(fs):.0f}% "
                     f"| {mx:.0f} | {p99:.1f} |")
    lines += ["", "Per block (percent of input columns that are outliers):", "",
              "| block | q/k/v | o | gate/up | down |", "|---|---|---|---|---|"]
    nblocks = len(by_kind.get("q_proj", []))
    for i in range(nblocks):
        cells = [f"{100 * frac.get(f'model.layers.{i}.{k}', float('nan')):.0f}%"
                 for k in ("self_attn.q_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.down_proj")]
        lines.append(f"| {i} | {' | '.join(cells)} |")

    rows = []
    variants = [("w8a8", lambda n, m: qk.QuantLinear.from_linear(m, "w8a8")),
                (f"llm_int8 threshold {thr:g}", lambda n, m: qk.QuantLinear.from_linear(m, "llm_int8", threshold=thr)),
                ("llm_int8 per-layer threshold max(6, p99 column absmax)",
                 lambda n, m: qk.QuantLinear.from_linear(
                     m, "llm_int8", threshold=max(thr, torch.quantile(stats[n], 0.99).item()))),
                ("SmoothQuant a=0.5 + w8a8", lambda n, m: Smoothed(m, stats[n], 0.5, "w8a8")),
                ("SmoothQuant a=0.5 + llm_int8 6", lambda n, m: Smoothed(m, stats[n], 0.5, "llm_int8"))]
    windows = models.token_windows(tok, models.eval_text(), a.ppl_tokens)
    fp32, _ = models.perplexity(base, windows, desc="fp32")
    for label, fn in variants:
        m = replace(copy.deepcopy(base), fn)
        ppl, _ = models.perplexity(m, windows, desc=label)
        extra = ""
        if label.startswith("SmoothQuant"):
            inner = [(v >= thr).float().mean().item() for v in column_absmax_inner(m, windows).values()]
            extra = f"outlier columns after smoothing: {100 * sum(inner) / len(inner):.1f}%"
        elif "per-layer" in label:
            fr = [(stats[n] >= max(thr, torch.quantile(stats[n], 0.99).item())).float().mean().item() for n in stats]
            extra = f"outlier columns: {100 * sum(fr) / len(fr):.1f}%"
        elif label.startswith("llm_int8"):
            extra = f"outlier columns: {100 * sum(frac.values()) / len(frac):.1f}%"
        rows.append((label, ppl, extra))
        print(f"{label}: {ppl:.3f} {extra}", file=sys.stderr)
        del m
    lines += ["", f"Perplexity on the first {a.ppl_tokens} of those tokens (fp32 {fp32:.3f}); the statistics "
              f"that set the per-layer thresholds and the SmoothQuant scales come from all {a.tokens} "
              f"(in-sample calibration: optimistic):", "",
              "| variant | perplexity | vs fp32 | note |", "|---|---|---|---|"]
    for label, ppl, extra in rows:
        lines.append(f"| {label} | {ppl:.3f} | {(ppl / fp32 - 1) * 100:+.1f}% | {extra} |")
    md = "\n".join(lines) + "\n"
    print(md)
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "gemma_outliers.md").write_text(md)


@torch.inference_mode()
def column_absmax_inner(model, windows):
    """Per-column max |x| of the inputs the QuantLinear layers see (after any smoothing)."""
    stats, hooks = {}, []
    for name, m in model.named_modules():
        if isinstance(m, qk.QuantLinear):
            def hook(mod, inp, _out, name=name):
                a = inp[0].detach().reshape(-1, inp[0].shape[-1]).abs().amax(0).float()
                stats[name] = torch.maximum(stats[name], a) if name in stats else a
            hooks.append(m.register_forward_hook(hook))
    for ids in windows:
        model(ids)
    for h in hooks:
        h.remove()
    return stats


if __name__ == "__main__":
    main()
