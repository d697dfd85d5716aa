"""CUDA compile check without a GPU (``make cuda-check``; ARCHITECTURE.md "CUDA without a GPU in CI").

1. nvcc compiles every csrc/cuda/*.cu for sm_80, sm_89, sm_90a, spills are errors
   (-Xptxas=--warn-on-spills,--warning-as-error). Objects are cached by a hash of the sources,
   the flags and the nvcc version (~/.cache/quantkernels/cuda-check/).
2. cuobjdump --dump-sass / --dump-resource-usage of each object: FAILS unless every tensor-core
   GEMM kernel (imma_gemm_kernel<...>) contains IMMA and every weight-only tensor-core kernel
   (weight_only_mma_kernel<...>) contains HMMA on every arch, or if any kernel spills
   (STACK / LOCAL > 0). Writes the per-kernel register / shared-memory / IMMA table to
   bench/results/cuda_resources.md.
3. Builds the whole extension (CPU + CUDA) against the CUDA build of torch in a venv outside the
   clone (argument --venv), in a persistent copy of the tree (incremental ninja rebuilds), imports
   it without a GPU and checks that every op registered in csrc/cuda_bindings.cpp has a CUDA kernel.

Run by tools/cuda_check.sh, which creates the venv. Exit status 0 only if every step passed.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import hashlib
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ARCHS = ("sm_80", "sm_89", "sm_90a")
GENCODE = [f"-gencode=arch=compute_{a[3:]},code={a}" for a in ARCHS]
NVCC_FLAGS = ["-c", "-O3", "-std=c++17", f"-I{ROOT / 'csrc'}", *GENCODE,
              "-Xptxas=-v,--warn-on-spills,--warning-as-error"]
CACHE = Path(os.environ.get("QK_CUDA_CACHE", Path.home() / ".cache" / "quantkernels"))
# Kernels that must run on int8 tensor cores: their SASS must hold IMMA on every arch.
TENSOR_CORE_KERNELS = re.compile(r"imma_gemm_kernel")
# Kernels that must run on fp16/bf16 tensor cores (weight-only W4A16 / W8A16): HMMA on every arch.
HMMA_KERNELS = re.compile(r"weight_only_mma_kernel")
WGMMA_KERNELS = re.compile(r"wgmma")  # none yet: a Hopper path would have to show IGMMA on sm_90a


def log(msg: str) -> None:
    print(f"cuda-check: {msg}", flush=True)


def run(cmd, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, text=True, capture_output=True, **kw)


# ----------------------------------------------------------------------------- 1. nvcc


def compile_one(nvcc: str, src: Path, key_extra: str) -> tuple[Path, str, bool, float]:
    """(object, ptxas log, cached?, seconds). Raises RuntimeError with the compiler output."""
    h = hashlib.sha256(key_extra.encode())
    h.update(src.read_bytes())
    for dep in sorted((ROOT / "csrc" / "cuda").glob("*.h*")):  # every header: cheap, safe
        h.update(dep.name.encode() + dep.read_bytes())
    obj_dir = CACHE / "cuda-check"
    obj_dir.mkdir(parents=True, exist_ok=True)
    obj = obj_dir / f"{src.stem}-{h.hexdigest()[:16]}.o"
    logf = obj.with_suffix(".ptxas.txt")
    if obj.exists() and logf.exists():
        return obj, logf.read_text(), True, 0.0
    t0 = time.time()
    tmp = obj.with_suffix(f".tmp{os.getpid()}.o")
    r = run([nvcc, *NVCC_FLAGS, "-o", str(tmp), str(src)])
    if r.returncode != 0:
        raise RuntimeError(f"nvcc failed for {src.relative_to(ROOT)}:\n{r.stdout}{r.stderr}")
    tmp.replace(obj)
    logf.write_text(r.stderr)
    return obj, r.stderr, False, time.time() - t0


# ----------------------------------------------------------------------------- 2. SASS


def demangle(names):
    if not names:
        return {}
    r = run(["c++filt"], input="\n".join(names))
    out = r.stdout.splitlines() if r.returncode == 0 else names
    short = {}
    for mangled, pretty in zip(names, out):
        pretty = re.sub(r"quantkernels::cuda::\(anonymous namespace\)::", "", pretty)
        pretty = pretty.replace("quantkernels::cuda::", "")
        short[mangled] = pretty.split("(")[0]
    return short


def sass_report(cuobjdump: str, objs: dict[str, Path]):
    """[(file, arch, mangled kernel, regs, static smem, stack, local, imma, igmma, hmma)]"""
    rows = []
    for src, obj in objs.items():
        res = run([cuobjdump, "--dump-resource-usage", str(obj)])
        sass = run([cuobjdump, "--dump-sass", str(obj)])
        if res.returncode or sass.returncode:
            raise RuntimeError(f"cuobjdump failed on {obj}:\n{res.stderr}{sass.stderr}")
        usage = {}  # (arch, fn) -> dict
        arch = None
        for line in res.stdout.splitlines():
            m = re.match(r"\s*arch = (sm_\w+)", line)
            if m:
                arch = m.group(1)
            m = re.match(r"\s*Function (\S+):", line)
            if m:
                fn = m.group(1)
                continue
            m = re.match(r"\s*REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", line)
            if m:
                usage[(arch, fn)] = tuple(int(v) for v in m.groups())
        counts = {}
        arch = fn = None
        for line in sass.stdout.splitlines():
            m = re.match(r"\s*arch = (sm_\w+)", line)
            if m:
                arch = m.group(1)
            m = re.match(r"\s*Function : (\S+)", line)
            if m:
                fn = m.group(1)
                counts[(arch, fn)] = [0, 0, 0]
            elif fn is not None and (arch, fn) in counts:
                if re.search(r"\bIMMA\.", line):
                    counts[(arch, fn)][0] += 1
                if re.search(r"\bIGMMA\.", line):
                    counts[(arch, fn)][1] += 1
                if re.search(r"\bHMMA\.", line):
                    counts[(arch, fn)][2] += 1
        for (arch, fn), (reg, stack, shared, local) in sorted(usage.items()):
            imma, igmma, hmma = counts.get((arch, fn), [0, 0, 0])
            rows.append((src, arch, fn, reg, shared, stack, local, imma, igmma, hmma))
    return rows


def dynamic_smem(pretty: str) -> str:
    """Dynamic shared memory of an imma_gemm_kernel<BM, BN, WM, WN, STAGES, INT4, Out> or a
    weight_only_mma_kernel<T, INT4, BM, NT, STAGES, CODE> instance (TcCfg::kSmem in weight_only.cu:
    STAGES x (BM rows x 128 bytes of activations + 32 NT channels x 32 / 64 bytes of weights); the
    NF4 / FP4 instances (CODE) add a 64-byte static code table, not counted here)."""
    m = re.search(r"weight_only_mma_kernel<[^,]+, (true|false), (\d+), (\d+), (\d+), (?:true|false)>", pretty)
    if m:
        int4, bm, nt, stages = m.group(1) == "true", int(m.group(2)), int(m.group(3)), int(m.group(4))
        return str(stages * (bm * 128 + 32 * nt * (32 if int4 else 64)))
    m = re.search(r"imma_gemm_kernel<(\d+), (\d+), \d+, \d+, (\d+), (true|false)", pretty)
    if not m:
        return "-"
    bm, bn, stages, int4 = int(m.group(1)), int(m.group(2)), int(m.group(3)), m.group(4) == "true"
    return str(stages * (bm * 64 + bn * (32 if int4 else 64)))


def write_resources(rows, path: Path, elapsed: str) -> list[str]:
    """Writes the markdown table; returns the list of failures."""
    names = demangle(sorted({r[2] for r in rows}))
    failures = []
    lines = [
        "# CUDA kernels: registers, shared memory, tensor-core instructions",
        "",
        "Written by `make cuda-check` (tools/cuda_check.py) from `cuobjdump --dump-resource-usage` and",
        "`--dump-sass` of each csrc/cuda/*.cu compiled with `nvcc -O3` for " + ", ".join(ARCHS) + ".",
        "No GPU was involved: these kernels compile; whether they are correct and fast is verified",
        "only by `make gpu-check` (tests/test_cuda.py) on a machine with a GPU.",
        "",
        "Columns: registers per thread; static shared memory (bytes); dynamic shared memory (bytes,",
        "from the tile config); stack / local bytes (spills: must be 0); IMMA = int8 mma.sync",
        "instructions, HMMA = fp16/bf16 mma.sync instructions, IGMMA = Hopper wgmma instructions",
        "in the SASS.",
        "",
        "| file | kernel | arch | regs | smem static | smem dynamic | stack | local | IMMA | HMMA | IGMMA |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for src, arch, fn, reg, shared, stack, local, imma, igmma, hmma in sorted(
            rows, key=lambda r: (r[0], names[r[2]], r[1])):
        pretty = names[fn]
        lines.append(f"| {src} | `{pretty}` | {arch} | {reg} | {shared} | {dynamic_smem(pretty)} | {stack} | "
                     f"{local} | {imma} | {hmma} | {igmma} |")
        if TENSOR_CORE_KERNELS.search(pretty) and imma == 0:
            failures.append(f"{pretty} on {arch}: no IMMA instruction in the SASS")
        if HMMA_KERNELS.search(pretty) and hmma == 0:
            failures.append(f"{pretty} on {arch}: no HMMA instruction in the SASS")
        if WGMMA_KERNELS.search(pretty) and arch == "sm_90a" and igmma == 0:
            failures.append(f"{pretty} on {arch}: no IGMMA instruction in the SASS")
        if stack or local:
            failures.append(f"{pretty} on {arch}: stack {stack} / local {local} bytes (spills)")
    n_tc = sum(1 for r in rows if TENSOR_CORE_KERNELS.search(names[r[2]]))
    if n_tc == 0:
        failures.append("no tensor-core GEMM kernel (imma_gemm_kernel) found in any object")
    n_hmma = sum(1 for r in rows if HMMA_KERNELS.search(names[r[2]]))
    if n_hmma == 0:
        failures.append("no fp16/bf16 tensor-core GEMM kernel (weight_only_mma_kernel) found in any object")
    lines += ["", f"Compile step: {elapsed}.", ""]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines))
    return failures


# ----------------------------------------------------------------------------- 3. extension


def sync_tree(dst: Path) -> int:
    """Copies the clone's tracked + untracked-not-ignored files into dst, rewriting only files whose
    content changed (so that ninja's mtime-based rebuild stays incremental); returns #written."""
    r = run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT)
    if r.returncode:
        raise RuntimeError(f"git ls-files failed: {r.stderr}")
    files = [f for f in r.stdout.split("\0") if f]
    written = 0
    keep = set()
    for rel in files:
        src = ROOT / rel
        if not src.is_file():
            continue
        keep.add(rel)
        out = dst / rel
        data = src.read_bytes()
        if out.is_file() and out.read_bytes() == data:
            continue
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(data)
        written += 1
    # Sources deleted from the clone must not linger in the copy (setup.py globs csrc/).
    for p in (dst / "csrc").rglob("*"):
        if p.is_file() and str(p.relative_to(dst)) not in keep:
            p.unlink()
            written += 1
    return written


