"""The AcT family and ActAdd: closed forms against hand/reference formulas, the support clamp in the
artifact and in every apply mode, and incremental fitting's forward budget.

Reference formulas (what ml-act's ``LinearProj.optimize`` computes on the sorted pairs of
``LinearOTHook``, written out here independently in numpy float64):
    x, y = sort(source column), sort(target column)          (equal counts)
    β = Σ (x − x̄)(y − ȳ) / Σ (x − x̄)²,   α = ȳ − β x̄
and its ``q_0_100`` support: the map applies where ``min(source) < h < max(source)`` (strict on both
sides), elsewhere h passes through.
"""

import numpy as np
import pytest
import torch

import lineas_fast as lf
from conftest import SOURCE, TARGET, assert_state_equal, logits, make_model, no_hooks_left, snapshot
from lineas_fast.collect import execution_order
from lineas_fast.methods.act import gaussian_map, linear_map, mean_map, support_bounds

pytestmark = pytest.mark.usefixtures("one_thread")
QUIET = dict(progress=False)


# ---------------------------------------------------------------- closed forms on random data
def reference_linear(x: np.ndarray, y: np.ndarray):
    x, y = np.sort(x.astype(np.float64), 0), np.sort(y.astype(np.float64), 0)
    xb, yb = x - x.mean(0, keepdims=True), y - y.mean(0, keepdims=True)
    beta = (xb * yb).sum(0) / (xb ** 2).sum(0)
    return beta, y.mean(0) - beta * x.mean(0)


