"""NF4 decode GEMV on the CPU (issue 17 follow-up): quantkernels' gemm_4bit (csrc/cpu/gemm_4bit.cpp) against
our w4a16 (asymmetric uint4, g64, csrc/cpu/weight_only.cpp) on one [N, K] layer with a hot cache (the same
weight every call), at small M. Two clocks: 1 torch thread timed by the calling thread's CPU time
(time.thread_time: what the kernel costs, less sensitive to other processes on this shared machine), and
2 threads timed by wall clock. Medians of interleaved rounds (bench/_cpu.py); ratios are of medians from
the same run. ``--env-variant NAME`` adds a candidate "nf4 [NAME=1]" that calls gemm_4bit with that
environment variable set (a developer switch of a build under test, if it has one). Markdown on stdout.

    PYTHONPATH=. python bench/nf4_gemv_cpu.py [--K 4096 --N 4096 --M 1,4,16 --rounds 21]
"""

import argparse
import datetime
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _cpu  # noqa: E402

import quantkernels as qk  # noqa: E402
from quantkernels import _ops as O  # noqa: E402


def with_env(name, fn):
    def run():
        os.environ[name] = "1"
        try:
            return fn()
        finally:
            os.environ.pop(name, None)
    return run


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--K", type=int, default=4096)
    p.add_argument("--N", type=int, default=4096)
    p.add_argument("--M", default="1,4,16")
    p.add_argument("--dtypes", default="bf16,fp32")
    p.add_argument("--rounds", type=int, default=21)
    p.add_argument("--env-variant", default=None)
    a = p.parse_args()
    K, N = a.K, a.N
    torch.manual_seed(0)
    w = torch.randn(N, K) * 0.02
    nf4 = O.quantize_4bit(w, "nf4", 64)
    w4 = O.quantize_uint4_asym(w, 64)
    print(f"# nf4 GEMV CPU benchmark (hot cache), {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC\n")
    print(f"- machine: {_cpu.cpu_model()}, {os.cpu_count()} logical CPUs; ISA level {qk._native.cpu_isa()}")
    print(f"- load average at start: {os.getloadavg()}")
    print(f"- layer [N={N}, K={K}], NF4 block 64, w4a16 uint4 g64; {a.rounds} interleaved rounds, medians")
    for dn in a.dtypes.split(","):
        dt = {"bf16": torch.bfloat16, "fp32": torch.float32}[dn]
        for threads, clock, cname in ((1, time.thread_time, "thread CPU"), (2, time.perf_counter, "wall")):
            torch.set_num_threads(threads)
            names = ["nf4"] + ([f"nf4 [{a.env_variant}=1]"] if a.env_variant else []) + ["w4a16"]
            print(f"\n{dn} x, {threads} thread(s), {cname} ms:\n")
            print("| M | " + " | ".join(names) + " | nf4 / w4a16 |" + (" nf4 / variant |" if a.env_variant else ""))
            print("|---" * (len(names) + 2 + bool(a.env_variant)) + "|")
            for M in (int(m) for m in a.M.split(",")):
                x = torch.randn(M, K).to(dt)
                cands = {"nf4": lambda: O.gemm_4bit(x, *nf4, "nf4", 64)}
                if a.env_variant:
                    cands[names[1]] = with_env(a.env_variant, lambda: O.gemm_4bit(x, *nf4, "nf4", 64))
                cands["w4a16"] = lambda: O.w4a16_gemm(x, *w4)
                with torch.no_grad():
                    t = _cpu.interleaved(cands, a.rounds, inner=max(1, 16 // M), warmup=3, clock=clock)
                row = " | ".join(f"{t[n]:.3f}" for n in names)
                extra = f" {t['nf4'] / t[names[1]]:.2f} |" if a.env_variant else ""
                print(f"| {M} | {row} | {t['nf4'] / t['w4a16']:.2f} |{extra}")
    print(f"\n- load average at end: {os.getloadavg()}")


if __name__ == "__main__":
    main()
