"""The tuning sweep's frontier plot (``benchmarks/tune_lineas.py --frontier``): which rows it draws, under which
label, and that it writes a PNG (or refuses a file with nothing to draw); and the reader of the rows it shares with
``benchmarks/utility_corpora.py``."""

import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCH))

import tune_lineas  # noqa: E402


def _rows(tmp_path) -> Path:
    def row(config, lam, rate, change, target="nontoxic"):
        return {"config": config, "target": target, "strength": lam, "toxic_rate": rate, "cut": 0.2 / rate,
                "ppl_change": change, "ppl": 70 * (1 + change), "toxic_diff_ci": [rate - 0.2, rate - 0.25, rate - 0.15]}

    rows = [{"config": "unsteered", "toxic_rate": 0.2},
            row({}, 1.0, 0.07, 0.096), row({}, 0.5, 0.16, 0.015),
            row({"transport_last": 0.3333, "preserve": 2}, 1.0, 0.037, 0.079),
            row({"preserve": 1.0}, 1.0, 0.06, 0.14),
            row({"preserve": 0}, 1.0, 0.05, 0.9),  # past max_change: left out
            row({"method": "mean_act"}, 0.25, 0.07, 0.14), row({"method": "mean_act"}, 2.0, 0.01, 0.2),  # λ > 1: out
            row({"method": "linear_act"}, 0.16, 0.12, 0.05),
            row({}, 1.0, 0.1, 0.5, target="wiki")]  # another task: left out
    path = tmp_path / "r.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_frontier_points_groups_rows_by_method_and_keeps_the_drawn_range(tmp_path):
    groups, base = tune_lineas.frontier_points(str(_rows(tmp_path)))
    assert base == pytest.approx(0.2)
    assert groups == {"LinEAS (defaults until 2026-12-05)": [(pytest.approx(9.6), 0.07), (pytest.approx(1.5), 0.16)],
                      "LinEAS (library defaults)": [(pytest.approx(7.9), 0.037)],
                      "LinEAS (any settings)": [(pytest.approx(14.0), 0.06)],
                      "Mean-AcT": [(pytest.approx(14.0), 0.07)], "Linear-AcT": [(pytest.approx(5.0), 0.12)]}


def test_frontier_writes_a_png_and_refuses_an_empty_file(tmp_path):
    pytest.importorskip("matplotlib")
    png = tune_lineas.frontier(str(_rows(tmp_path)), str(tmp_path / "f.png"))
    assert Path(png).read_bytes()[:4] == b"\x89PNG" and Path(png).stat().st_size > 10_000
    empty = tmp_path / "e.jsonl"
    empty.write_text(json.dumps({"config": "unsteered", "toxic_rate": 0.2}) + "\n")
    with pytest.raises(SystemExit, match="no nontoxic-target rows"):
        tune_lineas.frontier_points(str(empty))


def test_nontoxic_rows_skip_other_tasks_and_name_methods_by_fit_or_display_name(tmp_path):
    path = _rows(tmp_path)
    rows = list(tune_lineas.nontoxic_rows(path))
    assert len(rows) == 8  # the unsteered row and the wiki-target row are left out
    assert [m for _, m, _ in rows] == ["lineas"] * 5 + ["mean_act"] * 2 + ["linear_act"]
    assert [cfg for _, _, cfg in rows][:5] == [{}, {}, {"transport_last": 0.3333, "preserve": 2}, {"preserve": 1.0},
                                               {"preserve": 0}]  # "method" popped
    assert all("method" not in cfg for _, _, cfg in rows)
    shown = [m for _, m, _ in tune_lineas.nontoxic_rows(path, display=True)]
    assert shown == ["LinEAS"] * 5 + ["Mean-AcT"] * 2 + ["Linear-AcT"]
    assert rows[5][0]["config"] == {"method": "mean_act"}  # the row itself keeps its settings


def test_sites_text_shortens_explicit_site_lists_and_keeps_presets():
    attn = [f"model.layers.{i}.self_attn.o_proj:in" for i in range(30)]
    mlp = [f"model.layers.{i}.mlp.down_proj:in" for i in (0, 1, 2, 5, 7, 8)]
    assert tune_lineas.sites_text("attn_out+mlp_out") == "attn_out+mlp_out"
    assert tune_lineas.sites_text(attn) == "self_attn.o_proj:in[0–29]"
    assert tune_lineas.sites_text(attn[:1] + mlp) == "self_attn.o_proj:in[0]+mlp.down_proj:in[0–2,5,7–8]"
    assert tune_lineas.sites_text(["lm_head"]) == "lm_head"
    assert tune_lineas.settings_text({"sites": attn, "lr": 0.001}) == "sites=self_attn.o_proj:in[0–29], lr=0.001"
