"""The transformers quantizer (quantkernels.hf): QuantKernelsConfig, quantize-on-load with
from_pretrained, save_pretrained / from_pretrained, and one on-disk format shared with
save_quantized / load_quantized (either loads what the other wrote)."""

import importlib
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import quantkernels as qk

transformers = pytest.importorskip("transformers", minversion="5.0")
from safetensors import safe_open  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

from quantkernels import hf  # noqa: E402
from quantkernels.nn import QuantEmbedding, QuantLinear  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
VOCAB = 300


def _save(model, path: Path) -> Path:
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    """A tiny random Llama (tied embeddings, as small Llamas have), saved as transformers saves it."""
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                   tie_word_embeddings=True)
    torch.manual_seed(0)
    return _save(transformers.LlamaForCausalLM(cfg), tmp_path_factory.mktemp("llama") / "src")


@pytest.fixture(scope="module")
def gemma_dir(tmp_path_factory):
    """A tiny random Gemma-3 (scaled word embedding tied to lm_head, like Gemma-3-270M)."""
    cfg = transformers.Gemma3TextConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=2, num_key_value_heads=1, head_dim=32,
                                        max_position_embeddings=128, tie_word_embeddings=True)
    torch.manual_seed(1)
    return _save(transformers.Gemma3ForCausalLM(cfg), tmp_path_factory.mktemp("gemma") / "src")


@pytest.fixture
def ids():
    return torch.randint(0, VOCAB, (2, 11), generator=torch.Generator().manual_seed(3))


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def _float(path, dtype=torch.float32):
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype)


def _quant_buffers(model):
    return {k: v for k, v in model.state_dict().items()
            if k.endswith((".qweight", ".weight_scale", ".weight_zero", ".nested_absmax", ".absmax_offset"))}


# --------------------------------------------------------------------------- the "done when"


def test_from_pretrained_save_pretrained_reload_identical(llama_dir, tmp_path, ids):
    cfg = qk.QuantKernelsConfig("w4a16", group_size=64)
    model = AutoModelForCausalLM.from_pretrained(llama_dir, quantization_config=cfg, dtype=torch.float32)
    layers = [n for n, m in model.named_modules() if isinstance(m, QuantLinear)]
    assert len(layers) == 14 and isinstance(model.lm_head, torch.nn.Linear)  # 2 x (q,k,v,o,gate,up,down)
    assert model.lm_head.weight is model.model.embed_tokens.weight  # kept in float and tied
    assert not any(hasattr(model.get_submodule(n), "weight") for n in layers)  # no float weight left behind
    assert not cfg.is_checkpoint and model.config.quantization_config.is_checkpoint  # the user's object is untouched
    out = tmp_path / "out"
    model.save_pretrained(out)
    saved = json.loads((out / "config.json").read_text())["quantization_config"]
    assert saved["quant_method"] == "quantkernels" and saved["scheme"] == "w4a16" and len(saved["modules"]) == 14
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "model.layers.0.self_attn.q_proj.qweight" in keys and "model.layers.0.self_attn.q_proj.weight" not in keys

    reloaded = AutoModelForCausalLM.from_pretrained(out)  # plain: the quantizer comes from config.json
    assert isinstance(reloaded.model.layers[1].mlp.down_proj, QuantLinear)
    torch.testing.assert_close(_logits(reloaded, ids), _logits(model, ids), rtol=0, atol=0)
    for k, v in _quant_buffers(model).items():  # nothing re-quantized: the very same integers and scales
        assert torch.equal(reloaded.state_dict()[k], v), k


@pytest.mark.parametrize("scheme,group_size", [("w8a8", 128), ("llm_int8", 128), ("w8a16", 128), ("w4a16", 32),
                                               ("w4a8", 64), ("w4a16", -1)])
def test_quantize_on_load_equals_quantize_model(llama_dir, ids, scheme, group_size):
    loaded = AutoModelForCausalLM.from_pretrained(
        llama_dir, quantization_config=qk.QuantKernelsConfig(scheme, group_size=group_size, threshold=2.0),
        dtype=torch.float32)
    ref = qk.quantize_model(_float(llama_dir), scheme, group_size=group_size, threshold=2.0)
    assert _quant_buffers(loaded).keys() == _quant_buffers(ref).keys()
    for k, v in _quant_buffers(ref).items():
        assert torch.equal(loaded.state_dict()[k], v), k
    torch.testing.assert_close(_logits(loaded, ids), _logits(ref, ids), rtol=0, atol=0)
    assert loaded.quantkernels_report.quantized == ref.quantkernels_report.quantized


