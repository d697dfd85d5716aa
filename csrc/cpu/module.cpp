// The Python module quantkernels._C and the CPU ISA selection (cpu_isa.h).
//
// Importing quantkernels._C loads this shared library, which runs the static
// TORCH_LIBRARY_IMPL registrations of every kernel file (extension-cpp pattern). The
// module is built against the Python limited API (abi3), so it uses no pybind11: it
// exposes two plain C functions for tests and diagnostics:
//   _C.cpu_isa()        -> the level the next op call uses, e.g. "avx512_vnni"
//                          (RuntimeError for a bad QUANTKERNELS_CPU_ISA)
//   _C.cpu_has_avx2()   -> bool, what CPUID + XGETBV say
//   _C.cpu_isa_levels() -> tuple of the levels this CPU and OS support, lowest first
//   _C.cpu_kernel_variants() -> {op: variant it runs at the active level}
#include <Python.h>

#include <cstdlib>
#include <cstring>
#include <exception>
#include <map>
#include <string>

#include <c10/util/Exception.h>

#include "cpu_isa.h"

#if QK_X86
#include <cpuid.h>
#endif

namespace quantkernels {
namespace cpu {

namespace {

constexpr const char* kIsaNames[kNumIsa] = {"portable", "avx2", "avx_vnni", "avx512", "avx512_vnni", "avx512_bf16"};

#if QK_X86
struct Features {
  bool avx2 = false, avx_vnni = false, avx512 = false, avx512_vnni = false, avx512_bf16 = false;
};

// CPUID for the instructions, XGETBV for the OS: a kernel may only touch ymm (zmm, k) registers
// whose state the OS saves on a context switch (XCR0 bits 1-2, and 5-7 for AVX-512).
Features detect() {
  Features f;
  unsigned a, b, c, d;
  if (!__get_cpuid(1, &a, &b, &c, &d)) return f;
  const bool osxsave = c & (1u << 27), fma = c & (1u << 12), f16c = c & (1u << 29), avx = c & (1u << 28);
  if (!(osxsave && avx)) return f;
  unsigned xcr0_lo, xcr0_hi;
  __asm__ volatile("xgetbv" : "=a"(xcr0_lo), "=d"(xcr0_hi) : "c"(0));
  const bool os_ymm = (xcr0_lo & 0x6) == 0x6;
  const bool os_zmm = os_ymm && (xcr0_lo & 0xE0) == 0xE0;
  if (!os_ymm || __get_cpuid_max(0, nullptr) < 7) return f;
  __cpuid_count(7, 0, a, b, c, d);
  const bool avx2 = b & (1u << 5);
  const bool avx512f = b & (1u << 16), avx512dq = b & (1u << 17), avx512bw = b & (1u << 30),
             avx512vl = b & (1u << 31);
  const bool avx512vnni = c & (1u << 11);
  __cpuid_count(7, 1, a, b, c, d);
  const bool avxvnni = a & (1u << 4), avx512bf16 = a & (1u << 5);
  f.avx2 = avx2 && fma && f16c;
  f.avx_vnni = f.avx2 && avxvnni;
  f.avx512 = f.avx2 && os_zmm && avx512f && avx512dq && avx512bw && avx512vl;
  f.avx512_vnni = f.avx512 && avx512vnni;
  f.avx512_bf16 = f.avx512_vnni && avx512bf16;
  return f;
}

const Features& features() {
  static const Features f = detect();  // CPUID does not change while the process runs
  return f;
}
#endif

}  // namespace

bool cpu_supports(Isa isa) {
#if QK_X86
  const Features& f = features();
  switch (isa) {
    case Isa::Portable: return true;
    case Isa::Avx2: return f.avx2;
    case Isa::AvxVnni: return f.avx_vnni;
    case Isa::Avx512: return f.avx512;
    case Isa::Avx512Vnni: return f.avx512_vnni;
    case Isa::Avx512Bf16: return f.avx512_bf16;
  }
  return false;
#else
  return isa == Isa::Portable;
#endif
}

bool cpu_has_avx2() { return cpu_supports(Isa::Avx2); }

Isa best_isa() {
  static const Isa best = [] {
    for (int i = kNumIsa - 1; i > 0; --i) {
      if (cpu_supports(static_cast<Isa>(i))) return static_cast<Isa>(i);
    }
    return Isa::Portable;
  }();
  return best;
}

Isa active_isa() {
  const char* env = std::getenv("QUANTKERNELS_CPU_ISA");
  if (env == nullptr || env[0] == '\0' || std::strcmp(env, "auto") == 0) {
    return best_isa();
  }
  for (int i = 0; i < kNumIsa; ++i) {
    if (std::strcmp(env, kIsaNames[i]) == 0) {
      const Isa isa = static_cast<Isa>(i);
      TORCH_CHECK(cpu_supports(isa), "quantkernels: QUANTKERNELS_CPU_ISA=", env,
                  " but this CPU (or its OS) does not support it; the levels it supports: ",
                  supported_isa_list(), " (or unset QUANTKERNELS_CPU_ISA for the best one)");
      return isa;
    }
  }
  TORCH_CHECK(false, "quantkernels: QUANTKERNELS_CPU_ISA must be one of 'auto', 'portable', 'avx2', 'avx_vnni', "
                     "'avx512', 'avx512_vnni', 'avx512_bf16' (or unset), got '", env, "'");
}

std::string supported_isa_list() {
  std::string out;
  for (int i = 0; i < kNumIsa; ++i) {
    if (cpu_supports(static_cast<Isa>(i))) {
      if (!out.empty()) out += ", ";
      out += kIsaNames[i];
    }
  }
  return out;
}

const char* isa_name(Isa isa) {
  return kIsaNames[static_cast<int>(isa)];
}

namespace {
std::map<std::string, VariantFn>& variant_registry() {
  static std::map<std::string, VariantFn> reg;  // filled by static initializers, read after import
  return reg;
}
}  // namespace

bool register_variant(const char* op, VariantFn fn) {
  variant_registry()[op] = fn;
  return true;
}

std::vector<std::pair<std::string, std::string>> kernel_variants(Isa isa) {
  std::vector<std::pair<std::string, std::string>> out;
  for (const auto& kv : variant_registry()) out.emplace_back(kv.first, kv.second(isa));
  return out;
}

}  // namespace cpu
}  // namespace quantkernels

