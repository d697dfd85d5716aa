"""Issue 7 on Gemma-3-270M: GPTQ vs round-to-nearest (w4a16 g128) and SmoothQuant vs plain w8a8,
perplexity with calibration data disjoint from the evaluation tokens.

Evaluation: ``--eval-tokens`` (default 1024) Gemma tokens of quantkernels/data/eval_text.txt from
``--eval-start`` (default 0) in windows of 512 (each with BOS); the default is exactly what
``quantkernels eval --max-tokens 1024`` scores. Calibration (never the evaluation tokens):
  - the rest of eval_text.txt (unless ``--no-tail``; by default tokens 1024 .. end, ~1,380
    tokens: later paragraphs of the same public-domain books, so in-domain but disjoint), and
  - ``pydoc``: ``--pydoc-tokens`` tokens of English prose from Python's own documentation
    (``calibration.offline_paragraphs``), out of domain,
cut into windows of ``--calib-window`` tokens, each with BOS. The model runs with
``logits_to_keep=1`` during calibration (the 262k-entry LM head is not needed for statistics).

Variants (``--variants``, comma-separated):
  fp32 | rtn | rtn-sym (w4a16 g128 round-to-nearest, asym / sym) |
  gptq | gptq-act | gptq-sym | gptq-sym-act (GPTQ w4a16 g128, act-order = static groups) |
  w8a8 | sq<alpha> (SmoothQuant + w8a8, e.g. sq0.5) | sqn<alpha> (smoothing only the layers read
  from a norm: q/k/v and gate/up, as the SmoothQuant reference code does) | sqauto (per-group alpha chosen on the
  calibration data, ``smoothquant.smooth_model(alpha="auto")``); a w8a8 / sq variant followed by
  ``@GLOB`` quantizes only the layers matching GLOB (``w8a8@*.self_attn.*``)

    nice -n 5 python -m bench.gemma_calibrated --threads 2 \
        --out bench/results/eval_gemma3-270m_calibrated.md
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import torch

import quantkernels as qk
from quantkernels import _native
from quantkernels import calibration as C
from quantkernels import gptq as GQ
from quantkernels import models
from quantkernels import smoothquant as S


def _windows(ids, bos, window):
    return [torch.tensor([bos] + ids[i:i + window]).unsqueeze(0) for i in range(0, len(ids), window)]


def data(tok, eval_tokens: int, pydoc_tokens: int, calib_window: int, use_tail: bool = True, eval_start: int = 0):
    ids = tok(models.eval_text(), add_special_tokens=False, verbose=False)["input_ids"]
    end = min(eval_start + eval_tokens, len(ids))
    ev, rest = ids[eval_start:end], ids[:eval_start] + ids[end:]
    cal = list(rest) if use_tail else []
    sources = [f"eval_text.txt outside the evaluation tokens ({len(rest)} tokens)"] if use_tail else []
    if pydoc_tokens:
        doc = tok(" ".join(C.offline_paragraphs()), add_special_tokens=False, verbose=False)["input_ids"]
        cal += doc[:pydoc_tokens]
        sources.append(f"{min(pydoc_tokens, len(doc))} tokens of Python documentation prose "
                       f"(calibration.offline_paragraphs)")
    bos = tok.bos_token_id
    eval_windows = _windows(ev, bos, models.WINDOW)
    calib = [dict(input_ids=w, logits_to_keep=1) for w in _windows(cal, bos, calib_window)]
    return eval_windows, calib, sources, len(ids), (eval_start, end)


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()}, {os.cpu_count()} cores"
    except OSError:
        pass
    return platform.machine()


def rtn_sym(model, group_size=128):
    """Symmetric RTN w4a16 (scale = absmax/7 stored as zero point 8): GPTQ with an identity Hessian,
    which reproduces round-to-nearest bit for bit (tests/test_gptq.py)."""
    for n, m in C.select_linears(model).items():
        K = C.linear_in_features(m)
        ql, _ = GQ.gptq_quantlinear(m, torch.eye(K, dtype=torch.float64), "w4a16", group_size=group_size,
                                    sym=True, damp=0.0)
        GQ._set_module(model, n, ql)
    return model


def build(name, base, calib, absmax, group_size):
    m = copy.deepcopy(base)
    info = ""
    name, _, only = name.partition("@")   # "w8a8@*.mlp.*": quantize only the layers matching the glob
    include = [only] if only else None
    if name == "fp32":
        return base, info
    if name == "rtn":
        qk.quantize_model(m, "w4a16", group_size=group_size)
    elif name == "rtn-sym":
        rtn_sym(m, group_size)
    elif name.startswith("gptq"):
        sym, act = "-sym" in name, "-act" in name
        GQ.gptq_quantize_model(m, calib, "w4a16", group_size=group_size, sym=sym, act_order=act, progress=False)
    elif name == "w8a8":
        qk.quantize_model(m, "w8a8", include=include)
    elif name.startswith("sq"):
        groups = "norm" if name.startswith("sqn") else "all"
        a = name[3:] if groups == "norm" else name[2:]
        alpha = "auto" if a == "auto" else float(a)
        S.smoothquant_quantize_model(m, calib, "w8a8", alpha=alpha, act_absmax=absmax, include=include,
                                     groups=groups, progress=False)
        rep = m.quantkernels_report.smoothquant
        info = f"folded {len(rep.folded)}, input_scale {len(rep.input_scale)}"
        if rep.alphas:
            vals = sorted(rep.alphas.values())
            info += f", alpha per group min/median/max {vals[0]:.2f}/{vals[len(vals) // 2]:.2f}/{vals[-1]:.2f}"
    else:
        raise SystemExit(f"unknown variant {name!r}")
    return m, info


LABELS = {"fp32": "fp32", "rtn": "w4a16 g128 RTN asym", "rtn-sym": "w4a16 g128 RTN sym",
          "gptq": "w4a16 g128 GPTQ asym", "gptq-act": "w4a16 g128 GPTQ asym act-order",
          "gptq-sym": "w4a16 g128 GPTQ sym", "gptq-sym-act": "w4a16 g128 GPTQ sym act-order",
          "w8a8": "w8a8", "sqauto": "w8a8 + SmoothQuant alpha auto (per group)"}


def label(v):
    v, _, only = v.partition("@")
    if v.startswith("sqn"):
        lab = f"w8a8 + SmoothQuant alpha {v[3:]}, norm-fed layers only (q/k/v, gate/up)"
    else:
        lab = LABELS.get(v) or f"w8a8 + SmoothQuant alpha {v[2:]}"
    return lab + (f", only {only}" if only else "")


ORDER = ["fp32", "rtn", "gptq", "gptq-act", "rtn-sym", "gptq-sym", "gptq-sym-act", "w8a8"]


def _alpha(v):
    a = v[3:] if v.startswith("sqn") else v[2:]
    return 2.0 if a == "auto" else float(a)


def _order(v):
    v, _, only = v.partition("@")
    if only:
        return (len(ORDER) + 2, only, 0.0 if v == "w8a8" else _alpha(v))
    if v in ORDER:
        return (ORDER.index(v), "", 0.0)
    return (len(ORDER) + (1 if v.startswith("sqn") else 0), "", _alpha(v))


def table(res):
    rows = sorted(res["rows"], key=lambda r: _order(r["variant"]))
    fp = next((r["ppl"] for r in rows if r["variant"] == "fp32"), None)
    ref = {"rtn": next((r["ppl"] for r in rows if r["variant"] == "rtn"), None),
           "rtn-sym": next((r["ppl"] for r in rows if r["variant"] == "rtn-sym"), None),
           "w8a8": next((r["ppl"] for r in rows if r["variant"] == "w8a8"), None)}
    out = ["| variant | perplexity | vs fp32 | share of the baseline's increase left | build s | note |",
           "|---|---|---|---|---|---|"]
    for r in rows:
        v = r["variant"]
        vs = "" if fp is None or v == "fp32" else f"{(r['ppl'] / fp - 1) * 100:+.2f}%"
        base = "rtn-sym" if v.startswith("gptq-sym") else "rtn" if v.startswith("gptq") else \
            "w8a8" if v.startswith("sq") and "@" not in v else None
        share = ""
        if base and ref[base] and fp and ref[base] != fp:
            share = f"{(r['ppl'] - fp) / (ref[base] - fp) * 100:.1f}% of {label(base)}'s"
        info = r["info"] + ("" if r.get("native", True) else " (reference kernels: no quantkernels._C in that run)")
        out.append(f"| {label(v)} | {r['ppl']:.3f} | {vs} | {share} | {r['build_s']:.0f} | {info.strip()} |")
    return "\n".join(out)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", default="fp32,rtn,gptq,gptq-act,rtn-sym,gptq-sym,gptq-sym-act,w8a8,"
                                          "sq0.5,sq0.65,sq0.8,sqauto")
    p.add_argument("--eval-tokens", type=int, default=1024)
    p.add_argument("--eval-start", type=int, default=0, help="first evaluation token (default 0)")
    p.add_argument("--pydoc-tokens", type=int, default=2700)
    p.add_argument("--no-tail", action="store_true", help="calibrate on the Python documentation prose only")
    p.add_argument("--calib-window", type=int, default=256)
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default=None, help="markdown file; a .json with the numbers is written beside it")
    p.add_argument("--render", nargs="+", default=None, metavar="JSON",
                   help="no evaluation: merge these result files (runs split over several processes) into --out")
    p.add_argument("--heldout", nargs="+", default=None, metavar="JSON",
                   help="with --render: result files of a second evaluation range (its own calibration), shown "
                        "after the first, plus the perplexity pooled over both ranges")
    a = p.parse_args(argv)
    if a.render:
        res = merge(a.render)
        text = render(res)
        if a.heldout:
            held = merge(a.heldout)
            text += "\n## Second evaluation range\n\n" + render(held, title=False) + "\n" + pooled(res, held)
        if a.out:
            Path(a.out).write_text(text)
            Path(a.out).with_suffix(".json").write_text(json.dumps(dict(res, heldout=held if a.heldout else None),
                                                                   indent=1) + "\n")
        print(text)
        return res
    if a.threads:
        torch.set_num_threads(a.threads)
    path = models.resolve_model(models.GEMMA)
    base, tok, _ = models.load_float_model(path)
    evw, calib, sources, total, (e0, e1) = data(tok, a.eval_tokens, a.pydoc_tokens, a.calib_window, not a.no_tail,
                                                a.eval_start)
    ncal = sum(b["input_ids"].numel() for b in calib)
    variants = [v.strip() for v in a.variants.split(",") if v.strip()]
    absmax = None
    if any(v.startswith("sq") for v in variants):
        t0 = time.perf_counter()
        stats = C.collect_stats(base, calib, layers=C.select_linears(base, None, ()), hessian=False, absmax=True,
                                progress=False)
        absmax = {n: s.absmax for n, s in stats.items() if s.absmax is not None}
        print(f"SmoothQuant statistics: {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    res = dict(model=models.GEMMA, date=datetime.date.today().isoformat(), machine=cpu_name(), threads=torch.get_num_threads(), torch=torch.__version__,
               eval=f"eval_text.txt tokens {e0}..{e1} of {total}, {len(evw)} windows of <= {models.WINDOW}",
               calibration=sources, calib_tokens=ncal, calib_windows=len(calib), calib_window=a.calib_window,
               command="python -m bench.gemma_calibrated " + " ".join(argv if argv is not None else sys.argv[1:]),
               native_cpu_kernels=_native.AVAILABLE, rows=[])
    for v in variants:
        t0 = time.perf_counter()
        with torch.no_grad():
            m, info = build(v, base, calib, absmax, a.group_size)
        dt = time.perf_counter() - t0
        ppl, n = models.perplexity(m, evw, desc=v)
        res["rows"].append(dict(variant=v, ppl=ppl, tokens=n, build_s=dt, info=info))
        print(f"{v}: ppl {ppl:.3f} ({n} tokens; built in {dt:.0f} s) {info}", file=sys.stderr, flush=True)
        if m is not base:
            del m
        if a.out:
            Path(a.out).with_suffix(".json").write_text(json.dumps(res, indent=1) + "\n")
    text = render(res)
    if a.out:
        Path(a.out).write_text(text)
    print(text)
    return res


def merge(files):
    parts = [json.loads(Path(f).read_text()) for f in files]
    keys = ("eval", "calibration", "calib_tokens", "calib_window")
    if any(tuple(part[k] for k in keys) != tuple(parts[0][k] for k in keys) for part in parts):
        raise SystemExit(f"--render: the runs {files} used different evaluation / calibration data")
    return dict(parts[0], rows=[dict(r, native=part["native_cpu_kernels"]) for part in parts for r in part["rows"]],
                command=[part["command"] for part in parts],
                native_cpu_kernels=sorted({part["native_cpu_kernels"] for part in parts}))


def pooled(a, b) -> str:
    """Perplexity over both evaluation ranges together (token-weighted mean NLL), for the variants
    measured on both; each range was calibrated without its own tokens."""
    pa = {r["variant"]: r for r in a["rows"]}
    pb = {r["variant"]: r for r in b["rows"]}
    rows = []
    for v in sorted(set(pa) & set(pb), key=_order):
        ra, rb = pa[v], pb[v]
        n = ra["tokens"] + rb["tokens"]
        rows.append(dict(variant=v, ppl=math.exp((ra["tokens"] * math.log(ra["ppl"]) + rb["tokens"] * math.log(rb["ppl"]))
                                                 / n), tokens=n, build_s=float("nan"), info="", native=True))
    if not rows:
        return ""
    t = table(dict(rows=rows)).replace(" build s |", "").replace("|---|---|---|---|---|---|", "|---|---|---|---|---|")
    t = "\n".join(line.replace(" nan |", "") for line in t.splitlines())
    return (f"## Both ranges pooled\n\nPerplexity over all {rows[0]['tokens']} scored tokens (mean NLL weighted by "
            f"tokens; each range with its own calibration, never containing its tokens):\n\n" + t + "\n")


def render(res, title: bool = True) -> str:
    cmds = res["command"] if isinstance(res["command"], list) else [res["command"]]
    head = (["# Gemma-3-270M: GPTQ and SmoothQuant with disjoint calibration data", ""] if title else []) + [
            f"- date {res['date']}, machine: {res['machine']}, torch {res['torch']}, {res['threads']} thread(s); "
            f"native CPU kernels: {res['native_cpu_kernels']}",
            f"- evaluation: perplexity on {res['eval']} (each window starts with BOS)",
            f"- calibration ({res['calib_tokens']} tokens incl. BOS, {res['calib_windows']} windows of <= "
            f"{res['calib_window']}): " + "; ".join(res["calibration"]) + ". No evaluation token is used.",
            "- command(s): " + "; ".join(f"`nice -n 5 {c}`" for c in cmds), ""]
    return "\n".join(head) + "\n" + table(res) + "\n"


if __name__ == "__main__":
    main()
