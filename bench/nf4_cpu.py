"""NF4 on the CPU: quantkernels' gemm_4bit (C++ kernel, csrc/cpu/gemm_4bit.cpp) against our w4a16
(asymmetric uint4, g64) and against bitsandbytes' CPU ``Linear4bit`` (NF4, block 64) on the same
[N, K] layer, at M = 1 (decode; weights cycled through a pool larger than the last-level cache, so
they come from DRAM), 4, 16 and 128. Medians of interleaved rounds (bench/_cpu.py); ratios are of
medians measured in the same run. Two clocks (``--modes``): 1 torch thread timed by the calling thread's
CPU time (time.thread_time: what the kernels cost, less sensitive to other processes on a shared
machine) and 2 threads by wall clock. ``--env-variant NAME`` adds "nf4 [NAME=1]", gemm_4bit called with
that environment variable set (a developer switch of a build under test, if it has one). Writes markdown
tables to stdout (machine, date, load, threads).

    PYTHONPATH=. python bench/nf4_cpu.py [--K 4096 --N 4096 --dtype bf16 --rounds 15 --M 1,4,16,128]
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


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--K", type=int, default=4096)
    p.add_argument("--N", type=int, default=4096)
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--pool-mib", type=int, default=256, help="weights cycled at M = 1 (DRAM-resident)")
    p.add_argument("--M", default="1,4,16,128")
    p.add_argument("--modes", default="1cpu,2wall", help="1cpu: 1 thread, thread CPU time; 2wall: 2 threads, wall")
    p.add_argument("--env-variant", default=None)
    a = p.parse_args()
    dt = {"bf16": torch.bfloat16, "fp32": torch.float32}[a.dtype]
    K, N = a.K, a.N
    torch.manual_seed(0)
    copies = max(1, (a.pool_mib << 20) // (N * K // 2))
    layers = []
    for i in range(copies):
        w = torch.randn(N, K) * 0.02
        nf4 = O.quantize_4bit(w, "nf4", 64)
        w4 = O.quantize_uint4_asym(w, 64)
        layers.append((w if i < 4 else None, nf4, w4))  # the fp32 weight only where bitsandbytes needs it
    try:
        import bitsandbytes as bnb
        bnb_layers = []
        for w, _, _ in layers[: min(len(layers), 4)]:  # bnb quantizes on .to("cpu"); a few copies suffice
            lin = bnb.nn.Linear4bit(K, N, bias=False, compute_dtype=dt, compress_statistics=False, quant_type="nf4")
            lin.weight = bnb.nn.Params4bit(w.to(dt), requires_grad=False, quant_type="nf4", blocksize=64)
            bnb_layers.append(lin.to("cpu"))
        bnb_ver = bnb.__version__
    except Exception as e:  # noqa: BLE001
        bnb_layers, bnb_ver = [], f"absent ({type(e).__name__})"
    print(f"# nf4 CPU benchmark, {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC\n")
    print(f"- machine: {_cpu.cpu_model()}, {os.cpu_count()} logical CPUs, torch threads {torch.get_num_threads()}")
    print(f"- load average at start: {os.getloadavg()}")
    print(f"- layer [N={N}, K={K}], activations {a.dtype}, NF4 block 64, w4a16 uint4 g64, "
          f"{copies} weight copies cycled ({copies * N * K // 2 >> 20} MiB packed); bitsandbytes {bnb_ver}")
    print(f"- ISA level: {qk._native.cpu_isa()}; gemm_4bit runs: {qk._native.cpu_kernel_variants().get('gemm_4bit')}")
    vname = f"nf4 [{a.env_variant}=1]" if a.env_variant else None
    for mode in a.modes.split(","):
        threads, clock, cname = {"1cpu": (1, time.thread_time, "1 thread, thread CPU ms"),
                                 "2wall": (2, time.perf_counter, "2 threads, wall ms")}[mode]
        torch.set_num_threads(threads)
        print(f"\n{a.dtype} x, {cname} (load average now {os.getloadavg()[0]:.1f}):\n")
        names = ["nf4"] + ([vname] if vname else []) + ["w4a16", "bnb Linear4bit"]
        print("| M | " + " | ".join(names) + " | nf4 / w4a16 |"
              + (" variant / w4a16 | nf4 / variant |" if vname else "") + " bnb / nf4 |")
        print("|---" * (len(names) + 3 + 2 * bool(vname)) + "|")
        for M in (int(m) for m in a.M.split(",")):
            x = torch.randn(M, K).to(dt)
            it = {"i": 0}

            def nxt(pool):
                it["i"] = (it["i"] + 1) % len(pool)
                return pool[it["i"]]

            def env(fn):
                def run():
                    os.environ[a.env_variant] = "1"
                    try:
                        return fn()
                    finally:
                        os.environ.pop(a.env_variant, None)
                return run

            cands = {"nf4": lambda: O.gemm_4bit(x, *nxt(layers)[1], "nf4", 64)}
            if vname:
                cands[vname] = env(lambda: O.gemm_4bit(x, *nxt(layers)[1], "nf4", 64))
            cands["w4a16"] = lambda: O.w4a16_gemm(x, *nxt(layers)[2])
            if bnb_layers:
                cands["bnb"] = lambda: nxt(bnb_layers)(x)
            with torch.no_grad():
                t = _cpu.interleaved(cands, a.rounds, inner=max(1, 8 // M), warmup=2, clock=clock)
            tb, tn, tw = t.get("bnb"), t["nf4"], t["w4a16"]
            cols = ([f"{tn:.3f}"] + ([f"{t[vname]:.3f}"] if vname else [])
                    + [f"{tw:.3f}", "-" if tb is None else f"{tb:.3f}"])
            extra = f" {t[vname] / tw:.2f} | {tn / t[vname]:.2f} |" if vname else ""
            print(f"| {M} | " + " | ".join(cols) + f" | {tn / tw:.2f} |{extra} "
                  + ("-" if tb is None else f"{tb / tn:.2f}") + " |")
    print(f"\n- load average at end: {os.getloadavg()}")


if __name__ == "__main__":
    main()
