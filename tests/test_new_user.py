"""What a new user hits first: loaded models come back in eval mode (no live dropout), and running
from an unbuilt source checkout says what happened and how to fix it."""

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
