"""The one interface every apply mode implements: :class:`Patch`.

A patch is one way of putting steerings on a model instance — forward hooks
(:class:`~lineas_fast.patching.hooks.HookPatch`), fused stand-in modules
(:class:`~lineas_fast.patching.fused.FusedPatch`) or weights edited in place
(:class:`~lineas_fast.patching.fold.FoldPatch`). The routing state they serve — a steering id and a
strength per input row — lives in one place, the handle's
:class:`~lineas_fast.patching.tables.SteeringTables`; a patch only follows it:

* constructing a patch installs it, all or nothing (on a failure nothing of it is left on the model);
* ``check_rows`` / ``check_route`` refuse, with :class:`~lineas_fast.errors.SteeringError` and before
  anything changes, routings the patch cannot serve;
* ``set_rows(ids, strength)`` brings the patch in line with a new routing (the tables' ``ids`` /
  ``strength``), all or nothing: on a failure the patch is as it was before the call;
* ``remove()`` takes it off the model, all or nothing (on a failure it stays installed as it was); a
  second call does nothing.

The handle (:class:`~lineas_fast.patching.handle.SteerHandle`) plans the rows once, then commits them to
the tables and every patch, putting the previous routing back on a failure.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch


class Patch(ABC):
    """Steerings installed on one model instance (see the module docstring for the contract)."""

    def check_rows(self, ids: torch.Tensor, strength: torch.Tensor, what: str, shown) -> None:
        """Refuse rows this patch cannot serve (``what``: the calling function, ``shown``: the strength as
        the caller gave it, for the message). Changes nothing. Default: every routing is served."""

    def check_route(self, what: str) -> None:
        """Refuse ``route()`` outright where the patch has no per-row routing. Default: routing is served."""

    @abstractmethod
    def set_rows(self, ids: torch.Tensor, strength: torch.Tensor) -> None:
        """Follow a new routing (CPU ``ids`` int64 ``[R]``, ``strength`` float32 ``[R]``); all or nothing."""

    @abstractmethod
    def remove(self) -> None:
        """Take the patch off the model; all or nothing; a second call does nothing."""
