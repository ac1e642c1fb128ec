"""The one LinEAS loop (methods/trainer.py): schedule, stopping rule, mini-batches, the preservation term,
option checks — and that the LLM (eager, compiled) and pipeline fits all run through it."""

import math

import pytest
import torch

import lineas_fast as lf
from conftest import SOURCE, TARGET, make_model
from lineas_fast.errors import SteeringError
from lineas_fast.methods import trainer
from lineas_fast.methods.trainer import (Recipe, Targets, converged, diverging, strongest_entries, train_maps,
                                         transport_columns, transport_weights)

pytestmark = pytest.mark.usefixtures("one_thread")

FAST = dict(steps=12, lr=1e-2, l1=0.0, normalize=None, pooling="mean", sites="norms", preserve=0.0, batch_size=32,
            progress=False)


def fit(model, tok, **kw):
    return lf.fit(model, tok, SOURCE, TARGET, method="lineas", **{**FAST, **kw})


# ---------------------------------------------------------------- schedule
def test_cosine_decays_from_lr_to_lr_times_lr_end():
    r = Recipe(steps=101, lr=2e-3, schedule="cosine", lr_end=1e-3)
    lrs = [r.lr_at(t) for t in range(101)]
    assert lrs[0] == pytest.approx(2e-3) and lrs[-1] == pytest.approx(2e-6)
    assert lrs[50] == pytest.approx((2e-3 + 2e-6) / 2)  # half-way down at half the steps
    assert all(a > b for a, b in zip(lrs, lrs[1:]))


def test_constant_schedule_keeps_lr():
    r = Recipe(steps=10, lr=3e-3, schedule="constant")
    assert {r.lr_at(t) for t in range(10)} == {3e-3}


def test_fit_follows_the_schedule_and_records_it(tok):
    st = fit(make_model("llama"), tok, steps=9, lr=1e-2, lr_end=0.01)
    lrs = st.meta["train"]["lr"]
    assert lrs[0] == pytest.approx(1e-2) and lrs[-1] == pytest.approx(1e-4)
    assert st.meta["hyperparams"]["schedule"] == "cosine" and st.meta["hyperparams"]["betas"] == [0.9, 0.9]


def test_adam_gets_the_betas(tok, monkeypatch):
    seen = {}
    real = torch.optim.Adam

    class Spy(real):
        def __init__(self, params, **kw):
            seen.update(kw)
            super().__init__(params, **kw)

    monkeypatch.setattr(torch.optim, "Adam", Spy)
    fit(make_model("llama"), tok, steps=2, betas=(0.8, 0.95))
    assert seen["betas"] == (0.8, 0.95)


# ---------------------------------------------------------------- stopping rule
def test_converged_compares_whole_windows():
    flat = [1.0] * 40
    assert not converged(flat[:19], 10, 1e-3)      # fewer than two windows
    assert not converged(flat[:25], 10, 1e-3)      # not at a window boundary
    assert converged(flat[:20], 10, 1e-3)          # no improvement at all
    falling = [100.0 - t for t in range(40)]
    assert not converged(falling, 10, 1e-3)        # still falling by ~10 % a window
    assert converged(falling, 10, 0.5)             # ... which a loose tolerance accepts
    assert not converged(flat, 10, 0.0)            # tol = 0: never stops early


def test_the_stopping_rule_stops_a_fit(tok):
    st = fit(make_model("llama"), tok, steps=200, lr=1e-2, tol=0.05, window=10)
    train = st.meta["train"]
    assert train["stopped_early"] and train["steps_run"] < 200 and train["steps_run"] % 10 == 0
    assert len(train["loss"]) == train["steps_run"]
    assert converged(train["loss"], 10, 0.05)
    full = fit(make_model("llama"), tok, steps=25, tol=0.0, window=10)
    assert full.meta["train"]["steps_run"] == 25 and not full.meta["train"]["stopped_early"]


