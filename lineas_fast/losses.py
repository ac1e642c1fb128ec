"""The global distributional loss: a sum of per-column 1-D Wasserstein-2 distances.

All sites are concatenated into one ``[n, Σd]`` matrix and sorted once (one batched sort for the
whole loss, run on its transpose so that each neuron's samples are contiguous). For ``n ≠ m`` both sorted columns are compared at ``k = max(n, m)`` common quantile
levels ``i/(k-1)``, linearly interpolated; for ``n = m`` this is exactly the sorted-pairs formula.
"""

from __future__ import annotations

import torch


def quantiles(sorted_cols: torch.Tensor, k: int) -> torch.Tensor:
    """Values of sorted columns ``[n, D]`` at ``k`` evenly spaced levels (linear interpolation)."""
    return quantile_levels(sorted_cols.t(), k).t()


def quantile_levels(sorted_rows: torch.Tensor, k: int) -> torch.Tensor:
    """Values of rows ``[D, n]`` sorted along the last dim at ``k`` evenly spaced levels (linear interpolation)."""
    n = sorted_rows.shape[1]
    if n == k:
        return sorted_rows
    if n == 1:
        return sorted_rows.expand(-1, k)
    pos = torch.linspace(0, n - 1, k, device=sorted_rows.device, dtype=sorted_rows.dtype)
    lo = pos.floor().long().clamp(max=n - 2)
    w = pos - lo.to(pos.dtype)
    return sorted_rows[:, lo] * (1 - w) + sorted_rows[:, lo + 1] * w


def sorted_rows(x: torch.Tensor) -> torch.Tensor:
    """Samples ``[n, D]`` → ``[D, n]``, each neuron's samples sorted (contiguous along the sort: on a CPU
    this sorts ~1.7× faster than sorting the columns of ``x`` in place)."""
    return torch.sort(x.t().contiguous(), dim=1).values


def column_weights(target: torch.Tensor, normalize: str | None, eps: float = 1e-6) -> torch.Tensor | None:
    """Per-column weights: ``"var"`` divides a column's loss by the target variance (+eps)."""
    if normalize in (None, "none"):
        return None
    if normalize == "var":
        return 1.0 / (target.var(0, unbiased=False) + eps)
    raise ValueError(f"normalize={normalize!r}: expected None or 'var'")


def wasserstein_columns(z: torch.Tensor, v_sorted: torch.Tensor) -> torch.Tensor:
    """Per-column W2² between samples ``z [n, D]`` and pre-sorted targets ``v_sorted [m, D]`` → ``[D]``."""
    return wasserstein_to_sorted(z, v_sorted.t())


def wasserstein_to_sorted(z: torch.Tensor, vt_sorted: torch.Tensor) -> torch.Tensor:
    """Per-column W2² between samples ``z [n, D]`` and targets given as :func:`sorted_rows` ``[D, m]``."""
    k = max(z.shape[0], vt_sorted.shape[1])
    zq = quantile_levels(sorted_rows(z), k)
    vq = quantile_levels(vt_sorted, k)
    return (zq - vq).pow(2).mean(1)


def wasserstein_loss(z: torch.Tensor, v_sorted: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Σ over columns of (optionally weighted) W2²; ``v_sorted`` is the target sorted along dim 0."""
    cols = wasserstein_columns(z, v_sorted)
    return (cols * weights).sum() if weights is not None else cols.sum()


def wasserstein_loss_to(z: torch.Tensor, vt_sorted: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`wasserstein_loss` with the target already in the :func:`sorted_rows` layout ``[D, m]`` (what the
    training loop keeps, so the target is transposed and sorted once per fit, not once per step)."""
    cols = wasserstein_to_sorted(z, vt_sorted)
    return (cols * weights).sum() if weights is not None else cols.sum()


def paired_loss(z: torch.Tensor, ref: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Σ over columns of the (optionally weighted) mean squared difference of *paired* rows ``z`` and
    ``ref`` (the same samples, steered and not). An upper bound on the Wasserstein term of the same pairs
    (the identity coupling is one coupling): it also counts samples that trade places."""
    cols = (z - ref).pow(2).mean(0)
    return (cols * weights).sum() if weights is not None else cols.sum()
