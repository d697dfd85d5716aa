// The CUDA emulator: what csrc/cuda/*.cu need from CUDA, as host C++ (issue 15).
//
// The kernel sources are compiled unchanged as C++ with QK_CUDA_EMU defined and
// csrc/cuda_emu/include/ first on the include path (its cuda_runtime.h, cuda_fp16.h, ... all
// include this file). Every thread of a block runs as a cooperative fiber (runtime.cpp); warp
// collectives (mma.sync, ldmatrix, shfl, ballot) complete when all lanes of the warp have
// arrived, __syncthreads when all threads of the block have. Semantics follow NVIDIA's PTX ISA
// and CUDA math API, not the kernels; tests/test_cuda_emu.py checks each primitive against a
// transcription of the ISA's formulas.
//
// Memory hazards: the kernel translation units are compiled with -fsanitize=thread,alignment
// but linked without the sanitizer runtimes: runtime.cpp defines the __tsan_* / __ubsan_* entry
// points the compiler inserts before every load and store, and checks each access (shared-memory
// races between warps, pending cp.async bytes, out-of-bounds and misaligned accesses).
//
// Launch bounds: a kernel's first statement, QK_LAUNCH_BOUNDS(B) (qk_common.cuh), repeats its
// __launch_bounds__(B); launch_bounds() below fails a launch whose block has more than B threads,
// and the runtime fails a kernel that does anything before stating B.
#pragma once

#ifndef QK_CUDA_EMU
#error "csrc/cuda_emu/qk_emu.h is only for the CUDA emulator build (QK_CUDA_EMU)"
#endif

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <type_traits>
#include <utility>

using std::isnan;

// ------------------------------------------------------------------ qualifiers

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
// Nothing here: the bound reaches the emulator through the kernel's first statement,
// QK_LAUNCH_BOUNDS(same text) (csrc/cuda/qk_common.cuh), which qk_emu::launch_bounds checks.
#define __launch_bounds__(...)
#define __align__(n) alignas(n)
// Kernel parameters are each thread's own copy here (LaunchCtx::body): nothing to mark.
#define __grid_constant__
// No __shared__: kernels declare static shared arrays with QK_SHARED (qk_common.cuh), which
// places them in the emulator's static shared window (checked and poisoned like dynamic smem).

// ------------------------------------------------------------------ vector and runtime types

struct uint3 {
  unsigned x, y, z;
};
struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct alignas(8) uint2 {
  uint32_t x, y;
};
struct alignas(16) uint4 {
  uint32_t x, y, z, w;
};

enum cudaError_t : int {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorLaunchOutOfResources = 701,
  cudaErrorLaunchFailure = 719,
};
struct CUstream_st;
using cudaStream_t = CUstream_st*;
enum cudaFuncAttribute : int { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };
enum cudaDeviceAttr : int { cudaDevAttrMultiProcessorCount = 16 };

// ------------------------------------------------------------------ half / bfloat16 (storage types)

struct __half {
  uint16_t x;
};
struct __nv_bfloat16 {
  uint16_t x;
};
struct alignas(4) __half2 {
  __half x, y;
};
struct alignas(4) __nv_bfloat162 {
  __nv_bfloat16 x, y;
};

