// csrc/cuda_bindings.cpp compiled against the CUDA emulator: the same validation and host-side
// choices (tile configs, split-K, GEMV, SIMT fallbacks, launch sequences) on CPU tensors,
// registered as quantkernels_cuda_emu::<op> (quantkernels/cuda_emu.py defines the schemas).
#include "cuda_bindings.cpp"

