// The CUDA emulator's runtime (see qk_emu.h): fibers, warp collectives, barriers, cp.async
// groups, the PTX instructions the kernels use, and the memory hazard checks. Compiled WITHOUT
// sanitizer instrumentation: it defines the __tsan_* / __ubsan_* hooks that the instrumented
// kernel translation units call before each memory access.
#include <dlfcn.h>
#include <ucontext.h>

#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>

#include <algorithm>
#include <cinttypes>
#include <cstdarg>
#include <cstdio>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "qk_emu.h"

namespace qk_emu {

// ------------------------------------------------------------------ device model

struct Device {
  int id = 0;           // each distinct (arch, sm_count) is a device of its own (host code caches per device)
  int arch = 80;        // sm_80 (A100) or sm_90 (H100)
  int sm_count = 108;
  size_t smem_optin() const { return arch >= 90 ? 232448 : 166912; }  // 227 KB / 163 KB per block
};
Device g_dev;
constexpr size_t kSmemDefault = 48 * 1024;  // above it a kernel must opt in (cudaFuncSetAttribute)
constexpr size_t kArenaCap = 232448;

// ------------------------------------------------------------------ global allocations

// Every CPU tensor allocation while the emulator is loaded: a kernel's global accesses must fall
// inside one of them (out-of-bounds check).
std::mutex g_alloc_mu;
std::map<uintptr_t, size_t> g_allocs;

struct TrackingAllocator final : c10::Allocator {
  c10::Allocator* base = nullptr;
  struct Ctx {
    c10::DataPtr inner;
  };
  static void del(void* p) {
    auto* c = static_cast<Ctx*>(p);
    {
      std::lock_guard<std::mutex> lk(g_alloc_mu);
      g_allocs.erase(reinterpret_cast<uintptr_t>(c->inner.get()));
    }
    delete c;
  }
  c10::DataPtr allocate(size_t n) override {
    c10::DataPtr dp = base->allocate(n);
    void* p = dp.get();
    if (p == nullptr) return dp;
    {
      std::lock_guard<std::mutex> lk(g_alloc_mu);
      g_allocs[reinterpret_cast<uintptr_t>(p)] = n;
    }
    return {p, new Ctx{std::move(dp)}, &del, dp.device()};
  }
  void copy_data(void* dest, const void* src, std::size_t count) const override { std::memcpy(dest, src, count); }
};
TrackingAllocator g_tracking;

// Installed while tracking is on (quantkernels.cuda_emu turns it on at load): tensors allocated
// while it is off are unknown to the out-of-bounds check.
void track_allocations(bool on) {
  if (g_tracking.base == nullptr) g_tracking.base = c10::GetCPUAllocator();
  c10::SetCPUAllocator(on ? static_cast<c10::Allocator*>(&g_tracking) : g_tracking.base, /*priority=*/200);
}

// ------------------------------------------------------------------ launch state

enum class St { Run, Coll, Bar, Done };
enum class Coll { None, Ldmatrix, MmaS8, MmaF16, MmaBF16, Shfl, Ballot };
const char* coll_name(Coll c) {
  switch (c) {
    case Coll::Ldmatrix: return "ldmatrix.x4";
    case Coll::MmaS8: return "mma.sync.m16n8k32.s8";
    case Coll::MmaF16: return "mma.sync.m16n8k16.f16";
    case Coll::MmaBF16: return "mma.sync.m16n8k16.bf16";
    case Coll::Shfl: return "__shfl_xor_sync";
    case Coll::Ballot: return "__ballot_sync";
    default: return "none";
  }
}

struct Copy {
  uint32_t dst;
  const uint8_t* src;
  int src_size;
};

struct Thread {
  int tid = 0, warp = 0, lane = 0;
  uint3 idx{};
  St st = St::Run;
  ucontext_t ctx{};
  uint8_t* stack = nullptr;
  std::vector<std::vector<Copy>> groups;  // committed, oldest first
  std::vector<Copy> open;                 // issued, not yet committed
  int bar_pred = 0, bar_result = 0;
  bool bounded = false;  // ran QK_LAUNCH_BOUNDS
};

struct Warp {
  Coll kind = Coll::None;
  uint32_t mask = 0, arrived = 0, lanes = 0;  // lanes: the threads this warp has
  uint32_t in[32][10];
  uint32_t out[32][4];
};

struct ByteState {
  uint32_t w_epoch, r_epoch, r_mask;
  int16_t w_warp;
  uint16_t pending;  // 1 + tid of the issuing thread, 0 when none
};

constexpr size_t kStack = 256 * 1024;

struct Launch {
  const char* name = "";
  const char* where = "";
  dim3 grid, block;
  size_t smem = 0;
  uint3 bidx{};
  void (*body)(void*) = nullptr;
  void* ctx = nullptr;
  uintptr_t ctx_lo = 0, ctx_hi = 0;
  std::vector<Thread> threads;
  std::vector<Warp> warps;
  std::string error;
  cudaError_t code = cudaSuccess;  // the error a hazard reports (default: cudaErrorLaunchFailure)
  int bound = 0;                   // the kernel's QK_LAUNCH_BOUNDS, once stated
} g;

std::vector<std::unique_ptr<uint8_t[]>> g_stacks;
ucontext_t g_sched;
Thread* g_cur = nullptr;  // the running thread (null: host code)
uint32_t g_epoch = 1;     // barrier interval; never reused, so stale byte states never conflict
cudaError_t g_last = cudaSuccess;
std::string g_message;
std::map<const void*, int> g_optin;  // cudaFuncAttributeMaxDynamicSharedMemorySize per kernel

alignas(128) uint8_t g_arena[kArenaCap];
std::vector<ByteState> g_arena_st(kArenaCap);
// Static shared arrays (QK_SHARED): each declaration reserves its bytes once; all of them share
// this window, as if every kernel's static arrays were one block's.
constexpr size_t kStaticCap = 256 * 1024;
alignas(128) uint8_t g_static[kStaticCap];
std::vector<ByteState> g_static_st(kStaticCap);
size_t g_static_used = 0;
const uintptr_t g_static_lo = reinterpret_cast<uintptr_t>(g_static);
const uintptr_t g_static_hi = g_static_lo + kStaticCap;
constexpr uint32_t kStaticBase = 0x01000000u;  // shared-window offset of the static section

std::string fmt(const char* f, ...) {
  char buf[1024];
  va_list ap;
  va_start(ap, f);
  vsnprintf(buf, sizeof buf, f, ap);
  va_end(ap);
  return buf;
}

std::string where_str() {
  std::string s = fmt("\n  kernel: %s\n  launched by: %s\n  grid (%u, %u, %u), block (%u, %u, %u), dynamic smem %zu bytes",
                      g.name, g.where, g.grid.x, g.grid.y, g.grid.z, g.block.x, g.block.y, g.block.z, g.smem);
  s += fmt("\n  at block (%u, %u, %u)", g.bidx.x, g.bidx.y, g.bidx.z);
  if (g_cur != nullptr) s += fmt(", warp %d, lane %d (thread %d)", g_cur->warp, g_cur->lane, g_cur->tid);
  return s;
}

// Records the first hazard of the launch and, from a thread, abandons it (never returns there).
void hazard(const std::string& what) {
  if (g.error.empty()) g.error = "quantkernels CUDA emulator: " + what + where_str();
  if (g_cur != nullptr) {
    Thread* t = g_cur;
    t->st = St::Done;
    swapcontext(&t->ctx, &g_sched);
    std::abort();  // an abandoned thread is never resumed
  }
}

void yield_to_scheduler() { swapcontext(&g_cur->ctx, &g_sched); }

// ------------------------------------------------------------------ launch bounds

// Every kernel states its __launch_bounds__ as its first statement (QK_LAUNCH_BOUNDS, qk_common.cuh):
// a thread that does anything else first (thread / block index, memory, a barrier or collective,
// returning) fails the launch, so no kernel runs unchecked.
void unbounded(const char* what) {
  hazard(fmt("the kernel %s before QK_LAUNCH_BOUNDS(...): every __global__ kernel's first statement must state "
             "its __launch_bounds__ (csrc/cuda/qk_common.cuh)",
             what));
}
inline void need_bounds(const char* what) {
  if (g_cur != nullptr && !g_cur->bounded) unbounded(what);
}

void launch_bounds(int max_threads) {
  Thread* t = g_cur;
  if (t == nullptr) return;  // host code
  if (max_threads < 1 || max_threads > 1024)
    hazard(fmt("QK_LAUNCH_BOUNDS(%d): __launch_bounds__ must be in [1, 1024]", max_threads));
  if (g.bound != 0 && g.bound != max_threads)
    hazard(fmt("QK_LAUNCH_BOUNDS(%d) after QK_LAUNCH_BOUNDS(%d) in the same launch", max_threads, g.bound));
  g.bound = max_threads;
  const uint64_t nt = uint64_t(g.block.x) * g.block.y * g.block.z;
  if (nt > static_cast<uint64_t>(max_threads)) {
    g.code = cudaErrorLaunchOutOfResources;
    hazard(fmt("block (%u, %u, %u) of %llu threads exceeds the kernel's __launch_bounds__(%d): a GPU refuses this "
               "launch (cudaErrorLaunchOutOfResources, \"too many resources requested for launch\")",
               g.block.x, g.block.y, g.block.z, static_cast<unsigned long long>(nt), max_threads));
  }
  t->bounded = true;
}

// ------------------------------------------------------------------ shared memory

enum class Region { None, Dyn, Static };

// Checks one access of n bytes at shared byte states st[off, off + n) by the running thread's warp.
void shared_bytes(ByteState* st, const char* region, size_t off, size_t n, bool write, bool async_issue = false) {
  const int warp = g_cur->warp;
  const uint32_t bit = 1u << (warp & 31);
  for (size_t i = 0; i < n; ++i) {
    ByteState& b = st[off + i];
    if (b.pending != 0) {
      hazard(fmt("%s %s byte %s+%zu while a cp.async of thread %d to it is still pending (no cp.async.wait_group "
                 "covers it yet)",
                 async_issue ? "cp.async targets" : (write ? "writes" : "reads"), "shared", region, off + i,
                 b.pending - 1));
    }
    if (b.w_epoch == g_epoch && b.w_warp != warp)
      hazard(fmt("shared-memory race: warp %d %s %s+%zu, written by warp %d with no __syncthreads in between", warp,
                 write ? "writes" : "reads", region, off + i, b.w_warp));
    if (write) {
      if (b.r_epoch == g_epoch && (b.r_mask & ~bit) != 0)
        hazard(fmt("shared-memory race: warp %d writes %s+%zu, read by warp(s) mask 0x%x with no __syncthreads in "
                   "between",
                   warp, region, off + i, b.r_mask & ~bit));
      b.w_epoch = g_epoch;
      b.w_warp = static_cast<int16_t>(warp);
    } else {
      if (b.r_epoch != g_epoch) {
        b.r_epoch = g_epoch;
        b.r_mask = 0;
      }
      b.r_mask |= bit;
    }
  }
}

// Shared-window address (cvta) -> (region, offset) with a bounds check of n bytes.
ByteState* resolve_shared(uint32_t addr, size_t n, const char* what, uint8_t** host, const char** region,
                          size_t* off) {
  if (addr >= kStaticBase) {
    const size_t o = addr - kStaticBase, cap = g_static_used;
    if (o + n > cap) hazard(fmt("%s: out-of-bounds static shared access at static+%zu (%zu bytes; %zu declared)", what, o, n, cap));
    *host = reinterpret_cast<uint8_t*>(g_static_lo) + o;
    *region = "static";
    *off = o;
    return g_static_st.data();
  }
  if (addr + n > g.smem)
    hazard(fmt("%s: out-of-bounds shared access at dynamic+%u (%zu bytes; the launch has %zu bytes of dynamic shared "
               "memory)",
               what, addr, n, g.smem));
  *host = g_arena + addr;
  *region = "dynamic";
  *off = addr;
  return g_arena_st.data();
}

// ------------------------------------------------------------------ the access hook

struct Range {
  uintptr_t lo = 0, hi = 0;
};
Range g_last_alloc;

bool in_allocation(uintptr_t a, size_t n) {
  if (a >= g_last_alloc.lo && a + n <= g_last_alloc.hi) return true;
  std::lock_guard<std::mutex> lk(g_alloc_mu);
  auto it = g_allocs.upper_bound(a);
  if (it == g_allocs.begin()) return false;
  --it;
  if (a + n <= it->first + it->second) {
    g_last_alloc = {it->first, it->first + it->second};
    return true;
  }
  return false;
}

void on_access(const void* p, size_t n, bool write, size_t align) {
  Thread* t = g_cur;
  if (t == nullptr) return;  // host code
  const uintptr_t a = reinterpret_cast<uintptr_t>(p);
  const uintptr_t s0 = reinterpret_cast<uintptr_t>(t->stack);
  if (a >= s0 && a < s0 + kStack) return;  // the thread's own registers / local memory
  if (!t->bounded && !(a >= g.ctx_lo && a + n <= g.ctx_hi)) unbounded(write ? "stores to memory" : "loads memory");
  if (align > 1 && a % align != 0)
    hazard(fmt("misaligned %zu-byte %s at %p", n, write ? "store" : "load", p));
  const uintptr_t d0 = reinterpret_cast<uintptr_t>(g_arena);
  if (a >= d0 && a < d0 + kArenaCap) {
    const size_t off = a - d0;
    if (off + n > g.smem)
      hazard(fmt("out-of-bounds shared %s at dynamic+%zu (%zu bytes; the launch has %zu bytes of dynamic shared memory)",
                 write ? "store" : "load", off, n, g.smem));
    shared_bytes(g_arena_st.data(), "dynamic", off, n, write);
    return;
  }
  if (a >= g_static_lo && a < g_static_hi) {
    if (a + n > g_static_lo + g_static_used) hazard(fmt("out-of-bounds static shared access at %p", p));
    shared_bytes(g_static_st.data(), "static", a - g_static_lo, n, write);
    return;
  }
  if (a >= g.ctx_lo && a + n <= g.ctx_hi) {
    if (write) hazard("a store to the kernel parameter space");
    return;
  }
  if (!in_allocation(a, n))
    hazard(fmt("out-of-bounds global %s of %zu bytes at %p (inside no live tensor allocation)",
               write ? "store" : "load", n, p));
}

// ------------------------------------------------------------------ threads, warps, barriers

uint3 thread_idx() {
  need_bounds("reads threadIdx");
  return g_cur->idx;
}
uint3 block_idx() {
  need_bounds("reads blockIdx");
  return g.bidx;
}
dim3 block_dim() {
  need_bounds("reads blockDim");
  return g.block;
}
dim3 grid_dim() {
  need_bounds("reads gridDim");
  return g.grid;
}
uint8_t* dynamic_smem() {
  need_bounds("declares dynamic shared memory");
  return g_arena;
}
std::map<const void*, size_t> g_static_off;
uint8_t* static_smem(const void* tag, size_t bytes, size_t align) {
  need_bounds("declares a static shared array");
  auto it = g_static_off.find(tag);
  if (it == g_static_off.end()) {
    const size_t off = (g_static_used + align - 1) / align * align;
    if (off + bytes > kStaticCap) hazard(fmt("static shared arrays exceed the emulator's %zu-byte window", kStaticCap));
    g_static_used = off + bytes;
    it = g_static_off.emplace(tag, off).first;
  }
  return g_static + it->second;
}

uint32_t cvta_shared(const void* p) {
  const uintptr_t a = reinterpret_cast<uintptr_t>(p);
  const uintptr_t d0 = reinterpret_cast<uintptr_t>(g_arena);
  if (a >= d0 && a < d0 + kArenaCap) return static_cast<uint32_t>(a - d0);
  if (a >= g_static_lo && a < g_static_hi) return kStaticBase + static_cast<uint32_t>(a - g_static_lo);
  hazard(fmt("cvta.to.shared of %p, which is not a shared-memory address", p));
  return 0;
}

void compute(Warp& w);

// Arrives at a warp collective with this lane's inputs; returns when the collective completed.
void arrive(Coll kind, uint32_t mask, const uint32_t* in, int nin) {
  need_bounds("executes a warp collective");
  Thread* t = g_cur;
  Warp& w = g.warps[t->warp];
  if (((mask >> t->lane) & 1u) == 0)
    hazard(fmt("%s executed by lane %d with member mask 0x%08x, which excludes it", coll_name(kind), t->lane, mask));
  if ((mask & ~w.lanes) != 0)
    hazard(fmt("%s member mask 0x%08x names lanes this warp does not have (0x%08x)", coll_name(kind), mask, w.lanes));
  if (w.kind == Coll::None) {
    w.kind = kind;
    w.mask = mask;
    w.arrived = 0;
  } else if (w.kind != kind || w.mask != mask) {
    hazard(fmt("lanes of one warp reached different collectives: %s (mask 0x%08x) here, %s (mask 0x%08x) on lanes 0x%08x",
               coll_name(kind), mask, coll_name(w.kind), w.mask, w.arrived));
  }
  std::memcpy(w.in[t->lane], in, nin * 4);
  w.arrived |= 1u << t->lane;
  if (w.arrived == w.mask) {
    compute(w);
    for (int l = 0; l < 32; ++l)
      if ((w.mask >> l) & 1u) g.threads[t->warp * 32 + l].st = St::Run;
    w.kind = Coll::None;
    return;
  }
  t->st = St::Coll;
  yield_to_scheduler();
}

int barrier(int pred) {
  need_bounds("reaches __syncthreads");
  g_cur->bar_pred = pred;
  g_cur->st = St::Bar;
  yield_to_scheduler();
  return g_cur->bar_result;
}
void syncthreads() { barrier(0); }
int syncthreads_or(int pred) { return barrier(pred != 0); }

// ------------------------------------------------------------------ cp.async

void cp_async_cg(uint32_t dst, const void* src, int cp_size, int src_size) {
  need_bounds("issues cp.async");
  if (cp_size != 16) hazard(fmt("cp.async.cg with cp-size %d (only 16 is valid)", cp_size));
  if (src_size < 0 || src_size > cp_size) hazard(fmt("cp.async src-size %d outside [0, %d]", src_size, cp_size));
  if (dst % 16 != 0) hazard(fmt("misaligned cp.async: shared destination offset %u is not 16-byte aligned", dst));
  if (src_size > 0) {
    if (reinterpret_cast<uintptr_t>(src) % 16 != 0)
      hazard(fmt("misaligned cp.async: global source %p is not 16-byte aligned", src));
    if (!in_allocation(reinterpret_cast<uintptr_t>(src), src_size))
      hazard(fmt("out-of-bounds cp.async source: %d bytes at %p (inside no live tensor allocation)", src_size, src));
  }
  uint8_t* host;
  const char* region;
  size_t off;
  ByteState* st = resolve_shared(dst, 16, "cp.async", &host, &region, &off);
  shared_bytes(st, region, off, 16, true, true);
  for (int i = 0; i < 16; ++i) st[off + i].pending = static_cast<uint16_t>(g_cur->tid + 1);
  g_cur->open.push_back({dst, static_cast<const uint8_t*>(src), src_size});
}

void cp_async_commit_group() {
  g_cur->groups.push_back(std::move(g_cur->open));
  g_cur->open.clear();
}

// The copies of the oldest committed groups land (data written, zero-filled past src-size) until
// at most n groups are pending: copies become visible only here.
void cp_async_wait_group(int n) {
  Thread* t = g_cur;
  while (static_cast<int>(t->groups.size()) > n) {
    for (const Copy& c : t->groups.front()) {
      uint8_t* host;
      const char* region;
      size_t off;
      ByteState* st = resolve_shared(c.dst, 16, "cp.async", &host, &region, &off);
      if (c.src_size > 0) std::memcpy(host, c.src, c.src_size);
      std::memset(host + c.src_size, 0, 16 - c.src_size);
      for (int i = 0; i < 16; ++i) st[off + i].pending = 0;
      shared_bytes(st, region, off, 16, true);
    }
    t->groups.erase(t->groups.begin());
  }
}

// ------------------------------------------------------------------ warp instructions

void ldmatrix_x4(uint32_t (&r)[4], uint32_t addr) {
  arrive(Coll::Ldmatrix, 0xffffffffu, &addr, 1);
  for (int i = 0; i < 4; ++i) r[i] = g.warps[g_cur->warp].out[g_cur->lane][i];
}

void mma_m16n8k32_s8(int32_t (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  uint32_t in[10] = {a[0], a[1], a[2], a[3], b0, b1};
  for (int i = 0; i < 4; ++i) in[6 + i] = static_cast<uint32_t>(c[i]);
  arrive(Coll::MmaS8, 0xffffffffu, in, 10);
  for (int i = 0; i < 4; ++i) c[i] = static_cast<int32_t>(g.warps[g_cur->warp].out[g_cur->lane][i]);
}

template <Coll K>
void mma_half(float (&c)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3, uint32_t b0, uint32_t b1) {
  uint32_t in[10] = {a0, a1, a2, a3, b0, b1, f2u(c[0]), f2u(c[1]), f2u(c[2]), f2u(c[3])};
  arrive(K, 0xffffffffu, in, 10);
  for (int i = 0; i < 4; ++i) c[i] = u2f(g.warps[g_cur->warp].out[g_cur->lane][i]);
}
void mma_m16n8k16_f16(float (&c)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3, uint32_t b0, uint32_t b1) {
  mma_half<Coll::MmaF16>(c, a0, a1, a2, a3, b0, b1);
}
void mma_m16n8k16_bf16(float (&c)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3, uint32_t b0, uint32_t b1) {
  mma_half<Coll::MmaBF16>(c, a0, a1, a2, a3, b0, b1);
}

uint32_t shfl_xor_b32(uint32_t mask, uint32_t v, int lane_mask) {
  const uint32_t in[2] = {v, static_cast<uint32_t>(lane_mask) & 31u};
  arrive(Coll::Shfl, mask, in, 2);
  return g.warps[g_cur->warp].out[g_cur->lane][0];
}

uint32_t ballot(uint32_t mask, bool pred) {
  const uint32_t v = pred ? 1u : 0u;
  arrive(Coll::Ballot, mask, &v, 1);
  return g.warps[g_cur->warp].out[g_cur->lane][0];
}

// Executes a completed collective (all lanes of w.mask arrived), per the PTX ISA.
void compute(Warp& w) {
  switch (w.kind) {
    case Coll::Ldmatrix: {
      // .x4: lanes 8i .. 8i + 7 give the row addresses of matrix i (16 bytes each, 16-byte aligned);
      // lane l receives in register i the 32 bits at row l / 4, bytes 4 (l % 4) .. + 3 of matrix i.
      uint8_t rows[32][16];
      for (int l = 0; l < 32; ++l) {
        const uint32_t addr = w.in[l][0];
        if (addr % 16 != 0) hazard(fmt("misaligned ldmatrix: lane %d row address %u is not 16-byte aligned", l, addr));
        uint8_t* host;
        const char* region;
        size_t off;
        ByteState* st = resolve_shared(addr, 16, "ldmatrix", &host, &region, &off);
        shared_bytes(st, region, off, 16, false);
        std::memcpy(rows[l], host, 16);
      }
      for (int l = 0; l < 32; ++l)
        for (int i = 0; i < 4; ++i) std::memcpy(&w.out[l][i], rows[8 * i + l / 4] + 4 * (l % 4), 4);
      break;
    }
    case Coll::MmaS8: {
      // Fragments of mma.m16n8k32 .s8 (groupID g = lane / 4, t = lane % 4):
      //   A a_i (i = 0..15, 4 per register): row g for i < 4 or 8 <= i < 12, else g + 8;
      //          col 4t + (i & 3) for i < 8, 4t + (i & 3) + 16 for i >= 8.
      //   B b_i (i = 0..7): row (k) 4t + (i & 3) for i < 4, + 16 for i >= 4; col (n) g.
      //   C/D c_i (i = 0..3): row g for i < 2, g + 8 otherwise; col 2t + (i & 1).
      int32_t A[16][32], B[32][8];
      int64_t C[16][8];
      for (int l = 0; l < 32; ++l) {
        const int gr = l >> 2, t = l & 3;
        for (int i = 0; i < 16; ++i) {
          const int8_t v = static_cast<int8_t>(w.in[l][i / 4] >> (8 * (i % 4)));
          const int row = (i < 4 || (i >= 8 && i < 12)) ? gr : gr + 8;
          const int col = 4 * t + (i & 3) + (i >= 8 ? 16 : 0);
          A[row][col] = v;
        }
        for (int i = 0; i < 8; ++i) {
          const int8_t v = static_cast<int8_t>(w.in[l][4 + i / 4] >> (8 * (i % 4)));
          B[4 * t + (i & 3) + (i >= 4 ? 16 : 0)][gr] = v;
        }
        for (int i = 0; i < 4; ++i) C[gr + (i >= 2 ? 8 : 0)][2 * t + (i & 1)] = static_cast<int32_t>(w.in[l][6 + i]);
      }
      for (int l = 0; l < 32; ++l) {
        const int gr = l >> 2, t = l & 3;
        for (int i = 0; i < 4; ++i) {
          const int r = gr + (i >= 2 ? 8 : 0), n = 2 * t + (i & 1);
          int64_t d = C[r][n];
          for (int k = 0; k < 32; ++k) d += static_cast<int64_t>(A[r][k]) * B[k][n];
          w.out[l][i] = static_cast<uint32_t>(d);  // .s32 without .satfinite: wraps modulo 2^32
        }
      }
      break;
    }
    case Coll::MmaF16:
    case Coll::MmaBF16: {
      // Fragments of mma.m16n8k16 .f16 / .bf16 (two values per register, lower half first):
      //   A a_i (i = 0..7): row g for i in {0, 1, 4, 5}, g + 8 otherwise; col 2t + (i & 1) for
      //          i < 4, 2t + (i & 1) + 8 for i >= 4.
      //   B b_i (i = 0..3): row (k) 2t + (i & 1) for i < 2, + 8 for i >= 2; col (n) g.
      //   C/D f32 as in m16n8k32.
      const bool bf = w.kind == Coll::MmaBF16;
      auto cvt = [bf](uint32_t reg, int half) {
        const uint16_t h = static_cast<uint16_t>(reg >> (16 * half));
        return bf ? bf16_to_float(h) : half_to_float(h);
      };
      float A[16][16], B[16][8], C[16][8];
      for (int l = 0; l < 32; ++l) {
        const int gr = l >> 2, t = l & 3;
        for (int i = 0; i < 8; ++i) {
          const int row = (i == 0 || i == 1 || i == 4 || i == 5) ? gr : gr + 8;
          A[row][2 * t + (i & 1) + (i >= 4 ? 8 : 0)] = cvt(w.in[l][i / 2], i % 2);
        }
        for (int i = 0; i < 4; ++i) B[2 * t + (i & 1) + (i >= 2 ? 8 : 0)][gr] = cvt(w.in[l][4 + i / 2], i % 2);
        for (int i = 0; i < 4; ++i) C[gr + (i >= 2 ? 8 : 0)][2 * t + (i & 1)] = u2f(w.in[l][6 + i]);
      }
      // Products are exact in fp32; the hardware's accumulation order and internal precision are
      // unspecified: the emulator adds in k order, each addition rounded to fp32 (nearest even).
      for (int l = 0; l < 32; ++l) {
        const int gr = l >> 2, t = l & 3;
        for (int i = 0; i < 4; ++i) {
          const int r = gr + (i >= 2 ? 8 : 0), n = 2 * t + (i & 1);
          float d = C[r][n];
          for (int k = 0; k < 16; ++k) d = d + A[r][k] * B[k][n];
          w.out[l][i] = f2u(d);
        }
      }
      break;
    }
    case Coll::Shfl: {
      for (int l = 0; l < 32; ++l) {
        if (((w.mask >> l) & 1u) == 0) continue;
        const int src = l ^ static_cast<int>(w.in[l][1]);
        if (src < 32 && ((w.mask >> src) & 1u)) w.out[l][0] = w.in[src][0];
        else w.out[l][0] = w.in[l][0];  // source lane outside the mask / warp: own value
      }
      break;
    }
    case Coll::Ballot: {
      uint32_t r = 0;
      for (int l = 0; l < 32; ++l)
        if (((w.mask >> l) & 1u) && w.in[l][0] != 0) r |= 1u << l;
      for (int l = 0; l < 32; ++l) w.out[l][0] = r;
      break;
    }
    default: break;
  }
}

// ------------------------------------------------------------------ scheduler

void thread_main() {
  g.body(g.ctx);
  need_bounds("returns");
  Thread* t = g_cur;
  if (!t->open.empty() || !t->groups.empty()) {
    size_t n = t->open.size();
    for (auto& gr : t->groups) n += gr.size();
    hazard(fmt("thread exits with %zu cp.async copies still pending (no cp.async.wait_group 0 before the end)", n));
  }
  t->st = St::Done;
  swapcontext(&t->ctx, &g_sched);
}

std::string lanes_str(uint32_t m) {
  std::string s;
  for (int l = 0; l < 32; ++l)
    if ((m >> l) & 1u) s += (s.empty() ? "" : ",") + std::to_string(l);
  return s.empty() ? "none" : s;
}

void run_block() {
  const int nt = static_cast<int>(g.block.x * g.block.y * g.block.z);
  const int nw = (nt + 31) / 32;
  while (static_cast<int>(g_stacks.size()) < nt) g_stacks.emplace_back(new uint8_t[kStack]);
  g.threads.assign(nt, Thread{});
  g.warps.assign(nw, Warp{});
  for (int w = 0; w < nw; ++w) g.warps[w].lanes = nt - 32 * w >= 32 ? 0xffffffffu : (1u << (nt - 32 * w)) - 1u;
  for (int i = 0; i < nt; ++i) {
    Thread& t = g.threads[i];
    t.tid = i;
    t.warp = i / 32;
    t.lane = i % 32;
    t.idx = {i % g.block.x, (i / g.block.x) % g.block.y, i / (g.block.x * g.block.y)};
    t.stack = g_stacks[i].get();
    getcontext(&t.ctx);
    t.ctx.uc_stack.ss_sp = t.stack;
    t.ctx.uc_stack.ss_size = kStack;
    t.ctx.uc_link = nullptr;
    makecontext(&t.ctx, thread_main, 0);
  }
  ++g_epoch;
  // Uninitialised shared memory holds garbage on a GPU: poison it.
  std::memset(g_arena, 0xA5, g.smem);
  std::memset(g_static, 0xA5, g_static_used);
  // Copies of an abandoned block (a hazard) never land: forget them.
  for (size_t i = 0; i < g.smem; ++i) g_arena_st[i].pending = 0;
  for (size_t i = 0; i < g_static_used; ++i) g_static_st[i].pending = 0;

  for (;;) {
    bool progress = false;
    for (bool ran = true; ran;) {  // until no thread is runnable
      ran = false;
      for (int i = 0; i < nt; ++i) {
        Thread& t = g.threads[i];
        if (t.st != St::Run) continue;
        g_cur = &t;
        swapcontext(&g_sched, &t.ctx);
        g_cur = nullptr;
        ran = progress = true;
        if (!g.error.empty()) return;
      }
    }
    int n_bar = 0, n_done = 0, n_coll = 0;
    for (const Thread& t : g.threads) {
      n_bar += t.st == St::Bar;
      n_done += t.st == St::Done;
      n_coll += t.st == St::Coll;
    }
    if (n_done == nt) return;
    if (n_coll > 0) {  // every runnable thread ran: a collective some lanes never reach
      for (int w = 0; w < nw; ++w) {
        const Warp& wp = g.warps[w];
        if (wp.kind == Coll::None) continue;
        uint32_t exited = 0, at_bar = 0;
        for (int l = 0; l < 32; ++l) {
          if (((wp.mask >> l) & 1u) == 0 || ((wp.arrived >> l) & 1u)) continue;
          const St s = g.threads[w * 32 + l].st;
          if (s == St::Done) exited |= 1u << l;
          if (s == St::Bar) at_bar |= 1u << l;
        }
        hazard(fmt("warp %d: %s (mask 0x%08x) reached by lanes {%s} only; lanes {%s} exited, lanes {%s} wait at "
                   "__syncthreads",
                   w, coll_name(wp.kind), wp.mask, lanes_str(wp.arrived).c_str(), lanes_str(exited).c_str(),
                   lanes_str(at_bar).c_str()));
        return;
      }
    }
    if (n_bar > 0) {
      if (n_done > 0) {
        hazard(fmt("__syncthreads reached by %d of %d threads; %d exited before it", n_bar, nt, n_done));
        return;
      }
      int any = 0;
      for (const Thread& t : g.threads) any |= t.bar_pred;
      ++g_epoch;
      for (Thread& t : g.threads) {
        t.bar_result = any;
        t.st = St::Run;
      }
      progress = true;
    }
    if (!progress) {
      hazard("deadlock: no thread can make progress");
      return;
    }
  }
}

cudaError_t fail(cudaError_t e, const std::string& what) {
  g.error.clear();
  hazard(what);
  g_message = g.error;
  g_last = e;
  return e;
}

// Offsets (in the library that holds them) of the kernels launched, for take_launch_log().
std::vector<uint64_t> g_log;

cudaError_t run_kernel(const char* name, const char* where, const void* fn, dim3 grid, dim3 block, size_t smem,
                       void (*body)(void*), void* ctx, size_t ctx_size) {
  Dl_info info{};
  g_log.push_back(dladdr(fn, &info) != 0 ? reinterpret_cast<uintptr_t>(fn) - reinterpret_cast<uintptr_t>(info.dli_fbase)
                                         : reinterpret_cast<uintptr_t>(fn));
  g.name = name;
  g.where = where;
  g.grid = grid;
  g.block = block;
  g.smem = smem;
  g.bidx = {0, 0, 0};
  g.body = body;
  g.ctx = ctx;
  g.ctx_lo = reinterpret_cast<uintptr_t>(ctx);
  g.ctx_hi = g.ctx_lo + ctx_size;
  g.error.clear();
  g.code = cudaSuccess;
  g.bound = 0;
  const uint64_t nt = uint64_t(block.x) * block.y * block.z;
  if (block.x == 0 || block.y == 0 || block.z == 0 || nt > 1024 || block.x > 1024 || block.y > 1024 || block.z > 64)
    return fail(cudaErrorInvalidConfiguration,
                fmt("invalid block (%u, %u, %u): at most 1024 threads, 1024 x 1024 x 64", block.x, block.y, block.z));
  if (grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.x > 2147483647u || grid.y > 65535 || grid.z > 65535)
    return fail(cudaErrorInvalidConfiguration,
                fmt("invalid grid (%u, %u, %u): limits 2^31 - 1 x 65535 x 65535", grid.x, grid.y, grid.z));
  if (smem > kSmemDefault) {
    auto it = g_optin.find(fn);
    const int optin = it == g_optin.end() ? 0 : it->second;
    if (static_cast<size_t>(optin) < smem)
      return fail(cudaErrorInvalidValue,
                  fmt("%zu bytes of dynamic shared memory exceed 48 KB without the opt-in (cudaFuncSetAttribute("
                      "cudaFuncAttributeMaxDynamicSharedMemorySize) gave %d)",
                      smem, optin));
  }
  if (smem > g_dev.smem_optin())
    return fail(cudaErrorInvalidValue, fmt("%zu bytes of dynamic shared memory exceed sm_%d's %zu per block", smem,
                                           g_dev.arch, g_dev.smem_optin()));
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x; ++x) {
        g.bidx = {x, y, z};
        run_block();
        if (!g.error.empty()) {
          g_message = g.error;
          g_last = g.code != cudaSuccess ? g.code : cudaErrorLaunchFailure;
          return g_last;
        }
      }
  return cudaSuccess;
}

cudaError_t func_set_attribute(const void* fn, int attr, int value) {
  if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize) return cudaErrorInvalidValue;
  if (value < 0 || static_cast<size_t>(value) > g_dev.smem_optin()) {
    g_message = fmt("quantkernels CUDA emulator: cudaFuncSetAttribute(MaxDynamicSharedMemorySize, %d) exceeds sm_%d's "
                    "%zu bytes per block",
                    value, g_dev.arch, g_dev.smem_optin());
    return g_last = cudaErrorInvalidValue;
  }
  g_optin[fn] = value;
  return cudaSuccess;
}

