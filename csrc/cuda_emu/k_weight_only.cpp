// csrc/cuda/weight_only.cu compiled as host C++ for the CUDA emulator (unchanged source).
#include "cuda/weight_only.cu"
