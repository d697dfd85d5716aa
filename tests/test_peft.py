"""PEFT LoRA on QuantLinear (quantkernels.peft): training, frozen base, save / load, merge."""

from __future__ import annotations

import copy

import pytest
import torch

import quantkernels as qk

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")


def _tiny_llama():
    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg)


def _base_buffers(model):
    return {k: v.clone() for k, v in model.state_dict().items() if "lora_" not in k}


@pytest.fixture(scope="module")
def float_model():
    return _tiny_llama()


@pytest.fixture(autouse=True)
def _one_thread():
    """A model this small gains nothing from a second thread and loses much on a busy machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.mark.parametrize("scheme", ["w4a16", "w8a8"])
def test_lora_trains_adapters_base_frozen_save_load_merge(scheme, float_model, tmp_path):
    qk.peft.enable()
    qk.peft.enable()  # idempotent
    base = qk.quantize_model(copy.deepcopy(float_model), scheme, group_size=32, exclude=("lm_head",))
    model = peft.get_peft_model(base, peft.LoraConfig(target_modules=["q_proj", "v_proj"], r=4, lora_alpha=8))
    wrapped = [m for m in model.modules() if isinstance(m, qk.peft.LoraQuantLinear)]
    assert len(wrapped) == 4 and all(isinstance(m.base_layer, qk.QuantLinear) for m in wrapped)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_A" in n or "lora_B" in n for n in trainable)
    before = _base_buffers(model)

    ids = torch.randint(0, 96, (4, 24), generator=torch.Generator().manual_seed(1))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    losses = []
    for step in range(8):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        if step == 0:  # lora_B starts at zero, so only B has a gradient at first; it is non-zero
            assert all(m.lora_B["default"].weight.grad.abs().sum() > 0 for m in wrapped)
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05, losses
    after = _base_buffers(model)
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before), "the quantized base changed"

    model.eval()
    with torch.no_grad():
        trained = model(input_ids=ids).logits
    model.save_pretrained(tmp_path)
    fresh = qk.quantize_model(copy.deepcopy(float_model), scheme, group_size=32, exclude=("lm_head",))
    loaded = peft.PeftModel.from_pretrained(fresh, tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, trained)

    # merge_adapter re-quantizes (and reports the error), unmerge restores the base bit for bit
    with pytest.warns(qk.peft.QuantMergeWarning, match="re-quantizing"):
        loaded.merge_adapter()
    layer = loaded.base_model.model.model.layers[0].self_attn.q_proj
    err = layer.base_layer.lora_merge_error
    assert 0 < err["rel_fro"] < 0.2 and err["delta_rel_fro"] > 0
    with torch.no_grad():
        merged_logits = loaded(input_ids=ids).logits
    cos = torch.nn.functional.cosine_similarity(merged_logits.flatten(), trained.flatten(), dim=0)
    assert cos > 0.99, float(cos)
    loaded.unmerge_adapter()
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, trained)

    # merge_and_unload: plain QuantLinear layers again, holding W + BA re-quantized
    with pytest.warns(qk.peft.QuantMergeWarning):
        plain = loaded.merge_and_unload()
    q = plain.model.layers[0].self_attn.q_proj
    assert type(q) is qk.QuantLinear and not any(isinstance(m, qk.peft.LoraQuantLinear) for m in plain.modules())
    # ... and is exactly quantize(dequantize(base) + B @ A * scaling), with the error it reports
    unquantized = qk.quantize_model(copy.deepcopy(float_model), scheme, group_size=32, exclude=("lm_head",))
    q_proj = unquantized.model.layers[0].self_attn.q_proj
    target = qk.peft.dequantized_weight(q_proj) + layer.get_delta_weight("default")
    requant = qk.QuantLinear.from_linear(_linear(target), scheme, group_size=32)
    assert torch.equal(q.qweight, requant.qweight) and torch.equal(q.weight_scale, requant.weight_scale)
    err = qk.peft.dequantized_weight(q) - target
    assert q.lora_merge_error["rel_fro"] == pytest.approx(float(err.norm() / target.norm()), rel=1e-6)


def _linear(w):
    lin = torch.nn.Linear(w.shape[1], w.shape[0], bias=False)
    with torch.no_grad():
        lin.weight.copy_(w)
    return lin


def test_unsupported_lora_variants_are_refused(float_model):
    qk.peft.enable()
    base = qk.quantize_model(copy.deepcopy(float_model), "w4a16", group_size=32, exclude=("lm_head",))
    with pytest.raises(ValueError, match="plain LoRA only, got use_dora=True"):
        peft.get_peft_model(base, peft.LoraConfig(target_modules=["q_proj"], use_dora=True))


def test_dequantized_weight_refuses_other_layers():
    with pytest.raises(TypeError, match="layer must be a QuantLinear, got Linear"):
        qk.peft.dequantized_weight(torch.nn.Linear(4, 4))