cudaError_t get_last_error() {
  const cudaError_t e = g_last;
  g_last = cudaSuccess;
  return e;
}

int device_attribute(int attr) { return attr == cudaDevAttrMultiProcessorCount ? g_dev.sm_count : 0; }

// ------------------------------------------------------------------ for the bindings

const char* last_message() { return g_message.c_str(); }

std::vector<std::pair<int, int>> g_devices;
void configure(int arch, int sm_count) {
  const std::pair<int, int> key{arch, sm_count};
  auto it = std::find(g_devices.begin(), g_devices.end(), key);
  if (it == g_devices.end()) it = g_devices.insert(g_devices.end(), key);
  g_dev.id = static_cast<int>(it - g_devices.begin());
  g_dev.arch = arch;
  g_dev.sm_count = sm_count;
  g_optin.clear();
}
int current_device() { return g_dev.id; }


}  // namespace qk_emu

// ------------------------------------------------------------------ compiler hooks
// ThreadSanitizer's instrumentation ABI (GCC/Clang -fsanitize=thread) and UBSan's alignment
// check, implemented by the emulator instead of the sanitizer runtimes.

#define QK_RW(N)                                                                                            \
  extern "C" void __tsan_read##N(void* p) { qk_emu::on_access(p, N, false, N); }                            \
  extern "C" void __tsan_write##N(void* p) { qk_emu::on_access(p, N, true, N); }                            \
  extern "C" void __tsan_unaligned_read##N(void* p) { qk_emu::on_access(p, N, false, N); }                  \
  extern "C" void __tsan_unaligned_write##N(void* p) { qk_emu::on_access(p, N, true, N); }
