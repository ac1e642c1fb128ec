"""Applying steerings to a model instance: ``steer_`` (hooks | fold | fused), ``steered``, ``bake``.

This module owns the public entry points and their argument checks; the patches themselves live in
:mod:`.hooks`, :mod:`.fused` and :mod:`.fold` (one :class:`~.patch.Patch` interface), the routing state
in :mod:`.tables`, and the handle tying them together in :mod:`.handle`. ``bake`` is a fold patch (with
the checkpoint extras) whose undo record is dropped.

Everything is validated before the model is touched, then applied all or nothing (a failure half-way
undoes what was done and re-raises); another instance of the same class is never affected (hooks and
folds are per instance). Steering one model is serialised by its lock (``handle.model_lock``): the
"already steered" check and the patch are one atomic step, so of two threads steering one model at once
one succeeds and the other gets :class:`SteeringError`.
"""

from __future__ import annotations

import math
import numbers
from contextlib import contextmanager

import torch

from ..errors import SteeringError
from ..steering import Steering
from ..views import as_model, is_view, view_of
from .fold import FoldPatch
from .handle import ATTR, SteerHandle, model_lock

MODES = ("fused", "hooks", "fold")


def _normalise(steering) -> dict[str, Steering]:
    if isinstance(steering, Steering):
        return {"default": steering}
    if isinstance(steering, dict) and steering and all(isinstance(k, str) for k in steering):
        bad = [k for k, v in steering.items() if not isinstance(v, Steering)]
        if bad:
            raise SteeringError(f"steer_(): steering dict entries {bad} are not Steering objects (got "
                                f"{[type(steering[k]).__name__ for k in bad]}); expected {{name: Steering}}")
        return dict(steering)
    raise SteeringError(f"steer_(): steering={steering!r:.80} is not valid; expected a Steering or a non-empty "
                        f"{{name: Steering}} dict with str names, got {type(steering).__name__}")


def _refuse_clamped(steering: Steering, what: str) -> None:
    """A support clamp is a data-dependent pass-through: no weight edit can express it."""
    if steering.clamped:
        sites = steering.clamped
        raise SteeringError(f"{what} cannot fold a support-clamped map (sites {sites[:3]}"
                            + (f" +{len(sites) - 3} more" if len(sites) > 3 else "")
                            + "): apply it with mode='hooks', or refit without the support clamp")


def fused_available(model, steerings: dict) -> str | None:
    """None if the fused runtime covers every site of these steerings, else why not (first site)."""
    from .fused import plan_fused

    sites = list(dict.fromkeys(s for st in steerings.values() for s in st.sites))
    try:
        _, left = plan_fused(model, steerings, sites)
    except (AttributeError, SteeringError) as e:
        return str(e)
    if left:
        site = next(iter(left))
        return f"site {site!r}: {left[site]}" + (f" (+{len(left) - 1} more)" if len(left) > 1 else "")
    return None


def steer_(model, steering, strength=1.0, mode: str | None = None, backend: str | None = None) -> SteerHandle:
    """Patch ``model`` in place with one steering, or several by name for per-row routing.

    Args:
        model: a transformers model, or a diffusers pipeline (its denoiser and text encoders; per-row
            strengths and routes are per prompt, and under classifier-free guidance both halves of the
            denoiser batch follow their prompt).
        steering: a :class:`Steering` or ``{name: Steering}`` (rows start unsteered; use ``route``).
        strength: float, or a tensor ``[batch]`` of per-row strengths (single steering).
        mode: ``"fused"`` (kernels), ``"hooks"`` (reference) or ``"fold"`` (weights, fixed strength);
            None picks ``fused`` where it covers the sites, else ``hooks``.
        backend: ``fused`` only — None (the op's best kernel for the device) or an explicit ``"torch"``,
            ``"cpp"``, ``"triton"``, ``"cuda"``; one that cannot run here raises, saying why.
    Returns:
        a :class:`SteerHandle` (``set_strength``, ``route``, ``remove``; also a context manager).

    Every argument is checked before the model is touched (:class:`SteeringError` naming the argument,
    its value and what is valid); the patch is then applied all or nothing. Thread-safe per model: the
    model's lock is held from the "already steered" check to the end of the patch, so concurrent
    ``steer_``/``remove`` on one model are serialised and a second ``steer_`` raises "already steered".
    """
    from .handle import _as_strength

    steerings = _normalise(steering)
    rows = _as_strength(strength, "steer_()").numel()  # raises on NaN/inf/empty before anything changes
    if mode is not None and (not isinstance(mode, str) or mode not in MODES):
        raise SteeringError(f"steer_(): mode={mode!r} is not valid; expected None or one of {MODES}")
    if backend is not None and not isinstance(backend, str):
        raise SteeringError(f"steer_(): backend={backend!r} is not valid; expected None or a backend name "
                            f"(a str, e.g. 'torch', 'cpp', 'triton', 'cuda')")
    model = as_model(model)
    with model_lock(model):  # held through SteerHandle(): the check and the patch are one atomic step
        if getattr(model, ATTR, None) is not None:
            raise SteeringError("model is already steered: remove() the existing handle first")
        mode = _check_model_args(model, steerings, rows, mode, backend)
        return SteerHandle(model, steerings, mode, strength, backend)


