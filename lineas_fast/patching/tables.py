"""Steering tables: the per-site (ω, b) of every loaded steering, plus per-row routing state.

Rows of a batch carry a steering id (-1 = unsteered) and a strength. For row r at a site,
``a = 1 + s_r(ω[id_r] − 1)`` and ``c = s_r·b[id_r]``, and ``h ← a⊙h + c`` in fp32 (SPEC §2 strength).
A routing table with R rows serves any batch of R·k rows (``generate`` expanding each input row into
k beams / return sequences): expanded row i inherits row ``i // k``.
Where a steering carries a support clamp at a site, its rows apply the map only where ``lo < h < hi``
(other steerings at that site get ±inf bounds, i.e. no clamp); unclamped sites take the plain path.

These tables hold THE routing state of a steered model: every patch of a handle (hooks, fused stand-ins,
a fold) follows it, none keeps a routing of its own but as a mirror written through its ``set_rows``.
The routing state (ids, strengths, whether every row is unsteered, the coefficient cache) is one tuple that
``set_rows`` replaces in a single assignment, so a forward reading it concurrently sees either the old
routing or the new one, never a mix. When every row's effective strength is exactly 0, ``apply``
returns its input itself: strength 0 is bit-identical to the unsteered model (``h·1 + 0`` would turn
−0.0 into +0.0).
"""

from __future__ import annotations

import torch

from ..errors import SteeringError


class SteeringTables:
    """Stacked ``[K, d]`` scale/shift per site for K named steerings, and the routing state."""

    def __init__(self, steerings: dict, sites: list[str], device_of: dict[str, torch.device]):
        self.names = list(steerings)
        self.scale, self.shift, self.lo, self.hi = {}, {}, {}, {}
        for site in sites:
            d = next(st.meta["widths"][site] for st in steerings.values() if site in st.scale)
            w = torch.ones(len(self.names), d)
            b = torch.zeros(len(self.names), d)
            for k, st in enumerate(steerings.values()):
                if site in st.scale:
                    w[k], b[k] = st.scale[site], st.shift[site]
            self.scale[site] = w.to(device_of[site])
            self.shift[site] = b.to(device_of[site])
            if any(site in st.support for st in steerings.values()):
                lo = torch.full((len(self.names), d), -torch.inf)
                hi = torch.full((len(self.names), d), torch.inf)
                for k, st in enumerate(steerings.values()):
                    if site in st.support:
                        lo[k], hi[k] = st.support[site]
                self.lo[site], self.hi[site] = lo.to(device_of[site]), hi.to(device_of[site])
        # routing: R rows (R = 1 broadcasts to any batch).
        self.row_index = None  # optional (site, batch, rows) -> entry per row, for other batch layouts
        # (ids, strength, identity, cache): replaced as a whole, never mutated (but for the cache, which
        # belongs to its routing: (site, rows) -> (a, c))
        self._state = (torch.zeros(1, dtype=torch.long), torch.ones(1), False, {})

    @property
    def ids(self) -> torch.Tensor:
        """Steering id per routed row (-1 = unsteered), int64 CPU ``[R]``."""
        return self._state[0]

    @property
    def strength(self) -> torch.Tensor:
        """Strength per routed row, float32 CPU ``[R]``."""
        return self._state[1]

    @property
    def identity(self) -> bool:
        """True when every routed row's effective strength is exactly 0 (the map is the identity)."""
        return self._state[2]

    def set_rows(self, ids: torch.Tensor, strength: torch.Tensor) -> None:
        """Replace the routing in one assignment (see the module docstring)."""
        ids, strength = ids.long().cpu(), strength.float().cpu()
        self._state = (ids, strength, row_identity(ids, strength), {})

    def routing(self) -> tuple:
        """The routing as it stands, an opaque immutable value for :meth:`restore_routing`."""
        return self._state

    def restore_routing(self, routing: tuple) -> None:
        """Put back a :meth:`routing` value, exactly (one assignment, as ``set_rows``)."""
        self._state = routing

    def coefficients(self, site: str, batch: int) -> tuple:
        """``(a, c)`` of shape ``[batch or 1, d]`` for one site, plus ``(lo, hi)`` where it is clamped."""
        ids, strength, _, cache = self._state  # one read: a concurrent set_rows cannot tear it
        rows = ids.numel()
        if rows != 1 and rows != batch:
            if batch % rows:
                raise SteeringError(f"batch of {batch} rows does not match the {rows} rows given to "
                                    f"route()/set_strength() (nor a multiple of it)")
        # under torch.compile the few ops are traced into the graph: a cache there would be a guarded
        # dict whose filling forces a recompile
        cache = {} if torch.compiler.is_compiling() else cache
        index = self.row_index(site, batch, rows) if self.row_index is not None and rows != 1 else None
        key = (site, batch if rows != 1 else 1, None if index is None else tuple(index.tolist()))
        if key not in cache:
            w, b = self.scale[site], self.shift[site]
            ids, s = ids.to(w.device), strength.to(w.device)
            if index is not None:
                ids, s = ids[index.to(w.device)], s[index.to(w.device)]
            elif rows not in (1, batch):
                ids, s = ids.repeat_interleave(batch // rows), s.repeat_interleave(batch // rows)
            s = torch.where(ids < 0, torch.zeros_like(s), s)[:, None]
            ids = ids.clamp(min=0)
            cache[key] = (1 + s * (w[ids] - 1), s * b[ids])
            if site in self.lo:
                cache[key] += (self.lo[site][ids], self.hi[site][ids])
        return cache[key]

    def apply(self, site: str, h: torch.Tensor) -> torch.Tensor:
        """Steer a site tensor ``[B, ..., d]`` or conv features ``[B, d, H, W]`` (fp32 math, h's dtype).
        With every row at effective strength 0, ``h`` itself (after the batch-size check), bit-exactly."""
        coef = self.coefficients(site, h.shape[0])
        if not torch.compiler.is_compiling() and self._state[2]:
            return h
        a = coef[0]
        if h.ndim == 4:  # per channel (sites.channel_dim)
            shape = (a.shape[0], a.shape[1], 1, 1)
        else:
            shape = (a.shape[0],) + (1,) * (h.ndim - 2) + (a.shape[1],)
        x = h.float()
        out = x * a.view(shape) + coef[1].view(shape)
        if len(coef) == 4:  # support clamp: outside lo < x < hi the value passes through
            inside = (x > coef[2].view(shape)) & (x < coef[3].view(shape))
            out = torch.where(inside, out, x)
        return out.to(h.dtype)


def row_identity(ids: torch.Tensor, strength: torch.Tensor) -> bool:
    """True when every routed row leaves its tensor unchanged: unsteered (id -1) or strength exactly 0
    (then ``a = 1 + 0·(ω − 1) = 1`` and ``c = 0·b = ±0``)."""
    return bool(((ids < 0) | (strength == 0)).all())
