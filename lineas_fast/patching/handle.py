"""SteerHandle: what ``steer_`` returns — change strength or routing, or remove the steering.

A handle owns the model's one routing state (a :class:`~lineas_fast.patching.tables.SteeringTables`, in
every mode) and the :class:`~lineas_fast.patching.patch.Patch` objects that put the steerings on the
model: ``hooks`` → a :class:`HookPatch`; ``fused`` → a :class:`FusedPatch` plus a :class:`HookPatch` for
the sites it does not cover; ``fold`` → a :class:`FoldPatch`; on a pipeline view, a
:class:`LayoutTracking` as well where rows are routed at run time. ``set_strength`` and ``route`` plan
the rows once, then commit them to the tables and every patch; ``remove`` removes every patch.

Every handle call checks its arguments before anything changes, then applies its change all or nothing
(a failure half-way undoes what was done and re-raises). A model's steering state — whether it is
steered, its hooks, stand-in modules, folded weights and routing — is guarded by one re-entrant lock per
model (:func:`model_lock`), so ``steer_``, ``set_strength``, ``route``, ``remove`` and ``bake`` on one
model run one at a time, and the "already steered" check and the patch it guards are one atomic step.
"""

from __future__ import annotations

import numbers
import threading
import warnings
import weakref

import torch

from ..errors import SteeringError
from .fold import FoldPatch
from .fused import FusedPatch, plan_fused
from .hooks import HookPatch
from .patch import Patch
from .tables import SteeringTables
from ..views import is_view

ATTR = "_lineas_fast_handle"  # set on a patched model instance; patching twice raises

# one lock per model, kept outside the model (deepcopy / pickle of a model never meet a lock) and
# dropped with it
_LOCKS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_LOCKS_GUARD = threading.Lock()


def model_lock(model) -> threading.RLock:
    """The re-entrant lock guarding ``model``'s steering state (created on first use)."""
    with _LOCKS_GUARD:
        lock = _LOCKS.get(model)
        if lock is None:
            lock = _LOCKS[model] = threading.RLock()
        return lock


class LayoutTracking(Patch):
    """A view's batch-layout tracking (``track_layout``), which its ``row_index`` reads at run time."""

    def __init__(self, view):
        self._untrack = view.track_layout()

    def set_rows(self, ids, strength) -> None:
        """Nothing to do: the layout is the batch's, not the routing's."""

    def remove(self) -> None:
        if self._untrack is not None:
            self._untrack()
            self._untrack = None


