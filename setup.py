"""Build script: Python packages, Triton kernels (kernels/ -> lineas_fast.kernels) and the C++/CUDA
extensions. Metadata (and the version, from lineas_fast/_version.py) live in pyproject.toml.

Extensions (torch.utils.cpp_extension, ninja):
  lineas_fast._C       csrc/*.cpp                      C++ CPU ops (OpenMP); always, unless skipped
  lineas_fast._C_cuda  csrc/cuda/*.cu + csrc/cuda/*.cpp  only with a CUDA torch and CUDA_HOME
Set LINEAS_FAST_BUILD_EXT=0 to skip both (the library then falls back to Triton / pure torch).
MAX_JOBS (parallel compile jobs) defaults to the number of CPU cores.
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
    cu = sorted(glob("csrc/cuda/*.cu", root_dir=ROOT))
    if not cu:
        skip("skipping CUDA extension: no sources in csrc/cuda/")
    elif not torch.version.cuda:
        skip(f"skipping CUDA extension: torch {torch.__version__} is not a CUDA build")
    elif not CUDA_HOME:
        skip("skipping CUDA extension: CUDA_HOME not found (no CUDA toolkit)")
    else:
        exts.append(CUDAExtension(
            "lineas_fast._C_cuda", cu + sorted(glob("csrc/cuda/*.cpp", root_dir=ROOT)),
            extra_compile_args={"cxx": ["-O3", "-std=c++20"],
                                "nvcc": ["-O3", "-std=c++20"]}))
    say("building " + ", ".join(e.name for e in exts) + f" (MAX_JOBS={os.environ['MAX_JOBS']})")
    return exts, {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = extensions()

setup(
    packages=[*find_packages(include=["lineas_fast", "lineas_fast.*"]), "lineas_fast.kernels"],
    package_dir={"lineas_fast.kernels": "kernels"},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
