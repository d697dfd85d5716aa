"""Compile every Triton kernel, and every autotune config, for real GPU targets without a GPU.

    python -m quantkernels.triton.compile_check [--targets 80,90] [--json out.json] [--md out.md]

Uses ``triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, 32))`` (offline; needs no
driver) and reads the cubin with the ``cuobjdump`` shipped in the triton wheel: registers,
spills (local memory), shared memory, and the tensor-core instructions in the SASS (int8
``mma.sync`` is ``IMMA.16832.S8.S8``, Hopper ``wgmma`` is ``IGMMA``). Must run in a process
where triton is *not* in interpreter mode (the test runs it in a subprocess).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from typing import Dict, List

import triton
from triton.backends.compiler import GPUTarget

from . import _common as C
from . import gemm_4bit, int8_gemm, quantize, w4a8, weight_only

# Argument types of each kernel (runtime args; constexprs are given per variant).
_I8_GEMM_SIG = dict(a_ptr="*i8", b_ptr="*i8", c_ptr="*fp16", sa_ptr="*fp32", sb_ptr="*fp32", bias_ptr="*fp16",
                    x_ptr="*fp16", o_ptr="*u8", M="i32", N="i32", K="i32", M_BUCKET="i32",
                    stride_am="i32", stride_ak="i32", stride_bn="i32", stride_bk="i32", stride_cm="i32",
                    stride_cn="i32", stride_xm="i32", stride_xk="i32")
_W4A8_SIG = dict(a_ptr="*i8", b_ptr="*u8", sa_ptr="*fp32", sb_ptr="*fp32", z_ptr="*u8", bias_ptr="*fp16",
                 c_ptr="*fp16", M="i32", N="i32", K="i32", G="i32", M_BUCKET="i32", stride_am="i32",
                 stride_ak="i32", stride_bn="i32", stride_bk="i32", stride_sn="i32", stride_sg="i32",
                 stride_cm="i32", stride_cn="i32")
_WO_SIG = dict(x_ptr="*fp16", b_ptr="*u8", s_ptr="*fp32", z_ptr="*u8", bias_ptr="*fp16", out_ptr="*fp16",
               M="i32", N="i32", K="i32", G="i32", M_BUCKET="i32", SPLIT_K="i32", K_PER_SPLIT="i32",
               stride_xm="i32", stride_xk="i32", stride_bn="i32", stride_bk="i32", stride_sn="i32",
               stride_sg="i32", stride_os="i32", stride_om="i32", stride_on="i32")
_G4_SIG = dict(x_ptr="*fp16", p_ptr="*u8", a_ptr="*fp32", off_ptr="*fp32", bias_ptr="*fp16", out_ptr="*fp16",
               M="i32", N="i32", K="i32", LOG2_B="i32", M_BUCKET="i32", SPLIT_K="i32", K_PER_SPLIT="i32",
               stride_xm="i32", stride_xk="i32", stride_pn="i32", stride_pk="i32", stride_os="i32",
               stride_om="i32", stride_on="i32")
_NESTED_SIG = dict(q_ptr="*u8", dyn_ptr="*fp32", a2_ptr="*fp32", out_ptr="*fp32", NB="i32")
_QUANT_SIG = dict(x_ptr="*fp16", q_ptr="*i8", s_ptr="*fp32", o_ptr="*u8", K="i32", stride_xm="i32",
                  stride_xk="i32", stride_qm="i32")
_COLS_SIG = dict(x_ptr="*fp16", o_ptr="*u8", M="i32", K="i32", stride_xm="i32", stride_xk="i32", threshold="fp32")


def _jit(kernel):
    """The JITFunction under an Autotuner (or the JITFunction itself)."""
    return getattr(kernel, "fn", kernel) if not hasattr(kernel, "arg_names") or hasattr(kernel, "configs") \
        else kernel


#: (kernel, variant) compiled with their default config by ``--quick`` (the CI test).
QUICK = {("int8_gemm", "w8a8 fp16 out + bias"), ("int8_gemm", "llm_int8 fp16"), ("w4a8_gemm", "sym"),
         ("w4a16_gemm", "fp16 split-K (M<=16)"), ("w8a16_gemm", "fp16 tiled"), ("quantize_int8_rowwise", "one tile"),
         ("quantize_int8_rowwise_outliers", "outlier columns"), ("gemm_4bit", "nf4 fp16 split-K (M<=16)"),
         ("gemm_4bit", "fp4 bf16 double tiled"), ("gemm_4bit", "double-quant absmax pre-pass")}


def jobs(quick: bool = False) -> List[Dict]:
    """Every (kernel, variant, config) to compile: all autotune configs of each kernel's main
    variant, plus the other constexpr variants with the default config (``quick``: only the
    default config of the variants in QUICK)."""
    if quick:
        return [j for j in jobs() if j["config_index"] == 0 and (j["name"], j["variant"]) in QUICK]
    out = []

    def add(name, kernel, sig, const, configs, variant, main):
        for i, cfg in enumerate(configs if main else configs[:1]):
            out.append(dict(name=name, variant=variant, config_index=i, kernel=kernel, sig=dict(sig),
                            const={**const, **cfg.kwargs}, num_warps=cfg.num_warps, num_stages=cfg.num_stages))

    base = dict(INTERP=False)
    g = int8_gemm._int8_gemm_kernel
    add("int8_gemm", g, {**_I8_GEMM_SIG, "c_ptr": "*i32"},
        dict(base, SCALED=False, HAS_BIAS=False, HAS_OUTLIERS=False, X_FP32=False), int8_gemm.CONFIGS, "int32", False)
    add("int8_gemm", g, _I8_GEMM_SIG, dict(base, SCALED=True, HAS_BIAS=True, HAS_OUTLIERS=False, X_FP32=False),
        int8_gemm.CONFIGS, "w8a8 fp16 out + bias", True)
    add("int8_gemm", g, {**_I8_GEMM_SIG, "c_ptr": "*bf16", "bias_ptr": "*bf16"},
        dict(base, SCALED=True, HAS_BIAS=True, HAS_OUTLIERS=False, X_FP32=False), int8_gemm.CONFIGS,
        "w8a8 bf16 out + bias", False)
    for dt in ("fp16", "bf16", "fp32"):
        add("int8_gemm", g, {**_I8_GEMM_SIG, "c_ptr": f"*{dt}", "bias_ptr": f"*{dt}", "x_ptr": f"*{dt}"},
            dict(base, SCALED=True, HAS_BIAS=True, HAS_OUTLIERS=True, X_FP32=dt == "fp32"), int8_gemm.CONFIGS,
            f"llm_int8 {dt}", False)
    for zero in (False, True):
        add("w4a8_gemm", w4a8._w4a8_kernel, _W4A8_SIG, dict(base, HAS_ZERO=zero, HAS_BIAS=True), w4a8.CONFIGS,
            "asym" if zero else "sym", not zero)
    for int4, zero, dt in ((False, False, "fp16"), (False, False, "bf16"), (True, False, "fp16"),
                           (True, True, "fp16"), (True, True, "bf16"), (True, False, "fp32")):
        sig = {**_WO_SIG, "x_ptr": f"*{dt}", "out_ptr": f"*{dt}", "bias_ptr": f"*{dt}",
               "b_ptr": "*u8" if int4 else "*i8"}
        name = "w4a16_gemm" if int4 else "w8a16_gemm"
        var = f"{dt}{' asym' if zero else ''}"
        main = dt == "fp16" and not zero
        const = dict(base, INT4=int4, HAS_ZERO=zero, HAS_BIAS=True, X_FP32=dt == "fp32")
        add(name, weight_only._wo_kernel, sig, dict(const, PARTIAL=True), weight_only.SMALL_CONFIGS,
            f"{var} split-K (M<=16)", main)
        add(name, weight_only._wo_kernel, sig, dict(const, PARTIAL=False), weight_only.LARGE_CONFIGS,
            f"{var} tiled", main)
    for qt, double, dt in (("nf4", False, "fp16"), ("fp4", True, "bf16"), ("nf4", True, "fp32")):
        sig = {**_G4_SIG, "x_ptr": f"*{dt}", "bias_ptr": f"*{dt}"}
        var = f"{qt} {dt}{' double' if double else ''}"
        main = dt == "fp16"
        const = dict(base, QT=gemm_4bit.QUANT_TYPES[qt], DOUBLE=double, HAS_BIAS=True, X_FP32=dt == "fp32")
        add("gemm_4bit", gemm_4bit._gemm_4bit_kernel, {**sig, "out_ptr": "*fp32"}, dict(const, PARTIAL=True),
            gemm_4bit.SMALL_CONFIGS, f"{var} split-K (M<=16)", main)
        add("gemm_4bit", gemm_4bit._gemm_4bit_kernel, {**sig, "out_ptr": f"*{dt}"}, dict(const, PARTIAL=False),
            gemm_4bit.LARGE_CONFIGS, f"{var} tiled", main)
    add("gemm_4bit", gemm_4bit._nested_kernel, _NESTED_SIG, dict(BLOCK=gemm_4bit.NESTED_BLOCK),
        [C.config(num_warps=4, num_stages=1)], "double-quant absmax pre-pass", False)
    for one, block in ((True, 4096), (False, quantize.LOOP_BLOCK)):
        for mask in (False, True):
            add("quantize_int8_rowwise" + ("_outliers" if mask else ""), quantize._quant_rows_kernel, _QUANT_SIG,
                dict(HAS_MASK=mask, ONE_TILE=one, BLOCK_K=block), [C.config(num_warps=8, num_stages=1)],
                f"{'one tile' if one else 'two-pass'}", False)
    add("quantize_int8_rowwise_outliers", quantize._outlier_cols_kernel, _COLS_SIG, dict(BLOCK_M=32, BLOCK_K=64),
        [C.config(num_warps=4, num_stages=1)], "outlier columns", False)
    return out


def _cuobjdump() -> str:
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def _sass_summary(cubin: bytes) -> Dict:
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
        path = f.name
    try:
        sass = subprocess.run([_cuobjdump(), "--dump-sass", path], capture_output=True, text=True).stdout
        res = subprocess.run([_cuobjdump(), "--dump-resource-usage", path], capture_output=True, text=True).stdout
    finally:
        os.unlink(path)
    mma: Dict[str, int] = {}
    for m in re.finditer(r"\b([HI]G?MMA[.\w]*)", sass):
        mma[m.group(1)] = mma.get(m.group(1), 0) + 1
    def num(key):
        m = re.search(rf"\b{key}:(\d+)", res)
        return int(m.group(1)) if m else None
    return dict(mma=mma, regs=num("REG"), stack=num("STACK"), local=num("LOCAL"), shared_static=num("SHARED"))


def compile_one(job: Dict, cc: int) -> Dict:
    fn = _jit(job["kernel"])
    sig = {name: job["sig"].get(name, "constexpr") for name in fn.arg_names}
    const = {k: v for k, v in job["const"].items() if k in fn.arg_names}
    missing = [n for n, t in sig.items() if t == "constexpr" and n not in const]
    if missing:
        raise ValueError(f"{job['name']}: no value for constexpr(s) {missing}")
    src = triton.compiler.ASTSource(fn=fn, signature=sig, constexprs=const)
    t0 = time.time()
    ck = triton.compile(src, target=GPUTarget("cuda", cc, 32),
                        options=dict(num_warps=job["num_warps"], num_stages=job["num_stages"]))
    info = _sass_summary(ck.asm["cubin"])
    info.update(name=job["name"], variant=job["variant"], config_index=job["config_index"], cc=cc,
                shared=ck.metadata.shared, num_warps=job["num_warps"], num_stages=job["num_stages"],
                blocks={k: v for k, v in job["const"].items() if k.startswith("BLOCK") or k == "GROUP_M"},
                seconds=round(time.time() - t0, 2))
    return info


def _compile_indexed(args):
    i, cc, quick = args
    return compile_one(jobs(quick)[i], cc)


def run(targets=(80, 90), workers: int = 1, quick: bool = False) -> List[Dict]:
    if C.interpreting():
        raise RuntimeError("compile_check must run without TRITON_INTERPRET=1 (triton is in interpreter mode)")
    work = [(i, cc, quick) for cc in targets for i in range(len(jobs(quick)))]
    if workers <= 1:
        return [_compile_indexed(w) for w in work]
    import multiprocessing as mp
    ctx = mp.get_context("fork" if sys.platform.startswith("linux") else "spawn")
    with ctx.Pool(workers) as pool:
        return pool.map(_compile_indexed, work, chunksize=1)


def markdown(results: List[Dict]) -> str:
    lines = ["# Triton kernels compiled offline for sm_80 / sm_90",
             "",
             f"triton {triton.__version__}; `python -m quantkernels.triton.compile_check`. Every autotune "
             "config of each kernel's main variant, the other constexpr variants with the default config. "
             "regs / spills (local bytes) from `cuobjdump --dump-resource-usage`; shared = "
             "`compiled.metadata.shared` (bytes); tensor-core ops counted in the SASS.",
             "",
             "| kernel | variant | cfg | sm | BLOCK M/N/K | warps | stages | regs | spill B | shared B | tensor-core SASS |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        b = r["blocks"]
        blk = "/".join(str(b.get(k, "-")) for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K"))
        mma = ", ".join(f"{k} x{v}" for k, v in sorted(r["mma"].items())) or "-"
        lines.append(f"| {r['name']} | {r['variant']} | {r['config_index']} | {r['cc']} | {blk} | {r['num_warps']} "
                     f"| {r['num_stages']} | {r['regs']} | {r['local']} | {r['shared']} | {mma} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--targets", default="80,90")
    ap.add_argument("--json")
    ap.add_argument("--md")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--quick", action="store_true", help="default config of the main variants only")
    args = ap.parse_args(argv)
    results = run(tuple(int(t) for t in args.targets.split(",")), args.workers, args.quick)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    if args.md:
        with open(args.md, "w") as f:
            f.write(markdown(results))
    if not (args.json or args.md):
        sys.stdout.write(markdown(results))


if __name__ == "__main__":
    main()
