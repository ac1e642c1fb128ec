"""The 1-D Wasserstein loss against a brute-force reference written with explicit loops."""

import math

import pytest
import torch

from lineas_fast.losses import column_weights, quantiles, wasserstein_columns, wasserstein_loss

pytestmark = pytest.mark.usefixtures("one_thread")


def ref_quantile(sorted_vals: list[float], level: float) -> float:
    """Value of a sorted sample at quantile ``level`` ∈ [0, 1], linear interpolation between order stats."""
    n = len(sorted_vals)
    if n == 1:
        return sorted_vals[0]
    pos = level * (n - 1)
    lo = min(int(math.floor(pos)), n - 2)
    w = pos - lo
    return sorted_vals[lo] * (1 - w) + sorted_vals[lo + 1] * w


def ref_column(z: list[float], v: list[float]) -> float:
    zs, vs = sorted(z), sorted(v)
    if len(zs) == len(vs):  # sorted pairs
        return sum((a - b) ** 2 for a, b in zip(zs, vs)) / len(zs)
    k = max(len(zs), len(vs))
    levels = [i / (k - 1) for i in range(k)]
    return sum((ref_quantile(zs, t) - ref_quantile(vs, t)) ** 2 for t in levels) / k


def ref_loss(z: torch.Tensor, v: torch.Tensor, normalize=None, eps=1e-6) -> float:
    total = 0.0
    for j in range(z.shape[1]):
        zc = [float(x) for x in z[:, j].double()]
        vc = [float(x) for x in v[:, j].double()]
        col = ref_column(zc, vc)
        if normalize == "var":
            mu = sum(vc) / len(vc)
            var = sum((x - mu) ** 2 for x in vc) / len(vc)
            col /= var + eps
        total += col
    return total


def sample(n, d, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    cols = torch.logspace(-1, 1, d)[None, :] * scale  # columns of very different widths
    return (torch.randn(n, d, generator=g) * cols + torch.randn(d, generator=g)).double()


def loss(z, v, normalize=None):
    return float(wasserstein_loss(z, torch.sort(v, dim=0).values, column_weights(v, normalize)))


@pytest.mark.parametrize("n,m", [(8, 8), (1, 1), (5, 9), (9, 5), (2, 7), (16, 3), (1, 4), (4, 1)])
@pytest.mark.parametrize("normalize", [None, "var"])
def test_matches_bruteforce(n, m, normalize):
    if normalize == "var" and m == 1:
        pytest.skip("a single target sample has zero variance")
    z, v = sample(n, 6, seed=n), sample(m, 6, seed=100 + m)
    assert loss(z, v, normalize) == pytest.approx(ref_loss(z, v, normalize), rel=1e-9, abs=1e-12)


def test_equal_sizes_is_sorted_pairs_exactly():
    z, v = sample(10, 4, 1), sample(10, 4, 2)
    per_col = wasserstein_columns(z, torch.sort(v, 0).values)
    want = (torch.sort(z, 0).values - torch.sort(v, 0).values).pow(2).mean(0)
    assert torch.equal(per_col, want)


def test_float32_matches_float64_reference():
    z, v = sample(12, 5, 3).float(), sample(7, 5, 4).float()
    assert loss(z, v) == pytest.approx(ref_loss(z, v), rel=1e-5)


def test_zero_for_a_permutation_and_positive_otherwise():
    v = sample(9, 5, 7)
    z = v[torch.randperm(9, generator=torch.Generator().manual_seed(0))]
    assert loss(z, v) == 0.0
    assert loss(z + 0.1, v) == pytest.approx(5 * 0.01, rel=1e-9)  # a shift of t costs t² per column


def test_var_normalisation_weighs_columns_alike():
    """Scaling a column of both sets by c leaves the normalised loss (almost) unchanged, not the plain one."""
    z, v = sample(8, 3, 11), sample(8, 3, 12)
    c = torch.tensor([1.0, 100.0, 0.01], dtype=torch.float64)
    assert loss(z * c, v * c, "var") == pytest.approx(loss(z, v, "var"), rel=1e-3)
    assert loss(z * c, v * c) != pytest.approx(loss(z, v), rel=1e-1)


def test_column_weights():
    v = sample(8, 3, 5)
    w = column_weights(v, "var")
    torch.testing.assert_close(w, 1 / (v.var(0, unbiased=False) + 1e-6))
    assert column_weights(v, None) is None
    with pytest.raises(ValueError):
        column_weights(v, "std")


def test_quantiles_interpolate_linearly():
    s = torch.tensor([[0.0], [1.0], [4.0]])
    torch.testing.assert_close(quantiles(s, 5)[:, 0], torch.tensor([0.0, 0.5, 1.0, 2.5, 4.0]))
    assert torch.equal(quantiles(s, 3), s)
    torch.testing.assert_close(quantiles(s[:1], 4)[:, 0], torch.zeros(4))


def test_gradient_matches_reference_finite_differences():
    z = sample(5, 3, 21).requires_grad_(True)
    v = sample(7, 3, 22)
    wasserstein_loss(z, torch.sort(v, 0).values).backward()
    eps = 1e-6
    for i, j in [(0, 0), (2, 1), (4, 2)]:
        zp, zm = z.detach().clone(), z.detach().clone()
        zp[i, j] += eps
        zm[i, j] -= eps
        fd = (ref_loss(zp, v) - ref_loss(zm, v)) / (2 * eps)
        assert float(z.grad[i, j]) == pytest.approx(fd, rel=1e-5, abs=1e-8)


def test_one_batched_sort_for_all_columns():
    """The loss of the concatenation equals the sum of the per-block losses (sites are independent)."""
    z1, v1 = sample(6, 4, 31), sample(6, 4, 32)
    z2, v2 = sample(6, 2, 33), sample(6, 2, 34)
    whole = loss(torch.cat([z1, z2], 1), torch.cat([v1, v2], 1))
    assert whole == pytest.approx(loss(z1, v1) + loss(z2, v2), rel=1e-12)
