// Probe kernels for tests/test_cuda_emu.py: each runs one emulated primitive (or one deliberate
// hazard) through the same launch path and wrappers as csrc/cuda/, so that the tests can check
// the primitive against a transcription of the PTX ISA's definition, and that each hazard check
// fires. Registered as quantkernels_cuda_emu::probe_* (schemas in quantkernels/cuda_emu.py).
// Every kernel here states its launch bounds like csrc/cuda/'s, except the two launch-bounds
// probes that break the rule on purpose (probe_late_bounds_kernel, probe_unbounded_kernel).
#include <ATen/ATen.h>
#include <torch/library.h>

#include "cuda/qk_common.cuh"

namespace quantkernels {
namespace cuda {
namespace {

// ---- primitives: in [32, n_in] uint32 per lane -> out [32, 4] uint32 per lane

// mma.m16n8k32 s8: in = a0..a3, b0, b1, c0..c3.
__global__ void __launch_bounds__(32) probe_mma_s8_kernel(const int32_t* in, int32_t* out) {
  QK_LAUNCH_BOUNDS(32);
  const int l = threadIdx.x;
  const int32_t* p = in + l * 10;
  const uint32_t a[4] = {uint32_t(p[0]), uint32_t(p[1]), uint32_t(p[2]), uint32_t(p[3])};
  int32_t c[4] = {p[6], p[7], p[8], p[9]};
  ::qk_emu::mma_m16n8k32_s8(c, a, uint32_t(p[4]), uint32_t(p[5]));
  for (int i = 0; i < 4; ++i) out[l * 4 + i] = c[i];
}

// mma.m16n8k16 f16 / bf16 (bf != 0): in = a0..a3, b0, b1, c0..c3 (fp32 bits).
__global__ void __launch_bounds__(32) probe_mma_half_kernel(const int32_t* in, int32_t* out, int bf) {
  QK_LAUNCH_BOUNDS(32);
  const int l = threadIdx.x;
  const int32_t* p = in + l * 10;
  float c[4];
  for (int i = 0; i < 4; ++i) c[i] = __int_as_float(p[6 + i]);
  if (bf)
    ::qk_emu::mma_m16n8k16_bf16(c, p[0], p[1], p[2], p[3], p[4], p[5]);
  else
    ::qk_emu::mma_m16n8k16_f16(c, p[0], p[1], p[2], p[3], p[4], p[5]);
  for (int i = 0; i < 4; ++i) std::memcpy(&out[l * 4 + i], &c[i], 4);
}

// ldmatrix.x4: smem (512 bytes) holds `tile`; lane l gives row address rows[l] (byte offset).
__global__ void __launch_bounds__(32) probe_ldmatrix_kernel(const uint8_t* tile, const int32_t* rows, int32_t* out) {
  QK_LAUNCH_BOUNDS(32);
  QK_DYNAMIC_SMEM(smem);
  const int l = threadIdx.x;
  for (int i = 0; i < 16; ++i) smem[l * 16 + i] = tile[l * 16 + i];
  __syncthreads();
  uint32_t r[4];
  ::qk_emu::ldmatrix_x4(r, smem_addr(smem + rows[l]));
  for (int i = 0; i < 4; ++i) out[l * 4 + i] = static_cast<int32_t>(r[i]);
}

// __shfl_xor_sync / __ballot_sync: out[l] = {shfl_xor(v[l], lane_mask), ballot(v[l] & 1)}.
__global__ void __launch_bounds__(32) probe_warp_kernel(const int32_t* v, int lane_mask, int32_t* out) {
  QK_LAUNCH_BOUNDS(32);
  const int l = threadIdx.x;
  out[l * 2] = __shfl_xor_sync(0xffffffffu, v[l], lane_mask);
  out[l * 2 + 1] = static_cast<int32_t>(__ballot_sync(0xffffffffu, v[l] & 1));
}

// cp.async: thread 0 copies 32 bytes (two 16-byte chunks, the second with src-size = zfill ? 0
// : 16) in two commit groups; after wait_group(1) only the first has landed, after (0) both.
// mode 0: read chunk 0 after wait_group(1), both after wait_group(0) (legal);
// mode 1: read chunk 1 after wait_group(1) (its copy is pending: a hazard).
__global__ void __launch_bounds__(32) probe_cp_async_kernel(const uint8_t* src, int zfill, int mode, uint8_t* out) {
  QK_LAUNCH_BOUNDS(32);
  QK_DYNAMIC_SMEM(smem);
  cp_async_16(smem_addr(smem), src, true);
  cp_async_commit();
  cp_async_16(smem_addr(smem + 16), src + 16, zfill == 0);
  cp_async_commit();
  cp_async_wait<1>();
  if (mode == 1) out[32] = smem[16];
  for (int i = 0; i < 16; ++i) out[i] = smem[i];
  cp_async_wait<0>();
  for (int i = 16; i < 32; ++i) out[i] = smem[i];
}

// ---- deliberate hazards (kind):
// 0 none; 1 two warps write one shared word with no barrier; 2 a warp reads a word another warp
// wrote, no barrier; 3 global load one element past the end; 4 misaligned 16-byte shared load;
// 5 lane 31 exits before a __shfl_xor_sync; 6 warp 1 exits before a __syncthreads;
// 7 __ballot_sync with a mask that excludes the calling lane; 8 exits with cp.async pending.
__global__ void __launch_bounds__(1024) probe_hazard_kernel(int kind, const float* g, int64_t n, float* out) {
  QK_LAUNCH_BOUNDS(1024);
  QK_DYNAMIC_SMEM(smem);
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  float* s = reinterpret_cast<float*>(smem);
  s[tid] = 1.0f;
  __syncthreads();
  float v = 0.0f;
  switch (kind) {
    case 1:
      if (lane == 0) s[0] = static_cast<float>(warp);
      break;
    case 2:
      if (warp == 0 && lane == 0) s[100] = 2.0f;
      if (warp == 1 && lane == 0) v = s[100];
      break;
    case 3:
      v = g[tid == 0 ? n : 0];
      break;
    case 4: {
      const uint4 q = *reinterpret_cast<const uint4*>(smem + 4 + 16 * lane);
      v = static_cast<float>(q.x & 1u);
      break;
    }
    case 5:
      if (lane == 31) return;
      v = __shfl_xor_sync(0xffffffffu, 1.0f, 1);
      break;
    case 6:
      if (warp == 1) return;
      __syncthreads();
      break;
    case 7:
      v = static_cast<float>(__ballot_sync(0x0000ffffu, 1));
      break;
    case 8:
      if (tid == 0) {
        cp_async_16(smem_addr(smem + 512), g, true);
        cp_async_commit();
      }
      break;
    default: break;
  }
  out[tid] = v + s[tid];
}

// ---- launch bounds: a bound that depends on a template argument (like imma_gemm_kernel's), and
// two kernels that break the rule that QK_LAUNCH_BOUNDS is the first statement.
template <int kBound>
__global__ void __launch_bounds__(kBound / 2 * 2) probe_bounds_kernel(int32_t* out) {
  QK_LAUNCH_BOUNDS(kBound / 2 * 2);
  const int tid = threadIdx.x + threadIdx.y * blockDim.x;
  out[tid] = tid;
}
// Reads threadIdx before stating its bound.
__global__ void __launch_bounds__(128) probe_late_bounds_kernel(int32_t* out) {
  const int tid = threadIdx.x + threadIdx.y * blockDim.x;
  QK_LAUNCH_BOUNDS(128);
  out[tid] = tid;
}
// States no bound at all (and does nothing).
__global__ void probe_unbounded_kernel(int32_t*) {}

// ---- scalar intrinsics (host code: they are plain functions in the emulator)

// [N] float -> int32 [N, 3]: __float2half_rn bits, __float2bfloat16_rn bits, __float2int_rn.
at::Tensor probe_convert(const at::Tensor& x_in) {
  const at::Tensor x = x_in.contiguous();
  at::Tensor out = at::empty({x.numel(), 3}, x.options().dtype(at::kInt));
  const float* xp = x.data_ptr<float>();
  int32_t* o = out.data_ptr<int32_t>();
  for (int64_t i = 0; i < x.numel(); ++i) {
    o[3 * i] = __float2half_rn(xp[i]).x;
    o[3 * i + 1] = __float2bfloat16_rn(xp[i]).x;
    o[3 * i + 2] = __float2int_rn(xp[i]);
  }
  return out;
}

// int32 [N] x3 -> int32 [N, 2]: __byte_perm(u, v, s), __vsub4(u, v).
at::Tensor probe_bytes(const at::Tensor& u_in, const at::Tensor& v_in, const at::Tensor& s_in) {
  const at::Tensor u = u_in.contiguous(), v = v_in.contiguous(), s = s_in.contiguous();
  at::Tensor out = at::empty({u.numel(), 2}, u.options());
  int32_t* o = out.data_ptr<int32_t>();
  for (int64_t i = 0; i < u.numel(); ++i) {
    const unsigned a = u.data_ptr<int32_t>()[i], b = v.data_ptr<int32_t>()[i], sel = s.data_ptr<int32_t>()[i];
    o[2 * i] = static_cast<int32_t>(__byte_perm(a, b, sel));
    o[2 * i + 1] = static_cast<int32_t>(__vsub4(a, b));
  }
  return out;
}

// fp32 [N] x3 -> [N, 2]: __fadd_rn(__fmul_rn(a, b), c) (two roundings), __fdiv_rn(a, b).
at::Tensor probe_rn(const at::Tensor& a_in, const at::Tensor& b_in, const at::Tensor& c_in) {
  const at::Tensor a = a_in.contiguous(), b = b_in.contiguous(), c = c_in.contiguous();
  at::Tensor out = at::empty({a.numel(), 2}, a.options());
  float* o = out.data_ptr<float>();
  for (int64_t i = 0; i < a.numel(); ++i) {
    const float x = a.data_ptr<float>()[i], y = b.data_ptr<float>()[i], z = c.data_ptr<float>()[i];
    o[2 * i] = __fadd_rn(__fmul_rn(x, y), z);
    o[2 * i + 1] = __fdiv_rn(x, y);
  }
  return out;
}

template <typename F, typename... A>
void run(F kernel, dim3 grid, dim3 block, size_t smem, A... args) {
  QK_LAUNCH(kernel, grid, block, smem, nullptr, args...);
  TORCH_CHECK(cudaGetLastError() == cudaSuccess, ::qk_emu::last_message());
}

at::Tensor probe_mma(const at::Tensor& in, int64_t kind) {  // kind 0 s8, 1 f16, 2 bf16
  TORCH_CHECK_VALUE(in.scalar_type() == at::kInt && in.sizes() == at::IntArrayRef({32, 10}),
                    "probe_mma: in must be int32 [32, 10]");
  const at::Tensor x = in.contiguous();
  at::Tensor out = at::empty({32, 4}, x.options());
  if (kind == 0)
    run(probe_mma_s8_kernel, 1, 32, 0, x.data_ptr<int32_t>(), out.data_ptr<int32_t>());
  else
    run(probe_mma_half_kernel, 1, 32, 0, x.data_ptr<int32_t>(), out.data_ptr<int32_t>(), static_cast<int>(kind == 2));
  return out;
}

at::Tensor probe_ldmatrix(const at::Tensor& tile, const at::Tensor& rows) {
  TORCH_CHECK_VALUE(tile.scalar_type() == at::kByte && tile.numel() == 512, "probe_ldmatrix: tile must be 512 uint8");
  TORCH_CHECK_VALUE(rows.scalar_type() == at::kInt && rows.numel() == 32, "probe_ldmatrix: rows must be 32 int32");
  const at::Tensor t = tile.contiguous(), r = rows.contiguous();
  at::Tensor out = at::empty({32, 4}, r.options());
  run(probe_ldmatrix_kernel, 1, 32, 512, t.data_ptr<uint8_t>(), r.data_ptr<int32_t>(), out.data_ptr<int32_t>());
  return out;
}

at::Tensor probe_warp(const at::Tensor& v, int64_t lane_mask) {
  TORCH_CHECK_VALUE(v.scalar_type() == at::kInt && v.numel() == 32, "probe_warp: v must be 32 int32");
  const at::Tensor x = v.contiguous();
  at::Tensor out = at::empty({32, 2}, x.options());
  run(probe_warp_kernel, 1, 32, 0, x.data_ptr<int32_t>(), static_cast<int>(lane_mask), out.data_ptr<int32_t>());
  return out;
}

at::Tensor probe_cp_async(const at::Tensor& src, int64_t zfill, int64_t mode) {
  TORCH_CHECK_VALUE(src.scalar_type() == at::kByte && src.numel() == 32 && src.data_ptr<uint8_t>() != nullptr &&
                        reinterpret_cast<uintptr_t>(src.data_ptr()) % 16 == 0,
                    "probe_cp_async: src must be 32 16-byte aligned uint8");
  at::Tensor out = at::zeros({33}, src.options());
  run(probe_cp_async_kernel, 1, 32, 64, src.data_ptr<uint8_t>(), static_cast<int>(zfill), static_cast<int>(mode),
      out.data_ptr<uint8_t>());
  return out;
}

// Launch configuration probes: threads, grid_y and dynamic smem as given (kind 0 body).
at::Tensor probe_hazard(const at::Tensor& g_in, int64_t kind, int64_t threads, int64_t grid_y, int64_t smem,
                        bool optin) {
  TORCH_CHECK_VALUE(g_in.scalar_type() == at::kFloat && g_in.numel() == 64, "probe_hazard: g must be 64 float32");
  const at::Tensor g = g_in.contiguous();
  at::Tensor out = at::zeros({threads * grid_y}, at::kFloat);
  const auto kernel = probe_hazard_kernel;
  if (optin) {
    cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
    TORCH_CHECK(cudaGetLastError() == cudaSuccess, ::qk_emu::last_message());
  }
  run(kernel, dim3(1, static_cast<unsigned>(grid_y)), dim3(static_cast<unsigned>(threads)), static_cast<size_t>(smem),
      static_cast<int>(kind), g.data_ptr<float>(), int64_t(64), out.data_ptr<float>());
  return out;
}

// kind 0: probe_bounds_kernel<128> (__launch_bounds__(128)) on a (bx, by) block, out[t] = t;
// 1: probe_late_bounds_kernel; 2: probe_unbounded_kernel. A failed launch raises "cudaError <code>: <message>".
at::Tensor probe_bounds(int64_t bx, int64_t by, int64_t kind) {
  TORCH_CHECK_VALUE(bx >= 1 && by >= 1 && bx * by <= 4096, "probe_bounds: bx, by >= 1 and bx * by <= 4096, got bx=",
                    bx, ", by=", by);
  at::Tensor out = at::full({bx * by}, -1, at::kInt);
  const dim3 block(static_cast<unsigned>(bx), static_cast<unsigned>(by));
  int32_t* o = out.data_ptr<int32_t>();
  if (kind == 0)
    QK_LAUNCH(probe_bounds_kernel<128>, 1, block, 0, nullptr, o);
  else if (kind == 1)
    QK_LAUNCH(probe_late_bounds_kernel, 1, block, 0, nullptr, o);
  else
    QK_LAUNCH(probe_unbounded_kernel, 1, block, 0, nullptr, o);
  const cudaError_t err = cudaGetLastError();
  TORCH_CHECK(err == cudaSuccess, "cudaError ", static_cast<int>(err), ": ", ::qk_emu::last_message());
  return out;
}

}  // namespace
}  // namespace cuda
}  // namespace quantkernels

TORCH_LIBRARY_IMPL(quantkernels_cuda_emu, CPU, m) {
  m.impl("probe_mma", &quantkernels::cuda::probe_mma);
  m.impl("probe_ldmatrix", &quantkernels::cuda::probe_ldmatrix);
  m.impl("probe_warp", &quantkernels::cuda::probe_warp);
  m.impl("probe_cp_async", &quantkernels::cuda::probe_cp_async);
  m.impl("probe_hazard", &quantkernels::cuda::probe_hazard);
  m.impl("probe_convert", &quantkernels::cuda::probe_convert);
  m.impl("probe_bytes", &quantkernels::cuda::probe_bytes);
  m.impl("probe_rn", &quantkernels::cuda::probe_rn);
}

// No tensor argument to dispatch on: registered for every backend.
TORCH_LIBRARY_IMPL(quantkernels_cuda_emu, CompositeExplicitAutograd, m) {
  m.impl("probe_bounds", &quantkernels::cuda::probe_bounds);
}