namespace qk_emu {

// ---- the runtime (runtime.cpp; never instrumented)
uint3 thread_idx();
uint3 block_idx();
dim3 block_dim();
dim3 grid_dim();
uint8_t* dynamic_smem();
// The static shared array declared at `tag` (QK_SHARED), reserved on first use.
uint8_t* static_smem(const void* tag, size_t bytes, size_t align);
uint32_t cvta_shared(const void* p);
void cp_async_cg(uint32_t dst, const void* src, int cp_size, int src_size);
void cp_async_commit_group();
void cp_async_wait_group(int n);
void ldmatrix_x4(uint32_t (&r)[4], uint32_t addr);
void mma_m16n8k32_s8(int32_t (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1);
void mma_m16n8k16_f16(float (&c)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3, uint32_t b0, uint32_t b1);
void mma_m16n8k16_bf16(float (&c)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3, uint32_t b0, uint32_t b1);
uint32_t shfl_xor_b32(uint32_t mask, uint32_t v, int lane_mask);
uint32_t ballot(uint32_t mask, bool pred);
void syncthreads();
int syncthreads_or(int pred);
// QK_LAUNCH_BOUNDS(n), a kernel's first statement: fails the launch (cudaErrorLaunchOutOfResources,
// as a GPU does) when the block has more than n threads.
void launch_bounds(int max_threads);

// For the emulated bindings and tests.
const char* last_message();             // the last launch failure / hazard, with its kernel, block, warp, lane
void configure(int arch, int sm_count); // the emulated device: sm_80 or sm_90, and its SM count

cudaError_t func_set_attribute(const void* fn, int attr, int value);
cudaError_t get_last_error();
int device_attribute(int attr);
int current_device();
// Runs body(ctx) once per thread of every block (ctx: the launch's argument pack, readable by
// every thread like a kernel's parameter space).
cudaError_t run_kernel(const char* name, const char* where, const void* fn, dim3 grid, dim3 block, size_t smem,
                       void (*body)(void*), void* ctx, size_t ctx_size);

// ---- conversions (CUDA math API: round to nearest even, NaN stays NaN)
inline uint32_t f2u(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}
inline float u2f(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline float half_to_float(uint16_t h) {
  _Float16 v;
  std::memcpy(&v, &h, 2);
  return static_cast<float>(v);  // exact
}
inline uint16_t float_to_half_rn(float f) {
  const _Float16 v = static_cast<_Float16>(f);  // IEEE conversion, round to nearest even
  uint16_t h;
  std::memcpy(&h, &v, 2);
  return h;
}
inline float bf16_to_float(uint16_t h) { return u2f(static_cast<uint32_t>(h) << 16); }
inline uint16_t float_to_bf16_rn(float f) {
  const uint32_t u = f2u(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40u);  // quiet NaN
  return static_cast<uint16_t>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

// The argument pack of one launch: the kernel and its parameters converted to their types.
template <typename... P>
struct LaunchCtx {
  void (*fn)(P...);
  std::tuple<std::decay_t<P>...> args;
  static void body(void* p) {
    auto* c = static_cast<LaunchCtx*>(p);
    std::apply(c->fn, c->args);  // each thread gets its own copy of the parameters
  }
};

template <typename... P, typename... A>
cudaError_t launch(const char* name, const char* where, void (*fn)(P...), dim3 grid, dim3 block, size_t smem,
                   cudaStream_t, A&&... args) {
  static_assert(sizeof...(P) == sizeof...(A), "kernel argument count");
  LaunchCtx<P...> ctx{fn, std::tuple<std::decay_t<P>...>(static_cast<std::decay_t<P>>(args)...)};
  return run_kernel(name, where, reinterpret_cast<const void*>(fn), grid, block, smem, &LaunchCtx<P...>::body, &ctx,
                    sizeof(ctx));
}

}  // namespace qk_emu

#define threadIdx (::qk_emu::thread_idx())
#define blockIdx (::qk_emu::block_idx())
#define blockDim (::qk_emu::block_dim())
#define gridDim (::qk_emu::grid_dim())

inline float __half2float(__half h) { return qk_emu::half_to_float(h.x); }
inline __half __float2half_rn(float f) { return __half{qk_emu::float_to_half_rn(f)}; }
inline float __bfloat162float(__nv_bfloat16 h) { return qk_emu::bf16_to_float(h.x); }
inline __nv_bfloat16 __float2bfloat16_rn(float f) { return __nv_bfloat16{qk_emu::float_to_bf16_rn(f)}; }
inline __half2 __floats2half2_rn(float lo, float hi) { return __half2{__float2half_rn(lo), __float2half_rn(hi)}; }
inline __nv_bfloat162 __floats2bfloat162_rn(float lo, float hi) {
  return __nv_bfloat162{__float2bfloat16_rn(lo), __float2bfloat16_rn(hi)};
}

// IEEE single operations with one rounding each; the emulator is built with -ffp-contract=off,
// so no a * b + c is fused unless written as fmaf.
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __int2float_rn(int v) { return static_cast<float>(v); }  // the default mode: nearest even
inline int __float2int_rn(float f) {
  if (std::isnan(f)) return 0;  // cvt.rni.s32.f32: NaN -> 0, saturating
  if (f >= 2147483648.0f) return INT32_MAX;
  if (f <= -2147483648.0f) return INT32_MIN;
  return static_cast<int>(std::nearbyintf(f));
}
inline float __uint_as_float(uint32_t u) { return qk_emu::u2f(u); }
inline float __int_as_float(int i) { return qk_emu::u2f(static_cast<uint32_t>(i)); }
inline int __popc(unsigned v) { return __builtin_popcount(v); }
// prmt.b32 (default mode): byte i of the result is byte s[4i + 2 : 4i] of {y, x} (x = bytes 0-3).
inline unsigned __byte_perm(unsigned x, unsigned y, unsigned s) {
  const uint64_t v = (static_cast<uint64_t>(y) << 32) | x;
  unsigned r = 0;
  for (int i = 0; i < 4; ++i) r |= static_cast<unsigned>((v >> (8 * ((s >> (4 * i)) & 7u))) & 0xFFu) << (8 * i);
  return r;
}
// Per-byte a - b modulo 256.
inline unsigned __vsub4(unsigned a, unsigned b) {
  unsigned r = 0;
  for (int i = 0; i < 4; ++i) r |= (((a >> (8 * i)) - (b >> (8 * i))) & 0xFFu) << (8 * i);
  return r;
}
template <typename T>
inline T __ldg(const T* p) {
  return *p;
}
inline size_t __cvta_generic_to_shared(const void* p) { return qk_emu::cvta_shared(p); }

inline float __shfl_xor_sync(unsigned mask, float v, int lane_mask) {
  return qk_emu::u2f(qk_emu::shfl_xor_b32(mask, qk_emu::f2u(v), lane_mask));
}
inline int __shfl_xor_sync(unsigned mask, int v, int lane_mask) {
  return static_cast<int>(qk_emu::shfl_xor_b32(mask, static_cast<uint32_t>(v), lane_mask));
}
inline unsigned __ballot_sync(unsigned mask, int pred) { return qk_emu::ballot(mask, pred != 0); }
inline void __syncthreads() { qk_emu::syncthreads(); }
inline int __syncthreads_or(int pred) { return qk_emu::syncthreads_or(pred); }

inline cudaError_t cudaGetLastError() { return qk_emu::get_last_error(); }
template <typename F>
inline cudaError_t cudaFuncSetAttribute(F* fn, cudaFuncAttribute attr, int value) {
  return qk_emu::func_set_attribute(reinterpret_cast<const void*>(fn), attr, value);
}
inline cudaError_t cudaGetDevice(int* dev) {
  *dev = qk_emu::current_device();
  return cudaSuccess;
}
inline cudaError_t cudaDeviceGetAttribute(int* v, cudaDeviceAttr attr, int) {
  *v = qk_emu::device_attribute(attr);
  return cudaSuccess;
}
inline cudaError_t cudaMemsetAsync(void* p, int v, size_t n, cudaStream_t) {
  std::memset(p, v, n);
  return cudaSuccess;
}