class SteerHandle:
    """A live steering patch on one model instance.

    ``set_strength``/``route`` only rewrite routing state (never re-patch; ``fold`` mode refolds from the
    saved originals); ``remove`` restores the model bit-exactly (outputs and ``state_dict``).

    Thread safety: every method may be called from any thread. Calls on the handles of one model are
    serialised by the model's lock, each is atomic (validated first, then applied all or nothing), and a
    call on a removed handle raises :class:`SteeringError` (``remove`` is idempotent). The routing is per
    model, not per thread or per forward: a forward running while another thread calls
    ``set_strength``/``route``/``remove`` may see the old or the new routing, differently at different
    sites — serialise forwards with routing changes yourself where that matters.
    """

    def __init__(self, model, steerings: dict, mode: str, strength, backend: str | None = None):
        self.model, self.steerings, self.mode = model, steerings, mode
        self.names = list(steerings)
        self.sites = list(dict.fromkeys(s for st in steerings.values() for s in st.sites))
        self.patches: list[Patch] = []
        s = _as_strength(strength, "steer_()")
        with model_lock(model):
            if getattr(model, ATTR, None) is not None:
                raise SteeringError("model is already steered: remove() the existing handle first")
            devices = {site: _site_device(model, site) for site in self.sites}
            self.tables = SteeringTables(steerings, self.sites, devices)
            if is_view(model):  # e.g. CFG-doubled denoiser batches follow their prompt (lineas_fast.views)
                self.tables.row_index = model.row_index
            if len(self.names) == 1:
                ids, rows = self._plan_strength(s, "steer_()", s.tolist())
            else:  # several steerings: rows stay unsteered until route() names them
                ids, rows = torch.full((1,), -1), torch.zeros(1)
            fused, hooked = self._plan_sites(ids, rows, s.tolist())
            self.tables.set_rows(ids, rows)  # the tables are not reachable from the model yet
            self._install(fused, hooked, backend)

    def _plan_sites(self, ids: torch.Tensor, rows: torch.Tensor, shown) -> tuple[list[str] | None, list[str]]:
        """Which sites the fused stand-ins serve (None: no FusedPatch) and which hooks serve; nothing changes.
        (Called by ``__init__`` only: the warning's stacklevel points at the caller of ``steer_``.)"""
        if self.mode == "fold":  # one steering at one fixed strength
            FoldPatch.check_rows(ids, rows, "steer_()", shown)
            return None, []
        if self.mode != "fused":
            return None, self.sites
        fused, left = plan_fused(self.model, self.steerings, self.sites)
        if left:
            names = list(left)
            warnings.warn(f"mode='fused' covers {len(fused)} of {len(self.sites)} sites; hooks serve "
                          f"{names[:2]}{' +%d more' % (len(names) - 2) if len(names) > 2 else ''} "
                          f"({left[names[0]]})", stacklevel=4)
        return fused, list(left)

    def _install(self, fused, hooked, backend) -> None:
        """Every patch (each installs all or nothing), then the model's mark; on a failure, what was
        installed is removed again. Fused stand-ins go first: a hook on a site of a replaced Linear sits on
        its stand-in."""
        model, tables, patches = self.model, self.tables, []
        try:
            if self.mode == "fold":
                st = self.steerings[self.names[0]]
                patches.append(FoldPatch(model, st.sites, st.scale, st.shift, float(tables.strength[0])))
            else:
                if fused is not None:
                    patches.append(FusedPatch(model, fused, tables, backend))
                    patches[-1].set_rows(tables.ids, tables.strength)
                patches.append(HookPatch(model, hooked, tables))
                if tables.row_index is not None:
                    patches.append(LayoutTracking(model))
            self.patches = patches
            setattr(model, ATTR, self)
        except BaseException:
            self.patches = []
            _remove_all(patches)
            raise

    # ------------------------------------------------------------ strength and routing
    def _plan_strength(self, s: torch.Tensor, what: str, shown) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``(ids, strength)`` rows a new strength gives (nothing changes; raises on a mismatch)."""
        # one steering has no routing: its rows are whatever the new strength says (not the old row count)
        ids = torch.zeros(s.numel(), dtype=torch.long) if len(self.names) == 1 else self.tables.ids
        if s.numel() > 1:
            if ids.numel() not in (1, s.numel()):
                raise SteeringError(f"{what}: strength has {s.numel()} rows but route() was given {ids.numel()} "
                                    f"(valid: one strength, or one per routed row)")
            ids = ids.expand(s.numel()).clone() if ids.numel() == 1 else ids
        elif ids.numel() > 1:
            s = s.expand(ids.numel()).clone()
        self._check_rows(ids, s, what, shown)
        return ids, s

    def _check_rows(self, ids: torch.Tensor, s: torch.Tensor, what: str, shown) -> None:
        for patch in self.patches:
            patch.check_rows(ids, s, what, shown)

    def _commit_rows(self, ids: torch.Tensor, strength: torch.Tensor) -> None:
        """The tables and every patch together, or none: on a failure the previous routing is put back
        (the failing patch puts itself back; those already moved are set to the previous rows again)."""
        before = self.tables.routing()
        self.tables.set_rows(ids, strength)
        done = []
        try:
            for patch in self.patches:
                patch.set_rows(self.tables.ids, self.tables.strength)  # all or nothing itself
                done.append(patch)
        except BaseException:
            self.tables.restore_routing(before)
            for patch in reversed(done):
                patch.set_rows(self.tables.ids, self.tables.strength)
            raise

    def set_strength(self, strength) -> None:
        """A float (every row) or a tensor ``[batch]`` (per row). Routing names are kept.

        Checked before anything changes (finite real numbers; per-row counts matching the routing) and
        applied all or nothing; atomic with respect to the model's other steering calls."""
        s = _as_strength(strength, "set_strength()")
        with model_lock(self.model):
            self._check_live()
            self._commit_rows(*self._plan_strength(s, "set_strength()", repr(strength)))

    def route(self, names, strength=1.0) -> None:
        """Per input row: a steering name (or None = unsteered) and a strength (float or list/tensor).

        Checked before anything changes and applied all or nothing; atomic with respect to the model's
        other steering calls (the routing itself is shared by every forward of the model)."""
        with model_lock(self.model):
            self._check_live()
            for patch in self.patches:
                patch.check_route("route()")
            if isinstance(names, str) or not isinstance(names, (list, tuple)) or not names:
                raise SteeringError(f"route(): names={names!r} is not valid; expected a non-empty list of "
                                    f"steering names (loaded: {self.names}) or None, one per input row")
            wrong = [n for n in names if n is not None and not isinstance(n, str)]
            if wrong:
                raise SteeringError(f"route(): names={names!r} holds {wrong!r}; expected a steering name "
                                    f"(loaded: {self.names}) or None per row")
            unknown = [n for n in names if n is not None and n not in self.names]
            if unknown:
                raise SteeringError(f"route(): steering name(s) {unknown} not loaded (loaded: {self.names})")
            s = _as_strength(strength, "route()")
            if s.numel() not in (1, len(names)):
                raise SteeringError(f"route(): {len(names)} names but {s.numel()} strengths "
                                    f"(strength={strength!r}); expected one strength or one per name")
            ids = torch.tensor([-1 if n is None else self.names.index(n) for n in names])
            s = s.expand(len(names)).clone()
            self._check_rows(ids, s, "route()", repr(strength))
            self._commit_rows(ids, s)

    @property
    def strength(self):
        """Strength per routed row (a tensor); ``fold`` mode: its one strength (a float)."""
        if self.mode == "fold":
            return float(self.tables.strength[0])
        return self.tables.strength.clone()

    # ------------------------------------------------------------ removal
    def remove(self) -> None:
        """Undo the patch: hooks removed / originals put back; the model is as before ``steer_``.
        Idempotent; the stand-ins and folded weights come back all or nothing (on a failure the handle
        stays live and the model steered as it was)."""
        with model_lock(self.model):
            if getattr(self.model, ATTR, None) is not self:
                return
            _remove_all(self.patches)
            delattr(self.model, ATTR)

    def _check_live(self) -> None:
        if getattr(self.model, ATTR, None) is not self:
            raise SteeringError("this steering handle was removed")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()

    def __repr__(self) -> str:
        return f"SteerHandle(mode={self.mode!r}, steerings={self.names}, sites={len(self.sites)})"


