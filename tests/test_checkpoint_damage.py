"""Checkpoints under attack (issue 18): generated damage to our format and to the GPTQ import
(truncation at random offsets, flipped bytes in the safetensors header, the JSON config and the
tensor data, a header that claims more bytes than the file has) and crafted damage (wrong shapes
and dtypes, a format version from the future, missing and extra tensors, a config naming layers
the model lacks). Every load either raises CheckpointError and leaves the model exactly as it was,
or (damage that changes nothing, e.g. one whitespace byte for another) loads a model identical to
the one saved. Nothing else: no crash, no other exception, no silently different model. And
nothing in the package unpickles."""

import ast
import json
import pickle
import random
import struct
from pathlib import Path

import pytest
import torch
from torch import nn

import quantkernels as qk
from quantkernels.serialization import CONFIG_NAME, WEIGHTS_NAME, CheckpointError

safetensors = pytest.importorskip("safetensors")
from safetensors.torch import load_file, save_file  # noqa: E402

PACKAGE = Path(qk.__file__).resolve().parent
N_RANDOM = 30  # damaged files per (format, kind of random damage)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = nn.Linear(64, 128)
        self.down = nn.Linear(128, 64)
        self.norm = nn.LayerNorm(64)

    def forward(self, x):
        return self.norm(self.down(torch.relu(self.up(x))))


def fresh():
    torch.manual_seed(1)  # other weights than the saved model: a load must replace them
    return Net().eval()


def state(m):
    return ({n: type(x).__name__ for n, x in m.named_modules()},
            {k: v.detach().clone() for k, v in m.state_dict().items()})


def same(a, b) -> bool:
    return a[0] == b[0] and a[1].keys() == b[1].keys() and all(
        a[1][k].dtype == b[1][k].dtype and torch.equal(a[1][k], b[1][k]) for k in a[1])


FORMATS = {
    "quantkernels": (lambda m, d: qk.save_quantized(m, d), lambda m, d: qk.load_quantized(m, d), CONFIG_NAME),
    "gptq": (lambda m, d: qk.save_gptq_checkpoint(m, str(d), checkpoint_format="gptq_v2",
                                                  scale_dtype=torch.float32),
             lambda m, d: qk.load_gptq_checkpoint(m, str(d)), "quantize_config.json"),
}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """{format: (directory, the saved quantized model's state)}"""
    torch.manual_seed(0)
    model = qk.quantize_model(Net().eval(), "w4a16", group_size=32)
    out = {}
    for fmt, (save, load, _) in FORMATS.items():
        d = tmp_path_factory.mktemp(fmt)
        save(model, d)
        ref = load(fresh(), d)  # what an intact load gives
        out[fmt] = (d, state(ref))
    return out


def attempt(fmt, d, ref_state) -> str:
    """Loads the (damaged) checkpoint into a fresh model: 'refused' or 'identical'; anything else fails."""
    load = FORMATS[fmt][1]
    m = fresh()
    before = state(m)
    try:
        load(m, d)
    except CheckpointError:
        assert same(state(m), before), "a refused load changed the model"
        return "refused"
    assert same(state(m), ref_state), "a damaged checkpoint loaded as a different model"
    return "identical"


