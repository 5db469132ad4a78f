"""Builds prunepath_ops._C: the C++ CPU kernels always, the CUDA kernels when possible.

Environment:
  PRUNEPATH_CUDA=0|1      force the CUDA kernels off or on (default: on when torch
                          is a CUDA build and a CUDA toolkit is found)
  TORCH_CUDA_ARCH_LIST    CUDA targets (default "9.0a": Hopper, with wgmma/TMA)
  MAX_JOBS                parallel compile jobs (ninja)

Install with `pip install --no-build-isolation -e .` after torch is installed:
build isolation would build against a different torch.
"""

from __future__ import annotations

import glob
import os
import sys
import sysconfig

import torch
from setuptools import setup
from torch.utils import cpp_extension

ROOT = os.path.dirname(os.path.abspath(__file__))


def _rel(pattern: str) -> list[str]:
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))


def _want_cuda() -> bool:
    flag = os.environ.get("PRUNEPATH_CUDA", "").strip()
    torch_has_cuda = torch.version.cuda is not None
    toolkit = cpp_extension.CUDA_HOME
    if flag == "0":
        return False
    if flag == "1":
        if not torch_has_cuda:
            sys.exit(
                f"PRUNEPATH_CUDA=1 but torch {torch.__version__} is a CPU-only build: install a CUDA build of torch."
            )
        if toolkit is None:
            sys.exit("PRUNEPATH_CUDA=1 but no CUDA toolkit was found: set CUDA_HOME (e.g. /usr/local/cuda).")
        return True
    if flag:
        sys.exit(f"PRUNEPATH_CUDA must be 0 or 1; got {flag!r}")
    return torch_has_cuda and toolkit is not None


def _pip_cuda_includes() -> list[str]:
    # The CUDA build of torch ships CUDA headers (cusparse.h, ...) in pip wheels;
    # ATen's CUDA headers need them when the system toolkit lacks them.
    site = sysconfig.get_paths()["purelib"]
    return sorted(glob.glob(os.path.join(site, "nvidia", "cu*", "include")))


# One list of sources, found by directory: CMakeLists.txt globs the same folders.
CPP_SOURCES = _rel("csrc/torch_bindings.cpp") + _rel("csrc/ops/*.cpp") + _rel("csrc/python_module.cpp")
CUDA_SOURCES = _rel("csrc/ops/*.cu")
INCLUDES = [os.path.join(ROOT, "csrc", "include"), os.path.join(ROOT, "csrc")]
# No -std flag: torch.utils.cpp_extension adds the standard its headers need
# (C++20 from torch 2.13 on; torch 2.14 headers refuse C++17).
# OpenMP: at::parallel_for is inlined from ATen/ParallelOpenMP.h and runs serially unless the
# including code is compiled with -fopenmp (torch's extension helpers do not add it). The
# libgomp.so.1 that torch has already loaded then serves this library too (same soname).
OPENMP_FLAGS = ["-fopenmp"] if sys.platform.startswith("linux") and torch.backends.openmp.is_available() else []
CXX_FLAGS = ["-O3", *OPENMP_FLAGS]


def _extension():
    if _want_cuda():
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "9.0a")
        print(
            f"prunepath_ops: building CPU + CUDA kernels for TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']}"
        )
        return cpp_extension.CUDAExtension(
            "prunepath_ops._C",
            CPP_SOURCES + CUDA_SOURCES,
            include_dirs=INCLUDES + _pip_cuda_includes(),
            define_macros=[("PRUNEPATH_WITH_CUDA", None)],
            extra_compile_args={
                "cxx": CXX_FLAGS,
                "nvcc": ["-O3", "--expt-relaxed-constexpr", "-lineinfo"],
            },
            extra_link_args=OPENMP_FLAGS,
        )
    print("prunepath_ops: building the CPU kernels only (CUDA kernels need a CUDA torch and toolkit)")
    return cpp_extension.CppExtension(
        "prunepath_ops._C",
        CPP_SOURCES,
        include_dirs=INCLUDES,
        extra_compile_args={"cxx": CXX_FLAGS},
        extra_link_args=OPENMP_FLAGS,
    )


setup(
    ext_modules=[_extension()],
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
)