QK_RW(1)
QK_RW(2)
QK_RW(4)
QK_RW(8)
QK_RW(16)
#undef QK_RW
extern "C" void __tsan_read_range(void* p, size_t n) { qk_emu::on_access(p, n, false, 1); }
extern "C" void __tsan_write_range(void* p, size_t n) { qk_emu::on_access(p, n, true, 1); }
extern "C" void __tsan_func_entry(void*) {}
extern "C" void __tsan_func_exit() {}
extern "C" void __tsan_init() {}
extern "C" void __tsan_vptr_update(void**, void*) {}
extern "C" void __tsan_vptr_read(void**) {}
// Atomics: host code only (torch's reference counts in the bindings, weight_only.cu's SM-count
// cache), never in a kernel; performed sequentially consistent.
#define QK_ATOMIC(N, T)                                                                                        \
  extern "C" T __tsan_atomic##N##_load(const volatile T* p, int) { return __atomic_load_n(p, __ATOMIC_SEQ_CST); } \
  extern "C" void __tsan_atomic##N##_store(volatile T* p, T v, int) { __atomic_store_n(p, v, __ATOMIC_SEQ_CST); }  \
  extern "C" T __tsan_atomic##N##_exchange(volatile T* p, T v, int) {                                        \
    return __atomic_exchange_n(p, v, __ATOMIC_SEQ_CST);                                                      \
  }                                                                                                          \
  extern "C" T __tsan_atomic##N##_fetch_add(volatile T* p, T v, int) {                                       \
    return __atomic_fetch_add(p, v, __ATOMIC_SEQ_CST);                                                       \
  }                                                                                                          \
  extern "C" T __tsan_atomic##N##_fetch_sub(volatile T* p, T v, int) {                                       \
    return __atomic_fetch_sub(p, v, __ATOMIC_SEQ_CST);                                                       \
  }                                                                                                          \
  extern "C" T __tsan_atomic##N##_fetch_and(volatile T* p, T v, int) {                                       \
    return __atomic_fetch_and(p, v, __ATOMIC_SEQ_CST);                                                       \
  }                                                                                                          \
  extern "C" T __tsan_atomic##N##_fetch_or(volatile T* p, T v, int) {                                        \
    return __atomic_fetch_or(p, v, __ATOMIC_SEQ_CST);                                                        \
  }                                                                                                          \
  extern "C" T __tsan_atomic##N##_fetch_xor(volatile T* p, T v, int) {                                       \
    return __atomic_fetch_xor(p, v, __ATOMIC_SEQ_CST);                                                       \
  }                                                                                                          \
  extern "C" int __tsan_atomic##N##_compare_exchange_strong(volatile T* p, T* c, T v, int, int) {            \
    return __atomic_compare_exchange_n(p, c, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);                  \
  }                                                                                                          \
  extern "C" int __tsan_atomic##N##_compare_exchange_weak(volatile T* p, T* c, T v, int, int) {              \
    return __atomic_compare_exchange_n(p, c, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);                  \
  }                                                                                                          \
  extern "C" T __tsan_atomic##N##_compare_exchange_val(volatile T* p, T c, T v, int, int) {                  \
    __atomic_compare_exchange_n(p, &c, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);                        \
    return c;                                                                                                \
  }
