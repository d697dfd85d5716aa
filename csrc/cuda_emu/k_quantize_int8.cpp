// csrc/cuda/quantize_int8.cu compiled as host C++ for the CUDA emulator (unchanged source).
#include "cuda/quantize_int8.cu"
