// The CUDA emulator's stand-in for <cuda_runtime.h> (csrc/cuda_emu/qk_emu.h).
#pragma once
#include "../qk_emu.h"
