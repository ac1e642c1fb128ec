"""Patching on every tiny architecture: hooks vs fold, strength, exact removal, routing, generate.

Tolerances: fp32 1e-5 (SPEC §6); "exactly" means ``torch.equal``.
"""

import pytest
import torch

import lineas_fast as lf
from conftest import (ARCHS, FP32_TOL, assert_state_equal, logits, make_model, max_diff, no_hooks_left,
                      random_steering, snapshot, tiny_batch)
from lineas_fast.patching.handle import ATTR

pytestmark = pytest.mark.usefixtures("one_thread")

GEMMA = {"gemma2", "gemma3"}
STEERED_MIN = 1e-3  # steered logits must differ from unsteered by at least this much


def foldable_norm_steering(model, arch, seed=0):
    """Random steering on `norms`; for Gemma the post-norms get a zero shift (foldable)."""
    st = random_steering(model, "norms", seed=seed)
    if arch in GEMMA:
        for s in lf.resolve_sites(model, "post_norms"):
            st.shift[s] = torch.zeros_like(st.shift[s])
    return st


@pytest.fixture(params=ARCHS)
def arch(request):
    return request.param


# ---------------------------------------------------------------- hooks basics
def test_hooks_steer_and_strength_zero_is_exact(arch):
    model = make_model(arch)
    base = logits(model)
    st = random_steering(model, "norms")
    h = lf.steer_(model, st, mode="hooks")
    assert max_diff(logits(model), base) > STEERED_MIN
    h.set_strength(0.0)
    assert torch.equal(logits(model), base)
    h.remove()
    with lf.steered(model, st, strength=0.0, mode="hooks"):
        assert torch.equal(logits(model), base)


def test_hooks_apply_the_strength_formula():
    """At a site: h' = (1 − λ + λω)⊙h + λb, on every token."""
    model = make_model("llama")
    site = "model.layers.0.post_attention_layernorm"
    st = random_steering(model, [site], seed=3)
    module = model.get_submodule(site)
    seen = {}
    h0 = module.register_forward_hook(lambda m, a, o: seen.__setitem__("raw", o.clone()))
    try:
        with lf.steered(model, st, strength=0.7, mode="hooks"):
            h1 = module.register_forward_hook(lambda m, a, o: seen.__setitem__("steered", o.clone()))
            logits(model)
            h1.remove()
    finally:
        h0.remove()
    lam = 0.7
    want = (1 - lam + lam * st.scale[site]) * seen["raw"] + lam * st.shift[site]
    torch.testing.assert_close(seen["steered"], want, atol=FP32_TOL, rtol=0)
    assert max_diff(seen["steered"], seen["raw"]) > STEERED_MIN


# ---------------------------------------------------------------- fold == hooks
def test_fold_equals_hooks_on_norms(arch):
    model = make_model(arch)
    st = foldable_norm_steering(model, arch)
    base = logits(model)
    with lf.steered(model, st, strength=0.8, mode="hooks"):
        hooked = logits(model)
    with lf.steered(model, st, strength=0.8, mode="fold") as h:
        assert no_hooks_left(model) == []
        folded = logits(model)
        h.set_strength(0.3)  # refold from the originals
        folded_03 = logits(model)
    with lf.steered(model, st, strength=0.3, mode="hooks"):
        hooked_03 = logits(model)
    assert max_diff(hooked, base) > STEERED_MIN
    assert max_diff(folded, hooked) <= FP32_TOL
    assert max_diff(folded_03, hooked_03) <= FP32_TOL
    assert torch.equal(logits(model), base)


@pytest.mark.parametrize("arch_g", sorted(GEMMA))
def test_fold_refuses_gemma_post_norm_shift(arch_g):
    model = make_model(arch_g)
    st = random_steering(model, "norms")
    snap, base = snapshot(model), logits(model)
    with pytest.raises(lf.SteeringError) as e:
        lf.steer_(model, st, mode="fold")
    msg = str(e.value)
    for s in lf.resolve_sites(model, "post_norms"):
        assert s in msg
    assert "input_layernorm" not in msg  # only the unfoldable sites are named
    assert getattr(model, ATTR, None) is None
    assert_state_equal(model, snap)
    assert torch.equal(logits(model), base)
    # hooks can do it; and with zero shift on the post-norms, fold works too
    with lf.steered(model, st, mode="hooks"):
        assert max_diff(logits(model), base) > STEERED_MIN
    post = lf.resolve_sites(model, "post_norms")
    st_post = random_steering(model, post, shift=False)
    with lf.steered(model, st_post, mode="hooks"):
        hooked = logits(model)
    with lf.steered(model, st_post, mode="fold"):
        folded = logits(model)
    assert max_diff(hooked, base) > STEERED_MIN
    assert max_diff(folded, hooked) <= FP32_TOL


