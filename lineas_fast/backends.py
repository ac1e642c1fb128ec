"""The backend registry: the one place that decides which implementation serves each op on each device.

Backends: ``torch`` (the pure-torch reference, :mod:`lineas_fast.ops.reference`), ``cpp`` (the C++ CPU
extension ``lineas_fast._C``), ``cuda`` (the CUDA extension ``lineas_fast._C_cuda``, csrc/cuda/) and
``triton`` (:mod:`lineas_fast.kernels`). Ops: ``norm_affine`` and ``steered_linear``; each has a
``*_backward`` op that autograd calls, served by the same backend.

What the extensions provide is read from the dispatcher, not assumed: :func:`lineas_fast.ops.loader.install`
(run once by :mod:`lineas_fast.ops` when it has defined the schemas) loads ``_C`` (CPU kernels), then ``_C_cuda``
(CUDA kernels; today ``norm_affine`` and ``norm_affine_backward`` — binding.cpp registers no
``steered_linear``), then registers the Triton launchers for the CUDA keys still empty. It records who
holds each ``(op, dispatch key)``: that record is what ``backend=None`` reports.

Rules (SPEC §4; resolved once at patch time, never per call):

* ``None`` — the ``torch.ops.lineas.<op>`` op itself (autograd, ``torch.compile``-visible). Its dispatch
  runs, on CUDA: the CUDA extension where it has the op, else Triton, else torch; on CPU: the C++
  extension, else torch; elsewhere torch. :func:`resolve` names the one the dispatcher holds.
* ``"torch"`` — the reference functions, any device.
* ``"cpp"`` — CPU tensors only, the extension must be loaded with a CPU kernel for the op (the op is
  returned: its CPU kernel is the extension's).
* ``"triton"`` — the bare forward launchers (inference; no autograd); CUDA tensors, or CPU tensors under
  ``TRITON_INTERPRET=1`` (tests).
* ``"cuda"`` — CUDA tensors, the extension loaded, and it must hold the op's CUDA kernel (forward and
  backward); the op is returned. An op the extension lacks (``steered_linear`` today) is not silently
  served by Triton: it raises :class:`OpUnavailable` naming the op. :func:`resolve_backend` puts an
  :class:`Unavailable` in that op's slot instead, so ``backend="cuda"`` patches models whose fused sites
  are all norms, and refuses (before touching the model) one with a fused Linear site.

An explicit backend that cannot run here raises :class:`~lineas_fast.errors.SteeringError` saying why;
:func:`env_report` says why each backend is (un)usable. The ``_probe_*`` functions and
:func:`_dispatch_table` are the only facts read from the machine (tests replace them with fakes).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable

from .errors import SteeringError

BACKENDS = ("torch", "cpp", "triton", "cuda")
OPS = ("norm_affine", "steered_linear")
_KEYS = {"cpu": "CPU", "cuda": "CUDA"}  # device type -> dispatch key of the native kernels


class OpUnavailable(SteeringError):
    """An explicit backend that runs here but has no kernel for one op."""


class Unavailable:
    """Stands in for an op an explicit backend lacks: patching a site that needs it raises (before the
    model is touched, see ``FusedPatch``); calling it raises too."""

    def __init__(self, op: str, message: str):
        self.op, self.message = op, message

    def __call__(self, *args, **kwargs):
        raise SteeringError(self.message)

    def __repr__(self) -> str:
        return f"Unavailable({self.op!r})"


@dataclass(frozen=True)
class Impl:
    """What serves ``op``: the backend's name, the callable, and why."""

    op: str
    backend: str
    fn: Callable
    why: str


def plan_cuda(ext_ops, triton_ok: bool, names) -> dict[str, str]:
    """Who serves each op on the CUDA key (:func:`lineas_fast.ops.loader.plan_cuda`)."""
    from .ops.loader import plan_cuda as plan

    return plan(ext_ops, triton_ok, names)


def _dispatch_table() -> dict[tuple[str, str], str]:
    """``{(op, "CPU"|"CUDA"): backend}`` for every native kernel the dispatcher holds (loads the ops)."""
    from .ops.loader import TABLE  # importing lineas_fast.ops runs the loader

    return dict(TABLE)


# ------------------------------------------------------------------ probes (facts; replaced by fakes in tests)
def _probe_cpp() -> tuple[bool, str]:
    try:
        importlib.import_module("lineas_fast._C")
    except ImportError as e:
        return False, (f"C++ extension not built or not importable ({e}); rebuild with "
                       "pip install --no-build-isolation -e .")
    from . import ops

    missing = [op for op in ops.SCHEMAS if _dispatch_table().get((op, "CPU")) != "cpp"]
    if missing:
        return False, f"lineas_fast._C loaded but has no CPU kernel for {missing}: rebuild the extension"
    return True, "lineas_fast._C loaded: C++ CPU kernels for " + ", ".join(ops.SCHEMAS)


