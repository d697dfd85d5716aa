"""A tied lm_head (its weight is the input embedding) quantized on request: the embedding is then
served from the same quantized rows (QuantEmbedding) and no float copy of the matrix is kept."""
import copy

import pytest
import torch
from torch import nn

import quantkernels as qk
from quantkernels import _ops as ops

SCHEMES = ["w8a8", "llm_int8", "w8a16", "w4a16", "w4a8", "nf4", "fp4"]


class TinyLM(nn.Module):
    def __init__(self, vocab=96, dim=64, tied=True, dtype=torch.float32):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim, padding_idx=0, dtype=dtype)
        self.body = nn.Linear(dim, dim, dtype=dtype)
        self.lm_head = nn.Linear(dim, vocab, bias=False, dtype=dtype)
        if tied:
            self.lm_head.weight = self.embed.weight

    def forward(self, ids):
        return self.lm_head(torch.tanh(self.body(self.embed(ids))))


def _dequantized_rows(lin):
    if lin.scheme in ("nf4", "fp4"):
        return ops.dequantize_4bit(lin.qweight, lin.weight_scale, lin.scheme, lin.group_size, lin.nested_absmax,
                                   lin.absmax_offset, torch.float32)
    if lin.scheme in ("w4a16", "w4a8"):
        return ops.dequantize_int4(lin.qweight, lin.weight_scale, lin.weight_zero, torch.float32)
    return ops.dequantize_int8(lin.qweight, lin.weight_scale, None, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("scheme", SCHEMES)
def test_tied_lm_head_serves_the_embedding(scheme, dtype):
    torch.manual_seed(0)
    model = TinyLM(dtype=dtype)
    before = qk.memory_footprint(model)
    qk.quantize_model(model, scheme, exclude=(), group_size=32)
    rep = model.quantkernels_report
    assert isinstance(model.lm_head, qk.QuantLinear) and isinstance(model.embed, qk.QuantEmbedding)
    assert rep.tied_embeddings == {"embed": "lm_head"}
    assert "served from the quantized rows" in rep.summary()
    # no float [vocab, dim] matrix is left anywhere in the model
    assert not any(p.shape == (96, 64) for p in model.parameters())
    assert qk.memory_footprint(model) < before
    ids = torch.tensor([[0, 5, 95], [17, 17, 3]])
    want = _dequantized_rows(model.lm_head).to(dtype)[ids]
    got = model.embed(ids)
    assert got.dtype == dtype and got.shape == (2, 3, 64)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert torch.isfinite(model(ids).float()).all()
    # the state dict holds the rows once, under the lm_head
    assert not [k for k in model.state_dict() if k.startswith("embed.")]


def test_gemma3_scaled_embedding_and_logits():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.Gemma3TextConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=1, head_dim=32,
                                        sliding_window=8, max_position_embeddings=64)
    cfg.layer_types = ["sliding_attention", "full_attention"]
    model = transformers.Gemma3ForCausalLM(cfg).eval()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))
    ref = copy.deepcopy(model)
    qk.quantize_model(model, "w8a16", include=("lm_head",), exclude=())
    emb = model.model.embed_tokens
    assert isinstance(emb, qk.QuantEmbedding) and emb.embed_scale is not None
    # the float model with the dequantized weight (rounded to the model dtype) is the reference
    with torch.no_grad():
        ref.model.embed_tokens.weight.copy_(_dequantized_rows(model.lm_head))
        torch.testing.assert_close(emb(ids), ref.model.embed_tokens(ids), rtol=0, atol=0)
        out, want = model(ids).logits, ref(ids).logits
    torch.testing.assert_close(out, want, rtol=1e-4, atol=1e-4)


def test_untied_lm_head_leaves_the_embedding_alone():
    model = TinyLM(tied=False)
    qk.quantize_model(model, "w8a8", exclude=())
    assert isinstance(model.lm_head, qk.QuantLinear) and type(model.embed) is nn.Embedding
    assert model.quantkernels_report.tied_embeddings == {}


