"""Proximal step of the sparse group lasso on the deviation from identity (SPEC §2, step 5).

The penalty is ``l1·‖θ−θ₀‖₁ + group_l2·Σ_sites sqrt(2d)·‖θ_site−θ₀‖₂`` with θ = (ω, b), θ₀ = (1, 0).
Proximal SGD thresholds with γ = lr. Adam moves each coordinate by ``lr·m̂/(sqrt(v̂)+eps)``, i.e. a
gradient step with per-coordinate step size ``γ_i = lr/(sqrt(v̂_i)+eps)``. We take the proximal step
in that same metric, so ``l1``/``group_l2`` are weights of the *same objective* under both optimizers
(the fixed points — which coordinates and sites end at identity — do not depend on the optimizer):

* l1: soft-threshold coordinate i by ``γ_i·l1``;
* group (site) of deviation u with threshold λ = group_l2·sqrt(2d): ``x_i = u_i·t/(t + λγ_i)`` where
  ``t = ‖x‖`` solves ``Σ (u_i/(t+λγ_i))² = 1``; the site goes to identity iff ``‖u/γ‖ ≤ λ``. With a
  scalar γ this is the usual ``u·max(0, 1 − γλ/‖u‖)``. t is found by bisection for all sites at once.
"""

from __future__ import annotations

import torch


def soft_threshold(x: torch.Tensor, t: torch.Tensor | float) -> torch.Tensor:
    return torch.sign(x) * (x.abs() - t).clamp(min=0)


def step_sizes(optimizer: torch.optim.Optimizer, param: torch.Tensor) -> torch.Tensor | float:
    """Per-coordinate step size γ the optimizer just used for ``param`` (lr for SGD)."""
    group = next(g for g in optimizer.param_groups if any(p is param for p in g["params"]))
    lr = group["lr"]
    if isinstance(optimizer, torch.optim.Adam):
        state = optimizer.state[param]
        beta2 = group["betas"][1]
        t = float(state["step"])
        v_hat = state["exp_avg_sq"] / (1 - beta2 ** t)
        return lr / (v_hat.sqrt() + group["eps"])
    return lr


def group_shrink(u: torch.Tensor, gamma: torch.Tensor, lam: torch.Tensor, segment: torch.Tensor,
                 n_groups: int, iters: int = 60) -> torch.Tensor:
    """Prox of ``Σ_g lam_g‖u_g‖₂`` in the metric diag(1/γ), for groups given by ``segment`` ids.

    Args:
        u: flat vector; gamma: per-coordinate step sizes (same shape); lam: per-group weight [n_groups];
        segment: group id of each coordinate.
    """
    lam_i = lam[segment]
    zero = torch.zeros(n_groups, dtype=u.dtype, device=u.device)
    # group is switched off iff ‖u/γ‖₂ ≤ lam (subgradient condition at 0 in this metric)
    off = zero.index_add(0, segment, (u / gamma).pow(2)).sqrt() <= lam
    hi = zero.index_add(0, segment, u.pow(2)).sqrt()  # t ≤ ‖u‖
    lo = torch.zeros_like(hi)
    for _ in range(iters):  # Σ (u_i/(t+λγ_i))² is decreasing in t; find where it crosses 1
        mid = 0.5 * (lo + hi)
        g = zero.index_add(0, segment, (u / (mid[segment] + lam_i * gamma)).pow(2))
        bigger = g > 1
        lo = torch.where(bigger, mid, lo)
        hi = torch.where(bigger, hi, mid)
    t = 0.5 * (lo + hi)
    x = u * t[segment] / (t[segment] + lam_i * gamma)
    return torch.where(off[segment], torch.zeros_like(x), x)


@torch.no_grad()
def prox_sparse_group(omega: torch.Tensor, shift: torch.Tensor, gamma_w, gamma_b, l1: float, group_l2: float,
                      slices: list[slice]) -> None:
    """In place: ω ← 1 + prox(ω − 1), b ← prox(b), per site ``slices`` of the flat parameter vectors."""
    if l1 == 0 and group_l2 == 0:
        return
    gw = torch.as_tensor(gamma_w, dtype=omega.dtype, device=omega.device).expand_as(omega)
    gb = torch.as_tensor(gamma_b, dtype=omega.dtype, device=omega.device).expand_as(shift)
    u = soft_threshold(omega - 1, gw * l1) if l1 else omega - 1
    v = soft_threshold(shift, gb * l1) if l1 else shift.clone()
    if group_l2:
        n = omega.numel()
        segment = torch.empty(n, dtype=torch.long, device=omega.device)
        lam = torch.empty(len(slices), dtype=omega.dtype, device=omega.device)
        for k, sl in enumerate(slices):
            segment[sl] = k
            lam[k] = group_l2 * (2 * (sl.stop - sl.start)) ** 0.5
        x = group_shrink(torch.cat([u, v]), torch.cat([gw, gb]), lam, torch.cat([segment, segment]), len(slices))
        u, v = x[:n], x[n:]
    omega.copy_(1 + u)
    shift.copy_(v)
