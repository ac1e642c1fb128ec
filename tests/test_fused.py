"""The ``fused`` apply mode on every tiny architecture: norm modules replaced per instance by one
``lineas::norm_affine`` op; fused == hooks, exact removal, routing through in-place buffers, fallback to
hooks for sites it does not cover, and torch.compile without graph breaks or recompiles."""

import warnings

import pytest
import torch

import lineas_fast as lf
from conftest import (ARCHS, FP32_TOL, assert_state_equal, logits, make_model, max_diff, no_hooks_left,
                      random_steering, snapshot, tiny_batch)
from lineas_fast.patching.fused import FusedNorm
from lineas_fast.patching.handle import ATTR

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(params=ARCHS)
def arch(request):
    return request.param


def fused_modules(model):
    return [n for n, m in model.named_modules() if isinstance(m, FusedNorm)]


def test_fused_equals_hooks_and_removes_exactly(arch):
    model = make_model(arch)
    st = random_steering(model, "norms")
    snap, base = snapshot(model), logits(model)
    modules = {n: m for n, m in model.named_modules()}
    with lf.steered(model, st, strength=0.8, mode="hooks"):
        hooked = logits(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every norm site is covered: no fallback warning
        h = lf.steer_(model, st, strength=0.8)  # default mode: fused where it covers every site
    assert h.mode == "fused"
    assert sorted(fused_modules(model)) == sorted(st.sites) and no_hooks_left(model) == []
    assert list(model.state_dict()) == list(snap)  # same keys while steered (tables are non-persistent)
    fused = logits(model)
    assert max_diff(fused, hooked) <= FP32_TOL * max(1.0, float(hooked.abs().max()))
    assert max_diff(fused, base) > 1e-3
    h.set_strength(0.0)
    assert max_diff(logits(model), base) <= FP32_TOL
    h.remove()
    assert fused_modules(model) == [] and all(m is modules[n] for n, m in model.named_modules())
    assert torch.equal(logits(model), base)
    assert_state_equal(model, snap)


def test_per_row_strength_and_routing_match_hooks():
    model = make_model("llama")
    a, b = random_steering(model, "norms", seed=1), random_steering(model, "norms", seed=2)
    ids, mask = tiny_batch(batch=4)

    def run(mode):
        h = lf.steer_(model, {"a": a, "b": b}, mode=mode)
        h.route(["a", None, "b", "a"], strength=[1.0, 1.0, 0.5, -0.3])
        first = logits(model, ids, mask)
        h.set_strength(0.7)  # keeps the names, rescales every row
        second = logits(model, ids, mask)
        h.route(["b"], strength=0.9)  # one entry broadcasts to every row
        third = logits(model, ids, mask)
        h.remove()
        return first, second, third

    for f, k in zip(run("fused"), run("hooks")):
        assert max_diff(f, k) <= FP32_TOL * max(1.0, float(k.abs().max()))


def test_routing_buffers_are_updated_in_place():
    model = make_model("llama")
    st = random_steering(model, "norms")
    h = lf.steer_(model, {"x": st, "y": st}, mode="fused")
    fused = model.get_submodule(st.sites[0])
    r = fused.routing
    ptrs = (r.ids.data_ptr(), r.strength.data_ptr(), r.nrows.data_ptr(), fused.table_scale.data_ptr())
    h.route(["x", None, "y"], strength=[0.1, 0.2, 0.3])
    h.set_strength(0.5)
    h.route(["y"] * 8)
    assert (r.ids.data_ptr(), r.strength.data_ptr(), r.nrows.data_ptr(), fused.table_scale.data_ptr()) == ptrs
    assert r.nrows.item() == 8 and r.ids[:8].tolist() == [1] * 8
    h.remove()


def test_generate_expansion_inherits_routing():
    model = make_model("llama")
    a = random_steering(model, "norms", seed=1, spread=1.0)
    ids, mask = tiny_batch(batch=2)
    outs = {}
    for mode in ("hooks", "fused"):
        h = lf.steer_(model, {"a": a}, mode=mode)
        h.route(["a", None])
        outs[mode] = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False,
                                    num_beams=2, num_return_sequences=2, pad_token_id=0)
        h.remove()
    assert torch.equal(outs["fused"], outs["hooks"])


def test_batch_not_a_multiple_of_the_routing_rows_is_refused():
    model = make_model("llama")
    st = random_steering(model, "norms")
    with lf.steered(model, {"a": st}, mode="fused") as h:
        h.route(["a", None])
        ids, mask = tiny_batch(batch=3)
        with pytest.raises(lf.SteeringError, match="batch of 3"):
            logits(model, ids, mask)


def test_uncovered_sites_fall_back_to_hooks_with_a_warning():
    model = make_model("llama")
    acts = ["model.layers.0.mlp.act_fn", "model.layers.1.mlp.act_fn"]  # neither a norm nor a Linear
    st = random_steering(model, lf.resolve_sites(model, "norms") + acts)
    with lf.steered(model, st, mode="hooks"):
        hooked = logits(model)
    assert lf.patching.fused_available(model, {"x": st}) is not None
    assert lf.steer_(model, st).mode == "hooks"  # default: fused only where it covers every site
    getattr(model, ATTR).remove()
    with pytest.warns(UserWarning, match="covers 4 of 6 sites.*model.layers.0.mlp.act_fn"):
        h = lf.steer_(model, st, mode="fused")
    assert len(fused_modules(model)) == 4 and sorted(no_hooks_left(model)) == acts
    assert max_diff(logits(model), hooked) <= FP32_TOL * 10
    h.remove()
    assert no_hooks_left(model) == [] and fused_modules(model) == []


