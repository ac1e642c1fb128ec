"""The global distributional loss: a sum of per-column 1-D Wasserstein-2 distances.

All sites are concatenated into one ``[n, Σd]`` matrix and sorted once (one batched sort for the
whole loss). For ``n ≠ m`` both sorted columns are compared at ``k = max(n, m)`` common quantile
levels ``i/(k-1)``, linearly interpolated; for ``n = m`` this is exactly the sorted-pairs formula.
"""

from __future__ import annotations

import torch


def quantiles(sorted_cols: torch.Tensor, k: int) -> torch.Tensor:
    """Values of sorted columns ``[n, D]`` at ``k`` evenly spaced levels (linear interpolation)."""
    n = sorted_cols.shape[0]
    if n == k:
        return sorted_cols
    if n == 1:
        return sorted_cols.expand(k, -1)
    pos = torch.linspace(0, n - 1, k, device=sorted_cols.device, dtype=sorted_cols.dtype)
    lo = pos.floor().long().clamp(max=n - 2)
    w = (pos - lo.to(pos.dtype))[:, None]
    return sorted_cols[lo] * (1 - w) + sorted_cols[lo + 1] * w


def column_weights(target: torch.Tensor, normalize: str | None, eps: float = 1e-6) -> torch.Tensor | None:
    """Per-column weights: ``"var"`` divides a column's loss by the target variance (+eps)."""
    if normalize in (None, "none"):
        return None
    if normalize == "var":
        return 1.0 / (target.var(0, unbiased=False) + eps)
    raise ValueError(f"normalize={normalize!r}: expected None or 'var'")


def wasserstein_columns(z: torch.Tensor, v_sorted: torch.Tensor) -> torch.Tensor:
    """Per-column W2² between samples ``z [n, D]`` and pre-sorted targets ``v_sorted [m, D]`` → ``[D]``."""
    k = max(z.shape[0], v_sorted.shape[0])
    zq = quantiles(torch.sort(z, dim=0).values, k)
    vq = quantiles(v_sorted, k)
    return (zq - vq).pow(2).mean(0)


def wasserstein_loss(z: torch.Tensor, v_sorted: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Σ over columns of (optionally weighted) W2²; ``v_sorted`` is the target sorted along dim 0."""
    cols = wasserstein_columns(z, v_sorted)
    return (cols * weights).sum() if weights is not None else cols.sum()
