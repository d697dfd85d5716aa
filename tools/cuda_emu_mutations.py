"""Seeded bugs in the CUDA kernel sources, one at a time: which emulator test catches each.

    python tools/cuda_emu_mutations.py [--out bench/results/cuda_emu_mutations.md] [--tests FILE]

Copies the tracked files of this checkout to a temporary directory, applies one mutation to a
csrc/cuda/ file there, rebuilds the emulator (incrementally) and runs tests/test_cuda_emu.py's
default suite (or ``--tests``, e.g. the fuzz file tests/test_fuzz_cuda_emu.py) with -x; records the first failing test and the first line of its error. The
checkout itself is never modified. Takes a few minutes (one kernel file recompiles per mutation).
"""

from __future__ import annotations

import argparse
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]

# (name, file, old, new, what it models). `old` must occur exactly once; a tuple of olds (and news) edits
# several places of the file, each of which must occur exactly once.
# EQUIVALENT: mutations that do not change what the kernel computes or its synchronisation
# correctness (a test that "catches" them would be wrong), with the reason.
EQUIVALENT = {
    "swizzle XOR changed consistently":
        "writes and reads use the same swizzle, so the results are identical; only the shared-memory bank "
        "conflict pattern changes, which a GPU profile shows and the emulator does not model",
    "missing __syncthreads (LLM.int8 chunk loop)":
        "the barrier is redundant: the next chunk writes idx / xs / ws only after its own first "
        "__syncthreads, which every thread reaches after finishing the previous chunk's reads, and the "
        "warp_count it writes before that barrier was last read two barriers earlier",
}
MUTATIONS = [
    ("swap two A-fragment registers", "csrc/cuda/weight_only.cu",
     "H::mma(acc[i][j], ar[i][0][2 * ss], ar[i][1][2 * ss], ar[i][0][2 * ss + 1], ar[i][1][2 * ss + 1], b0[j],",
     "H::mma(acc[i][j], ar[i][0][2 * ss], ar[i][0][2 * ss + 1], ar[i][1][2 * ss], ar[i][1][2 * ss + 1], b0[j],",
     "weight-only tensor-core kernel: a1 <-> a2 (row g + 8 / k + 8) in the m16n8k16 A fragment"),
    ("swap ldmatrix lane roles (A: a1 <-> a2)", "csrc/cuda/int8_gemm.cu",
     "const int r = warp_m0 + i * 16 + (lane & 7) + ((lane >> 3) & 1) * 8;\n"
     "        ldmatrix_x4(af[i], smem_addr(tA + swz64(r, kk * 2 + (lane >> 4))));",
     "const int r = warp_m0 + i * 16 + (lane & 7) + (lane >> 4) * 8;\n"
     "        ldmatrix_x4(af[i], smem_addr(tA + swz64(r, kk * 2 + ((lane >> 3) & 1))));",
     "int8 tensor-core GEMM: lanes 8-15 / 16-23 address each other's rows, so A registers 1 and 2 swap"),
    ("swizzle XOR changed on the read side only", "csrc/cuda/weight_only.cu",
     "tA + r * 128 + (((2 * t + hs) ^ (r & 7)) << 4)",
     "tA + r * 128 + (((2 * t + hs) ^ ((r >> 1) & 7)) << 4)",
     "weight-only A tile: cp.async writes chunk c at c ^ (r & 7), the reads use c ^ ((r >> 1) & 7)"),
    ("swizzle XOR changed consistently", "csrc/cuda/int8_gemm.cu",
     "return r * BK + ((ch ^ ((r >> 1) & 3)) << 4);",
     "return r * BK + ((ch ^ ((r >> 2) & 3)) << 4);",
     "int8 GEMM swz64 (writes and reads alike): same results, only the bank-conflict pattern changes"),
    ("drop a cp_async_wait", "csrc/cuda/int8_gemm.cu",
     "    cp_async_wait<STAGES - 2>();\n    __syncthreads();\n    if (kt + STAGES - 1 < KT)",
     "    __syncthreads();\n    if (kt + STAGES - 1 < KT)",
     "int8 / W4A8 tensor-core GEMM main loop reads a stage whose copies were never waited for"),
    ("missing __syncthreads (cp.async pipeline)", "csrc/cuda/int8_gemm.cu",
     "    cp_async_wait<STAGES - 2>();\n    __syncthreads();\n    if (kt + STAGES - 1 < KT)",
     "    cp_async_wait<STAGES - 2>();\n    if (kt + STAGES - 1 < KT)",
     "int8 / W4A8 GEMM: other threads' copies are read without the barrier that publishes them"),
    ("missing __syncthreads (LLM.int8 chunk loop)", "csrc/cuda/llm_int8.cu",
     "    __syncthreads();  // xs / ws / idx are rewritten by the next chunk",
     "    // (barrier removed)",
     "llm_int8_correct_kernel: drops the barrier at the end of each outlier chunk"),
    ("off-by-one in an N-tail guard", "csrc/cuda/int8_gemm.cu",
     "        if (m < M && n < N) {\n          if constexpr (INT4) {",
     "        if (m < M && n <= N) {\n          if constexpr (INT4) {",
     "int8 / W4A8 GEMM epilogue stores column n = N (the next row's first element, or past the end)"),
    ("off-by-one in the GEMV N guard", "csrc/cuda/weight_only.cu",
     "  if (n >= N) return;  // whole warps only",
     "  if (n > N) return;  // whole warps only",
     "weight-only GEMV: the warp for channel N reads weights and writes outputs one row past the end"),
    ("wrong ballot mask", "csrc/cuda/llm_int8.cu",
     "ballot = __ballot_sync(0xffffffffu, flag);",
     "ballot = __ballot_sync(0x7fffffffu, flag);",
     "llm_int8_correct_kernel: lane 31 executes the ballot with a mask that excludes it"),
    ("warp reduction one step short", "csrc/cuda/quantize_int8.cu",
     "for (int off = 16; off > 0; off >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, off));",
     "for (int off = 16; off > 1; off >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, off));",
     "quantize_rowwise_kernel: the absmax butterfly skips the last xor-1 step"),
    ("W4A8 zero point read per tile, not per group", "csrc/cuda/int8_gemm.cu",
     "if (in_k && i4.zero_b != nullptr && kglob % i4.group_size == 0) {",
     "if (in_k && i4.zero_b != nullptr && kglob == 0) {",
     "W4A8 tensor cores: every group uses the first group's zero point"),
    ("block above __launch_bounds__ (SIMT GEMM launch)", "csrc/cuda/int8_gemm.cu",
     "QK_LAUNCH(simt_gemm_kernel<OutT>, simt_blocks(M * N), kSimtThreads, 0,",
     "QK_LAUNCH(simt_gemm_kernel<OutT>, simt_blocks(M * N), 4 * kSimtThreads, 0,",
     "int8 SIMT fallback launched with 1024-thread blocks, bound 256: a GPU refuses the launch (too many "
     "resources requested); the grid-stride loop would still compute the right result"),
    ("__launch_bounds__ lowered below the launch", "csrc/cuda/quantize_int8.cu",
     ("__launch_bounds__(kQuantThreads)\nquantize_rowwise_kernel", "QK_LAUNCH_BOUNDS(kQuantThreads);"),
     ("__launch_bounds__(kQuantThreads / 2)\nquantize_rowwise_kernel", "QK_LAUNCH_BOUNDS(kQuantThreads / 2);"),
     "quantize_rowwise_kernel's bound halved (both statements, consistently) while the launch still uses "
     "kQuantThreads = 256 threads"),
    ("__launch_bounds__ edited in the signature only", "csrc/cuda/weight_only.cu",
     "__global__ void __launch_bounds__(kTcThreads)",
     "__global__ void __launch_bounds__(kTcThreads / 2)",
     "weight_only_mma_kernel: nvcc would compile for 64 threads, the emulator still checks 128 (the two "
     "statements of the bound disagree)"),
    ("missing __syncthreads (LLM.int8 gather -> sum)", "csrc/cuda/llm_int8.cu",
     "    __syncthreads();\n\n    // 3. sum_j",
     "\n    // 3. sum_j",
     "llm_int8_correct_kernel: the xs / ws tiles gathered by all warps are read by other warps without the "
     "barrier between the two phases"),
    ("NF4 / FP4 nibble order swapped (tensor cores)", "csrc/cuda/weight_only.cu",
     "(bw[j][hs] >> (8 * (i >> 1) + ((i & 1) ? 0 : 4))) & 0xFu",
     "(bw[j][hs] >> (8 * (i >> 1) + ((i & 1) ? 4 : 0))) & 0xFu",
     "gemm_4bit tensor cores: the low nibble taken as the first value (the PLAIN int4 order, not s.11.4's)"),
    ("NF4 / FP4 block index per row (tensor cores)", "csrc/cuda/weight_only.cu",
     "s = __ldg(scale + ((n * K + k) >> lb));",
     "s = __ldg(scale + n * ((K + (int64_t{1} << lb) - 1) >> lb) + (k >> lb));",
     "gemm_4bit tensor cores: blocks counted per row instead of over the flattened weight (wrong whenever "
     "K % blocksize != 0, i.e. when blocks span rows)"),
    ("double quantization contracted into an FMA", "csrc/cuda/weight_only.cu",
     "out[b] = __fadd_rn(__fmul_rn(s_dyn[q[b]], __ldg(nested + (b >> 8))), off);",
     "out[b] = fmaf(s_dyn[q[b]], __ldg(nested + (b >> 8)), off);",
     "absmax_dq_kernel: DYN[q] * a2 + offset rounded once instead of twice (s.11.5)"),
    ("code table read before its barrier (GEMV)", "csrc/cuda/weight_only.cu",
     "    __syncthreads();  // before any warp returns below",
     "    // (barrier removed)",
     "gemm_4bit GEMV: warps 1-3 read the shared code table that warp 0 writes, with no barrier between"),
]


