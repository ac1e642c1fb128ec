"""LinEAS with ``compile=``: same losses and maps as eager training, static shapes (no recompiles after the
first step, random mini-batches included), no graph breaks, and the model left exactly as found.

Graph-structure tests use ``backend="aot_eager"`` (dynamo + AOT autograd, no code generation: fast);
the ``slow`` ones go through inductor (C++ code generation on CPU)."""

import pytest
import torch
from torch._dynamo.utils import counters

import lineas_fast as lf
from conftest import ARCHS, SOURCE, TARGET, assert_state_equal, fit_leaves_llama_as_found, make_model, no_hooks_left, snapshot
from lineas_fast.methods.lineas_compile import CompiledForward, pack_rows
from lineas_fast.patching.fused import FusedNorm

pytestmark = pytest.mark.usefixtures("one_thread", "fresh_dynamo")

FAST = dict(steps=4, lr=1e-2, l1=0.5, normalize=None, pooling="tokens", sites="norms", preserve=0.0, batch_size=32,
            progress=False)
# prompts of very different lengths (1 to 45 tokens), so random mini-batches differ in shape
RAGGED = ["a", "no", "you are bad", "i hate this so much, really", "go away now you fool and never come back",
          "what a stupid idea", "this is awful and dumb and so is everything you ever wrote down", "ok then"]


@pytest.fixture
def fresh_dynamo():
    """Each test starts from empty dynamo caches and counters (the recompile limit is per code object)."""
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def fit(model, tok, source=SOURCE, **kw):
    return lf.fit(model, tok, source, TARGET, method="lineas", **{**FAST, **kw})


def assert_losses_close(a, b, rel):
    la, lb = a.meta["train"]["loss"], b.meta["train"]["loss"]
    assert len(la) == len(lb)
    assert all(abs(x - y) <= rel * max(1.0, abs(x)) for x, y in zip(la, lb)), (la, lb)


def assert_maps_close(a, b, tol=1e-4):
    assert a.sites == b.sites
    for s in a.sites:
        torch.testing.assert_close(b.scale[s], a.scale[s], atol=tol, rtol=tol)
        torch.testing.assert_close(b.shift[s], a.shift[s], atol=tol, rtol=tol)


def graphs_per_call(monkeypatch) -> list:
    """Record dynamo's compiled-graph count after every training forward of the next fits."""
    seen = []
    call = CompiledForward.__call__

    def counted(self, prompts):
        out = call(self, prompts)
        seen.append(counters["stats"]["unique_graphs"])
        return out

    monkeypatch.setattr(CompiledForward, "__call__", counted)
    return seen


# ---------------------------------------------------------------- same training as eager
@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("arch", ARCHS)
def test_compiled_losses_and_maps_match_eager(arch, fused, tok):
    """Ragged prompts: several share a packed row (Gemma's sliding window included)."""
    model = make_model(arch)
    eager = fit(model, tok, RAGGED, fused=fused)
    compiled = fit(model, tok, RAGGED, fused=fused, compile="aot_eager")
    assert_losses_close(eager, compiled, 1e-4)
    assert_maps_close(eager, compiled)
    assert compiled.meta["hyperparams"]["compile"] == "aot_eager" and eager.meta["hyperparams"]["compile"] is False
    assert len(compiled.meta["train"]["step_seconds"]) == FAST["steps"]
    assert dict(counters["graph_break"]) == {}


@pytest.mark.parametrize("kw", [dict(pooling="mean"), dict(pooling="last"), dict(sites="mlp_hidden", lr=1e-3),
                                dict(sites=["model.layers.1.self_attn:0"]), dict(normalize="var"),
                                dict(group_l2=0.05, optimizer="sgd", lr=0.05)],
                         ids=["mean", "last", "input-sites", "tuple-site", "var", "group-sgd"])
def test_compiled_options_match_eager(kw, tok):
    model = make_model("llama")
    eager = fit(model, tok, **kw)
    compiled = fit(model, tok, compile="aot_eager", **kw)
    assert_losses_close(eager, compiled, 1e-4)
    assert_maps_close(eager, compiled)


