"""Build script: Python packages, Triton kernels (lineas_fast/kernels) and the C++/CUDA
extensions. Metadata (and the version, from lineas_fast/_version.py) live in pyproject.toml.

Extensions (torch.utils.cpp_extension, ninja):
  lineas_fast._C       csrc/*.cpp                        C++ CPU ops (OpenMP); always, unless skipped
  lineas_fast._C_cuda  csrc/cuda/*.cu + csrc/cuda/*.cpp  CUDA ops, see LINEAS_FAST_CUDA

Environment:
  LINEAS_FAST_BUILD_EXT=0   skip both extensions (the library then falls back to Triton / pure torch).
  LINEAS_FAST_CUDA          auto (default): build _C_cuda when torch is a CUDA build and CUDA_HOME (nvcc)
                            exists, else skip it with a warning; 1: build it or fail saying why; 0: never.
  TORCH_CUDA_ARCH_LIST      GPU architectures of _C_cuda (torch's own variable; default "8.0;9.0+PTX":
                            A100, H100/H200, and PTX that newer GPUs JIT-compile).
  MAX_JOBS                  parallel compile jobs (default: the number of CPU cores).
_C_cuda is always a release build: nvcc -O3 -lineinfo (line info for profilers; no effect on speed).

    LINEAS_FAST_CUDA=1 TORCH_CUDA_ARCH_LIST=9.0 pip install --no-build-isolation -e .   # an H100 box
"""
import os
import sys
import warnings
from glob import glob
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).parent.resolve()


def say(msg: str) -> None:
    print(f"lineas-fast setup: {msg}", file=sys.stderr, flush=True)


def skip(msg: str) -> None:
    """Report a skipped extension; a warning is what plain (non -v) pip output shows."""
    warnings.warn(f"lineas-fast setup: {msg}", stacklevel=2)


CUDA_ARCH_DEFAULT = "8.0;9.0+PTX"
NVCC_FLAGS = ["-O3", "-lineinfo", "-std=c++20"]


def cuda_extension(torch_cuda, cuda_home, make):
    """The _C_cuda extension (``make`` = CUDAExtension) or None, per LINEAS_FAST_CUDA (see the docstring)."""
    mode = os.environ.get("LINEAS_FAST_CUDA", "auto").strip().lower()
    if mode in ("0", "false", "no", "off"):
        skip("skipping CUDA extension (LINEAS_FAST_CUDA=0)")
        return None
    cu = sorted(glob("csrc/cuda/*.cu", root_dir=ROOT))
    why = ("no sources in csrc/cuda/" if not cu else
           "torch is not a CUDA build" if not torch_cuda else
           "CUDA_HOME not found (no CUDA toolkit / nvcc)" if not cuda_home else None)
    if why is not None:
        if mode in ("1", "true", "yes", "on"):
            raise SystemExit(f"lineas-fast setup: LINEAS_FAST_CUDA=1 but the CUDA extension cannot be built: {why}")
        skip(f"skipping CUDA extension: {why}")
        return None
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", CUDA_ARCH_DEFAULT)  # read by cpp_extension
    say(f"CUDA extension: TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']}, nvcc {' '.join(NVCC_FLAGS)}")
    return make("lineas_fast._C_cuda", cu + sorted(glob("csrc/cuda/*.cpp", root_dir=ROOT)),
                extra_compile_args={"cxx": ["-O3", "-std=c++20"], "nvcc": NVCC_FLAGS})


def extensions():
    """Return (ext_modules, cmdclass); empty when the extensions are skipped."""
    if os.environ.get("LINEAS_FAST_BUILD_EXT", "1").strip().lower() in ("0", "false", "no", "off"):
        skip("skipping C++/CUDA extensions (LINEAS_FAST_BUILD_EXT=0)")
        return [], {}
    # Source paths relative to the project root (pip runs setup.py from there).
    cpp = sorted(glob("csrc/*.cpp", root_dir=ROOT))
    if not cpp:
        skip("skipping C++ extensions: no sources in csrc/")
        return [], {}
    import torch  # build requirement (installed first; --no-build-isolation)
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

    os.environ.setdefault("MAX_JOBS", str(os.cpu_count() or 1))
    # torch >= 2.10 headers need C++20 (cpp_extension defaults to it; -std=c++17 only warns today).
    cxx = ["-O3", "-std=c++20", "-fopenmp"]
    exts = [CppExtension("lineas_fast._C", cpp, extra_compile_args={"cxx": cxx},
                         extra_link_args=["-fopenmp"])]
    cuda = cuda_extension(torch.version.cuda, CUDA_HOME, CUDAExtension)
    if cuda is not None:
        exts.append(cuda)
    say("building " + ", ".join(e.name for e in exts) + f" (MAX_JOBS={os.environ['MAX_JOBS']})")
    return exts, {"build_ext": BuildExtension.with_options(use_ninja=True)}


if __name__ == "__main__":  # pip / setuptools run this file as __main__; tests import its helpers
    ext_modules, cmdclass = extensions()
    setup(
        packages=find_packages(include=["lineas_fast", "lineas_fast.*"]),
        ext_modules=ext_modules,
        cmdclass=cmdclass,
    )
