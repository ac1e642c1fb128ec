"""Backend registry facts: which implementations can run here, and why not (``lf.env_report()``).

Resolution order per device (SPEC §4): CUDA extension → Triton → torch on GPU; C++ extension → torch
on CPU. The op dispatch does the resolution: the C++ extension registers CPU kernels, the Triton
launchers are registered for CUDA tensors (:mod:`lineas_fast.ops`), and the pure-torch reference serves
every other case. ``env_report`` tells what this machine can run and why not.
"""

from __future__ import annotations

import importlib
import importlib.util
import os


def _check_cpp() -> tuple[bool, str]:
    try:
        importlib.import_module("lineas_fast._C")
    except ImportError as e:
        return False, f"C++ extension not built or not importable ({e}); rebuild with pip install --no-build-isolation -e ."
    import torch

    from . import ops  # noqa: F401  (defines the op schemas the extension implements)

    missing = [op for op in ops.SCHEMAS if not torch._C._dispatch_has_kernel_for_dispatch_key(f"lineas::{op}", "CPU")]
    if missing:
        return False, f"lineas_fast._C loaded but has no CPU kernel for {missing}: rebuild the extension"
    return True, "lineas_fast._C loaded: C++ CPU kernels for " + ", ".join(ops.SCHEMAS)


def _check_cuda_ext() -> tuple[bool, str]:
    import torch

    if not torch.cuda.is_available():
        return False, "no CUDA device"
    try:
        importlib.import_module("lineas_fast._C_cuda")
    except ImportError as e:
        return False, f"CUDA extension not built ({e})"
    return True, "lineas_fast._C_cuda loaded"


def _check_triton() -> tuple[bool, str]:
    import torch

    if importlib.util.find_spec("triton") is None:
        return False, "triton not installed (pip install triton==3.7.1)"
    if torch.cuda.is_available():
        return True, "triton with a CUDA device"
    if os.environ.get("TRITON_INTERPRET") == "1":
        return True, "triton interpreter (TRITON_INTERPRET=1): correct but slow, for tests"
    return False, "no GPU (set TRITON_INTERPRET=1 before importing triton to run kernels in the interpreter)"


def env_report() -> dict[str, dict]:
    """``{backend: {"usable": bool, "why": str}}`` for torch, cpp, triton and cuda on this machine."""
    import torch

    report = {"torch": {"usable": True, "why": f"torch {torch.__version__}, the reference implementation"}}
    for name, check in (("cpp", _check_cpp), ("triton", _check_triton), ("cuda", _check_cuda_ext)):
        ok, why = check()
        report[name] = {"usable": ok, "why": why}
    return report
