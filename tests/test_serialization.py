"""save_quantized / load_quantized (safetensors + JSON config), QuantLinear state_dict round trips,
clear errors on corrupt or mismatched checkpoints, and the bitsandbytes 8-bit import."""

import copy
import json
import warnings

import pytest
import torch
from torch import nn

import quantkernels as qk
from quantkernels.serialization import CONFIG_NAME, WEIGHTS_NAME, CheckpointError

safetensors = pytest.importorskip("safetensors")
from safetensors.torch import load_file, save_file  # noqa: E402

SCHEMES = tuple(qk.SCHEMES)


class Toy(nn.Module):
    def __init__(self, vocab=64, d=256, tie=True):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.up = nn.Linear(d, 512)
        self.down = nn.Linear(512, d, bias=False)
        self.narrow = nn.Linear(200, d)              # K = 200: no int4 group size fits
        self.norm = nn.LayerNorm(d)
        self.lm_head = nn.Linear(d, vocab, bias=False)
        self.register_buffer("inv_freq", torch.arange(4.0), persistent=False)  # like a rotary buffer
        if tie:
            self.lm_head.weight = self.embed.weight

    def forward(self, ids):
        h = self.embed(ids)
        h = h + self.down(torch.relu(self.up(h))) + self.narrow(h[..., :200])
        return self.lm_head(self.norm(h)) + self.inv_freq.sum()


def quantized_toy(scheme, **kw):
    torch.manual_seed(0)
    m = Toy(**kw).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # int4: "narrow" stays in float, with a warning
        return qk.quantize_model(m, scheme, group_size=64)


def skeleton(**kw):
    with qk.init_empty_weights():
        return Toy(**kw).eval()


IDS = torch.tensor([[1, 5, 9, 33, 63], [0, 2, 4, 6, 8]])


def assert_same_state(a: nn.Module, b: nn.Module):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and sa[k].shape == sb[k].shape, k
        assert torch.equal(sa[k], sb[k]), k


