"""QLoRA, offline: LoRA adapters trained on a frozen 4-bit (w4a16) quantkernels base.

    python examples/qlora.py                     # Gemma-3-270M (pip install 'quantkernels[gemma]'), 300 steps
    python examples/qlora.py --compare-bf16      # ... then a few steps of the same LoRA on a bf16 base, side by side
    python examples/qlora.py --model tiny-llama  # a small random Llama (bytes as tokens): seconds, no package needed

The model is loaded in ``--dtype`` (bf16), every linear layer (``lm_head`` too: Gemma's tied
embedding then reads the same 4-bit rows) becomes a w4a16 ``QuantLinear``, and
``quantkernels.peft.enable()`` lets PEFT put LoRA adapters on them. The text is the packaged
``quantkernels/data/eval_text.txt``: the first 90% of its tokens train (random windows), the last
10% are held out. It prints the training loss as it goes down, the held-out loss before and after,
the time per step, and the memory: the weights (base + adapters + optimizer state) and the peak
resident memory while training, against a bf16 base with the same adapters.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import torch

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg)


def load(name: str, dtype: torch.dtype):
    """(float causal LM in eval mode, token ids of the packaged text, BOS id or None)."""
    from quantkernels import models

    text = models.eval_text()
    if name == "tiny-llama":
        return _tiny_llama().to(dtype).eval(), list(text.encode("utf-8")), None
    model, tok, kind = models.load_float_model(models.resolve_model(name), dtype)
    if kind != "causal" or tok is None:
        raise SystemExit(f"qlora.py: {name} is not a causal LM with a tokenizer (MiniLM is an encoder: no LM loss)")
    return model, tok(text, add_special_tokens=False)["input_ids"], tok.bos_token_id


def _rss_peak_reset() -> bool:
    """Resets the kernel's peak-RSS counter of this process (Linux); False where it cannot."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _release_freed_memory() -> None:
    """Returns memory freed by Python / torch (the float weights quantization replaced) to the OS,
    so that resident memory measures what is alive: glibc keeps freed blocks otherwise."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _rss_bytes(field: str = "VmRSS:") -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _rss_peak_bytes() -> int:
    return _rss_bytes("VmHWM:") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def run(model_name: str = "gemma3-270m", base: str = "w4a16", steps: int = 300, seq_len: int = 128, batch: int = 2,
        lr: float = 2e-4, rank: int = 16, group_size: int = 64, dtype: str = "bf16", log_every: int = 10,
        seed: int = 0, quiet: bool = False) -> dict:
    """Trains LoRA adapters; returns the losses, timings and memory (the numbers the script prints)."""
    import quantkernels as qk
    from peft import LoraConfig, get_peft_model

    say = (lambda *a: None) if quiet else (lambda *a: print(*a, flush=True))
    dt = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}[dtype]
    model, ids, bos = load(model_name, dt)
    float_bytes = qk.memory_footprint(model)
    if base == "w4a16":
        qk.quantize_model(model, "w4a16", group_size=group_size, exclude=())
    elif base != "bf16":
        raise SystemExit(f"qlora.py: --base must be w4a16 or bf16, got {base!r}")
    qk.peft.enable()
    model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0,
                                             target_modules=[t for t in TARGETS if any(
                                                 n.endswith(t) for n, _ in model.named_modules())]))
    adapters = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(adapters, lr=lr)
    base_bytes = qk.memory_footprint(model) - sum(p.numel() * p.element_size() for p in adapters)
    adapter_bytes = sum(p.numel() * p.element_size() for p in adapters)

    ids = torch.tensor(ids)
    split = int(len(ids) * 0.9)
    train, held = ids[:split], ids[split:]
    if len(train) <= seq_len + 1 or len(held) < 8:
        raise SystemExit(f"qlora.py: the text has {len(ids)} tokens, too few for --seq-len {seq_len}")
    g = torch.Generator().manual_seed(seed)
    body = seq_len - (bos is not None)  # every window starts with BOS, as the model saw text in training

    def window(t: torch.Tensor) -> torch.Tensor:
        return t if bos is None else torch.cat([torch.tensor([bos]), t])

    held_windows = [window(held[i:i + body]) for i in range(0, len(held) - 1, body)]

    def held_loss() -> float:
        model.eval()
        with torch.no_grad():
            losses = [model(input_ids=w[None], labels=w[None]).loss.float().item() for w in held_windows
                      if len(w) > 1 + (bos is not None)]
        model.train()
        return sum(losses) / len(losses)

    n_lora = sum(1 for m in model.modules() if hasattr(m, "lora_A"))
    say(f"{model_name}: base {base}, LoRA r={rank} on {n_lora} layers, {sum(p.numel() for p in adapters):,} "
        f"trainable parameters; {len(train):,} training tokens, {len(held):,} held out")
    before = held_loss()
    say(f"held-out loss before: {before:.4f}")
    _release_freed_memory()
    rss_start = _rss_bytes()
    measured_peak = _rss_peak_reset()
    model.train()
    losses, times = [], []
    for step in range(1, steps + 1):
        starts = torch.randint(0, len(train) - body, (batch,), generator=g)
        x = torch.stack([window(train[s:s + body]) for s in starts])
        t0 = time.perf_counter()
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
        losses.append(loss.float().item())
        if step % log_every == 0 or step == 1 or step == steps:
            recent = losses[-log_every:]
            say(f"step {step:4d}  loss {losses[-1]:.4f}  (mean of the last {len(recent)}: "
                f"{sum(recent) / len(recent):.4f})  {times[-1]:.2f} s/step")
    peak = _rss_peak_bytes()
    after = held_loss()
    sec = sorted(times[1:] or times)[len(times[1:] or times) // 2]
    res = {"model": model_name, "base": base, "steps": steps, "losses": losses, "held_before": before,
           "held_after": after, "sec_per_step": sec, "float_bytes": float_bytes, "base_bytes": base_bytes,
           "adapter_bytes": adapter_bytes, "optimizer_bytes": 2 * adapter_bytes,
           "rss_start": rss_start or None, "peak_rss_training": peak if measured_peak else None}
    say(f"held-out loss after: {after:.4f}  (before {before:.4f})")
    say(f"time per step (median): {sec:.3f} s  (batch {batch} x {seq_len} tokens)")
    return res


def _mib(b) -> str:
    return "n/a" if b is None else f"{b / 2**20:,.1f} MiB"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="gemma3-270m", help="gemma3-270m (packaged), tiny-llama, or a local causal LM")
    ap.add_argument("--base", default="w4a16", choices=["w4a16", "bf16"], help="the frozen base (bf16: plain LoRA)")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp32", "fp16"])
    ap.add_argument("--log-every", type=int, default=10)
    ap.add_argument("--compare-bf16", type=int, nargs="?", const=5, default=0, metavar="STEPS",
                    help="then run STEPS (5) steps of the same LoRA on a bf16 base in a child process and compare")
    ap.add_argument("--json", action="store_true", help="print the result as one JSON line at the end")
    a = ap.parse_args(argv)
    torch.manual_seed(0)
    res = run(a.model, a.base, a.steps, a.seq_len, a.batch, a.lr, a.rank, a.group_size, a.dtype, a.log_every,
              quiet=a.json)
    if a.json:
        print("RESULT " + json.dumps(res))
        return 0
    rows = [res]
    if a.compare_bf16:
        cmd = [sys.executable, __file__, "--model", a.model, "--base", "bf16", "--steps", str(a.compare_bf16),
               "--seq-len", str(a.seq_len), "--batch", str(a.batch), "--rank", str(a.rank), "--dtype", a.dtype,
               "--lr", str(a.lr), "--json"]
        out = subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy())
        line = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
        if out.returncode or not line:
            print(f"the bf16 comparison run failed:\n{out.stderr[-3000:]}", file=sys.stderr)
            return 1
        rows.append(json.loads(line[-1][len("RESULT "):]))
    print()
    print("| base | weights (base) | adapters + AdamW state | RSS before training | peak RSS while training | s/step | "
          "steps |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['base']} | {_mib(r['base_bytes'])} | {_mib(r['adapter_bytes'] + r['optimizer_bytes'])} | "
              f"{_mib(r['rss_start'])} | {_mib(r['peak_rss_training'])} | {r['sec_per_step']:.3f} | {r['steps']} |")
    first, last = res["losses"][:10], res["losses"][-10:]
    print(f"\ntraining loss: first {len(first)} steps {sum(first) / len(first):.4f} -> last {len(last)} "
          f"{sum(last) / len(last):.4f}; held-out {res['held_before']:.4f} -> {res['held_after']:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
