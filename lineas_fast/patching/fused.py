"""The ``fused`` apply mode: each steered normalisation module is replaced, on this instance only, by a
:class:`FusedNorm` that computes norm + steering in one op (``lineas::norm_affine``, SPEC §4), and each
steered Linear site by a :class:`FusedLinear` (``lineas::steered_linear``): an ``:in`` site of a Linear
as a prologue on its input, a Linear output (or a module output produced by one Linear, e.g. ``mlp`` →
``down_proj``) as an epilogue.

No forward hooks are installed for fused sites. The steering tables (``[K, d]`` per site) and the
routing table (``ids``/``strength`` of a fixed capacity + ``nrows``) are buffers that ``set_strength`` and
``route`` only ``copy_`` into, so their storage never changes and a ``torch.compile``d model (or a
CUDA graph) stays valid. The replacement shares the original's weight/bias Parameters (same
``state_dict`` keys and tensors; its own buffers are non-persistent), and ``remove()`` puts the original
module object back.

The implementation behind each stand-in is chosen once, at patch time, by the backend registry
(:func:`lineas_fast.backends.resolve_backend`, re-exported here).

When every routed row's effective strength is exactly 0 (unsteered or strength 0), an eager forward
calls the original module itself, so strength 0 is bit-identical to the unsteered model (the fused ops
compute the norm / matmul in their own order, ~1e-7 away). Under ``torch.compile`` and during CUDA-graph
capture the op always runs (one graph for every routing; strength 0 is then exact up to that rounding).

:class:`FusedPatch` is this mode's :class:`~lineas_fast.patching.patch.Patch`. Its device-side
:class:`Routing` buffers are a mirror of the shared tables' routing (``SteeringTables``, the one routing
state of a steered model), written only through :meth:`FusedPatch.set_rows`. Installing and removing the
stand-ins, and ``set_rows``, are all or nothing: should any step fail, what was done is undone and the
error re-raised.

Sites the fused runtime does not cover (support-clamped maps, modules that are neither a known norm nor
a Linear, a second site on a Linear that already carries one) fall back to hooks, with one warning line
naming them.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import SteeringError
from ..sites import Site, family
from .patch import Patch
from .tables import row_identity

ROUTING_CAPACITY = 64  # routing rows preallocated (a larger route() reallocates: one recompile)


def norm_spec(model, spec: str):
    """``(kind, eps, weight_offset)`` if ``spec`` is the output of a norm module the op covers, else None."""
    from ..ops.reference import LAYERNORM, RMSNORM

    site = Site.parse(spec)
    if site.is_input or site.index is not None:
        return None
    module = model.get_submodule(site.module)
    cls = type(module).__name__.lower()
    weight = getattr(module, "weight", None)
    if weight is not None and not isinstance(weight, nn.Parameter):
        return None
    if isinstance(module, nn.LayerNorm):
        if len(module.normalized_shape) != 1:
            return None
        return LAYERNORM, float(module.eps), 0.0
    if "rmsnorm" in cls and weight is not None and weight.dim() == 1:
        eps = getattr(module, "variance_epsilon", getattr(module, "eps", None))
        if eps is None:
            eps = torch.finfo(weight.dtype).eps
        fam = family(model)
        return RMSNORM, float(eps), (fam.norm_offset if fam else 0.0)
    return None


# The backend registry decides (lineas_fast.backends); re-exported here for ``patching`` and old imports.
from ..backends import BACKENDS, Unavailable, resolve_backend  # noqa: E402,F401


def _is_linear(m: nn.Module) -> bool:
    return type(m) is nn.Linear or type(m).__name__ == "Conv1D"


def linear_spec(model, spec: str):
    """``(linear module name, where)`` if ``spec`` is a Linear's input/output (or an alias of one)."""
    from ..ops.reference import EPILOGUE, PROLOGUE
    from .fold import _split_block

    site = Site.parse(spec)
    module = model.get_submodule(site.module)
    if _is_linear(module) and (site.is_input or site.index is None):
        return site.module, (PROLOGUE if site.is_input else EPILOGUE)
    fam = family(model)
    prefix, rel = _split_block(model, site.module)
    rel_spec = rel + spec[len(site.module):]
    if fam and not site.is_input and rel_spec in fam.linear_alias:
        target = prefix + fam.linear_alias[rel_spec]
        if _is_linear(model.get_submodule(target)):
            return target, EPILOGUE
    return None


def plan_fused(model, steerings: dict, sites: list[str]) -> tuple[list[str], dict[str, str]]:
    """Split sites into fused ones and ``{site: why not}`` for those left to hooks."""
    fused, left, taken = [], {}, {}
    for spec in sites:
        if any(spec in st.support for st in steerings.values()):
            left[spec] = "support-clamped map"
        elif norm_spec(model, spec) is not None:
            fused.append(spec)
        elif (lin := linear_spec(model, spec)) is not None:
            if lin[0] in taken:
                left[spec] = f"{lin[0]} already carries site {taken[lin[0]]!r}"
            else:
                taken[lin[0]] = spec
                fused.append(spec)
        else:
            left[spec] = "not a LayerNorm/RMSNorm or Linear site"
    return fused, left


