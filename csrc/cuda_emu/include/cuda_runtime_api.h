// The CUDA emulator's stand-in for <cuda_runtime_api.h> (csrc/cuda_emu/qk_emu.h).
#pragma once
#include "../qk_emu.h"
