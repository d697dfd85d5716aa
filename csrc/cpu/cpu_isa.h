// CPU instruction-set selection shared by every C++ CPU kernel of quantkernels.
//
// The wheel is compiled without -march=native, so ISA-specific code is compiled per
// function with __attribute__((target(...))) (QK_TARGET_AVX2 below) and chosen at run
// time by active_isa():
//
//   QUANTKERNELS_CPU_ISA unset, "" or "auto"  -> "avx2" if CPUID reports AVX2 + FMA, else "portable"
//   QUANTKERNELS_CPU_ISA=portable             -> the portable path (plain C++ loops)
//   QUANTKERNELS_CPU_ISA=avx2                 -> the AVX2 path; a clear error on a CPU without AVX2/FMA
//   anything else                             -> a clear error listing the valid values
//
// The variable is read on every op call (getenv is cheap next to any kernel), so tests
// can switch paths inside one process with monkeypatch.setenv. Read it once per op call,
// on the calling thread, and pass the result into at::parallel_for bodies.
#pragma once

#include <string>

#include <c10/core/ScalarType.h>

#if defined(__x86_64__) || defined(__i386__)
#define QK_X86 1
#include <immintrin.h>
// Per-function ISA target: the rest of the extension stays baseline x86-64.
#define QK_TARGET_AVX2 __attribute__((target("avx2,fma")))
#else
#define QK_X86 0
#endif

namespace quantkernels {
namespace cpu {

enum class Isa { Portable, Avx2 };

// True if this CPU can run the AVX2 path (AVX2 and FMA, from CPUID). Always false off x86.
bool cpu_has_avx2();

// The ISA the next kernel call uses (see the table above). Throws c10::Error (RuntimeError
// in Python) for an unknown value or for "avx2" on a CPU without it.
Isa active_isa();

const char* isa_name(Isa isa);

// "torch.float32"-style name of a dtype, for error messages that match the Python side.
std::string dtype_name(c10::ScalarType t);

}  // namespace cpu
}  // namespace quantkernels
