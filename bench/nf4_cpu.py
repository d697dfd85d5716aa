"""NF4 on the CPU: quantkernels' gemm_4bit (C++ kernel, csrc/cpu/gemm_4bit.cpp) against our w4a16
(asymmetric uint4, g64) and against bitsandbytes' CPU ``Linear4bit`` (NF4, block 64) on the same
[N, K] layer, at M = 1 (decode; weights cycled through a pool larger than the last-level cache, so
they come from DRAM), 16 and 128. Medians of interleaved rounds (bench/_cpu.py); ratios are of
medians measured in the same run. Writes a markdown table to stdout (machine, date, load, threads).

    PYTHONPATH=. python bench/nf4_cpu.py [--K 4096 --N 4096 --dtype bf16 --rounds 15]
"""

import argparse
import datetime
import os
import sys

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
    a = p.parse_args()
    dt = {"bf16": torch.bfloat16, "fp32": torch.float32}[a.dtype]
    K, N = a.K, a.N
    torch.manual_seed(0)
    copies = max(1, (a.pool_mib << 20) // (N * K // 2))
    layers = []
    for _ in range(copies):
        w = torch.randn(N, K) * 0.02
        nf4 = O.quantize_4bit(w, "nf4", 64)
        w4 = O.quantize_uint4_asym(w, 64)
        layers.append((w, nf4, w4))
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
    print("\n| M | nf4 ms | w4a16 ms | bnb Linear4bit ms | nf4 / w4a16 | bnb / nf4 |\n|---|---|---|---|---|---|")
    for M in (1, 16, 128):
        x = torch.randn(M, K).to(dt)
        it = {"i": 0}

        def nxt(pool):
            it["i"] = (it["i"] + 1) % len(pool)
            return pool[it["i"]]

        cands = {
            "nf4": lambda: O.gemm_4bit(x, *nxt(layers)[1], "nf4", 64),
            "w4a16": lambda: O.w4a16_gemm(x, *nxt(layers)[2]),
        }
        if bnb_layers:
            cands["bnb"] = lambda: nxt(bnb_layers)(x)
        with torch.no_grad():
            t = _cpu.interleaved(cands, a.rounds, inner=max(1, 8 // M), warmup=2)
        tb, tn, tw = t.get("bnb"), t["nf4"], t["w4a16"]
        bnb_ms = "-" if tb is None else f"{tb:.3f}"
        bnb_ratio = "-" if tb is None else f"{tb / tn:.2f}"
        print(f"| {M} | {tn:.3f} | {tw:.3f} | {bnb_ms} | {tn / tw:.2f} | {bnb_ratio} |")
    print(f"\n- load average at end: {os.getloadavg()}")


if __name__ == "__main__":
    main()
