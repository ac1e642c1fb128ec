"""``lf.evaluate.compare`` and ``lineas-fast eval --methods`` on a tiny model: every method fitted on the
same data, the same held-out prompts, the results folder, resuming, and bad arguments."""

import json

import pytest
import torch

import lineas_fast as lf
from conftest import SOURCE, TARGET, make_model, make_tokenizer, no_hooks_left, snapshot, assert_state_equal
from lineas_fast.cli import main
from tiny_models import tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")
FAST = {"lineas": dict(steps=3, lr=1e-2, l1=0.0, normalize=None, pooling="mean")}
PROMPTS = ["you are a", "i hate", "the river"]
PASSAGES = ["the album was released in may", "a history of the city"]


def run_compare(tmp_path, **kw):
    model, tok = make_model("llama"), make_tokenizer("right")
    args = dict(strengths=(0, 0.5, 1), model=model, tok=tok, source=SOURCE, target=TARGET, prompts=PROMPTS,
                passages=PASSAGES, fit_kwargs=FAST, sparsity=[{"l1": 1.0}], out_dir=tmp_path / "cmp",
                progress=False, max_new_tokens=4)
    args.update(kw)
    return model, lf.evaluate.compare(**args)


def test_compare_covers_every_method_and_strength(tmp_path):
    model, res = run_compare(tmp_path)
    snap = snapshot(model)
    labels = {r["label"] for r in res["points"]}
    assert labels == set(lf.evaluate.DEFAULT_METHODS) | {"lineas[l1=1]"}
    for m in lf.evaluate.DEFAULT_METHODS:
        pts = [(r["strength"], r["multiplier"]) for r in res["points"] if r["label"] == m]
        want = [(0.0, 1.0), (0.5, 1.0), (1.0, 1.0)] + ([(1.0, 2.0), (1.0, 4.0), (1.0, 8.0)] if m == "actadd" else [])
        assert pts == want, m
    assert [(r["strength"]) for r in res["points"] if r["label"] == "lineas[l1=1]"] == [1.0]
    # λ=0 is the unsteered row; steered points differ from it (the maps do something on this model)
    base = res["unsteered"]
    for r in res["points"]:
        if r["strength"] == 0:
            assert r["ppl"] == base["ppl"] and r["toxic_rate"] == base["toxic_rate"]
    moved = [r for r in res["points"] if r["strength"] == 1 and abs(r["ppl"] - base["ppl"]) > 1e-3]
    assert len(moved) >= 5
    for r in res["points"]:
        assert {"toxic_rate", "ppl", "fluency", "degenerate_rate", "cut", "ppl_change", "nnz"} <= set(r)
    assert res["fits"]["linear_act"]["nnz"] > 0 and res["fits"]["lineas"]["train"]["loss"]
    assert no_hooks_left(model) == [] and getattr(model, "_lineas_fast_handle", None) is None
    assert_state_equal(model, snap)


def test_compare_resumes_without_refitting_or_reevaluating(tmp_path, monkeypatch):
    _, first = run_compare(tmp_path, methods=("lineas", "mean_act"))
    import sys

    import lineas_fast.methods as M

    C = sys.modules["lineas_fast.evaluate.compare"]  # the package attribute of that name is the function

    def boom(*a, **k):
        raise AssertionError("should have been reused")

    monkeypatch.setattr(C, "evaluate_model", boom)
    monkeypatch.setattr(M, "fit", boom)
    _, again = run_compare(tmp_path, methods=("lineas", "mean_act"))
    assert [r["ppl"] for r in again["points"]] == [r["ppl"] for r in first["points"]]
    # different fit settings are a different request: refitted, not silently reused
    with pytest.raises(AssertionError, match="reused"):
        run_compare(tmp_path, methods=("lineas", "mean_act"), fit_kwargs={"lineas": dict(FAST["lineas"], steps=4)})


def test_write_comparison_folder(tmp_path):
    _, res = run_compare(tmp_path)
    paths = lf.evaluate.write_comparison(res, tmp_path / "out", command="lineas-fast eval --methods ...")
    names = {p.name for p in paths}
    assert names == {"table.md", "results.json", "tradeoff.png", "loss_curve.png", "sparsity.png"}
    for p in paths:
        assert p.stat().st_size > 500
    md = (tmp_path / "out" / "table.md").read_text()
    for m in lf.evaluate.DEFAULT_METHODS:
        assert f"| {m} λ=1 |" in md
    assert "actadd λ=1 ×8" in md and "LinEAS sparsity sweep" in md and "lineas-fast eval --methods" in md
    data = json.loads((tmp_path / "out" / "results.json").read_text())
    assert len(data["points"]) == len(res["points"]) and "toxic" not in data["points"][0]