CHECK_IMPORT = r"""
import re, sys, torch
import quantkernels
from quantkernels import _native
assert _native.AVAILABLE, f"quantkernels._C did not load: {_native.REASON}"
src = open("csrc/cuda_bindings.cpp").read()
ops = re.findall(r'm\.impl\("(\w+)"', src[src.index("TORCH_LIBRARY_IMPL(quantkernels, CUDA"):])
assert ops, "no m.impl(...) found in the CUDA TORCH_LIBRARY_IMPL block"
from quantkernels._ops import SCHEMAS
bad = [op for op in ops if op not in SCHEMAS]
assert not bad, f"ops registered for CUDA but not defined in _ops.SCHEMAS: {bad}"
missing = [op for op in ops if not torch._C._dispatch_has_kernel_for_dispatch_key(f"quantkernels::{op}", "CUDA")]
assert not missing, f"no CUDA kernel registered for: {missing}"
cpu = sorted(quantkernels.dispatch.native_kernels("CPU"))
print(f"torch {torch.__version__} (CUDA {torch.version.cuda}), GPU visible: {torch.cuda.is_available()}")
print(f"CUDA kernels registered ({len(ops)}): {', '.join(ops)}")
print(f"CPU kernels registered ({len(cpu)}): {', '.join(cpu)}")
"""


