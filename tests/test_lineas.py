"""Fitting: LinEAS on tiny models, the proximal sparse-group-lasso step, Mean-AcT, and bad input."""

import pytest
import torch

import lineas_fast as lf
from conftest import (SOURCE, TARGET, VOCAB, assert_state_equal, fit_leaves_llama_as_found, logits, make_model,
                      no_hooks_left, snapshot)
from lineas_fast.methods.prox import prox_sparse_group, soft_threshold, step_sizes

pytestmark = pytest.mark.usefixtures("one_thread")

# explicit mechanics-test settings (the library defaults are tuned for the real model, see docs/tuning.md)
FAST = dict(steps=12, lr=1e-2, l1=0.0, normalize=None, pooling="mean", sites="norms", preserve=0.0, batch_size=32,
            transport_last=1.0, progress=False)


def fit(model, tok, **kw):
    return lf.fit(model, tok, SOURCE, TARGET, method="lineas", **{**FAST, **kw})


def assert_same(a, b):
    assert a.sites == b.sites
    for s in a.sites:
        assert torch.equal(a.scale[s], b.scale[s]) and torch.equal(a.shift[s], b.shift[s]), s


# ---------------------------------------------------------------- training
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_loss_decreases_and_artifact_is_complete(arch, tok):
    model = make_model(arch)
    st = fit(model, tok, steps=20)
    loss = st.meta["train"]["loss"]
    assert len(loss) == 20 and len(st.meta["train"]["nnz"]) == 20
    assert loss[-1] < 0.6 * loss[0], loss
    assert st.sites == lf.resolve_sites(model, "norms")
    assert st.meta["method"] == "lineas" and st.meta["model_type"] == model.config.model_type
    assert st.meta["hyperparams"]["steps"] == 20 and st.meta["hyperparams"]["lr"] == 1e-2
    assert st.nnz() == st.meta["train"]["nnz"][-1] > 0
    for s in st.sites:
        assert st.scale[s].dtype == torch.float32 and st.scale[s].shape == (32,)


def test_fitted_steering_moves_sources_toward_targets(tok):
    """The steered model's pooled source activations are closer (in W-loss) to the targets than before."""
    from lineas_fast.losses import wasserstein_loss

    model = make_model("llama")
    st = fit(model, tok, steps=30)
    v = lf.collect(model, tok, TARGET, st.sites)

    def dist():
        z = lf.collect(model, tok, SOURCE, st.sites, max_length=64)
        return float(sum(wasserstein_loss(z[s], torch.sort(v[s], 0).values) for s in st.sites))

    before = dist()
    with lf.steered(model, st, mode="hooks"):
        after = dist()
    assert after < 0.6 * before
    assert before == pytest.approx(st.meta["train"]["loss"][0], rel=1e-4)  # step 0 sees the identity maps


