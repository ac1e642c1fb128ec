"""The Steering artifact: construction checks, nnz, save/load round trip, corrupt files, model checks."""

import json
import pickle

import pytest
import torch
from safetensors.torch import save_file

import lineas_fast as lf
from conftest import (SOURCE, TARGET, assert_state_equal, logits, make_model, no_hooks_left, random_steering,
                      snapshot)
from lineas_fast.patching.handle import ATTR
from lineas_fast.steering import FORMAT_VERSION, REQUIRED_META

pytestmark = pytest.mark.usefixtures("one_thread")


def untouched(model, snap, base):
    assert getattr(model, ATTR, None) is None
    assert no_hooks_left(model) == []
    assert_state_equal(model, snap)
    assert torch.equal(logits(model), base)


# ---------------------------------------------------------------- construction and nnz
def test_nnz_counts_entries_off_identity():
    st = lf.Steering({"a": torch.tensor([1.0, 2.0, 1.0, 1.0, 0.5]), "b": torch.ones(3)},
                     {"a": torch.tensor([0.0, 0.0, 3.0, 0.0, 0.0]), "b": torch.tensor([0.0, -1e-8, 0.0])})
    assert st.nnz("a") == 3
    assert st.nnz("b") == 1
    assert st.nnz() == 4
    assert st.active_sites() == ["a", "b"]
    both = lf.Steering({"c": torch.full((4,), 2.0)}, {"c": torch.full((4,), 1.0)})
    assert both.nnz() == 8  # ω and b both off identity: 2d
    ident = lf.Steering({"c": torch.ones(4)}, {"c": torch.zeros(4)})
    assert ident.nnz() == 0 and ident.active_sites() == []


def test_tensors_are_float32_cpu_and_meta_complete():
    st = lf.Steering({"s": torch.ones(3, dtype=torch.float64) * 2}, {"s": [0.0, 1.0, 2.0]})
    assert st.scale["s"].dtype == torch.float32 and st.shift["s"].dtype == torch.float32
    assert st.scale["s"].device.type == "cpu"
    for k in REQUIRED_META:
        assert k in st.meta
    assert st.meta["widths"] == {"s": 3}
    assert st.meta["format_version"] == FORMAT_VERSION
    assert st.meta["library_version"] == lf.__version__


@pytest.mark.parametrize("scale,shift,needle", [
    ({"a": torch.ones(3)}, {"b": torch.zeros(3)}, "'a'"),
    ({}, {}, "at least one"),
    ({"a": torch.ones(3)}, {"a": torch.zeros(4)}, "'a'"),
    ({"a": torch.ones(2, 3)}, {"a": torch.zeros(2, 3)}, "'a'"),
    ({"a": torch.tensor([1.0, float("nan")])}, {"a": torch.zeros(2)}, "NaN"),
    ({"a": torch.ones(2)}, {"a": torch.tensor([0.0, float("inf")])}, "'a'"),
])
def test_constructor_rejects_bad_maps(scale, shift, needle):
    with pytest.raises(lf.SteeringError) as e:
        lf.Steering(scale, shift)
    assert needle in str(e.value)


# ---------------------------------------------------------------- save / load
def test_save_load_exact(tmp_path):
    model = make_model("llama")
    sites = lf.resolve_sites(model, "norms") + ["model.layers.0.self_attn:0", "model.layers.1.mlp.down_proj:in"]
    st = random_steering(model, sites, seed=5)
    # a non-sorted site order (with ':k' and ':in' names), and metadata with nested values
    order = [sites[2], sites[5], sites[0], sites[3], sites[4], sites[1]]
    st = lf.Steering({s: st.scale[s] for s in order}, {s: st.shift[s] for s in order},
                     {**st.meta, "hyperparams": {"lr": 0.003, "sites": "norms", "nested": {"x": [1, 2]}}})
    path = tmp_path / "st.safetensors"
    st.save(path)
    back = lf.Steering.load(path)
    assert back.sites == order
    assert back.meta == st.meta
    for s in order:
        assert torch.equal(back.scale[s], st.scale[s]) and torch.equal(back.shift[s], st.shift[s])
        assert back.scale[s].dtype == torch.float32
    assert back.nnz() == st.nnz()
    # the loaded artifact steers exactly like the original
    with lf.steered(model, st, mode="hooks"):
        a = logits(model)
    with lf.steered(model, back, mode="hooks"):
        b = logits(model)
    assert torch.equal(a, b)


def test_fitted_meta_round_trips(tmp_path, tok):
    model = make_model("gpt2")
    st = lf.fit(model, tok, SOURCE[:4], TARGET[:4], method="mean_act", sites="mlp_out")
    for k in REQUIRED_META:
        assert k in st.meta
    assert st.meta["model_type"] == "gpt2" and st.meta["model_class"] == "GPT2LMHeadModel"
    st.save(tmp_path / "m.safetensors")
    back = lf.Steering.load(str(tmp_path / "m.safetensors"))
    assert back.meta == json.loads(json.dumps(st.meta))
    assert back.sites == st.sites


