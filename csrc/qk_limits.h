// Bounds shared by every C++ backend (CPU kernels, CUDA bindings, the CUDA emulator), defined
// once. quantkernels/_validate.py (MAX_K_INT8) and quantkernels/_contracts.py (MAX_GROUP_W4A8)
// hold the same numbers; tests/test_limits.py reads this file and checks that they agree.
#pragma once

#include <cstdint>

namespace quantkernels {

// Largest K for which an int8 x int8 dot product cannot overflow int32 for any int8 input:
// 128 * 128 * K <= 2^31 - 1 (docs/numerics.md s.4).
constexpr int64_t kMaxKInt8 = (int64_t(1) << 31) / (128 * 128) - 1;  // 131071

// Largest W4A8 group size: int32 inside a group, |a| <= 128 and |q - zero| <= 15, so
// 128 * 15 * G <= 2^31 - 1.
constexpr int64_t kMaxGroupW4A8 = ((int64_t(1) << 31) - 1) / (128 * 15);  // 1118481

// int4 zero points lie in [0, 15] (docs/numerics.md s.4, "Zero points of int4 weights").
constexpr int kMaxZeroInt4 = 15;

}  // namespace quantkernels
