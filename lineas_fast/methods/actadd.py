"""ActAdd / CAA: add a scaled difference of means at one or a few sites (SPEC §2).

``ω = 1``, ``b = multiplier · (μ_target − μ_source)``. Its default site is the MLP output of the middle
decoder block: adding a constant there adds it to the residual stream after that block, which is
where ActAdd and CAA steer, and it stays foldable (into the down projection's bias).
"""

from __future__ import annotations

import math
import time

import torch

from ..collect import POOLINGS, collect_sets
from ..errors import SteeringError
from ..sites import resolve_sites
from ..steering import Steering
from .common import check_prompt_sets, model_meta


def default_actadd_sites(model) -> list[str]:
    """The middle decoder block's MLP output."""
    mlp = resolve_sites(model, "mlp_out")
    return [mlp[(len(mlp) - 1) // 2]]


def fit_actadd(model, tok, source, target, *, sites=None, multiplier: float = 1.0, pooling: str = "mean",
               max_length: int = 64, batch_size: int = 64, seed: int = 0, progress: bool = True) -> Steering:
    """CAA-style steering: ``b = multiplier·(μ_t − μ_s)`` at ``sites`` (default: the middle MLP output)."""
    source, target = check_prompt_sets(source, target)
    if pooling not in POOLINGS:
        raise SteeringError(f"pooling={pooling!r}: expected one of {POOLINGS}")
    if not math.isfinite(float(multiplier)):
        raise SteeringError(f"multiplier must be finite, got {multiplier!r}")
    t0 = time.perf_counter()
    site_list = default_actadd_sites(model) if sites is None else resolve_sites(model, sites)
    xs, xt = collect_sets(model, tok, [source, target], site_list, pooling=pooling, batch_size=batch_size,
                          max_length=max_length, progress=progress)
    scale = {s: torch.ones(xs[s].shape[1]) for s in site_list}
    shift = {s: (float(multiplier) * (xt[s].double().mean(0) - xs[s].double().mean(0))).float() for s in site_list}
    hyper = dict(sites=site_list if sites is None else (sites if isinstance(sites, str) else list(sites)),
                 multiplier=float(multiplier), pooling=pooling, max_length=max_length, seed=seed,
                 n_source=len(source), n_target=len(target))
    meta = {"method": "actadd", **model_meta(model), "hyperparams": hyper,
            "train": {"fit_seconds": round(time.perf_counter() - t0, 3), "forwards": 1}}
    return Steering(scale, shift, meta)
