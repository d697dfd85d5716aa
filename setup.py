"""Builds the native extension quantkernels._C (metadata lives in pyproject.toml).

    pip install --no-build-isolation -e .      # against the torch already installed
    python setup.py build_ext --inplace

C++ CPU sources (csrc/cpu/*.cpp) are always built. CUDA sources (csrc/cuda/*.cu plus
csrc/cuda_bindings.cpp) are added when torch has CUDA and nvcc is found, or when
FORCE_CUDA=1. QUANTKERNELS_NO_NATIVE=1 skips the extension: every op then runs the
pure-PyTorch reference.

The extension uses the Python limited API (one abi3 wheel for CPython >= 3.9; torch >= 2.6
supports it), so it contains no pybind11: importing it only runs the static op
registrations. No -march=native: ISA-specific code is compiled per function with
__attribute__((target("avx2,fma"))) and selected at run time (csrc/cpu/cpu_isa.h).
"""

import glob
import os
import sys

from setuptools import setup
from setuptools.command.build_py import build_py

#: Run by Python at start-up from site-packages: lets transformers' from_pretrained load quantkernels
#: checkpoints without `import quantkernels` (see _quantkernels_hf_autoload.py; 2-3 ms at start-up by
#: `python -X importtime -c pass`, imports nothing heavy).
PTH_NAME = "quantkernels-hf.pth"
PTH_LINE = "import _quantkernels_hf_autoload; _quantkernels_hf_autoload.install()\n"


class build_py_with_pth(build_py):
    """build_py that also writes PTH_NAME at the top of what gets installed: into build_lib for a
    wheel, into the editable wheel's root for `pip install -e .` (build_py does not copy there)."""

    def _pth_dir(self):
        if getattr(self, "editable_mode", False):
            return self.get_finalized_command("install").install_lib  # editable_wheel's unpacked wheel
        return self.build_lib

    def run(self):
        super().run()
        os.makedirs(self._pth_dir(), exist_ok=True)
        with open(os.path.join(self._pth_dir(), PTH_NAME), "w") as f:
            f.write(PTH_LINE)

    def get_outputs(self, include_bytecode=1):
        return super().get_outputs(include_bytecode) + [os.path.join(self._pth_dir(), PTH_NAME)]

ROOT = os.path.dirname(os.path.abspath(__file__))


def _rel(paths):
    return sorted(os.path.relpath(p, ROOT) for p in paths)


def _truthy(name):
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _want_cuda(cpp_extension, torch):
    """(build CUDA?, reason) -- the reason is printed either way."""
    cu_sources = _rel(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")))
    if not cu_sources:
        return False, "csrc/cuda/ holds no .cu files"
    if _truthy("FORCE_CUDA"):
        return True, "FORCE_CUDA=1"
    if torch.version.cuda is None:
        return False, f"torch {torch.__version__} is built without CUDA"
    if cpp_extension.CUDA_HOME is None:
        return False, "nvcc not found (set CUDA_HOME)"
    return True, f"torch CUDA {torch.version.cuda}, CUDA_HOME={cpp_extension.CUDA_HOME}"


def _extensions():
    if _truthy("QUANTKERNELS_NO_NATIVE"):
        print("quantkernels: QUANTKERNELS_NO_NATIVE=1, not building quantkernels._C "
              "(every op runs the pure-PyTorch reference)")
        return [], {}

    import torch
    from torch.utils import cpp_extension

    sources = _rel(glob.glob(os.path.join(ROOT, "csrc", "cpu", "*.cpp")))
    # No -std flag: torch adds the standard its headers need (c++17 or c++20 by version).
    cxx_flags = ["-O3", "-fdiagnostics-color=always"]
    nvcc_flags = ["-O3"]
    link_flags = []
    # at::parallel_for is a header template: with torch's OpenMP backend its `#pragma omp parallel`
    # is compiled into *our* objects, so without -fopenmp every CPU kernel silently runs on one
    # thread. -fopenmp links libgomp.so.1, which resolves to the copy torch has already loaded
    # (torch/lib/libgomp.so.1, same SONAME), so torch.set_num_threads governs our kernels too.
    if "OpenMP" in torch.__config__.parallel_info() and sys.platform.startswith("linux"):
        cxx_flags.append("-fopenmp")
        link_flags.append("-fopenmp")

    use_cuda, why = _want_cuda(cpp_extension, torch)
    if use_cuda:
        sources += _rel(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")))
        if os.path.exists(os.path.join(ROOT, "csrc", "cuda_bindings.cpp")):
            sources += ["csrc/cuda_bindings.cpp"]
        cxx_flags.append("-DQUANTKERNELS_WITH_CUDA")
        if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
            # With no visible GPU and no arch list, torch's arch detection raises IndexError.
            os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;8.9;9.0a"
            print("quantkernels: no GPU visible, TORCH_CUDA_ARCH_LIST defaulted to 8.0;8.9;9.0a")
        print(f"quantkernels: building CPU + CUDA kernels ({why})")
        ext_cls = cpp_extension.CUDAExtension
    else:
        print(f"quantkernels: building CPU kernels only ({why})")
        ext_cls = cpp_extension.CppExtension

    ext = ext_cls(
        "quantkernels._C",
        sources,
        include_dirs=[os.path.join(ROOT, "csrc")],
        extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
        extra_link_args=link_flags,
        py_limited_api=True,
    )
    return [ext], {"build_ext": cpp_extension.BuildExtension}


ext_modules, cmdclass = _extensions()
cmdclass["build_py"] = build_py_with_pth

setup(
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    options={"bdist_wheel": {"py_limited_api": "cp39"}} if ext_modules else {},
)
