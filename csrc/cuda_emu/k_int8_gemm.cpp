// csrc/cuda/int8_gemm.cu compiled as host C++ for the CUDA emulator (unchanged source).
#include "cuda/int8_gemm.cu"