@pytest.mark.parametrize("preset", ["mlp_out", "attn_out", "mlp_hidden"])
def test_fold_equals_hooks_on_linear_sites(arch, preset):
    model = make_model(arch)
    st = random_steering(model, preset, seed=1)
    base, snap = logits(model), snapshot(model)
    with lf.steered(model, st, strength=0.9, mode="hooks"):
        hooked = logits(model)
    with lf.steered(model, st, strength=0.9, mode="fold"):
        folded = logits(model)
    assert max_diff(hooked, base) > STEERED_MIN
    assert max_diff(folded, hooked) <= FP32_TOL
    assert torch.equal(logits(model), base)
    assert_state_equal(model, snap)


@pytest.mark.parametrize("arch2", ["gpt2", "llama", "phi3", "gemma3"])
def test_fold_stacked_sites_on_one_linear(arch2):
    """Norm shift + MLP hidden (input of down_proj) + MLP out (output of down_proj) folded together."""
    model = make_model(arch2)
    sites = (lf.resolve_sites(model, "norms") + lf.resolve_sites(model, "mlp_hidden")
             + lf.resolve_sites(model, "mlp_out") + lf.resolve_sites(model, "attn_out"))
    st = random_steering(model, sites, seed=2, spread=0.2)
    if arch2 in GEMMA:
        for s in lf.resolve_sites(model, "post_norms"):
            st.shift[s].zero_()
    base, snap = logits(model), snapshot(model)
    with lf.steered(model, st, mode="hooks"):
        hooked = logits(model)
    with lf.steered(model, st, mode="fold"):
        folded = logits(model)
    assert max_diff(hooked, base) > STEERED_MIN
    assert max_diff(folded, hooked) <= FP32_TOL
    assert torch.equal(logits(model), base)
    assert_state_equal(model, snap)


# ---------------------------------------------------------------- exact removal
@pytest.mark.parametrize("mode", ["hooks", "fold"])
def test_remove_restores_bit_exactly(arch, mode):
    model = make_model(arch)
    st = foldable_norm_steering(model, arch) if mode == "fold" else random_steering(model, "norms")
    snap, base = snapshot(model), logits(model)
    flags = [p.requires_grad for p in model.parameters()]
    h = lf.steer_(model, st, strength=1.0, mode=mode)
    assert getattr(model, ATTR) is h
    assert max_diff(logits(model), base) > STEERED_MIN
    if mode == "fold":
        h.set_strength(0.5)
    h.remove()
    assert getattr(model, ATTR, None) is None
    assert no_hooks_left(model) == []
    assert_state_equal(model, snap)
    assert [p.requires_grad for p in model.parameters()] == flags
    assert torch.equal(logits(model), base)
    h.remove()  # idempotent
    with pytest.raises(lf.SteeringError):
        h.set_strength(0.5)  # a removed handle refuses to act


@pytest.mark.parametrize("arch2", ["llama", "qwen3"])
def test_fold_rmsnorm_shift_bias_is_created_then_removed(arch2):
    """An RMSNorm shift folds into (new) q/k/v biases; removing deletes them again (keys unchanged)."""
    model = make_model(arch2)
    assert model.model.layers[0].self_attn.q_proj.bias is None
    st = random_steering(model, ["model.layers.0.input_layernorm"], scale=False)
    keys = list(model.state_dict())
    with lf.steered(model, st, mode="fold"):
        assert model.model.layers[0].self_attn.q_proj.bias is not None
    assert model.model.layers[0].self_attn.q_proj.bias is None
    assert list(model.state_dict()) == keys