def test_default_excludes_lm_head_and_keeps_the_tie():
    model = TinyLM()
    qk.quantize_model(model, "w8a8")
    assert type(model.lm_head) is nn.Linear and model.lm_head.weight is model.embed.weight


def test_embedding_with_unknown_forward_raises_and_changes_nothing():
    class Weird(nn.Embedding):
        def forward(self, ids):
            return super().forward(ids) + 1

    model = TinyLM()
    model.embed = Weird(96, 64)
    model.lm_head.weight = model.embed.weight
    with pytest.raises(TypeError, match="Weird has its own forward"):
        qk.quantize_model(model, "w8a8", exclude=("body",))
    assert type(model.lm_head) is nn.Linear and type(model.embed) is Weird


def test_bad_ids_are_clear_errors():
    model = qk.quantize_model(TinyLM(), "w4a16", exclude=(), group_size=32)
    with pytest.raises(IndexError, match="index 96 is out of range for 96 embeddings"):
        model.embed(torch.tensor([1, 96]))
    with pytest.raises(IndexError, match="index -1"):
        model.embed(torch.tensor([-1]))
    with pytest.raises(TypeError, match="input_ids must be int32 or int64, got torch.float32"):
        model.embed(torch.tensor([1.0]))


def test_deepcopy_keeps_the_rows_shared():
    model = qk.quantize_model(TinyLM(), "w8a8", exclude=())
    twin = copy.deepcopy(model)
    assert twin.embed.linear is twin.lm_head and twin.embed.linear is not model.lm_head


def test_save_load_roundtrip_of_a_tied_model(tmp_path):
    torch.manual_seed(0)
    model = qk.quantize_model(TinyLM(), "w4a8", exclude=(), group_size=32).eval()
    qk.save_quantized(model, tmp_path / "ckpt")
    from quantkernels.serialization import read_config
    assert read_config(tmp_path / "ckpt")["tied_embeddings"] == {"embed": "lm_head"}
    with qk.init_empty_weights():
        skeleton = TinyLM()
    loaded = qk.load_quantized(skeleton, tmp_path / "ckpt")
    assert isinstance(loaded.embed, qk.QuantEmbedding) and loaded.embed.linear is loaded.lm_head
    assert loaded.quantkernels_report.tied_embeddings == {"embed": "lm_head"}
    ids = torch.tensor([[1, 2, 95, 0]])
    torch.testing.assert_close(loaded(ids), model(ids), rtol=0, atol=0)


def test_gemma3_save_load_keeps_embed_scale(tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.Gemma3TextConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                        num_attention_heads=4, num_key_value_heads=1, head_dim=32,
                                        sliding_window=8, max_position_embeddings=64)
    cfg.layer_types = ["full_attention"]
    torch.manual_seed(0)
    model = qk.quantize_model(transformers.Gemma3ForCausalLM(cfg).eval(), "w8a16", exclude=())
    qk.save_quantized(model, tmp_path / "g")
    with qk.init_empty_weights():
        skeleton = transformers.Gemma3ForCausalLM(cfg)
    loaded = qk.load_quantized(skeleton, tmp_path / "g")
    ids = torch.randint(0, 128, (1, 9), generator=torch.Generator().manual_seed(2))
    assert isinstance(loaded.model.embed_tokens, qk.QuantEmbedding)
    torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=0)


def test_tied_checkpoint_into_a_model_without_the_embedding_is_a_clear_error(tmp_path):
    qk.save_quantized(qk.quantize_model(TinyLM(), "w8a8", exclude=()), tmp_path / "c")

    class NoEmbed(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Linear(64, 64)
            self.lm_head = nn.Linear(64, 96, bias=False)

    skeleton = NoEmbed()
    with pytest.raises(qk.CheckpointError, match="no module 'embed'"):
        qk.load_quantized(skeleton, tmp_path / "c")
    assert type(skeleton.lm_head) is nn.Linear  # unchanged


def test_quantized_layers_follow_the_model_mode():
    model = TinyLM().eval()
    qk.quantize_model(model, "w8a8", exclude=())
    assert not any(m.training for m in model.modules())
