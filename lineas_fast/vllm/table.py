"""SlotTable: the persistent buffers the served model's steered modules read.

Per patched site: ``dscale[site]`` (ω − 1) and ``shift[site]`` (b) of shape ``[capacity + 1, d_local]``;
row 0 is the identity (zeros) and is where unsteered tokens point. Per token of a step: ``slot`` (long)
and ``strength`` (fp32) of size ``max_tokens`` (vLLM's ``max_num_batched_tokens``), filled once per step.
A token t at a site computes, in fp32 (SPEC §2 strength, the formula of the library's hooks mode):

    a = 1 + s_t · (ω[slot_t] − 1),   c = s_t · b[slot_t],   h ← a ⊙ h + c

so slot 0 (or strength 0) leaves ``h`` bit-exact. Shapes never change after construction and a step
touches no Python per layer beyond two gathers: the buffers are safe to capture in a CUDA graph.
Under tensor parallelism a site whose input is sharded (a row-parallel linear's input, e.g.
``mlp.down_proj:in``) holds only this rank's columns (``shards``); norm outputs are replicated.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import SteeringError
from .fields import FieldError, parse_fields


@dataclass(frozen=True)
class Entry:
    """A loaded steering: its slot and what ``GET /v1/steerings`` reports."""

    name: str
    slot: int
    sites: tuple[str, ...]
    nnz: int
    method: str
    model_type: str
    name_or_path: str


class SlotTable:
    """Per-site steering tables + per-token routing buffers for one served model (one rank)."""

    def __init__(self, widths: dict[str, int], *, capacity: int = 8, max_tokens: int = 8192,
                 shards: dict[str, slice] | None = None, model_type: str = "", device="cpu"):
        if capacity < 1 or max_tokens < 1:
            raise SteeringError(f"SlotTable needs capacity >= 1 and max_tokens >= 1, got {capacity}, {max_tokens}")
        self.widths, self.shards, self.model_type = dict(widths), dict(shards or {}), model_type
        self.capacity = capacity
        self.dscale, self.shift = {}, {}
        for site, d in self.widths.items():
            local = len(range(d)[self.shards[site]]) if site in self.shards else d
            self.dscale[site] = torch.zeros(capacity + 1, local, device=device)
            self.shift[site] = torch.zeros(capacity + 1, local, device=device)
        self.slot = torch.zeros(max_tokens, dtype=torch.long, device=device)
        self.strength = torch.zeros(max_tokens, device=device)
        self._slot_np = np.zeros(max_tokens, dtype=np.int64)
        self._strength_np = np.zeros(max_tokens, dtype=np.float32)
        self.entries: dict[str, Entry] = {}
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ loading
    def load(self, name: str, steering) -> Entry:
        """Write ``steering`` into a free slot under ``name``; nothing changes if any check fails."""
        if not isinstance(name, str) or not name or len(name) > 128 or not name.isprintable():
            raise SteeringError(f"steering name must be a non-empty printable string of <= 128 chars, got {name!r}")
        with self._lock:
            if name in self.entries:
                raise SteeringError(f"a steering named {name!r} is already loaded (unload it first)")
            free = sorted(set(range(1, self.capacity + 1)) - {e.slot for e in self.entries.values()})
            if not free:
                raise SteeringError(f"all {self.capacity} steering slots are in use "
                                    f"({', '.join(sorted(self.entries))}); unload one first")
            self.check(steering)
            slot = free[0]
            for site in self.widths:
                if site in steering.scale:
                    w, b = steering.scale[site], steering.shift[site]
                    if site in self.shards:
                        w, b = w[self.shards[site]], b[self.shards[site]]
                    self.dscale[site][slot].copy_(w - 1)
                    self.shift[site][slot].copy_(b)
            meta = steering.meta
            entry = Entry(name, slot, tuple(steering.sites), steering.nnz(), str(meta.get("method", "")),
                          str(meta.get("model_type", "")), str(meta.get("name_or_path", "")))
            self.entries[name] = entry
            return entry

    def check(self, steering) -> None:
        """Raise :class:`SteeringError` unless ``steering`` fits this model and the patched sites."""
        mtype = steering.meta.get("model_type", "")
        if mtype and self.model_type and mtype != self.model_type:
            raise SteeringError(f"steering was fitted on model_type {mtype!r}; the served model is {self.model_type!r}")
        if steering.support:
            raise SteeringError(f"steering has support-clamped sites ({steering.clamped[:3]}...): the serving "
                                "plugin applies plain affine maps only; bake it or fit without a support")
        missing = [s for s in steering.sites if s not in self.widths]
        if missing:
            raise SteeringError(f"steering uses sites this server did not patch at start-up: {missing[:3]}"
                                f"{' ...' if len(missing) > 3 else ''} (patched: {len(self.widths)} sites; restart "
                                "with them preloaded or listed in --steer-sites)")
        bad = [(s, steering.scale[s].numel(), self.widths[s]) for s in steering.sites
               if steering.scale[s].numel() != self.widths[s]]
        if bad:
            s, mine, theirs = bad[0]
            raise SteeringError(f"width mismatch at site {s!r}: steering has {mine}, served model has {theirs}")

    def unload(self, name: str) -> None:
        """Free ``name``'s slot (its rows go back to the identity)."""
        with self._lock:
            if name not in self.entries:
                raise SteeringError(f"no steering named {name!r} is loaded")
            slot = self.entries.pop(name).slot
            for site in self.widths:
                self.dscale[site][slot].zero_()
                self.shift[site][slot].zero_()

    def describe(self) -> list[dict]:
        return [{"name": e.name, "slot": e.slot, "sites": list(e.sites), "nnz": e.nnz, "method": e.method,
                 "model_type": e.model_type, "name_or_path": e.name_or_path} for e in self.entries.values()]

    # ------------------------------------------------------------------ routing
    def route(self, xargs) -> tuple[int, float]:
        """``(slot, strength)`` for a request's ``extra_args``; unknown or bad fields raise FieldError."""
        name, strength = parse_fields(xargs, self.entries)
        return (0, 0.0) if name is None else (self.entries[name].slot, strength)

    def fill(self, slots, strengths, counts) -> None:
        """Set the per-token buffers for one step: request i (in batch order) owns ``counts[i]`` tokens."""
        counts = np.asarray(counts, dtype=np.int64)
        total = int(counts.sum())
        if total > self.slot.numel():
            raise SteeringError(f"step of {total} tokens exceeds the table's max_tokens={self.slot.numel()}")
        self._slot_np[:total] = np.repeat(np.asarray(slots, dtype=np.int64), counts)
        self._strength_np[:total] = np.repeat(np.asarray(strengths, dtype=np.float32), counts)
        self._slot_np[total:] = 0  # padding tokens (graph capture sizes) stay unsteered
        self._strength_np[total:] = 0
        self.slot.copy_(torch.from_numpy(self._slot_np), non_blocking=True)
        self.strength.copy_(torch.from_numpy(self._strength_np), non_blocking=True)

    def apply(self, site: str, h: torch.Tensor) -> torch.Tensor:
        """Steer the ``[tokens, d_local]`` tensor of one site (fp32 math, ``h``'s dtype)."""
        n = h.shape[0]
        idx = self.slot[:n]
        s = self.strength[:n, None]
        a = 1 + s * self.dscale[site][idx]
        c = s * self.shift[site][idx]
        return (h.float() * a + c).to(h.dtype)


__all__ = ["Entry", "FieldError", "SlotTable"]