QK_ATOMIC(8, uint8_t)
QK_ATOMIC(16, uint16_t)
QK_ATOMIC(32, uint32_t)
QK_ATOMIC(64, uint64_t)
#undef QK_ATOMIC
extern "C" void __tsan_atomic_thread_fence(int) { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
extern "C" void __tsan_atomic_signal_fence(int) { __atomic_signal_fence(__ATOMIC_SEQ_CST); }

// UBSan -fsanitize=alignment: called for a load / store through a misaligned typed pointer.
extern "C" void __ubsan_handle_type_mismatch_v1(void*, void* ptr) {
  if (qk_emu::g_cur != nullptr) qk_emu::hazard(qk_emu::fmt("misaligned access through a typed pointer at %p", ptr));
}
extern "C" void __ubsan_handle_type_mismatch_v1_abort(void* d, void* ptr) { __ubsan_handle_type_mismatch_v1(d, ptr); }

// For quantkernels/cuda_emu.py (ctypes): allocation tracking, the launch log, the emulated device.
extern "C" void qk_emu_track_allocations(int on) { qk_emu::track_allocations(on != 0); }
extern "C" int qk_emu_log_size() { return static_cast<int>(qk_emu::g_log.size()); }
extern "C" int qk_emu_take_log(uint64_t* out, int cap) {
  const int n = std::min(cap, static_cast<int>(qk_emu::g_log.size()));
  std::copy(qk_emu::g_log.begin(), qk_emu::g_log.begin() + n, out);
  qk_emu::g_log.clear();
  return n;
}
extern "C" int qk_emu_configure(int arch, int sm_count) {
  if ((arch != 80 && arch != 90) || sm_count < 1 || sm_count > 1024) return 1;
  qk_emu::configure(arch, sm_count);
  return 0;
}
