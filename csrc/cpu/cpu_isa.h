// CPU instruction-set selection shared by every C++ CPU kernel of quantkernels.
//
// The wheel is compiled without -march=native, so ISA-specific code is compiled per
// function with __attribute__((target(...))) (QK_TARGET_* below) and chosen at run time by
// active_isa(). The levels, lowest first, and what each requires (CPUID, plus XGETBV: the OS
// must save the ymm state for AVX2/AVX-VNNI, and the zmm + opmask state for AVX-512):
//
//   portable     plain C++ loops
//   avx2         AVX2 + FMA + F16C
//   avx_vnni     avx2 + AVX-VNNI (VEX vpdpbusd on ymm: Alder Lake and later, Zen5)
//   avx512       avx2 + AVX-512 F/BW/VL/DQ (Skylake-SP and later, Zen4 and later)
//   avx512_vnni  avx512 + AVX512-VNNI (EVEX vpdpbusd on zmm/ymm: Cascade Lake, Ice Lake, Zen4)
//   avx512_bf16  avx512_vnni + AVX512-BF16 (vdpbf16ps: Cooper Lake, Sapphire Rapids, Zen4)
//
//   QUANTKERNELS_CPU_ISA unset, "" or "auto" -> the highest level this CPU and OS support
//   QUANTKERNELS_CPU_ISA=<level>             -> that level; a clear error if the CPU lacks it
//   anything else                            -> a clear error listing the valid values
//
// A kernel asks for the features it uses (isa_has_*) rather than comparing levels, because
// the levels are not a chain on every CPU (avx_vnni sits below avx512 in this list, yet
// forcing avx512 must not enable the ymm VNNI kernels). A kernel without a variant for the
// active level runs its best variant below it; `quantkernels info` prints what each op runs.
//
// The variable is read on every op call (getenv is cheap next to any kernel), so tests
// can switch paths inside one process with monkeypatch.setenv. Read it once per op call,
// on the calling thread, and pass the result into at::parallel_for bodies.
#pragma once

#include <string>
#include <utility>
#include <vector>

#include <c10/core/ScalarType.h>

#if defined(__x86_64__) || defined(__i386__)
#define QK_X86 1
#include <immintrin.h>
// Per-function ISA targets: the rest of the extension stays baseline x86-64.
#define QK_TARGET_AVX2 __attribute__((target("avx2,fma")))
#define QK_TARGET_AVXVNNI __attribute__((target("avx2,fma,f16c,avxvnni")))
#define QK_TARGET_AVX512 __attribute__((target("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512dq")))
#define QK_TARGET_AVX512VNNI \
  __attribute__((target("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512dq,avx512vnni")))
#define QK_TARGET_AVX512BF16 \
  __attribute__((target("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx512bf16")))
#else
#define QK_X86 0
#endif

namespace quantkernels {
namespace cpu {

// Ordered lowest first (see the table above); every x86 level implies avx2.
enum class Isa { Portable, Avx2, AvxVnni, Avx512, Avx512Vnni, Avx512Bf16 };
constexpr int kNumIsa = 6;

// True if this CPU and OS can run the AVX2 path (AVX2, FMA and F16C). Always false off x86.
bool cpu_has_avx2();

// True if this CPU and OS support every feature of `isa` (Portable: always).
bool cpu_supports(Isa isa);

// The highest level this CPU and OS support: what "auto" selects.
Isa best_isa();

// The ISA the next kernel call uses (see the table above). Throws c10::Error (RuntimeError
// in Python) for an unknown value or for a level this CPU does not support.
Isa active_isa();

const char* isa_name(Isa isa);

// "avx2, avx_vnni, ..." : the levels this CPU and OS support, for error messages.
std::string supported_isa_list();

// What each op runs: every kernel file registers, per op, a function naming the variant that
// op runs at a given level (e.g. "avx512_vnni: zmm vpdpbusd, u8 offset"), with a static
//   static const bool reg = register_variant("int8_gemm", [](Isa i) -> const char* { ... });
// `quantkernels info` prints them for the active level (_C.cpu_kernel_variants()).
using VariantFn = const char* (*)(Isa);
bool register_variant(const char* op, VariantFn fn);
// (op, variant at `isa`) for every registered op, sorted by op name.
std::vector<std::pair<std::string, std::string>> kernel_variants(Isa isa);

// What a level lets a kernel use.
inline bool isa_has_avx2(Isa i) { return i != Isa::Portable; }
inline bool isa_has_avx512(Isa i) { return i >= Isa::Avx512; }  // F/BW/VL/DQ, zmm
// vpdpbusd on ymm: AVX-VNNI's VEX form, or AVX512-VNNI's EVEX form (with AVX512VL).
inline bool isa_has_vnni256(Isa i) { return i == Isa::AvxVnni || i >= Isa::Avx512Vnni; }
inline bool isa_has_vnni512(Isa i) { return i >= Isa::Avx512Vnni; }
inline bool isa_has_bf16dot(Isa i) { return i >= Isa::Avx512Bf16; }  // vdpbf16ps

// "torch.float32"-style name of a dtype, for error messages that match the Python side.
std::string dtype_name(c10::ScalarType t);

}  // namespace cpu
}  // namespace quantkernels
