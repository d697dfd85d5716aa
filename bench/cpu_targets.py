"""Issue 3's CPU performance targets, evaluated from one or more quantkernels.bench.gemm sweeps.

    python -m bench.cpu_targets bench/results/gemm_cpu_2026-11-23.csv [more.csv ...]

Each CSV must come with the markdown file quantkernels.bench.gemm wrote next to it (same name, .md): its
header holds the memory read bandwidth measured in that run, which the decode targets use.
Every ratio compares two rows of the same sweep (same run, same machine state). Prints one
markdown table: a row per (target, shape, M), a column per sweep (values that miss the bound in
bold), and in how many sweeps the bound was met.
"""

from __future__ import annotations

import argparse
import csv
import re
from pathlib import Path

FBGEMM = "ao quantize_dynamic qint8"
FP32 = "F.linear fp32"
BNB = "bnb Linear8bitLt thr6"
NATIVE = {s: f"{label} (native)" for s, label in
          [("w8a8", "w8a8"), ("w4a8", "w4a8 g128"), ("w8a16", "w8a16"), ("w4a16", "w4a16 g128 asym"),
           ("llm_int8", "llm_int8 thr6")]}


def read_sweep(csv_path: Path):
    """(median ms keyed by (K, N, M, method), the run's read bandwidth in GB/s)."""
    md = csv_path.with_suffix(".md")
    if not md.is_file():
        raise FileNotFoundError(f"csv_path {csv_path}: no {md.name} next to it (quantkernels.bench.gemm writes both)")
    m = re.search(r"memory read bandwidth: ([0-9.]+) GB/s", md.read_text())
    if not m:
        raise ValueError(f"{md}: no 'memory read bandwidth: <x> GB/s' line (was the sweep run with --bandwidth-gib 0?)")
    ms = {}
    with open(csv_path, newline="") as f:
        for r in csv.DictReader(f):
            ms[(int(r["K"]), int(r["N"]), int(r["M"]), r["method"])] = float(r["median_ms"])
    return ms, float(m.group(1))


def evaluate(ms: dict, bw_gbs: float):
    """Rows (target, K x N, M, value, bound, met) for every target whose rows the sweep has."""
    out = []
    shapes = sorted({k[:2] for k in ms})

    def t(K, N, M, method):
        return ms.get((K, N, M, method))

    def add(target, K, N, M, value, bound, higher_is_better=True):
        met = value >= bound if higher_is_better else value <= bound
        out.append((target, f"{K}x{N}", M, value, bound, met))

    for K, N in shapes:
        for M in (16, 128, 512):
            ours, fb, f32 = t(K, N, M, NATIVE["w8a8"]), t(K, N, M, FBGEMM), t(K, N, M, FP32)
            if ours and fb:
                add("W8A8 speed vs fbgemm (>= 1.0x)", K, N, M, fb / ours, 1.0)
            if ours and f32:
                add("W8A8 speed vs fp32 (>= 1.5x)", K, N, M, f32 / ours, 1.5)
        for s in ("w8a8", "w8a16"):
            ours = t(K, N, 1, NATIVE[s])
            if ours:
                read_ms = N * K / (bw_gbs * 1e9) * 1e3  # the int8 weight, read once
                add(f"{s.upper()} M=1 time / int8-weight read time (<= 1.2x)", K, N, 1, ours / read_ms, 1.2, False)
        for s in ("w4a8", "w4a16"):
            ours, fb, f32 = t(K, N, 1, NATIVE[s]), t(K, N, 1, FBGEMM), t(K, N, 1, FP32)
            if ours and fb:
                add(f"{s.upper()} M=1 speed vs fbgemm (>= 1.7x)", K, N, 1, fb / ours, 1.7)
            if ours and f32:
                add(f"{s.upper()} M=1 speed vs fp32 (>= 6x)", K, N, 1, f32 / ours, 6.0)
        for M in sorted({k[2] for k in ms if k[:2] == (K, N)}):
            li, w8, bnb = t(K, N, M, NATIVE["llm_int8"]), t(K, N, M, NATIVE["w8a8"]), t(K, N, M, BNB)
            if li and w8:
                add("LLM.int8 time / W8A8 time (<= 1.25x)", K, N, M, li / w8, 1.25, False)
            if li and bnb:
                add("LLM.int8 speed vs bitsandbytes (>= 5x)", K, N, M, bnb / li, 5.0)
    return out


def combined_table(runs) -> str:
    """runs: [(name, rows)] -> one row per (target, shape, M), one column per run."""
    names = [n for n, _ in runs]
    keys, cells = [], {}
    for i, (_, rows) in enumerate(runs):
        for tg, shape, M, v, b, ok in rows:
            k = (tg, shape, M)
            if k not in cells:
                keys.append(k)
                cells[k] = [None] * len(runs)
            cells[k][i] = (v, ok)
    order = {tg: i for i, tg in enumerate(dict.fromkeys(k[0] for k in keys))}
    keys.sort(key=lambda k: (k[1], order[k[0]] if not k[0].startswith("LLM") else len(order), k[2],
                             order[k[0]]))
    head = "| target | K x N | M | " + " | ".join(names) + " | met in |"
    lines = [head, "|" + "---|" * (4 + len(names))]
    for k in keys:
        vals = cells[k]
        shown = [("-" if c is None else (f"{c[0]:.2f}" if c[1] else f"**{c[0]:.2f}**")) for c in vals]
        met = sum(1 for c in vals if c and c[1])
        have = sum(1 for c in vals if c)
        lines.append(f"| {k[0]} | {k[1]} | {k[2]} | " + " | ".join(shown) + f" | {met}/{have} |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("csv", nargs="+", type=Path, help="quantkernels.bench.gemm CSV files (each with its .md)")
    p.add_argument("--names", nargs="+", help="column names, one per CSV (default: the file names)")
    args = p.parse_args(argv)
    if args.names and len(args.names) != len(args.csv):
        p.error(f"--names: {len(args.names)} names for {len(args.csv)} CSV files")
    runs = []
    for i, path in enumerate(args.csv):
        ms, bw = read_sweep(path)
        name = args.names[i] if args.names else path.stem
        runs.append((f"{name} ({bw:.1f} GB/s)", evaluate(ms, bw)))
    if not any(rows for _, rows in runs):
        raise SystemExit("no rows for these targets in the given sweeps: run quantkernels bench --backends native")
    text = combined_table(runs)
    print(text)
    return text


if __name__ == "__main__":
    main()
