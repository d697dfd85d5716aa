// Device helpers shared by the quantkernels .cu files (no torch headers).
//
// Conversions go through explicit intrinsics: torch builds .cu files with
// -D__CUDA_NO_HALF_OPERATORS__ / -D__CUDA_NO_HALF_CONVERSIONS__ (and friends), so the
// implicit float <-> __half / __nv_bfloat16 operators are unavailable there.
// Float arithmetic that must match the reference bit for bit uses __fmul_rn / __fadd_rn /
// __fdiv_rn: they are never contracted into FMAs nor turned into approximate divisions.
//
// QK_CUDA_EMU (the CUDA emulator, csrc/cuda_emu/): the same sources compile as host C++ against
// csrc/cuda_emu/include/ (cuda_runtime.h & co.). This file is the one switch: the inline-PTX
// wrappers below and in the .cu files call the emulator's host implementations of the same
// instructions, every launch goes through QK_LAUNCH and dynamic shared memory through
// QK_DYNAMIC_SMEM. Kernel logic is never written twice.
//
// Launch bounds: every __global__ kernel is declared `__global__ void __launch_bounds__(B) name(...)`
// and its first statement is `QK_LAUNCH_BOUNDS(B);` with the same text B. nvcc sees the real
// __launch_bounds__ (register allocation; a launch with more threads fails on the GPU with "too
// many resources requested for launch"); QK_LAUNCH_BOUNDS is a compile-time range check there and
// costs nothing. In the emulator (where __launch_bounds__ expands to nothing) QK_LAUNCH_BOUNDS
// hands B to the launch: a block with more than B threads fails it (cudaErrorLaunchOutOfResources)
// before the kernel does anything, naming the kernel, the block and the bound, and a kernel that
// uses threadIdx, shared or global memory or a barrier before stating its bound fails too.
// tests/test_cuda_emu.py parses csrc/cuda/ and fails on a kernel without the pair or with two
// different texts.
#pragma once

#include <cstdint>
#include <type_traits>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "qk_cuda.h"

#ifdef QK_CUDA_EMU
// kernel<<<grid, block, smem, stream>>>(args...) through the emulator (named for its messages).
#define QK_LAUNCH(kernel, grid, block, smem, stream, ...) \
  ::qk_emu::launch(#kernel, __PRETTY_FUNCTION__, kernel, grid, block, smem, stream, __VA_ARGS__)
#define QK_DYNAMIC_SMEM(name) uint8_t* const name = ::qk_emu::dynamic_smem()
// The kernel's __launch_bounds__ (the same text), checked against the launch's block.
#define QK_LAUNCH_BOUNDS(max_threads) ::qk_emu::launch_bounds(static_cast<int>(max_threads))
// A static shared array: one block-wide instance per declaration (per kernel instantiation: the
// address of a constant-initialised local tag is its key), in the emulator's static shared window.
#define QK_SHARED(T, name, dims)                                                                            \
  using name##_qk_type = T dims;                                                                            \
  static char name##_qk_tag;                                                                                \
  name##_qk_type& name = *reinterpret_cast<name##_qk_type*>(                                                \
      ::qk_emu::static_smem(&name##_qk_tag, sizeof(name##_qk_type), alignof(T)))
#else
#define QK_LAUNCH(kernel, grid, block, smem, stream, ...) kernel<<<grid, block, smem, stream>>>(__VA_ARGS__)
#define QK_DYNAMIC_SMEM(name) extern __shared__ __align__(128) uint8_t name[]
#define QK_LAUNCH_BOUNDS(max_threads) \
  static_assert((max_threads) >= 1 && (max_threads) <= 1024, "__launch_bounds__ must be in [1, 1024]")
#define QK_SHARED(T, name, dims) __shared__ T name dims
#endif

namespace quantkernels {
namespace cuda {

template <typename T>
struct FloatIO;

template <>
struct FloatIO<float> {
  static __device__ __forceinline__ float load(const float* p) { return *p; }
  static __device__ __forceinline__ void store(float* p, float v) { *p = v; }
  // Rounds v to the type and back (exact for float).
  static __device__ __forceinline__ float round(float v) { return v; }
};

template <>
struct FloatIO<__half> {
  static __device__ __forceinline__ float load(const __half* p) { return __half2float(*p); }
  static __device__ __forceinline__ void store(__half* p, float v) { *p = __float2half_rn(v); }
  static __device__ __forceinline__ float round(float v) { return __half2float(__float2half_rn(v)); }
};

template <>
struct FloatIO<__nv_bfloat16> {
  static __device__ __forceinline__ float load(const __nv_bfloat16* p) { return __bfloat162float(*p); }
  static __device__ __forceinline__ void store(__nv_bfloat16* p, float v) { *p = __float2bfloat16_rn(v); }
  static __device__ __forceinline__ float round(float v) { return __bfloat162float(__float2bfloat16_rn(v)); }
};

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

// Calls f(T*) with the C++ type of `t` (a tag pointer, always null).
template <typename F>
__host__ __forceinline__ auto with_dtype(DType t, F&& f) {
  switch (t) {
    case DType::F16: return f(static_cast<__half*>(nullptr));
    case DType::BF16: return f(static_cast<__nv_bfloat16*>(nullptr));
    default: return f(static_cast<float*>(nullptr));
  }
}

// Shared-memory address and the cp.async pipeline (sm_80+), used by the tensor-core GEMMs.
__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}
// 16-byte async copy global -> shared; pred false copies nothing and zero-fills the 16 bytes.
__device__ __forceinline__ void cp_async_16(uint32_t dst, const void* src, bool pred) {
  const int src_size = pred ? 16 : 0;
#ifdef QK_CUDA_EMU
  ::qk_emu::cp_async_cg(dst, src, 16, src_size);
#else
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(src_size) : "memory");
#endif
}
__device__ __forceinline__ void cp_async_commit() {
#ifdef QK_CUDA_EMU
  ::qk_emu::cp_async_commit_group();
#else
  asm volatile("cp.async.commit_group;\n" ::: "memory");
#endif
}
template <int N>
__device__ __forceinline__ void cp_async_wait() {
#ifdef QK_CUDA_EMU
  ::qk_emu::cp_async_wait_group(N);
#else
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
#endif
}

__host__ __device__ __forceinline__ int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace cuda
}  // namespace quantkernels
