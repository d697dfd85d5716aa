"""Smoke tests of the GEMM microbenchmark harness (bench/gemm.py) in --quick mode."""

import csv
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/ is a repo folder, not an installed package
pytest.importorskip("tqdm")
from bench import gemm  # noqa: E402

FAST = ["--quick", "--runs", "1", "--min-run-time", "0", "--max-run-time", "0.2", "--bandwidth-gib", "0.01"]


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_quick_sweep_writes_every_scheme_and_baseline(tmp_path):
    out = gemm.main(FAST + ["--out", str(tmp_path)])
    rows = _rows(out["csv"])
    assert out["md"].read_text().count("### K=256, N=256") == 1
    for scheme in gemm.SCHEMES:
        got = {int(r["M"]) for r in rows if r["scheme"] == scheme and r["backend"] == "reference"}
        assert got == {1, 16}, f"{scheme}: reference rows for M in {got}"
    expected = {"F.linear fp32", "F.linear bf16"}
    if "fbgemm" in torch.backends.quantized.supported_engines:
        expected.add("ao quantize_dynamic qint8")
    assert expected <= {r["method"] for r in rows if r["scheme"] == "baseline"}
    assert all(float(r["median_ms"]) > 0 and float(r["gflops"]) > 0 for r in rows)
    assert all(float(r["speedup"]) > 0 for r in rows)  # every row has the F.linear fp32 of its M


def test_native_kernel_is_picked_up(tmp_path):
    """A CPU kernel registered for every op of a scheme makes a "native" row appear."""
    if torch._C._dispatch_has_kernel_for_dispatch_key("quantkernels::w8a16_gemm", "CPU"):
        lib = None  # the real kernel is built: it must show up by itself
    else:
        lib = torch.library.Library("quantkernels", "IMPL")
        lib.impl("w8a16_gemm", gemm.R.w8a16_gemm, "CPU")
    try:
        out = gemm.main(FAST + ["--out", str(tmp_path), "--m", "1", "--schemes", "w8a16", "--backends", "native"])
    finally:
        if lib is not None:
            lib._destroy()
    methods = {r["method"] for r in _rows(out["csv"])}
    assert "w8a16 (native)" in methods and "w8a16 (reference)" not in methods


def test_cpu_accuracy_table(tmp_path):
    # The claim the CPU results make about fbgemm: its 7-bit activations cost SQNR.
    from bench import cpu_accuracy

    table = cpu_accuracy.rows()
    plain, outl = table[0][1], table[1][1]
    assert plain["w8a8 (ours)"] > 37.0 and plain["w8a8 (ours)"] > plain["fbgemm quantize_dynamic qint8"] + 3.0
    assert outl["llm_int8 thr6 (ours)"] > 38.0 > outl["w8a8 (ours)"]
    cpu_accuracy.main(["--out", str(tmp_path)])
    assert "| w8a8 (ours) |" in (tmp_path / "cpu_accuracy.md").read_text()
def test_weight_only_cuda_targets_table():
    """bench/weight_only_cuda.py's verdicts against issue 5's targets, from synthetic rows."""
    from bench import weight_only_cuda as wo

    def row(method, scheme, backend, M, ms):
        return dict(K=4096, N=4096, M=M, method=method, scheme=scheme, backend=backend, median_ms=ms)

    rows = [row("F.linear bf16", "baseline", "torch", 1, 1.0), row("w4a16 g128 asym (native)", "w4a16", "native", 1, 0.25),
            row("w8a16 (native)", "w8a16", "native", 1, 0.5),
            row("F.linear bf16", "baseline", "torch", 16, 1.0), row("w4a16 g128 asym (native)", "w4a16", "native", 16, 0.5),
            row("F.linear bf16", "baseline", "torch", 64, 1.0)]
    md = wo.targets_table(rows)
    lines = {ln.split("|")[3].strip(): ln for ln in md.splitlines() if ln.startswith("| 4096 |")}
    assert "4.00x" in lines["1"] and ">= 3.3x met" in lines["1"] and "2.00x" in lines["1"]
    assert "2.00x" in lines["16"] and ">= 3.3x MISSED" in lines["16"]
    assert "no result" in lines["64"]
    assert "Targets missed: 2." in md
    tc = [dict(row("w4a16 g128 asym (native)", "w4a16", "native", 1, 0.5), method="w4a16 g128 asym (native)")]
    dec = wo.decode_table(rows, tc)
    line = next(ln for ln in dec.splitlines() if ln.startswith("| w4a16 |"))
    assert "0.2500 (4.00x)" in line and "0.5000 (2.00x)" in line and line.endswith("| GEMV |")
    assert not any(ln.startswith("| w8a16 |") for ln in dec.splitlines())  # no tensor-core row for it