@pytest.mark.parametrize("scheme,group_size,which,head", [("nf4", 32, "llama", False), ("fp4", 64, "gemma", True)])
def test_double_quant_on_load_save_and_reload(llama_dir, gemma_dir, tmp_path, ids, scheme, group_size, which, head):
    """QuantKernelsConfig(double_quant=True): the same buffers as quantize_model(..., double_quant=True)
    (uint8 absmax codes, nested absmax, offset), also for a tied lm_head; save_pretrained records it
    and a plain from_pretrained reads the same bits back."""
    src = llama_dir if which == "llama" else gemma_dir
    cfg = qk.QuantKernelsConfig(scheme, group_size=group_size, double_quant=True, quantize_lm_head=head)
    assert qk.QuantKernelsConfig.from_dict(json.loads(cfg.to_json_string())).to_dict() == cfg.to_dict()
    model = AutoModelForCausalLM.from_pretrained(src, quantization_config=cfg, dtype=torch.float32)
    ref = qk.quantize_model(_float(src), scheme, group_size=group_size, double_quant=True,
                            exclude=() if head else ("lm_head",))
    layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    assert layers and all(m.double_quant and m.weight_scale.dtype == torch.uint8 for m in layers)
    assert isinstance(model.lm_head, QuantLinear) == head
    want = _quant_buffers(ref)
    assert any(k.endswith(".nested_absmax") for k in want) and _quant_buffers(model).keys() == want.keys()
    for k, v in want.items():
        assert torch.equal(model.state_dict()[k], v), k
    torch.testing.assert_close(_logits(model, ids), _logits(ref, ids), rtol=0, atol=0)
    assert model.config.quantization_config.double_quant is True

    model.save_pretrained(tmp_path / "hf")
    saved = json.loads((tmp_path / "hf" / "config.json").read_text())["quantization_config"]
    assert saved["double_quant"] is True and saved["scheme"] == scheme
    assert all(e["double_quant"] is True for e in saved["modules"].values())
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    for k, v in want.items():
        assert torch.equal(reloaded.state_dict()[k], v), k
    torch.testing.assert_close(_logits(reloaded, ids), _logits(ref, ids), rtol=0, atol=0)
    assert reloaded.config.quantization_config.double_quant is True
    # save_quantized's checkpoint (no top-level double_quant key) through from_pretrained: the table decides
    qk.save_quantized(ref, tmp_path / "ours")
    via_hf = AutoModelForCausalLM.from_pretrained(tmp_path / "ours")
    assert via_hf.config.quantization_config.double_quant is True
    torch.testing.assert_close(_logits(via_hf, ids), _logits(ref, ids), rtol=0, atol=0)


def test_double_quant_off_is_plain_absmax(llama_dir):
    model = AutoModelForCausalLM.from_pretrained(llama_dir, quantization_config=qk.QuantKernelsConfig(
        "nf4", group_size=64), dtype=torch.float32)
    up = model.model.layers[0].mlp.up_proj
    assert not up.double_quant and up.weight_scale.dtype == torch.float32 and up.nested_absmax is None
    assert model.config.quantization_config.double_quant is False
    assert all(e.get("double_quant", False) is False for e in model.config.quantization_config.modules.values())
    # written only when True: a config.json without it reads as before in an older quantkernels
    assert "double_quant" not in model.config.quantization_config.to_dict()
    assert qk.QuantKernelsConfig("nf4", group_size=64, double_quant=True).to_dict()["double_quant"] is True
    assert qk.QuantKernelsConfig.from_dict(qk.QuantKernelsConfig("fp4", group_size=64).to_dict()).double_quant is False


