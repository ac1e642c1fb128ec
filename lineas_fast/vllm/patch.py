"""Wrap the served model's modules at steering sites so they read a :class:`SlotTable`.

vLLM's decoder models keep Hugging Face's module names (``model.layers.3.input_layernorm``,
``model.layers.3.mlp.down_proj``), so an artifact's site strings address them directly. What differs
is what the modules return, and the wrapper handles both:

* a norm called with a residual is vLLM's fused ``add + RMSNorm`` and returns ``(normed, residual)``;
  the Hugging Face reference steers the norm's output, i.e. ``normed``: element 0 is steered, the
  residual passes through;
* a module returning a tensor where Hugging Face returned a tuple (attention: ``self_attn:0``) is
  steered whole; a ``:in`` site steers the first positional argument.

Widths: a row-parallel linear's input (``mlp.down_proj:in``) is sharded under tensor parallelism, so
its table holds this rank's columns only; everything else the presets name (norm outputs, attention and
MLP outputs after their all-reduce) is replicated. The wrapper is an instance ``forward`` attribute,
installed once at load time, before vLLM traces or captures the model.
"""

from __future__ import annotations

import torch.nn as nn

from ..errors import SteeringError
from ..site_address import Site


def site_geometry(model: nn.Module, site: str, hidden_size: int) -> tuple[int, slice | None]:
    """``(full width, this rank's slice or None)`` of a site of the vLLM model."""
    parsed = Site.parse(site)
    try:
        module = model.get_submodule(parsed.module)
    except AttributeError:
        raise SteeringError(f"site {site!r}: the served model has no module {parsed.module!r}") from None
    if parsed.is_input:
        full = getattr(module, "input_size", None)
        local = getattr(module, "input_size_per_partition", None)
        if full is not None and local is not None:
            if local == full:
                return int(full), None
            rank = int(getattr(module, "tp_rank", 0))
            return int(full), slice(rank * local, (rank + 1) * local)
        weight = getattr(module, "weight", None)
        if weight is not None and weight.ndim == 2:
            return int(weight.shape[1]), None
        raise SteeringError(f"site {site!r}: cannot tell the input width of {type(module).__name__}")
    weight = getattr(module, "weight", None)
    if weight is not None and weight.ndim == 1:  # a norm
        return int(weight.shape[0]), None
    return int(hidden_size), None  # attention / MLP blocks write the (replicated) residual width


def install(model: nn.Module, table) -> list[str]:
    """Wrap every site of ``table`` in ``model``; returns the sites wrapped. Idempotent per module."""
    done = []
    for site in table.widths:
        parsed = Site.parse(site)
        module = model.get_submodule(parsed.module)
        wrapped = module.__dict__.setdefault("_lineas_sites", {})
        if site in wrapped:
            continue
        wrapped[site] = True
        module.forward = _wrap(module.forward, site, parsed.is_input, table)
        done.append(site)
    return done


def _wrap(forward, site: str, is_input: bool, table):
    if is_input:
        def steered_input(x, *args, **kwargs):
            return forward(table.apply(site, x), *args, **kwargs)
        return steered_input

    def steered_output(*args, **kwargs):
        out = forward(*args, **kwargs)
        if isinstance(out, tuple):  # (normed, residual) of a fused add+norm, or (output, bias)
            return (table.apply(site, out[0]),) + tuple(out[1:])
        return table.apply(site, out)
    return steered_output


__all__ = ["install", "site_geometry"]
