"""Custom ops (``torch.ops.lineas.*``): schemas, fake (meta) implementations, autograd, and the pure-torch
fallback. Device kernels for the same names (C++ CPU kernels from ``lineas_fast._C``, CUDA kernels from
``lineas_fast._C_cuda``, Triton launchers from ``lineas_fast.kernels``) are loaded and chosen by the backend
registry, :mod:`lineas_fast.backends`. Semantics of the steering-table arguments:
:mod:`lineas_fast.ops.reference`.

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


# Native kernels for the same names, in precedence order (C++ CPU, CUDA extension, Triton for the CUDA keys
# the extension leaves empty): the backend registry loads them and records who serves what.
from .loader import install  # noqa: E402

_missing = install(_lib, tuple(SCHEMAS))
CPU_KERNELS_MISSING = _missing["cpp"]  # why lineas_fast._C is not loaded, or None
CUDA_KERNELS_MISSING = _missing["cuda"]  # why lineas_fast._C_cuda is not loaded, or None
GPU_KERNELS_MISSING = _missing["triton"]  # why the Triton launchers are not registered for CUDA, or None