def test_file_is_plain_safetensors_with_json_header(tmp_path):
    from safetensors import safe_open

    st = lf.Steering({"x": torch.tensor([1.0, 2.0])}, {"x": torch.tensor([0.5, 0.0])}, {"method": "m"})
    st.save(tmp_path / "f.safetensors")
    with safe_open(str(tmp_path / "f.safetensors"), framework="pt") as f:
        header = f.metadata()
        assert sorted(f.keys()) == ["scale/x", "shift/x"]
    assert json.loads(header["lineas_fast"])["method"] == "m"
    assert json.loads(header["sites"]) == ["x"]


@pytest.fixture
def saved(tmp_path):
    st = lf.Steering({"a": torch.randn(8), "b": torch.randn(4)}, {"a": torch.randn(8), "b": torch.randn(4)})
    path = tmp_path / "ok.safetensors"
    st.save(path)
    return path


@pytest.mark.parametrize("cut", [0, 7, 40, -5])
def test_truncated_file(saved, tmp_path, cut):
    data = saved.read_bytes()
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(data[:cut] if cut >= 0 else data[:len(data) + cut])
    with pytest.raises(lf.SteeringError) as e:
        lf.Steering.load(bad)
    assert "bad.safetensors" in str(e.value)


def test_garbled_header(saved, tmp_path):
    data = bytearray(saved.read_bytes())
    data[8:20] = b"\xff" * 12
    bad = tmp_path / "garbled.safetensors"
    bad.write_bytes(bytes(data))
    with pytest.raises(lf.SteeringError):
        lf.Steering.load(bad)


class _Boom:
    def __reduce__(self):  # would run on unpickling
        import os
        return (os.mkdir, ("UNPICKLED_MARKER_DIR",))


