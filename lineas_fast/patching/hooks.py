"""The ``hooks`` apply mode: plain PyTorch forward (pre-)hooks — the readable reference and the
fallback for arbitrary modules. Parameters are never touched, so removal restores bit-exactly.

:class:`HookPatch` owns the hook registrations; the hooks read the routing from the shared
:class:`~lineas_fast.patching.tables.SteeringTables` at every forward, so a new routing needs nothing of
the patch itself.
"""

from __future__ import annotations

from ..sites import Site, pick, replace
from .patch import Patch
from .tables import SteeringTables


class HookPatch(Patch):
    """One hook per site that rewrites its tensor through ``tables``.

    All or nothing: every site's module is looked up first, and should a registration fail, the hooks
    already registered are removed before the error propagates."""

    def __init__(self, model, sites: list[str], tables: SteeringTables):
        plan = []
        for spec in sites:
            site = Site.parse(spec)
            plan.append((spec, site, model.get_submodule(site.module)))
        handles = []
        try:
            for spec, site, module in plan:
                if site.is_input:
                    def pre_hook(module, args, spec=spec):
                        return (tables.apply(spec, args[0]), *args[1:])
                    handles.append(module.register_forward_pre_hook(pre_hook))
                else:
                    def hook(module, args, output, spec=spec, site=site):
                        return replace(output, site, tables.apply(spec, pick(output, site)))
                    handles.append(module.register_forward_hook(hook))
        except BaseException:
            for h in reversed(handles):
                h.remove()
            raise
        self.handles = handles  # torch RemovableHandles, in site order

    def set_rows(self, ids, strength) -> None:
        """Nothing to do: the hooks read the shared tables' routing at every forward."""

    def remove(self) -> None:
        """Remove every hook (removing a hook cannot fail half-way)."""
        for h in self.handles:
            h.remove()
        self.handles = []


def install_hooks(model, sites: list[str], tables: SteeringTables) -> list:
    """Register one hook per site that rewrites its tensor through ``tables``; returns the hook handles
    (a :class:`HookPatch`'s, all or nothing)."""
    return HookPatch(model, sites, tables).handles
