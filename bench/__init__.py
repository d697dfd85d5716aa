"""Microbenchmarks of the quantkernels ops against the baselines users would pick instead.

``python -m bench.gemm --help``: the GEMM sweep (every scheme x every available backend,
plus F.linear, torch.ao quantize_dynamic, bitsandbytes and torch._int_mm baselines).
"""