# ---------------------------------------------------------------- where the transport term looks
def test_transport_weights_count_only_the_last_sites_scaled_to_keep_the_size():
    slices = {f"s{i}": slice(2 * i, 2 * i + 2) for i in range(4)}
    w = torch.arange(1.0, 9.0)
    assert transport_weights(w, slices, 1.0, "cpu") is w  # every site: the weights as they are
    assert transport_weights(w, slices, 0.5, "cpu").tolist() == [0, 0, 0, 0, 10, 12, 14, 16]  # last 2, × 4/2
    assert transport_weights(w, slices, 0.1, "cpu").tolist() == [0, 0, 0, 0, 0, 0, 28, 32]  # at least one, × 4
    assert transport_weights(None, slices, 0.75, "cpu").tolist() == pytest.approx([0, 0] + [4 / 3] * 6)
    thirds = {f"s{i}": slice(i, i + 1) for i in range(30)}
    assert int((transport_weights(None, thirds, 1 / 3, "cpu") > 0).sum()) == 10  # 1/3 of 30 is 10, not 11


def test_the_transport_term_sees_only_the_last_sites():
    """Two sites; with ``transport_last=0.5`` moving the first site's source rows changes nothing in the
    transport term (its columns do not count), and the second site's columns count twice."""
    torch.manual_seed(0)
    x = torch.randn(8, 4)  # 4 source prompts, 4 target prompts; sites a = columns 0–1, b = columns 2–3
    v = x[4:] + 1.0
    kw = dict(n_source=4, targets=Targets.from_counts(v, [1] * 4), slices={"a": slice(0, 2), "b": slice(2, 4)},
              device=torch.device("cpu"), progress=False)
    full = train_maps(_Recorder(x), recipe=Recipe(steps=1, lr=1e-3, batch_size=4, normalize=None), **kw)[2]
    last = train_maps(_Recorder(x), recipe=Recipe(steps=1, lr=1e-3, batch_size=4, normalize=None,
                                                  transport_last=0.5), **kw)[2]
    only_b = train_maps(_Recorder(torch.cat([x[:, :2] * 0, x[:, 2:]], 1)),
                        recipe=Recipe(steps=1, lr=1e-3, batch_size=4, normalize=None, transport_last=0.5), **kw)[2]
    b_alone = train_maps(_Recorder(x[:, 2:]), recipe=Recipe(steps=1, lr=1e-3, batch_size=4, normalize=None),
                         **{**kw, "targets": Targets.from_counts(v[:, 2:], [1] * 4), "slices": {"b": slice(0, 2)}})[2]
    assert last["transport"][0] == pytest.approx(only_b["transport"][0])
    assert last["transport"][0] == pytest.approx(2 * b_alone["transport"][0])
    assert full["transport"][0] != pytest.approx(last["transport"][0])


def test_transport_columns_are_those_of_nonzero_weight():
    slices = {f"s{i}": slice(2 * i, 2 * i + 2) for i in range(4)}
    assert transport_columns(None, 8) == slice(0, 8)
    assert transport_columns(transport_weights(None, slices, 0.5, "cpu"), 8) == slice(4, 8)  # one block: a slice
    assert transport_columns(torch.arange(1.0, 9.0), 8) == slice(0, 8)
    gaps = transport_columns(torch.tensor([0.0, 1.0, 0.0, 2.0]), 4)  # not one block: the indices
    assert gaps.tolist() == [1, 3]


@pytest.mark.parametrize("kw", [dict(preserve=1.0, preserve_loss="paired"), dict(partial=0.5, preserve=0.5)])
def test_sorting_only_the_counted_columns_trains_the_same_maps(tok, monkeypatch, kw):
    """The transport term leaves out the columns ``transport_last`` weighs 0 (a third of them by default):
    the trained maps are bit-identical to sorting every column."""
    model = make_model("llama")
    opts = dict(transport_last=0.5, steps=4, batch_size=2, normalize="var", **kw)
    fast = fit(model, tok, **opts)
    monkeypatch.setattr(trainer, "transport_columns", lambda weights, width: slice(0, width))
    every = fit(model, tok, **opts)
    for s in fast.sites:
        assert torch.equal(fast.scale[s], every.scale[s]) and torch.equal(fast.shift[s], every.shift[s])
    assert any(not torch.equal(fast.scale[s], torch.ones_like(fast.scale[s])) for s in fast.sites)  # it moved