def _remove_all(patches: list[Patch]) -> None:
    """Remove every patch, in the order installed: the fused stand-ins and a fold (the removals that can
    fail, each all or nothing) come before the hooks registered on top of them and the layout tracking
    (whose removal cannot fail), so a failure leaves every patch installed as it was."""
    for patch in patches:
        patch.remove()


_VALID_STRENGTH = "a finite real number, or a non-empty 1-D tensor/list of finite real numbers (one per row)"


def _as_strength(strength, what: str = "strength") -> torch.Tensor:
    """``strength`` as a float32 CPU tensor ``[R]``: a real number (Python/NumPy, not bool), a list/tuple of
    them, or a 0-D/1-D real tensor or array. Anything else — NaN/inf, empty, bool, complex, strings, None,
    tensors of more dimensions — raises :class:`SteeringError` naming ``what``, the value and what is valid."""
    def bad(why: str) -> SteeringError:
        return SteeringError(f"{what}: strength={strength!r} is not valid ({why}); expected {_VALID_STRENGTH}")

    def real(x) -> bool:
        return isinstance(x, numbers.Real) and not isinstance(x, bool)

    value = strength
    if not isinstance(value, torch.Tensor) and not real(value) and type(value).__module__ == "numpy" \
            and hasattr(value, "dtype"):  # a NumPy array (NumPy real scalars are numbers.Real)
        try:
            value = torch.as_tensor(value)
        except (TypeError, ValueError, RuntimeError):
            raise bad(f"a NumPy array of dtype {value.dtype}") from None
    if isinstance(value, torch.Tensor):
        if value.dtype == torch.bool or value.is_complex() or not (value.is_floating_point() or value.dtype in (
                torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)):
            raise bad(f"a {value.dtype} tensor")
        if value.is_meta:
            raise bad("a meta tensor has no values")
        if value.dim() > 1:
            raise bad(f"a tensor of shape {tuple(value.shape)}")
        s = value.detach().to("cpu", torch.float32).reshape(-1)
    elif real(value):
        s = torch.tensor([float(value)])
    elif isinstance(value, (list, tuple)):
        items = []
        for x in value:
            if isinstance(x, torch.Tensor) and x.numel() == 1 and x.dim() <= 1 and not x.is_meta and \
                    x.dtype != torch.bool and not x.is_complex():
                x = x.detach().cpu().item()
            if not real(x):
                raise bad(f"element {x!r} is not a real number")
            items.append(float(x))
        s = torch.tensor(items, dtype=torch.float32)
    else:
        raise bad(f"got {type(strength).__name__}")
    if s.numel() == 0:
        raise bad("empty")
    if not torch.isfinite(s).all():
        raise bad("not finite")
    return s


def _site_device(model, site: str):
    from ..sites import Site

    module = model.get_submodule(Site.parse(site).module)
    p = next(module.parameters(), None)
    if p is None:
        p = next(model.parameters())
    return p.device
