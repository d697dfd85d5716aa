"""Issue 14: the int8 CPU kernels (VNNI paths) against fbgemm and bf16 F.linear, in one process.

    PYTHONPATH=. python bench/vnni_int8.py [--threads 2] [--reps 15] [--shapes 4096x4096,4096x11008]
        [--ms 1,16,128,512] [--out bench/results/vnni_int8_<date>.md]

Methods per (K x N, M), all with fp32 activations x [M, K] unless noted, medians of --reps calls
(interleaved: every rep runs every method once, so machine noise hits all of them alike; each rep
in its own order, so no method always runs right after bf16 has evicted the L3):
  w8a8        quantize_int8_rowwise(x) + w8a8_gemm(q, Wq, sx, sw, None, fp32)   (QuantLinear's path)
  w8a8[avx2]  the same with QUANTKERNELS_CPU_ISA=avx2 (the pre-VNNI kernels)
  llm_int8    llm_int8_linear(x, Wq, sw, None, 6.0), x with 20 outlier columns (|x| = 8) of K
  fbgemm      torch.ao.quantization.quantize_dynamic(nn.Linear, qint8)
  bf16        F.linear(x.bfloat16(), W.bfloat16())
Decode (M = 1): w8a8 rotates over distinct weight matrices of >= 96 MiB in all (they come from
DRAM); weight bytes / time against the read bandwidth of torch.ones(2**28).sum(), timed in the same
interleaved rounds.
Only torch and quantkernels' ops are used. --clock cpu times process CPU time (summed over
threads): on a shared machine with more runnable threads than cores, wall time mostly measures
the scheduler (a 2-thread call waits for its slower thread's next time slice).
"""
import argparse
import datetime
import statistics
import time

import torch
import torch.nn.functional as F

try:  # python bench/<script>.py puts bench/ on sys.path; python -m bench.<script> the repo root
    from _cpu import cpu_model, rotated, with_isa
except ImportError:
    from bench._cpu import cpu_model, rotated, with_isa
import quantkernels  # noqa: F401  (registers the ops)

OPS = torch.ops.quantkernels


CLOCK = time.perf_counter


def bench(methods, reps, warmup=2):
    """methods: {name: fn}; interleaved reps; returns {name: median ms} on CLOCK."""
    times = {k: [] for k in methods}
    for _ in range(warmup):
        for fn in methods.values():
            fn()
    for r in range(reps):
        for k, fn in rotated(methods, r):  # a new order each round: no method always runs cold
            t0 = CLOCK()
            fn()
            times[k].append((CLOCK() - t0) * 1e3)
    return {k: statistics.median(v) for k, v in times.items()}


