"""Custom ops (``torch.ops.lineas.*``): schemas, fake (meta) implementations, autograd, and the pure-torch
fallback. Device kernels register themselves for the same names: C++ CPU kernels from ``csrc/`` (loaded
with ``lineas_fast._C``), Triton kernels from ``lineas_fast.kernels`` for CUDA tensors. Semantics of the
steering-table arguments: :mod:`lineas_fast.ops.reference`.

* ``lineas::norm_affine(x, weight?, bias?, eps, kind, weight_offset, scale, shift, ids, strength, nrows)``
  — LayerNorm (kind 0) / RMSNorm (kind 1, Gemma: weight_offset 1) followed by per-row steering.
* ``lineas::norm_affine_backward(grad, x, ...same...) -> (grad_x, grad_scale, grad_shift)``.
* ``lineas::steered_linear(x, weight, bias?, where, scale, shift, ids, strength, nrows)`` — a Linear layer
  with per-row steering of its input (``where`` 0, prologue: an ``:in`` site) or output (1, epilogue).
* ``lineas::steered_linear_backward(grad, x, ...same...) -> (grad_x, grad_scale, grad_shift)`` (the
  model's weight and bias are frozen: no gradient for them).
"""

from __future__ import annotations

import torch

from . import reference

_ARGS = ("Tensor x, Tensor? weight, Tensor? bias, float eps, int kind, float weight_offset, Tensor scale, "
         "Tensor shift, Tensor ids, Tensor strength, Tensor nrows")
_LIN_ARGS = ("Tensor x, Tensor weight, Tensor? bias, int where, Tensor scale, Tensor shift, Tensor ids, "
             "Tensor strength, Tensor nrows")
SCHEMAS = {
    "norm_affine": f"({_ARGS}) -> Tensor",
    "norm_affine_backward": f"(Tensor grad_out, {_ARGS}) -> (Tensor, Tensor, Tensor)",
    "steered_linear": f"({_LIN_ARGS}) -> Tensor",
    "steered_linear_backward": f"(Tensor grad_out, {_LIN_ARGS}) -> (Tensor, Tensor, Tensor)",
}

_lib = torch.library.Library("lineas", "FRAGMENT")  # noqa: TOR901 — kept alive for the process
for _name, _schema in SCHEMAS.items():
    _lib.define(_name + _schema)


@torch.library.impl("lineas::norm_affine", "CompositeExplicitAutograd", lib=_lib)
def _norm_affine_torch(x, weight, bias, eps, kind, weight_offset, scale, shift, ids, strength, nrows):
    return reference.norm_affine(x, weight, bias, eps, kind, weight_offset, scale, shift, ids, strength, nrows)


@torch.library.impl("lineas::norm_affine_backward", "CompositeExplicitAutograd", lib=_lib)
def _norm_affine_backward_torch(grad_out, x, weight, bias, eps, kind, weight_offset, scale, shift, ids, strength,
                                nrows):
    return reference.norm_affine_backward(grad_out, x, weight, bias, eps, kind, weight_offset, scale, shift, ids,
                                          strength, nrows)


@torch.library.register_fake("lineas::norm_affine", lib=_lib)
def _norm_affine_fake(x, weight, bias, eps, kind, weight_offset, scale, shift, ids, strength, nrows):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.register_fake("lineas::norm_affine_backward", lib=_lib)
def _norm_affine_backward_fake(grad_out, x, weight, bias, eps, kind, weight_offset, scale, shift, ids, strength,
                               nrows):
    return (torch.empty_like(x, memory_format=torch.contiguous_format),
            scale.new_empty(scale.shape, dtype=torch.float32), shift.new_empty(shift.shape, dtype=torch.float32))


def _setup(ctx, inputs, output):
    ctx.args = inputs
    ctx.save_for_backward(*[t for t in inputs if isinstance(t, torch.Tensor)])


def _backward(ctx, grad):
    (x, weight, bias, eps, kind, offset, scale, shift, ids, strength, nrows) = ctx.args
    gx, gs, gb = torch.ops.lineas.norm_affine_backward(grad.contiguous(), x, weight, bias, eps, kind, offset,
                                                       scale, shift, ids, strength, nrows)
    return (gx if ctx.needs_input_grad[0] else None, None, None, None, None, None,
            gs.to(scale.dtype) if ctx.needs_input_grad[6] else None,
            gb.to(shift.dtype) if ctx.needs_input_grad[7] else None, None, None, None)


