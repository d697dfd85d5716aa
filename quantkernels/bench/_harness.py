"""Shared pieces of the microbenchmarks: timing, facts about the machine, report files."""

from __future__ import annotations

import csv
import datetime
import platform
import statistics
import time
from pathlib import Path
from typing import Callable, List, Optional, Tuple

import torch
from torch.utils import benchmark


def time_fn(fn: Callable[[], object], device: torch.device, runs: int = 20, min_run_time: float = 0.2,
            max_run_time: float = 5.0) -> Tuple[float, Optional[int]]:
    """Median seconds per call of ``fn()`` after warm-up, and how many timed samples it took.

    CPU: ``torch.utils.benchmark`` samples until there are ``runs`` of them and ``min_run_time``
    has passed, or ``max_run_time`` has passed with at least 3 (slow baselines). CUDA:
    ``triton.testing.do_bench`` (flushes L2 between calls; sample count unknown: None).
    """
    if device.type == "cuda":
        return _time_cuda(fn, runs, min_run_time)
    timer = benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    est = timer.timeit(1).median  # warm-up: allocator, lazy init, first-touch of the weights
    if est < 0.1:
        est = timer.timeit(1).median  # a second, representative call to size the batches
    number = max(1, int(1e-3 / max(est, 1e-9)))  # batch sub-ms calls: timer overhead stays < 1%
    times: List[float] = []
    start = time.perf_counter()
    while True:
        times.append(timer.timeit(number).median)
        elapsed = time.perf_counter() - start
        if (len(times) >= runs and elapsed >= min_run_time) or (elapsed >= max_run_time and len(times) >= min(3, runs)):
            return statistics.median(times), len(times)


def _time_cuda(fn, runs: int, min_run_time: float) -> Tuple[float, Optional[int]]:
    try:
        from triton.testing import do_bench
    except ImportError:  # CUDA events, no L2 flush
        fn()
        torch.cuda.synchronize()
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(runs)]
        for start, end in events:
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize()
        return statistics.median(s.elapsed_time(e) for s, e in events) / 1e3, runs
    return do_bench(fn, warmup=25, rep=max(100, int(1e3 * min_run_time)), return_mode="median") / 1e3, None


def read_bandwidth(device: torch.device, gib: float = 1.0) -> float:
    """Memory read bandwidth in GB/s: ``sum()`` over a ``gib`` GiB fp32 tensor (far beyond any cache)."""
    t = torch.ones(int(gib * 2**30) // 4, device=device)
    sec, _ = time_fn(t.sum, device, runs=5, min_run_time=0.2, max_run_time=3.0)
    return t.nbytes / sec / 1e9


def last_level_cache_bytes(device: torch.device) -> int:
    """L2 of the GPU, or L3 of the CPU (32 MiB if /sys does not tell)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).L2_cache_size
    try:
        size = Path("/sys/devices/system/cpu/cpu0/cache/index3/size").read_text().strip()
        return int(size[:-1]) * {"K": 2**10, "M": 2**20}[size[-1]]
    except (OSError, ValueError, KeyError):
        return 32 * 2**20


def machine_info(device: torch.device) -> dict:
    """Date, versions, threads, CPU model and SIMD flags (and the GPU when on CUDA)."""
    model, flags = platform.processor() or "unknown", []
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
        model = next(line.split(":", 1)[1].strip() for line in cpuinfo.splitlines() if line.startswith("model name"))
        all_flags = next(line.split(":", 1)[1].split() for line in cpuinfo.splitlines() if line.startswith("flags"))
        flags = [f for f in ("avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8") if f in all_flags]
    except (OSError, StopIteration):
        pass
    info = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "torch": torch.__version__,
            "python": platform.python_version(), "threads": torch.get_num_threads(),
            "cpu": f"{model} ({torch.get_num_threads()} threads; {' '.join(flags) or 'no AVX2'})"}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def write_csv(path: Path, rows: List[dict]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


#: what the runs say instead of a PNG when matplotlib (an optional dependency) is missing.
NO_MATPLOTLIB = ("matplotlib is not installed: no PNG plots (pip install 'quantkernels[bench]', or "
                 "pip install matplotlib); the markdown and CSV are written")


def pyplot():
    """``matplotlib.pyplot`` on the non-interactive Agg backend, or None when matplotlib is missing."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def _panels(path: Path, rows: List[dict], value: Callable[[dict], float], ylabel: str, height: float,
            ref_line: Optional[float] = None) -> Optional[str]:
    """One log-log panel per (K, N) shape, ``value(row)`` against M, a line per method."""
    plt = pyplot()
    if plt is None:
        return NO_MATPLOTLIB
    shapes = list(dict.fromkeys((r["K"], r["N"]) for r in rows))
    fig, axes = plt.subplots(1, len(shapes), figsize=(6 * len(shapes), height), squeeze=False)
    for ax, (K, N) in zip(axes[0], shapes):
        for method in dict.fromkeys(r["method"] for r in rows):
            pts = sorted((r["M"], value(r)) for r in rows if (r["K"], r["N"], r["method"]) == (K, N, method))
            if pts:
                ax.plot(*zip(*pts), marker="o", label=method)
        if ref_line is not None:
            ax.axhline(ref_line, color="k", lw=0.8)
        ax.set(xscale="log", yscale="log", xlabel="M (tokens)", ylabel=ylabel, title=f"K={K}, N={N}")
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


def plot(path: Path, rows: List[dict], unit: str, scale: float) -> Optional[str]:
    """Throughput (``unit``: GFLOP/s / ``scale``) vs M. Returns why not, if skipped."""
    return _panels(path, rows, lambda r: r["gflops"] / scale, unit, 5)


def speedup_plot(path: Path, rows: List[dict], base: str) -> Optional[str]:
    """Speedup over the float baseline ``base`` vs M, a line per scheme x backend. Returns why not, if skipped."""
    rows = [r for r in rows if r.get("speedup") not in ("", None)]
    if not rows:
        return f"no speedup values (no {base} rows): no speedup plot"
    return _panels(path, rows, lambda r: r["speedup"], f"speedup vs {base}", 4.5, ref_line=1.0)
