// The CUDA emulator's stand-in for <cuda_fp16.h> (csrc/cuda_emu/qk_emu.h).
#pragma once
#include "../qk_emu.h"
