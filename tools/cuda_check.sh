#!/usr/bin/env bash
# make cuda-check: compile-checks the CUDA kernels and builds the CUDA extension without a GPU.
#   1. nvcc every csrc/cuda/*.cu for sm_80, sm_89, sm_90a, spills as errors
#   2. cuobjdump: IMMA must be in every int8 tensor-core GEMM's SASS, HMMA in every fp16/bf16 one
#      (weight-only W4A16 / W8A16); register / smem table ->
#      bench/results/cuda_resources.md
#   3. the whole extension against torch 2.14.1 (CUDA 13.0 build) in a cached venv outside the
#      clone, built in a cached copy of the tree (the clone's .venv / CPU build is not touched),
#      imported on this GPU-less machine, every CUDA registration checked
# Details: tools/cuda_check.py. Environment:
#   QK_CUDA_VENV   venv with the CUDA build of torch (default ~/.cache/quantkernels/venv-torch2.14.1-cu130;
#                  created when missing: pip install torch==2.14.1 numpy ninja setuptools wheel, ~5.4 GB)
#   QK_CUDA_TORCH  torch requirement for a new venv (default torch==2.14.1)
#   CUDA_HOME      toolkit (default /usr/local/cuda-13.0); NVCC overrides its nvcc
#   CUOBJDUMP      cuobjdump (default: the one the triton wheel in the venv ships)
#   QK_CUDA_CHECK_ARGS  extra arguments, e.g. --skip-extension
set -euo pipefail
cd "$(dirname "$0")/.."
CUDA_HOME=${CUDA_HOME:-/usr/local/cuda-13.0}
NVCC=${NVCC:-$CUDA_HOME/bin/nvcc}
VENV=${QK_CUDA_VENV:-$HOME/.cache/quantkernels/venv-torch2.14.1-cu130}
TORCH_REQ=${QK_CUDA_TORCH:-torch==2.14.1}
start=$(date +%s)

shopt -s nullglob
srcs=(csrc/cuda/*.cu)
if [ ${#srcs[@]} -eq 0 ]; then
  echo "cuda-check: csrc/cuda holds no .cu sources; nothing to compile"
  exit 0
fi
[ -x "$NVCC" ] || { echo "cuda-check: nvcc not found at $NVCC (set NVCC or CUDA_HOME)" >&2; exit 1; }

if ! "$VENV/bin/python" -c "import torch, sys; sys.exit(0 if torch.version.cuda else 1)" 2>/dev/null; then
  echo "cuda-check: creating $VENV ($TORCH_REQ, CUDA build: ~5.4 GB, a few minutes once)"
  python3 -m venv "$VENV"
  # pip's "Location ... is ignored" warnings about the local mirror are noise here.
  "$VENV/bin/python" -m pip install -q "$TORCH_REQ" numpy ninja setuptools wheel 2>&1 \
    | grep -v "^WARNING: Location" || true
  "$VENV/bin/python" -c "import torch, sys; sys.exit(0 if torch.version.cuda else 1)" || {
    echo "cuda-check: $VENV has no CUDA build of torch" >&2; exit 1; }
fi
PY="$VENV/bin/python"

CUOBJDUMP=${CUOBJDUMP:-}
if [ -z "$CUOBJDUMP" ]; then
  CUOBJDUMP=$("$PY" - <<'EOF' 2>/dev/null || true
import os, triton
print(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump"))
EOF
)
fi
[ -x "$CUOBJDUMP" ] || CUOBJDUMP=$(command -v cuobjdump || true)
[ -n "$CUOBJDUMP" ] && [ -x "$CUOBJDUMP" ] || {
  echo "cuda-check: cuobjdump not found (set CUOBJDUMP; the triton wheel ships one)" >&2; exit 1; }

# shellcheck disable=SC2086
python3 tools/cuda_check.py --nvcc "$NVCC" --cuobjdump "$CUOBJDUMP" --python "$PY" --cuda-home "$CUDA_HOME" \
  ${QK_CUDA_CHECK_ARGS:-}
echo "cuda-check: total $(( $(date +%s) - start )) s"