def test_linear_act_matches_the_sorted_pairs_closed_form():
    g = torch.Generator().manual_seed(0)
    xs = torch.randn(64, 300, generator=g) * torch.rand(300, generator=g) * 3 + torch.randn(300, generator=g)
    xt = torch.randn(64, 300, generator=g).exp() + 0.5
    w, b = linear_map(xs, xt)
    beta, alpha = reference_linear(xs.numpy(), xt.numpy())
    np.testing.assert_allclose(w.numpy(), beta, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(b.numpy(), alpha, rtol=1e-6, atol=1e-6)
    assert w.dtype == b.dtype == torch.float32 and w.shape == (300,)


def test_linear_act_subsamples_the_larger_set_with_the_seed():
    g = torch.Generator().manual_seed(1)
    xs, xt = torch.randn(40, 8, generator=g), torch.randn(25, 8, generator=g) * 2
    w1, b1 = linear_map(xs, xt, torch.Generator().manual_seed(3))
    w2, b2 = linear_map(xs, xt, torch.Generator().manual_seed(3))
    w3, _ = linear_map(xs, xt, torch.Generator().manual_seed(4))
    assert torch.equal(w1, w2) and torch.equal(b1, b2) and not torch.equal(w1, w3)
    # the subsample is a row subset of the larger side: the result is the closed form on some 25 rows
    idx = torch.randperm(40, generator=torch.Generator().manual_seed(3))[:25].sort().values
    beta, alpha = reference_linear(xs[idx].numpy(), xt.numpy())
    np.testing.assert_allclose(w1.numpy(), beta, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(b1.numpy(), alpha, rtol=1e-6, atol=1e-6)


def test_linear_act_constant_column_gets_the_mean_shift():
    xs = torch.randn(10, 3)
    xs[:, 1] = 2.5
    xt = torch.randn(10, 3) + 4
    w, b = linear_map(xs, xt)
    assert w[1] == 1 and torch.isclose(b[1], xt[:, 1].double().mean().float() - 2.5)
    assert torch.isfinite(w).all() and torch.isfinite(b).all()


def test_linear_act_maps_an_affine_target_exactly():
    xs = torch.randn(50, 4)
    w, b = linear_map(xs, 3 * xs - 1)
    torch.testing.assert_close(w, torch.full((4,), 3.0), atol=1e-6, rtol=0)
    torch.testing.assert_close(b, torch.full((4,), -1.0), atol=1e-6, rtol=0)


def test_mean_and_gaussian_maps_by_hand():
    xs = torch.tensor([[1.0, 0.0, 5.0], [3.0, 0.0, 5.00001]])
    xt = torch.tensor([[2.0, 1.0, 0.0], [6.0, 3.0, 4.0]])
    w, b = mean_map(xs, xt)
    assert torch.equal(w, torch.ones(3))
    torch.testing.assert_close(b, torch.tensor([2.0, 2.0, -3.000005]))
    w, b = gaussian_map(xs, xt)
    # col 0: σ_s = √2, σ_t = √8 (unbiased) → ω = 2, b = 4 − 2·2 = 0
    torch.testing.assert_close(w[0], torch.tensor(2.0)) and torch.testing.assert_close(b[0], torch.tensor(0.0))
    # col 1: σ_s = 0 < 1e-4 → identity; col 2: σ_s ≈ 7e-6 < 1e-4 → identity
    assert w[1] == 1 and b[1] == 0 and w[2] == 1 and b[2] == 0


def test_gaussian_uses_the_unbiased_std():
    g = torch.Generator().manual_seed(2)
    xs, xt = torch.randn(7, 5, generator=g), torch.randn(9, 5, generator=g) * 3 + 1
    w, b = gaussian_map(xs, xt)
    ws = xt.numpy().astype(np.float64).std(0, ddof=1) / xs.numpy().astype(np.float64).std(0, ddof=1)
    np.testing.assert_allclose(w.numpy(), ws, rtol=1e-6)
    np.testing.assert_allclose(b.numpy(), xt.double().mean(0).numpy() - ws * xs.double().mean(0).numpy(),
                               rtol=1e-5, atol=1e-6)


def test_support_bounds_are_source_min_max():
    xs = torch.randn(30, 6)
    lo, hi = support_bounds(xs, "q_0_100")
    assert torch.equal(lo, xs.min(0).values) and torch.equal(hi, xs.max(0).values)
    lo, hi = support_bounds(xs, "q_10_90")
    torch.testing.assert_close(lo, torch.quantile(xs.double(), 0.1, dim=0).float())
    with pytest.raises(lf.SteeringError, match="support"):
        support_bounds(xs, "q_90_10")


# ---------------------------------------------------------------- fitting on a tiny model
@pytest.mark.parametrize("method", ["linear_act", "mean_act", "gaussian_ot", "actadd"])
def test_methods_fit_from_collected_activations(method, tok):
    model = make_model("llama")
    st = lf.fit(model, tok, SOURCE, TARGET, method=method, **QUIET)
    sites = st.sites
    xs, xt = (lf.collect(model, tok, t, sites, pooling="mean", max_length=64) for t in (SOURCE, TARGET))
    for s in sites:
        want = {"linear_act": lambda: linear_map(xs[s], xt[s]), "mean_act": lambda: mean_map(xs[s], xt[s]),
                "gaussian_ot": lambda: gaussian_map(xs[s], xt[s]),
                "actadd": lambda: mean_map(xs[s], xt[s])}[method]()
        torch.testing.assert_close(st.scale[s], want[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(st.shift[s], want[1], atol=1e-5, rtol=1e-5)
    assert st.meta["method"] == ("linear_act" if method == "linear_act" else method) and st.nnz() > 0
    if method == "actadd":
        assert sites == [lf.resolve_sites(model, "mlp_out")[0]]  # middle block of 2 → block 0


def test_actadd_multiplier_scales_the_shift(tok):
    model = make_model("gpt2")
    one = lf.fit(model, tok, SOURCE, TARGET, method="actadd", sites="mlp_out", **QUIET)
    four = lf.fit(model, tok, SOURCE, TARGET, method="actadd", sites="mlp_out", multiplier=4.0, **QUIET)
    assert one.sites == four.sites == lf.resolve_sites(model, "mlp_out")
    for s in one.sites:
        torch.testing.assert_close(four.shift[s], 4 * one.shift[s])
        assert torch.equal(four.scale[s], torch.ones_like(four.scale[s]))


def test_local_fit_leaves_model_unchanged_and_stops_early(tok):
    model = make_model("llama")
    model.train()
    snap = snapshot(model)
    calls = []
    h = model.lm_head.register_forward_hook(lambda *a: calls.append(1))
    try:
        for method in ("linear_act", "linear_act_incremental", "gaussian_ot", "actadd"):
            lf.fit(model, tok, SOURCE, TARGET, method=method, support="q_0_100", **QUIET) if method != "actadd" \
                else lf.fit(model, tok, SOURCE, TARGET, method=method, **QUIET)
    finally:
        h.remove()
    assert calls == [] and model.training
    assert_state_equal(model, snap)
    assert no_hooks_left(model) == [] and getattr(model, "_lineas_fast_handle", None) is None


# ---------------------------------------------------------------- the support clamp
def test_support_is_stored_saved_and_honoured_by_hooks(tok, tmp_path):
    model = make_model("llama")
    st = lf.fit(model, tok, SOURCE, TARGET, method="linear_act", support="q_0_100", **QUIET)
    assert st.clamped == st.sites and st.meta["hyperparams"]["support"] == "q_0_100"
    xs = lf.collect(model, tok, SOURCE, st.sites, pooling="mean", max_length=64)
    for s in st.sites:
        lo, hi = st.support[s]
        torch.testing.assert_close(lo, xs[s].min(0).values, atol=1e-6, rtol=0)  # other batching: rounding
        torch.testing.assert_close(hi, xs[s].max(0).values, atol=1e-6, rtol=0)
    st.save(tmp_path / "c.safetensors")
    back = lf.Steering.load(tmp_path / "c.safetensors")
    assert back.clamped == st.clamped
    for s in st.sites:
        assert all(torch.equal(a, b) for a, b in zip(back.support[s], st.support[s]))
    # hooks: a site output is mapped exactly where lo < h < hi, passed through elsewhere
    site = st.sites[0]
    seen = {}
    record = lambda m, a, o: seen.__setitem__("h", o.detach().clone())  # noqa: E731
    ids = torch.tensor([tok("you are a bad person the river")["input_ids"]])
    with torch.no_grad():
        hk = model.get_submodule(site).register_forward_hook(record)
        model(input_ids=ids)
        hk.remove()
        raw = seen.pop("h")
        with lf.steered(model, back, strength=0.7, mode="hooks"):
            hk = model.get_submodule(site).register_forward_hook(record)  # runs after the steering hook
            model(input_ids=ids)
            hk.remove()
    lo, hi = back.support[site]
    inside = (raw > lo) & (raw < hi)
    mapped = raw + 0.7 * (back.scale[site] * raw + back.shift[site] - raw)
    assert inside.any() and (~inside).any()
    torch.testing.assert_close(seen["h"], torch.where(inside, mapped, raw), atol=1e-6, rtol=1e-6)


def test_support_boundary_is_strict():
    from lineas_fast.patching.tables import SteeringTables

    st = lf.Steering({"s": torch.full((3,), 2.0)}, {"s": torch.ones(3)},
                     support={"s": (torch.tensor([0.0, 0.0, -torch.inf]), torch.tensor([1.0, 1.0, torch.inf]))})
    tables = SteeringTables({"x": st}, ["s"], {"s": torch.device("cpu")})
    h = torch.tensor([[[0.0, 1.0, 5.0], [0.5, 0.99, -7.0]]])
    out = tables.apply("s", h)
    assert torch.equal(out, torch.tensor([[[0.0, 1.0, 11.0], [2.0, 2.98, -13.0]]]))


def test_clamp_only_on_its_own_rows_when_routing(tok):
    model = make_model("llama")
    clamped = lf.fit(model, tok, SOURCE, TARGET, method="linear_act", support="q_0_100", **QUIET)
    free = lf.Steering(clamped.scale, clamped.shift, {"model_type": "llama"})
    ids = torch.tensor([tok("you are a bad person the river")["input_ids"]] * 2)
    with lf.steered(model, clamped, mode="hooks"):
        want_c = logits(model, ids)[:1]
    with lf.steered(model, free, mode="hooks"):
        want_f = logits(model, ids)[:1]
    h = lf.steer_(model, {"c": clamped, "f": free}, mode="hooks")
    h.route(["c", "f"])
    got = logits(model, ids)
    h.remove()
    torch.testing.assert_close(got[:1], want_c, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[1:], want_f, atol=1e-5, rtol=1e-5)
    assert (want_c - want_f).abs().max() > 1e-4  # the clamp changed something


def test_fold_and_bake_refuse_a_clamped_map_untouched(tok):
    model = make_model("llama")
    st = lf.fit(model, tok, SOURCE, TARGET, method="mean_act", support="q_0_100", **QUIET)
    snap = snapshot(model)
    with pytest.raises(lf.SteeringError, match="support-clamped.*model.layers.0.input_layernorm"):
        lf.steer_(model, st, mode="fold")
    with pytest.raises(lf.SteeringError, match="support-clamped"):
        lf.bake(model, st)
    assert_state_equal(model, snap)
    assert no_hooks_left(model) == [] and getattr(model, "_lineas_fast_handle", None) is None


def test_bad_support_arguments(tok):
    model = make_model("llama")
    with pytest.raises(lf.SteeringError, match="support="):
        lf.fit(model, tok, SOURCE, TARGET, method="linear_act", support="q_5", **QUIET)
    w = {"s": torch.ones(3)}
    with pytest.raises(lf.SteeringError, match="lo <= hi"):
        lf.Steering(w, w, support={"s": (torch.ones(3), torch.zeros(3))})
    with pytest.raises(lf.SteeringError, match="width"):
        lf.Steering(w, w, support={"s": (torch.zeros(2), torch.ones(2))})
    with pytest.raises(lf.SteeringError, match="no scale"):
        lf.Steering(w, w, support={"t": (torch.zeros(3), torch.ones(3))})


# ---------------------------------------------------------------- incremental
class ForwardCounter:
    """Counts full-model forward calls (each is one pass over a batch of prompts)."""

    def __init__(self, model):
        self.calls, self.rows = 0, []
        self.h = model.model.register_forward_pre_hook(self.pre, with_kwargs=True)

    def pre(self, module, args, kwargs):
        self.calls += 1
        self.rows.append(kwargs["input_ids"].shape[0])

    def remove(self):
        self.h.remove()


def test_incremental_costs_one_truncated_forward_per_site(tok):
    model = make_model("llama")
    sites = lf.resolve_sites(model, "norms")  # 4 sites
    counter = ForwardCounter(model)
    try:
        st = lf.fit(model, tok, SOURCE, TARGET, method="linear_act", incremental=True, **QUIET)
    finally:
        counter.remove()
    n_fit = len(SOURCE) + len(TARGET)
    probe = counter.rows.count(1)  # the 1-token execution-order probe
    passes = [r for r in counter.rows if r != 1]
    assert probe == 1 and len(passes) == len(sites) and all(r == n_fit for r in passes)
    assert st.meta["train"]["forwards"] == len(sites) and st.meta["hyperparams"]["incremental"]


def test_incremental_first_site_equals_at_once_and_later_sites_see_earlier_maps(tok):
    model = make_model("llama")
    inc = lf.fit(model, tok, SOURCE, TARGET, method="linear_act", incremental=True, **QUIET)
    once = lf.fit(model, tok, SOURCE, TARGET, method="linear_act", **QUIET)
    first, last = inc.sites[0], inc.sites[-1]
    assert torch.equal(inc.scale[first], once.scale[first]) and torch.equal(inc.shift[first], once.shift[first])
    assert not torch.allclose(inc.scale[last], once.scale[last])
    # the last site's map is the closed form on activations collected under all earlier maps
    earlier = lf.Steering({s: inc.scale[s] for s in inc.sites[:-1]}, {s: inc.shift[s] for s in inc.sites[:-1]},
                          {"model_type": "llama"})
    with lf.steered(model, earlier, mode="hooks"):
        xs, xt = (lf.collect(model, tok, t, [last], max_length=64)[last] for t in (SOURCE, TARGET))
    w, b = linear_map(xs, xt)
    torch.testing.assert_close(inc.scale[last], w, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(inc.shift[last], b, atol=1e-5, rtol=1e-5)


def test_execution_order_follows_the_forward():
    model = make_model("gpt2")
    sites = lf.resolve_sites(model, "mlp_out") + lf.resolve_sites(model, "attn_out")
    order = execution_order(model, sites)
    assert sites[0] == "transformer.h.0.mlp"  # given mlp first ...
    assert order == ["transformer.h.0.attn:0", "transformer.h.0.mlp", "transformer.h.1.attn:0",
                     "transformer.h.1.mlp"]  # ... but attention runs first in each block


def test_format_1_files_without_support_still_load(tmp_path):
    import json

    from safetensors.torch import save_file

    meta = {"method": "mean_act", "model_type": "llama", "model_class": "X", "name_or_path": "",
            "widths": {"s": 2}, "hyperparams": {}, "library_version": "0.1.0", "format_version": 1}
    save_file({"scale/s": torch.ones(2), "shift/s": torch.tensor([0.5, 0.0])}, tmp_path / "v1.safetensors",
              metadata={"lineas_fast": json.dumps(meta), "sites": json.dumps(["s"])})
    st = lf.Steering.load(tmp_path / "v1.safetensors")
    assert st.clamped == [] and st.nnz() == 1