def test_pickle_file_is_refused_and_never_unpickled(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "st.pt"
    with open(path, "wb") as f:
        pickle.dump({"scale": _Boom()}, f)
    with pytest.raises(lf.SteeringError):
        lf.Steering.load(path)
    assert not (tmp_path / "UNPICKLED_MARKER_DIR").exists()
    text = tmp_path / "notes.txt"
    text.write_text("just some text, not a tensor file\n")
    with pytest.raises(lf.SteeringError):
        lf.Steering.load(text)


def test_missing_file(tmp_path):
    with pytest.raises(lf.SteeringError, match="nope.safetensors"):
        lf.Steering.load(tmp_path / "nope.safetensors")


def _meta(**over):
    st = lf.Steering({"a": torch.ones(2)}, {"a": torch.zeros(2)})
    return {"lineas_fast": json.dumps({**st.meta, **over}), "sites": json.dumps(["a"])}


@pytest.mark.parametrize("tensors,metadata,needle", [
    ({"scale/a": torch.ones(2), "shift/a": torch.zeros(2)}, None, "metadata"),            # foreign safetensors
    ({"scale/a": torch.ones(2), "shift/a": torch.zeros(2)}, {"lineas_fast": "{not json", "sites": "[\"a\"]"}, "JSON"),
    ({"scale/a": torch.ones(2)}, "ok", "missing"),                                           # shift tensor missing
    ({"scale/a": torch.ones(2), "shift/a": torch.zeros(2)}, "newer", "newer"),
    ({"scale/a": torch.ones(3), "shift/a": torch.zeros(3)}, "ok", "widths"),                 # header says d=2
    ({"scale/a": torch.ones(2), "shift/a": torch.zeros(2)}, "lacks", "lacks"),
])
def test_foreign_or_inconsistent_safetensors(tmp_path, tensors, metadata, needle):
    if metadata == "ok":
        metadata = _meta()
    elif metadata == "newer":
        metadata = _meta(format_version=FORMAT_VERSION + 1)
    elif metadata == "lacks":
        m = json.loads(_meta()["lineas_fast"])
        del m["model_type"]
        metadata = {"lineas_fast": json.dumps(m), "sites": json.dumps(["a"])}
    path = tmp_path / "x.safetensors"
    save_file(tensors, str(path), metadata=metadata)
    with pytest.raises(lf.SteeringError, match=needle):
        lf.Steering.load(path)


# ---------------------------------------------------------------- checks against a model, before patching
@pytest.mark.parametrize("mode", ["hooks", "fold"])
def test_other_model_type_refused_before_patching(mode):
    llama, mistral = make_model("llama"), make_model("mistral")  # same module names and widths
    st = random_steering(llama, "norms")
    snap, base = snapshot(mistral), logits(mistral)
    with pytest.raises(lf.SteeringError) as e:
        lf.steer_(mistral, st, mode=mode)
    assert "llama" in str(e.value) and "mistral" in str(e.value)
    untouched(mistral, snap, base)
    with pytest.raises(lf.SteeringError, match="llama"):
        lf.bake(mistral, st)
    untouched(mistral, snap, base)
    with pytest.raises(lf.SteeringError, match="llama"):
        lf.steer_(mistral, {"ok": random_steering(mistral, "norms"), "bad": st}, mode="hooks")
    untouched(mistral, snap, base)


@pytest.mark.parametrize("mode", ["hooks", "fold"])
def test_width_mismatch_refused(mode):
    model = make_model("llama")
    site = "model.layers.1.input_layernorm"
    st = lf.Steering({site: torch.full((16,), 1.5)}, {site: torch.zeros(16)}, {"model_type": "llama"})
    snap, base = snapshot(model), logits(model)
    with pytest.raises(lf.SteeringError) as e:
        lf.steer_(model, st, mode=mode)
    assert site in str(e.value) and "16" in str(e.value) and "32" in str(e.value)
    untouched(model, snap, base)
    with pytest.raises(lf.SteeringError, match="width"):
        lf.bake(model, st)
    untouched(model, snap, base)


def test_width_mismatch_on_probed_site():
    """Widths of tuple-output sites come from a probe forward; a mismatch is still caught."""
    model = make_model("llama")
    site = "model.layers.0.self_attn:0"
    st = lf.Steering({site: torch.ones(31)}, {site: torch.zeros(31)})
    snap, base = snapshot(model), logits(model)
    with pytest.raises(lf.SteeringError, match="self_attn"):
        lf.steer_(model, st, mode="hooks")
    untouched(model, snap, base)


@pytest.mark.parametrize("mode", ["hooks", "fold"])
def test_missing_site_refused(mode):
    model = make_model("llama")
    good = random_steering(model, "norms")
    missing = "model.layers.9.input_layernorm"
    st = lf.Steering({**good.scale, missing: torch.ones(32)}, {**good.shift, missing: torch.zeros(32)},
                     {"model_type": "llama"})
    snap, base = snapshot(model), logits(model)
    with pytest.raises(lf.SteeringError, match=missing.replace(".", r"\.")):
        lf.steer_(model, st, mode=mode)
    untouched(model, snap, base)
    with pytest.raises(lf.SteeringError, match="layers.9"):
        lf.bake(model, st)
    untouched(model, snap, base)


def test_model_type_empty_is_not_checked_but_sites_are():
    """A hand-made artifact without model_type is accepted wherever its sites and widths fit."""
    model = make_model("qwen2")
    site = "model.layers.0.input_layernorm"
    st = lf.Steering({site: torch.full((32,), 1.2)}, {site: torch.zeros(32)})
    assert st.meta["model_type"] == ""
    base = logits(model)
    with lf.steered(model, st, mode="hooks"):
        assert not torch.allclose(logits(model), base, atol=1e-3)
    wrong = lf.Steering({"model.layers.0.nope": torch.ones(32)}, {"model.layers.0.nope": torch.zeros(32)})
    with pytest.raises(lf.SteeringError, match="nope"):
        lf.steer_(model, wrong)


# ---------------------------------------------------------------- compose
def test_compose_equals_applying_in_order():
    model = make_model("llama")
    norms = lf.resolve_sites(model, "norms")
    st1 = random_steering(model, norms[:3], seed=1)
    st2 = random_steering(model, norms[1:], seed=2)
    both = lf.compose(st1, st2)
    assert both.sites == norms and both.meta["method"] == "composed"
    s = norms[1]
    torch.testing.assert_close(both.scale[s], st2.scale[s] * st1.scale[s])
    torch.testing.assert_close(both.shift[s], st2.scale[s] * st1.shift[s] + st2.shift[s])
    assert torch.equal(both.scale[norms[0]], st1.scale[norms[0]])
    assert torch.equal(both.scale[norms[-1]], st2.scale[norms[-1]])
    # on the model: hooks of st1 then st2 at each site == the composed map
    with lf.steered(model, both, mode="hooks"):
        want = logits(model)
    h1 = lf.steer_(model, st1, mode="hooks")
    from lineas_fast.patching.hooks import install_hooks
    from lineas_fast.patching.tables import SteeringTables

    tables = SteeringTables({"x": st2}, st2.sites, {x: torch.device("cpu") for x in st2.sites})
    extra = install_hooks(model, st2.sites, tables)  # registered after st1's hooks: runs second
    got = logits(model)
    for e in extra:
        e.remove()
    h1.remove()
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_compose_refuses_clamped_and_foreign():
    model = make_model("llama")
    st = random_steering(model, "norms")
    clamped = lf.Steering(st.scale, st.shift, st.meta, {st.sites[0]: (st.shift[st.sites[0]] - 1, st.shift[st.sites[0]] + 1)})
    with pytest.raises(lf.SteeringError, match="support-clamped"):
        lf.compose(st, clamped)
    other = random_steering(make_model("gpt2"), "norms")
    with pytest.raises(lf.SteeringError, match="model_type"):
        lf.compose(st, other)
