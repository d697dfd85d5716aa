"""W4A8 (int4 g128 weights, int8 dynamic per-token activations) per ISA level against fbgemm's
dynamic int8 Linear, all in one process (levels switched with QUANTKERNELS_CPU_ISA, read per call).

    PYTHONPATH=. python bench/vnni_w4a8.py [--threads 2] [--rounds 15] [--out bench/results/x.md]

Times are medians over `rounds` interleaved rounds (every candidate once per round, so machine
noise hits all alike); each sample is the mean of a short batch of calls. Activation quantization
(quantkernels.quantize_int8_rowwise) is inside the W4A8 timing; fbgemm quantizes inside its op.
Decode M = 1 is also timed with weights rotating over >= 96 MiB (they come from DRAM), next to the
read bandwidth of torch.ones(2**28).sum() measured in the same run.
"""
import argparse
import datetime
import os
import statistics
import time

import torch

try:  # python bench/<script>.py puts bench/ on sys.path; python -m bench.<script> the repo root
    from _cpu import cpu_model, rotated
except ImportError:
    from bench._cpu import cpu_model, rotated
import quantkernels  # noqa: F401
import quantkernels._ops  # noqa: F401
from quantkernels import _native, reference as R

OPS = torch.ops.quantkernels


CLOCK = time.perf_counter


def sample(fn, min_s=0.02):
    fn()
    n, t0 = 0, CLOCK()
    while True:
        fn()
        n += 1
        t = CLOCK() - t0
        if t >= min_s and n >= 1:
            return t / n


def ab(cands, rounds):
    """{name: median seconds} over interleaved rounds; cands: {name: (isa or None, fn)}."""
    times = {k: [] for k in cands}
    for r in range(rounds):
        for k, (isa, fn) in rotated(cands, r):
            if isa is not None:
                os.environ["QUANTKERNELS_CPU_ISA"] = isa
            times[k].append(sample(fn))
    os.environ.pop("QUANTKERNELS_CPU_ISA", None)
    return {k: statistics.median(v) for k, v in times.items()}


def w4a8_layer(K, N, G, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(N, K, generator=g) * 0.02
    bp, sb = R.quantize_int4_sym(w, G)
    return w, bp, sb


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--ms", default="1,16,128,512")
    ap.add_argument("--shapes", default="4096x4096,4096x11008")
    ap.add_argument("--levels", default="avx512_vnni,avx_vnni,avx2")
    ap.add_argument("--out", default=None)
    ap.add_argument("--clock", choices=["wall", "thread"], default="wall",
                    help="thread: CPU time of the calling thread (with --threads 1 only: robust on a shared machine)")
    args = ap.parse_args()
    if args.clock == "thread":
        assert args.threads == 1, "--clock thread measures the calling thread only"
        global CLOCK
        CLOCK = time.thread_time
    torch.set_num_threads(args.threads)
    torch.backends.quantized.engine = "fbgemm"
    have = set(_native.cpu_isa_levels())
    levels = [lv for lv in args.levels.split(",") if lv in have]
    lines = [f"# W4A8 per ISA level vs fbgemm dynamic qint8, {datetime.datetime.utcnow():%Y-%m-%d %H:%M} UTC",
             "", f"CPU: {cpu_model()}, {args.threads} threads, torch {torch.__version__}, levels here: "
             f"{', '.join(sorted(have))}. Medians of {args.rounds} interleaved rounds (ms, {args.clock} clock).", ""]
    hdr = "| K x N | M | " + " | ".join(f"w4a8 {lv}" for lv in levels) + " | fbgemm | " + \
        " | ".join(f"fbgemm / {lv}" for lv in levels) + " |"
    lines += [hdr, "|" + "---|" * (hdr.count("|") - 1)]
    for shape in args.shapes.split(","):
        K, N = map(int, shape.split("x"))
        w, bp, sb = w4a8_layer(K, N, 128)
        lin = torch.nn.Sequential(torch.nn.Linear(K, N, bias=False))
        lin[0].weight.data.copy_(w)
        qlin = torch.ao.quantization.quantize_dynamic(lin, {torch.nn.Linear}, dtype=torch.qint8)
        for M in map(int, args.ms.split(",")):
            x = torch.randn(M, K)

            def ours(x=x):
                xq, sx = OPS.quantize_int8_rowwise(x)
                return OPS.w4a8_gemm(xq, bp, sx, sb, None, None, None)

            cands = {lv: (lv, ours) for lv in levels}
            cands["fbgemm"] = (None, lambda x=x: qlin(x))
            with torch.no_grad():
                t = ab(cands, args.rounds)
            row = f"| {K} x {N} | {M} | " + " | ".join(f"{t[lv] * 1e3:.3f}" for lv in levels) + \
                f" | {t['fbgemm'] * 1e3:.3f} | " + " | ".join(f"{t['fbgemm'] / t[lv]:.2f}" for lv in levels) + " |"
            print(row, flush=True)
            lines.append(row)
    # Decode from DRAM: weights rotating over >= 96 MiB, and the read bandwidth of a big sum.
    lines += ["", "Decode M = 1 with weights rotating over >= 96 MiB (from DRAM):", "",
              "| K x N | matrices (MiB) | level | ms / call | weight GB/s | vs ones(2**28).sum() GB/s |", "|---|---|---|---|---|---|"]
    big = torch.ones(2 ** 28)
    for shape in args.shapes.split(","):
        K, N = map(int, shape.split("x"))
        per = N * K // 2 + N * (K // 128) * 4  # packed bytes + fp32 scales
        count = max(2, -(-96 * 2 ** 20 // per))
        mats = [w4a8_layer(K, N, 128, seed=i)[1:] for i in range(count)]
        x = torch.randn(1, K)
        xq, sx = OPS.quantize_int8_rowwise(x)
        state = {"i": 0}

        def rot():
            bpi, sbi = mats[state["i"] % count]
            state["i"] += 1
            return OPS.w4a8_gemm(xq, bpi, sx, sbi, None, None, None)

        cands = {lv: (lv, rot) for lv in levels}
        cands["sum"] = (None, lambda: big.sum())
        t = ab(cands, args.rounds)
        bw = big.numel() * 4 / t["sum"] / 1e9
        for lv in levels:
            gbs = per / t[lv] / 1e9
            row = f"| {K} x {N} | {count} ({count * per / 2**20:.0f}) | {lv} | {t[lv] * 1e3:.3f} | {gbs:.1f} | {bw:.1f} ({gbs / bw:.0%}) |"
            print(row, flush=True)
            lines.append(row)
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
