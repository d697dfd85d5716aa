"""GEMM microbenchmark: every quantized scheme on every available backend, against the baselines.

    quantkernels bench                                  # CPU fp32: LLM shapes x M = 1..2048
    quantkernels bench --quick                          # smoke run: K = N = 256, M = 1, 16
    quantkernels bench --shapes 4096x11008 --m 1 16 --runs 10
    quantkernels bench --device cuda                    # bf16, triton.testing.do_bench
    python -m quantkernels.bench.gemm ...               # the same, without the console script

Writes <out>/gemm_<device>_<date>[_quick].{md,csv} and, with matplotlib, a throughput PNG and a
speedup-vs-M PNG (*_speedup.png); <out> is --out, by default ./bench_results (current directory).

Weights are [N, K] (F.linear layout) and quantized once, outside the timing; the timed call
includes the dynamic activation quantization where a scheme needs it. Decode (M <= 4) rotates
over copies of the layer, so that the weights come from DRAM and not the last-level cache.
Backends are found at run time: "reference" (quantkernels.reference called directly),
"native" (torch.ops.quantkernels where every op of the scheme has a CPU/CUDA kernel) and
"triton" (quantkernels::<op>_triton ops, CUDA only).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import itertools
import math
import os
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

import quantkernels._ops  # noqa: F401  defines torch.ops.quantkernels (not the package: it may be in flux)
from quantkernels import reference as R

from . import DEFAULT_OUT
from . import _harness as H

try:
    from tqdm import tqdm
except ImportError:  # optional (quantkernels[bench]): no progress bar, the skips still print
    tqdm = None

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
GROUP = 128
THRESHOLD = 6.0                       # LLM.int8() outlier threshold
OUTLIER_FRACTION, OUTLIER_SCALE = 0.005, 60.0
DECODE_MAX_M = 4                      # M up to this rotates weight copies
MAX_COPIES = 64
REF_MAX_MNK = 2**31                   # beyond this the fp64 reference takes seconds a call
FULL = dict(m=[1, 16, 128, 512, 2048], shapes=["4096x4096", "4096x11008", "11008x4096"], runs=20,
            min_run_time=0.2, max_run_time=5.0, bandwidth_gib=1.0)
QUICK = dict(m=[1, 16], shapes=["256x256"], runs=3, min_run_time=0.01, max_run_time=1.0, bandwidth_gib=1 / 16)


class Ops:
    """The op functions of one backend; the native and triton ones go through the dispatcher."""

    def __init__(self, backend: str):
        self.backend = backend

    def __getattr__(self, name: str):
        ns = torch.ops.quantkernels
        if self.backend == "reference":
            fn = getattr(R, name)
        elif self.backend == "triton" and hasattr(ns, name + "_triton"):
            fn = getattr(ns, name + "_triton")
        else:  # native, or an op (e.g. the activation quantizer) with no Triton variant
            fn = getattr(ns, name)
        setattr(self, name, fn)  # resolved once, not inside the timed loop
        return fn


@dataclass
class Scheme:
    label: str
    ops: Tuple[str, ...]   # every op of the timed call; the last one is the GEMM
    quantize: Callable     # fp32 weight [N, K] -> tuple of the stored tensors
    run: Callable          # (Ops, stored tensors, x) -> y


def _w8a8(op, wt, x):
    a, sa = op.quantize_int8_rowwise(x)  # dynamic per-token activation quantization, timed
    return op.w8a8_gemm(a, wt[0], sa, wt[1], None, x.dtype)


def _w4a8(op, wt, x):
    a, sa = op.quantize_int8_rowwise(x)
    return op.w4a8_gemm(a, wt[0], sa, wt[1], None, None, x.dtype)


SCHEMES = {
    "w8a8": Scheme("w8a8", ("quantize_int8_rowwise", "w8a8_gemm"), R.quantize_int8_rowwise, _w8a8),
    "w4a8": Scheme("w4a8 g128", ("quantize_int8_rowwise", "w4a8_gemm"), lambda w: R.quantize_int4_sym(w, GROUP), _w4a8),
    "w8a16": Scheme("w8a16", ("w8a16_gemm",), R.quantize_int8_rowwise, lambda op, wt, x: op.w8a16_gemm(x, *wt)),
    "w4a16": Scheme("w4a16 g128 asym", ("w4a16_gemm",), lambda w: R.quantize_uint4_asym(w, GROUP),
                    lambda op, wt, x: op.w4a16_gemm(x, *wt)),
    "llm_int8": Scheme("llm_int8 thr6", ("llm_int8_linear",), R.quantize_int8_rowwise,
                       lambda op, wt, x: op.llm_int8_linear(x, *wt, None, THRESHOLD)),
}


@dataclass
class Method:
    """One row of the tables: ``setup(w)`` (untimed) -> (state, stored weight bytes); ``call(state, x)`` is timed."""
    name: str
    scheme: str                            # a SCHEMES key, or "baseline"
    backend: str
    setup: Callable
    call: Callable
    dtype: Optional[torch.dtype] = None    # activation dtype; None: the run's --dtype


def backends_for(scheme: Scheme, device: torch.device) -> List[str]:
    """reference always; native if every op has a kernel for the device; triton if the GEMM has a _triton op."""
    key = "CUDA" if device.type == "cuda" else "CPU"
    found = ["reference"]
    if all(torch._C._dispatch_has_kernel_for_dispatch_key(f"quantkernels::{op}", key) for op in scheme.ops):
        found.append("native")
    if device.type == "cuda" and hasattr(torch.ops.quantkernels, scheme.ops[-1] + "_triton"):
        found.append("triton")
    return found


def scheme_method(key: str, backend: str) -> Method:
    scheme, op = SCHEMES[key], Ops(backend)

    def setup(w):
        wt = tuple(scheme.quantize(w))
        return wt, sum(t.nbytes for t in wt)
    return Method(f"{scheme.label} ({backend})", key, backend, setup, lambda wt, x: scheme.run(op, wt, x))


def _linear(dtype: torch.dtype) -> Method:
    def setup(w):
        wd = w.to(dtype).contiguous()
        return wd, wd.nbytes
    return Method(f"F.linear {DTYPE_NAMES[dtype]}", "baseline", "torch", setup, lambda wd, x: F.linear(x, wd), dtype)


def _qdynamic_setup(w):
    N, K = w.shape
    lin = nn.Linear(K, N, bias=False)
    lin.weight.data.copy_(w)
    previous = torch.backends.quantized.engine
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao.quantization is deprecated, and still the CPU int8 anchor
        torch.backends.quantized.engine = "fbgemm"
        qlin = torch.ao.quantization.quantize_dynamic(nn.Sequential(lin), {nn.Linear}, dtype=torch.qint8)[0]
        torch.backends.quantized.engine = previous
    return qlin, N * K + 8  # int8 weight, per-tensor scale and zero point


def _bnb8_setup(w):
    import bitsandbytes as bnb
    N, K = w.shape
    m = bnb.nn.Linear8bitLt(K, N, bias=False, has_fp16_weights=False, threshold=THRESHOLD)
    m.weight = bnb.nn.Int8Params(w.cpu().clone(), requires_grad=False, has_fp16_weights=False)
    m = m.to(w.device)  # quantizes
    return m, m.weight.nbytes + m.weight.SCB.nbytes


def _bnb4_setup(w, dtype):
    import bitsandbytes as bnb
    N, K = w.shape
    m = bnb.nn.Linear4bit(K, N, bias=False, compute_dtype=dtype, quant_type="nf4")
    m.weight = bnb.nn.Params4bit(w.cpu().clone(), requires_grad=False, quant_type="nf4")
    m = m.to(w.device)  # quantizes
    return m, m.weight.nbytes + m.weight.quant_state.absmax.nbytes


def _int_mm_setup(w):
    q, s = R.quantize_int8_rowwise(w)
    return (q.t(), s), q.nbytes + s.nbytes  # [K, N] column-major: the layout cuBLASLt wants


def _int_mm_call(state, x):
    sa = x.abs().amax(1, keepdim=True).float().clamp_min(1e-12) / 127
    a = (x.float() / sa).round_().to(torch.int8)
    return (torch._int_mm(a, state[0]).float() * sa * state[1]).to(x.dtype)


def baseline_methods(device: torch.device, dtype: torch.dtype) -> List[Method]:
    out = [_linear(d) for d in dict.fromkeys([torch.float32, torch.bfloat16, dtype])]
    if device.type == "cpu" and "fbgemm" in torch.backends.quantized.supported_engines:
        out.append(Method("ao quantize_dynamic qint8", "baseline", "fbgemm", _qdynamic_setup,
                          lambda m, x: m(x), torch.float32))
    if importlib.util.find_spec("bitsandbytes") is not None:
        out.append(Method("bnb Linear8bitLt thr6", "baseline", "bitsandbytes", _bnb8_setup, lambda m, x: m(x)))
        out.append(Method("bnb Linear4bit nf4", "baseline", "bitsandbytes", lambda w: _bnb4_setup(w, dtype),
                          lambda m, x: m(x)))
    if device.type == "cuda":
        out.append(Method("torch._int_mm w8a8 dyn", "baseline", "torch", _int_mm_setup, _int_mm_call))
    return out


def load_kernels(device: torch.device) -> None:
    """Imports whichever kernels exist: importing them registers them with the dispatcher."""
    for name in ["quantkernels._C"] + (["quantkernels.triton"] if device.type == "cuda" else []):
        try:
            importlib.import_module(name)
        except Exception as e:  # not built yet, or the package is mid-edit: the reference still runs
            print(f"note: {name} not loaded ({type(e).__name__}: {e})", file=sys.stderr)


class _NoBar:
    """What sweep() uses of a tqdm bar, when tqdm is not installed."""

    def __init__(self, **_):
        pass

    def set_description(self, _):
        pass

    def update(self, _=1):
        pass

    def write(self, text):
        print(text, file=sys.stderr)

    def close(self):
        pass


def make_activations(M: int, K: int, gen: torch.Generator) -> torch.Tensor:
    """randn with ~0.5% columns scaled by 60: the outlier features LLM.int8() is built for."""
    x = torch.randn(M, K, generator=gen)
    cols = torch.randperm(K, generator=gen)[: max(1, round(OUTLIER_FRACTION * K))]
    x[:, cols] *= OUTLIER_SCALE
    return x


def sweep(args, device: torch.device, dtype: torch.dtype, rotate_bytes: int) -> List[dict]:
    shapes = [tuple(int(v) for v in s.lower().split("x")) for s in args.shapes]
    methods = [scheme_method(k, b) for k in args.schemes for b in backends_for(SCHEMES[k], device)
               if b in args.backends] + baseline_methods(device, dtype)
    gen = torch.Generator().manual_seed(args.seed)
    rows = []
    bar = (tqdm or _NoBar)(total=len(shapes) * len(methods) * len(args.m), file=sys.stderr, unit="case")
    for K, N in shapes:
        w = (torch.randn(N, K, generator=gen) * 0.02).to(device)
        xs = {M: make_activations(M, K, gen).to(device) for M in args.m}
        for meth in methods:
            bar.set_description(f"{K}x{N} {meth.name}")
            try:
                state, nbytes = meth.setup(w)
            except Exception as e:
                bar.write(f"skip {meth.name} at {K}x{N}: setup failed ({type(e).__name__}: {e})")
                bar.update(len(args.m))
                continue
            states = [state]
            for M in args.m:
                bar.update(1)
                if meth.backend == "reference" and M * N * K > REF_MAX_MNK and not args.reference_all:
                    continue
                # The reference re-reads its weight as fp64 every call, far beyond any cache: no rotation.
                decode = M <= DECODE_MAX_M and meth.backend != "reference"
                copies = max(1, min(MAX_COPIES, math.ceil(rotate_bytes / nbytes))) if decode else 1
                states += [meth.setup(w)[0] for _ in range(copies - len(states))]
                x, cycle = xs[M].to(meth.dtype or dtype), itertools.cycle(states[:copies])
                try:
                    sec, n = H.time_fn(lambda: meth.call(next(cycle), x), device, args.runs, args.min_run_time,
                                       args.max_run_time)
                except Exception as e:  # e.g. _int_mm's M > 16 rule: leave the cell empty
                    bar.write(f"skip {meth.name} M={M} at {K}x{N}: {type(e).__name__}: {str(e)[:200]}")
                    continue
                rows.append(dict(K=K, N=N, M=M, method=meth.name, scheme=meth.scheme, backend=meth.backend,
                                 dtype=DTYPE_NAMES[meth.dtype or dtype], median_ms=sec * 1e3,
                                 runs="" if n is None else n, gflops=2 * M * N * K / sec / 1e9,
                                 weight_bytes=nbytes, weight_gbps=nbytes / sec / 1e9, copies=copies, speedup=""))
            del states, state
    bar.close()
    base = {(r["K"], r["N"], r["M"]): r["median_ms"] for r in rows if r["method"] == f"F.linear {DTYPE_NAMES[dtype]}"}
    for r in rows:
        if (r["K"], r["N"], r["M"]) in base:
            r["speedup"] = base[r["K"], r["N"], r["M"]] / r["median_ms"]
    return rows


def _fmt(v: float) -> str:
    return f"{v:.0f}" if v >= 100 else f"{v:.3g}"


def markdown(rows: List[dict], header: List[str], args, unit: str, scale: float, base: str) -> str:
    lines = header
    for K, N in dict.fromkeys((r["K"], r["N"]) for r in rows):
        shape_rows = [r for r in rows if (r["K"], r["N"]) == (K, N)]
        ms = sorted({r["M"] for r in shape_rows})
        lines += ["", f"### K={K}, N={N}  (cells: median ms / {unit} / speedup vs {base}; "
                  f"n = timed samples where fewer than {args.runs})", "",
                  f"| method | weight MB | {' | '.join(f'M={M}' for M in ms)} | weight GB/s (M={ms[0]}) |",
                  "|---" * (len(ms) + 3) + "|"]
        for method in dict.fromkeys(r["method"] for r in shape_rows):
            by_m = {r["M"]: r for r in shape_rows if r["method"] == method}
            cells = []
            for M in ms:
                r = by_m.get(M)
                cell = "-" if r is None else f"{_fmt(r['median_ms'])} / {_fmt(r['gflops'] / scale)}"
                if r is not None and r["speedup"] != "":
                    cell += f" / {r['speedup']:.2f}x"
                if r is not None and r["runs"] != "" and r["runs"] < args.runs:
                    cell += f" (n={r['runs']})"
                cells.append(cell)
            any_row, first = next(iter(by_m.values())), by_m.get(ms[0])
            gbps = "-" if first is None else f"{first['weight_gbps']:.1f}"
            lines.append(f"| {method} | {_fmt(any_row['weight_bytes'] / 1e6)} | {' | '.join(cells)} | {gbps} |")
    return "\n".join(lines) + "\n"


def parse_args(argv=None, prog: str = "python -m quantkernels.bench.gemm"):
    p = argparse.ArgumentParser(prog=prog, description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--m", type=int, nargs="+", help=f"token counts M (default {FULL['m']})")
    p.add_argument("--shapes", nargs="+", help=f"KxN layer shapes, weight [N, K] (default {FULL['shapes']})")
    p.add_argument("--schemes", nargs="+", choices=list(SCHEMES), default=list(SCHEMES))
    p.add_argument("--backends", nargs="+", choices=["reference", "native", "triton"],
                   default=["reference", "native", "triton"], help="used where available")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--dtype", choices=list(DTYPES), help="activation dtype (default fp32 on cpu, bf16 on cuda)")
    p.add_argument("--runs", type=int, help="timed samples per case, at least (default 20)")
    p.add_argument("--min-run-time", type=float, help="seconds of sampling per case, at least (default 0.2)")
    p.add_argument("--max-run-time", type=float, help="stop sampling after this, given 3 samples (default 5)")
    p.add_argument("--bandwidth-gib", type=float, help="size of the memory bandwidth probe, 0 skips (default 1)")
    p.add_argument("--reference-all", action="store_true",
                   help=f"also time the (slow) reference backend where M*N*K > {REF_MAX_MNK}")
    p.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path(DEFAULT_OUT),
                   help=f"output directory, created if missing (default: ./{DEFAULT_OUT}, under the current directory)")
    p.add_argument("--quick", action="store_true", help=f"smoke run: {QUICK}, no weight rotation")
    args = p.parse_args(argv)
    for k, v in (QUICK if args.quick else FULL).items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device")
    return args


def main(argv=None, prog: str = "python -m quantkernels.bench.gemm") -> dict:
    """Runs the sweep, prints the tables, writes CSV/markdown/PNGs.

    Returns {"rows", "csv", "md", "png", "speedup_png", "no_plot"}: the PNG paths are None when not
    written, and "no_plot" then says why (e.g. matplotlib missing), else it is None.
    """
    args = parse_args(argv, prog)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    load_kernels(device)
    info = H.machine_info(device)
    cache = H.last_level_cache_bytes(device)
    rotate_bytes = 0 if args.quick else 3 * cache  # the copies together outgrow the cache 3x
    if os.getloadavg()[0] > (os.cpu_count() or 1) - torch.get_num_threads() + 1:
        print(f"warning: load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs: other processes compete, "
              f"and {torch.get_num_threads()} threads will wait on each other (try --threads 1)", file=sys.stderr)
    bw = H.read_bandwidth(device, args.bandwidth_gib) if args.bandwidth_gib > 0 else float("nan")
    load_before = os.getloadavg()[0]
    with torch.inference_mode():
        rows = sweep(args, device, dtype, rotate_bytes)
    load = f"{load_before:.1f} -> {os.getloadavg()[0]:.1f}"  # > the thread count: other processes compete
    if not rows:
        raise SystemExit("no case ran")

    unit, scale = ("TFLOP/s", 1e3) if device.type == "cuda" else ("GFLOP/s", 1.0)
    base = f"F.linear {DTYPE_NAMES[dtype]}"
    native = sorted({r["scheme"] for r in rows if r["backend"] in ("native", "triton")})
    header = [f"# GEMM microbenchmark: {device.type}, {DTYPE_NAMES[dtype]} activations", "",
              *(f"- {k}: {v}" for k, v in info.items()),
              f"- load average (1 min) before -> after the sweep: {load} (on {os.cpu_count()} CPUs)",
              f"- memory read bandwidth: {bw:.1f} GB/s (sum over {args.bandwidth_gib:g} GiB fp32)",
              f"- last-level cache {cache / 2**20:.0f} MiB; decode (M <= {DECODE_MAX_M}) rotates over "
              f"{'no' if rotate_bytes == 0 else f'>= {rotate_bytes / 2**20:.0f} MiB of'} weight copies",
              f"- native/triton kernels for: {', '.join(native) or 'none (reference only)'}; reference skipped "
              f"where M*N*K > 2^31 unless --reference-all",
              f"- activations: randn, {OUTLIER_FRACTION:.1%} of columns x{OUTLIER_SCALE:g} (outliers); "
              f"weights quantized once outside the timing; w8a8/w4a8 time include activation quantization",
              f"- timing: {'triton do_bench median' if device.type == 'cuda' else 'torch.utils.benchmark, median'}; "
              f"weight GB/s = stored quantized weight bytes (with scales/zeros) / time"]
    md = markdown(rows, header, args, unit, scale, base)
    print(md)

    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"gemm_{device.type}_{info['date'][:10]}{'_quick' if args.quick else ''}"
    paths = {"rows": rows, "csv": stem.with_suffix(".csv"), "md": stem.with_suffix(".md"), "png": None,
             "speedup_png": None, "no_plot": None}
    H.write_csv(paths["csv"], rows)
    paths["md"].write_text(md)
    wrote = [paths["csv"], paths["md"]]
    if H.pyplot() is None:  # optional (quantkernels[bench]): say so once, no traceback
        paths["no_plot"] = H.NO_MATPLOTLIB
        print(H.NO_MATPLOTLIB, file=sys.stderr)
    else:
        paths["png"], paths["speedup_png"] = stem.with_suffix(".png"), stem.with_name(stem.name + "_speedup.png")
        for key, why in (("png", H.plot(paths["png"], rows, unit, scale)),
                         ("speedup_png", H.speedup_plot(paths["speedup_png"], rows, base))):
            if why:
                print(why, file=sys.stderr)
                paths[key], paths["no_plot"] = None, why
            else:
                wrote.append(paths[key])
    print(f"wrote {', '.join(map(str, wrote))}", file=sys.stderr)
    return paths


if __name__ == "__main__":
    main()
