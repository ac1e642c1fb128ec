"""Locally fitted per-site maps (the AcT family). Each site is fitted from pooled activations alone.

``mean_act``: ω = 1, b = μ_target − μ_source (a plain mean shift; the baseline LinEAS must beat).
"""

from __future__ import annotations

import time

from ..collect import collect
from ..sites import resolve_sites
from ..steering import Steering
from .common import check_prompt_sets, model_meta


def fit_mean_act(model, tok, source, target, *, sites="norms", pooling="mean", max_length=64, seed=0,
                 progress: bool = False) -> Steering:
    """Mean-AcT: shift each site by the difference of target and source means."""
    source, target = check_prompt_sets(source, target)
    t0 = time.perf_counter()
    site_list = resolve_sites(model, sites)
    xs = collect(model, tok, source, site_list, pooling=pooling, max_length=max_length, progress=progress)
    xt = collect(model, tok, target, site_list, pooling=pooling, max_length=max_length, progress=progress)
    scale = {s: xs[s].new_ones(xs[s].shape[1]) for s in site_list}
    shift = {s: xt[s].mean(0) - xs[s].mean(0) for s in site_list}
    hyper = dict(sites=sites if isinstance(sites, str) else list(sites), pooling=pooling, max_length=max_length,
                 seed=seed, n_source=len(source), n_target=len(target))
    meta = {"method": "mean_act", **model_meta(model), "hyperparams": hyper,
            "train": {"fit_seconds": round(time.perf_counter() - t0, 3)}}
    return Steering(scale, shift, meta)