def test_best_at_budget_picks_lowest_toxic_rate_within_budget():
    pts = [dict(label="a", role="method", toxic_rate=0.2, ppl=10, ppl_change=0.05, degenerate_rate=0.0),
           dict(label="a", role="method", toxic_rate=0.1, ppl=12, ppl_change=0.2, degenerate_rate=0.0),
           dict(label="b", role="method", toxic_rate=0.15, ppl=10, ppl_change=0.01, degenerate_rate=0.0),
           dict(label="b", role="method", toxic_rate=0.05, ppl=10, ppl_change=0.01, degenerate_rate=0.5),
           dict(label="c", role="sparsity", toxic_rate=0.0, ppl=10, ppl_change=0.0, degenerate_rate=0.0)]
    best = lf.evaluate.best_at_budget({"points": pts})
    assert [(r["label"], r["toxic_rate"]) for r in best] == [("b", 0.15), ("a", 0.2)]


def test_compare_bad_arguments(tmp_path):
    with pytest.raises(lf.SteeringError, match="unknown method 'nope'"):
        run_compare(tmp_path, methods=("nope",))
    with pytest.raises(lf.SteeringError, match="only l1, group_l2, density, refit_steps"):
        run_compare(tmp_path, sparsity=[{"lr": 1.0}])
    with pytest.raises(lf.SteeringError, match="strengths"):
        run_compare(tmp_path, strengths=())


def test_evaluate_namespace_metrics():
    tok = make_tokenizer("right")
    model = make_model("llama")
    probs = lf.evaluate.toxicity(["you stupid idiot", "the river flows"])
    assert probs.shape == (2,) and probs[0] > probs[1]
    ppl = lf.evaluate.perplexity(model, tok, PASSAGES)
    assert 1 < ppl < 1e4
    texts, ids = lf.evaluate.continuations(model, tok, PROMPTS, max_new_tokens=3)
    assert len(texts) == 3 and all(len(i) <= 3 for i in ids)


# ---------------------------------------------------------------- CLI smoke
@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_llama_cmp")
    tiny_model("llama").save_pretrained(folder)
    make_tokenizer("right").save_pretrained(folder)
    return folder


def test_cli_eval_methods_writes_results_folder(capsys, tmp_path, tiny_dir):
    src, tgt = tmp_path / "s.txt", tmp_path / "t.txt"
    src.write_text("\n".join(SOURCE))
    tgt.write_text("\n".join(TARGET))
    out = tmp_path / "res"
    argv = ["eval", "--model", str(tiny_dir), "--methods", "lineas,linear_act,actadd", "--strengths", "0,1",
            "--multipliers", "3", "--sparsity", "l1=0.5", "--steps", "2", "--source", str(src), "--target", str(tgt),
            "--prompts", "3", "--passages", "2", "--out", str(out)]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "comparison took" in text and "best point per method" in text
    for name in ("table.md", "results.json", "tradeoff.png", "loss_curve.png", "sparsity.png", "points.jsonl"):
        assert (out / name).is_file(), name
    md = (out / "table.md").read_text()
    assert "actadd λ=1 ×3" in md and "linear_act λ=1" in md and "lineas[l1=0.5]" in md


@pytest.mark.parametrize("argv, words", [
    (["eval", "--methods", "lineas,bogus", "--out", "x"], ["bogus"]),
    (["eval", "--methods", "lineas"], ["--out"]),
    (["eval", "--methods", "lineas", "--out", "x", "--sparsity", "l2=3"], ["--sparsity"]),
    (["eval", "--methods", "lineas", "--out", "x", "--sparsity", "density=0"], ["--sparsity", "(0, 1]"]),
    (["eval", "--methods", "lineas", "--out", "x", "--sparsity", "refit_steps=2.5"], ["--sparsity", "integer"]),
])
def test_cli_eval_methods_errors(capsys, argv, words):
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 2 and all(w in err for w in words), err


def test_cli_eval_needs_steering_or_methods(capsys):
    with pytest.raises(SystemExit) as e:
        main(["eval"])
    assert e.value.code == 2
    assert "--steering" in capsys.readouterr().err


def test_fit_cli_offers_every_method():
    from lineas_fast.cli import build_parser
    from lineas_fast.methods import METHODS

    fit = build_parser()._subparsers._group_actions[0].choices["fit"]
    method = next(a for a in fit._actions if a.dest == "method")
    assert list(method.choices) == list(METHODS)


def test_cli_variants_and_extra_strengths(capsys, tmp_path, tiny_dir):
    out = tmp_path / "res"
    argv = ["eval", "--model", str(tiny_dir), "--methods", "mean_act", "--strengths", "0,1",
            "--variant", "mean_q=mean_act:support=q_0_100,pooling=last", "--method-strengths", "mean_q=0.5",
            "--prompts", "2", "--passages", "1", "--out", str(out)]
    assert main(argv) == 0
    md = (out / "table.md").read_text()
    assert "mean_q λ=0.5" in md and "mean_q λ=1" in md and "mean_act λ=0.5" not in md
    st = lf.Steering.load(out / "steerings" / "mean_q.safetensors")
    assert st.clamped and st.meta["hyperparams"]["pooling"] == "last"
    capsys.readouterr()
    assert main(argv[:-2] + ["--variant", "x=mean_act:steps=3", "--out", str(out)]) == 2
    assert "'steps' is not an option" in capsys.readouterr().err
