"""Checkpoints under attack (issue 18): generated damage to our format and to the GPTQ,
bitsandbytes int8 and bitsandbytes 4-bit (nf4 with double quant, fp4 without) imports
(truncation at random offsets, flipped bytes in the safetensors header,
the JSON config and the tensor data, a header that claims more bytes than the file has) and crafted damage (wrong shapes
and dtypes, a format version from the future, missing and extra tensors, a config naming layers
the model lacks). Every load either raises CheckpointError and leaves the model exactly as it was,
or (damage that changes nothing, e.g. one whitespace byte for another) loads a model identical to
the one saved. Nothing else: no crash, no other exception, no silently different model. (A
bitsandbytes checkpoint carries no checksums: a flipped data byte, or a flipped digit of its
config's threshold, can load as a model that differs in that one value -- never in its structure,
and never with a non-finite or negative SCB; likewise a 4-bit one, never with a non-finite or negative
absmax, nested absmax or nested offset; a flipped byte of its quant_state JSON refuses, or loads identical
(whitespace, a digit below float32 precision of the offset), or changes only the nested offset.) And
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

from _bnb4 import bnb4_layout  # noqa: E402

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
    return ({n: (type(x).__name__, getattr(x, "threshold", None), getattr(x, "scheme", None),
                 getattr(x, "group_size", None), getattr(x, "double_quant", None)) for n, x in m.named_modules()},
            {k: v.detach().clone() for k, v in m.state_dict().items()})


def same(a, b) -> bool:
    return a[0] == b[0] and a[1].keys() == b[1].keys() and all(
        a[1][k].dtype == b[1][k].dtype and torch.equal(a[1][k], b[1][k]) for k in a[1])


BNB_THRESHOLD = 5.0


def save_bnb_int8(model_fp: nn.Module, d: Path):
    """``model_fp`` saved as transformers (``load_in_8bit=True``, ``save_pretrained``) saves it:
    model.safetensors with every nn.Linear as bitsandbytes' Linear8bitLt state dict (``weight``
    int8 [N, K], ``SCB`` fp32 [N], ``weight_format`` uint8 scalar, ``bias``) and config.json's
    ``quantization_config``. By bitsandbytes itself when it is installed (its CPU backend quantizes
    on ``.to("cpu")``), else in the same key / dtype / shape layout (test_bnb_layout_matches_bitsandbytes
    compares the two where bitsandbytes is installed)."""
    sd = bnb_state_dict_by_hand(model_fp)
    try:
        sd = bnb_state_dict_by_bitsandbytes(model_fp)
    except (ImportError, RuntimeError):
        pass
    save_file({k: v.contiguous() for k, v in sd.items()}, str(d / WEIGHTS_NAME), metadata={"format": "pt"})
    (d / "config.json").write_text(json.dumps({
        "architectures": ["Net"], "model_type": "net", "torch_dtype": "float32",
        "quantization_config": {"_load_in_4bit": False, "_load_in_8bit": True, "bnb_4bit_compute_dtype": "float32",
                                "bnb_4bit_quant_storage": "uint8", "bnb_4bit_quant_type": "fp4",
                                "bnb_4bit_use_double_quant": False, "llm_int8_enable_fp32_cpu_offload": False,
                                "llm_int8_has_fp16_weight": False, "llm_int8_skip_modules": None,
                                "llm_int8_threshold": BNB_THRESHOLD, "load_in_4bit": False, "load_in_8bit": True,
                                "quant_method": "bitsandbytes"}}, indent=2))


def bnb_state_dict_by_hand(model_fp: nn.Module):
    sd = {}
    for k, v in model_fp.state_dict().items():
        sd[k] = v.detach().clone()
    for name, mod in model_fp.named_modules():
        if isinstance(mod, nn.Linear):
            w = mod.weight.detach().float()
            scb = w.abs().amax(1)
            sd[f"{name}.weight"] = torch.round(w * (127.0 / scb[:, None])).to(torch.int8)
            sd[f"{name}.SCB"] = scb
            sd[f"{name}.weight_format"] = torch.tensor(0, dtype=torch.uint8)
    return sd


def bnb_state_dict_by_bitsandbytes(model_fp: nn.Module):
    import copy
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import bitsandbytes as bnb
    m = copy.deepcopy(model_fp)
    for name, mod in list(m.named_modules()):
        if isinstance(mod, nn.Linear):
            new = bnb.nn.Linear8bitLt(mod.in_features, mod.out_features, bias=mod.bias is not None,
                                      has_fp16_weights=False, threshold=BNB_THRESHOLD)
            new.load_state_dict(mod.state_dict())
            setattr(m, name, new)
    m = m.to("cpu")  # bitsandbytes quantizes here
    sd = m.state_dict()
    if sd["up.weight"].dtype != torch.int8:
        raise RuntimeError(f"bitsandbytes {bnb.__version__} did not quantize on the CPU")
    return {k: v.detach().clone() for k, v in sd.items()}


BNB4_BLOCKSIZE = 64  # Linear4bit's default


def save_bnb_4bit(quant_type: str, double_quant: bool):
    """A writer of ``model_fp`` as transformers (``load_in_4bit=True``, ``bnb_4bit_quant_type``,
    ``bnb_4bit_use_double_quant``, ``save_pretrained``) saves it: every nn.Linear as bitsandbytes'
    Linear4bit state dict (``weight`` packed uint8 [N*K/2, 1], ``weight.absmax``, ``weight.quant_map``,
    with double quant ``weight.nested_absmax`` / ``weight.nested_quant_map``, and
    ``weight.quant_state.bitsandbytes__<type>``: JSON bytes in a uint8 tensor) and config.json's
    ``quantization_config``. By bitsandbytes itself when it is installed, else by hand from our ops
    (test_bnb4_layout_matches_bitsandbytes compares the two)."""
    def save(model_fp: nn.Module, d: Path):
        try:
            sd = bnb4_state_dict_by_bitsandbytes(model_fp, quant_type, double_quant)
        except (ImportError, RuntimeError):
            sd = bnb4_state_dict_by_hand(model_fp, quant_type, double_quant)
        save_file({k: v.contiguous() for k, v in sd.items()}, str(d / WEIGHTS_NAME), metadata={"format": "pt"})
        (d / "config.json").write_text(json.dumps({
            "architectures": ["Net"], "model_type": "net", "torch_dtype": "float32",
            "quantization_config": {"_load_in_4bit": True, "_load_in_8bit": False,
                                    "bnb_4bit_compute_dtype": "float32", "bnb_4bit_quant_storage": "uint8",
                                    "bnb_4bit_quant_type": quant_type, "bnb_4bit_use_double_quant": double_quant,
                                    "llm_int8_enable_fp32_cpu_offload": False, "llm_int8_has_fp16_weight": False,
                                    "llm_int8_skip_modules": None, "llm_int8_threshold": 6.0, "load_in_4bit": True,
                                    "load_in_8bit": False, "quant_method": "bitsandbytes"}}, indent=2))
    return save


def bnb4_state_dict_by_hand(model_fp: nn.Module, quant_type: str, double_quant: bool):
    sd = {k: v.detach().clone() for k, v in model_fp.state_dict().items()}
    for name, mod in model_fp.named_modules():
        if isinstance(mod, nn.Linear):
            del sd[f"{name}.weight"]
            sd.update(bnb4_layout(name, mod.weight.detach().float(), quant_type, BNB4_BLOCKSIZE, double_quant,
                                  None if mod.bias is None else mod.bias.detach().clone()))
    return sd


def bnb4_state_dict_by_bitsandbytes(model_fp: nn.Module, quant_type: str, double_quant: bool):
    import copy
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import bitsandbytes as bnb
    m = copy.deepcopy(model_fp)
    for name, mod in list(m.named_modules()):
        if isinstance(mod, nn.Linear):
            new = bnb.nn.Linear4bit(mod.in_features, mod.out_features, bias=mod.bias is not None,
                                    compute_dtype=torch.float32, compress_statistics=double_quant,
                                    quant_type=quant_type, quant_storage=torch.uint8)
            new.load_state_dict(mod.state_dict())
            setattr(m, name, new)
    m = m.to("cpu")  # bitsandbytes quantizes here
    sd = m.state_dict()
    if sd["up.weight"].dtype != torch.uint8:
        raise RuntimeError(f"bitsandbytes {bnb.__version__} did not quantize on the CPU")
    return {k: v.detach().clone() for k, v in sd.items()}


FORMATS = {
    "quantkernels": (lambda m, d: qk.save_quantized(m, d), lambda m, d: qk.load_quantized(m, d), CONFIG_NAME),
    "gptq": (lambda m, d: qk.save_gptq_checkpoint(m, str(d), checkpoint_format="gptq_v2",
                                                  scale_dtype=torch.float32),
             lambda m, d: qk.load_gptq_checkpoint(m, str(d)), "quantize_config.json"),
    # saved from the float model (bitsandbytes quantizes it), not from our quantized one
    "bnb_int8": (save_bnb_int8, lambda m, d: qk.load_bnb_int8(m, d), "config.json"),
    "bnb_nf4_dq": (save_bnb_4bit("nf4", True), lambda m, d: qk.load_bnb_4bit(m, d), "config.json"),
    "bnb_fp4": (save_bnb_4bit("fp4", False), lambda m, d: qk.load_bnb_4bit(m, d), "config.json"),
}
#: Formats saved from the float model (bitsandbytes quantizes it), not from our quantized one.
FROM_FLOAT = {"bnb_int8", "bnb_nf4_dq", "bnb_fp4"}
BNB4 = ("bnb_nf4_dq", "bnb_fp4")
#: Formats without checksums, where a flipped data or config byte may load as a model that
#: differs in one value (``attempt`` then returns "altered" and checks that nothing else differs).
UNCHECKED = {"bnb_int8", *BNB4}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """{format: (directory, the saved quantized model's state)}"""
    torch.manual_seed(0)
    float_model = Net().eval()
    model = qk.quantize_model(Net().eval(), "w4a16", group_size=32)
    out = {}
    for fmt, (save, load, _) in FORMATS.items():
        d = tmp_path_factory.mktemp(fmt)
        save(float_model if fmt in FROM_FLOAT else model, d)
        ref = load(fresh(), d)  # what an intact load gives
        out[fmt] = (d, state(ref))
    return out


def attempt(fmt, d, ref_state, allow_altered=False) -> str:
    """Loads the (damaged) checkpoint into a fresh model: 'refused' or 'identical' (or, with
    ``allow_altered``, 'altered': one value differs, see ``one_value_differs``); anything else fails."""
    load = FORMATS[fmt][1]
    m = fresh()
    before = state(m)
    try:
        load(m, d)
    except CheckpointError:
        assert same(state(m), before), "a refused load changed the model"
        return "refused"
    if same(state(m), ref_state):
        return "identical"
    assert allow_altered, "a damaged checkpoint loaded as a different model"
    one_value_differs(state(m), ref_state)
    return "altered"


def one_value_differs(got, ref):
    """The same modules (type, scheme, group size, double quant), tensor names, dtypes and shapes,
    every float weight_scale (SCB / 127, 4-bit absmax), nested_absmax and absmax_offset finite and
    >= 0, and at most one value different (one flipped byte of one tensor, or the threshold of one
    config)."""
    assert {n: t[:1] + t[2:] for n, t in got[0].items()} == {n: t[:1] + t[2:] for n, t in ref[0].items()}, \
        "module structure differs"
    assert got[1].keys() == ref[1].keys(), "tensor names differ"
    changed = [n for n in got[0] if got[0][n] != ref[0][n]]
    for k in ref[1]:
        a, b = got[1][k], ref[1][k]
        assert a.dtype == b.dtype and a.shape == b.shape, (k, a.dtype, a.shape, b.dtype, b.shape)
        if k.endswith(("weight_scale", "nested_absmax", "absmax_offset")) and a.is_floating_point():
            assert bool((torch.isfinite(a) & (a >= 0)).all()), f"{k}: a non-finite or negative scale loaded"
        diff = ~((a == b) | (a.isnan() & b.isnan())) if a.is_floating_point() else a != b
        if bool(diff.any()):
            changed.append(f"{k}: {int(diff.sum())} value(s)")
    # the threshold is one config value shared by every quantized layer
    thresholds = {got[0][n][1] for n in got[0] if got[0][n][0] == "QuantLinear"}
    assert len(thresholds) == 1, thresholds
    tensor_changes = [c for c in changed if ":" in c]
    assert len(tensor_changes) <= 1 and all(c.endswith(": 1 value(s)") for c in tensor_changes), changed
    assert changed, "reported as altered, but nothing differs"


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
    outcomes = {"refused": 0, "identical": 0, "altered": 0}
    state_spans = tensor_spans(raw, ".weight.quant_state.")
    for i in range(N_RANDOM):
        bad = copy_ckpt(d, tmp_path / str(i))
        new_raw, new_cfg = damage_random(kind, raw, cfg, rng)
        (bad / WEIGHTS_NAME).write_bytes(new_raw)
        (bad / cfg_name).write_bytes(new_cfg)
        got = attempt(fmt, bad, ref_state, allow_altered=fmt in UNCHECKED and kind in ("data byte", "config byte"))
        if got == "identical" and kind == "data byte":
            # a 4-bit quant_state is JSON: a flip to other whitespace, or in a digit of the nested offset
            # below float32 precision, changes nothing
            at = next(j for j in range(len(raw)) if raw[j] != new_raw[j])
            assert any(lo <= at < hi for lo, hi in state_spans), f"a flipped data byte at {at} changed nothing"
        outcomes[got] += 1
    # data bytes are covered by the checksums, truncation by safetensors: always refused
    if kind == "truncate" or (kind == "data byte" and fmt not in BNB4):
        assert outcomes["identical"] == 0, outcomes
    if fmt in UNCHECKED and kind == "data byte":
        # no checksums: a flipped weight byte is another valid int8 / pair of 4-bit codes (refused only
        # where it is -128, a non-finite or negative SCB / absmax, a non-zero weight_format, a code table)
        assert outcomes["refused"] + outcomes["altered"] + outcomes["identical"] == N_RANDOM, outcomes
        assert outcomes["altered"] >= N_RANDOM // 2, outcomes
    else:
        assert outcomes["refused"] >= N_RANDOM // 2, outcomes


def tensor_spans(raw: bytes, part: str):
    """[lo, hi) file offsets of the data of every tensor whose name contains ``part``."""
    h = header_len(raw)
    header = json.loads(raw[8:8 + h])
    return [(8 + h + v["data_offsets"][0], 8 + h + v["data_offsets"][1]) for k, v in header.items()
            if k != "__metadata__" and part in k]


def test_bnb_random_scb_and_weight_format_bytes(saved, tmp_path):
    """Random flipped bytes aimed at the bitsandbytes tensors the loader can check (SCB: finite and
    >= 0; weight_format: 0): refused, or (a flip that leaves a valid positive SCB) one value
    differs and every scale is finite and >= 0."""
    d, ref_state = saved["bnb_int8"]
    raw = (d / WEIGHTS_NAME).read_bytes()
    h = header_len(raw)
    header = json.loads(raw[8:8 + h])
    spans = [(8 + h + v["data_offsets"][0], 8 + h + v["data_offsets"][1]) for k, v in header.items()
             if k.endswith((".SCB", ".weight_format"))]
    rng = random.Random("bnb_int8/scb")
    outcomes = {"refused": 0, "identical": 0, "altered": 0}
    for i in range(N_RANDOM):
        lo, hi = spans[rng.randrange(len(spans))]
        b = bytearray(raw)
        b[rng.randrange(lo, hi)] ^= rng.randrange(1, 256)
        bad = copy_ckpt(d, tmp_path / str(i))
        (bad / WEIGHTS_NAME).write_bytes(bytes(b))
        outcomes[attempt("bnb_int8", bad, ref_state, allow_altered=True)] += 1
    assert outcomes["identical"] == 0 and outcomes["refused"] >= 5, outcomes


@pytest.mark.parametrize("fmt", BNB4)
@pytest.mark.parametrize("part", ["absmax", "quant_state"])
def test_bnb4_random_absmax_and_quant_state_bytes(saved, fmt, part, tmp_path):
    """Random flipped bytes aimed at what the 4-bit loader can check: the absmax tensors (plain:
    float32, finite and >= 0; double quant: uint8 codes and the float32 nested absmax) and the
    quant_state JSON. Refused, or one value differs with every absmax finite and >= 0; a quant_state
    flip refuses, loads identical, or changes only the nested offset (a digit of it)."""
    d, ref_state = saved[fmt]
    raw = (d / WEIGHTS_NAME).read_bytes()
    spans = tensor_spans(raw, ".weight.quant_state." if part == "quant_state" else "absmax")
    rng = random.Random(f"{fmt}/{part}")
    outcomes = {"refused": 0, "identical": 0, "altered": 0}
    for i in range(N_RANDOM):
        lo, hi = spans[rng.randrange(len(spans))]
        b = bytearray(raw)
        b[rng.randrange(lo, hi)] ^= rng.randrange(1, 256)
        bad = copy_ckpt(d, tmp_path / str(i))
        (bad / WEIGHTS_NAME).write_bytes(bytes(b))
        m = fresh()
        got = attempt(fmt, bad, ref_state, allow_altered=True)
        if got == "altered" and part == "quant_state":
            qk.load_bnb_4bit(m, bad)
            diff = [k for k, v in state(m)[1].items() if not torch.equal(v, ref_state[1][k])]
            assert fmt == "bnb_nf4_dq" and len(diff) == 1 and diff[0].endswith(".absmax_offset"), diff
        outcomes[got] += 1
    if part == "absmax" and fmt == "bnb_fp4":
        # float32 absmax: a flipped sign or exponent byte is caught
        assert outcomes["identical"] == 0 and outcomes["refused"] >= 5, outcomes
    if part == "quant_state":
        assert outcomes["refused"] >= N_RANDOM // 2, outcomes


@pytest.mark.parametrize("fmt", BNB4)
def test_bnb4_every_quant_state_byte(saved, fmt):
    """What a flipped quant_state byte may do (decided here): refuse; load identical (a space turned
    into a tab, a digit of the nested offset below float32 precision); or change only that layer's
    nested offset, to a finite value >= 0 (a digit of it). Every byte of one layer's quant_state,
    each flipped three ways: x ^ 0x01 (a digit to its neighbour, a letter to another), x ^ 0x0d
    (a space to '-') and x ^ 0x29 (a space to a tab)."""
    d, ref_state = saved[fmt]
    sd = load_file(str(d / WEIGHTS_NAME))
    key = next(k for k in sd if k.startswith("up.weight.quant_state."))
    outcomes = {"refused": 0, "identical": 0, "altered": 0}
    for i in range(sd[key].numel()):
        for x in (0x01, 0x0D, 0x29):
            bad = dict(sd, **{key: sd[key].clone()})
            bad[key][i] ^= x
            m = fresh()
            before = state(m)
            try:
                qk.load_bnb_4bit(m, bad)
            except CheckpointError:
                assert same(state(m), before)
                outcomes["refused"] += 1
                continue
            got = state(m)
            if same(got, ref_state):
                outcomes["identical"] += 1
                continue
            one_value_differs(got, ref_state)
            diff = [k for k, v in got[1].items() if not torch.equal(v, ref_state[1][k])]
            assert diff == ["up.absmax_offset"], (i, x, diff)
            outcomes["altered"] += 1
    n = 3 * sd[key].numel()
    assert outcomes["identical"] >= 3 and outcomes["refused"] >= n // 2, outcomes
    assert (outcomes["altered"] > 0) == (fmt == "bnb_nf4_dq"), outcomes


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


#: Damage to the rest of a bitsandbytes checkpoint (int8 and 4-bit alike): the same refusals.
BNB_STRUCTURE_CASES = {
    "missing tensor": (lambda d: _edit_tensors(d, lambda t: t.pop("norm.bias")), r"missing \['norm.bias'\]"),
    "extra tensor": (lambda d: _edit_tensors(d, lambda t: t.update(extra=torch.zeros(3))),
                     r"unexpected \['extra'\]"),
    "extra tensor in a layer": (lambda d: _edit_tensors(d, lambda t: t.update({"up.junk": torch.zeros(3)})),
                                r"unexpected \['up.junk'\]"),
    "layer the model lacks": (lambda d: _edit_tensors(d, lambda t: t.update(
        {k.replace("down.", "gone."): t.pop(k) for k in [k for k in t if k.startswith("down.")]})),
        "the checkpoint has layer 'gone', which this model does not have"),
}


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
    "bnb_int8": {
        "wrong shape": (lambda d: _edit_tensors(d, lambda t: t.update({"up.weight": t["up.weight"][:, :32]
                                                                       .contiguous()})),
                        r"up.weight has shape \(128, 32\), the model's layer is \[out=128, in=64\]"),
        "SCB wrong shape": (lambda d: _edit_tensors(d, lambda t: t.update({"up.SCB": t["up.SCB"][:5].contiguous()})),
                            r"SCB must be a float tensor of shape \(128,\).*got torch.float32 \(5,\)"),
        "weight as uint8": (lambda d: _edit_tensors(d, lambda t: t.update({"up.weight": t["up.weight"].view(
            torch.uint8)})), r"weight must be int8 \[N, K\], got torch.uint8"),
        "weight as float": (lambda d: _edit_tensors(d, lambda t: t.update({"up.weight": t["up.weight"].float()})),
                            r"weight must be int8 \[N, K\], got torch.float32"),
        "weight holds -128": (lambda d: _edit_tensors(d, lambda t: t["down.weight"].view(-1)[7:9].fill_(-128)),
                              "weight holds -128"),
        "SCB as int": (lambda d: _edit_tensors(d, lambda t: t.update({"up.SCB": t["up.SCB"].view(torch.int32)})),
                       r"SCB must be a float tensor.*got torch.int32"),
        "SCB NaN": (lambda d: _edit_tensors(d, lambda t: t["up.SCB"].__setitem__(3, float("nan"))),
                    r"SCB \(the row absmax\) must be finite and >= 0, got nan"),
        "SCB Inf": (lambda d: _edit_tensors(d, lambda t: t["down.SCB"].__setitem__(0, float("inf"))),
                    r"must be finite and >= 0, got inf"),
        "SCB negative": (lambda d: _edit_tensors(d, lambda t: t["up.SCB"].__setitem__(-1, -0.5)),
                         r"must be finite and >= 0, got -0.5"),
        "weight_format empty": (lambda d: _edit_tensors(d, lambda t: t.update(
            {"up.weight_format": torch.empty(0, dtype=torch.uint8)})),
            r"up.weight_format must hold one integer.*got torch.uint8 \(0,\)"),
        "weight_format NaN": (lambda d: _edit_tensors(d, lambda t: t.update(
            {"up.weight_format": torch.tensor(float("nan"))})), r"up.weight_format must hold one integer.*float32"),
        "weight_format two values": (lambda d: _edit_tensors(d, lambda t: t.update(
            {"up.weight_format": torch.zeros(2, dtype=torch.uint8)})), r"up.weight_format must hold one integer"),
        "weight_format col_turing": (lambda d: _edit_tensors(d, lambda t: t.update(
            {"down.weight_format": torch.tensor(2, dtype=torch.uint8)})), r"down.weight_format = 2: only the row"),
        "float as int": (lambda d: _edit_tensors(d, lambda t: t.update({"norm.weight": t["norm.weight"].to(
            torch.int32)})), r"norm.weight has dtype torch.int32, the model's is torch.float32"),
        "bias as int": (lambda d: _edit_tensors(d, lambda t: t.update({"up.bias": t["up.bias"].to(torch.int32)})),
                        r"bias must be a float tensor of shape \(128,\), got torch.int32"),
        "bias wrong shape": (lambda d: _edit_tensors(d, lambda t: t.update({"up.bias": t["up.bias"][:3].contiguous()})),
                             r"bias must be a float tensor of shape \(128,\), got torch.float32 \(3,\)"),
        "missing bias": (lambda d: _edit_tensors(d, lambda t: t.pop("down.bias")),
                         r"layer 'down': the checkpoint has no bias, the model's layer has a bias"),
        "missing weight": (lambda d: _edit_tensors(d, lambda t: t.pop("up.weight")), r"up.SCB without up.weight"),
        **BNB_STRUCTURE_CASES,
        "missing SCB": (lambda d: _edit_tensors(d, lambda t: t.pop("up.SCB")), r"unexpected \['up.weight_format'\]"),
        "missing SCB and format": (lambda d: _edit_tensors(d, lambda t: (t.pop("up.SCB"), t.pop("up.weight_format"))),
                                   r"up.weight has dtype torch.int8, the model's is torch.float32"),
        "SCB on a non-linear layer": (lambda d: _edit_tensors(d, lambda t: t.update(
            {"norm.SCB": torch.ones(64), "norm.weight": torch.ones(64, 64, dtype=torch.int8)})),
            "quantizes 'norm', a LayerNorm in this model, not a linear layer"),
        "threshold negative": (lambda d: _edit_json(d, "config.json", lambda c: c["quantization_config"].update(
            llm_int8_threshold=-1.0)), r"threshold must be a number >= 0.*got -1.0 \(llm_int8_threshold"),
        "threshold a string": (lambda d: _edit_json(d, "config.json", lambda c: c["quantization_config"].update(
            llm_int8_threshold="6")), r"threshold must be a number >= 0.*got '6'"),
        "config a list": (lambda d: (d / "config.json").write_text("[1, 2]"), "unreadable or corrupt JSON"),
        "quantization_config a string": (lambda d: _edit_json(d, "config.json", lambda c: c.update(
            quantization_config="bnb")), "unreadable or corrupt JSON"),
        "no safetensors file": (lambda d: (d / WEIGHTS_NAME).unlink(), r"no \*.safetensors file"),
        "header claims more": (lambda d: _claim_more(d, 64), "corrupt or truncated"),
        "header claims far more": (lambda d: _claim_more(d, 2**40), "corrupt or truncated"),
        "empty file": (lambda d: (d / WEIGHTS_NAME).write_bytes(b""), "corrupt or truncated"),
    },
}


def _edit_state(d: Path, layer: str, fn):
    """Edits the parsed quant_state JSON of ``layer`` (``fn`` returns the new object, or bytes)."""
    def edit(t):
        key = next(k for k in t if k.startswith(f"{layer}.weight.quant_state."))
        new = fn(json.loads(bytes(t[key].tolist())))
        t[key] = torch.tensor(list(new if isinstance(new, bytes) else json.dumps(new).encode()), dtype=torch.uint8)
    _edit_tensors(d, edit)


def _set(t, key, i, v):
    t[key].view(-1)[i] = v


def _bnb4_crafted(fmt):
    qt, dq = ("nf4", True) if fmt == "bnb_nf4_dq" else ("fp4", False)
    qs = f"up.weight.quant_state.bitsandbytes__{qt}"
    other = "fp4" if qt == "nf4" else "nf4"
    c = {
        "weight too short": (lambda d: _edit_tensors(d, lambda t: t.update({"up.weight": t["up.weight"][:100]
                                                                           .contiguous()})),
                             r"layer 'up': weight holds 100 bytes, \[128, 64\] needs 4096"),
        "weight as int8": (lambda d: _edit_tensors(d, lambda t: t.update({"up.weight": t["up.weight"].view(
            torch.int8)})), r"layer 'up': weight is torch.int8"),
        "absmax wrong shape": (lambda d: _edit_tensors(d, lambda t: t.update(
            {"down.weight.absmax": t["down.weight.absmax"][:-1].contiguous()})), r"layer 'down': absmax must be"),
        "absmax wrong dtype": (lambda d: _edit_tensors(d, lambda t: t.update(
            {"up.weight.absmax": t["up.weight.absmax"].to(torch.float16 if not dq else torch.int8)})),
            r"layer 'up': absmax must be"),
        "custom quant_map": (lambda d: _edit_tensors(d, lambda t: t["up.weight.quant_map"].mul_(0.5)),
                             rf"quant_map is not bitsandbytes' {qt} table"),
        "quant_state unreadable": (lambda d: _edit_state(d, "up", lambda st: b"\xff{"), "unreadable quant_state"),
        "quant_state nested too deep": (lambda d: _edit_state(d, "up", lambda st: b"[" * 100_000),
                                        r"unreadable quant_state \(RecursionError"),
        "quant_state a list": (lambda d: _edit_state(d, "up", lambda st: [st]), r"JSON list, not an object"),
        "quant_state 2-D": (lambda d: _edit_tensors(d, lambda t: t.update({qs: t[qs].reshape(-1, 1)})),
                            "not 1-D uint8"),
        "quant_type of the other key": (lambda d: _edit_state(d, "up", lambda st: dict(st, quant_type=other)),
                                        rf"quant_type '{other}' under the key of '{qt}'"),
        "blocksize not allowed": (lambda d: _edit_state(d, "up", lambda st: dict(st, blocksize=48)),
                                  r"blocksize 48 is not one of"),
        "blocksize a float": (lambda d: _edit_state(d, "up", lambda st: dict(st, blocksize=64.0)),
                              r"blocksize 64.0 is not one of"),
        "blocksize true": (lambda d: _edit_state(d, "up", lambda st: dict(st, blocksize=True)),
                           r"blocksize True is not one of"),
        "blocksize of another layout": (lambda d: _edit_state(d, "up", lambda st: dict(st, blocksize=128)),
                                        r"layer 'up': absmax must be .*\[64\]"),
        "shape transposed": (lambda d: _edit_state(d, "up", lambda st: dict(st, shape=[64, 128])),
                             r"quant_state shape \[64, 128\], but the model's layer is \[out=128, in=64\]"),
        "dtype unknown": (lambda d: _edit_state(d, "up", lambda st: dict(st, dtype="float8")),
                          r"quant_state dtype 'float8' is not one of"),
        "dtype missing": (lambda d: _edit_state(d, "up", lambda st: {k: v for k, v in st.items() if k != "dtype"}),
                          r"quant_state dtype None"),
        "two quant_states": (lambda d: _edit_tensors(d, lambda t: t.update(
            {qs.replace(qt, other): t[qs].clone()})), "layer 'up' has two quant_state entries"),
        "unknown 4-bit type": (lambda d: _edit_tensors(d, lambda t: t.update({qs.replace(qt, "int4"): t.pop(qs)})),
                               r"unknown 4-bit type 'int4'"),
        "missing weight": (lambda d: _edit_tensors(d, lambda t: t.pop("up.weight")), "has no up.weight$"),
        "missing absmax": (lambda d: _edit_tensors(d, lambda t: t.pop("down.weight.absmax")),
                           "has no down.weight.absmax"),
        "missing quant_map": (lambda d: _edit_tensors(d, lambda t: t.pop("up.weight.quant_map")),
                              "has no up.weight.quant_map"),
        "missing quant_state": (lambda d: _edit_tensors(d, lambda t: t.pop(qs)),
                                r"unexpected \['up.weight.absmax', "),
        "missing bias": (lambda d: _edit_tensors(d, lambda t: t.pop("down.bias")),
                         "layer 'down': the checkpoint has no bias, the model's layer has a bias"),
        "bias as int": (lambda d: _edit_tensors(d, lambda t: t.update({"up.bias": t["up.bias"].to(torch.int32)})),
                        r"bias must be a float tensor of shape \(128,\), got torch.int32"),
        "bias wrong shape": (lambda d: _edit_tensors(d, lambda t: t.update({"up.bias": t["up.bias"][:3].contiguous()})),
                             r"bias must be a float tensor of shape \(128,\), got torch.float32 \(3,\)"),
        "float as int": (lambda d: _edit_tensors(d, lambda t: t.update({"norm.weight": t["norm.weight"].to(
            torch.int32)})), r"norm.weight has dtype torch.int32, the model's is torch.float32"),
        **BNB_STRUCTURE_CASES,
        "quant_state on a non-linear layer": (lambda d: _edit_tensors(d, lambda t: t.update(
            {qs.replace("up.", "norm."): t[qs].clone()})), "layer 'norm' is a LayerNorm in this model"),
        "config a list": (lambda d: (d / "config.json").write_text("[1, 2]"), "unreadable or corrupt JSON"),
        "no safetensors file": (lambda d: (d / WEIGHTS_NAME).unlink(), r"no \*.safetensors file"),
        "header claims more": (lambda d: _claim_more(d, 64), "corrupt or truncated"),
        "header claims far more": (lambda d: _claim_more(d, 2**40), "corrupt or truncated"),
        "empty file": (lambda d: (d / WEIGHTS_NAME).write_bytes(b""), "corrupt or truncated"),
    }
    if dq:
        c.update({
            "nested_absmax NaN": (lambda d: _edit_tensors(d, lambda t: _set(t, "up.weight.nested_absmax", 0,
                                                                            float("nan"))),
                                  r"nested_absmax must be finite and >= 0, got nan"),
            "nested_absmax negative": (lambda d: _edit_tensors(d, lambda t: _set(t, "up.weight.nested_absmax", 0,
                                                                                 -0.25)),
                                       r"nested_absmax must be finite and >= 0, got -0.25"),
            "nested_absmax wrong shape": (lambda d: _edit_tensors(d, lambda t: t.update(
                {"up.weight.nested_absmax": torch.ones(2)})), r"nested_absmax must be float32 \[1\]"),
            "nested_offset negative": (lambda d: _edit_state(d, "up", lambda st: dict(st, nested_offset=-0.1)),
                                       r"nested_offset must be a finite number >= 0, got -0.1"),
            "nested_offset a string": (lambda d: _edit_state(d, "up", lambda st: dict(st, nested_offset="0.1")),
                                       r"nested_offset must be a finite number >= 0, got '0.1'"),
            "nested_offset overflows": (lambda d: _edit_state(d, "up", lambda st: b'{"quant_type": "nf4", '
                                                              b'"blocksize": 64, "dtype": "float32", "shape": '
                                                              b'[128, 64], "nested_blocksize": 256, "nested_dtype": '
                                                              b'"float32", "nested_offset": 1e999}'),
                                        r"nested_offset must be a finite number >= 0, got inf"),
            "nested_offset missing": (lambda d: _edit_state(d, "up", lambda st: {k: v for k, v in st.items()
                                                                                  if k != "nested_offset"}),
                                      r"nested_offset must be a finite number >= 0, got None"),
            "nested_blocksize": (lambda d: _edit_state(d, "up", lambda st: dict(st, nested_blocksize=128)),
                                 "nested_blocksize 128"),
            "nested_dtype": (lambda d: _edit_state(d, "up", lambda st: dict(st, nested_dtype="float16")),
                             "nested_dtype 'float16'"),
            "custom nested_quant_map": (lambda d: _edit_tensors(d, lambda t: t["up.weight.nested_quant_map"].mul_(
                0.5)), "nested_quant_map is not bitsandbytes' 8-bit dynamic map"),
            "missing nested_absmax": (lambda d: _edit_tensors(d, lambda t: t.pop("up.weight.nested_absmax")),
                                      "has no up.weight.nested_absmax"),
            "missing nested_quant_map": (lambda d: _edit_tensors(d, lambda t: t.pop("up.weight.nested_quant_map")),
                                         "has no up.weight.nested_quant_map"),
        })
    else:
        c.update({
            "absmax NaN": (lambda d: _edit_tensors(d, lambda t: _set(t, "up.weight.absmax", 5, float("nan"))),
                           r"layer 'up': absmax must be finite and >= 0, got nan"),
            "absmax Inf": (lambda d: _edit_tensors(d, lambda t: _set(t, "down.weight.absmax", 0, float("inf"))),
                           r"layer 'down': absmax must be finite and >= 0, got inf"),
            "absmax negative": (lambda d: _edit_tensors(d, lambda t: _set(t, "up.weight.absmax", -1, -0.5)),
                                r"absmax must be finite and >= 0, got -0.5"),
            "stray nested_quant_map": (lambda d: _edit_tensors(d, lambda t: t.update(
                {"up.weight.nested_quant_map": t["up.weight.quant_map"].new_zeros(256)})),
                "up.weight.nested_quant_map in a layer without double quantization"),
            "stray nested_absmax": (lambda d: _edit_tensors(d, lambda t: t.update(
                {"up.weight.nested_absmax": torch.ones(1)})), "nested_blocksize None"),
        })
    return c


CRAFTED.update({fmt: _bnb4_crafted(fmt) for fmt in BNB4})


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


def test_bnb_layout_matches_bitsandbytes():
    """The hand-built bitsandbytes checkpoint (used where bitsandbytes is not installed) has the
    keys, dtypes and shapes bitsandbytes' Linear8bitLt writes, and its values up to bitsandbytes'
    fp16 rounding of the weight before quantizing it."""
    try:
        theirs = bnb_state_dict_by_bitsandbytes(Net().eval())
    except (ImportError, RuntimeError) as e:
        pytest.skip(f"bitsandbytes cannot quantize here: {e}")
    torch.manual_seed(0)
    m = Net().eval()
    theirs, ours = bnb_state_dict_by_bitsandbytes(m), bnb_state_dict_by_hand(m)
    assert {k: (v.dtype, tuple(v.shape)) for k, v in theirs.items()} == \
        {k: (v.dtype, tuple(v.shape)) for k, v in ours.items()}
    for k in ours:  # bitsandbytes takes the row absmax of the fp16-rounded weight
        if k.endswith(".SCB"):
            torch.testing.assert_close(theirs[k], ours[k], rtol=2.0**-10, atol=0)
        else:
            torch.testing.assert_close(theirs[k], ours[k], rtol=0, atol=0 if theirs[k].dtype != torch.int8 else 1)


def test_bnb_state_dict_source_damage():
    """The state-dict form of the import (no file): a value that is not a tensor, and the crafted
    damage above that needs no file, refused the same way."""
    sd = bnb_state_dict_by_hand(Net().eval())
    for bad, msg in ((dict(sd, **{"up.SCB": [1.0] * 128}), r"\['up.SCB'\] are not tensors \(got list\)"),
                     (dict(sd, **{"up.weight_format": torch.tensor([], dtype=torch.uint8)}), "must hold one integer"),
                     (dict(sd, **{"norm.weight": sd["norm.weight"].to(torch.int64)}), "norm.weight has dtype")):
        m = fresh()
        before = state(m)
        with pytest.raises(CheckpointError, match=msg):
            qk.load_bnb_int8(m, bad)
        assert same(state(m), before)


@pytest.mark.parametrize("fmt", BNB4)
def test_bnb4_layout_matches_bitsandbytes(fmt):
    """The hand-built 4-bit checkpoint (used where bitsandbytes is not installed) is what
    bitsandbytes' Linear4bit writes: the same keys, dtypes, shapes and bytes (s.11 is bit-compatible)."""
    qt, dq = ("nf4", True) if fmt == "bnb_nf4_dq" else ("fp4", False)
    torch.manual_seed(0)
    m = Net().eval()
    try:
        theirs = bnb4_state_dict_by_bitsandbytes(m, qt, dq)
    except (ImportError, RuntimeError) as e:
        pytest.skip(f"bitsandbytes cannot quantize here: {e}")
    ours = bnb4_state_dict_by_hand(m, qt, dq)
    assert {k: (v.dtype, tuple(v.shape)) for k, v in theirs.items()} == \
        {k: (v.dtype, tuple(v.shape)) for k, v in ours.items()}
    for k in ours:
        assert torch.equal(theirs[k], ours[k]), k


def test_bnb4_state_dict_source_damage():
    """The state-dict form of the 4-bit import: a value that is not a tensor (a bias, an absmax, the
    quant_state) is refused with the key named, the model left as it was."""
    sd = bnb4_state_dict_by_hand(Net().eval(), "nf4", True)
    for key in ("up.bias", "up.weight.absmax", "down.weight.quant_state.bitsandbytes__nf4", "norm.weight"):
        m = fresh()
        before = state(m)
        with pytest.raises(CheckpointError, match=rf"load_bnb_4bit: \['{key}'\] are not tensors \(got list\)"):
            qk.load_bnb_4bit(m, dict(sd, **{key: sd[key].tolist()}))
        assert same(state(m), before)
    assert isinstance(qk.load_bnb_4bit(fresh(), sd).up, qk.QuantLinear)


def test_bnb_failure_during_commit_puts_everything_back(saved):
    """The safety net behind the checks: a failure after the layer swap (here load_state_dict
    itself raising) puts every module, parameter and buffer back."""
    d, _ = saved["bnb_int8"]
    m = fresh()
    before = state(m)
    params = {n: p for n, p in m.named_parameters()}

    def boom(*a, **k):
        raise RuntimeError("simulated failure in load_state_dict")

    m.load_state_dict = boom
    with pytest.raises(RuntimeError, match="simulated failure"):
        qk.load_bnb_int8(m, d)
    assert same(state(m), before)
    assert all(p is params[n] for n, p in m.named_parameters())


def test_bnb_float_tensors_take_the_skeleton_dtype(saved, tmp_path):
    """An fp16 checkpoint's float tensors (bias, norm) loaded into an fp32 skeleton come out fp32,
    as load_quantized does; the int8 weights and their scales are kept as stored."""
    d, ref_state = saved["bnb_int8"]
    bad = copy_ckpt(d, tmp_path / "fp16")
    _edit_tensors(bad, lambda t: t.update({k: v.half() for k, v in t.items() if v.dtype == torch.float32
                                           and not k.endswith(".SCB")}))
    m = qk.load_bnb_int8(fresh(), bad)
    assert all(v.dtype == ref_state[1][k].dtype for k, v in m.state_dict().items())
    torch.testing.assert_close(m.up.weight_scale, ref_state[1]["up.weight_scale"], rtol=0, atol=0)


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
