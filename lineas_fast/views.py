"""Model views: how the core sees an object that is not itself a transformers model.

The core (sites, collect, fit, steer, bake) works on an ``nn.Module`` whose named modules are the sites:
a causal LM as it is. Anything else — a diffusers pipeline, which is a bag of components and not a
module — plugs in by registering an *adapter*: a function that returns a :class:`ModelView` for the
objects it understands and None for the rest. The view is a module tree over the object's steerable
parts and answers the few questions the core cannot answer generically (its presets, how to run prompts
through it, how to fit and bake it). The core only ever talks to this protocol: it never imports the
packages that register views. A package registers its adapter when imported, and announces itself with
an entry point in the group ``lineas_fast.views`` (``pyproject.toml``), which the first lookup loads: so
:mod:`lineas_fast.diffusion`'s pipeline view is known however the library was imported.
"""

from __future__ import annotations

from abc import ABCMeta, abstractmethod
from typing import Callable

from torch import nn

from .errors import SteeringError

ENTRY_POINT_GROUP = "lineas_fast.views"
_ADAPTERS: list[Callable[[object], "ModelView | None"]] = []
_plugins_loaded = False


class ModelView(nn.Module, metaclass=ABCMeta):
    """A steerable module tree over an object that is not a plain model (see the module docstring).

    Subclasses implement the abstract methods below (the others have defaults); the core calls them
    instead of its causal-LM code paths. ``owner`` is the object the user passed (what ``bake`` returns);
    ``config`` carries ``model_type`` and ``name_or_path`` for the artifact's metadata.
    """

    owner: object

    @abstractmethod
    def resolve(self, sites) -> list[str]:
        """A preset, regex or list of site strings → site strings in module order."""
        ...

    @abstractmethod
    def collect(self, texts, sites, *, pooling: str, batch_size: int, progress: bool) -> dict:
        """Pooled site activations ``{site: [N, d]}`` for prompts ``texts`` (see :func:`lineas_fast.collect`)."""
        ...

    @abstractmethod
    def probe_run(self) -> None:
        """The cheapest run that reaches every site (for shape probes and execution order)."""
        ...

    @abstractmethod
    def fit(self, method: str, fitter, tok, source, target, **kwargs):
        """Fit ``method`` (``fitter`` is the core's fitting function for it) on this view; a Steering."""
        ...

    @abstractmethod
    def bake(self, steering, strength: float, refuse_clamped: Callable):
        """Fold ``steering`` into the owner's weights for good; returns the owner."""
        ...

    def row_index(self, site: str, batch: int, rows: int):
        """Per-row routing-table index for a batch of ``batch`` rows at ``site`` when ``rows`` rows are
        routed; None where the plain expansion (each routed row repeated ``batch // rows`` times) holds."""
        return None

    def track_layout(self) -> Callable[[], None]:
        """Start following the batch layout :meth:`row_index` needs (e.g. a pipeline's CFG doubling);
        returns the callable that stops it. Default: nothing to follow."""
        return lambda: None

    def per_prompt_needs_hooks(self) -> bool:
        """Whether per-row strengths or several steerings need ``mode='hooks'`` on this view."""
        return False


def register_view(adapter: Callable[[object], ModelView | None]) -> None:
    """Add an adapter (idempotent): ``adapter(obj)`` returns the view of ``obj``, or None if not its kind."""
    if not callable(adapter):
        raise SteeringError(f"register_view: expected a callable, got {type(adapter).__name__}")
    if adapter not in _ADAPTERS:
        _ADAPTERS.append(adapter)


def _load_plugins() -> None:
    """Import every package announced in the ``lineas_fast.views`` entry-point group (once)."""
    global _plugins_loaded
    if _plugins_loaded:
        return
    _plugins_loaded = True
    from importlib.metadata import entry_points

    for ep in entry_points(group=ENTRY_POINT_GROUP):
        ep.load()


def view_of(obj) -> ModelView | None:
    """The registered view of ``obj``, or None when no adapter claims it (or it already is a view)."""
    if isinstance(obj, ModelView):
        return obj
    _load_plugins()
    for adapter in _ADAPTERS:
        view = adapter(obj)
        if view is not None:
            return view
    return None


def as_model(obj):
    """The module tree to steer: the view of ``obj`` when an adapter claims it, else ``obj`` itself."""
    view = view_of(obj)
    return obj if view is None else view


def is_view(model) -> bool:
    return isinstance(model, ModelView)