class Routing:
    """Device-side routing buffers of fixed capacity (``ids``, ``strength``, ``nrows``); updated in place.

    A mirror of the shared tables' routing on one device, for the fused ops to read; only
    :meth:`FusedPatch.set_rows` writes it."""

    def __init__(self, device, capacity: int = ROUTING_CAPACITY):
        self.device = device
        self.ids = torch.full((capacity,), -1, dtype=torch.long, device=device)
        self.strength = torch.zeros(capacity, device=device)
        self.nrows = torch.ones(1, dtype=torch.long, device=device)
        self.rows = 1
        self.grew = False
        self.identity = False  # every live row at effective strength 0 (host-side, set by set())

    def state(self) -> tuple:
        """Everything ``set`` may change, copied: for :meth:`restore` after a failed update."""
        return (self.ids, self.strength, self.ids.clone(), self.strength.clone(), self.nrows.clone(), self.rows,
                self.grew, self.identity)

    def restore(self, state: tuple) -> None:
        """Put back a :meth:`state` (the same buffer objects, their values bit-exactly)."""
        ids, strength, ids_v, strength_v, nrows_v, self.rows, self.grew, self.identity = state
        self.ids, self.strength = ids, strength
        self.ids.copy_(ids_v)
        self.strength.copy_(strength_v)
        self.nrows.copy_(nrows_v)

    def set(self, ids: torch.Tensor, strength: torch.Tensor) -> None:
        """Copy a routing (CPU ``ids``/``strength``, R rows) into the buffers; grows them past capacity."""
        identity = row_identity(ids.cpu(), strength.cpu())
        r = ids.numel()
        if r > self.ids.numel():  # new storage: compiled graphs holding the old buffers must re-trace
            self.ids = torch.full((r,), -1, dtype=torch.long, device=self.device)
            self.strength = torch.zeros(r, device=self.device)
            self.grew = True
        self.ids[:r].copy_(ids, non_blocking=True)
        self.strength[:r].copy_(strength, non_blocking=True)
        self.nrows.fill_(r)
        self.rows = r
        self.identity = identity

    def check(self, batch: int) -> None:
        if self.rows != 1 and batch % self.rows:
            raise SteeringError(f"batch of {batch} rows does not match the {self.rows} rows given to "
                                f"route()/set_strength() (nor a multiple of it)")


class _FusedSite(nn.Module):
    """What both stand-ins share: the original's weight/bias Parameters (same ``state_dict`` keys), the
    live steering tables as non-persistent buffers, the routing, the op chosen at patch time, and
    attribute fall-through to the original module (which stays outside the module tree)."""

    def __init__(self, original: nn.Module, scale: torch.Tensor, shift: torch.Tensor, routing: Routing, fn):
        super().__init__()
        self.weight = getattr(original, "weight", None)
        bias = getattr(original, "bias", None)
        self.bias = bias if isinstance(bias, nn.Parameter) else None
        object.__setattr__(self, "original", original)  # not a submodule: state_dict keys stay the same
        self.register_buffer("table_scale", scale, persistent=False)
        self.register_buffer("table_shift", shift, persistent=False)
        self.routing = routing
        self.fn = fn
        self.training = original.training

    def _routing(self, x: torch.Tensor) -> Routing:
        if not torch.compiler.is_compiling():
            self.routing.check(x.shape[0])
        return self.routing

    def _unsteered(self) -> bool:
        """Run the original module instead of the op: every row at strength 0, eagerly (not while
        compiling or capturing a CUDA graph, whose replays must follow later routing changes)."""
        # is_compiling() first: dynamo folds it to True and never reads (nor guards on) the flag
        return (not torch.compiler.is_compiling() and self.routing.identity
                and not (torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()))

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(object.__getattribute__(self, "original"), name)


class FusedNorm(_FusedSite):
    """Stands in for one norm module: ``norm_affine(x, weight, bias, ...)`` with the live tables."""

    def __init__(self, original: nn.Module, kind: int, eps: float, offset: float, scale: torch.Tensor,
                 shift: torch.Tensor, routing: Routing, fn):
        super().__init__(original, scale, shift, routing, fn)
        self.kind, self.eps, self.offset = kind, eps, offset

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        r = self._routing(x)
        if self._unsteered():
            return self.original(x)
        return self.fn(x, self.weight, self.bias, self.eps, self.kind, self.offset, self.table_scale,
                       self.table_shift, r.ids, r.strength, r.nrows)

    def extra_repr(self) -> str:
        return f"fused {type(self.original).__name__}, kind={self.kind}, eps={self.eps}, offset={self.offset}"