def read_bandwidth(reps=7):
    x = torch.ones(2 ** 28)
    x.sum()
    ts = []
    for _ in range(reps):
        t0 = CLOCK()
        x.sum()
        ts.append(CLOCK() - t0)
    return x.numel() * 4 / statistics.median(ts) / 1e9


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--reps", type=int, default=15)
    p.add_argument("--shapes", default="4096x4096,4096x11008")
    p.add_argument("--ms", default="1,16,128,512")
    p.add_argument("--no-avx2", action="store_true", help="skip the QUANTKERNELS_CPU_ISA=avx2 column")
    p.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                   help="wall: perf_counter; cpu: process CPU time summed over threads (for a shared, "
                        "oversubscribed machine where wall time mostly measures the scheduler)")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    global CLOCK
    CLOCK = time.perf_counter if args.clock == "wall" else time.process_time
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    lines = ["# int8 CPU kernels vs fbgemm / bf16 (issue 14)", "",
             f"{datetime.datetime.utcnow():%Y-%m-%d %H:%M} UTC, CPU: {cpu_model()}, torch {torch.__version__}, "
             f"threads {args.threads}, clock {args.clock}, medians of {args.reps} interleaved reps, "
             f"active ISA: {quantkernels._native.cpu_isa()}", ""]
    bw = read_bandwidth()
    lines += [f"memory read bandwidth (torch.ones(2**28).sum(), at the start): {bw:.1f} GB/s", ""]
    hdr = "| K x N | M | w8a8 ms | w8a8[avx2] ms | llm_int8 ms | fbgemm ms | bf16 ms | fbgemm / w8a8 | bf16 / w8a8 | llm_int8 / w8a8 | avx2 / w8a8 |"
    lines += [hdr, "|" + "---|" * hdr.count("|")[:-1] if False else "|---|---|---|---|---|---|---|---|---|---|---|"]
    for shp in args.shapes.split(","):
        K, N = (int(v) for v in shp.split("x"))
        w = torch.randn(N, K) * 0.02
        wq, sw = OPS.quantize_int8_rowwise(w)
        lin = torch.nn.Linear(K, N, bias=False)
        with torch.no_grad():
            lin.weight.copy_(w)
        qlin = torch.ao.quantization.quantize_dynamic(torch.nn.Sequential(lin), {torch.nn.Linear}, dtype=torch.qint8)
        wbf = w.bfloat16()
        for M in (int(v) for v in args.ms.split(",")):
            x = torch.randn(M, K)
            xo = x.clone()
            cols = torch.randperm(K)[:20]
            xo[:, cols] = 8.0  # 20 outlier columns (threshold 6)
            xbf = x.bfloat16()

            def w8a8():
                q, sx = OPS.quantize_int8_rowwise(x)
                return OPS.w8a8_gemm(q, wq, sx, sw, None, torch.float32)

            methods = {"w8a8": with_isa(None, w8a8)}
            if not args.no_avx2:
                methods["w8a8_avx2"] = with_isa("avx2", w8a8)
            methods["llm_int8"] = with_isa(None, lambda: OPS.llm_int8_linear(xo, wq, sw, None, 6.0))
            methods["fbgemm"] = lambda: qlin(x)
            methods["bf16"] = lambda: F.linear(xbf, wbf)
            r = bench(methods, args.reps)
            a2 = r.get("w8a8_avx2", float("nan"))
            lines.append(f"| {K}x{N} | {M} | {r['w8a8']:.3f} | {a2:.3f} | {r['llm_int8']:.3f} | {r['fbgemm']:.3f} | "
                         f"{r['bf16']:.3f} | {r['fbgemm'] / r['w8a8']:.2f} | {r['bf16'] / r['w8a8']:.2f} | "
                         f"{r['llm_int8'] / r['w8a8']:.2f} | {a2 / r['w8a8']:.2f} |")
            print(lines[-1], flush=True)
    # Decode from DRAM: distinct weights, >= 96 MiB in all, rotated.
    # The read probe is timed interleaved with the decode calls (this host's bandwidth moves by 1.5x
    # within minutes: a probe taken once at the start gave 57-164% "of read bandwidth").
    lines += ["", "Decode, M = 1, weights rotating over >= 96 MiB (from DRAM); read bandwidth = "
              "torch.ones(2**28).sum() timed in the same interleaved rounds:", "",
              "| K x N | matrices | MiB | w8a8 ms/call | w8a8[avx2] ms/call | GB/s | GB/s [avx2] | read GB/s | of read bandwidth | [avx2] |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    big = torch.ones(2 ** 28)
    for shp in args.shapes.split(","):
        K, N = (int(v) for v in shp.split("x"))
        nmat = max(2, -(-96 * 2 ** 20 // (K * N)))
        ws = [torch.randint(-127, 128, (N, K), dtype=torch.int8) for _ in range(nmat)]
        sw = torch.rand(N) * 0.01
        x = torch.randn(1, K)

        def rot():
            for wq in ws:
                q, sx = OPS.quantize_int8_rowwise(x)
                OPS.w8a8_gemm(q, wq, sx, sw, None, torch.float32)

        methods = {"w8a8": with_isa(None, rot)}
        if not args.no_avx2:
            methods["w8a8_avx2"] = with_isa("avx2", rot)
        methods["sum"] = lambda: big.sum()
        r = bench(methods, max(5, args.reps // 2))
        bw = big.numel() * 4 / (r.pop("sum") * 1e-3) / 1e9
        per = {k: v / nmat for k, v in r.items()}
        gbs = {k: K * N / (v * 1e-3) / 1e9 for k, v in per.items()}
        a2 = per.get("w8a8_avx2", float("nan"))
        g2 = gbs.get("w8a8_avx2", float("nan"))
        lines.append(f"| {K}x{N} | {nmat} | {nmat * K * N / 2**20:.0f} | {per['w8a8']:.3f} | {a2:.3f} | "
                     f"{gbs['w8a8']:.1f} | {g2:.1f} | {bw:.1f} | {gbs['w8a8'] / bw:.2f} | {g2 / bw:.2f} |")
        print(lines[-1], flush=True)
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        with open(args.out, "a") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