def test_a_fit_records_transport_last(tok):
    st = fit(make_model("llama"), tok, steps=2, transport_last=0.5)
    assert st.meta["hyperparams"]["transport_last"] == 0.5


# ---------------------------------------------------------------- divergence guard
def test_diverging_compares_whole_windows_with_the_identity_loss():
    assert not diverging([10.0, 25.0, 25.0, 25.0], 5, 10.0)          # not a whole window yet
    assert diverging([10.0, 25.0, 25.0, 25.0, 25.0], 5, 10.0)        # mean 22 > 2 × 10
    assert not diverging([10.0, 25.0, 25.0, 25.0, 25.0], 5, 12.0)    # ... but not 2 × 12
    assert not diverging([10.0, 19.0, 20.0, 21.0, 20.0], 5, 10.0)    # mean 18 ≤ 20: noisy, not diverging
    assert not diverging([10.0] + [30.0] * 5, 5, 10.0)               # only at window boundaries
    assert not diverging([10.0 - t for t in range(10)], 5, 10.0)     # falling


def test_a_lucky_first_batch_is_not_read_as_divergence():
    """The first step's loss is one mini-batch's: here the first batch happens to sit on the target (loss ~0)
    and every later one far from it, while the maps barely move (lr 1e-6). The window's mean is far above the
    first loss, but not above the identity's loss over several batches, which the guard checks before it
    restarts anything: no restart, every step run."""
    torch.manual_seed(0)
    x, v = torch.randn(12, 3), torch.randn(4, 3)

    class LuckyFirst(_Recorder):
        def __call__(self, idx):
            z, owner = super().__call__(idx)
            if len(self.calls) == 1:  # the very first batch lands exactly on the target
                return v * self.omega + self.shift, owner
            return z + 3.0, owner

    fwd = LuckyFirst(x)
    recipe = Recipe(steps=10, lr=1e-6, batch_size=4, normalize=None, window=5, seed=3)
    omega, shift, hist = train_maps(fwd, n_source=12, targets=Targets.from_counts(v, [1] * 4),
                                    slices={"a": slice(0, 3)}, recipe=recipe, device=torch.device("cpu"),
                                    progress=False)
    assert hist["loss"][0] < 1e-3 and min(hist["loss"][1:]) > 1.0   # the first test alone would have fired
    assert hist["restarts"] == [] and hist["steps_run"] == 10
    assert fwd.calls[5:8] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]]  # the reference batches, after step 5


def test_a_fit_that_converges_never_restarts(tok):
    train = fit(make_model("llama"), tok, steps=20, window=5).meta["train"]
    assert train["restarts"] == [] and train["steps_run"] == 20


def test_a_diverging_fit_restarts_from_the_identity_at_a_tenth_of_the_lr(tok):
    """lr = 1 throws the tiny model's norms far off (mean loss of the first 5 steps ~25 × the identity's); the
    guard warns with the numbers, starts again at 0.1 and that fit ends well below the identity's loss."""
    with pytest.warns(UserWarning, match=r"fit diverged at lr=1: the mean loss of steps 1–5 is .* over 2.0 × the "
                                         r"identity map's .*restarting from the identity at lr=0.1"):
        st = fit(make_model("llama"), tok, lr=1.0, steps=20, window=5)
    train = st.meta["train"]
    (event,) = train["restarts"]
    assert event["after_steps"] == 5 and event["lr"] == 1.0 and event["new_lr"] == pytest.approx(0.1)
    assert event["window_loss"] > 2 * event["identity_loss"]
    assert train["steps_run"] == 20 and len(train["loss"]) == 20  # the history is the kept fit's
    assert train["lr"][0] == pytest.approx(0.1)
    assert train["loss"][0] == pytest.approx(event["identity_loss"])  # it restarted at the identity
    assert train["loss"][-1] < 0.5 * train["loss"][0]


