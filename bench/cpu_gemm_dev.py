"""Dev benchmark of the CPU W8A8 kernels against the CPU baselines, in one run.

Times (torch.utils.benchmark, median), at 2 threads by default:
  ours w8a8     : quantize_int8_rowwise(x) (whatever kernel is registered) + w8a8_gemm
  ours gemm     : w8a8_gemm alone on pre-quantized activations
  fbgemm        : torch.ao.quantization.quantize_dynamic(nn.Linear, qint8)
  fp32          : F.linear
and prints median ms, GFLOP/s (2*M*N*K) and the ratios ours/fbgemm, ours/fp32 (speedups, >1 is faster).

Usage: python bench/cpu_gemm_dev.py [--jit] [--threads 2] [--shapes 4096x4096,11008x4096] [--m 16,128,512]
  --jit builds csrc/cpu/gemm_int8.cpp with torch.utils.cpp_extension.load (no quantkernels._C needed).
"""
import argparse
import os
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.benchmark as tb

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import quantkernels._ops  # noqa: E402,F401  (schemas + reference)


def load_native(jit: bool):
    import glob
    if not jit and glob.glob(os.path.join(ROOT, "quantkernels", "_C*.so")):  # this checkout's build only
        import quantkernels._C  # noqa: F401
        return "quantkernels._C"
    from torch.utils.cpp_extension import load
    load(name="qk_gemm_dev", sources=[os.path.join(ROOT, "csrc", "cpu", f) for f in ("gemm_int8.cpp", "module.cpp")],
         extra_cflags=["-O3"], is_python_module=False)
    return "JIT csrc/cpu/gemm_int8.cpp"


def timeit(fn, min_run_time):
    m = tb.Timer(stmt="fn()", globals={"fn": fn}).blocked_autorange(min_run_time=min_run_time)
    return m.median * 1e3


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--jit", action="store_true")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--shapes", default="4096x4096,11008x4096", help="NxK list")
    p.add_argument("--m", default="16,128,512")
    p.add_argument("--min-run-time", type=float, default=1.0)
    args = p.parse_args()
    how = load_native(args.jit)
    torch.set_num_threads(args.threads)
    ops = torch.ops.quantkernels
    print(f"native: {how}; threads {torch.get_num_threads()}; QUANTKERNELS_CPU_ISA="
          f"{os.environ.get('QUANTKERNELS_CPU_ISA', '')!r}")
    hdr = (f"{'N x K':>12} {'M':>4} | {'ours w8a8':>16} | {'ours gemm only':>16} | {'fbgemm dyn':>16} | "
           f"{'fp32 linear':>16} | {'vs fbgemm':>9} {'vs fp32':>8}")
    print(hdr)
    print("-" * len(hdr))
    torch.manual_seed(0)
    for shp in args.shapes.split(","):
        N, K = map(int, shp.split("x"))
        lin = nn.Linear(K, N, bias=True)
        lin.weight.data.normal_(0, 0.02)
        w = lin.weight.data
        bq, sb = ops.quantize_int8_rowwise(w)
        dyn = torch.ao.quantization.quantize_dynamic(nn.Sequential(lin), {nn.Linear}, dtype=torch.qint8)
        for M in map(int, args.m.split(",")):
            x = torch.randn(M, K)
            xq, sx = ops.quantize_int8_rowwise(x)
            bias = lin.bias.data

            def ours():
                q, s = ops.quantize_int8_rowwise(x)
                return ops.w8a8_gemm(q, bq, s, sb, bias)

            t_ours = timeit(ours, args.min_run_time)
            t_gemm = timeit(lambda: ops.w8a8_gemm(xq, bq, sx, sb, bias), args.min_run_time)
            with torch.no_grad():
                t_fb = timeit(lambda: dyn(x), args.min_run_time)
                t_fp = timeit(lambda: F.linear(x, w, bias), args.min_run_time)
            fl = 2.0 * M * N * K

            def cell(t):
                return f"{t:7.2f}ms {fl / t / 1e6:5.0f}GF"

            print(f"{N:>6}x{K:<5} {M:>4} | {cell(t_ours):>16} | {cell(t_gemm):>16} | {cell(t_fb):>16} | "
                  f"{cell(t_fp):>16} | {t_fb / t_ours:8.2f}x {t_fp / t_ours:7.2f}x", flush=True)


if __name__ == "__main__":
    main()