def test_modules_to_not_convert_and_skipped_layers(llama_dir):
    cfg = qk.QuantKernelsConfig("w8a8", modules_to_not_convert=["*.mlp.*", "o_proj"])
    model = AutoModelForCausalLM.from_pretrained(llama_dir, quantization_config=cfg, dtype=torch.float32)
    kinds = {n: type(m).__name__ for n, m in model.named_modules() if isinstance(m, (QuantLinear, torch.nn.Linear))}
    assert kinds["model.layers.0.self_attn.q_proj"] == "QuantLinear"
    assert kinds["model.layers.0.self_attn.o_proj"] == "Linear" and kinds["model.layers.1.mlp.up_proj"] == "Linear"
    kept = json.loads(json.dumps(model.config.quantization_config.to_dict()))["kept_in_float"]
    assert "matched modules_to_not_convert pattern '*.mlp.*'" in kept["model.layers.1.mlp.down_proj"]
    # a group size the layers' K (128, 256) cannot be split into would be skipped: 256 > K = 128 for q/k/v
    with pytest.warns(UserWarning, match="cannot serve"):
        m256 = AutoModelForCausalLM.from_pretrained(llama_dir, quantization_config=qk.QuantKernelsConfig(
            "w4a8", group_size=256), dtype=torch.float32)
    assert isinstance(m256.model.layers[0].mlp.down_proj, QuantLinear)  # K = 256
    assert isinstance(m256.model.layers[0].self_attn.q_proj, torch.nn.Linear)  # K = 128: kept in float


# --------------------------------------------------------------------------- one on-disk format


def test_cross_loading_both_directions(llama_dir, tmp_path, ids):
    ref = qk.quantize_model(_float(llama_dir), "w8a16")
    q = ref.model.layers[0].self_attn.q_proj  # a SmoothQuant input_scale travels too
    q.input_scale = torch.linspace(0.5, 2.0, q.in_features)
    want = _logits(ref, ids)

    qk.save_quantized(ref, tmp_path / "ours")  # ours -> transformers
    assert json.loads((tmp_path / "ours" / "config.json").read_text())["quantization_config"] == \
        json.loads((tmp_path / "ours" / "quantization_config.json").read_text())
    via_hf = AutoModelForCausalLM.from_pretrained(tmp_path / "ours")
    assert via_hf.model.layers[0].self_attn.q_proj.input_scale is not None
    torch.testing.assert_close(_logits(via_hf, ids), want, rtol=0, atol=0)

    via_hf.save_pretrained(tmp_path / "hf")  # transformers -> ours
    assert not (tmp_path / "hf" / "quantization_config.json").exists()
    with qk.init_empty_weights():
        skeleton = transformers.LlamaForCausalLM(transformers.AutoConfig.from_pretrained(tmp_path / "hf"))
    back = qk.load_quantized(skeleton, tmp_path / "hf")
    torch.testing.assert_close(_logits(back, ids), want, rtol=0, atol=0)
    assert back.lm_head.weight is back.model.embed_tokens.weight


def test_tied_lm_head_quantized_and_served_to_the_embedding(gemma_dir, tmp_path, ids):
    cfg = qk.QuantKernelsConfig("w4a8", group_size=32, quantize_lm_head=True)
    model = AutoModelForCausalLM.from_pretrained(gemma_dir, quantization_config=cfg, dtype=torch.float32)
    assert isinstance(model.lm_head, QuantLinear) and isinstance(model.model.embed_tokens, QuantEmbedding)
    assert model.quantkernels_report.tied_embeddings == {"model.embed_tokens": "lm_head"}
    ref = qk.quantize_model(_float(gemma_dir), "w4a8", group_size=32, exclude=())
    want = _logits(ref, ids)
    torch.testing.assert_close(_logits(model, ids), want, rtol=0, atol=0)
    model.save_pretrained(tmp_path / "hf")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    assert isinstance(reloaded.model.embed_tokens, QuantEmbedding)
    torch.testing.assert_close(_logits(reloaded, ids), want, rtol=0, atol=0)
    qk.save_quantized(ref, tmp_path / "ours")
    torch.testing.assert_close(_logits(AutoModelForCausalLM.from_pretrained(tmp_path / "ours"), ids), want,
                               rtol=0, atol=0)
    with qk.init_empty_weights():
        skeleton = transformers.Gemma3ForCausalLM(transformers.AutoConfig.from_pretrained(tmp_path / "hf"))
    torch.testing.assert_close(_logits(qk.load_quantized(skeleton, tmp_path / "hf"), ids), want, rtol=0, atol=0)