class FusedLinear(_FusedSite):
    """Stands in for one Linear (or GPT-2 Conv1D): ``steered_linear`` with the live tables."""

    def __init__(self, original: nn.Module, where: int, scale, shift, routing: Routing, fn):
        super().__init__(original, scale, shift, routing, fn)
        self.transposed = type(original).__name__ == "Conv1D"  # Conv1D stores W as [in, out]
        self.where = where

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        r = self._routing(x)
        if self._unsteered():
            return self.original(x)
        w = self.weight.t() if self.transposed else self.weight
        return self.fn(x, w, self.bias, self.where, self.table_scale, self.table_shift, r.ids, r.strength, r.nrows)

    def extra_repr(self) -> str:
        return f"fused {type(self.original).__name__}, {'prologue' if self.where == 0 else 'epilogue'}"


def _parent(model, name: str) -> tuple[nn.Module, str]:
    parent, _, child = name.rpartition(".")
    return (model.get_submodule(parent) if parent else model), child


class FusedPatch(Patch):
    """Installs :class:`FusedNorm`/:class:`FusedLinear` stand-ins and keeps the originals for exact removal.

    Every site's implementation is resolved and every stand-in built before the first one is installed;
    installation, :meth:`set_rows` and :meth:`remove` are all or nothing. ``tables`` needs ``scale`` /
    ``shift`` per site (a :class:`SteeringTables`, or any object with those dicts); where it maps rows
    through a ``row_index`` (a pipeline's CFG-doubled batch), only one routed row can be served."""

    def __init__(self, model, sites: list[str], tables, backend: str | None = None):
        self.model, self.originals, self.routings, self.stand_ins = model, {}, {}, {}
        self._row_index = getattr(tables, "row_index", None) is not None
        fns, plan = {}, []
        for spec in sites:  # resolve every site's implementation before touching the model
            device = tables.scale[spec].device
            if device not in fns:
                fns[device] = resolve_backend(backend, device)
            norm = norm_spec(model, spec)
            fn = fns[device][0 if norm is not None else 1]
            if isinstance(fn, Unavailable):  # an explicit backend without this op (e.g. 'cuda', Linear sites)
                raise SteeringError(f"site {spec!r}: {fn.message}")
            plan.append((spec, device, norm, fn))
        built = []  # (spec, parent, child, original, stand-in): nothing installed yet
        for spec, device, norm, fn in plan:
            routing = self.routings.setdefault(device, Routing(device))
            if norm is not None:
                name = spec
                module = model.get_submodule(name)
                new = FusedNorm(module, *norm, tables.scale[spec], tables.shift[spec], routing, fn)
            else:
                name, where = linear_spec(model, spec)
                module = model.get_submodule(name)
                new = FusedLinear(module, where, tables.scale[spec], tables.shift[spec], routing, fn)
            built.append((spec, *_parent(model, name), module, new))
        try:
            for spec, parent, child, module, new in built:
                setattr(parent, child, new)
                self.originals[spec] = (parent, child, module)
                self.stand_ins[spec] = new
        except BaseException:
            self.remove()
            raise

    def check_rows(self, ids: torch.Tensor, strength: torch.Tensor, what: str, shown) -> None:
        """The fused ops expand routed rows by the plain rule only (row ``i // k``), not a ``row_index``."""
        if self._row_index and ids.numel() > 1:
            raise SteeringError(f"{what}: per-prompt strengths or routes on a pipeline need mode='hooks' (the "
                                f"fused kernels expand rows for generate(), not for a CFG-doubled denoiser batch)")

    def set_rows(self, ids: torch.Tensor, strength: torch.Tensor) -> None:
        """The same routing into every device's buffers; on failure every buffer is put back."""
        states = [(routing, routing.state()) for routing in self.routings.values()]
        try:
            for routing in self.routings.values():
                routing.set(ids, strength)
        except BaseException:
            for routing, state in states:
                routing.restore(state)
            raise

    def bind_tables(self, spec: str, scale: torch.Tensor, shift: torch.Tensor) -> None:
        """Make site ``spec`` read new ``[K, d]`` tables (e.g. a fit's live parameters, so gradients reach
        them); ``set_strength``/``route`` keep writing into the routing buffers only."""
        parent, child, _ = self.originals[spec]
        stand_in = getattr(parent, child)
        stand_in.table_scale, stand_in.table_shift = scale, shift

    def remove(self) -> None:
        """Put every original module back; should one fail, the stand-ins already removed go back in."""
        done = []
        try:
            for spec, (parent, child, module) in self.originals.items():
                setattr(parent, child, module)
                done.append(spec)
        except BaseException:
            for spec in done:
                parent, child, _ = self.originals[spec]
                setattr(parent, child, self.stand_ins[spec])
            raise
        self.originals, self.stand_ins = {}, {}
