"""Proximal step of the sparse group lasso on the deviation from identity (SPEC §2, step 5).

The penalty is ``l1·‖θ−θ₀‖₁ + group_l2·Σ_sites sqrt(2d)·‖θ_site−θ₀‖₂`` with θ = (ω, b), θ₀ = (1, 0).
Proximal SGD thresholds with γ = lr. Adam moves each coordinate by ``lr·m̂/(sqrt(v̂)+eps)``, i.e. a
gradient step with per-coordinate step size ``γ_i = lr/(sqrt(v̂_i)+eps)``; thresholding with that same
γ_i makes ``l1``/``group_l2`` weights of the *same objective* under both optimizers (the fixed point
``|∂C/∂θ_i| ≤ l1`` for a zeroed coordinate does not depend on the optimizer). For the group step the
per-site step is the mean of the group's γ_i.
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


@torch.no_grad()
def prox_sparse_group(omega: torch.Tensor, shift: torch.Tensor, gamma_w, gamma_b, l1: float, group_l2: float,
                      slices: list[slice]) -> None:
    """In place: ω ← 1 + prox(ω − 1), b ← prox(b), per site ``slices`` of the flat parameter vectors."""
    if l1 == 0 and group_l2 == 0:
        return
    u = soft_threshold(omega - 1, gamma_w * l1) if l1 else omega - 1
    v = soft_threshold(shift, gamma_b * l1) if l1 else shift.clone()
    if group_l2:
        gw = torch.as_tensor(gamma_w, dtype=omega.dtype).expand_as(omega)
        gb = torch.as_tensor(gamma_b, dtype=omega.dtype).expand_as(omega)
        for sl in slices:
            d = sl.stop - sl.start
            norm = torch.sqrt(u[sl].pow(2).sum() + v[sl].pow(2).sum())
            gamma = 0.5 * (gw[sl].mean() + gb[sl].mean())
            factor = (1 - gamma * group_l2 * (2 * d) ** 0.5 / norm.clamp(min=1e-30)).clamp(min=0)
            u[sl] *= factor
            v[sl] *= factor
    omega.copy_(1 + u)
    shift.copy_(v)
