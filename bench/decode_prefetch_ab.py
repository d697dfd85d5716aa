"""Prefetch-distance / L2-hint A/B of the int4 decode GEMVs (M = 1, weights from DRAM), in one process.

    NT=1 PYTHONPATH=. python bench/decode_prefetch_ab.py [--rounds 9] [--which both|w4a8|w4a16]
        [--l1 1] [--l2 1,2,4,6,8]

Needs the development build of commit 2f0f212, whose kernels read QK_DEV_W4A8_PF / QK_DEV_W4A8_PFT1 and
QK_DEV_WO_PF / QK_DEV_WO_PFT1 (tiles ahead; PFT1 set: prefetcht1, into L2, instead of prefetcht0) on every
call. Commit 3599361 removed those switches: on later builds every variant runs the same kernel. Kept as
the record of bench/results/cpu_weight_only_2026-12-07.md. NT=1 times the calling thread's CPU time
(time.thread_time); any other NT, wall time.
--l1: distances (tiles) timed into L1; --l2: into L2 (W4A8; W4A16 uses the same lists, plus its old
2 tiles into L1; W8A16 int8: 2 tiles into L1 and into L2, 4 into L2).
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


def with_env(d, fn):
    def run():
        os.environ.update(d)
        try:
            return fn()
        finally:
            for k in d:
                os.environ.pop(k, None)
    return run


def rot(fn, n):
    st = {"i": 0}

    def run():
        i = st["i"]
        st["i"] = (i + 1) % n
        return fn(i)
    return run


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--which", choices=("both", "w4a8", "w4a16"), default="both")
    ap.add_argument("--l1", default="1")
    ap.add_argument("--l2", default="1,2,4,6,8")
    a = ap.parse_args()
    nt = int(os.environ.get("NT", "2"))
    torch.set_num_threads(nt)
    clock = time.thread_time if nt == 1 else time.perf_counter
    l1 = [s for s in a.l1.split(",") if s]
    l2 = [s for s in a.l2.split(",") if s]
    g = torch.Generator().manual_seed(0)
    c, nbytes = {}, {}
    if a.which in ("both", "w4a8"):
        K, N = 4096, 4096
        per = N * K // 2 + N * (K // 128) * 4
        cnt = -(-96 * 2**20 // per)
        mats = [R.quantize_int4_sym(torch.randn(N, K, generator=g) * 0.02, 128) for _ in range(cnt)]
        xq, sx = OPS.quantize_int8_rowwise(torch.randn(1, K, generator=g))

        def f(i):
            return OPS.w4a8_gemm(xq, mats[i][0], sx, mats[i][1], None, None, None)
        isa = {"QUANTKERNELS_CPU_ISA": "avx512_vnni"}
        for pf in l1:
            c[f"w4a8 pf{pf}"] = with_env({**isa, "QK_DEV_W4A8_PF": pf}, rot(f, cnt))
        for pf in l2:
            c[f"w4a8 pf{pf} T1"] = with_env({**isa, "QK_DEV_W4A8_PF": pf, "QK_DEV_W4A8_PFT1": "1"}, rot(f, cnt))
        nbytes.update({k: per for k in c})
    if a.which in ("both", "w4a16"):
        K, N = 4096, 11008
        per4 = N * K // 2 + N * (K // 128) * 5
        nl = 6
        layers = [R.quantize_uint4_asym(torch.randn(N, K, generator=g) * 0.02, 128) for _ in range(nl)]
        xb = torch.randn(1, K, generator=g).to(torch.bfloat16)

        def f4(i):
            return OPS.w4a16_gemm(xb, layers[i][0], layers[i][1], layers[i][2])
        isa = {"QUANTKERNELS_CPU_ISA": "avx512_bf16"}
        for pf in sorted(set(l1) | {"2"}):
            c[f"w4a16 pf{pf}"] = with_env({**isa, "QK_DEV_WO_PF": pf}, rot(f4, nl))
        for pf in l2:
            c[f"w4a16 pf{pf} T1"] = with_env({**isa, "QK_DEV_WO_PF": pf, "QK_DEV_WO_PFT1": "1"}, rot(f4, nl))
        nbytes.update({k: per4 for k in c if k.startswith("w4a16")})
        l8 = [(torch.randint(-127, 128, (N, K), dtype=torch.int8, generator=g),
               torch.rand(N, generator=g) * 0.01 + 1e-3) for _ in range(3)]

        def f8(i):
            return OPS.w8a16_gemm(xb, l8[i][0], l8[i][1])
        c["w8a16 pf2"] = with_env({**isa, "QK_DEV_WO_PF": "2"}, rot(f8, 3))
        for pf in ("2", "4"):
            c[f"w8a16 pf{pf} T1"] = with_env({**isa, "QK_DEV_WO_PF": pf, "QK_DEV_WO_PFT1": "1"}, rot(f8, 3))
        nbytes.update({k: N * K + 4 * N for k in c if k.startswith("w8a16")})
        fb = []
        for _ in range(4):
            lin = torch.nn.Linear(K, N, bias=False)
            fb.append(torch.ao.quantization.quantize_dynamic(torch.nn.Sequential(lin), {torch.nn.Linear},
                                                             dtype=torch.qint8))
        xf = xb.float()
        c["fbgemm 4096x11008"] = rot(lambda i: fb[i](xf), 4)
    big = torch.ones(2 ** 28)
    c["read"] = lambda: big.sum()
    print(f"{nt} threads, load at start {os.getloadavg()[0]:.1f}")
    with torch.no_grad():
        t = interleaved(c, a.rounds, inner=4, warmup=4, clock=clock)
    bw = big.numel() * 4 / (t["read"] * 1e-3) / 1e9
    print(f"read {bw:.1f} GB/s; load at end {os.getloadavg()[0]:.1f}")
    for k, v in t.items():
        line = f"{k}: {v:.3f} ms"
        if k in nbytes:
            gbs = nbytes[k] / (v * 1e-3) / 1e9
            line += f" {gbs:.1f} GB/s {100 * gbs / bw:.0f}%"
        if k.startswith(("w4a16", "w8a16")):
            line += f"  fbgemm/this {t['fbgemm 4096x11008'] / v:.2f}x"
        print(line)


if __name__ == "__main__":
    main()