def test_random_minibatches_match_eager_without_recompiles(tok, monkeypatch):
    """batch_size < n: each step packs a different random subset of ragged prompts into the same [R, L]
    shape; the losses follow eager's (same seed → same subsets) and nothing compiles after step 1."""
    model = make_model("llama")
    eager = fit(model, tok, RAGGED, batch_size=3, steps=8)
    per_call = graphs_per_call(monkeypatch)
    compiled = fit(model, tok, RAGGED, batch_size=3, steps=8, compile="aot_eager")
    assert_losses_close(eager, compiled, 1e-4)
    assert len(per_call) >= 8 and per_call[0] > 0
    assert per_call == [per_call[0]] * len(per_call), per_call
    assert dict(counters["graph_break"]) == {}


def test_no_recompiles_after_first_step_and_across_fits(tok, monkeypatch):
    model = make_model("llama")
    per_call = graphs_per_call(monkeypatch)
    fit(model, tok, RAGGED, steps=5, compile="aot_eager")
    first = per_call[0]
    assert first <= 3, first  # blocks share graphs: the first block (input without grad) and the others
    assert per_call == [first] * 5
    fit(model, tok, RAGGED, steps=3, compile="aot_eager", l1=0.0, lr=3e-3)  # same shapes: nothing new
    assert per_call[-1] == first
    assert counters["stats"]["unique_graphs"] == first


def test_mini_batch_needing_more_rows_takes_more_forwards_of_the_same_shape(tok, monkeypatch):
    """A step whose prompts pack into more rows than planned runs more forwards of the planned [R, L]."""
    model = make_model("llama")
    shapes = []
    enter, layout = CompiledForward.__enter__, CompiledForward.layout

    def one_row(self):
        out = enter(self)
        self.rows = 1  # plan a single row per forward: every step overflows into several
        return out

    def spy(self, prompts):
        out = layout(self, prompts)
        shapes.append([tuple(ids.shape) for ids, _ in out.chunks])
        return out

    monkeypatch.setattr(CompiledForward, "__enter__", one_row)
    monkeypatch.setattr(CompiledForward, "layout", spy)
    per_call = graphs_per_call(monkeypatch)
    eager = fit(model, tok, RAGGED, batch_size=3, steps=6)
    compiled = fit(model, tok, RAGGED, batch_size=3, steps=6, compile="aot_eager")
    assert_losses_close(eager, compiled, 1e-4)
    assert len({s for step in shapes for s in step}) == 1  # one shape: [1, L]
    assert any(len(step) >= 2 for step in shapes)
    assert per_call == [per_call[0]] * len(per_call)


def test_packed_rows_isolate_prompts_and_the_probe_notices_when_not(tok, monkeypatch):
    import transformers.masking_utils as mu

    model = make_model("llama")
    packed = []
    enter = CompiledForward.__enter__

    def spy(self):
        out = enter(self)
        packed.append(self.packed)
        return out

    monkeypatch.setattr(CompiledForward, "__enter__", spy)
    eager = fit(model, tok, RAGGED)
    ok = fit(model, tok, RAGGED, compile="aot_eager")
    # without transformers' packed-sequence masks, packed prompts would attend to each other: the probe
    # must see it and fall back to one prompt per row (still the same training)
    monkeypatch.setattr(mu, "find_packed_sequence_indices", lambda position_ids: None)
    torch._dynamo.reset()
    fallback = fit(model, tok, RAGGED, compile="aot_eager")
    assert packed == [True, False]
    assert_losses_close(eager, ok, 1e-4)
    assert_losses_close(eager, fallback, 1e-4)


def test_pack_rows_first_fit_decreasing():
    lengths = [5, 1, 8, 3, 4, 8, 2, 7]
    rows = pack_rows(lengths, 8)
    assert sorted(i for r in rows for i in r) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in r) <= 8 for r in rows)
    assert len(rows) == 5  # 38 tokens: 8 | 8 | 7+1 | 5+3 | 4+2
    assert pack_rows([3], 8) == [[0]]


