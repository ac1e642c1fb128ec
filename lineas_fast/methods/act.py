"""Locally fitted per-site maps (the AcT family, SPEC §2): each site is fitted from pooled activations
of that site alone, every column at once (no per-neuron Python loops).

* ``linear_act`` (ml-act's ``LinearOTHook``): per column, sort equal-sized source and target samples
  (the larger set is subsampled at random with the fit's seed) and fit ``y ≈ ωx + b`` on the sorted
  pairs by closed-form least squares in float64: ``ω = Σx̄ȳ / Σx̄²``, ``b = ȳ − ωx̄`` (x̄, ȳ centred).
  A constant source column has no slope; it gets the mean shift ``ω = 1, b = ȳ − x̄`` (the least-squares
  solution with ω fixed), where ml-act adds 1e-8 noise and gets an arbitrary slope.
* ``mean_act``: ``ω = 1``, ``b = μ_t − μ_s``.
* ``gaussian_ot``: ``ω = σ_t/σ_s``, ``b = μ_t − ωμ_s`` with unbiased σ; a column where σ_s or σ_t is
  below 1e-4 stays identity.

``support="q_0_100"`` (any ``"q_<lo>_<hi>"`` percentile pair) stores the source range per column in the
artifact: the map then applies only strictly inside it. ``incremental=True`` fits sites in execution
order with the maps fitted so far applied, as ml-act does: the earlier maps act on every fit prompt
(source and target alike, as they act on every input at inference), and each site costs exactly one
forward over source ∪ target, truncated right after that site.
"""

from __future__ import annotations

import re
import time
from contextlib import nullcontext

import torch
from tqdm.auto import tqdm

from ..collect import POOLINGS, collect_sets, execution_order
from ..errors import SteeringError
from ..sites import resolve_sites
from ..steering import Steering
from .common import check_prompt_sets, model_meta

STD_EPS = 1e-4


def linear_map(xs: torch.Tensor, xt: torch.Tensor, generator: torch.Generator | None = None):
    """Linear-AcT map ``(ω, b)`` per column from source ``[n, d]`` and target ``[m, d]`` samples."""
    n = min(len(xs), len(xt))
    if n < 2:
        raise SteeringError(f"linear_act needs at least 2 samples per side, got {len(xs)} and {len(xt)}")
    xs, xt = _subsample(xs, n, generator), _subsample(xt, n, generator)
    x = torch.sort(xs.double(), dim=0).values
    y = torch.sort(xt.double(), dim=0).values
    mx, my = x.mean(0), y.mean(0)
    xc, yc = x - mx, y - my
    sxx, sxy = (xc * xc).sum(0), (xc * yc).sum(0)
    flat = sxx <= 1e-24 * n * (1 + mx * mx)  # a constant column (up to float64 rounding)
    w = torch.where(flat, torch.ones_like(sxx), sxy / torch.where(flat, torch.ones_like(sxx), sxx))
    b = my - w * mx
    return w.float(), b.float()


def mean_map(xs: torch.Tensor, xt: torch.Tensor, generator=None):
    """Mean-AcT map: ``ω = 1``, ``b = μ_t − μ_s``."""
    return torch.ones(xs.shape[1]), (xt.double().mean(0) - xs.double().mean(0)).float()


def gaussian_map(xs: torch.Tensor, xt: torch.Tensor, generator=None):
    """Gaussian-OT map per column; columns with σ_s or σ_t < 1e-4 stay identity."""
    if len(xs) < 2 or len(xt) < 2:
        raise SteeringError("gaussian_ot needs at least 2 samples per side (unbiased σ)")
    ms, mt = xs.double().mean(0), xt.double().mean(0)
    ss, sd = xs.double().std(0), xt.double().std(0)
    ok = (ss >= STD_EPS) & (sd >= STD_EPS)
    w = torch.where(ok, sd / torch.where(ok, ss, torch.ones_like(ss)), torch.ones_like(ss))
    b = torch.where(ok, mt - w * ms, torch.zeros_like(ms))
    return w.float(), b.float()


MAPS = {"linear_act": linear_map, "mean_act": mean_map, "gaussian_ot": gaussian_map}


