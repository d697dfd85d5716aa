// The CUDA emulator's stand-in for <cuda_bf16.h> (csrc/cuda_emu/qk_emu.h).
#pragma once
#include "../qk_emu.h"
