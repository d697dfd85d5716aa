"""Developer-only benchmark scripts (not installed) and the committed results in bench/results/.

The kernel microbenchmark harness ships with the package: ``quantkernels.bench`` (``quantkernels
bench --help``, ``python -m quantkernels.bench.gemm --out bench/results``). Here: cpu_targets.py,
cpu_accuracy.py, calibration_minilm.py, gemma_*.py, cpu_gemm_dev.py and the C++ micro-benchmarks.
"""
