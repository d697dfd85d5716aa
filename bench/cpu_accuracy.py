"""What the CPU baselines compute: SQNR of our schemes against torch.ao quantize_dynamic (fbgemm).

The GEMM benchmark compares speed; this table says what each method computes, on the
docs/numerics.md s.6 setup (N(0, 1) activations, N(0, 0.02^2) weights, M = 256, K = 4096, N = 1024,
SQNR against the fp64 F.linear), with and without 3 planted outlier columns (x60).
fbgemm's dynamic Linear quantizes activations per tensor to 7 bits (reduce_range=True), which is
why its int8 kernel needs no sign handling (see csrc/cpu/gemm_int8.cpp) and why it is less exact.

    python -m bench.cpu_accuracy --out bench/results
"""

from __future__ import annotations

import argparse
import datetime
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

from quantkernels import _ops as O


def sqnr(ref: torch.Tensor, y: torch.Tensor) -> float:
    ref = ref.double()
    return (10 * torch.log10(ref.pow(2).mean() / (ref - y.double()).pow(2).mean())).item()


def fbgemm_dynamic(w: torch.Tensor):
    lin = torch.nn.Sequential(torch.nn.Linear(w.shape[1], w.shape[0], bias=False))
    lin[0].weight.data = w.clone()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.ao.quantization.quantize_dynamic(lin, {torch.nn.Linear}, dtype=torch.qint8)


def rows(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    M, K, N = 256, 4096, 1024
    x = torch.randn(M, K, generator=g)
    w = torch.randn(N, K, generator=g) * 0.02
    wq, ws = O.quantize_int8_rowwise(w)
    p4, s4, z4 = O.quantize_uint4_asym(w, 128)
    fb = fbgemm_dynamic(w)
    out = []
    for name, xx in (("N(0,1)", x), ("3 outlier columns x60", _outliers(x))):
        ref = F.linear(xx.double(), w.double())
        q, s = O.quantize_int8_rowwise(xx)
        out.append((name, {
            "w8a8 (ours)": sqnr(ref, O.w8a8_gemm(q, wq, s, ws, None, None)),
            "llm_int8 thr6 (ours)": sqnr(ref, O.llm_int8_linear(xx, wq, ws, None, 6.0)),
            "w8a16 (ours)": sqnr(ref, O.w8a16_gemm(xx, wq, ws, None)),
            "w4a16 g128 asym (ours)": sqnr(ref, O.w4a16_gemm(xx, p4, s4, z4, None)),
            "fbgemm quantize_dynamic qint8": sqnr(ref, fb(xx)),
        }))
    return out


def _outliers(x: torch.Tensor) -> torch.Tensor:
    x = x.clone()
    x[:, :3] *= 60
    return x


def render(table) -> str:
    methods = list(table[0][1])
    lines = [
        "# SQNR of the CPU methods (dB, higher is better)",
        "",
        f"- date: {datetime.datetime.now().isoformat(timespec='seconds')}; torch {torch.__version__}",
        "- setup: docs/numerics.md s.6 (N(0,1) activations, N(0, 0.02^2) weights, M=256, K=4096, N=1024), "
        "against the fp64 F.linear; command: `python -m bench.cpu_accuracy`",
        "",
        "| method | " + " | ".join(name for name, _ in table) + " |",
        "|---|" + "---|" * len(table),
    ]
    for m in methods:
        lines.append(f"| {m} | " + " | ".join(f"{vals[m]:.1f}" for _, vals in table) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=None, help="directory for cpu_accuracy.md (default: print only)")
    a = p.parse_args(argv)
    text = render(rows())
    print(text)
    if a.out is not None:
        a.out.mkdir(parents=True, exist_ok=True)
        (a.out / "cpu_accuracy.md").write_text(text)


if __name__ == "__main__":
    main()