# ---------------------------------------------------------------- the model is left exactly as found
def test_compiled_fit_leaves_model_unchanged(tok):
    model = make_model("llama")
    modules = dict(model.named_modules())
    with fit_leaves_llama_as_found(model):
        fit(model, tok, steps=3, compile="aot_eager", fused=True)
        fit(model, tok, steps=2, compile="aot_eager", fused=False, sites="mlp_hidden")
    assert dict(model.named_modules()) == modules  # same module objects (fused norms put back)
    assert not any(isinstance(m, FusedNorm) for m in model.modules())
    for name, m in model.named_modules():
        assert "forward" not in m.__dict__, name  # compiled forwards removed
        assert not [k for k in m.__dict__ if k.startswith("_lineas")], name


def test_compiled_fit_restores_an_instance_forward(tok):
    """A block whose forward was already overridden on the instance gets that same object back."""
    model = make_model("llama")
    block = model.model.layers[0]
    own = block.forward
    block.forward = own
    fit(model, tok, steps=2, compile="aot_eager")
    assert block.__dict__["forward"] is own


def test_nan_during_compiled_fit_is_refused_cleanly(tok):
    from conftest import VOCAB

    model = make_model("llama")
    with torch.no_grad():
        model.model.embed_tokens.weight[VOCAB["z"]] = float("nan")
    flags = [p.requires_grad for p in model.parameters()]
    with pytest.raises(lf.SteeringError, match="NaN"):
        fit(model, tok, SOURCE + ["zzz top"], compile="aot_eager")
    assert no_hooks_left(model) == []
    assert [p.requires_grad for p in model.parameters()] == flags
    assert not any("forward" in m.__dict__ for m in model.modules())


@pytest.mark.parametrize("bad", ["no_such_backend", 3])
def test_bad_compile_argument_refused_before_anything(bad, tok):
    model = make_model("llama")
    snap = snapshot(model)
    with pytest.raises(lf.SteeringError, match="compile="):
        fit(model, tok, compile=bad)
    assert_state_equal(model, snap)
    assert no_hooks_left(model) == []


def test_cli_fit_compile_flag(tmp_path, capsys, monkeypatch):
    from conftest import make_tokenizer, tiny_model

    import lineas_fast.methods.lineas as lineas
    from lineas_fast.cli import main

    folder = tmp_path / "tiny"
    tiny_model("llama").save_pretrained(folder)
    make_tokenizer("right").save_pretrained(folder)
    src, tgt = tmp_path / "src.txt", tmp_path / "tgt.txt"
    src.write_text("\n".join(SOURCE) + "\n")
    tgt.write_text("\n".join(TARGET) + "\n")
    real = lineas.compile_backend
    monkeypatch.setattr(lineas, "compile_backend", lambda c: "aot_eager" if c is True else real(c))  # no codegen
    common = ["fit", "--model", str(folder), "--source", str(src), "--target", str(tgt)]
    assert main([*common, "--steps", "2", "--compile", "--out", str(tmp_path / "a.safetensors")]) == 0
    assert lf.Steering.load(tmp_path / "a.safetensors").meta["hyperparams"]["compile"] == "aot_eager"
    capsys.readouterr()
    assert main([*common, "--method", "mean_act", "--compile", "--out", str(tmp_path / "b.safetensors")]) == 2
    err = capsys.readouterr().err
    assert "--compile" in err and "mean_act" in err and "Traceback" not in err


# ---------------------------------------------------------------- inductor
@pytest.mark.slow
def test_inductor_losses_match_eager_and_bf16_stays_within_one_percent(tok, monkeypatch):
    model = make_model("llama")
    eager = fit(model, tok)
    per_call = graphs_per_call(monkeypatch)
    compiled = fit(model, tok, compile=True)
    assert compiled.meta["hyperparams"]["compile"] == "inductor"
    assert_losses_close(eager, compiled, 1e-4)
    assert_maps_close(eager, compiled)
    assert per_call == [per_call[0]] * len(per_call)
    low = fit(model, tok, compile=True, autocast=True)
    assert_losses_close(eager, low, 1e-2)
    assert low.meta["train"]["loss"] != eager.meta["train"]["loss"]  # autocast really ran in bf16
    assert dict(counters["graph_break"]) == {}