def _probe_cuda_ext() -> tuple[bool, str]:
    import torch

    if not torch.cuda.is_available():
        return False, "no CUDA device"
    from . import ops

    if ops.CUDA_KERNELS_MISSING:
        return False, (f"CUDA extension not built ({ops.CUDA_KERNELS_MISSING}); build it with "
                       "LINEAS_FAST_CUDA=1 pip install --no-build-isolation -e .")
    served = [op for op in ops.SCHEMAS if _dispatch_table().get((op, "CUDA")) == "cuda"]
    return True, "lineas_fast._C_cuda loaded: CUDA kernels for " + (", ".join(served) or "no op")


def _probe_triton() -> tuple[bool, str]:
    from .kernels import available

    return available()


def env_report() -> dict[str, dict]:
    """``{backend: {"usable": bool, "why": str}}`` for torch, cpp, triton and cuda on this machine."""
    import torch

    report = {"torch": {"usable": True, "why": f"torch {torch.__version__}, the reference implementation"}}
    for name, probe in (("cpp", _probe_cpp), ("triton", _probe_triton), ("cuda", _probe_cuda_ext)):
        ok, why = probe()
        report[name] = {"usable": ok, "why": why}
    return report


# ------------------------------------------------------------------ resolution
def _automatic(op: str, device) -> Impl:
    from . import ops

    key = _KEYS.get(device.type)
    who = _dispatch_table().get((op, key), "torch") if key else "torch"
    where = f"the {key} kernel" if who != "torch" else "the CompositeExplicitAutograd reference"
    return Impl(op, who, getattr(ops, op), f"torch.ops.lineas.{op} dispatches to {where} ({who}) on {device}")


def _explicit(op: str, backend: str, device) -> Impl:
    from . import ops

    table = _dispatch_table()
    if backend == "torch":
        return Impl(op, "torch", getattr(ops.reference, op), "pure-torch reference")
    if backend == "cpp":
        if device.type != "cpu":
            raise SteeringError(f"backend='cpp' runs on CPU tensors, the model is on {device}")
        ok, why = _probe_cpp()
        if not ok:
            raise SteeringError(f"backend='cpp' is unusable here: {why}")
        if not all(table.get((n, "CPU")) == "cpp" for n in (op, op + "_backward")):
            raise OpUnavailable(f"backend='cpp': lineas_fast._C has no CPU kernel for {op}")
        return Impl(op, "cpp", getattr(ops, op), why)
    if backend == "triton":
        ok, why = _probe_triton()
        if not ok:
            raise SteeringError(f"backend='triton' is unusable here: {why}")
        if device.type == "cpu" and "interpreter" not in why:
            raise SteeringError("backend='triton' on CPU tensors needs TRITON_INTERPRET=1 (tests only)")
        if device.type not in ("cpu", "cuda"):
            raise SteeringError(f"backend='triton' runs on CUDA tensors, the model is on {device}")
        from . import kernels
        from .ops.loader import TRITON_LAUNCHERS

        return Impl(op, "triton", getattr(kernels, TRITON_LAUNCHERS[op]), why + "; forward launcher, no autograd")
    ok, why = _probe_cuda_ext()  # backend == "cuda"
    if not ok:
        raise SteeringError(f"backend='cuda' is unusable here: {why}")
    if device.type != "cuda":
        raise SteeringError(f"backend='cuda' runs on CUDA tensors, the model is on {device}")
    if not all(table.get((n, "CUDA")) == "cuda" for n in (op, op + "_backward")):
        raise OpUnavailable(f"backend='cuda': the CUDA extension (lineas_fast._C_cuda) has no {op} kernel; use "
                            f"backend=None (CUDA extension where it has the op, Triton otherwise) or 'triton'")
    return Impl(op, "cuda", getattr(ops, op), why)


def resolve(op: str, backend: str | None, device) -> Impl:
    """The implementation of ``op`` for ``backend`` (None: automatic) on ``device``; raises
    :class:`SteeringError` (:class:`OpUnavailable` for an op the backend lacks) when it cannot run."""
    import torch

    if op not in OPS:
        raise ValueError(f"op={op!r}: expected one of {OPS}")
    device = torch.device(device)
    if backend is None:
        return _automatic(op, device)
    if backend not in BACKENDS:
        raise SteeringError(f"backend={backend!r}: expected None or one of {BACKENDS}")
    return _explicit(op, backend, device)


def resolve_backend(backend: str | None, device):
    """``(norm_affine, steered_linear)`` callables for ``device``, chosen once at patch time (see the module
    docstring). A backend that cannot run here raises; an op it lacks gets an :class:`Unavailable`."""
    fns = []
    for op in OPS:
        try:
            fns.append(resolve(op, backend, device).fn)
        except OpUnavailable as e:
            fns.append(Unavailable(op, str(e)))
    return tuple(fns)


def decisions(device) -> dict[str, dict[str, str]]:
    """``{backend or "None": {op: "<backend>" or "raises: <why>"}}`` on ``device`` (for reports)."""
    out = {}
    for backend in (None, *BACKENDS):
        row = {}
        for op in OPS:
            try:
                row[op] = resolve(op, backend, device).backend
            except SteeringError as e:
                row[op] = f"raises: {e}"
        out[str(backend)] = row
    return out
