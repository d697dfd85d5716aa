"""Every Triton kernel compiles for real GPU targets (sm_80, sm_90) without a GPU, and the
int8 GEMMs run on the integer tensor cores: the SASS holds ``IMMA`` (sm_80, ``mma.sync``) or
``IGMMA`` / ``IMMA`` (sm_90). Runs ``quantkernels.triton.compile_check`` in a subprocess:
the compiler cannot run in a process whose Triton is in interpreter mode (test_triton.py).
The default test compiles each kernel's default config; ``-m slow`` compiles every autotune
config and constexpr variant (the sweep behind bench/results/triton_compile.md).
"""

import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")

# quantkernels/_native.py may be missing on this branch; the subprocess then stubs it.
_BOOT = """
import os, sys, types
if not os.path.exists(os.path.join({root!r}, "quantkernels", "_native.py")):
    m = types.ModuleType("quantkernels._native")
    m.AVAILABLE, m.REASON, m.load = False, "not in this tree", lambda: False
    sys.modules["quantkernels._native"] = m
sys.path.insert(0, {root!r})
from quantkernels.triton.compile_check import main
main(sys.argv[1:])
"""


def _compile(tmp_path, *flags):
    out = tmp_path / "cc.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-c", _BOOT.format(root=str(ROOT)), "--json", str(out), *flags],
                       cwd=ROOT, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    return json.loads(out.read_text())


def _check(results):
    assert {r["cc"] for r in results} == {80, 90}
    for r in results:
        where = f"{r['name']} [{r['variant']}] config {r['config_index']} sm_{r['cc']}"
        assert r["local"] == 0, f"{where}: spills {r['local']} bytes to local memory"
        if r["name"] in ("int8_gemm", "w8a8_gemm", "llm_int8_linear", "w4a8_gemm"):
            ops = " ".join(r["mma"])
            want = ("IMMA",) if r["cc"] == 80 else ("IGMMA", "IMMA")
            assert any(w in ops for w in want), f"{where}: no {' / '.join(want)} in the SASS (found: {ops or 'none'})"
            assert "S8.S8" in ops, f"{where}: tensor-core ops are not int8 x int8: {ops}"


def test_default_configs_compile_for_sm80_sm90(tmp_path):
    results = _compile(tmp_path, "--quick")
    assert {r["name"] for r in results} >= {"int8_gemm", "w4a8_gemm", "w4a16_gemm", "w8a16_gemm",
                                            "quantize_int8_rowwise", "quantize_int8_rowwise_outliers", "gemm_4bit"}
    _check(results)


@pytest.mark.slow
def test_every_config_compiles_for_sm80_sm90(tmp_path):
    _check(_compile(tmp_path))
