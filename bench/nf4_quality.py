"""Quality of the 4-bit float formats (issue 17, docs/numerics.md s.11): NF4 and FP4 (block 64, with
and without double quantization) next to w4a16 (asymmetric uint4) g32 / g64 / g128 and fp32, on

- MiniLM (all-MiniLM-L6-v2): cosine of the sentence embeddings to fp32's (the 16
  ``quantkernels.demo.SENTENCES``, every linear layer quantized);
- Gemma-3-270M: perplexity on the first ``--max-tokens`` tokens of quantkernels/data/eval_text.txt
  (default: all of it, as ``quantkernels eval``; ``quantkernels.models.token_windows``: the same
  windows for every row), lm_head and the tied
  embedding kept in float (quantize_model's default).

Memory is ``quantkernels.memory_footprint`` (parameters + buffers) in MiB. Quality does not depend on
the machine's load; no timings are taken. Every row quantizes a fresh copy of the fp32 model with
``quantize_model(..., group_size=g, double_quant=dq)`` and runs the auto backend (the C++ kernels).
Writes a markdown report (machine, date, command) to stdout and, with ``--out``, a JSON of the numbers.

    PYTHONPATH=. python bench/nf4_quality.py --threads 1 [--models minilm,gemma3-270m] [--max-tokens N]
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import platform
import sys
from typing import Dict, List, Sequence, Tuple

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _cpu  # noqa: E402

#: (scheme, group/block size, double_quant) of every quantized row, in table order
ROWS: Tuple[Tuple[str, int, bool], ...] = (
    ("w4a16", 32, False), ("w4a16", 64, False), ("w4a16", 128, False),
    ("nf4", 64, False), ("nf4", 64, True), ("fp4", 64, False), ("fp4", 64, True))


def row_name(scheme: str, g: int, dq: bool) -> str:
    """``fp32``, ``w4a16 g64``, ``nf4 block 64``, ``nf4 block 64, double quant``."""
    if scheme == "fp32":
        return "fp32"
    name = f"{scheme} block {g}" if scheme in ("nf4", "fp4") else f"{scheme} g{g}"
    return name + (", double quant" if dq else "")


def _quantized(base, scheme: str, g: int, dq: bool):
    import quantkernels as qk

    if scheme == "fp32":
        return base
    return qk.quantize_model(copy.deepcopy(base), scheme, group_size=g, double_quant=dq)


@torch.inference_mode()
def minilm_rows(rows: Sequence[Tuple[str, int, bool]]) -> List[Dict]:
    import quantkernels as qk
    from quantkernels import demo

    tok, base = demo.load_minilm()
    batch = tok(list(demo.SENTENCES), padding=True, truncation=True, max_length=128, return_tensors="pt")
    ref = demo.embed(base, batch)
    out = []
    for scheme, g, dq in (("fp32", 0, False), *rows):
        model = _quantized(base, scheme, g, dq)
        cos = (demo.embed(model, batch) * ref).sum(-1)
        rep = getattr(model, "quantkernels_report", None)
        out.append(dict(scheme=scheme, group_size=g or None, double_quant=dq, name=row_name(scheme, g, dq),
                        memory_mib=qk.memory_footprint(model) / 2**20, cos_mean=cos.mean().item(),
                        cos_min=cos.min().item(), quantized=len(rep.quantized) if rep else 0,
                        sentences=len(demo.SENTENCES)))
        print(f"minilm {out[-1]['name']}: cosine {out[-1]['cos_mean']:.4f} / {out[-1]['cos_min']:.4f}, "
              f"{out[-1]['memory_mib']:.1f} MiB", file=sys.stderr, flush=True)
    return out


def gemma_rows(rows: Sequence[Tuple[str, int, bool]], max_tokens: int) -> List[Dict]:
    import quantkernels as qk
    from quantkernels import models

    path = models.resolve_model(models.GEMMA)
    base, tok, _ = models.load_float_model(path, torch.float32)
    windows = models.token_windows(tok, models.eval_text(), max_tokens)
    out = []
    for scheme, g, dq in (("fp32", 0, False), *rows):
        model = _quantized(base, scheme, g, dq)
        ppl, n = models.perplexity(model, windows, desc=row_name(scheme, g, dq))
        rep = getattr(model, "quantkernels_report", None)
        out.append(dict(scheme=scheme, group_size=g or None, double_quant=dq, name=row_name(scheme, g, dq),
                        memory_mib=qk.memory_footprint(model) / 2**20, ppl=ppl, tokens=n,
                        quantized=len(rep.quantized) if rep else 0))
        print(f"gemma {out[-1]['name']}: ppl {ppl:.3f} on {n} tokens, {out[-1]['memory_mib']:.1f} MiB",
              file=sys.stderr, flush=True)
        if model is not base:
            del model
    return out


def format_report(res: Dict) -> str:
    lines = [f"# NF4 / FP4 quality next to w4a16 ({res['date']})", "",
             f"- machine: {res['machine']}; torch {res['torch']}, {res['threads']} thread(s); "
             f"load average at start {res['load']}",
             f"- command: `{res['command']}`",
             "- every quantized row: `quantize_model(copy.deepcopy(fp32_model), scheme, group_size=g, "
             "double_quant=dq)`, auto backend (C++ kernels); memory = `memory_footprint` (parameters + buffers)"]
    if res.get("minilm"):
        r0 = res["minilm"]
        lines += ["", "## MiniLM (all-MiniLM-L6-v2): sentence-embedding cosine to fp32", "",
                  f"{r0[0]['sentences']} sentences (quantkernels.demo.SENTENCES), every linear layer quantized "
                  f"({r0[-1]['quantized']}), embeddings in fp32.", "",
                  "| scheme | memory MiB | cosine mean | cosine min |", "|---|---|---|---|"]
        lines += [f"| {r['name']} | {r['memory_mib']:.1f} | {r['cos_mean']:.4f} | {r['cos_min']:.4f} |" for r in r0]
    if res.get("gemma"):
        r0 = res["gemma"]
        fp = r0[0]["ppl"]
        span = "the whole text" if res["max_tokens"] is None else f"the first {res['max_tokens']} tokens"
        lines += ["", f"## Gemma-3-270M: perplexity on {span}", "",
                  f"{r0[0]['tokens']} predicted tokens of quantkernels/data/eval_text.txt, the same windows for "
                  f"every row; {r0[-1]['quantized']} linear layers quantized, lm_head and the tied embedding in "
                  f"fp32.", "",
                  "| scheme | memory MiB | perplexity | vs fp32 |", "|---|---|---|---|"]
        for r in r0:
            vs = "" if r is r0[0] else f"{(r['ppl'] / fp - 1) * 100:+.1f}%"
            lines.append(f"| {r['name']} | {r['memory_mib']:.1f} | {r['ppl']:.3f} | {vs} |")
    return "\n".join(lines)


def main(argv=None) -> Dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="minilm,gemma3-270m", help="comma-separated: minilm, gemma3-270m")
    p.add_argument("--max-tokens", type=int, default=None,
                   help="Gemma: evaluate on the first N tokens (default: the whole text, as `quantkernels eval`)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--rows", default=None,
                   help="comma-separated scheme:g[:dq] (default: w4a16 g32/64/128, nf4/fp4 block 64 +- dq)")
    p.add_argument("--out", default=None, help="also write the numbers as JSON here")
    a = p.parse_args(argv)
    names = [m.strip() for m in a.models.split(",") if m.strip()]
    bad = [m for m in names if m not in ("minilm", "gemma3-270m")]
    if bad or not names:
        p.error(f"--models: unknown model {bad[0]!r}; choose from minilm, gemma3-270m" if bad else "--models: none")
    if a.max_tokens is not None and a.max_tokens < 2:
        p.error(f"--max-tokens must be at least 2, got {a.max_tokens}")
    rows = ROWS
    if a.rows:
        rows = []
        for spec in a.rows.split(","):
            parts = spec.strip().split(":")
            if len(parts) not in (2, 3) or not parts[1].lstrip("-").isdigit() or parts[2:] not in ([], ["dq"]):
                p.error(f"--rows: expected scheme:g or scheme:g:dq, got {spec!r}")
            if parts[0] not in ("w8a8", "llm_int8", "w8a16", "w4a16", "w4a8", "nf4", "fp4"):
                p.error(f"--rows: unknown scheme {parts[0]!r} in {spec!r}")
            if parts[2:] and parts[0] not in ("nf4", "fp4"):
                p.error(f"--rows: double quantization (:dq) applies to nf4 / fp4 only, got {spec!r}")
            rows.append((parts[0], int(parts[1]), parts[2:] == ["dq"]))
    if a.threads:
        torch.set_num_threads(a.threads)
    res = dict(date=f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC",
               machine=f"{_cpu.cpu_model()}, {os.cpu_count()} logical CPUs, {platform.machine()}",
               torch=torch.__version__, threads=torch.get_num_threads(),
               load=tuple(round(x, 1) for x in os.getloadavg()),
               command="PYTHONPATH=. python bench/nf4_quality.py "
               + " ".join(argv if argv is not None else sys.argv[1:]),
               max_tokens=a.max_tokens, rows=[list(r) for r in rows])
    if "minilm" in names:
        res["minilm"] = minilm_rows(rows)
    if "gemma3-270m" in names:
        res["gemma"] = gemma_rows(rows, a.max_tokens)
    print(format_report(res))
    if a.out:
        with open(a.out, "w") as f:
            json.dump(res, f, indent=1)
    return res


if __name__ == "__main__":
    main()
