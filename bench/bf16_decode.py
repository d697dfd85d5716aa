"""bf16-activation decode GEMV (M = 1..4) at avx512_bf16: w4a16 (uint4 asym, G = 128) and w8a16 (int8
per channel) against fbgemm's dynamic qint8 linear and the read bandwidth (torch.ones(2**28).sum()),
all in one process, candidates interleaved round by round, medians.

    PYTHONPATH=. python bench/bf16_decode.py [--rounds 7] [--threads 2] [--cpu-time]

--cpu-time (with --threads 1): time.thread_time instead of wall time, for a loaded machine.
The old-vs-new A/B in bench/results/bf16_decode_2026-12-02.md used a development switch of
weight_only.cpp that no longer exists.
"""
import argparse
import os
import time

import torch

try:  # python bench/<script>.py puts bench/ on sys.path; python -m bench.<script> the repo root
    from _cpu import interleaved
except ImportError:
    from bench._cpu import interleaved
import quantkernels  # noqa: F401
import quantkernels._ops  # noqa: F401
from quantkernels import reference as R

OPS = torch.ops.quantkernels
os.environ["QUANTKERNELS_CPU_ISA"] = "avx512_bf16"




def layer(N, K, g, G=128):
    w = torch.randn(N, K, generator=g) * 0.02
    b8 = torch.randint(-127, 128, (N, K), dtype=torch.int8, generator=g)
    s8 = torch.rand(N, generator=g) * 0.01 + 1e-3
    p4, s4, z4 = R.quantize_uint4_asym(w, G)
    return b8, s8, p4, s4, z4


def rot(fn, n):
    st = {"i": 0}

    def run():
        i = st["i"]
        st["i"] = (i + 1) % n
        return fn(i)
    return run


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--cpu-time", action="store_true")
    a = ap.parse_args()
    clock = time.perf_counter
    if a.cpu_time:
        assert a.threads == 1, "--cpu-time measures the calling thread only"
        clock = time.thread_time
    torch.set_num_threads(a.threads)
    g = torch.Generator().manual_seed(0)

    # hot: 4096 x 4096, M = 1..4
    K = N = 4096
    b8, s8, p4, s4, z4 = layer(N, K, g)
    print(f"## hot 4096 x 4096, {a.threads} threads (ms, medians of {a.rounds} interleaved rounds)\n")
    print("| M | W4A16 | W8A16 |\n|---|---|---|")
    for M in (1, 2, 3, 4):
        xb = torch.randn(M, K, generator=g).to(torch.bfloat16)
        c = {"w4": lambda: OPS.w4a16_gemm(xb, p4, s4, z4, None), "w8": lambda: OPS.w8a16_gemm(xb, b8, s8, None)}
        t = interleaved(c, a.rounds, inner=10, warmup=3, clock=clock)
        print(f"| {M} | {t['w4']:.3f} | {t['w8']:.3f} |", flush=True)

    # DRAM: 4096 x 11008 rotating over layers
    K, N = 4096, 11008
    nl = a.layers
    layers = [layer(N, K, g) for _ in range(nl)]
    fb = []
    for _ in range(4):
        lin = torch.nn.Linear(K, N, bias=False)
        fb.append(torch.ao.quantization.quantize_dynamic(torch.nn.Sequential(lin), {torch.nn.Linear}, dtype=torch.qint8))
    xb = torch.randn(1, K, generator=g).to(torch.bfloat16)
    xf = xb.float()
    big = torch.ones(2 ** 28)
    c = {"w4": rot(lambda i: OPS.w4a16_gemm(xb, layers[i][2], layers[i][3], layers[i][4]), nl),
         "w8": rot(lambda i: OPS.w8a16_gemm(xb, layers[i][0], layers[i][1]), nl)}
    c["fbgemm"] = rot(lambda i: fb[i](xf), len(fb))
    c["read"] = lambda: big.sum()
    t = interleaved(c, a.rounds * 3, inner=4, warmup=4, clock=clock)
    bw = big.numel() * 4 / (t["read"] * 1e-3) / 1e9
    b4 = N * K / 2 + N * (K // 128) * 5
    b8 = N * K + N * 4
    print(f"\n## DRAM: M = 1, 4096 x 11008 per layer rotating over {nl} layers, {a.threads} threads\n")
    print(f"read bandwidth (same run): {t['read']:.1f} ms -> {bw:.1f} GB/s\n")
    print("| kernel | ms / layer | weight GB/s | % of read BW | fbgemm time / time |")
    print("|---|---|---|---|---|")
    for k in list(c):
        if k == "read":
            continue
        nb = b4 if k.startswith("w4") else b8
        gbs = nb / (t[k] * 1e-3) / 1e9
        print(f"| {k} | {t[k]:.3f} | {gbs:.1f} | {100 * gbs / bw:.0f}% | {t['fbgemm'] / t[k]:.2f}x |")


if __name__ == "__main__":
    main()
