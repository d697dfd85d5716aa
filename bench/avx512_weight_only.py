"""Issue 14 benchmark: the AVX-512 weight-only kernels (w8a16_gemm / w4a16_gemm) against bf16
F.linear and fbgemm's dynamic qint8 linear, all in one process, candidates interleaved round by
round (the machine is shared: medians of interleaved rounds, never one long run per candidate).

    PYTHONPATH=. python bench/avx512_weight_only.py [--rounds 7] [--quick] [--out FILE.md]
        [--threads 1 --clock thread]   (CPU time of the calling thread: the usable clock on a shared machine)
        [--m 16 128 512]               (GEMM M values)
        [--ab-env VAR]                 (GEMM: each kernel also timed with VAR=1, interleaved: for a
                                        development build's switch back to its previous path)

ISA levels are switched per call with QUANTKERNELS_CPU_ISA (read on every op call), so the avx2 and
avx512_bf16 kernels are timed in the same process. Uses torch + quantkernels ops only.
"""
import argparse
import datetime
import os
import time

import torch
import torch.nn.functional as F

try:  # python bench/<script>.py puts bench/ on sys.path; python -m bench.<script> the repo root
    from _cpu import cpu_model, interleaved, with_isa
except ImportError:
    from bench._cpu import cpu_model, interleaved, with_isa
import quantkernels  # noqa: F401
import quantkernels._ops  # noqa: F401
from quantkernels import _native
from quantkernels import reference as R

OPS = torch.ops.quantkernels


def quant_weights(N, K, g, G=128):
    w = torch.randn(N, K, generator=g) * 0.02
    b8 = torch.randint(-127, 128, (N, K), dtype=torch.int8, generator=g)
    s8 = torch.rand(N, generator=g) * 0.01 + 1e-3
    p4, s4, z4 = R.quantize_uint4_asym(w, G)
    return w, b8, s8, p4, s4, z4


def with_env(var, fn):
    """``fn`` wrapped to run with the environment variable ``var`` set to 1 (a development build's A/B switch)."""
    def run():
        os.environ[var] = "1"
        try:
            return fn()
        finally:
            os.environ.pop(var, None)
    return run