namespace {

PyObject* py_cpu_isa(PyObject*, PyObject*) {
  try {
    return PyUnicode_FromString(quantkernels::cpu::isa_name(quantkernels::cpu::active_isa()));
  } catch (const c10::Error& e) {
    PyErr_SetString(PyExc_RuntimeError, e.what_without_backtrace());
  } catch (const std::exception& e) {
    PyErr_SetString(PyExc_RuntimeError, e.what());
  }
  return nullptr;
}

PyObject* py_cpu_has_avx2(PyObject*, PyObject*) {
  return PyBool_FromLong(quantkernels::cpu::cpu_has_avx2() ? 1 : 0);
}

PyObject* py_cpu_isa_levels(PyObject*, PyObject*) {
  using namespace quantkernels::cpu;
  int n = 0;
  for (int i = 0; i < kNumIsa; ++i) n += cpu_supports(static_cast<Isa>(i)) ? 1 : 0;
  PyObject* out = PyTuple_New(n);
  if (out == nullptr) return nullptr;
  for (int i = 0, j = 0; i < kNumIsa; ++i) {
    if (!cpu_supports(static_cast<Isa>(i))) continue;
    PyObject* name = PyUnicode_FromString(isa_name(static_cast<Isa>(i)));
    if (name == nullptr) {
      Py_DECREF(out);
      return nullptr;
    }
    if (PyTuple_SetItem(out, j++, name) != 0) {  // steals name
      Py_DECREF(out);
      return nullptr;
    }
  }
  return out;
}

// {op: variant} at the active level (RuntimeError for a bad QUANTKERNELS_CPU_ISA).
PyObject* py_cpu_kernel_variants(PyObject*, PyObject*) {
  using namespace quantkernels::cpu;
  try {
    const auto variants = kernel_variants(active_isa());
    PyObject* out = PyDict_New();
    if (out == nullptr) return nullptr;
    for (const auto& kv : variants) {
      PyObject* v = PyUnicode_FromString(kv.second.c_str());
      if (v == nullptr || PyDict_SetItemString(out, kv.first.c_str(), v) != 0) {
        Py_XDECREF(v);
        Py_DECREF(out);
        return nullptr;
      }
      Py_DECREF(v);
    }
    return out;
  } catch (const c10::Error& e) {
    PyErr_SetString(PyExc_RuntimeError, e.what_without_backtrace());
  } catch (const std::exception& e) {
    PyErr_SetString(PyExc_RuntimeError, e.what());
  }
  return nullptr;
}

PyMethodDef methods[] = {
    {"cpu_isa", py_cpu_isa, METH_NOARGS,
     "The CPU ISA level the next quantkernels op call uses, e.g. 'avx512_vnni' (reads QUANTKERNELS_CPU_ISA)."},
    {"cpu_has_avx2", py_cpu_has_avx2, METH_NOARGS, "True if CPUID and XGETBV report AVX2, FMA and F16C."},
    {"cpu_isa_levels", py_cpu_isa_levels, METH_NOARGS,
     "The ISA levels this CPU and OS support, lowest first (values QUANTKERNELS_CPU_ISA accepts)."},
    {"cpu_kernel_variants", py_cpu_kernel_variants, METH_NOARGS,
     "{op name: the kernel variant it runs at the active ISA level} for the C++ CPU kernels."},
    {nullptr, nullptr, 0, nullptr},
};

}  // namespace

extern "C" {
// Importing the module loads the .so, which runs the static kernel registrations.
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT,
      "_C",     // name
      "quantkernels native kernels (importing registers the C++ implementations of quantkernels ops)",
      -1,       // per-interpreter state size: none
      methods,  // methods
  };
  return PyModule_Create(&module_def);
}
}
