"""The ``hooks`` apply mode: plain PyTorch forward (pre-)hooks — the readable reference and the
fallback for arbitrary modules. Parameters are never touched, so removal restores bit-exactly."""

from __future__ import annotations

from ..sites import Site, pick, replace
from .tables import SteeringTables


def install_hooks(model, sites: list[str], tables: SteeringTables) -> list:
    """Register one hook per site that rewrites its tensor through ``tables``; returns the hook handles.

    All or nothing: every site's module is looked up first, and should a registration fail, the hooks
    already registered are removed before the error propagates."""
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
    return handles