def test_a_fit_that_keeps_diverging_raises_and_leaves_the_model_as_found(tok):
    model = make_model("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = [p.requires_grad for p in model.parameters()]
    with pytest.warns(UserWarning, match="restarting"), \
            pytest.raises(SteeringError, match=r"fit diverged at lr=0.3: .* after 2 restarts"):
        fit(model, tok, lr=30.0, steps=20, window=5)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert [p.requires_grad for p in model.parameters()] == flags
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


# ---------------------------------------------------------------- relaxed-lasso refit
def test_refit_keeps_the_sparse_support_and_undoes_the_shrinkage(tok):
    """``refit_steps``: the l1 phase picks the entries; the refit moves only those (never one more), further
    than the shrunk l1 solution, with its own cosine schedule recorded in the history."""
    kw = dict(steps=10, lr=3e-2, l1=1.0, normalize="var")
    sparse = fit(make_model("llama"), tok, **kw)
    relaxed = fit(make_model("llama"), tok, refit_steps=8, **kw)
    train = relaxed.meta["train"]
    assert train["refit_from"] == 10 and train["steps_run"] == 18 and not train["stopped_early"]
    assert train["lr"][10] == pytest.approx(3e-2) and train["lr"][-1] == pytest.approx(3e-5)
    assert sparse.meta["train"]["refit_from"] is None
    dense = fit(make_model("llama"), tok, **{**kw, "l1": 0.0})
    assert 0 < sparse.nnz() < dense.nnz()  # the penalty made it sparse, but not empty
    assert relaxed.nnz() <= sparse.nnz()
    for s in sparse.sites:  # refit entries are a subset of the l1 phase's support: same first phase, same seed
        assert not ((relaxed.scale[s] != 1) & ~(sparse.scale[s] != 1)).any()
        assert not ((relaxed.shift[s] != 0) & ~(sparse.shift[s] != 0)).any()
    moved = lambda st: sum(float((st.scale[s] - 1).abs().sum() + st.shift[s].abs().sum()) for s in st.sites)
    assert moved(relaxed) > moved(sparse)
    assert train["loss"][-1] < sparse.meta["train"]["loss"][-1]
    # without a penalty there is nothing to refit
    assert fit(make_model("llama"), tok, steps=4, refit_steps=3).meta["train"]["steps_run"] == 4


# ---------------------------------------------------------------- density cap
def test_strongest_entries_ranks_moves_in_activation_units():
    omega = torch.tensor([1.0, 1.5, 1.1, 1.0])
    shift = torch.tensor([0.0, 0.2, 0.0, -0.9])
    scale = torch.tensor([1.0, 1.0, 10.0, 1.0])  # column 2: a small scale change on a large neuron moves it by 1
    # effects: ω 0, 0.5, 1.0, 0 | b 0, 0.2, 0, 0.9 → the 3 (= floor(0.4 · 8)) largest: ω2, b3, ω1
    kw, kb = strongest_entries(omega, shift, scale, 0.4)
    assert kw.tolist() == [False, True, True, False] and kb.tolist() == [False, False, False, True]
    # a cap above the moved count keeps every moved entry and never an unmoved one
    kw, kb = strongest_entries(omega, shift, scale, 1.0)
    assert kw.tolist() == [False, True, True, False] and kb.tolist() == [False, True, False, True]


def test_density_caps_the_moved_entries_and_refits_them(tok):
    """``density``: after the first phase at most that share of the (ω, b) entries stay off the identity;
    the refit moves only those, and the history says how many the cap removed."""
    kw = dict(steps=8, lr=3e-2, normalize="var")
    dense = fit(make_model("llama"), tok, **kw)
    capped = fit(make_model("llama"), tok, density=0.1, refit_steps=6, **kw)
    entries = 2 * sum(dense.meta["widths"].values())
    cap = capped.meta["train"]["density_cap"]
    assert cap["entries"] == entries and cap["moved_before"] == dense.nnz() > cap["kept"] == entries // 10
    assert capped.nnz() <= entries // 10 and capped.meta["train"]["refit_from"] == 8
    assert capped.meta["hyperparams"]["density"] == 0.1
    for s in capped.sites:  # the refit moved only entries the dense phase had moved
        assert not ((capped.scale[s] != 1) & (dense.scale[s] == 1)).any()
    assert dense.meta["train"]["density_cap"] is None


# ---------------------------------------------------------------- mini-batches
def test_random_mini_batches_depend_on_the_seed(tok):
    a = fit(make_model("llama"), tok, steps=4, batch_size=3, seed=0)
    b = fit(make_model("llama"), tok, steps=4, batch_size=3, seed=0)
    c = fit(make_model("llama"), tok, steps=4, batch_size=3, seed=1)
    assert a.meta["train"]["loss"] == b.meta["train"]["loss"]
    assert a.meta["train"]["loss"] != c.meta["train"]["loss"]


class _Recorder:
    """A fake training forward: z = ω·x + b on fixed per-prompt rows; remembers the batches it saw."""

    def __init__(self, x):
        self.x, self.calls, self.entered = x, [], 0

    def __enter__(self):
        self.entered += 1
        return self

    def __exit__(self, *exc):
        return None

    def bind(self, omega, shift):
        self.omega, self.shift = omega, shift

    def __call__(self, idx):
        self.calls.append(list(idx))
        return self.x[idx] * self.omega + self.shift, torch.tensor(idx)


def test_train_maps_batches_and_preserve_rows():
    torch.manual_seed(0)
    x = torch.randn(10, 3)  # 6 source prompts, then 4 target prompts
    v = x[6:] + 0.5
    fwd = _Recorder(x)
    recipe = Recipe(steps=5, lr=1e-2, batch_size=4, preserve=1.0, normalize=None)
    omega, shift, hist = train_maps(fwd, n_source=6, targets=Targets.from_counts(v, [1] * 4),
                                    slices={"a": slice(0, 3)}, recipe=recipe, device=torch.device("cpu"),
                                    progress=False)
    assert fwd.entered == 1 and len(fwd.calls) == 5
    for call in fwd.calls:
        src, tgt = [i for i in call if i < 6], [i for i in call if i >= 6]
        assert len(src) == 4 and len(set(src)) == 4 and len(tgt) == 4
    assert all(p >= 0 for p in hist["preserve"]) and hist["steps_run"] == 5


# ---------------------------------------------------------------- partial strengths
def test_a_partial_strength_step_transports_onto_the_interpolated_target():
    """At the identity (step 0) the steered source is the unsteered source S, so the transport term against
    the interpolation ``(1−λ)·Q_S + λ·Q_T`` is exactly ``λ²·W(S, T)``: the λ the step drew, squared."""
    torch.manual_seed(0)
    x = torch.randn(12, 4)  # 6 source prompts, then 6 target prompts
    v = 2 * x[6:] + 1
    kw = dict(n_source=6, targets=Targets.from_counts(v, [1] * 6), slices={"a": slice(0, 4)},
              device=torch.device("cpu"), source=x[:6], progress=False)
    full = train_maps(_Recorder(x), recipe=Recipe(steps=1, lr=1e-3, batch_size=6, normalize=None), **kw)[2]
    part = train_maps(_Recorder(x), recipe=Recipe(steps=1, lr=1e-3, batch_size=6, normalize=None, partial=1.0),
                      **kw)[2]
    lam = part["strength"][0]
    assert full["strength"] == [1.0] and 0 <= lam < 1
    assert part["transport"][0] == pytest.approx(lam ** 2 * full["transport"][0], rel=1e-5)


def test_partial_draws_its_share_of_steps_and_binds_the_maps_at_that_strength():
    """``partial=p``: about p of the steps run at a drawn λ < 1 — the forward then sees 1 + λ(ω − 1) and λ·b
    of the maps as they are at that step — and the rest at λ = 1; ``partial`` needs the unsteered source."""
    torch.manual_seed(0)
    x = torch.randn(12, 4)
    v = 2 * x[6:] + 1

    class Binds(_Recorder):
        def bind(self, omega, shift):
            super().bind(omega, shift)
            self.bound = getattr(self, "bound", []) + [(omega.detach().clone(), shift.detach().clone())]

    kw = dict(n_source=6, targets=Targets.from_counts(v, [1] * 6), slices={"a": slice(0, 4)},
              device=torch.device("cpu"), source=x[:6], progress=False)
    recipe = dict(lr=3e-2, batch_size=3, normalize=None, schedule="constant", partial=0.5)
    fwd = Binds(x)
    hist = train_maps(fwd, recipe=Recipe(steps=40, **recipe), **kw)[2]
    partial = [k for k, lam in enumerate(hist["strength"]) if lam < 1]
    assert 10 <= len(partial) <= 30 and all(0 <= hist["strength"][k] < 1 for k in partial)
    for k in (partial[-1], max(set(range(40)) - set(partial))):
        # the maps at the start of step k: a run of k steps (same seed, constant lr: the same first k steps)
        omega_k, shift_k, _ = train_maps(_Recorder(x), recipe=Recipe(steps=k, **recipe), **kw)
        lam = hist["strength"][k]
        assert torch.allclose(fwd.bound[k][0], 1 + lam * (omega_k - 1)), k
        assert torch.allclose(fwd.bound[k][1], lam * shift_k), k
    with pytest.raises(lf.SteeringError, match="partial"):
        train_maps(_Recorder(x), recipe=Recipe(steps=2, lr=1e-2, partial=0.5), **{**kw, "source": None})


def test_partial_fits_a_model_and_records_the_strengths(tok):
    st = fit(make_model("llama"), tok, steps=8, partial=0.5, seed=1)
    strengths = st.meta["train"]["strength"]
    assert len(strengths) == 8 and any(s < 1 for s in strengths) and st.meta["hyperparams"]["partial"] == 0.5
    assert fit(make_model("llama"), tok, steps=3).meta["train"]["strength"] == [1.0] * 3


# ---------------------------------------------------------------- preservation term
def test_preserve_moves_target_text_less(tok):
    """The preservation term trades transport for keeping the target prompts' activations in place."""
    model = make_model("llama")
    free = fit(model, tok, steps=30, preserve=0.0)
    kept = fit(model, tok, steps=30, preserve=10.0)
    sites = free.sites
    before = lf.collect(model, tok, TARGET, sites)

    def moved(st):
        with lf.steered(model, st, mode="hooks"):
            after = lf.collect(model, tok, TARGET, sites)
        return sum(float((after[s] - before[s]).pow(2).sum()) for s in sites)

    assert moved(kept) < 0.5 * moved(free)
    assert kept.meta["train"]["preserve"][-1] > 0 and free.meta["train"]["preserve"] == [0.0] * 30
    assert kept.meta["train"]["loss"][0] == pytest.approx(kept.meta["train"]["transport"][0])  # 0 at identity


def test_paired_preserve_compares_each_row_with_its_own_unsteered_value():
    """``preserve_loss="paired"``: the forward returns target rows in its own order (owner ids); each is
    compared with the same prompt's unsteered row — zero at the identity, the mean squared move after."""
    torch.manual_seed(0)
    x = torch.randn(7, 2)  # 3 source prompts, then 4 target prompts (one row each)
    v = x[3:].clone()

    class Shuffled(_Recorder):  # returns rows in reverse order, as a length-bucketed forward may
        def __call__(self, idx):
            idx = list(reversed(idx))
            return self.x[idx] * self.omega + self.shift, torch.tensor(idx)

    recipe = Recipe(steps=1, lr=1e-9, batch_size=4, preserve=1.0, preserve_loss="paired", normalize=None)
    _, _, hist = train_maps(Shuffled(x), n_source=3, targets=Targets.from_counts(v, [1] * 4),
                            slices={"a": slice(0, 2)}, recipe=recipe, device=torch.device("cpu"), progress=False)
    assert hist["preserve"] == [0.0]  # identity: every target row equals its own unsteered row

    from lineas_fast.losses import paired_loss, wasserstein_loss

    z, ref = v * 1.5 + 0.25, v
    assert float(paired_loss(z, ref)) == pytest.approx(float(((z - ref) ** 2).mean(0).sum()))
    swapped = ref[[1, 0, 2, 3]]  # same distribution, other pairing: W is blind to it, paired is not
    assert float(wasserstein_loss(swapped, torch.sort(ref, 0).values)) == pytest.approx(0.0, abs=1e-12)
    assert float(paired_loss(swapped, ref)) > 0


def test_local_preserve_charges_each_map_its_own_move_only():
    """``preserve_loss="local"``: the move a map itself makes, ``(ω − 1)⊙h + b`` with h its input, read off
    the rows it wrote; what an upstream map moved is not charged again (paired charges it)."""
    from lineas_fast.methods.trainer import local_move

    torch.manual_seed(0)
    h = torch.randn(6, 3)
    omega, b = torch.tensor([1.0, 0.5, 2.0]), torch.tensor([0.0, 0.3, -0.2])
    assert torch.allclose(local_move(omega * h + b, omega, b), (omega - 1) * h + b, atol=1e-6)
    assert torch.equal(local_move(h, torch.ones(3), torch.zeros(3)), torch.zeros(6, 3))  # identity: no move
    # ω = 0 writes b whatever h was: the move is read with |ω| held at 1e-3, finite
    assert torch.isfinite(local_move(torch.zeros(6, 3) + b, torch.zeros(3), b)).all()

    # two chained sites: "up" shifts by 1 and feeds "down", which shifts by 0.5: the paired move of "down"
    # (against its unsteered value) is 1.5, its local move only its own 0.5
    x = torch.randn(4, 1)
    up = x + 1.0
    down = (x + up) + 0.5  # the unsteered "down" is x + x
    z = torch.cat([up, down], 1)
    omega, b = torch.ones(2), torch.tensor([1.0, 0.5])
    assert torch.allclose(local_move(z, omega, b), torch.tensor([1.0, 0.5]).expand(4, 2))
    assert torch.allclose(z - torch.cat([x, 2 * x], 1), torch.tensor([1.0, 1.5]).expand(4, 2))


def test_local_preserve_fits_and_is_zero_at_the_identity(tok):
    st = fit(make_model("llama"), tok, steps=3, preserve=1.0, preserve_loss="local")
    hist = st.meta["train"]
    assert st.meta["hyperparams"]["preserve_loss"] == "local"
    assert hist["preserve"][0] == pytest.approx(0.0, abs=1e-9) and hist["preserve"][-1] > 0


@pytest.mark.parametrize("preserve_loss", ["wasserstein", "paired", "local"])
def test_preserve_under_compile_matches_eager(tok, preserve_loss):
    model = make_model("llama")
    kw = dict(steps=4, preserve=1.0, pooling="tokens", preserve_loss=preserve_loss)
    eager = fit(model, tok, **kw)
    compiled = fit(model, tok, compile="aot_eager", **kw)
    assert eager.meta["train"]["preserve"][0] == pytest.approx(0.0, abs=1e-6)
    for a, b in zip(eager.meta["train"]["loss"], compiled.meta["train"]["loss"]):
        assert a == pytest.approx(b, rel=1e-4)


# ---------------------------------------------------------------- option checks
@pytest.mark.parametrize("kw, name", [
    (dict(schedule="linear"), "schedule"), (dict(lr_end=0.0), "lr_end"), (dict(lr_end=2.0), "lr_end"),
    (dict(betas=(0.9,)), "betas"), (dict(betas=(0.9, 1.0)), "betas"), (dict(preserve=-1.0), "preserve"),
    (dict(preserve=math.nan), "preserve"), (dict(preserve_loss="l2"), "preserve_loss"), (dict(tol=-0.1), "tol"), (dict(window=0), "window"),
    (dict(lr=math.inf), "lr"), (dict(batch_size=1), "batch_size"), (dict(steps=2.5), "steps"),
    (dict(refit_steps=-1), "refit_steps"), (dict(refit_steps=1.5), "refit_steps"),
    (dict(partial=1.5), "partial"), (dict(partial=-0.1), "partial"), (dict(partial=math.nan), "partial"),
    (dict(transport_last=0.0), "transport_last"), (dict(transport_last=1.5), "transport_last"),
    (dict(density=0.0), "density"), (dict(density=1.5), "density"), (dict(density=math.nan), "density"),
])
def test_bad_recipe_options_are_named_before_anything_runs(tok, kw, name):
    model = make_model("llama")
    with pytest.raises(lf.SteeringError, match=name):
        fit(model, tok, **kw)


def test_the_loss_plot_draws_partial_strength_steps_apart(tmp_path):
    """A ``partial`` fit's steps at λ < 1 have a loss against another target: the plot draws them as their
    own dots, not as part of the λ = 1 loss line."""
    from matplotlib.figure import Figure

    from lineas_fast import report

    drawn = {}
    real_savefig = Figure.savefig

    def savefig(fig, path, *a, **k):
        ax = fig.axes[0]
        drawn["lines"] = [(line.get_label(), len(line.get_xdata())) for line in ax.get_lines()]
        return real_savefig(fig, path, *a, **k)

    train = {"loss": [9.0, 1.0, 8.0, 0.5, 7.0], "nnz": [5] * 5, "strength": [1.0, 0.3, 1.0, 0.1, 1.0]}
    import unittest.mock as mock

    with mock.patch.object(Figure, "savefig", savefig):
        report.loss_curve_png(train, tmp_path / "a.png")
        assert drawn["lines"] == [("W-loss, steps at λ = 1", 3), ("steps at λ < 1 (interpolated target)", 2)]
        report.loss_curve_png({"loss": [3.0, 2.0], "nnz": [1, 1]}, tmp_path / "b.png")
        assert drawn["lines"] == [("W-loss", 2)]
    assert (tmp_path / "a.png").stat().st_size > 0


def _rescaled(model, c: float):
    """The same function with the MLP hidden neurons ``c`` times larger (up projection ×c, down ×1/c)."""
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.up_proj.weight.mul_(c)
            layer.mlp.down_proj.weight.div_(c)
    return model


def test_the_fit_does_not_depend_on_the_scale_of_the_neurons(tok, monkeypatch):
    """A function-preserving rescaling of the MLP hidden neurons (×10 in, ×1/10 out) gives the same fit with
    the defaults (the transport term on every site) — ω the same, b ×10, the same steered logits — because b is learned in units of the
    activations' size (``shift_unit``); learned in activation units it would not (the contrast)."""
    from lineas_fast.methods import trainer

    c, ids = 10.0, tok(["you are a bad", "the river"], return_tensors="pt", padding=True)

    def fits():
        a, b = make_model("llama"), _rescaled(make_model("llama"), c)
        # transport_last=1: every entry gets a direct gradient. With the default's last third the early sites'
        # entries get only what flows back from downstream, on this random tiny model often ~0, and Adam's first
        # steps (about lr·sign(g)) then turn float rounding into moves of lr — the same in both fits only by luck
        sa, sb = (lf.fit(m, tok, SOURCE, TARGET, steps=4, transport_last=1.0, progress=False) for m in (a, b))
        with torch.no_grad():
            la, lb = [], []
            for m, st, out in ((a, sa, la), (b, sb, lb)):
                with lf.steered(m, st, strength=1.0, mode="hooks"):
                    out.append(m(**ids).logits[ids["attention_mask"].bool()])
        return sa, sb, la[0], lb[0]

    sa, sb, la, lb = fits()
    assert sb.meta["train"]["shift_unit"] == pytest.approx(c * sa.meta["train"]["shift_unit"], rel=1e-4)
    for site in sa.sites:
        # Adam's first steps are nearly sign steps: float rounding moves a few entries by ~1e-4
        torch.testing.assert_close(sb.scale[site], sa.scale[site], atol=2e-3, rtol=0)
        torch.testing.assert_close(sb.shift[site], c * sa.shift[site], atol=2e-3 * c, rtol=0)
    same = float((lb - la).abs().max())
    assert same < 2e-4
    moved = max(float((sa.shift[s]).abs().max()) for s in sa.sites) / sa.meta["train"]["shift_unit"]
    assert moved > 1e-2  # b̃ did move (4 steps at lr 1e-2): the comparison is not between identity maps

    monkeypatch.setattr(trainer, "shift_unit", lambda v, ref=None: 1.0)  # b in activation units
    sa, sb, la, lb = fits()
    assert float((lb - la).abs().max()) > max(1e-3, 10 * same)  # measured: 8e-3 against 7e-6
