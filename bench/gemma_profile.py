"""Where Gemma-3-270M's time goes per token: bf16 vs quantized schemes (bf16 activations), at prefill
(128 tokens, one forward) and decode (one token with a KV cache of ~140 tokens), one process.

    PYTHONPATH=. python bench/gemma_profile.py [--schemes bf16,w8a8,w4a16+head] [--threads 1]
        [--rounds 7] [--profile] [--cpu-time]

Timing: candidates interleaved round by round (the machine is shared), medians; --cpu-time (1 thread)
uses the calling thread's CPU time. --profile adds a torch.profiler per-op breakdown (self CPU time
by op, grouped: bf16 GEMM / quantkernels GEMM / activation quantization / attention / other), and
the Python time of the forward outside any op (wall minus the ops' self time).
"""
import argparse
import copy
import statistics
import sys
import time
from collections import defaultdict

import torch

import quantkernels as qk
from quantkernels import models

GROUPS = [
    ("quantkernels GEMM", ("quantkernels::w8a8_gemm", "quantkernels::w4a8_gemm", "quantkernels::w4a16_gemm",
                           "quantkernels::w8a16_gemm", "quantkernels::llm_int8_linear")),
    ("activation quantization", ("quantkernels::quantize_int8_rowwise",)),
    ("bf16 GEMM (mm/addmm/bmm/matmul)", ("aten::mm", "aten::addmm", "aten::bmm", "aten::linear", "aten::matmul")),
    ("attention (sdpa)", ("aten::_scaled_dot_product", "aten::scaled_dot_product")),
    ("embedding / dequant rows", ("aten::embedding", "aten::index_select", "quantkernels::dequantize")),
]


def group_of(name):
    for g, prefixes in GROUPS:
        if name.startswith(prefixes):
            return g
    return "other ops (norms, rope, act, copies)"


def build(base, spec):
    scheme, head = (spec[:-5], True) if spec.endswith("+head") else (spec, False)
    model = copy.deepcopy(base).to(torch.bfloat16)
    if scheme != "bf16":
        qk.quantize_model(model, scheme, exclude=() if head else ("lm_head",))
    return model.eval()


def decode_setup(model, ids):
    """A KV cache over ``ids`` and the next token id."""
    out = model(ids, use_cache=True)
    return out.past_key_values, out.logits[:, -1:].argmax(-1)


def make_calls(model, ids, ctx_len):
    prefill = lambda: model(ids, use_cache=False)  # noqa: E731  (logits of every position, as eval does)
    first = lambda: model(ids, use_cache=True, logits_to_keep=1)  # noqa: E731  (as generate's prefill)
    cache, nxt = decode_setup(model, ids[:, :ctx_len])
    pos = torch.tensor([ctx_len])

    def decode():
        out = model(nxt, past_key_values=cache, use_cache=True, cache_position=pos)
        cache.crop(-1)  # keep the context length fixed across calls
        return out
    return prefill, decode, first


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--schemes", default="bf16,w8a8,w4a8,w4a16+head")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--decode-inner", type=int, default=5)
    ap.add_argument("--cpu-time", action="store_true")
    ap.add_argument("--profile", action="store_true")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    clock = time.perf_counter
    if a.cpu_time:
        assert a.threads == 1, "--cpu-time measures the calling thread only"
        clock = time.thread_time
    path = models.resolve_model(models.GEMMA)
    base, tok, _ = models.load_float_model(path, torch.float32)
    ids = models.token_windows(tok, models.eval_text())[0][:, :128]
    specs = a.schemes.split(",")
    mods = {s: build(base, s) for s in specs}
    calls = {}
    with torch.inference_mode():
        for s, m in mods.items():
            calls[s] = make_calls(m, ids, 128)
        times = {s: {"prefill": [], "decode": [], "first": []} for s in specs}
        for s in specs:  # warm-up
            calls[s][0](); calls[s][1](); calls[s][2]()
        for _ in range(a.rounds):
            for s in specs:
                p, d, f = calls[s]
                t0 = clock(); p(); t1 = clock()
                for _ in range(a.decode_inner):
                    d()
                t2 = clock(); f(); t3 = clock()
                times[s]["first"].append(t3 - t2)
                times[s]["prefill"].append(t1 - t0)
                times[s]["decode"].append((t2 - t1) / a.decode_inner)
    print(f"torch {torch.__version__}, {a.threads} thread(s), {'thread CPU' if a.cpu_time else 'wall'} time, "
          f"{a.rounds} interleaved rounds, medians")
    print("| scheme | prefill ms (128 tok, all logits) | tok/s | vs bf16 | prefill ms (last logits only) | tok/s "
          "| vs bf16 | decode ms/token | tok/s | vs bf16 |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    med = {s: {k: statistics.median(v) for k, v in t.items()} for s, t in times.items()}
    b = med.get("bf16")
    for s in specs:
        p, d = med[s]["prefill"], med[s]["decode"]
        rp = f"{b['prefill'] / p:.2f}x" if b else "-"
        rd = f"{b['decode'] / d:.2f}x" if b else "-"
        f = med[s]["first"]
        rf = f"{b['first'] / f:.2f}x" if b else "-"
        print(f"| {s} | {p * 1e3:.1f} | {128 / p:.0f} | {rp} | {f * 1e3:.1f} | {128 / f:.0f} | {rf} "
              f"| {d * 1e3:.2f} | {1 / d:.1f} | {rd} |")
    if not a.profile:
        return
    from torch.profiler import ProfilerActivity, profile
    with torch.inference_mode():
        for s in specs:
            for phase, fn, n in (("prefill", calls[s][0], 3), ("prefill, last logits", calls[s][2], 3),
                                 ("decode", calls[s][1], 20)):
                fn()
                t0 = time.perf_counter()
                for _ in range(n):
                    fn()
                plain = (time.perf_counter() - t0) / n
                with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
                    t0 = time.perf_counter()
                    for _ in range(n):
                        fn()
                    wall = (time.perf_counter() - t0) / n
                ev = prof.key_averages()
                by = defaultdict(float)
                tot = 0.0
                for e in ev:
                    by[group_of(e.key)] += e.self_cpu_time_total / n / 1e3
                    tot += e.self_cpu_time_total / n / 1e3
                print(f"\n### {s} {phase}: {plain * 1e3:.2f} ms per call unprofiled, {wall * 1e3:.2f} ms profiled; "
                      f"ops' self time {tot:.2f} ms")
                for g, v in sorted(by.items(), key=lambda kv: -kv[1]):
                    print(f"  {g:40s} {v:8.2f} ms  {v / (wall * 1e3) * 100:5.1f}%")
                top = sorted(ev, key=lambda e: -e.self_cpu_time_total)[:12]
                for e in top:
                    print(f"    {e.key[:60]:60s} calls/it {e.count / n:6.1f}  self {e.self_cpu_time_total / n / 1e3:7.3f} ms")


if __name__ == "__main__":
    sys.exit(main())