def gemm_section(rounds, quick, lines, clock, ab_env=None, ms=(16, 128, 512)):
    g = torch.Generator().manual_seed(0)
    shapes = [(4096, 4096), (4096, 11008)] if not quick else [(4096, 4096)]
    lines.append("## bf16 x: GEMM (ms, medians; ratio = F.linear time / kernel time, >= 1.0 is the target)\n")
    if ab_env:
        lines.append(f"A/B columns: the same op with {ab_env}=1 (the development build's previous path), interleaved.\n")
    ab_head = f" | W8A16 {ab_env}=1 | ratio | W4A16 {ab_env}=1 | ratio" if ab_env else ""
    lines.append("| K x N | M | F.linear bf16 | W8A16 avx512_bf16 | ratio | W4A16 avx512_bf16 | ratio | W8A16 avx2 | W4A16 avx2"
                 + ab_head + " |")
    lines.append("|---|---|---|---|---|---|---|---|---|" + ("---|---|---|---|" if ab_env else ""))
    for K, N in shapes:
        w, b8, s8, p4, s4, z4 = quant_weights(N, K, g)
        wb = w.to(torch.bfloat16)
        for M in ms:
            x = torch.randn(M, K, generator=g).to(torch.bfloat16)
            c = {
                "lin": lambda: F.linear(x, wb),
                "w8": with_isa("avx512_bf16", lambda: OPS.w8a16_gemm(x, b8, s8)),
                "w4": with_isa("avx512_bf16", lambda: OPS.w4a16_gemm(x, p4, s4, z4)),
                "w8_avx2": with_isa("avx2", lambda: OPS.w8a16_gemm(x, b8, s8)),
                "w4_avx2": with_isa("avx2", lambda: OPS.w4a16_gemm(x, p4, s4, z4)),
            }
            if ab_env:
                c["w8_ab"] = with_env(ab_env, c["w8"])
                c["w4_ab"] = with_env(ab_env, c["w4"])
            t = interleaved(c, rounds, clock=clock)
            ab = (f" | {t['w8_ab']:.2f} | {t['lin'] / t['w8_ab']:.2f}x | {t['w4_ab']:.2f} | {t['lin'] / t['w4_ab']:.2f}x"
                  if ab_env else "")
            lines.append(f"| {K} x {N} | {M} | {t['lin']:.2f} | {t['w8']:.2f} | {t['lin'] / t['w8']:.2f}x | "
                         f"{t['w4']:.2f} | {t['lin'] / t['w4']:.2f}x | {t['w8_avx2']:.2f} | {t['w4_avx2']:.2f}" + ab + " |")
            print(lines[-1], flush=True)
    lines.append("")
    lines.append("## fp32 / fp16 x, 4096 x 4096 (ms, medians): avx512 zmm FMA vs avx2\n")
    lines.append("| x | M | W8A16 avx512 | W8A16 avx2 | W4A16 avx512 | W4A16 avx2 |")
    lines.append("|---|---|---|---|---|---|")
    K = N = 4096
    w, b8, s8, p4, s4, z4 = quant_weights(N, K, g)
    for dt in (torch.float32, torch.float16):
        for M in ((1, 16, 128) if not quick else (16,)):
            x = torch.randn(M, K, generator=g).to(dt)
            c = {
                "w8": with_isa("avx512_bf16", lambda: OPS.w8a16_gemm(x, b8, s8)),
                "w8_avx2": with_isa("avx2", lambda: OPS.w8a16_gemm(x, b8, s8)),
                "w4": with_isa("avx512_bf16", lambda: OPS.w4a16_gemm(x, p4, s4, z4)),
                "w4_avx2": with_isa("avx2", lambda: OPS.w4a16_gemm(x, p4, s4, z4)),
            }
            t = interleaved(c, rounds, clock=clock)
            lines.append(f"| {str(dt).split('.')[1]} | {M} | {t['w8']:.2f} | {t['w8_avx2']:.2f} | {t['w4']:.2f} | {t['w4_avx2']:.2f} |")
            print(lines[-1], flush=True)
    lines.append("")