def copy_ckpt(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def header_len(data: bytes) -> int:
    return struct.unpack("<Q", data[:8])[0]


def damage_random(kind: str, raw: bytes, cfg: bytes, rng: random.Random):
    """(new safetensors bytes, new config bytes) with one random damage of ``kind``."""
    h = header_len(raw)
    if kind == "truncate":
        return raw[:rng.randrange(0, len(raw))], cfg
    if kind == "header byte":
        i = rng.randrange(0, 8 + h)
    elif kind == "data byte":
        i = rng.randrange(8 + h, len(raw))
    elif kind == "config byte":
        b = bytearray(cfg)
        b[rng.randrange(len(b))] ^= rng.randrange(1, 256)
        return raw, bytes(b)
    else:
        raise ValueError(kind)
    b = bytearray(raw)
    b[i] ^= rng.randrange(1, 256)
    return bytes(b), cfg


RANDOM_KINDS = ("truncate", "header byte", "data byte", "config byte")


@pytest.mark.parametrize("kind", RANDOM_KINDS)
@pytest.mark.parametrize("fmt", list(FORMATS))
def test_random_damage(saved, fmt, kind, tmp_path):
    d, ref_state = saved[fmt]
    cfg_name = FORMATS[fmt][2]
    raw, cfg = (d / WEIGHTS_NAME).read_bytes(), (d / cfg_name).read_bytes()
    rng = random.Random(f"{fmt}/{kind}")
    outcomes = {"refused": 0, "identical": 0}
    for i in range(N_RANDOM):
        bad = copy_ckpt(d, tmp_path / str(i))
        new_raw, new_cfg = damage_random(kind, raw, cfg, rng)
        (bad / WEIGHTS_NAME).write_bytes(new_raw)
        (bad / cfg_name).write_bytes(new_cfg)
        outcomes[attempt(fmt, bad, ref_state)] += 1
    # data bytes are covered by the checksums, truncation by safetensors: always refused
    if kind in ("truncate", "data byte"):
        assert outcomes["identical"] == 0, outcomes
    assert outcomes["refused"] >= N_RANDOM // 2, outcomes


def _edit_tensors(d: Path, fn):
    t = load_file(str(d / WEIGHTS_NAME))
    meta = safetensors.safe_open(str(d / WEIGHTS_NAME), "pt").metadata()
    fn(t)
    save_file(t, str(d / WEIGHTS_NAME), metadata=meta)


def _edit_json(d: Path, name: str, fn):
    c = json.loads((d / name).read_text())
    fn(c)
    (d / name).write_text(json.dumps(c))


def _claim_more(d: Path, extra: int):
    raw = (d / WEIGHTS_NAME).read_bytes()
    (d / WEIGHTS_NAME).write_bytes(struct.pack("<Q", header_len(raw) + extra) + raw[8:])


def _rename_layer(c):
    c["modules"]["gone"] = c["modules"].pop("down")


CRAFTED = {
    "quantkernels": {
        "wrong shape": (lambda d: _edit_tensors(d, lambda t: t.update({"up.weight_scale": t["up.weight_scale"][:, :1]
                                                                       .contiguous()})),
                        r"up.weight_scale.*shape \(128, 1\), expected \(128, 2\)"),
        "wrong dtype": (lambda d: _edit_tensors(d, lambda t: t.update({"up.weight_zero": t["up.weight_zero"].to(
            torch.int8)})), r"up.weight_zero.*dtype torch.int8, expected torch.uint8"),
        "float as int": (lambda d: _edit_tensors(d, lambda t: t.update({"norm.weight": t["norm.weight"].to(
            torch.int32)})), r"norm.weight.*dtype torch.int32"),
        "future version": (lambda d: _edit_json(d, CONFIG_NAME, lambda c: c.update(format_version=3)),
                           "unknown format_version 3"),
        "missing tensor": (lambda d: _edit_tensors(d, lambda t: t.pop("down.bias")), r"missing 1 tensor.*down.bias"),
        "extra tensor": (lambda d: _edit_tensors(d, lambda t: t.update(extra=torch.zeros(3))),
                         r"1 tensor\(s\) this model has no place for: \['extra'\]"),
        "missing checksums": (lambda d: _edit_json(d, CONFIG_NAME, lambda c: c.pop("checksums")),
                              "requires 'checksums'"),
        "checksum of another tensor": (lambda d: _edit_json(d, CONFIG_NAME, lambda c: c["checksums"]["tensors"].update(
            {"up.qweight": c["checksums"]["tensors"]["down.qweight"]})), "does not belong to|is damaged"),
        "config edited": (lambda d: _edit_json(d, CONFIG_NAME, lambda c: c["modules"]["up"].update(threshold=7.0)),
                          r"changed after it was written"),
        "layer the model lacks": (lambda d: _edit_json(d, CONFIG_NAME, _rename_layer),
                                  "quantizes layer 'gone', which this model does not have"),
        "header claims more": (lambda d: _claim_more(d, 64), "corrupt or truncated"),
        "header claims far more": (lambda d: _claim_more(d, 2**40), "corrupt or truncated"),
        "empty file": (lambda d: (d / WEIGHTS_NAME).write_bytes(b""), "corrupt or truncated"),
    },
    "gptq": {
        "wrong shape": (lambda d: _edit_tensors(d, lambda t: t.update({"up.scales": t["up.scales"][:1].contiguous()})),
                        r"layer up: .*inconsistent shapes"),
        "wrong dtype": (lambda d: _edit_tensors(d, lambda t: t.update({"up.qweight": t["up.qweight"].float()})),
                        r"layer up: .*qweight and qzeros must be int32"),
        "scales as ints": (lambda d: _edit_tensors(d, lambda t: t.update({"up.scales": t["up.scales"].view(
            torch.int32)})), r"scales must be float16, bfloat16 or float32, got torch.int32"),
        "future bits": (lambda d: _edit_json(d, "quantize_config.json", lambda c: c.update(bits=8)),
                        "only 4-bit GPTQ checkpoints are supported, got bits=8"),
        "missing qzeros": (lambda d: _edit_tensors(d, lambda t: t.pop("down.qzeros")), "layer down lacks qzeros"),
        "missing tensor": (lambda d: _edit_tensors(d, lambda t: t.pop("norm.weight")), r"missing \['norm.weight'\]"),
        "extra tensor": (lambda d: _edit_tensors(d, lambda t: t.update(extra=torch.zeros(3))),
                         r"unexpected \['extra'\]"),
        "layer the model lacks": (lambda d: _edit_tensors(d, lambda t: t.update(
            {k.replace("down.", "gone."): t.pop(k) for k in [k for k in t if k.startswith("down.")]})),
            "quantizes layer 'gone', which this model does not have"),
        "config edited": (lambda d: _edit_json(d, "quantize_config.json", lambda c: c.update(checkpoint_format="gptq")),
                          "changed after it was written"),
        "scattered g_idx": (lambda d: _edit_tensors(d, lambda t: t.update(
            {"up.g_idx": (torch.arange(64, dtype=torch.int32) % 2)})), "scatters groups over K"),
        "header claims more": (lambda d: _claim_more(d, 64), "corrupt or truncated"),
        "header claims far more": (lambda d: _claim_more(d, 2**40), "corrupt or truncated"),
    },
}


def foreign(d: Path) -> Path:
    """The GPTQ checkpoint as another tool writes it: no quantkernels checksums (the crafted damage
    must then be caught by the loader's own checks)."""
    _edit_json(d, "quantize_config.json", lambda c: c.pop("quantkernels_checksums"))
    save_file(load_file(str(d / WEIGHTS_NAME)), str(d / WEIGHTS_NAME), metadata={"format": "pt"})
    return d


@pytest.mark.parametrize("fmt,case", [(f, c) for f in CRAFTED for c in CRAFTED[f]])
def test_crafted_damage(saved, fmt, case, tmp_path):
    d, _ = saved[fmt]
    bad = copy_ckpt(d, tmp_path / "bad")
    if fmt == "gptq" and case != "config edited":
        foreign(bad)
    fn, msg = CRAFTED[fmt][case]
    fn(bad)
    m = fresh()
    before = state(m)
    with pytest.raises(CheckpointError, match=msg):
        FORMATS[fmt][1](m, bad)
    assert same(state(m), before)


def test_intact_checkpoints_load_exactly(saved):
    for fmt, (d, ref_state) in saved.items():
        assert attempt(fmt, d, ref_state) == "identical"


def test_foreign_gptq_checkpoint_without_checksums_still_loads(saved, tmp_path):
    """Checkpoints written by other tools have no quantkernels checksums: they load (unverified)."""
    d, ref_state = saved["gptq"]
    bad = copy_ckpt(d, tmp_path / "foreign")
    assert attempt("gptq", foreign(bad), ref_state) == "identical"


# ----------------------------------------------------------------------------- no unpickling


def _unpickling_calls(tree: ast.AST):
    """(line, what) of every call that can unpickle: pickle / dill / joblib loads, torch.load without
    weights_only=True, numpy load with allow_pickle=True."""
    bad = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [a.name for a in node.names] + ([node.module] if isinstance(node, ast.ImportFrom) else [])
            if any(n and n.split(".")[0] in ("pickle", "cPickle", "dill", "joblib", "cloudpickle") for n in names):
                bad.append((node.lineno, "imports a pickle module"))
        if not isinstance(node, ast.Call):
            continue
        f = ast.unparse(node.func)
        kw = {k.arg: ast.unparse(k.value) for k in node.keywords}
        if f.endswith("torch.load"):
            if kw.get("weights_only") != "True":
                bad.append((node.lineno, f"{f} without weights_only=True"))
        if f.endswith(("np.load", "numpy.load")) and kw.get("allow_pickle") == "True":
            bad.append((node.lineno, f"{f}(allow_pickle=True)"))
        if f.endswith(("Unpickler", "pickle.load", "pickle.loads")):
            bad.append((node.lineno, f))
    return bad


def test_nothing_in_the_package_unpickles():
    files = sorted(PACKAGE.rglob("*.py"))
    assert len(files) > 10
    found = {str(f.relative_to(PACKAGE)): b for f in files if (b := _unpickling_calls(ast.parse(f.read_text())))}
    assert found == {}
    # the scanner itself finds what it is looking for
    probe = ast.parse("import pickle\nimport torch\ntorch.load(f)\ntorch.load(f, weights_only=False)\n"
                      "np.load(f, allow_pickle=True)\npickle.loads(b)\n")
    assert len(_unpickling_calls(probe)) == 5


def test_loaders_never_unpickle_at_run_time(saved, tmp_path, monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("something unpickled")

    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "Unpickler", refuse)
    monkeypatch.setattr(torch, "load", refuse)
    for fmt, (d, ref_state) in saved.items():
        assert attempt(fmt, d, ref_state) == "identical"
