"""Smoke test of the main job (``lineas-fast demo``) on the real embedded model, so it cannot rot.

``--quick``: 3 LinEAS steps with the library defaults otherwise, 8 held-out prompts, 3 passages. Asserts
the pipeline ran end to end and that the steering changes the model's outputs — not that it detoxifies
(3 steps and 8 prompts measure nothing). The first run converts the GGUF once (~30 s, cached).
"""

import json

import pytest

import lineas_fast as lf
from lineas_fast.cli import main

# One thread: on a clean 2-core machine it costs ~1.5x, but on a shared one 2 OpenMP threads spinning
# against another process make this run ~15x slower (measured: 30 s vs 460 s).
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]


def test_demo_quick(tmp_path, capsys):
    rc = main(["demo", "--quick", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert rc == 0

    # the table and the examples were printed
    assert "toxic rate" in out and "passage PPL" in out and "fluency" in out and "nnz" in out
    assert "\nunsteered " in out and "\nLinEAS (λ=1) " in out
    assert out.count("[1] prompt:") == 1 and "[3] prompt:" in out
    assert "total wall time" in out and "passage PPL" in out.split("timings:")[-1]

    # the artifacts
    st = lf.Steering.load(tmp_path / "detox.safetensors")
    assert st.meta["method"] == "lineas" and st.meta["model_type"] == "llama" and st.nnz() > 0
    assert (tmp_path / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| unsteered |" in (tmp_path / "table.md").read_text()
    res = json.loads((tmp_path / "results.json").read_text())
    assert len(res["fit"]["train"]["loss"]) == 3 and res["eval"]["prompts"] == 8
    # the table's fluency on the curve prompts (here all 8), recorded on every row
    assert res["eval"]["fluency_prompts"] == res["eval"]["curve_prompts"] == 8
    assert all(r["fluency_prompts"] == 8 for r in res["rows"])
    split = sum(res["phases"][k]["seconds"] for k in ("perplexity", "generate", "fluency"))
    assert 0 < split <= res["timings"]["evaluate"]  # where the evaluation's time went, kept once
    assert not any(k.startswith("evaluate_") for k in res["timings"])
    assert res["phases"]["generate"]["count"] > 0 and "(evaluation: passage PPL" in (tmp_path / "table.md").read_text()
    base, steered = res["results"]["unsteered"]["texts"], res["results"]["lineas"]["texts"]
    assert len(base) == len(steered) == 8

    # steering changes the outputs
    assert base != steered
    assert res["rows"][1]["ppl"] != res["rows"][0]["ppl"]