# ---------------------------------------------------------------- patching rules
def test_patching_twice_raises_and_keeps_the_first(arch):
    model = make_model(arch)
    st = random_steering(model, "norms")
    h = lf.steer_(model, st, mode="hooks")
    steered = logits(model)
    for mode in ("hooks", "fold", None):
        with pytest.raises(lf.SteeringError, match="already steered"):
            lf.steer_(model, st, mode=mode)
    assert getattr(model, ATTR) is h
    assert torch.equal(logits(model), steered)
    with pytest.raises(lf.SteeringError):
        lf.bake(model, st)
    h.remove()


@pytest.mark.parametrize("mode", ["hooks", "fold"])
def test_other_instance_unaffected(arch, mode):
    model, other = make_model(arch), make_model(arch)
    base = logits(other)
    st = foldable_norm_steering(model, arch)
    with lf.steered(model, st, mode=mode):
        assert max_diff(logits(model), base) > STEERED_MIN
        assert torch.equal(logits(other), base)
        assert no_hooks_left(other) == []


def test_unknown_mode_refused():
    model = make_model("llama")
    with pytest.raises(lf.SteeringError, match="turbo"):
        lf.steer_(model, random_steering(model, "norms"), mode="turbo")
    assert getattr(model, ATTR, None) is None


def test_steered_restores_on_exception(arch):
    model = make_model(arch)
    st = random_steering(model, "norms")
    snap, base = snapshot(model), logits(model)
    with pytest.raises(RuntimeError, match="boom"):
        with lf.steered(model, st, mode="hooks"):
            assert max_diff(logits(model), base) > STEERED_MIN
            raise RuntimeError("boom")
    assert getattr(model, ATTR, None) is None and no_hooks_left(model) == []
    assert torch.equal(logits(model), base)
    if arch not in GEMMA:
        with pytest.raises(RuntimeError, match="boom"):
            with lf.steered(model, st, mode="fold"):
                raise RuntimeError("boom")
        assert_state_equal(model, snap)
        assert torch.equal(logits(model), base)


def test_bad_steering_argument():
    model = make_model("llama")
    for bad in (None, {}, {"a": "not a steering"}, [random_steering(model, "norms")]):
        with pytest.raises(lf.SteeringError):
            lf.steer_(model, bad)
    assert getattr(model, ATTR, None) is None


# ---------------------------------------------------------------- per-row strength and routing
def rows_alone(model, steering, strengths, ids, mask):
    """Logits of each row run alone (batch of 1) with ``steering`` at its strength (None = unsteered)."""
    out = []
    for i, s in enumerate(strengths):
        if steering[i] is None or s == 0.0:
            out.append(logits(model, ids[i:i + 1], mask[i:i + 1]))
        else:
            with lf.steered(model, steering[i], strength=s, mode="hooks"):
                out.append(logits(model, ids[i:i + 1], mask[i:i + 1]))
    return torch.cat(out)


@pytest.mark.parametrize("arch2", ["gpt2", "llama", "gemma2"])
def test_route_per_row_equals_single_runs(arch2):
    model = make_model(arch2)
    ids, mask = tiny_batch(3, 7, seed=1)  # rows with different padding
    a, b = random_steering(model, "norms", seed=1), random_steering(model, "norms", seed=2)
    want = rows_alone(model, [a, None, b], [1.0, 0.0, 0.7], ids, mask)
    h = lf.steer_(model, {"a": a, "b": b}, mode="hooks")
    assert torch.equal(logits(model, ids, mask), logits(make_model(arch2), ids, mask))  # rows start unsteered
    h.route(["a", None, "b"], strength=[1.0, 0.0, 0.7])
    got = logits(model, ids, mask)
    assert max_diff(got, want) <= FP32_TOL
    # set_strength(float) rescales every row and keeps the names
    h.set_strength(0.5)
    want_05 = rows_alone(make_model(arch2), [a, None, b], [0.5, 0.5, 0.5], ids, mask)
    assert max_diff(logits(model, ids, mask), want_05) <= FP32_TOL
    # None rows stay unsteered: row 1 equals the unsteered model's row 1
    base = logits(make_model(arch2), ids, mask)
    assert max_diff(logits(model, ids, mask)[1], base[1]) <= FP32_TOL
    assert max_diff(logits(model, ids, mask)[0], base[0]) > STEERED_MIN
    h.remove()
    assert torch.equal(logits(model, ids, mask), base)


