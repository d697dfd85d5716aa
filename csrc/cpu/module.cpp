// The Python module quantkernels._C and the CPU ISA selection (cpu_isa.h).
//
// Importing quantkernels._C loads this shared library, which runs the static
// TORCH_LIBRARY_IMPL registrations of every kernel file (extension-cpp pattern). The
// module is built against the Python limited API (abi3), so it uses no pybind11: it
// exposes two plain C functions for tests and diagnostics:
//   _C.cpu_isa()      -> "avx2" | "portable", the path the next op call takes
//                        (RuntimeError for a bad QUANTKERNELS_CPU_ISA)
//   _C.cpu_has_avx2() -> bool, what CPUID says
#include <Python.h>

#include <cstdlib>
#include <cstring>
#include <exception>
#include <string>

#include <c10/util/Exception.h>

#include "cpu_isa.h"

namespace quantkernels {
namespace cpu {

bool cpu_has_avx2() {
#if QK_X86
  // Cached: CPUID does not change while the process runs.
  static const bool has = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  }();
  return has;
#else
  return false;
#endif
}

Isa active_isa() {
  const char* env = std::getenv("QUANTKERNELS_CPU_ISA");
  if (env == nullptr || env[0] == '\0' || std::strcmp(env, "auto") == 0) {
    return cpu_has_avx2() ? Isa::Avx2 : Isa::Portable;
  }
  if (std::strcmp(env, "portable") == 0) {
    return Isa::Portable;
  }
  if (std::strcmp(env, "avx2") == 0) {
    TORCH_CHECK(cpu_has_avx2(),
                "quantkernels: QUANTKERNELS_CPU_ISA=avx2 but this CPU does not support AVX2 and FMA "
                "(CPUID); unset it or set QUANTKERNELS_CPU_ISA=portable");
    return Isa::Avx2;
  }
  TORCH_CHECK(false, "quantkernels: QUANTKERNELS_CPU_ISA must be one of 'auto', 'avx2', 'portable' "
                     "(or unset), got '", env, "'");
}

const char* isa_name(Isa isa) {
  return isa == Isa::Avx2 ? "avx2" : "portable";
}

std::string dtype_name(c10::ScalarType t) {
  switch (t) {
    case c10::ScalarType::Float: return "torch.float32";
    case c10::ScalarType::Half: return "torch.float16";
    case c10::ScalarType::BFloat16: return "torch.bfloat16";
    case c10::ScalarType::Double: return "torch.float64";
    case c10::ScalarType::Char: return "torch.int8";
    case c10::ScalarType::Byte: return "torch.uint8";
    case c10::ScalarType::Short: return "torch.int16";
    case c10::ScalarType::Int: return "torch.int32";
    case c10::ScalarType::Long: return "torch.int64";
    case c10::ScalarType::Bool: return "torch.bool";
    default: return std::string("torch.") + c10::toString(t);
  }
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

PyMethodDef methods[] = {
    {"cpu_isa", py_cpu_isa, METH_NOARGS,
     "The CPU ISA the next quantkernels op call uses: 'avx2' or 'portable' (reads QUANTKERNELS_CPU_ISA)."},
    {"cpu_has_avx2", py_cpu_has_avx2, METH_NOARGS, "True if CPUID reports AVX2 and FMA."},
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
