"""The benchmark scripts' timing helpers (``benchmarks/timing.py``) and the report's target checks: paired
ratios and their quartiles, token-interleaved decode steps (order, alignment, greedy tokens equal to
``generate``'s), the private-code compiled forward, and ``report.targets`` on synthetic results."""

import json
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCH))

import timing  # noqa: E402
from tiny_models import tiny_model  # noqa: E402


def test_quartiles_and_paired_ratios():
    assert timing.quartiles([3.0]) == (3.0, 3.0, 3.0)
    assert timing.quartiles([1.0, 2.0, 3.0, 4.0, 5.0]) == (2.0, 3.0, 4.0)
    r = timing.paired_ratios({"base": [1.0, 2.0, 4.0], "x": [1.1, 2.0, 4.8]}, "base")
    assert r["base"]["ratio"] == 1.0 and r["base"]["ratio_se"] == 0.0
    assert r["x"]["ratio"] == pytest.approx(1.1)  # median of 1.1, 1.0, 1.2 — paired, not a ratio of medians
    assert r["x"]["ratio_q1"] <= r["x"]["ratio"] <= r["x"]["ratio_q3"]
    assert r["x"]["median_s"] == 2.0 and r["x"]["pairs"] == 3 and r["x"]["ratio_se"] > 0


def test_interleaved_steps_rotates_and_aligns():
    calls = []

    def variant(name):
        return (lambda: 0), (lambda s: calls.append(name) or s + 1)

    samples, states = timing.interleaved_steps({k: variant(k) for k in "abc"}, steps=4, rounds=2)
    assert all(len(v) == 8 for v in samples.values())
    assert states == {"a": 4, "b": 4, "c": 4}
    firsts = calls[::3]  # the variant that went first at each step
    assert firsts == ["a", "b", "c", "a", "b", "c", "a", "b"]
    assert sorted(calls[:3]) == ["a", "b", "c"]


@pytest.mark.parametrize("position_ids", [False, True])
def test_hf_decoder_matches_generate(position_ids):
    model = tiny_model("llama").eval()
    ids = torch.randint(3, model.config.vocab_size, (2, 5), generator=torch.Generator().manual_seed(0))
    start, step = timing.hf_decoder(model, ids, position_ids=position_ids)
    with torch.inference_mode():
        state = start()
        for _ in range(5):
            state = step(state)
        ref = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=6,
                             min_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(torch.cat(state[3], 1), ref[:, ids.shape[1]:])


def test_private_forward_has_its_own_code_and_same_output():
    from bench_inference import private_forward

    a, b = tiny_model("llama").eval(), tiny_model("llama").eval()
    fa, fb = private_forward(a, "a"), private_forward(b, "b")
    assert fa.__func__.__code__ is not fb.__func__.__code__
    assert fa.__func__.__code__ is not type(a).forward.__code__
    ids = torch.randint(3, a.config.vocab_size, (1, 4))
    with torch.inference_mode():
        assert torch.equal(fa(input_ids=ids).logits, a(input_ids=ids).logits)


def _step(ratio, q1=None, q3=None, se=0.004, s=0.05):
    return {"median_s": s, "ratio": ratio, "ratio_q1": q1 or ratio - 0.01, "ratio_q3": q3 or ratio + 0.01,
            "ratio_se": se, "pairs": 64}


def test_report_targets_say_met_missed_and_why(tmp_path, monkeypatch):
    import report

    monkeypatch.setattr(report, "OUT", tmp_path)
    modes = {"unsteered": _step(1.0), "hooks": _step(1.03), "fused": _step(0.995), "fold": _step(1.005)}
    inf = {"models": [{"model": "m", "sites": 60, "step_b1": modes, "prefill": modes,
                       "norm_call": {"model_us": 16.0, "fused_us": 9.0, "sites": 60},
                       "aten_ops_per_decode_step": {"unsteered": 100, "hooks": 110, "fused": 90, "fold": 105}}],
           "routing": {"mixed (4 steerings + unsteered)": {"throughput_vs_one": 0.97}}}
    peers = {"fused_vs_peers": {"repeng": [0.99, 1.02, 0.004, 0.004, 64], "pyvene": [1.01, 1.005, 0.004, 0.004, 64],
                                "sv": [1.05, 1.0, 0.004, 0.004, 64], "few": [1.05, 1.0, 0.004, 0.004, 2],
                                "floor": [1.05, 1.0, 0.004, 0.004, 64, 0.04]},
             "ops_vs_peers": {"repeng, m": [90, 120, 100]}}
    (tmp_path / "inference.json").write_text(json.dumps(inf))
    (tmp_path / "peers.json").write_text(json.dumps(peers))
    rows = {r[0]: r for r in report.targets({"make_bench_s": 1590.0, "total_s": 1300.0, "quick": False})}
    assert rows["`make bench`, set-up included"][2:4] == ("26.5 min", True)
    assert "4.8 min" in rows["`make bench`, set-up included"][4]
    fused = rows["fused decode step, batch 1, SmolLM2"]
    assert fused[3] is False and "0.42 ms" in fused[4] and "0.992×" in fused[4]  # 60 × 7 µs of a 50 ms step
    assert rows["fold decode step, batch 1, SmolLM2"][3] is True
    assert rows["mixed batch throughput"][3] is True
    assert rows["fused vs repeng"][3] is True
    assert rows["fused vs pyvene"][3] is False and "tie within noise" in rows["fused vs pyvene"][4]
    assert rows["fused vs sv"][3] is False and "more than the noise" in rows["fused vs sv"][4]
    assert rows["fused vs few"][3] is False and "tie within noise" in rows["fused vs few"][4]  # 2 pairs: t = 12.7
    assert "tie within noise" in rows["fused vs floor"][4]  # the unsteered twin's 0.04 noise floor covers it
    assert rows["ATen ops per decode step vs peers"][3] is True


def test_t95():
    assert timing.t95(2) == 12.71 and timing.t95(3) == 4.30 and timing.t95(64) == 2.0
    assert timing.t95(12) == 2.23 and timing.t95(1) == 12.71


def test_rotated_rotates_and_leaves_the_warm_up_out():
    calls = []
    fns = {k: (lambda k=k: calls.append(k)) for k in "abc"}
    r = timing.rotated(fns, repeats=2, base="a")
    assert calls == ["a", "b", "c", "b", "c", "a", "c", "a", "b"]  # round r starts at r mod 3
    assert all(v["pairs"] == 2 and "first_call_s" in v for v in r.values())
    calls.clear()
    r = timing.rotated(fns, repeats=2, base="a", warm_up=False)
    assert len(calls) == 6 and all("first_call_s" not in v for v in r.values())


def test_report_header_states_the_versions_the_run_recorded():
    """RESULTS.md names the versions the benchmarks ran with (``runs.json``), not those of whoever re-renders
    it later; a run that recorded none says the versions shown are the rendering environment's."""
    import report

    meta = {"threads": 2, "finished": "2026-01-01 00:00", "total_s": 60.0, "quick": False, "commit": "abc1234"}
    recorded = report.stamp({**meta, "versions": "Python 3.0, torch 0.1"})
    assert "Versions: Python 3.0, torch 0.1." in recorded
    unrecorded = " ".join(report.stamp(meta))
    assert "the run did not record its own" in unrecorded and report.versions() in unrecorded
