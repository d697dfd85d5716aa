"""Concurrency and leaks (issue 18): 8 Python threads calling the same QuantLinear modules with
different inputs give results bit-identical to running them one by one; the modules work in forked
DataLoader workers; 10,000 forward calls leave resident memory flat. The figures are recorded in
bench/results/reliability.md (``python tests/test_concurrency.py`` prints them)."""

import os
import threading

import pytest
import torch
from torch import nn

import quantkernels as qk

SCHEMES = tuple(qk.SCHEMES)
THREADS = 8
CALLS = 10_000


class AllSchemes(nn.Module):
    """One QuantLinear per scheme in sequence: a forward runs every scheme's kernels."""

    def __init__(self, d=256):
        super().__init__()
        torch.manual_seed(0)
        self.layers = nn.ModuleList(qk.QuantLinear.from_linear(nn.Linear(d, d), s, group_size=64) for s in SCHEMES)

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


def inputs(n, m=5, d=256):
    g = torch.Generator().manual_seed(123)
    return [torch.randn(m + i % 3, d, generator=g) for i in range(n)]  # different M per input too


@torch.inference_mode()
def test_threads_bit_identical_to_sequential():
    model = AllSchemes().eval()
    xs = inputs(THREADS)
    expected = [model(x) for x in xs]
    results = [[] for _ in range(THREADS)]
    errors = []
    start = threading.Barrier(THREADS)

    def work(i):
        try:
            start.wait()
            for _ in range(10):  # interleave calls on the same modules
                results[i].append(model(xs[i]))
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not any(t.is_alive() for t in threads), "a thread hung"
    assert not errors, errors
    for i in range(THREADS):
        assert len(results[i]) == 10
        for y in results[i]:
            assert torch.equal(y, expected[i]), f"thread {i} differs from the sequential result"


class Forwarded(torch.utils.data.Dataset):
    def __init__(self, model, xs):
        self.model, self.xs = model, xs

    def __len__(self):
        return len(self.xs)

    def __getitem__(self, i):
        with torch.inference_mode():
            return self.model(self.xs[i]), os.getpid()


def test_forked_dataloader_workers():
    import multiprocessing as mp

    if "fork" not in mp.get_all_start_methods():
        pytest.skip("no fork on this platform")
    model = AllSchemes().eval()
    xs = [x[:4] for x in inputs(8)]
    with torch.inference_mode():
        expected = [model(x) for x in xs]
    loader = torch.utils.data.DataLoader(Forwarded(model, xs), batch_size=None, num_workers=2,
                                         multiprocessing_context="fork", timeout=120)
    got, pids = [], set()
    for y, pid in loader:
        got.append(y)
        pids.add(pid)
    assert os.getpid() not in pids and len(pids) == 2  # really computed in two forked workers
    assert len(got) == len(xs)
    for y, e in zip(got, expected):
        assert torch.equal(y, e)


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@torch.inference_mode()
def forward_rss(calls: int = CALLS, warmup: int = 500):
    """(RSS after warm-up, RSS after ``calls`` more QuantLinear forward calls, seconds): the calls
    cycle through the five schemes' layers (K = N = 128, M = 4)."""
    import time

    layers = list(AllSchemes(d=128).eval().layers)
    xs = inputs(4, m=4, d=128)
    for i in range(warmup):
        layers[i % len(layers)](xs[i % 4])
    before = rss_bytes()
    t0 = time.perf_counter()
    for i in range(calls):
        layers[i % len(layers)](xs[i % 4])
    return before, rss_bytes(), time.perf_counter() - t0


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="needs /proc (Linux)")
def test_forward_calls_leave_rss_flat():
    before, after, _ = forward_rss()
    # one leaked [4, 128] fp32 output (2 KiB) per call would be 20 MiB over 10,000 calls
    assert after - before < 4 * 2**20, f"RSS grew by {(after - before) / 2**20:.1f} MiB over {CALLS} calls"


if __name__ == "__main__":  # the figures for bench/results/reliability.md
    b, a, s = forward_rss()
    print(f"{CALLS} QuantLinear forward calls ({CALLS // len(SCHEMES)} per scheme, M = 4, K = N = 128): "
          f"RSS {b / 2**20:.1f} MiB -> {a / 2**20:.1f} MiB ({(a - b) / 2**10:+.0f} KiB), {s:.1f} s "
          f"({s / CALLS * 1e6:.0f} us per call), {torch.get_num_threads()} torch threads")
