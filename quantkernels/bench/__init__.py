"""Kernel microbenchmarks of the quantkernels ops against the baselines users would pick instead.

Shipped with the package, so they run from any directory after ``pip install quantkernels``
(``pip install 'quantkernels[bench]'`` adds tqdm and matplotlib: progress bar and PNG plots):

    quantkernels bench --quick                          # or: python -m quantkernels bench --quick
    python -m quantkernels.bench.gemm --help            # the GEMM sweep, same options
    python -m quantkernels.bench.weight_only_cuda       # W4A16 / W8A16 vs bf16 F.linear (needs a GPU)

Results (markdown, CSV, PNG) go to ``--out``, by default ``./bench_results`` under the current
directory. Nothing here imports the source tree's top-level ``bench/`` (developer scripts).
"""

#: where the results go unless --out says otherwise: relative to the current directory.
DEFAULT_OUT = "bench_results"
