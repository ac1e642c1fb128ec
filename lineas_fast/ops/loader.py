"""Loading the native kernels for the ``lineas::*`` ops, in precedence order, and recording who serves what.

Run once by :mod:`lineas_fast.ops` after it has defined the schemas: the C++ extension ``lineas_fast._C``
(CPU kernels), then the CUDA extension ``lineas_fast._C_cuda`` (its CUDA kernels take precedence), then
the Triton launchers for the CUDA keys still empty. :data:`TABLE` is the record ``{(op, dispatch key):
backend}``; the decisions made from it (which implementation a patch uses) are :mod:`lineas_fast.backends`.
"""

from __future__ import annotations

TABLE: dict[tuple[str, str], str] = {}  # (op, dispatch key) -> backend whose kernel install() registered
TRITON_LAUNCHERS = {"norm_affine": "norm_affine_fwd", "norm_affine_backward": "norm_affine_bwd",  # op -> launcher
                    "steered_linear": "steered_linear_fwd", "steered_linear_backward": "steered_linear_bwd"}


def plan_cuda(ext_ops, triton_ok: bool, names) -> dict[str, str]:
    """Who serves each op on the CUDA key: the CUDA extension where it registered a kernel, Triton for the
    rest when it can run, else nobody (the CompositeExplicitAutograd torch reference)."""
    return {n: "cuda" if n in ext_ops else "triton" for n in names if n in ext_ops or triton_ok}


def install(lib, names) -> dict[str, str | None]:
    """Load the native kernels in precedence order and record who holds each dispatch key; returns
    ``{"cpp"|"cuda"|"triton": why not loaded, or None}``."""
    import torch

    has = torch._C._dispatch_has_kernel_for_dispatch_key
    missing: dict[str, str | None] = {}
    try:
        from .. import _C  # noqa: F401  (TORCH_LIBRARY_IMPL: CPU kernels)
        missing["cpp"] = None
    except ImportError as e:
        missing["cpp"] = f"lineas_fast._C not importable ({e})"
    TABLE.update({(n, "CPU"): "cpp" for n in names if has(f"lineas::{n}", "CPU")})
    gpu = torch.cuda.is_available()
    missing["cuda"] = missing["triton"] = None if gpu else "no CUDA device"
    if gpu:  # the extension first: its kernels take precedence over Triton's
        try:
            from .. import _C_cuda  # noqa: F401
        except ImportError as e:
            missing["cuda"] = f"lineas_fast._C_cuda not importable ({e})"
        from ..kernels import available

        ok, why = available()
        if not ok or "interpreter" in why:
            missing["triton"] = why
    ext = {n for n in names if gpu and has(f"lineas::{n}", "CUDA")}
    for name, who in plan_cuda(ext, missing["triton"] is None, names).items():
        if who == "triton":
            from .. import kernels

            lib.impl(name, getattr(kernels, TRITON_LAUNCHERS[name]), "CUDA")
        TABLE[(name, "CUDA")] = who
    return missing