torch.library.register_autograd("lineas::norm_affine", _backward, setup_context=_setup, lib=_lib)

norm_affine = torch.ops.lineas.norm_affine
norm_affine_backward = torch.ops.lineas.norm_affine_backward


# ------------------------------------------------------------------ steered_linear
@torch.library.impl("lineas::steered_linear", "CompositeExplicitAutograd", lib=_lib)
def _steered_linear_torch(x, weight, bias, where, scale, shift, ids, strength, nrows):
    return reference.steered_linear(x, weight, bias, where, scale, shift, ids, strength, nrows)


@torch.library.impl("lineas::steered_linear_backward", "CompositeExplicitAutograd", lib=_lib)
def _steered_linear_backward_torch(grad_out, x, weight, bias, where, scale, shift, ids, strength, nrows):
    return reference.steered_linear_backward(grad_out, x, weight, bias, where, scale, shift, ids, strength, nrows)


@torch.library.register_fake("lineas::steered_linear", lib=_lib)
def _steered_linear_fake(x, weight, bias, where, scale, shift, ids, strength, nrows):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


@torch.library.register_fake("lineas::steered_linear_backward", lib=_lib)
def _steered_linear_backward_fake(grad_out, x, weight, bias, where, scale, shift, ids, strength, nrows):
    return (torch.empty_like(x, memory_format=torch.contiguous_format),
            scale.new_empty(scale.shape, dtype=torch.float32), shift.new_empty(shift.shape, dtype=torch.float32))


def _steered_linear_grad(ctx, grad):
    """Gradients for x, scale and shift only: the model's weight and bias are frozen (None for them)."""
    (x, weight, bias, where, scale, shift, ids, strength, nrows) = ctx.args
    gx, gs, gb = torch.ops.lineas.steered_linear_backward(grad.contiguous(), x, weight, bias, where, scale,
                                                          shift, ids, strength, nrows)
    return (gx if ctx.needs_input_grad[0] else None, None, None, None,
            gs.to(scale.dtype) if ctx.needs_input_grad[4] else None,
            gb.to(shift.dtype) if ctx.needs_input_grad[5] else None, None, None, None)


torch.library.register_autograd("lineas::steered_linear", _steered_linear_grad, setup_context=_setup, lib=_lib)

steered_linear = torch.ops.lineas.steered_linear
steered_linear_backward = torch.ops.lineas.steered_linear_backward
__all__ = ["SCHEMAS", "norm_affine", "norm_affine_backward", "reference", "steered_linear",
           "steered_linear_backward"]


def _load_cpu_kernels() -> str | None:
    """Load the C++ extension (its TORCH_LIBRARY_IMPL registrations give the ops CPU kernels); the
    reason it is unavailable, or None."""
    try:
        from .. import _C  # noqa: F401
    except ImportError as e:
        return f"lineas_fast._C not importable ({e})"
    return None


CPU_KERNELS_MISSING = _load_cpu_kernels()


def _load_cuda_kernels() -> str | None:
    """Load the CUDA extension (its TORCH_LIBRARY_IMPL registrations give the ops CUDA kernels, which take
    precedence over Triton: it must load before ``_load_gpu_kernels``); the reason it is unavailable, or None."""
    if not torch.cuda.is_available():
        return "no CUDA device"
    try:
        from .. import _C_cuda  # noqa: F401
    except ImportError as e:
        return f"lineas_fast._C_cuda not importable ({e})"
    return None


CUDA_KERNELS_MISSING = _load_cuda_kernels()  # order: CPU kernels, CUDA extension, then Triton (below)


def _load_gpu_kernels() -> str | None:
    """Register the Triton launchers as the ops' CUDA implementation where a GPU and triton exist
    (a CUDA-extension kernel, when built, takes precedence); the reason they are not, or None."""
    if not torch.cuda.is_available():
        return "no CUDA device"
    from ..kernels import available

    ok, why = available()
    if not ok or "interpreter" in why:
        return why
    from ..kernels import norm_affine_bwd, norm_affine_fwd, steered_linear_bwd, steered_linear_fwd

    for name, fn in (("norm_affine", norm_affine_fwd), ("norm_affine_backward", norm_affine_bwd),
                     ("steered_linear", steered_linear_fwd), ("steered_linear_backward", steered_linear_bwd)):
        if not torch._C._dispatch_has_kernel_for_dispatch_key(f"lineas::{name}", "CUDA"):
            _lib.impl(name, fn, "CUDA")
    return None


GPU_KERNELS_MISSING = _load_gpu_kernels()
