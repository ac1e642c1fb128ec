"""SteerHandle: what ``steer_`` returns — change strength or routing, or remove the steering."""

from __future__ import annotations

import warnings

import torch

from ..errors import SteeringError
from .fold import fold_into
from .fused import FusedPatch, plan_fused
from .hooks import install_hooks
from .tables import SteeringTables
from ..views import is_view

ATTR = "_lineas_fast_handle"  # set on a patched model instance; patching twice raises


class SteerHandle:
    """A live steering patch on one model instance.

    ``set_strength``/``route`` only rewrite routing state (never re-patch); ``remove`` restores the model
    bit-exactly (outputs and ``state_dict``).
    """

    def __init__(self, model, steerings: dict, mode: str, strength, backend: str | None = None):
        self.model, self.steerings, self.mode = model, steerings, mode
        self.names = list(steerings)
        self.sites = list(dict.fromkeys(s for st in steerings.values() for s in st.sites))
        self._hooks, self._editor, self._strength, self._fused = [], None, None, None
        self._untrack = None
        if mode in ("hooks", "fused"):
            devices = {s: _site_device(model, s) for s in self.sites}
            self.tables = SteeringTables(steerings, self.sites, devices)
            if is_view(model):  # e.g. CFG-doubled denoiser batches follow their prompt (lineas_fast.views)
                self.tables.row_index = model.row_index
            hooked = self.sites
            if mode == "fused":
                fused, left = plan_fused(model, steerings, self.sites)
                if left:
                    names = list(left)
                    warnings.warn(f"mode='fused' covers {len(fused)} of {len(self.sites)} sites; hooks serve "
                                  f"{names[:2]}{' +%d more' % (len(names) - 2) if len(names) > 2 else ''} "
                                  f"({left[names[0]]})", stacklevel=3)
                self._fused = FusedPatch(model, fused, self.tables, backend)
                hooked = list(left)
            self._set_initial(strength)
            self._hooks = install_hooks(model, hooked, self.tables)
            if self.tables.row_index is not None:
                self._untrack = model.track_layout()
        else:  # fold: one steering at one fixed strength
            st = steerings[self.names[0]]
            self._strength = float(strength)
            self._editor = fold_into(model, st.sites, st.scale, st.shift, self._strength)
        setattr(model, ATTR, self)

    # ------------------------------------------------------------ strength and routing
    def _set_initial(self, strength) -> None:
        if len(self.names) == 1:
            self._apply_strength(strength)
        else:  # several steerings: rows stay unsteered until route() names them
            self._set_rows(torch.full((1,), -1), torch.zeros(1))

    def _apply_strength(self, strength) -> None:
        s = _as_strength(strength)
        # one steering has no routing: its rows are whatever the new strength says (not the old row count)
        ids = torch.zeros(s.numel(), dtype=torch.long) if len(self.names) == 1 else self.tables.ids
        if s.numel() > 1:
            if ids.numel() not in (1, s.numel()):
                raise SteeringError(f"strength has {s.numel()} rows but route() was given {ids.numel()}")
            ids = ids.expand(s.numel()).clone() if ids.numel() == 1 else ids
        elif ids.numel() > 1:
            s = s.expand(ids.numel()).clone()
        self._set_rows(ids, s)

    def _set_rows(self, ids: torch.Tensor, strength: torch.Tensor) -> None:
        if self._fused is not None and self.tables.row_index is not None and ids.numel() > 1:
            raise SteeringError("per-prompt strengths or routes on a pipeline need mode='hooks' (the fused "
                                "kernels expand rows for generate(), not for a CFG-doubled denoiser batch)")
        self.tables.set_rows(ids, strength)
        if self._fused is not None:
            self._fused.set_rows(self.tables.ids, self.tables.strength)

    def set_strength(self, strength) -> None:
        """A float (every row) or a tensor ``[batch]`` (per row). Routing names are kept."""
        self._check_live()
        if self.mode == "fold":
            s = _as_strength(strength)
            if s.numel() != 1:
                raise SteeringError("mode='fold' has one fixed strength: per-row strengths need mode='hooks'")
            self._editor.restore()  # refold from the saved originals (never divide back)
            st = self.steerings[self.names[0]]
            self._editor = fold_into(self.model, st.sites, st.scale, st.shift, float(s))
            self._strength = float(s)
            return
        self._apply_strength(strength)

    def route(self, names, strength=1.0) -> None:
        """Per input row: a steering name (or None = unsteered) and a strength (float or list/tensor)."""
        self._check_live()
        if self.mode == "fold":
            raise SteeringError("route() needs per-row steering: use mode='hooks'")
        if isinstance(names, str) or not isinstance(names, (list, tuple)) or not names:
            raise SteeringError(f"route(names=...): expected a non-empty list of names or None, got {names!r}")
        unknown = [n for n in names if n is not None and n not in self.names]
        if unknown:
            raise SteeringError(f"route(): steering name(s) {unknown} not loaded (loaded: {self.names})")
        s = _as_strength(strength)
        if s.numel() not in (1, len(names)):
            raise SteeringError(f"route(): {len(names)} names but {s.numel()} strengths")
        ids = torch.tensor([-1 if n is None else self.names.index(n) for n in names])
        self._set_rows(ids, s.expand(len(names)).clone())

    @property
    def strength(self):
        return self._strength if self.mode == "fold" else self.tables.strength.clone()

    # ------------------------------------------------------------ removal
    def remove(self) -> None:
        """Undo the patch: hooks removed / originals copied back; the model is as before ``steer_``."""
        if getattr(self.model, ATTR, None) is not self:
            return
        for h in self._hooks:
            h.remove()
        self._hooks = []
        if self._fused is not None:
            self._fused.remove()
            self._fused = None
        if self._editor is not None:
            self._editor.restore()
            self._editor = None
        if self._untrack is not None:
            self._untrack()
            self._untrack = None
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


def _as_strength(strength) -> torch.Tensor:
    s = torch.as_tensor(strength, dtype=torch.float32).detach().cpu().reshape(-1)
    if s.numel() == 0 or not torch.isfinite(s).all():
        raise SteeringError(f"strength must be finite and non-empty, got {strength!r}")
    return s


def _site_device(model, site: str):
    from ..sites import Site

    module = model.get_submodule(Site.parse(site).module)
    p = next(module.parameters(), None)
    if p is None:
        p = next(model.parameters())
    return p.device
