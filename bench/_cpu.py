"""Pieces the developer CPU kernel benchmarks share (bench/vnni_int8.py, vnni_w4a8.py,
avx512_weight_only.py, bf16_decode.py): the CPU's name, a call under a forced ISA level, and
medians of candidates timed in interleaved rounds (the machine is shared: noise then hits every
candidate alike)."""

import os
import platform
import random
import statistics
import time


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def with_isa(isa, fn):
    """``fn`` wrapped to run with QUANTKERNELS_CPU_ISA=isa (None: unset, the best level), then restore it."""
    def run():
        old = os.environ.get("QUANTKERNELS_CPU_ISA")
        if isa is None:
            os.environ.pop("QUANTKERNELS_CPU_ISA", None)
        else:
            os.environ["QUANTKERNELS_CPU_ISA"] = isa
        try:
            return fn()
        finally:
            if old is None:
                os.environ.pop("QUANTKERNELS_CPU_ISA", None)
            else:
                os.environ["QUANTKERNELS_CPU_ISA"] = old
    return run


def rotated(cands, r):
    """The (name, fn) pairs of ``cands`` in round ``r``'s order: a permutation drawn per round (seeded by
    r, so runs repeat). A fixed order, or a rotation of it, keeps each candidate right after the same
    one, so a candidate that always follows the one that evicts the caches (bf16 F.linear's 32 MiB of
    weights at 4096 x 4096) always finds its weights in DRAM while the next ones find them in L3."""
    items = list(cands.items())
    random.Random(1000003 * r + 17).shuffle(items)
    return items


def interleaved(cands, rounds, inner=1, warmup=1, clock=time.perf_counter):
    """cands: {name: fn}. Per round, each candidate once (``inner`` calls, time per call on ``clock``);
    each round in its own order (see rotated). Returns {name: median ms}."""
    for fn in cands.values():
        for _ in range(warmup):
            fn()
    times = {k: [] for k in cands}
    for r in range(rounds):
        for k, fn in rotated(cands, r):
            t0 = clock()
            for _ in range(inner):
                fn()
            times[k].append((clock() - t0) * 1e3 / inner)
    return {k: statistics.median(v) for k, v in times.items()}
