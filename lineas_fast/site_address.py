"""Site addresses: the string that names what a steering transforms, and how to read and write it.

A *site* is a module name, optionally suffixed ``":k"`` (element ``k`` of a tuple output, e.g. an
attention module returning ``(hidden, weights)``) or ``":in"`` (the module's first positional input,
e.g. the MLP hidden neurons entering ``down_proj``). This module knows nothing of presets or model
families (that is :mod:`lineas_fast.sites`) and nothing of running a model (:mod:`lineas_fast.forward`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .errors import SteeringError


@dataclass(frozen=True)
class Site:
    """A parsed site string: module name + what to transform (``out``, ``in`` or tuple element ``k``)."""

    spec: str
    module: str
    index: int | None = None  # tuple element of the output
    is_input: bool = False

    @staticmethod
    def parse(spec: str) -> "Site":
        name, sep, suffix = spec.rpartition(":")
        if not sep:
            return Site(spec, spec)
        if suffix == "in":
            return Site(spec, name, is_input=True)
        if suffix.isdigit():
            return Site(spec, name, index=int(suffix))
        raise SteeringError(f"site {spec!r}: suffix must be ':in' or ':<int>'")


def get_module(model: nn.Module, spec: str) -> nn.Module:
    return model.get_submodule(Site.parse(spec).module)


def pick(output, site: Site) -> torch.Tensor:
    """The tensor a site transforms, out of a module output (tuple element ``k`` if asked)."""
    if site.index is None:
        if not torch.is_tensor(output):
            raise SteeringError(f"site {site.spec!r}: module returns {type(output).__name__}; use '{site.spec}:0'")
        return output
    return output[site.index]


def replace(output, site: Site, value: torch.Tensor):
    """Put ``value`` back where :func:`pick` took it from (tuples are rebuilt, never mutated)."""
    if site.index is None:
        return value
    items = list(output)
    items[site.index] = value
    return type(output)(items) if isinstance(output, tuple) else items


def static_width(module: nn.Module, site: Site) -> int | None:
    """Width of a site read off the module's weights (Linear, GPT-2 Conv1D, Conv2d, 1-D norms); None
    where only a forward can tell."""
    if site.index is not None:
        return None
    weight = getattr(module, "weight", None)
    if isinstance(module, nn.Linear):
        return module.in_features if site.is_input else module.out_features
    if type(module).__name__ == "Conv1D":  # transformers' GPT-2 Linear with weight [in, out]
        return module.weight.shape[0] if site.is_input else module.weight.shape[1]
    if isinstance(module, nn.Conv2d):
        return module.in_channels if site.is_input else module.out_channels
    if "norm" in type(module).__name__.lower() and torch.is_tensor(weight) and weight.ndim == 1:
        return weight.numel()
    return None


def channel_dim(ndim: int) -> int:
    """The steered axis of a site tensor: channels of ``[B, C, H, W]`` conv features, else the last."""
    return 1 if ndim == 4 else -1