def test_clamped_sites_stay_on_hooks():
    from conftest import SOURCE, TARGET, make_tokenizer

    model = make_model("llama")
    st = lf.fit(model, make_tokenizer(), SOURCE, TARGET, method="linear_act", support="q_0_100", progress=False)
    with lf.steered(model, st, mode="hooks"):
        hooked = logits(model)
    with pytest.warns(UserWarning, match="support-clamped"):
        h = lf.steer_(model, st, mode="fused")
    assert fused_modules(model) == []
    assert torch.equal(logits(model), hooked)
    h.remove()


def test_other_instance_and_class_unaffected(arch):
    model, other = make_model(arch), make_model(arch)
    base = logits(other)
    st = random_steering(model, "norms")
    norm_cls = type(model.get_submodule(st.sites[0]))
    forward = norm_cls.forward
    with lf.steered(model, st, mode="fused"):
        assert torch.equal(logits(other), base) and fused_modules(other) == []
        assert norm_cls.forward is forward


# ---------------------------------------------------------------- torch.compile
@pytest.fixture
def no_recompiles():
    import torch._dynamo as dynamo

    dynamo.reset()
    old = dynamo.config.error_on_recompile
    dynamo.config.error_on_recompile = True
    yield
    dynamo.config.error_on_recompile = old
    dynamo.reset()


@pytest.mark.parametrize("backend", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_compiled_fullgraph_no_recompiles_on_strength_or_routing(no_recompiles, backend):
    model = make_model("llama")
    a, b = random_steering(model, "norms", seed=1), random_steering(model, "norms", seed=2)
    ids, mask = tiny_batch(batch=4)
    with lf.steered(model, {"a": a, "b": b}, mode="hooks") as h:
        want = []
        for names, s in ((["a"] * 4, 1.0), (["a", None, "b", "a"], [1.0, 1.0, 0.5, 2.0]), (["b", None], 0.3)):
            h.route(names, s)
            want.append(logits(model, ids, mask))
    h = lf.steer_(model, {"a": a, "b": b}, mode="fused")
    h.route(["a"] * 4)
    compiled = torch.compile(model, fullgraph=True, backend=backend)
    got = []
    with torch.no_grad():
        for names, s in ((["a"] * 4, 1.0), (["a", None, "b", "a"], [1.0, 1.0, 0.5, 2.0]), (["b", None], 0.3)):
            h.route(names, s)  # in-place buffer updates only: error_on_recompile would raise otherwise
            got.append(compiled(input_ids=ids, attention_mask=mask).logits.float())
    h.remove()
    for g, w in zip(got, want):
        assert max_diff(g, w) <= 1e-4 * max(1.0, float(w.abs().max()))


# ---------------------------------------------------------------- explicit backends
@pytest.mark.parametrize("backend", ["torch", "cpp", "triton"])
def test_explicit_backends_match_hooks(backend):
    if backend == "cpp" and not lf.env_report()["cpp"]["usable"]:
        pytest.skip("C++ extension not built")
    if backend == "triton":
        pytest.importorskip("triton")
    model = make_model("gemma2")
    st = random_steering(model, "norms")
    ids, mask = tiny_batch(batch=2, length=5)
    with lf.steered(model, {"a": st}, mode="hooks") as h:
        h.route(["a", None], strength=[0.7, 1.0])
        want = logits(model, ids, mask)
    with lf.steered(model, {"a": st}, mode="fused", backend=backend) as h:
        h.route(["a", None], strength=[0.7, 1.0])
        got = logits(model, ids, mask)
    assert max_diff(got, want) <= FP32_TOL * max(1.0, float(want.abs().max()))


def test_unusable_backend_refused_untouched():
    model = make_model("llama")
    st = random_steering(model, "norms")
    snap = snapshot(model)
    with pytest.raises(lf.SteeringError, match="backend='cuda' is unusable here: no CUDA device"):
        lf.steer_(model, st, mode="fused", backend="cuda")
    with pytest.raises(lf.SteeringError, match="mode='fused' only"):
        lf.steer_(model, st, mode="hooks", backend="torch")
    with pytest.raises(lf.SteeringError, match="expected None or one of"):
        lf.steer_(model, st, mode="fused", backend="mps")
    assert fused_modules(model) == [] and getattr(model, ATTR, None) is None
    assert_state_equal(model, snap)


# ---------------------------------------------------------------- Linear sites (steered_linear)
@pytest.mark.parametrize("preset", ["mlp_hidden", "mlp_out", "attn_out"])
def test_linear_sites_fused_equal_hooks(arch, preset):
    model = make_model(arch)
    st = random_steering(model, preset)
    snap, base = snapshot(model), logits(model)
    with lf.steered(model, st, strength=0.8, mode="hooks"):
        hooked = logits(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        h = lf.steer_(model, st, strength=0.8, mode="fused")
    assert no_hooks_left(model) == []
    got = logits(model)
    h.remove()
    assert max_diff(got, hooked) <= FP32_TOL * max(1.0, float(hooked.abs().max()))
    assert max_diff(got, base) > 1e-3
    assert torch.equal(logits(model), base)
    assert_state_equal(model, snap)


def test_two_sites_on_one_linear_prologue_fused_other_hooked():
    model = make_model("llama")
    st = random_steering(model, lf.resolve_sites(model, "mlp_hidden") + lf.resolve_sites(model, "mlp_out"))
    with lf.steered(model, st, mode="hooks"):
        hooked = logits(model)
    with pytest.warns(UserWarning, match="already carries"):
        h = lf.steer_(model, st, mode="fused")
    got = logits(model)
    h.remove()
    assert max_diff(got, hooked) <= FP32_TOL * max(1.0, float(hooked.abs().max()))