def test_route_with_one_strength_and_names_validation():
    model = make_model("llama")
    a, b = random_steering(model, "norms", seed=1), random_steering(model, "norms", seed=2)
    ids, mask = tiny_batch(2, 6)
    with lf.steered(model, {"a": a, "b": b}, mode="hooks") as h:
        h.route(["b", "a"], strength=0.6)
        got = logits(model, ids, mask)
        for bad in (["a", "nope"], "a", [], ["a", 3]):
            with pytest.raises(lf.SteeringError):
                h.route(bad)
        with pytest.raises(lf.SteeringError, match="nope"):
            h.route(["a", "nope"])
        with pytest.raises(lf.SteeringError):
            h.route(["a", "b"], strength=[1.0, 0.5, 0.2])
        assert torch.equal(logits(model, ids, mask), got)  # failed calls changed nothing
    want = rows_alone(model, [b, a], [0.6, 0.6], ids, mask)
    assert max_diff(got, want) <= FP32_TOL


def test_route_refused_in_fold_mode():
    model = make_model("llama")
    st = random_steering(model, "norms")
    with lf.steered(model, st, mode="fold") as h:
        with pytest.raises(lf.SteeringError):
            h.route(["default"])
        with pytest.raises(lf.SteeringError):
            h.set_strength(torch.tensor([1.0, 0.5]))
    with pytest.raises(lf.SteeringError):
        lf.steer_(model, {"a": st, "b": st}, mode="fold")
    with pytest.raises(lf.SteeringError):
        lf.steer_(model, st, strength=torch.tensor([1.0, 0.5]), mode="fold")
    assert getattr(model, ATTR, None) is None


@pytest.mark.parametrize("arch2", ["gpt2", "llama", "phi3"])
def test_set_strength_tensor_per_row(arch2):
    model = make_model(arch2)
    ids, mask = tiny_batch(3, 7, seed=2)
    st = random_steering(model, "norms", seed=4)
    want = rows_alone(model, [st, st, st], [1.0, 0.0, 0.4], ids, mask)
    with lf.steered(model, st, mode="hooks") as h:
        h.set_strength(torch.tensor([1.0, 0.0, 0.4]))
        assert max_diff(logits(model, ids, mask), want) <= FP32_TOL
        torch.testing.assert_close(h.strength, torch.tensor([1.0, 0.0, 0.4]))
    with lf.steered(model, st, strength=torch.tensor([1.0, 0.0, 0.4]), mode="hooks"):
        assert max_diff(logits(model, ids, mask), want) <= FP32_TOL


def test_wrong_batch_strength_raises_at_forward():
    model = make_model("llama")
    st = random_steering(model, "norms")
    ids, mask = tiny_batch(3, 7)
    with lf.steered(model, st, mode="hooks") as h:
        h.set_strength(torch.tensor([1.0, 0.5]))
        with pytest.raises(lf.SteeringError, match="rows"):
            logits(model, ids, mask)
        h.set_strength(torch.tensor([1.0, 0.5, 0.0]))
        want = logits(model, ids, mask)  # the handle still works after the error
    assert max_diff(want, rows_alone(model, [st] * 3, [1.0, 0.5, 0.0], ids, mask)) <= FP32_TOL


def test_single_steering_strength_batch_can_change():
    """With one steering there is no routing: a new strength (float or any batch size) replaces the old."""
    model = make_model("llama")
    st = random_steering(model, "norms")
    ids, mask = tiny_batch(3, 7)
    with lf.steered(model, st, strength=0.8, mode="hooks"):
        want = logits(model, ids, mask)
    with lf.steered(model, st, mode="hooks") as h:
        h.set_strength(torch.tensor([1.0, 0.5]))
        h.set_strength(0.8)  # back to one strength for every row, any batch size
        assert max_diff(logits(model, ids, mask), want) <= FP32_TOL
        h.set_strength(torch.tensor([1.0, 0.5]))
        h.set_strength(torch.tensor([0.8, 0.8, 0.8]))
        assert max_diff(logits(model, ids, mask), want) <= FP32_TOL


