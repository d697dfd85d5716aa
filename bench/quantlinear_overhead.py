"""A/B of QuantLinear.forward's Python overhead, in one process: the forward before the issue-14
fast path (re-created here: every call through autograd.quant_linear, dispatch.resolve per op,
reshape in and out) against the current one, on single layers of Gemma-3-270M's shapes (M = 1 and
128) and, with --gemma, on the whole model's decode step and 128-token prefill (last-position
logits). Candidates interleaved round by round, medians; 1 thread, thread CPU time by default.

    PYTHONPATH=. python bench/quantlinear_overhead.py [--rounds 9] [--gemma] [--threads 2 (wall time)]
"""
import argparse
import time

import torch

try:  # python bench/<script>.py puts bench/ on sys.path; python -m bench.<script> the repo root
    from _cpu import interleaved
except ImportError:
    from bench._cpu import interleaved
import quantkernels as qk
from quantkernels import _validate as V
from quantkernels.autograd import quant_linear
from quantkernels.nn import QuantLinear

CURRENT = QuantLinear.forward


def before_forward(self, x):
    """QuantLinear.forward as of main f8f8f3f (2026-12-07), before the fast path."""
    if x.dtype not in V.FLOAT_DTYPES:
        raise TypeError(f"quantkernels.QuantLinear: input dtype must be float16, bfloat16 or float32, got {x.dtype}")
    if x.dim() < 1 or x.shape[-1] != self.in_features:
        raise ValueError(f"quantkernels.QuantLinear: input must have shape [..., {self.in_features}], "
                         f"got {tuple(x.shape)}")
    if x.device != self.qweight.device:
        raise ValueError(f"quantkernels.QuantLinear: input is on {x.device} but the layer's weights are on "
                         f"{self.qweight.device}; move one of them (model.to(device))")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, self.in_features)
    if self.input_scale is not None:
        x2 = (x2.float() / self.input_scale).to(x.dtype)
    y = quant_linear(x2, self.qweight, self.weight_scale, self.weight_zero, self.bias, self.scheme,
                     self.threshold, self.backend)
    return y.reshape(*lead, self.out_features)


def with_forward(fwd, fn):
    def run():
        QuantLinear.forward = fwd
        try:
            return fn()
        finally:
            QuantLinear.forward = CURRENT
    return run


SHAPES = {"q_proj": (640, 1024), "k/v_proj": (640, 256), "o_proj": (1024, 640), "gate/up_proj": (640, 2048),
          "down_proj": (2048, 640)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--gemma", action="store_true")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    clock = time.thread_time if a.threads == 1 else time.perf_counter
    print(f"torch {torch.__version__}, {a.threads} thread(s), {'thread CPU' if a.threads == 1 else 'wall'} time, "
          f"{a.rounds} interleaved rounds, medians; bf16 activations")
    print("\n| layer [K -> N] | scheme | M | before us | now us | saved us | now / before |")
    print("|---|---|---|---|---|---|---|")
    g = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        for name, (K, N) in SHAPES.items():
            lin = torch.nn.Linear(K, N, bias=False).to(torch.bfloat16)
            for scheme in ("w8a8", "w4a8", "w4a16"):
                ql = QuantLinear.from_linear(lin, scheme)
                for M in (1, 128):
                    x = torch.randn(1, M, K, generator=g).to(torch.bfloat16)
                    r = interleaved({"before": with_forward(before_forward, lambda: ql(x)),
                                     "now": with_forward(CURRENT, lambda: ql(x))},
                                    a.rounds, inner=200 if M == 1 else 10, clock=clock)
                    b, n = r["before"] * 1e3, r["now"] * 1e3
                    print(f"| {name} [{K} -> {N}] | {scheme} | {M} | {b:.1f} | {n:.1f} | {b - n:.1f} | {n / b:.3f} |")
    if not a.gemma:
        return
    try:
        import gemma_profile as gp
    except ImportError:
        from bench import gemma_profile as gp
    from quantkernels import models
    base, tok, _ = models.load_float_model(models.resolve_model(models.GEMMA), torch.float32)
    ids = models.token_windows(tok, models.eval_text())[0][:, :128]
    print("\n| Gemma-3-270M | phase | before ms | now ms | now / before |")
    print("|---|---|---|---|---|")
    with torch.inference_mode():
        for spec in ("w8a8", "w4a16+head", "w4a8+head"):
            m = gp.build(base, spec)
            _, decode, first = gp.make_calls(m, ids, 128)
            for phase, fn, inner in (("decode (1 token, 128 cached)", decode, 5), ("prefill (128 tokens)", first, 1)):
                r = interleaved({"before": with_forward(before_forward, fn), "now": with_forward(CURRENT, fn)},
                                a.rounds, inner=inner, clock=clock)
                print(f"| {spec} | {phase} | {r['before']:.2f} | {r['now']:.2f} | {r['now'] / r['before']:.3f} |")
            del m


if __name__ == "__main__":
    main()