def build_extension(py: str, cuda_home: str) -> str:
    build = CACHE / "cuda-check" / "tree"
    build.mkdir(parents=True, exist_ok=True)
    n = sync_tree(build)
    env = dict(os.environ, CUDA_HOME=cuda_home, TORCH_CUDA_ARCH_LIST="8.0;8.9;9.0a",
               MAX_JOBS=os.environ.get("MAX_JOBS", str(os.cpu_count() or 2)), PYTHONNOUSERSITE="1")
    env.pop("QUANTKERNELS_NO_NATIVE", None)
    env.pop("FORCE_CUDA", None)
    t0 = time.time()
    r = run([py, "setup.py", "build_ext", "--inplace"], cwd=build, env=env)
    if r.returncode != 0 or "building CPU + CUDA kernels" not in r.stdout:
        raise RuntimeError(f"extension build failed (in {build}):\n{r.stdout[-8000:]}\n{r.stderr[-8000:]}")
    t_build = time.time() - t0
    r = run([py, "-c", CHECK_IMPORT], cwd=build, env=env)
    if r.returncode != 0:
        raise RuntimeError(f"import / registration check failed:\n{r.stdout}\n{r.stderr[-4000:]}")
    return f"{n} file(s) synced, build {t_build:.0f} s\n" + r.stdout.strip()