def test_bad_strength_values():
    model = make_model("llama")
    st = random_steering(model, "norms")
    with lf.steered(model, st, mode="hooks") as h:
        for bad in (float("nan"), [], torch.tensor([1.0, float("inf")])):
            with pytest.raises(lf.SteeringError):
                h.set_strength(bad)
    with pytest.raises(lf.SteeringError):
        lf.steer_(model, st, strength=float("nan"), mode="hooks")
    assert getattr(model, ATTR, None) is None and no_hooks_left(model) == []


def test_expanded_rows_inherit_routing():
    """A batch of R·k rows (beams / return sequences) uses row i // k's routing."""
    model = make_model("llama")
    a, b = random_steering(model, "norms", seed=1), random_steering(model, "norms", seed=2)
    ids, mask = tiny_batch(2, 6, seed=3)
    want = rows_alone(model, [a, b], [1.0, 0.7], ids, mask).repeat_interleave(2, 0)
    with lf.steered(model, {"a": a, "b": b}, mode="hooks") as h:
        h.route(["a", "b"], strength=[1.0, 0.7])
        got = logits(model, ids.repeat_interleave(2, 0), mask.repeat_interleave(2, 0))
    assert max_diff(got, want) <= FP32_TOL


@pytest.mark.parametrize("arch2", ["llama", "gpt2"])
def test_generate_num_return_sequences_inherits_routing(arch2):
    model = make_model(arch2)
    a, b = random_steering(model, "norms", seed=1, spread=0.5), random_steering(model, "norms", seed=2, spread=0.5)
    ids = torch.tensor([[5, 17, 33, 9, 70], [40, 8, 99, 12, 6]])
    kw = dict(max_new_tokens=6, num_beams=2, num_return_sequences=2, do_sample=False, pad_token_id=0,
              eos_token_id=None, output_scores=True, return_dict_in_generate=True)

    def gen(m, x):
        with torch.no_grad():
            return m.generate(input_ids=x, attention_mask=torch.ones_like(x), **kw)

    singles = []
    for i, st, s in ((0, a, 1.0), (1, b, 0.7)):
        with lf.steered(model, st, strength=s, mode="hooks"):
            singles.append(gen(model, ids[i:i + 1]))
    plain = gen(model, ids)
    with lf.steered(model, {"a": a, "b": b}, mode="hooks") as h:
        h.route(["a", "b"], strength=[1.0, 0.7])
        routed = gen(model, ids)
    assert routed.sequences.shape[0] == 4
    assert torch.equal(routed.sequences, torch.cat([o.sequences for o in singles]))
    torch.testing.assert_close(routed.sequences_scores, torch.cat([o.sequences_scores for o in singles]),
                               atol=1e-4, rtol=0)
    assert not torch.allclose(routed.sequences_scores, plain.sequences_scores, atol=1e-4)


def test_route_steerings_with_different_sites():
    """Each named steering touches only its own sites; elsewhere its rows pass through unchanged."""
    model = make_model("llama")
    a = random_steering(model, "norms", seed=1)
    b = random_steering(model, "mlp_hidden", seed=2)
    ids, mask = tiny_batch(3, 7, seed=5)
    want = rows_alone(model, [b, a, None], [0.9, 1.0, 0.0], ids, mask)
    with lf.steered(model, {"a": a, "b": b}, mode="hooks") as h:
        assert sorted(h.sites) == sorted(a.sites + b.sites)
        h.route(["b", "a", None], strength=[0.9, 1.0, 0.3])
        assert max_diff(logits(model, ids, mask), want) <= FP32_TOL


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_hooks_keep_low_precision_dtype(dtype):
    model = make_model("llama")
    st = random_steering(model, "norms", seed=1)
    with lf.steered(model, st, mode="hooks"):
        ref = logits(model)
    base = logits(model)
    model.to(dtype)
    seen = []
    hk = model.model.layers[0].input_layernorm.register_forward_hook(lambda m, a, o: seen.append(o.dtype))
    ids, mask = tiny_batch()
    with lf.steered(model, st, mode="hooks"):
        with torch.no_grad():
            out = model(input_ids=ids, attention_mask=mask).logits
    hk.remove()
    assert out.dtype == dtype and seen == [dtype]
    # low-precision steered logits are near the fp32 steered ones, much nearer than to the unsteered ones
    assert max_diff(out, ref) < 0.25 * max_diff(ref, base)