def _check_model_args(model, steerings: dict, rows: int, mode: str | None, backend: str | None) -> str:
    """The checks of ``steer_`` that read the (unsteered) model; returns the mode to apply."""
    # a pipeline's per-prompt rows need the CFG-aware expansion of hooks (see SteerHandle)
    per_prompt = is_view(model) and model.per_prompt_needs_hooks() and (rows > 1 or len(steerings) > 1)
    if mode is None:
        mode = "fused" if fused_available(model, steerings) is None and not per_prompt else "hooks"
    if mode == "fold" and len(steerings) > 1:
        raise SteeringError("mode='fold' applies one steering at a fixed strength: use mode='hooks' to route several")
    for name, st in steerings.items():
        try:
            st.check_model(model)
        except SteeringError as e:
            raise SteeringError(f"steering {name!r}: {e}") if len(steerings) > 1 else e from None
    if mode == "fused" and per_prompt:
        raise SteeringError("per-prompt strengths or several steerings on a pipeline need mode='hooks' (the fused "
                            "kernels expand rows for generate(), not for a CFG-doubled denoiser batch)")
    if mode == "fold" and rows != 1:
        raise SteeringError("mode='fold' has one fixed strength: per-row strengths need mode='hooks'")
    if mode == "fold":
        _refuse_clamped(next(iter(steerings.values())), "mode='fold'")
    if backend is not None and mode != "fused":
        raise SteeringError(f"backend={backend!r} applies to mode='fused' only (mode is {mode!r})")
    if mode == "fused":
        from .fused import resolve_backend
        from .handle import _site_device

        for device in {_site_device(model, s) for st in steerings.values() for s in st.sites}:
            resolve_backend(backend, device)  # raises before anything changes
    return mode


@contextmanager
def steered(model, steering, strength=1.0, mode: str | None = None, backend: str | None = None):
    """``with steered(model, st): ...`` — steer for the block, restore exactly on exit (even on error)."""
    handle = steer_(model, steering, strength=strength, mode=mode, backend=backend)
    try:
        yield handle
    finally:
        handle.remove()


def _bake_strength(strength) -> float:
    """``bake``'s strength as a float: one finite real number (a Python/NumPy real, or a real tensor of one
    element); NaN, ±inf, complex, bool, strings and tensors of other sizes raise :class:`SteeringError`."""
    value = strength
    if isinstance(strength, torch.Tensor):
        if strength.numel() != 1 or strength.dtype == torch.bool or strength.is_complex() or strength.is_meta:
            raise SteeringError(f"bake(strength={strength!r}): expected one finite real number, got a "
                                f"{strength.dtype} tensor of shape {tuple(strength.shape)}")
        value = strength.detach().cpu().item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise SteeringError(f"bake(strength={strength!r}): expected a finite real number, "
                            f"got {type(strength).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise SteeringError(f"bake(strength={strength!r}): strength must be finite")
    return value


def bake(model, steering: Steering, strength: float = 1.0):
    """Fold a steering into the weights for good, so ``model.save_pretrained()`` writes a plain HF
    checkpoint that stock transformers reloads with the steered outputs.

    RMSNorm shifts need biases on the consuming Linear layers: the config flag that gives them one
    (e.g. ``attention_bias``/``mlp_bias``) is set and every Linear it governs gets an explicit (zero)
    bias. Refuses, naming the sites and leaving the model untouched, where no flag can express it.
    ``strength`` must be one finite real number (checked before anything changes). The edit is all or
    nothing: should any step fail, every weight, created bias and config flag is put back bit-exactly
    and the error re-raised.
    A diffusers pipeline is baked in its existing parameters only (``pipe.save_pretrained()`` then
    reloads in stock diffusers); a site needing a parameter its module lacks is refused.
    Returns the model (or pipeline).
    """
    if not isinstance(steering, Steering):
        raise SteeringError(f"bake() takes one Steering, got {type(steering).__name__}")
    lam = _bake_strength(strength)
    view = view_of(model)
    if view is not None:  # e.g. a diffusers pipeline: bakes into its own parameters (lineas_fast.views)
        return view.bake(steering, lam, _refuse_clamped)
    with model_lock(model):  # not while another thread steers or removes
        return _bake_locked(model, steering, lam)


def _bake_locked(model, steering: Steering, lam: float):
    if getattr(model, ATTR, None) is not None:
        raise SteeringError("model is currently steered: remove() the handle before baking")
    steering.check_model(model)
    _refuse_clamped(steering, "bake()")
    # the fold patch with the checkpoint extras (all or nothing, flags and biases included), kept for good
    FoldPatch(model, steering.sites, steering.scale, steering.shift, lam, bake=True).forget()
    return model