def test_gpt2_conv1d(tmp_path, ids):
    cfg = transformers.GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=2, n_positions=64,
                                  bos_token_id=0, eos_token_id=0)
    torch.manual_seed(2)
    path = _save(transformers.GPT2LMHeadModel(cfg), tmp_path / "gpt2")
    loaded = AutoModelForCausalLM.from_pretrained(path, quantization_config=qk.QuantKernelsConfig("w8a8"),
                                                  dtype=torch.float32)
    ref = qk.quantize_model(_float(path), "w8a8")
    assert len(loaded.quantkernels_report.quantized) == 8  # 2 x (c_attn, c_proj, c_fc, mlp.c_proj)
    torch.testing.assert_close(_logits(loaded, ids), _logits(ref, ids), rtol=0, atol=0)


# --------------------------------------------------------------------------- dtype, device_map, generate, compile


def test_bf16_device_map_generate_and_compile(gemma_dir, tmp_path, ids):
    model = AutoModelForCausalLM.from_pretrained(gemma_dir, quantization_config=qk.QuantKernelsConfig("w8a8"),
                                                 dtype=torch.bfloat16, device_map="cpu")
    assert model.dtype == torch.bfloat16 and model.model.layers[0].mlp.up_proj.qweight.device.type == "cpu"
    ref = qk.quantize_model(_float(gemma_dir, torch.bfloat16), "w8a8")
    eager = _logits(model, ids)
    assert eager.dtype == torch.bfloat16
    torch.testing.assert_close(eager, _logits(ref, ids), rtol=0, atol=0)
    out = model.generate(ids[:1], max_new_tokens=5, do_sample=False)
    assert torch.equal(out, ref.generate(ids[:1], max_new_tokens=5, do_sample=False))

    model.save_pretrained(tmp_path / "bf16")
    fp32 = AutoModelForCausalLM.from_pretrained(tmp_path / "bf16", dtype=torch.float32)
    assert fp32.model.layers[0].mlp.up_proj.weight_scale.dtype == torch.float32  # scales stay fp32
    assert torch.equal(fp32.model.layers[0].mlp.up_proj.qweight, model.model.layers[0].mlp.up_proj.qweight)
    torch._dynamo.reset()
    compiled = torch.compile(fp32)
    torch.testing.assert_close(_logits(compiled, ids), _logits(fp32, ids), rtol=1e-5, atol=1e-5)
    torch._dynamo.reset()


# --------------------------------------------------------------------------- the config and its errors


@pytest.mark.parametrize("kwargs,msg", [
    (dict(scheme="w3a8"), "scheme must be one of"),
    (dict(scheme=None), "scheme must be one of"),
    (dict(scheme="w4a16", group_size=48), "group_size must be one of (32, 64, 128, 256) or -1 (per channel), got 48"),
    (dict(scheme="w4a16", group_size="128"), "group_size must be one of"),
    (dict(scheme="w4a16", group_size=True), "group_size must be one of"),
    (dict(scheme="llm_int8", threshold=float("nan")), "threshold must be a number >= 0"),
    (dict(scheme="llm_int8", threshold=-1.0), "got -1.0"),
    (dict(scheme="llm_int8", threshold="6"), "threshold must be a number"),
    (dict(scheme="w8a8", modules_to_not_convert=[1]), "modules_to_not_convert must be a list of module-name globs"),
    (dict(scheme="w8a8", quantize_lm_head="yes"), "quantize_lm_head must be True or False, got 'yes'"),
    (dict(scheme="nf4", group_size=64, double_quant="yes"), "double_quant must be True or False, got 'yes'"),
    (dict(scheme="nf4", group_size=64, double_quant=1), "double_quant must be True or False, got 1"),
    (dict(scheme="fp4", group_size=64, double_quant=None), "double_quant must be True or False, got None"),
    (dict(scheme="w4a16", group_size=64, double_quant=True),
     "double_quant applies to ('nf4', 'fp4') only (it quantizes their block absmax values), not to scheme 'w4a16'"),
    (dict(scheme="w8a8", double_quant=True), "not to scheme 'w8a8'"),
    (dict(scheme="nf4", group_size=48, double_quant=True), "group_size is the block size for nf4"),
    (dict(scheme="w8a8", bits=4), "unknown argument(s) ['bits']"),
    (dict(scheme="w8a8", quant_method="bitsandbytes"), "quant_method must be 'quantkernels'"),
])
def test_bad_config_values(kwargs, msg):
    with pytest.raises(ValueError, match="QuantKernelsConfig") as e:
        qk.QuantKernelsConfig(**kwargs)
    assert msg in str(e.value)


