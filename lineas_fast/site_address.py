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

from .errors import SiteError


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
        raise SiteError(f"site {spec!r}: suffix must be ':in' or ':<int>' (a tuple element, counted from 0)")


def get_module(model: nn.Module, spec: str) -> nn.Module:
    return model.get_submodule(Site.parse(spec).module)


def missing_module(model: nn.Module, name: str) -> str | None:
    """Why ``name`` is not a submodule of ``model``, naming what exists at the first step that fails
    (e.g. ``"model.layers has 2 blocks: 0..1"``), or None if it is one. Messages of :class:`SiteError`
    say this so an off-by-one block index or a misspelt child is fixed without reading the model."""
    module, path = model, []
    for part in name.split(".") if name else []:
        children = dict(module.named_children())
        if part not in children:
            where = ".".join(path) or type(model).__name__
            if isinstance(module, (nn.ModuleList, nn.Sequential)) and part.lstrip("-").isdigit():
                n = len(module)
                return f"{where} has {n} blocks: 0..{n - 1}" if n else f"{where} is empty"
            names = list(children)
            return (f"{where} has no child {part!r} (children: {', '.join(names[:8])}"
                    + (f", ... +{len(names) - 8}" if len(names) > 8 else "") + ")") if names else \
                f"{where} ({type(module).__name__}) has no children"
        module, path = children[part], path + [part]
    return None


def pick(output, site: Site) -> torch.Tensor:
    """The tensor a site transforms, out of a module output (tuple element ``k`` if asked).

    Raises :class:`SiteError` when the output does not have that shape: ``:k`` on a module returning a
    tensor (indexing would silently take batch row ``k``) or a tuple with ``k`` or fewer elements, and a
    bare module name on a module returning a tuple.
    """
    if site.index is None:
        if not torch.is_tensor(output):
            raise SiteError(f"site {site.spec!r}: module returns {type(output).__name__}; use '{site.spec}:0'")
        return output
    if torch.is_tensor(output):
        raise SiteError(f"site {site.spec!r}: output is a tensor, not a tuple; drop ':{site.index}'")
    if not isinstance(output, (tuple, list)):
        raise SiteError(f"site {site.spec!r}: output is a {type(output).__name__}, not a tuple; "
                        f"':{site.index}' needs a tuple output")
    if site.index >= len(output):
        raise SiteError(f"site {site.spec!r}: output is a tuple of {len(output)} element(s): "
                        f"valid suffixes are ':0'..':{len(output) - 1}'")
    value = output[site.index]
    if not torch.is_tensor(value):
        raise SiteError(f"site {site.spec!r}: element {site.index} of the output is "
                        f"{type(value).__name__}, not a tensor")
    return value


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