@pytest.mark.parametrize("scheme", SCHEMES)
def test_round_trip_every_scheme(tmp_path, scheme):
    m = quantized_toy(scheme)
    ref = m(IDS)
    qk.save_quantized(m, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [WEIGHTS_NAME, CONFIG_NAME]
    sk = skeleton()
    assert sk.up.weight.device.type == "meta" and sk.inv_freq.device.type == "cpu"
    out = qk.load_quantized(sk, tmp_path)
    assert out is sk
    assert all(t.device.type == "cpu" for t in list(sk.parameters()) + list(sk.buffers()))
    assert isinstance(sk.up, qk.QuantLinear) and sk.up.scheme == scheme and sk.up.group_size == m.up.group_size
    assert sk.lm_head.weight is sk.embed.weight                     # the tie survives
    assert_same_state(sk, m)
    torch.testing.assert_close(sk(IDS), ref, rtol=0, atol=0)        # bit-exact: nothing re-quantized
    assert sorted(sk.quantkernels_report.quantized) == sorted(m.quantkernels_report.quantized)


def test_config_contents(tmp_path):
    m = quantized_toy("w4a16")
    qk.save_quantized(m, tmp_path)
    cfg = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert cfg["format"] == "quantkernels" and cfg["format_version"] == 2
    assert (cfg["scheme"], cfg["group_size"], cfg["weight_format"]) == ("w4a16", 64, "uint4_plain")
    assert set(cfg["modules"]) == {"up", "down"}
    assert cfg["modules"]["up"] == {"scheme": "w4a16", "weight_format": "uint4_plain", "group_size": 64,
                                    "threshold": 6.0, "in_features": 256, "out_features": 512, "bias": True,
                                    "input_scale": False}
    assert "not a multiple of group_size" in cfg["kept_in_float"]["narrow"]
    assert "exclude" in cfg["kept_in_float"]["lm_head"]
    assert cfg["tied"] == {"lm_head.weight": "embed.weight"}
    # safetensors only, no pickle: every tensor readable by safetensors, the tie stored once
    t = load_file(str(tmp_path / WEIGHTS_NAME))
    assert "lm_head.weight" not in t and t["up.qweight"].dtype == torch.uint8
    assert t["up.qweight"].shape == (512, 128) and t["up.weight_zero"].shape == (512, 4)


def test_mixed_schemes_and_bf16(tmp_path):
    torch.manual_seed(0)
    m = Toy(tie=False).to(torch.bfloat16).eval()
    qk.quantize_model(m, "w8a8", include=["up"])
    qk.quantize_model(m, "llm_int8", include=["down"], threshold=3.5, exclude=None)
    qk.save_quantized(m, tmp_path)
    cfg = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert cfg["scheme"] is None and cfg["modules"]["down"]["threshold"] == 3.5  # not one scheme for all
    sk = skeleton(tie=False).to(torch.bfloat16)  # float tensors take the skeleton's dtype
    qk.load_quantized(sk, tmp_path)
    assert sk.down.scheme == "llm_int8" and sk.down.threshold == 3.5 and sk.up.bias.dtype == torch.bfloat16
    assert sk.embed.weight.dtype == torch.bfloat16
    torch.testing.assert_close(sk(IDS), m(IDS), rtol=0, atol=0)


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("bias_dtype", [torch.float32, torch.bfloat16])
def test_quantlinear_state_dict_round_trip(scheme, bias_dtype):
    lin = nn.Linear(128, 48).to(bias_dtype)
    q = qk.QuantLinear.from_linear(lin, scheme, group_size=32, threshold=2.0)
    sd = q.state_dict()
    fresh = qk.QuantLinear(128, 48, scheme=scheme, group_size=32, threshold=2.0, dtype=bias_dtype)
    fresh.load_state_dict(sd)
    assert_same_state(fresh, q)
    x = torch.randn(3, 128).to(bias_dtype)
    torch.testing.assert_close(fresh(x), q(x), rtol=0, atol=0)
    # through safetensors, too
    fresh2 = qk.QuantLinear(128, 48, scheme=scheme, group_size=32, threshold=2.0, dtype=bias_dtype)
    fresh2.load_state_dict(safetensors.torch.load(safetensors.torch.save(sd)))
    assert_same_state(fresh2, q)
    if scheme in ("w4a16", "w4a8"):  # another group size cannot take this state dict
        with pytest.raises(RuntimeError, match="size mismatch"):
            qk.QuantLinear(128, 48, scheme=scheme, group_size=64).load_state_dict(sd)


# ----------------------------------------------------------------------------- errors


def _snapshot(m):
    return {n: type(mod).__name__ for n, mod in m.named_modules()}, \
           {k: (v.device.type, v.dtype, tuple(v.shape)) for k, v in m.state_dict().items()}


def _edit_config(path, fn):
    cfg = json.loads((path / CONFIG_NAME).read_text())
    fn(cfg)
    (path / CONFIG_NAME).write_text(json.dumps(cfg))


def _truncate(p):
    f = p / WEIGHTS_NAME
    f.write_bytes(f.read_bytes()[:-1000])


def _garbage(p):
    (p / WEIGHTS_NAME).write_bytes(b"\x00\x01not a safetensors file" * 10)


def _swap_int4(p):
    t = load_file(str(p / WEIGHTS_NAME))
    t["up.qweight"] = t["up.qweight"][:, :128].to(torch.uint8).contiguous()  # int4-shaped, int8 scheme
    save_file(t, str(p / WEIGHTS_NAME))


def _wrong_dtype(p):
    t = load_file(str(p / WEIGHTS_NAME))
    t["up.qweight"] = t["up.qweight"].view(torch.uint8)
    save_file(t, str(p / WEIGHTS_NAME))


BAD = {
    "unknown version": (lambda p: _edit_config(p, lambda c: c.update(format_version=99)),
                        "unknown format_version 99"),
    "corrupt json": (lambda p: (p / CONFIG_NAME).write_text("{not json"), "corrupt JSON"),
    "not ours": (lambda p: _edit_config(p, lambda c: c.update(format="gptq")), "'format' is 'gptq'"),
    "unknown scheme": (lambda p: _edit_config(p, lambda c: c["modules"]["up"].update(scheme="w3a8")),
                       "unknown scheme 'w3a8'"),
    "scheme vs format": (lambda p: _edit_config(p, lambda c: c["modules"]["up"].update(scheme="w4a16")),
                         "weight_format 'int8_plain' does not match scheme 'w4a16'"),
    "wrong scheme tensors": (_swap_int4, r"up.qweight.*shape \(512, 128\), expected \(512, 256\)"),
    "wrong dtype": (_wrong_dtype, r"up.qweight.*dtype torch.uint8, expected torch.int8"),
    "truncated": (_truncate, "corrupt or truncated"),
    "garbage": (_garbage, "corrupt or truncated"),
    "missing weights": (lambda p: (p / WEIGHTS_NAME).unlink(), "no model.safetensors"),
    "missing config": (lambda p: (p / CONFIG_NAME).unlink(), "no quantization_config.json"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_checkpoint_fails_clearly_and_leaves_model_untouched(tmp_path, case):
    qk.save_quantized(quantized_toy("w8a8"), tmp_path)
    corrupt, msg = BAD[case]
    corrupt(tmp_path)
    _assert_refused_untouched(tmp_path, msg)


def _assert_refused_untouched(path, msg):
    sk = skeleton()
    before = _snapshot(sk)
    with pytest.raises(CheckpointError, match=msg):
        qk.load_quantized(sk, path)
    assert _snapshot(sk) == before


def test_mismatched_model_fails_clearly(tmp_path):
    qk.save_quantized(quantized_toy("w8a8"), tmp_path)
    other = skeleton(vocab=80)  # another vocabulary: embedding shape differs
    before = _snapshot(other)
    with pytest.raises(CheckpointError, match=r"embed.weight.*shape \(64, 256\), expected \(80, 256\)"):
        qk.load_quantized(other, tmp_path)
    assert _snapshot(other) == before

    class Renamed(Toy):
        def __init__(self):
            super().__init__()
            self.proj = self.up
            del self.up
    with qk.init_empty_weights():
        r = Renamed()
    with pytest.raises(CheckpointError, match="quantizes layer 'up', which this model does not have"):
        qk.load_quantized(r, tmp_path)
    with torch.device("meta"):  # buffers on meta too: the non-persistent inv_freq cannot be restored
        meta = Toy()
    with pytest.raises(CheckpointError, match="inv_freq.*init_empty_weights"):
        qk.load_quantized(meta, tmp_path)
    with pytest.raises(CheckpointError, match="not a directory"):
        qk.load_quantized(skeleton(), tmp_path / "nope")


INDEX = WEIGHTS_NAME + ".index.json"


def _reshard(p, n_shards=3):
    """Splits save_quantized's one file into shards + index, as save_pretrained(max_shard_size=...) does."""
    import safetensors as st

    with st.safe_open(str(p / WEIGHTS_NAME), "pt") as f:
        meta = f.metadata()
    t = load_file(str(p / WEIGHTS_NAME))
    names = sorted(t)
    weight_map = {}
    for i in range(n_shards):
        fn = f"model-{i + 1:05d}-of-{n_shards:05d}.safetensors"
        part = {k: t[k] for k in names[i::n_shards]}
        save_file(part, str(p / fn), metadata=meta)
        weight_map.update({k: fn for k in part})
    (p / WEIGHTS_NAME).unlink()
    (p / INDEX).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return weight_map


def test_sharded_checkpoint_loads_bit_exact(tmp_path):
    m = quantized_toy("w4a16")
    ref = m(IDS)
    qk.save_quantized(m, tmp_path)
    _reshard(tmp_path)
    sk = skeleton()
    qk.load_quantized(sk, tmp_path)
    assert_same_state(sk, m)
    torch.testing.assert_close(sk(IDS), ref, rtol=0, atol=0)
    from quantkernels.serialization import stored_float_dtype
    assert stored_float_dtype(tmp_path) == torch.float32  # reads the shards' headers


def _dup_key(p, wm):  # a tensor stored in two shards: which copy is meant is unknown
    a, b = sorted(set(wm.values()))[:2]
    ta, tb = load_file(str(p / a)), load_file(str(p / b))
    k = sorted(ta)[0]
    tb[k] = torch.zeros_like(ta[k])
    save_file(tb, str(p / b))


def _edit_index(fn):
    def corrupt(p, wm):
        idx = json.loads((p / INDEX).read_text())
        fn(idx["weight_map"])
        (p / INDEX).write_text(json.dumps(idx))
    return corrupt


SHARD_DAMAGE = {
    "tensor in two shards": (_dup_key, "does not match the shard index.*holds"),
    "index names a tensor the shard lacks": (_edit_index(lambda w: w.update({"ghost.weight": sorted(w.values())[0]})),
                                             r"lacks \['ghost.weight'\]"),
    "index moves a tensor": (_edit_index(lambda w: w.update({"up.qweight": [v for v in sorted(set(w.values()))
                                                                            if v != w["up.qweight"]][0]})),
                             "does not match the shard index"),
    "path in the index": (_edit_index(lambda w: w.update({"up.qweight": "../model.safetensors"})),
                          "is not a file name in"),
    "absolute path in the index": (_edit_index(lambda w: w.update({"up.qweight": "/etc/passwd"})),
                                   "is not a file name in"),
    "weight_map not an object": (lambda p, wm: (p / INDEX).write_text(json.dumps({"weight_map": [1, 2]})),
                                 "corrupt shard index"),
    "shard file name not a string": (_edit_index(lambda w: w.update({"up.qweight": 3})), "corrupt shard index"),
    "shard missing": (lambda p, wm: (p / sorted(set(wm.values()))[1]).unlink(), "no such file"),
    "shard truncated": (lambda p, wm: (p / sorted(set(wm.values()))[0]).write_bytes(b"\x00" * 10),
                        "corrupt or truncated"),
}


@pytest.mark.parametrize("case", list(SHARD_DAMAGE))
def test_damaged_shards_fail_clearly_and_leave_model_untouched(tmp_path, case):
    qk.save_quantized(quantized_toy("w8a8"), tmp_path)
    wm = _reshard(tmp_path)
    corrupt, msg = SHARD_DAMAGE[case]
    corrupt(tmp_path, wm)
    _assert_refused_untouched(tmp_path, msg)


def test_bnb_import_refuses_a_tensor_in_two_files(tmp_path):
    src = Two()
    sd = {f"a.{k}": v for k, v in bnb_style_state_dict(src.a, False).items()}
    save_file(sd, str(tmp_path / "model-00001-of-00002.safetensors"))
    save_file({"a.SCB": sd["a.SCB"] * 2}, str(tmp_path / "model-00002-of-00002.safetensors"))
    with pytest.raises(CheckpointError, match="'a.SCB' is stored twice"):
        qk.load_bnb_int8(copy.deepcopy(src), tmp_path)


def test_save_refuses_float_model(tmp_path):
    with pytest.raises(ValueError, match="no QuantLinear"):
        qk.save_quantized(Toy(), tmp_path)


def test_hf_gpt2_skeleton_from_config(tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(n_layer=2, n_embd=128, n_head=4, n_positions=64, vocab_size=300)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    qk.quantize_model(model, "w8a16")
    ids = torch.randint(0, 300, (2, 11))
    with torch.no_grad():
        ref = model(ids).logits
    qk.save_quantized(model, tmp_path)
    with qk.init_empty_weights():
        sk = transformers.GPT2LMHeadModel(cfg).eval()
    qk.load_quantized(sk, tmp_path)
    assert sk.lm_head.weight is sk.transformer.wte.weight
    with torch.no_grad():
        torch.testing.assert_close(sk(ids).logits, ref, rtol=0, atol=0)


# ----------------------------------------------------------------------------- bitsandbytes


def bnb_style_state_dict(lin: nn.Linear, legacy_format: bool):
    """The state dict bitsandbytes' Linear8bitLt writes (row-wise absmax int8 + SCB = row absmax)."""
    w = lin.weight.detach().float()
    scb = w.abs().amax(1)
    q = torch.round(w * (127.0 / scb[:, None])).to(torch.int8)
    sd = {"weight": q, "SCB": scb, "bias": lin.bias.detach().clone()}
    if legacy_format:
        sd["weight_format"] = torch.tensor(0, dtype=torch.uint8)
    return sd


class Two(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(64, 96)
        self.norm = nn.LayerNorm(96)
        self.b = nn.Linear(96, 32)

    def forward(self, x):
        return self.b(self.norm(self.a(x)))


@pytest.mark.parametrize("legacy_format", [False, True])
def test_bnb_int8_import_documented_format(tmp_path, legacy_format):
    torch.manual_seed(0)
    src = Two().eval()
    sd = {"norm.weight": src.norm.weight.detach(), "norm.bias": src.norm.bias.detach()}
    for n in ("a", "b"):
        sd.update({f"{n}.{k}": v for k, v in bnb_style_state_dict(getattr(src, n), legacy_format).items()})
    save_file(sd, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps({"quantization_config": {
        "load_in_8bit": True, "llm_int8_threshold": 5.0, "quant_method": "bitsandbytes"}}))
    with qk.init_empty_weights():
        sk = Two().eval()
    qk.load_bnb_int8(sk, tmp_path)
    assert isinstance(sk.a, qk.QuantLinear) and sk.a.scheme == "llm_int8" and sk.a.threshold == 5.0
    assert torch.equal(sk.a.qweight, sd["a.weight"])
    torch.testing.assert_close(sk.a.weight_scale, sd["a.SCB"] / 127, rtol=0, atol=0)
    # the same as quantizing the float layer ourselves (same contract: absmax / 127, [-127, 127])
    ours = qk.QuantLinear.from_linear(src.a, "llm_int8")
    assert torch.equal(ours.qweight, sk.a.qweight) and torch.equal(ours.weight_scale, sk.a.weight_scale)
    x = torch.randn(5, 64)
    x[:, 3] *= 20
    with torch.no_grad():
        ref = src(x)
        out = sk(x)
    assert (out - ref).pow(2).mean() / ref.pow(2).mean() < 1e-3
    # then saves and reloads in our own format
    qk.save_quantized(sk, tmp_path / "qk")
    with qk.init_empty_weights():
        sk2 = Two().eval()
    qk.load_quantized(sk2, tmp_path / "qk")
    torch.testing.assert_close(sk2(x), out, rtol=0, atol=0)


def test_bnb_int8_import_errors(tmp_path):
    src = Two()
    sd = {f"a.{k}": v for k, v in bnb_style_state_dict(src.a, True).items()}
    sd["a.weight_format"] = torch.tensor(1, dtype=torch.uint8)  # col_turing tile layout
    with pytest.raises(CheckpointError, match="weight_format = 1"):
        qk.load_bnb_int8(copy.deepcopy(src), sd)
    with pytest.raises(CheckpointError, match="no '<layer>.SCB'"):
        qk.load_bnb_int8(copy.deepcopy(src), {"a.weight": torch.zeros(96, 64)})
    sd = {f"b.{k}": v for k, v in bnb_style_state_dict(src.a, False).items()}  # a's shape under b's name
    with pytest.raises(CheckpointError, match=r"b.weight has shape \(96, 64\)"):
        qk.load_bnb_int8(copy.deepcopy(src), sd)


def test_bnb_int8_real_checkpoint(tmp_path):
    """A checkpoint written by bitsandbytes itself (its CPU backend quantizes on .to("cpu"))."""
    bnb = pytest.importorskip("bitsandbytes")
    torch.manual_seed(0)
    src = Two().eval()
    m = nn.Sequential()
    m.a = bnb.nn.Linear8bitLt(64, 96, bias=True, has_fp16_weights=False, threshold=6.0)
    m.norm = nn.LayerNorm(96)
    m.b = bnb.nn.Linear8bitLt(96, 32, bias=True, has_fp16_weights=False, threshold=6.0)
    m.load_state_dict(src.state_dict())
    m = m.to("cpu")  # bitsandbytes quantizes here
    if m.a.weight.dtype != torch.int8:
        pytest.skip(f"bitsandbytes {bnb.__version__} did not quantize on the CPU")
    sd = {k: v.contiguous() for k, v in m.state_dict().items()}
    assert sd["a.weight"].dtype == torch.int8 and sd["a.SCB"].shape == (96,)
    save_file(sd, str(tmp_path / "model.safetensors"))
    with qk.init_empty_weights():
        sk = Two().eval()
    qk.load_bnb_int8(sk, tmp_path / "model.safetensors")
    assert torch.equal(sk.a.qweight, sd["a.weight"]) and torch.equal(sk.b.qweight, sd["b.weight"])
    torch.testing.assert_close(sk.a.weight_scale, sd["a.SCB"] / 127, rtol=0, atol=0)
    x = torch.randn(6, 64)
    x[:, 7] *= 30  # an outlier column
    with torch.no_grad():
        ref, ours, theirs = src(x), sk(x), m(x)
    rel = lambda a, b: ((a - b).pow(2).mean() / b.pow(2).mean()).item()
    assert rel(ours, ref) < 1e-3, rel(ours, ref)
    assert rel(ours, theirs) < 1e-3, rel(ours, theirs)