def support_bounds(xs: torch.Tensor, support: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-column ``(lo, hi)`` percentiles of the source samples for ``support="q_<lo>_<hi>"``."""
    lo_q, hi_q = _parse_support(support)
    x = xs.double()
    return torch.quantile(x, lo_q / 100, dim=0).float(), torch.quantile(x, hi_q / 100, dim=0).float()


def _parse_support(support: str) -> tuple[float, float]:
    m = re.fullmatch(r"q_(\d+(?:\.\d+)?)_(\d+(?:\.\d+)?)", str(support))
    if not m or not 0 <= float(m[1]) < float(m[2]) <= 100:
        raise SteeringError(f"support={support!r}: expected None or 'q_<lo>_<hi>' percentiles, e.g. 'q_0_100'")
    return float(m[1]), float(m[2])


def _subsample(x: torch.Tensor, n: int, generator) -> torch.Tensor:
    if len(x) == n:
        return x
    return x[torch.randperm(len(x), generator=generator)[:n].sort().values]


def fit_local(model, tok, source, target, *, method: str, sites="norms", pooling: str = "mean",
              support: str | None = None, incremental: bool = False, max_length: int = 64,
              batch_size: int = 64, seed: int = 0, progress: bool = True) -> Steering:
    """Fit one of :data:`MAPS` at every site; see the module docstring."""
    source, target = check_prompt_sets(source, target)
    if method not in MAPS:
        raise SteeringError(f"method={method!r}: local maps are {sorted(MAPS)}")
    if pooling not in POOLINGS:
        raise SteeringError(f"pooling={pooling!r}: expected one of {POOLINGS}")
    if support in ("q_all", "none"):
        support = None
    if support is not None:
        _parse_support(support)
    t0 = time.perf_counter()
    site_list = resolve_sites(model, sites)
    gen = torch.Generator().manual_seed(seed)
    fit_map = MAPS[method]
    scale, shift, bounds = {}, {}, {}
    kw = dict(pooling=pooling, batch_size=batch_size, max_length=max_length)

    def fit_site(site, xs, xt):
        scale[site], shift[site] = fit_map(xs, xt, gen)
        if support is not None:
            bounds[site] = support_bounds(xs, support)

    if not incremental:  # every site from one truncated forward over source ∪ target
        xs, xt = collect_sets(model, tok, [source, target], site_list, progress=progress, **kw)
        for site in site_list:
            fit_site(site, xs[site], xt[site])
        forwards = 1
    else:
        from ..patching import steered

        site_list = execution_order(model, site_list)
        for site in tqdm(site_list, desc=f"{method} (incremental)", disable=not progress):
            done = Steering(scale, shift, {"model_type": model.config.model_type},
                            {s: bounds[s] for s in bounds}) if scale else None
            with steered(model, done, mode="hooks") if done is not None else nullcontext():
                xs, xt = collect_sets(model, tok, [source, target], [site], **kw)
            fit_site(site, xs[site], xt[site])
        forwards = len(site_list)
    hyper = dict(sites=sites if isinstance(sites, str) else list(sites), pooling=pooling, support=support,
                 incremental=incremental, max_length=max_length, seed=seed, n_source=len(source),
                 n_target=len(target))
    meta = {"method": method, **model_meta(model), "hyperparams": hyper,
            "train": {"fit_seconds": round(time.perf_counter() - t0, 3), "forwards": forwards}}
    return Steering({s: scale[s] for s in site_list}, {s: shift[s] for s in site_list}, meta, bounds)


def _local(method: str, doc: str, **fixed):
    """A ``fit_<method>`` entry point; ``__wrapped__`` lets ``inspect.signature`` list its options."""
    def fit_method(model, tok, source, target, **kwargs) -> Steering:
        return fit_local(model, tok, source, target, method=method, **fixed, **kwargs)
    fit_method.__doc__ = doc
    fit_method.__wrapped__ = fit_local
    return fit_method


fit_linear_act = _local("linear_act", "Linear-AcT (``support``, ``incremental``; see the module docstring).")
fit_linear_act_incremental = _local(
    "linear_act", "Linear-AcT fitted site by site with the earlier maps applied.", incremental=True)
fit_mean_act = _local("mean_act", "Mean-AcT: shift each site by the difference of target and source means.")
fit_gaussian_ot = _local("gaussian_ot", "Gaussian-OT: match each column's mean and unbiased standard deviation.")