def test_transport_last_moves_the_last_sites_toward_targets(tok):
    """With ``transport_last=0.5`` the fit's first loss is the last half of the sites' distance × 2 (the weight that
    keeps the term's size), and it is those sites that end up closer to the targets."""
    from lineas_fast.losses import wasserstein_loss

    model = make_model("llama")
    st = fit(model, tok, steps=30, transport_last=0.5)
    last = st.sites[len(st.sites) // 2:]
    v = lf.collect(model, tok, TARGET, last)

    def dist():
        z = lf.collect(model, tok, SOURCE, last, max_length=64)
        return float(sum(wasserstein_loss(z[s], torch.sort(v[s], 0).values) for s in last))

    before = dist()
    with lf.steered(model, st, mode="hooks"):
        after = dist()
    assert after < 0.6 * before
    assert 2 * before == pytest.approx(st.meta["train"]["loss"][0], rel=1e-4)


@pytest.mark.parametrize("kw", [dict(pooling="tokens"), dict(pooling="last"), dict(normalize="var"),
                                dict(optimizer="sgd", lr=0.05), dict(sites="mlp_hidden", lr=1e-3),
                                dict(sites=["model.layers.1.self_attn:0"])])
def test_options_train(kw, tok):
    model = make_model("llama")
    st = fit(model, tok, **kw)
    loss = st.meta["train"]["loss"]
    assert loss[-1] < loss[0]


def test_deterministic_with_seed(tok):
    model = make_model("llama")
    a = fit(model, tok, batch_size=4, seed=3)
    b = fit(model, tok, batch_size=4, seed=3)
    assert_same(a, b)
    assert a.meta["train"]["loss"] == b.meta["train"]["loss"]
    c = fit(model, tok, batch_size=4, seed=4)  # the seed drives the batch sampling
    assert any(not torch.equal(a.shift[s], c.shift[s]) for s in a.sites)


def test_fit_leaves_model_unchanged(tok):
    model = make_model("llama")
    with fit_leaves_llama_as_found(model):
        fit(model, tok, steps=3)
        lf.fit(model, tok, SOURCE, TARGET, method="mean_act")


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_huge_sparsity_switches_everything_off_exactly(arch, tok):
    model = make_model(arch)
    for kw in (dict(group_l2=10.0), dict(l1=100.0)):
        st = fit(model, tok, steps=5, **kw)
        assert st.nnz() == 0 and st.active_sites() == []
        for s in st.sites:
            assert torch.equal(st.scale[s], torch.ones(32)) and torch.equal(st.shift[s], torch.zeros(32))
        loss = st.meta["train"]["loss"]
        assert loss == [loss[0]] * len(loss)  # the maps never left the identity
        assert st.meta["train"]["active_sites"] == [0] * len(loss)


def test_group_lasso_switches_whole_sites_off(tok):
    model = make_model("gpt2")
    free = fit(model, tok, steps=20)
    sparse = fit(model, tok, steps=20, group_l2=0.095)
    active = sparse.active_sites()
    assert 0 < len(active) < len(sparse.sites), active
    assert sparse.nnz() < free.nnz()
    for s in sparse.sites:
        if s in active:
            assert sparse.nnz(s) > 0
        else:  # switched off: exactly the identity, not merely small
            assert torch.equal(sparse.scale[s], torch.ones(32)) and torch.equal(sparse.shift[s], torch.zeros(32))
    assert sparse.meta["train"]["active_sites"][-1] == len(active)


def test_l1_drops_entries(tok):
    model = make_model("llama")
    free, sparse = fit(model, tok, steps=20), fit(model, tok, steps=20, l1=0.1)
    assert sparse.nnz() < 0.75 * free.nnz()
    assert sparse.meta["train"]["nnz"][-1] == sparse.nnz()


# ---------------------------------------------------------------- prox semantics on a synthetic problem
D = 8


def targets():
    g = torch.Generator().manual_seed(0)
    return torch.randn(D, generator=g) * 1.5, torch.randn(D, generator=g) * 1.5


def prox_descent(opt_name, lr, steps, l1=0.0, group_l2=0.0, naive=False):
    """min 0.5‖ω−1−t_ω‖² + 0.5‖b−t_b‖² + penalty, by optimizer step + prox_sparse_group. Returns (ω−1, b)."""
    tw, tb = targets()
    w = torch.ones(D, requires_grad=True)
    b = torch.zeros(D, requires_grad=True)
    opt = (torch.optim.Adam if opt_name == "adam" else torch.optim.SGD)([w, b], lr=lr)
    for _ in range(steps):
        loss = 0.5 * (w - 1 - tw).pow(2).sum() + 0.5 * (b - tb).pow(2).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
        gw, gb = (lr, lr) if naive else (step_sizes(opt, w), step_sizes(opt, b))
        prox_sparse_group(w.data, b.data, gw, gb, l1, group_l2, [slice(0, D)])
    return w.detach() - 1, b.detach()


@pytest.mark.parametrize("l1", [0.3, 0.9])
@pytest.mark.parametrize("opt,lr,steps", [("sgd", 0.1, 300), ("adam", 0.01, 2500)])
def test_l1_means_the_same_under_adam_and_sgd(opt, lr, steps, l1):
    """Both optimizers converge to the soft-threshold solution ST(t, l1) of the same objective."""
    tw, tb = targets()
    u, v = prox_descent(opt, lr, steps, l1=l1)
    torch.testing.assert_close(u, soft_threshold(tw, l1), atol=1e-4, rtol=0)
    torch.testing.assert_close(v, soft_threshold(tb, l1), atol=1e-4, rtol=0)
    assert torch.equal(u == 0, tw.abs() <= l1)  # exact zeros where |t| ≤ l1
    assert int((u == 0).sum() + (v == 0).sum()) > 0


def test_naive_adam_threshold_would_mean_something_else():
    """Sanity check of the test above: thresholding Adam with γ = lr does not reach ST(t, l1)."""
    tw, _ = targets()
    u, _ = prox_descent("adam", 0.01, 2500, l1=0.3, naive=True)
    assert (u - soft_threshold(tw, 0.3)).abs().max() > 0.1


@pytest.mark.parametrize("gl", [0.1, 0.3, 1.0])
def test_group_lasso_sgd_reaches_the_group_shrinkage(gl):
    tw, tb = targets()
    t = torch.cat([tw, tb])
    factor = max(0.0, 1 - gl * (2 * D) ** 0.5 / float(t.norm()))
    u, v = prox_descent("sgd", 0.1, 300, group_l2=gl)
    torch.testing.assert_close(torch.cat([u, v]), factor * t, atol=1e-4, rtol=0)


@pytest.mark.parametrize("gl", [0.1, 0.3, 1.0])
def test_group_lasso_means_the_same_under_adam(gl):
    """The group prox in Adam's metric reaches the same group-shrinkage solution as proximal SGD."""
    tw, tb = targets()
    t = torch.cat([tw, tb])
    factor = max(0.0, 1 - gl * (2 * D) ** 0.5 / float(t.norm()))
    u, v = prox_descent("adam", 0.01, 2500, group_l2=gl)
    torch.testing.assert_close(torch.cat([u, v]), factor * t, atol=1e-2, rtol=0)


def test_step_sizes():
    p = torch.zeros(3, requires_grad=True)
    sgd = torch.optim.SGD([p], lr=0.2)
    p.grad = torch.tensor([1.0, -2.0, 4.0])
    sgd.step()
    assert step_sizes(sgd, p) == 0.2
    q = torch.zeros(3, requires_grad=True)
    adam = torch.optim.Adam([q], lr=0.1, eps=1e-8)
    q.grad = torch.tensor([1.0, -2.0, 4.0])
    adam.step()
    # after one step v̂ = g², so γ = lr / (|g| + eps): exactly the step Adam took per unit of gradient
    torch.testing.assert_close(step_sizes(adam, q), 0.1 / (q.grad.abs() + 1e-8))
    torch.testing.assert_close(-q.detach(), step_sizes(adam, q) * q.grad, atol=1e-7, rtol=1e-5)


def test_prox_identity_and_group_exactness():
    w, b = 1 + torch.tensor([0.5, -0.05, 0.2, 0.0]), torch.tensor([0.01, -0.3, 0.0, 0.5])
    w0, b0 = w.clone(), b.clone()
    prox_sparse_group(w, b, 0.1, 0.1, 0.0, 0.0, [slice(0, 4)])
    assert torch.equal(w, w0) and torch.equal(b, b0)
    prox_sparse_group(w, b, 1.0, 1.0, 0.1, 0.0, [slice(0, 2), slice(2, 4)])
    torch.testing.assert_close(w - 1, soft_threshold(w0 - 1, 0.1))
    torch.testing.assert_close(b, soft_threshold(b0, 0.1))
    # a group whose norm is below its threshold becomes exactly the identity; the other one survives
    w, b = 1 + torch.tensor([0.01, 0.01, 2.0, 2.0]), torch.tensor([0.01, 0.01, 2.0, 2.0])
    prox_sparse_group(w, b, 1.0, 1.0, 0.0, 0.05, [slice(0, 2), slice(2, 4)])
    assert torch.equal(w[:2], torch.ones(2)) and torch.equal(b[:2], torch.zeros(2))
    assert (w[2:] != 1).all() and (b[2:] != 0).all()


# ---------------------------------------------------------------- Mean-AcT
def test_mean_act_is_the_hand_computed_mean_difference(tok):
    model = make_model("llama")
    sites = lf.resolve_sites(model, "norms")
    st = lf.fit(model, tok, SOURCE, TARGET, method="mean_act")

    def means(texts):
        per = {s: [] for s in sites}
        for t in texts:  # one unpadded sentence at a time, own hooks: independent of lf.collect
            hs = [model.get_submodule(s).register_forward_hook(
                lambda m, a, o, s=s: per[s].append(o[0].mean(0))) for s in sites]
            try:
                with torch.no_grad():
                    model(input_ids=tok([t], return_tensors="pt")["input_ids"])
            finally:
                for h in hs:
                    h.remove()
        return {s: torch.stack(v).mean(0) for s, v in per.items()}

    ms, mt = means(SOURCE), means(TARGET)
    assert st.sites == sites and st.meta["method"] == "mean_act"
    for s in sites:
        assert torch.equal(st.scale[s], torch.ones(32))
        torch.testing.assert_close(st.shift[s], mt[s] - ms[s], atol=1e-5, rtol=0)
        assert st.shift[s].abs().max() > 1e-3


# ---------------------------------------------------------------- bad input: SteeringError, model untouched
def _nan_for_char(model, ch):
    with torch.no_grad():
        model.model.embed_tokens.weight[VOCAB[ch]] = float("nan")


BAD = [
    dict(source=[]),
    dict(target=[]),
    dict(source=["only one"]),
    dict(target=["only one"]),
    dict(source=["fine", 3]),
    dict(target=["fine", None]),
    dict(source=["fine", "  "]),
    dict(source="a plain string"),
    dict(sites="model.layers.0.no_such_norm"),
    dict(sites=["model.layers.5.input_layernorm"]),
    dict(method="ridge"),
    dict(pooling="median"),
    dict(optimizer="lbfgs"),
    dict(normalize="std"),
    dict(lr=0.0),
    dict(steps=-1),
    dict(l1=-0.1),
    dict(batch_size=1),
]


@pytest.mark.parametrize("bad", BAD, ids=[next(iter(b)) + "=" + repr(next(iter(b.values())))[:20] for b in BAD])
def test_bad_input_refused_model_untouched(bad, tok):
    model = make_model("llama")
    snap, base = snapshot(model), logits(model)
    kw = {"source": SOURCE, "target": TARGET, "method": "lineas", **FAST, **bad}
    if kw["method"] != "lineas":
        kw.pop("steps"), kw.pop("lr"), kw.pop("progress")
    with pytest.raises(lf.SteeringError) as e:
        lf.fit(model, tok, **kw)
    key, value = next(iter(bad.items()))
    named = {"source": "source", "target": "target"}.get(key, str(value) if key in ("sites", "method", "pooling",
                                                                                     "optimizer", "normalize") else "")
    if isinstance(value, list) and key == "sites":
        named = value[0]
    assert named in str(e.value)
    assert_state_equal(model, snap)
    assert torch.equal(logits(model), base)
    assert no_hooks_left(model) == []


def test_nan_in_steered_activations_during_fit(tok):
    """NaN that only source prompts reach (an embedding row only they use) is caught in the training loop."""
    model = make_model("llama")
    assert not any("z" in t for t in TARGET) and any("z" in t for t in SOURCE + ["zz"])
    _nan_for_char(model, "z")
    flags = [p.requires_grad for p in model.parameters()]
    with pytest.raises(lf.SteeringError, match="NaN"):
        lf.fit(model, tok, SOURCE + ["zzz top"], TARGET, **FAST)
    assert no_hooks_left(model) == []
    assert [p.requires_grad for p in model.parameters()] == flags


def test_nan_model_refused_for_both_methods(tok):
    model = make_model("llama")
    with torch.no_grad():
        model.model.layers[0].input_layernorm.weight[0] = float("nan")
    snap = snapshot(model)
    for method in ("lineas", "mean_act"):
        kw = FAST if method == "lineas" else {}
        with pytest.raises(lf.SteeringError, match="NaN"):
            lf.fit(model, tok, SOURCE, TARGET, method=method, **kw)
    assert no_hooks_left(model) == []
    assert list(model.state_dict()) == list(snap)


# ---------------------------------------------------------------- training through the fused op
@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma2"])
def test_fused_training_matches_eager(arch, tok):
    model = make_model(arch)
    snap = snapshot(model)
    eager = fit(model, tok, fused=False, steps=6, l1=0.5)
    fused = fit(model, tok, fused=True, steps=6, l1=0.5)
    np_e, np_f = eager.meta["train"]["loss"], fused.meta["train"]["loss"]
    assert all(abs(a - b) <= 1e-4 * max(1.0, abs(a)) for a, b in zip(np_e, np_f)), (np_e, np_f)
    for s in eager.sites:
        torch.testing.assert_close(fused.scale[s], eager.scale[s], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(fused.shift[s], eager.shift[s], atol=1e-4, rtol=1e-4)
    assert_state_equal(model, snap)
    assert no_hooks_left(model) == []
    from lineas_fast.patching.fused import FusedNorm

    assert not any(isinstance(m, FusedNorm) for m in model.modules())


def test_bf16_autocast_training_stays_within_one_percent(tok):
    model = make_model("llama")
    full = fit(model, tok, steps=5, l1=0.5)
    low = fit(model, tok, steps=5, l1=0.5, autocast=True)
    assert low.meta["hyperparams"]["autocast"] is True
    for a, b in zip(full.meta["train"]["loss"], low.meta["train"]["loss"]):
        assert abs(a - b) <= 0.01 * abs(a), (full.meta["train"]["loss"], low.meta["train"]["loss"])
    assert full.meta["train"]["loss"] != low.meta["train"]["loss"]  # autocast really ran in bf16
