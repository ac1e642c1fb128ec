"""Triton kernels, installed as ``lineas_fast.kernels`` (see ``package_dir`` in setup.py).

* :mod:`.norm_affine` — LayerNorm / RMSNorm (+ Gemma ``(1 + w)`` variant) fused with per-row sparse
  steering, forward (``norm_affine_fwd``) and backward (``norm_affine_bwd``), as plain launchers that the
  backend registry (:mod:`lineas_fast.backends`) registers for CUDA tensors the CUDA extension leaves to it.
* :mod:`.steered_linear` — a Linear layer (one tiled matmul) with per-row steering fused as a prologue on
  its input tiles or an epilogue on its output tiles, forward (``steered_linear_fwd``) and backward
  (``steered_linear_bwd``), registered the same way.

Importing this package never imports triton (it may be missing, and ``TRITON_INTERPRET`` must be set
before it is imported); the launchers are loaded on first access, and :func:`available` says whether
they can run here and why not (a fact the registry reads; it decides nothing).
"""

from __future__ import annotations

import importlib
import os

__all__ = ["available", "norm_affine_bwd", "norm_affine_fwd", "steered_linear_bwd", "steered_linear_fwd"]
_LAZY = {"norm_affine_fwd": "norm_affine", "norm_affine_bwd": "norm_affine",
         "steered_linear_fwd": "steered_linear", "steered_linear_bwd": "steered_linear"}


def available() -> tuple[bool, str]:
    """``(True, how)`` when the Triton kernels can run in this process, else ``(False, why not)``."""
    try:
        import triton
    except Exception as e:  # noqa: BLE001 — ImportError, or a broken install
        return False, f"triton is not importable ({type(e).__name__}: {e})"
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        return True, f"triton {triton.__version__} in interpreter mode (TRITON_INTERPRET=1, CPU tensors)"
    import torch

    if not torch.cuda.is_available():
        return False, f"triton {triton.__version__} is installed but no CUDA GPU is visible"
    return True, f"triton {triton.__version__} on {torch.cuda.get_device_name()}"


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