def test_config_round_trips_and_checkpoint_tables_are_checked(llama_dir):
    cfg = qk.QuantKernelsConfig("llm_int8", threshold=math.inf, modules_to_not_convert="o_proj")
    assert cfg.modules_to_not_convert == ["o_proj"]
    again = qk.QuantKernelsConfig.from_dict(json.loads(cfg.to_json_string()))
    assert again.to_dict() == cfg.to_dict()
    model = AutoModelForCausalLM.from_pretrained(llama_dir, quantization_config=qk.QuantKernelsConfig("w8a8"),
                                                 dtype=torch.float32)
    table = model.config.quantization_config.to_dict()
    assert qk.QuantKernelsConfig.from_dict(table).to_dict() == table
    bad = json.loads(json.dumps(table))
    bad["modules"]["model.layers.0.mlp.up_proj"]["weight_format"] = "int4_plain"
    with pytest.raises(qk.CheckpointError, match="weight_format 'int4_plain' does not match scheme 'w8a8'"):
        qk.QuantKernelsConfig.from_dict(bad)
    # a checkpoint's table is not a recipe for quantizing a float model
    with pytest.raises(ValueError, match="describes a saved checkpoint"):
        AutoModelForCausalLM.from_pretrained(llama_dir, quantization_config=qk.QuantKernelsConfig.from_dict(table))


@pytest.mark.parametrize("damage", ["missing", "nan"])
def test_a_damaged_checkpoint_fails_loudly(llama_dir, tmp_path, damage):
    from safetensors.torch import load_file, save_file

    broken = tmp_path / "broken"
    broken.mkdir()
    for f in ("config.json", "generation_config.json"):
        (broken / f).write_bytes((llama_dir / f).read_bytes())
    sd = load_file(str(llama_dir / "model.safetensors"))
    if damage == "missing":
        del sd["model.layers.1.mlp.up_proj.weight"]
    else:
        sd["model.layers.1.mlp.up_proj.weight"][3, 5] = float("nan")
    save_file(sd, str(broken / "model.safetensors"), metadata={"format": "pt"})
    if damage == "missing":
        with pytest.raises(ValueError, match=r"no weight for 1 layer\(s\) to quantize: "
                                             r"\['model.layers.1.mlp.up_proj'\]"):
            AutoModelForCausalLM.from_pretrained(broken, quantization_config=qk.QuantKernelsConfig("w8a8"))
    else:  # our error, in transformers' load report, then transformers raises
        with pytest.raises(RuntimeError, match="CONVERSION"):
            AutoModelForCausalLM.from_pretrained(broken, quantization_config=qk.QuantKernelsConfig("w8a8"))


# --------------------------------------------------------------------------- registration


def test_registration_is_idempotent_and_survives_reload():
    from transformers.quantizers import auto

    assert auto.AUTO_QUANTIZER_MAPPING["quantkernels"] is hf.QuantKernelsHfQuantizer
    hf.register()
    importlib.reload(hf)
    assert auto.AUTO_QUANTIZATION_CONFIG_MAPPING["quantkernels"] is hf.QuantKernelsConfig
    assert auto.AUTO_QUANTIZER_MAPPING["quantkernels"] is hf.QuantKernelsHfQuantizer
    hook = importlib.reload(importlib.import_module("quantkernels._hf_hook"))
    hook.install()
    assert qk.QuantKernelsConfig is hf.QuantKernelsConfig
    assert sum(getattr(f, hook._MARK, False) for f in sys.meta_path) <= 1