def decode_section(rounds, quick, lines, clock):
    """M = 1 over several 4096 x 11008 layers (weights rotate through >= 96 MiB, so they come from DRAM)."""
    K, N = 4096, 11008
    g = torch.Generator().manual_seed(1)
    nl = 6 if not quick else 5  # int4: 22.5 MB per layer -> 135 MB; int8: 45 MB -> 270 MB
    layers = []
    for _ in range(nl):
        _, b8, s8, p4, s4, z4 = quant_weights(N, K, g)
        layers.append((b8, s8, p4, s4, z4))
    fb = []
    for _ in range(4):  # int8 weights 45 MB each: 180 MB
        lin = torch.nn.Linear(K, N, bias=False)
        fb.append(torch.ao.quantization.quantize_dynamic(torch.nn.Sequential(lin), {torch.nn.Linear}, dtype=torch.qint8))
    xb = torch.randn(1, K, generator=g).to(torch.bfloat16)
    xf = xb.float()
    big = torch.ones(2 ** 28)

    def rot(fn, n):
        state = {"i": 0}

        def run():
            i = state["i"]
            state["i"] = (i + 1) % n
            return fn(i)
        return run

    c = {
        "w4_bf16": with_isa("avx512_bf16", rot(lambda i: OPS.w4a16_gemm(xb, layers[i][2], layers[i][3], layers[i][4]), nl)),
        "w8_bf16": with_isa("avx512_bf16", rot(lambda i: OPS.w8a16_gemm(xb, layers[i][0], layers[i][1]), nl)),
        "w4_fp32": with_isa("avx512_bf16", rot(lambda i: OPS.w4a16_gemm(xf, layers[i][2], layers[i][3], layers[i][4]), nl)),
        "w8_fp32": with_isa("avx512_bf16", rot(lambda i: OPS.w8a16_gemm(xf, layers[i][0], layers[i][1]), nl)),
        "w4_bf16_avx2": with_isa("avx2", rot(lambda i: OPS.w4a16_gemm(xb, layers[i][2], layers[i][3], layers[i][4]), nl)),
        "w8_bf16_avx2": with_isa("avx2", rot(lambda i: OPS.w8a16_gemm(xb, layers[i][0], layers[i][1]), nl)),
        "fbgemm": rot(lambda i: fb[i](xf), len(fb)),
        "read": lambda: big.sum(),
    }
    t = interleaved(c, rounds * 3, inner=4, warmup=4, clock=clock)
    bw = big.numel() * 4 / (t["read"] * 1e-3) / 1e9
    b4 = N * K / 2 + N * (K // 128) * 5  # packed nibbles + fp32 scale + uint8 zero per group
    b8 = N * K + N * 4
    lines.append(f"## Decode, M = 1, 4096 x 11008 per layer, weights rotating over {nl} layers "
                 f"(int4 {nl * b4 / 2**20:.0f} MiB, int8 {nl * b8 / 2**20:.0f} MiB; fbgemm 4 x {b8 / 2**20:.0f} MiB)\n")
    lines.append(f"Read bandwidth, same run (torch.ones(2**28).sum()): {t['read']:.1f} ms -> {bw:.1f} GB/s\n")
    lines.append("| kernel | ms / layer | weight GB/s | % of read BW | vs fbgemm |")
    lines.append("|---|---|---|---|---|")
    for k, nb in (("w4_bf16", b4), ("w8_bf16", b8), ("w4_fp32", b4), ("w8_fp32", b8), ("w4_bf16_avx2", b4),
                  ("w8_bf16_avx2", b8), ("fbgemm", b8)):
        gbs = nb / (t[k] * 1e-3) / 1e9
        lines.append(f"| {k} | {t[k]:.3f} | {gbs:.1f} | {100 * gbs / bw:.0f}% | {t['fbgemm'] / t[k]:.2f}x |")
        print(lines[-1], flush=True)
    lines.append("")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None)
    ap.add_argument("--only", choices=("gemm", "decode"), default=None)
    ap.add_argument("--ab-env", default=None, metavar="VAR",
                    help="GEMM: also time each kernel with VAR=1 (a development build's switch to its previous path)")
    ap.add_argument("--m", type=int, nargs="+", default=[16, 128, 512], help="GEMM: the M values")
    ap.add_argument("--clock", choices=("wall", "thread"), default="wall",
                    help="thread: CPU time of the calling thread (with --threads 1 only)")
    a = ap.parse_args()
    if a.clock == "thread" and a.threads != 1:
        ap.error("--clock thread measures the calling thread only: use it with --threads 1")
    clock = time.thread_time if a.clock == "thread" else time.perf_counter
    torch.set_num_threads(a.threads)
    assert _native.load(), _native.REASON
    lines = [f"# AVX-512 weight-only kernels (issue 14), {datetime.datetime.utcnow():%Y-%m-%d %H:%M} UTC\n",
             f"CPU: {cpu_model()}, {os.cpu_count()} CPUs, {a.threads} threads; torch {torch.__version__}; "
             f"ISA levels: {', '.join(_native.cpu_isa_levels())}; rounds {a.rounds}, {a.clock} clock; "
             f"load average at start {os.getloadavg()[0]:.1f} (shared machine)\n"]
    if a.only != "decode":
        gemm_section(a.rounds, a.quick, lines, clock, a.ab_env, tuple(a.m))
    if a.only != "gemm":
        decode_section(a.rounds, a.quick, lines, clock)
    text = "\n".join(lines) + "\n"
    print(text)
    if a.out:
        with open(a.out, "a") as f:
            f.write(text)


if __name__ == "__main__":
    main()
