"""RTN vs GPTQ (w4a16 g128) and W8A8 vs W8A8 + SmoothQuant on all-MiniLM-L6-v2 (offline).

Quality metric: cosine similarity of each sentence embedding (mean pooling + L2 norm) to the
fp32 model's, over two evaluation sets never used for calibration: the 16 demo sentences and
128 held-out paragraphs of the offline corpus. Calibration: 256 other paragraphs
(``quantkernels.calibration.offline_paragraphs``), batches of 16, max 128 tokens.

    python -m bench.calibration_minilm [--out bench/results] [--calib 256] [--alphas 0.5,0.8]
"""

from __future__ import annotations

import argparse
import copy
import datetime
import platform
import time
from pathlib import Path

import torch

import quantkernels as qk
from quantkernels.calibration import offline_paragraphs
from quantkernels.demo import SENTENCES, embed, load_minilm


def batches(tok, texts, bs=16):
    return [tok(texts[i:i + bs], padding=True, truncation=True, max_length=128, return_tensors="pt")
            for i in range(0, len(texts), bs)]


def cosines(model, evals, refs):
    out = []
    for bs, ref in zip(evals, refs):
        emb = torch.cat([embed(model, b) for b in bs])
        c = (emb * ref).sum(-1)
        out.append((c.mean().item(), c.min().item()))
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="bench/results")
    p.add_argument("--calib", type=int, default=256, help="calibration paragraphs")
    p.add_argument("--alphas", default="0.5,0.8", help="SmoothQuant migration strengths")
    p.add_argument("--parts", default="w4a16,w4a8,w8a8", help="which row groups to run (comma-separated)")
    a = p.parse_args(argv)
    tok, base = load_minilm()
    paras = offline_paragraphs()
    calib = batches(tok, paras[:a.calib])
    evals = [batches(tok, SENTENCES), batches(tok, paras[-128:])]
    refs = [torch.cat([embed(base, b) for b in bs]) for bs in evals]
    rows = [("fp32", "-", 0.0, cosines(base, evals, refs))]

    def add(name, how, fn):
        t0 = time.perf_counter()
        with torch.no_grad():
            m = fn(copy.deepcopy(base))
        dt = time.perf_counter() - t0
        rows.append((name, how, dt, cosines(m, evals, refs)))
        print(rows[-1], flush=True)

    parts = set(a.parts.split(","))
    if "w4a16" in parts:
        w4a16_rows(add, calib)
    if "w4a8" in parts:
        add("w4a8 g128", "RTN", lambda m: qk.quantize_model(m, "w4a8", group_size=128))
        add("w4a8 g128", "GPTQ", lambda m: qk.gptq_quantize_model(m, calib, "w4a8", group_size=128, sym=True,
                                                                  progress=False))
    if "w8a8" in parts:
        w8a8_rows(add, calib, [float(x) for x in a.alphas.split(",") if x])
    return report(a, rows)


def w4a16_rows(add, calib):
    add("w4a16 g128 asym", "RTN", lambda m: qk.quantize_model(m, "w4a16", group_size=128))
    add("w4a16 g128 asym", "GPTQ", lambda m: qk.gptq_quantize_model(m, calib, "w4a16", group_size=128, progress=False))
    add("w4a16 g128 asym", "GPTQ act-order (static groups)",
        lambda m: qk.gptq_quantize_model(m, calib, "w4a16", group_size=128, act_order=True, progress=False))
    add("w4a16 g128 sym (zero 8)", "GPTQ",
        lambda m: qk.gptq_quantize_model(m, calib, "w4a16", group_size=128, sym=True, progress=False))


def w8a8_rows(add, calib, alphas):
    add("w8a8", "RTN", lambda m: qk.quantize_model(m, "w8a8"))
    for al in alphas:
        add("w8a8", f"SmoothQuant alpha={al}",
            lambda m, al=al: qk.smoothquant_quantize_model(m, calib, "w8a8", alpha=al, progress=False))
        add("w8a8", f"SmoothQuant alpha={al}, no folding (input_scale only)",
            lambda m, al=al: qk.smoothquant_quantize_model(m, calib, "w8a8", alpha=al, fold=False, progress=False))
    add("w8a8", "GPTQ weights", lambda m: qk.gptq_quantize_model(m, calib, "w8a8", progress=False))
    add("llm_int8", "RTN (reference point)", lambda m: qk.quantize_model(m, "llm_int8"))


def report(a, rows):
    fp_err = {}
    lines = [
        "# Calibration on all-MiniLM-L6-v2: RTN vs GPTQ, W8A8 vs W8A8 + SmoothQuant",
        "",
        f"{datetime.date.today().isoformat()}; {platform.processor() or platform.machine()}, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, quantkernels backend auto "
        f"(reference for ops without a native kernel). Produced by `python -m bench.calibration_minilm`.",
        "",
        f"Calibration: {a.calib} paragraphs of the offline corpus (`calibration.offline_paragraphs()`: prose "
        "of the Python language reference), 16 per batch, <= 128 tokens, padding masked out. Evaluation: "
        "cosine of each sentence embedding to fp32 on (A) the 16 demo sentences (everyday English, a "
        "different domain) and (B) 128 held-out paragraphs of the corpus. `1 - cos` is the error; "
        "'recovered' is the share of the RTN error that the method removes, on the mean.",
        "",
        "| weights / activations | method | time s | A: cos mean | A: cos min | B: cos mean | B: cos min "
        "| A: recovered | B: recovered |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, how, dt, (ca, cb) in rows:
        if how == "RTN":
            fp_err[name] = (1 - ca[0], 1 - cb[0])
        rtn = fp_err.get(name)
        rec = ("-", "-")
        if rtn and how != "RTN":
            rec = tuple(f"{100 * (1 - (1 - c[0]) / r):.0f}%" for c, r in zip((ca, cb), rtn))
        lines.append(f"| {name} | {how} | {dt:.1f} | {ca[0]:.5f} | {ca[1]:.5f} | {cb[0]:.5f} | {cb[1]:.5f} "
                     f"| {rec[0]} | {rec[1]} |")
    text = "\n".join(lines) + "\n"
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "calibration_minilm.md").write_text(text)
    print(text)
    return rows


if __name__ == "__main__":
    main()
