"""SteerHandle: what ``steer_`` returns — change strength or routing, or remove the steering.

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
from .fold import fold_into, refold
from .fused import FusedPatch, plan_fused
from .hooks import install_hooks
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
        self._hooks, self._editor, self._strength, self._fused = [], None, None, None
        self._untrack = None
        self.tables = None
        s = _as_strength(strength, "steer_()")
        with model_lock(model):
            if getattr(model, ATTR, None) is not None:
                raise SteeringError("model is already steered: remove() the existing handle first")
            if mode in ("hooks", "fused"):
                self._attach_live(s, backend)
            else:  # fold: one steering at one fixed strength
                self._attach_fold(s)

    def _attach_live(self, s: torch.Tensor, backend) -> None:
        """hooks / fused: plan everything (tables, routing, stand-ins), then install all or nothing."""
        model = self.model
        devices = {site: _site_device(model, site) for site in self.sites}
        tables = SteeringTables(self.steerings, self.sites, devices)
        if is_view(model):  # e.g. CFG-doubled denoiser batches follow their prompt (lineas_fast.views)
            tables.row_index = model.row_index
        hooked, fused = self.sites, []
        if self.mode == "fused":
            fused, left = plan_fused(model, self.steerings, self.sites)
            if left:
                names = list(left)
                warnings.warn(f"mode='fused' covers {len(fused)} of {len(self.sites)} sites; hooks serve "
                              f"{names[:2]}{' +%d more' % (len(names) - 2) if len(names) > 2 else ''} "
                              f"({left[names[0]]})", stacklevel=4)
            hooked = list(left)
        self.tables = tables
        if len(self.names) == 1:
            ids, rows = self._plan_strength(s, "steer_()")
        else:  # several steerings: rows stay unsteered until route() names them
            ids, rows = torch.full((1,), -1), torch.zeros(1)
        tables.set_rows(ids, rows)  # the tables are not reachable from the model yet
        undo = []
        try:
            if self.mode == "fused":
                self._fused = FusedPatch(model, fused, tables, backend)  # installs all or nothing
                undo.append(self._fused.remove)
                self._fused.set_rows(tables.ids, tables.strength)
            self._hooks = install_hooks(model, hooked, tables)  # all or nothing
            undo.append(self._remove_hooks)
            if tables.row_index is not None:
                self._untrack = model.track_layout()
                undo.append(self._stop_tracking)
            setattr(model, ATTR, self)
        except BaseException:
            for step in reversed(undo):
                step()
            self._fused = None
            raise

    def _attach_fold(self, s: torch.Tensor) -> None:
        if s.numel() != 1:
            raise SteeringError(f"steer_(): strength={s.tolist()} has {s.numel()} rows, but mode='fold' has "
                                f"one fixed strength: per-row strengths need mode='hooks'")
        st = self.steerings[self.names[0]]
        editor = fold_into(self.model, st.sites, st.scale, st.shift, float(s))  # all or nothing
        try:
            setattr(self.model, ATTR, self)
        except BaseException:
            editor.restore()
            raise
        self._editor, self._strength = editor, float(s)

    def _remove_hooks(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []

    def _stop_tracking(self) -> None:
        if self._untrack is not None:
            self._untrack()
            self._untrack = None

    # ------------------------------------------------------------ strength and routing
    def _plan_strength(self, s: torch.Tensor, what: str) -> tuple[torch.Tensor, torch.Tensor]:
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
        self._check_rows(ids, what)
        return ids, s

    def _check_rows(self, ids: torch.Tensor, what: str) -> None:
        if self._fused is not None and self.tables.row_index is not None and ids.numel() > 1:
            raise SteeringError(f"{what}: per-prompt strengths or routes on a pipeline need mode='hooks' (the "
                                f"fused kernels expand rows for generate(), not for a CFG-doubled denoiser batch)")

    def _commit_rows(self, ids: torch.Tensor, strength: torch.Tensor) -> None:
        """Tables and fused routing buffers together, or neither."""
        before = self.tables._state  # one immutable tuple (tables.py): putting it back is exact
        self.tables.set_rows(ids, strength)
        if self._fused is not None:
            try:
                self._fused.set_rows(self.tables.ids, self.tables.strength)  # all or nothing itself
            except BaseException:
                self.tables._state = before
                raise

    def set_strength(self, strength) -> None:
        """A float (every row) or a tensor ``[batch]`` (per row). Routing names are kept.

        Checked before anything changes (finite real numbers; per-row counts matching the routing) and
        applied all or nothing; atomic with respect to the model's other steering calls."""
        s = _as_strength(strength, "set_strength()")
        with model_lock(self.model):
            self._check_live()
            if self.mode == "fold":
                if s.numel() != 1:
                    raise SteeringError(f"set_strength(): strength={strength!r} has {s.numel()} rows, but "
                                        f"mode='fold' has one fixed strength: per-row strengths need mode='hooks'")
                st = self.steerings[self.names[0]]
                # refold from the saved originals (never divide back); keeps the old fold on failure
                self._editor = refold(self.model, self._editor, st.sites, st.scale, st.shift, float(s))
                self._strength = float(s)
                return
            self._commit_rows(*self._plan_strength(s, "set_strength()"))

    def route(self, names, strength=1.0) -> None:
        """Per input row: a steering name (or None = unsteered) and a strength (float or list/tensor).

        Checked before anything changes and applied all or nothing; atomic with respect to the model's
        other steering calls (the routing itself is shared by every forward of the model)."""
        with model_lock(self.model):
            self._check_live()
            if self.mode == "fold":
                raise SteeringError("route(): mode='fold' has one fixed steering and strength; per-row "
                                    "routing needs mode='hooks' or 'fused'")
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
            self._check_rows(ids, "route()")
            self._commit_rows(ids, s.expand(len(names)).clone())

    @property
    def strength(self):
        return self._strength if self.mode == "fold" else self.tables.strength.clone()

    # ------------------------------------------------------------ removal
    def remove(self) -> None:
        """Undo the patch: hooks removed / originals put back; the model is as before ``steer_``.
        Idempotent; the stand-ins and folded weights come back all or nothing (on a failure the handle
        stays live and the model steered as it was)."""
        with model_lock(self.model):
            if getattr(self.model, ATTR, None) is not self:
                return
            if self._fused is not None:
                self._fused.remove()  # all or nothing
                self._fused = None
            if self._editor is not None:
                self._editor.restore()  # all or nothing
                self._editor = None
            self._remove_hooks()
            self._stop_tracking()
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