def copy_tree(dst: pathlib.Path):
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    for f in files:
        src = ROOT / f
        if src.is_file():
            (dst / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst / f)
    for so in ROOT.glob("quantkernels/_C*.so"):
        shutil.copy2(so, dst / "quantkernels" / so.name)


def run_tests(work: pathlib.Path, env, tests: str = "tests/test_cuda_emu.py") -> tuple[str, str, float]:
    t0 = time.time()
    r = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", tests],
                       cwd=work, env=env, capture_output=True, text=True)
    dt = time.time() - t0
    out = r.stdout + r.stderr
    if r.returncode == 0:
        return "", re.findall(r"\d+ passed", out)[-1] if re.findall(r"\d+ passed", out) else "passed", dt
    failed = re.findall(r"^FAILED (\S+)", out, re.M) or re.findall(r"^ERROR (\S+)", out, re.M)
    err = re.findall(r"^E\s+(.+)$", out, re.M)
    return (failed[0] if failed else f"rc {r.returncode}"), (err[0] if err else out.strip().splitlines()[-1]), dt


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "cuda_emu_mutations.md"))
    ap.add_argument("--only", type=int, nargs="*", help="indices of MUTATIONS to run")
    ap.add_argument("--tests", default="tests/test_cuda_emu.py",
                    help="the test file that must catch each mutation (e.g. tests/test_fuzz_cuda_emu.py)")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="qk-mut-") as tmp:
        work = pathlib.Path(tmp)
        copy_tree(work)
        env = dict(os.environ, PYTHONPATH=str(work), QUANTKERNELS_CUDA_EMU_BUILD=str(work / "build" / "cuda_emu"))
        failed, msg, dt = run_tests(work, env, args.tests)  # baseline (and the first, full build)
        if failed:
            sys.exit(f"the unmutated sources fail: {failed}: {msg}")
        print(f"baseline: {msg} in {dt:.0f} s", flush=True)
        for i, (name, rel, old, new, what) in enumerate(MUTATIONS):
            if args.only and i not in args.only:
                continue
            path = work / rel
            orig = path.read_text()
            text = orig
            for o, n in zip(*((old, new) if isinstance(old, tuple) else ((old,), (new,)))):
                assert text.count(o) == 1, (name, o, text.count(o))
                text = text.replace(o, n)
            path.write_text(text)
            try:
                failed, msg, dt = run_tests(work, env, args.tests)
            finally:
                path.write_text(orig)
            caught = bool(failed)
            print(f"{name}: {'caught by ' + failed if caught else 'NOT caught'} ({dt:.0f} s)", flush=True)
            rows.append((name, rel, what, failed, msg, caught))
    lines = [
        "# CUDA emulator: seeded bugs and the test that catches each",
        "",
        "`python tools/cuda_emu_mutations.py` (issue 15): each mutation alone, applied to a copy of the",
        f"sources, then `pytest -x {args.tests}` (as `make test` runs it). The",
        "first failing test and the first line of its error are recorded. Regenerate after changing",
        "the kernels or the emulator.",
        "",
        "| # | seeded bug | file | what it does | caught by | first error line |",
        "|---|---|---|---|---|---|",
    ]
    for i, (name, rel, what, failed, msg, caught) in enumerate(rows, 1):
        cell = f"`{failed.split('::', 1)[-1]}`" if caught else "**not caught**"
        m = msg.replace("|", "\\|")[:220]
        lines.append(f"| {i} | {name} | `{rel}` | {what} | {cell} | {m if caught else ''} |")
    missed = [r for r in rows if not r[5]]
    real = [r for r in missed if r[0] not in EQUIVALENT]
    lines += ["", f"{len(rows) - len(missed)} of {len(rows)} caught; {len(missed) - len(real)} not caught "
              f"are equivalent mutants (no bug), {len(real)} real bug(s) not caught."]
    for r in missed:
        why = EQUIVALENT.get(r[0])
        lines.append(f"- {r[0]}: " + (f"equivalent mutant: {why}." if why else "**a real bug the emulator missed.**"))
    pathlib.Path(args.out).write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
