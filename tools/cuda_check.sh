#!/usr/bin/env bash
# Compile-checks every csrc/cuda/*.cu for the shipped architectures with nvcc, spills as errors.
# Needs no GPU and no torch (the .cu files include no torch headers, ARCHITECTURE.md).
set -euo pipefail
cd "$(dirname "$0")/.."
NVCC=${NVCC:-${CUDA_HOME:-/usr/local/cuda-13.0}/bin/nvcc}
shopt -s nullglob
srcs=(csrc/cuda/*.cu)
if [ ${#srcs[@]} -eq 0 ]; then
  echo "cuda-check: csrc/cuda holds no .cu sources; nothing to compile"
  exit 0
fi
[ -x "$NVCC" ] || { echo "cuda-check: nvcc not found at $NVCC (set NVCC or CUDA_HOME)" >&2; exit 1; }
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
for f in "${srcs[@]}"; do
  echo "nvcc $f"
  "$NVCC" -c -O3 -std=c++17 -Icsrc \
    -gencode arch=compute_80,code=sm_80 -gencode arch=compute_89,code=sm_89 \
    -gencode arch=compute_90a,code=sm_90a \
    -Xptxas=--warn-on-spills,--warning-as-error -o "$tmp/$(basename "$f").o" "$f"
done
echo "cuda-check: ${#srcs[@]} file(s) compiled for sm_80, sm_89, sm_90a"