# ----------------------------------------------------------------------------- main


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--nvcc", required=True)
    ap.add_argument("--cuobjdump", required=True)
    ap.add_argument("--python", required=True, help="python of the venv with the CUDA build of torch")
    ap.add_argument("--cuda-home", required=True)
    ap.add_argument("--skip-extension", action="store_true")
    args = ap.parse_args()
    t_all = time.time()

    srcs = sorted((ROOT / "csrc" / "cuda").glob("*.cu"))
    if not srcs:
        log("csrc/cuda holds no .cu sources; nothing to compile")
        return 0
    ver = run([args.nvcc, "--version"]).stdout.strip().splitlines()[-1]
    key = ver + " ".join(NVCC_FLAGS)
    t0 = time.time()
    objs, failures = {}, []
    # Two at a time: nvcc is single-threaded and CI machines are small.
    with cf.ThreadPoolExecutor(max_workers=min(2, len(srcs))) as ex:
        futs = {ex.submit(compile_one, args.nvcc, s, key): s for s in srcs}
        for fut in cf.as_completed(futs):
            s = futs[fut]
            try:
                obj, _, cached, secs = fut.result()
            except RuntimeError as e:
                failures.append(str(e))
                continue
            objs[str(s.relative_to(ROOT))] = obj
            log(f"nvcc {s.relative_to(ROOT)}: ok ({'cached' if cached else f'{secs:.0f} s'})")
    if failures:
        for f in failures:
            print(f, file=sys.stderr)
        log("FAILED: nvcc")
        return 1
    t_nvcc = time.time() - t0
    log(f"{len(srcs)} file(s) compiled for {', '.join(ARCHS)} with spills as errors ({t_nvcc:.0f} s)")

    rows = sass_report(args.cuobjdump, objs)
    out = ROOT / "bench" / "results" / "cuda_resources.md"
    failures = write_resources(rows, out, f"nvcc {ver}, {len(srcs)} files x {len(ARCHS)} archs")
    names = demangle(sorted({r[2] for r in rows}))
    tc = [r for r in rows if TENSOR_CORE_KERNELS.search(names[r[2]])]
    for arch in ARCHS:
        n_imma = sum(r[7] for r in tc if r[1] == arch)
        n_k = sum(1 for r in tc if r[1] == arch)
        max_reg = max((r[3] for r in rows if r[1] == arch), default=0)
        hm = [r for r in rows if r[1] == arch and HMMA_KERNELS.search(names[r[2]])]
        log(f"{arch}: {n_k} int8 tensor-core GEMM kernels, {n_imma} IMMA instructions in total; "
            f"{len(hm)} fp16/bf16 ones, {sum(r[9] for r in hm)} HMMA; "
            f"max {max_reg} registers/thread, {sum(1 for r in rows if r[1] == arch)} kernels")
    log(f"wrote {out.relative_to(ROOT)}")
    if failures:
        for f in failures:
            print(f"  {f}", file=sys.stderr)
        log("FAILED: SASS / resource check")
        return 1

    if args.skip_extension:
        log("extension build skipped (--skip-extension)")
    else:
        try:
            report = build_extension(args.python, args.cuda_home)
        except RuntimeError as e:
            print(e, file=sys.stderr)
            log("FAILED: extension build / import")
            return 1
        for line in report.splitlines():
            log(line)
    log(f"PASSED in {time.time() - t_all:.0f} s (kernels compiled and inspected only: nothing ran on a GPU)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
