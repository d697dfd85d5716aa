"""examples/qlora.py, short: LoRA on a 4-bit base of a small random Llama, 20 steps, loss goes down."""

from __future__ import annotations

import importlib.util
import pathlib

import pytest
import torch

pytest.importorskip("peft")
pytest.importorskip("transformers")

EXAMPLE = pathlib.Path(__file__).resolve().parents[1] / "examples" / "qlora.py"


def test_qlora_example_loss_decreases_in_20_steps():
    spec = importlib.util.spec_from_file_location("qlora_example", EXAMPLE)
    qlora = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(qlora)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a model this small gains nothing from threads, and loses much on a busy machine
    try:
        res = qlora.run("tiny-llama", base="w4a16", steps=20, seq_len=64, batch=4, lr=3e-3, rank=8, group_size=32,
                        dtype="bf16", quiet=True)
    finally:
        torch.set_num_threads(threads)
    losses = res["losses"]
    assert len(losses) == 20
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < first - 0.1, losses
    assert res["held_after"] < res["held_before"], res
    assert res["base_bytes"] < 0.5 * res["float_bytes"]  # the 4-bit base against the bf16 model it came from
    assert res["adapter_bytes"] > 0 and res["sec_per_step"] > 0