def test_lazy_registration_in_a_fresh_process(llama_dir, tmp_path):
    """`import quantkernels` does not import transformers; importing transformers afterwards
    registers the quantizer, so a plain from_pretrained of a saved directory just works."""
    out = tmp_path / "saved"
    AutoModelForCausalLM.from_pretrained(llama_dir, quantization_config=qk.QuantKernelsConfig("w8a16"),
                                         dtype=torch.float32).save_pretrained(out)
    code = (
        "import sys, quantkernels\n"
        "assert 'transformers' not in sys.modules, 'quantkernels imported transformers eagerly'\n"
        "import quantkernels\n"  # importing twice is fine
        "from transformers import AutoModelForCausalLM\n"
        f"m = AutoModelForCausalLM.from_pretrained({str(out)!r})\n"
        "print(type(m.model.layers[0].mlp.up_proj).__name__)\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == "QuantLinear"


def _site_packages_pth():
    import site

    return [Path(d) / "quantkernels-hf.pth" for d in site.getsitepackages() if (Path(d) / "quantkernels-hf.pth").exists()]


def test_from_pretrained_without_import_quantkernels(llama_dir, tmp_path):
    """The install's quantkernels-hf.pth makes a plain from_pretrained of a saved directory load our
    layers without `import quantkernels` (transformers would otherwise warn and give random weights);
    start-up imports nothing heavy; QUANTKERNELS_NO_AUTOLOAD=1 turns it off."""
    if not _site_packages_pth():
        pytest.skip("quantkernels-hf.pth is not installed in this environment's site-packages "
                    "(quantkernels runs from a source tree without `pip install`)")
    out = tmp_path / "saved"
    AutoModelForCausalLM.from_pretrained(llama_dir, quantization_config=qk.QuantKernelsConfig("w8a16"),
                                         dtype=torch.float32).save_pretrained(out)
    ref = _logits(AutoModelForCausalLM.from_pretrained(out), torch.tensor([[1, 2, 3]]))
    start = ("import sys\n"
             "assert not {'torch', 'transformers', 'quantkernels'} & set(sys.modules), sorted(sys.modules)\n"
             "assert any(getattr(f, '_quantkernels_hf_hook', False) for f in sys.meta_path)\n")
    code = (start + "import torch\nfrom transformers import AutoModelForCausalLM\n"
            f"m = AutoModelForCausalLM.from_pretrained({str(out)!r})\n"
            "print(type(m.model.layers[0].mlp.up_proj).__name__)\n"
            "with torch.no_grad():\n    print(m(torch.tensor([[1, 2, 3]])).logits.double().sum().item())\n")
    env = {k: v for k, v in os.environ.items() if k != "QUANTKERNELS_NO_AUTOLOAD"}
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=tmp_path,
                       env=env)
    assert p.returncode == 0, p.stderr
    kind, total = p.stdout.split()
    assert kind == "QuantLinear"
    assert float(total) == ref.double().sum().item()
    p = subprocess.run([sys.executable, "-c", "import sys; assert not any(getattr(f, '_quantkernels_hf_hook', "
                        "False) for f in sys.meta_path)"], capture_output=True, text=True, timeout=60, cwd=tmp_path,
                       env=dict(env, QUANTKERNELS_NO_AUTOLOAD="1"))
    assert p.returncode == 0, p.stderr


# --------------------------------------------------------------------------- the command line (issue 16's bug)


def test_cli_output_loads_with_from_pretrained_and_is_not_quantized_twice(llama_dir, tmp_path, ids, capsys):
    from quantkernels import cli

    out = tmp_path / "q"
    assert cli.main(["quantize", str(llama_dir), str(out), "--scheme", "w4a16", "--group-size", "64", "--quiet"]) == 0
    loaded = AutoModelForCausalLM.from_pretrained(out)
    ref = qk.quantize_model(_float(llama_dir), "w4a16", group_size=64)
    torch.testing.assert_close(_logits(loaded, ids), _logits(ref, ids), rtol=0, atol=0)
    capsys.readouterr()
    assert cli.main(["quantize", str(out), str(tmp_path / "again"), "--scheme", "w8a8"]) == 2
    err = capsys.readouterr().err
    assert "already holds a quantized model: it has a quantization_config.json" in err, err
    assert not (tmp_path / "again").exists()
