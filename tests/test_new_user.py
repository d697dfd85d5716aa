"""What a new user hits first: loaded models come back in eval mode (no live dropout), and running
from an unbuilt source checkout says what happened and how to fix it."""

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

import quantkernels as qk


class DropoutNet(nn.Module):
    """Two linear layers with live dropout between them when in training mode (like BERT's)."""

    def __init__(self):
        super().__init__()
        self.up = nn.Linear(128, 256)
        self.drop = nn.Dropout(0.5)
        self.down = nn.Linear(256, 64)

    def forward(self, x):
        return self.down(self.drop(torch.relu(self.up(x))))


def skeleton():
    """A float skeleton built the way ``from_config`` builds one: in training mode."""
    with qk.init_empty_weights():
        m = DropoutNet()
    assert m.training and m.drop.training
    return m


def assert_eval_and_deterministic(model, ref):
    assert not any(m.training for m in model.modules()), [n for n, m in model.named_modules() if m.training]
    x = torch.randn(4, 128)
    a, b = model(x), model(x)
    assert torch.equal(a, b), "two forwards differ: dropout is live"
    assert torch.equal(a, ref(x))


def test_load_quantized_returns_eval_mode(tmp_path):
    ref = qk.quantize_model(DropoutNet().eval(), "w8a8")
    qk.save_quantized(ref, tmp_path)
    loaded = qk.load_quantized(skeleton(), tmp_path)
    assert_eval_and_deterministic(loaded, ref)


def test_load_gptq_checkpoint_returns_eval_mode(tmp_path):
    ref = qk.quantize_model(DropoutNet().eval(), "w4a16", group_size=64)
    qk.save_gptq_checkpoint(ref, str(tmp_path), checkpoint_format="gptq_v2", scale_dtype=torch.float32)
    loaded = qk.load_gptq_checkpoint(DropoutNet(), str(tmp_path))  # a float model in training mode
    assert_eval_and_deterministic(loaded, ref)


def test_load_bnb_int8_returns_eval_mode(tmp_path):
    pytest.importorskip("safetensors")
    from safetensors.torch import save_file

    float_model = DropoutNet().eval()
    sd = {}
    for name in ("up", "down"):
        lin = getattr(float_model, name)
        w = lin.weight.detach()
        scb = w.abs().amax(1)
        sd[f"{name}.weight"] = torch.round(w * (127.0 / scb[:, None])).to(torch.int8)
        sd[f"{name}.SCB"] = scb
        sd[f"{name}.bias"] = lin.bias.detach().clone()
    save_file(sd, str(tmp_path / "model.safetensors"))
    loaded = qk.load_bnb_int8(skeleton(), tmp_path)
    assert not any(m.training for m in loaded.modules())
    x = torch.randn(4, 128)
    assert torch.equal(loaded(x), loaded(x))


# --------------------------------------------------------------------------- running from a source checkout


def _copy_source_tree(dst: Path) -> Path:
    """The package's Python files (and data), without the compiled extension, as in a fresh clone."""
    src = Path(qk.__file__).parent
    shutil.copytree(src, dst / "quantkernels",
                    ignore=lambda d, names: [n for n in names if n.endswith((".so", ".pyd")) or n == "__pycache__"])
    root = src.parent
    for f in ("pyproject.toml", "setup.py"):
        if (root / f).is_file():
            shutil.copy(root / f, dst / f)
    assert not list((dst / "quantkernels").glob("_C*"))
    return dst


# This venv may hold an editable install, whose import finder would load the checkout's _C for the
# copied package too; the reporter had a plain `pip install .`: drop editable finders first.
NON_EDITABLE = ("import sys\n"
                "sys.meta_path[:] = [f for f in sys.meta_path if 'editable' not in getattr(f, '__module__', '')\n"
                "                    and 'editable' not in type(f).__module__]\n")


def test_unbuilt_source_tree_warning_names_paths_and_fix(tmp_path):
    checkout = _copy_source_tree(tmp_path / "checkout")
    # an installed (non-editable) build elsewhere on sys.path, as `pip install .` leaves in site-packages
    site = tmp_path / "site"
    (site / "quantkernels").mkdir(parents=True)
    (site / "quantkernels" / "__init__.py").write_text("")
    (site / "quantkernels" / "_C.abi3.so").write_bytes(b"")
    code = NON_EDITABLE + textwrap.dedent("""
        import warnings
        warnings.simplefilter("always")
        with warnings.catch_warnings(record=True) as w:
            import quantkernels as qk
        import torch
        from quantkernels import _native
        print("FILE", qk.__file__)
        print("AVAILABLE", _native.AVAILABLE)
        for x in w:
            if "native extension" in str(x.message):
                print("WARNING", str(x.message).replace("\\n", " "))
        # the ops still work, on the reference
        torch.manual_seed(0)
        lin = torch.nn.Linear(64, 32)
        q = qk.QuantLinear.from_linear(lin, "w8a8")
        x = torch.randn(3, 64)
        ref = qk.QuantLinear.from_linear(lin, "w8a8", backend="reference")
        print("OPS", torch.equal(q(x), ref(x)), (q(x) - lin(x)).abs().max().item() < 0.05)
        """)
    env = dict(os.environ, PYTHONPATH=str(site), QUANTKERNELS_BACKEND="")
    env.pop("QUANTKERNELS_BACKEND")
    r = subprocess.run([sys.executable, "-c", code], cwd=checkout, env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert f"FILE {checkout / 'quantkernels' / '__init__.py'}" in out, out
    assert "AVAILABLE False" in out
    assert "OPS True True" in out
    warning = next(line for line in out.splitlines() if line.startswith("WARNING"))
    assert "circular import" not in warning, warning
    assert str(checkout / "quantkernels") in warning, warning
    assert str(site / "quantkernels") in warning, warning
    assert "source tree" in warning and "without a built extension" in warning, warning
    assert "another directory" in warning, warning
    assert "pip install --no-build-isolation -e ." in warning and "build_ext --inplace" in warning, warning


def test_unbuilt_source_tree_without_installed_build(tmp_path):
    """No build next to the imported tree (and perhaps none installed): the warning names the tree and
    how to build it, without the circular-import red herring."""
    checkout = _copy_source_tree(tmp_path / "checkout")
    code = (NON_EDITABLE + "import warnings; warnings.simplefilter('always')\n"
            "import quantkernels, quantkernels._native as n; print('REASON', n.REASON)\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=checkout, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "circular import" not in r.stdout + r.stderr
    assert str(checkout / "quantkernels") in r.stderr and "build_ext --inplace" in r.stderr, r.stderr
