"""lineas_fast — learn per-neuron affine steering maps (LinEAS, AcT) and apply them with near-zero overhead.

The public API (SPEC §3)::

    import lineas_fast as lf
    model, tok = lf.load_model("smollm2-135m")
    st = lf.fit(model, tok, source=lf.data.load_texts("toxic"), target=lf.data.load_texts("nontoxic"))
    with lf.steered(model, st, strength=1.0):
        model.generate(...)

The package is a lazy facade: ``import lineas_fast`` imports no torch, so ``lineas-fast --help`` answers
at once; the first use of a public name loads the library (and :mod:`lineas_fast.diffusion`, which
registers the diffusers pipeline view with :mod:`lineas_fast.views`).
"""

from __future__ import annotations

import importlib
import sys
import types

from ._version import __version__
from .errors import ArtifactError, SiteError, SteeringError

# public name -> (module, attribute); None: the module itself
_EXPORTS = {
    "Steering": ("steering", "Steering"), "compose": ("steering", "compose"),
    "SteerHandle": ("patching.handle", "SteerHandle"),
    "bake": ("patching", "bake"), "steer_": ("patching", "steer_"), "steered": ("patching", "steered"),
    "collect": ("collect", "collect"), "collect_diffusion": ("diffusion", "collect_diffusion"),
    "env_report": ("backends", "env_report"), "fit": ("methods", "fit"), "load_model": ("models", "load_model"),
    "resolve_sites": ("sites", "resolve_sites"),
    "data": ("data", None), "diffusion": ("diffusion", None), "evaluate": ("evaluate", None),
}

__all__ = sorted([*_EXPORTS, "ArtifactError", "SiteError", "SteeringError", "__version__"])


def _load(name: str):
    module, attr = _EXPORTS[name]
    importlib.import_module(f"{__name__}.diffusion")  # registers the pipeline view before any use
    mod = importlib.import_module(f"{__name__}.{module}")
    return mod if attr is None else getattr(mod, attr)


class _Facade(types.ModuleType):
    """The package module: public names resolve on first use. ``collect`` is both a submodule and a public
    function; a property keeps ``lf.collect`` the function even after the import system binds the
    submodule to the package."""

    @property
    def collect(self):
        return _load("collect")

    @collect.setter
    def collect(self, value):  # the import system binding the submodule: ignored (see the docstring)
        pass

    def __getattr__(self, name: str):
        if name in _EXPORTS:
            value = _load(name)
            self.__dict__[name] = value
            return value
        try:  # a submodule not imported yet (e.g. ``lf.sites``)
            return importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as e:
            if e.name != f"{__name__}.{name}":
                raise
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

    def __dir__(self):
        return sorted(set(super().__dir__()) | set(_EXPORTS))


sys.modules[__name__].__class__ = _Facade
