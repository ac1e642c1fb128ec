"""The ``lineas-fast`` command line: help texts, one-line errors, env, and every command end to end on a
tiny random Llama saved to a temporary folder (with the offline char tokenizer from conftest)."""

import json
import subprocess
import sys

import pytest
import torch
from conftest import SOURCE, TARGET, make_tokenizer, tiny_model

import lineas_fast as lf
from lineas_fast import report
from lineas_fast.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")

COMMANDS = {
    "demo": ["--out", "--prompts", "--steps", "--quick"],
    "fit": ["--source", "--target", "--out", "--model", "--method", "--sites", "--pooling", "--steps", "--lr",
            "--l1", "--group-l2", "--refit-steps", "--density", "--normalize", "--optimizer", "--batch-size", "--max-length", "--seed"],
    "generate": ["--steering", "--strength", "--model", "--max-new-tokens", "PROMPT"],
    "eval": ["--steering", "--strengths", "--prompts", "--passages", "--prompt-set", "--model", "--out"],
    "bake": ["--steering", "--strength", "--out", "--model", "--no-verify"],
    "env": [],
}


def run(capsys, *argv):
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def assert_one_line_error(rc, err, *words):
    assert rc == 2
    lines = [ln for ln in err.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], err  # progress bars may precede it
    assert "Traceback" not in err
    for w in words:
        assert w in errors[0], (w, errors[0])


# ------------------------------------------------------------------ help


def test_top_level_help_lists_every_command(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for cmd in COMMANDS:
        assert cmd in out
    assert "bench" in out


@pytest.mark.parametrize("cmd", list(COMMANDS))
def test_subcommand_help_is_complete(cmd, capsys):
    with pytest.raises(SystemExit) as e:
        main([cmd, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: lineas-fast {cmd}")
    for opt in COMMANDS[cmd]:
        assert opt in out, f"{cmd} --help does not mention {opt}"
    assert "(default: None)" not in out


def test_fit_help_shows_library_defaults(capsys):
    with pytest.raises(SystemExit):
        main(["fit", "--help"])
    out = capsys.readouterr().out
    from lineas_fast.methods import LINEAS_DEFAULTS

    assert f"[default: {LINEAS_DEFAULTS['steps']}]" in out
    assert f"[default: {LINEAS_DEFAULTS['lr']}]" in out


def test_no_command_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as e:
        main([])
    assert e.value.code == 2


def test_python_dash_m_runs_the_cli():
    r = subprocess.run([sys.executable, "-m", "lineas_fast", "--help"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "usage: lineas-fast" in r.stdout


# ------------------------------------------------------------------ errors: one line, exit 2, nothing loaded


def test_missing_steering_file(capsys, tmp_path):
    rc, _, err = run(capsys, "generate", "--steering", str(tmp_path / "nope.safetensors"), "hello")
    assert_one_line_error(rc, err, "nope.safetensors", "does not exist")


def test_corrupt_steering_file(capsys, tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00garbage\nnot a safetensors file")
    rc, _, err = run(capsys, "eval", "--steering", str(bad))
    assert_one_line_error(rc, err, "bad.safetensors")


def test_bad_strengths(capsys, tmp_path):
    rc, _, err = run(capsys, "eval", "--steering", str(tmp_path / "x.safetensors"), "--strengths", "0,half,1")
    assert_one_line_error(rc, err, "--strengths")


def test_unknown_prompt_set(capsys, tmp_path):
    rc, _, err = run(capsys, "fit", "--source", "no-such-set", "--target", "wiki", "--out", str(tmp_path / "s.st"))
    assert_one_line_error(rc, err, "no-such-set")


def test_option_of_another_method(capsys, tmp_path):
    src, tgt = _texts(tmp_path)
    rc, _, err = run(capsys, "fit", "--source", src, "--target", tgt, "--method", "mean_act", "--steps", "5",
                     "--out", str(tmp_path / "s.safetensors"))
    assert_one_line_error(rc, err, "--steps", "mean_act")


def test_unknown_model(capsys, tmp_path):
    src, tgt = _texts(tmp_path)
    rc, _, err = run(capsys, "fit", "--source", src, "--target", tgt, "--model", str(tmp_path / "nomodel"),
                     "--out", str(tmp_path / "s.safetensors"))
    assert_one_line_error(rc, err, "nomodel")


def test_traceback_flag_reraises(tmp_path):
    with pytest.raises(lf.SteeringError):
        main(["--traceback", "generate", "--steering", str(tmp_path / "nope.safetensors"), "hi"])


def test_env_runs(capsys):
    rc, out, _ = run(capsys, "env")
    assert rc == 0
    for word in ("backend", "torch", "cpp", "triton", "cuda", "transformers", "torch threads"):
        assert word in out


# ------------------------------------------------------------------ report helpers


def test_table_formats():
    base = {"name": "unsteered", "toxic_rate": 0.2, "mean_tox": 0.25, "degenerate_rate": 0.0, "ppl": 60.0,
            "fluency": 4.0}
    row = report.fix_cut({"name": "LinEAS", "toxic_rate": 0.0, "mean_tox": 0.05, "degenerate_rate": 0.01,
                          "ppl": 63.0, "fluency": 5.0, "cut": 2e8, "ppl_change": 0.05,
                          "toxic_diff_ci": (-0.2, -0.25, -0.15), "fit_seconds": 12.5, "nnz": 100,
                          "active_sites": 3, "total_sites": 60})
    text = report.format_table([base, row])
    lines = text.splitlines()
    assert len(lines) == 4 and len({len(ln) for ln in lines[:2]}) == 1  # header and rule align
    assert "∞" in text and "+5.0%" in text and "[-0.250, -0.150]*" in text and "100 (3/60 sites)" in text
    md = report.format_table([base, row], "markdown").splitlines()
    assert md[0].startswith("| model |") and md[1].startswith("|:---|") and len(md) == 4
    js = report.jsonable({"a": row, 1.0: torch.tensor([1.5]), "n": float("inf")})
    assert json.dumps(js) and js["a"]["cut"] is None and js["1.0"] == [1.5]


def test_examples_prefer_toxic_prompts():
    base = {"texts": ["a", "b", "c", "d"], "probs": [0.1, 0.9, 0.2, 0.8]}
    steered = {"texts": ["A", "B", "C", "D"], "probs": [0.0, 0.1, 0.0, 0.1]}
    exs = report.examples(["p0", "p1", "p2", "p3"], base, steered, k=3)
    assert [e["index"] for e in exs] == [1, 3, 0]
    assert exs[0]["steered"] == "B" and exs[0]["unsteered_tox"] == 0.9


# ------------------------------------------------------------------ end to end on a tiny model


def _texts(tmp_path):
    src, tgt = tmp_path / "src.txt", tmp_path / "tgt.txt"
    src.write_text("\n".join(SOURCE) + "\n")
    tgt.write_text("\n".join(TARGET) + "\n")
    return str(src), str(tgt)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_llama")
    tiny_model("llama").save_pretrained(folder)
    make_tokenizer("right").save_pretrained(folder)
    return folder


def test_fit_generate_bake_eval(capsys, tmp_path, tiny_dir):
    src, tgt = _texts(tmp_path)
    st_path = tmp_path / "st.safetensors"
    rc, out, _ = run(capsys, "fit", "--model", str(tiny_dir), "--source", src, "--target", tgt, "--steps", "3",
                     "--l1", "0", "--out", str(st_path))
    assert rc == 0 and "nnz" in out and "saved" in out
    st = lf.Steering.load(st_path)
    assert st.meta["method"] == "lineas" and st.meta["hyperparams"]["steps"] == 3 and st.nnz() > 0

    # the model recorded in the artifact is used when --model is left out
    rc, out, _ = run(capsys, "generate", "--steering", str(st_path), "--strength", "2", "--max-new-tokens", "5",
                     "the river", "you fool")
    assert rc == 0 and out.count("prompt: ") == 2 and "UNSTEERED" in out and "STEERED (strength 2)" in out

    rc, out, _ = run(capsys, "bake", "--steering", str(st_path), "--strength", "1", "--out", str(tmp_path / "baked"))
    assert rc == 0 and "verified" in out and "LARGER" not in out
    assert (tmp_path / "baked" / "config.json").is_file()

    rc, out, _ = run(capsys, "eval", "--steering", str(st_path), "--strengths", "0,1", "--prompts", "4",
                     "--passages", "2", "--out", str(tmp_path / "ev"))
    assert rc == 0
    assert "unsteered" in out and "λ=0" in out and "λ=1" in out and "passage PPL" in out
    res = json.loads((tmp_path / "ev" / "results.json").read_text())
    rows = {r["name"]: r for r in res["rows"]}
    assert rows["λ=0"]["toxic_rate"] == rows["unsteered"]["toxic_rate"]
    assert rows["λ=0"]["ppl"] == pytest.approx(rows["unsteered"]["ppl"], rel=1e-5)
    assert len(res["results"]["unsteered"]["texts"]) == 4 and "probs" not in res["results"]["unsteered"]
    assert (tmp_path / "ev" / "tradeoff.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_fit_mean_act_and_site_list(capsys, tmp_path, tiny_dir):
    src, tgt = _texts(tmp_path)
    sites = ["model.layers.0.post_attention_layernorm", "model.layers.1.post_attention_layernorm"]
    rc, out, _ = run(capsys, "fit", "--model", str(tiny_dir), "--method", "mean_act", "--source", src,
                     "--target", tgt, "--sites", *sites, "--out", str(tmp_path / "m.safetensors"))
    assert rc == 0
    st = lf.Steering.load(tmp_path / "m.safetensors")
    assert st.meta["method"] == "mean_act" and st.sites == sites


def test_steering_for_another_model_is_refused(capsys, tmp_path, tiny_dir):
    other = tiny_model("gpt2")
    st = lf.Steering({"transformer.h.0.ln_1": torch.ones(32)}, {"transformer.h.0.ln_1": torch.zeros(32)},
                     {"model_type": other.config.model_type})
    st.save(tmp_path / "gpt2.safetensors")
    rc, _, err = run(capsys, "generate", "--steering", str(tmp_path / "gpt2.safetensors"), "--model", str(tiny_dir),
                     "hello")
    assert_one_line_error(rc, err, "gpt2")


def test_fit_autocast_flag(capsys, tmp_path, tiny_dir):
    src, tgt = _texts(tmp_path)
    rc, _, _ = run(capsys, "fit", "--model", str(tiny_dir), "--source", src, "--target", tgt, "--steps", "2",
                   "--autocast", "--out", str(tmp_path / "a.safetensors"))
    assert rc == 0 and lf.Steering.load(tmp_path / "a.safetensors").meta["hyperparams"]["autocast"] is True
    rc, _, err = run(capsys, "fit", "--model", str(tiny_dir), "--source", src, "--target", tgt, "--method",
                     "mean_act", "--autocast", "--out", str(tmp_path / "b.safetensors"))
    assert_one_line_error(rc, err, "--autocast", "mean_act")


def test_bench_outside_a_checkout_is_one_clear_error(tmp_path, monkeypatch, capsys):
    import lineas_fast.cli as cli

    monkeypatch.setattr(cli, "__file__", str(tmp_path / "lineas_fast" / "cli" / "__init__.py"))
    assert main(["bench", "--quick"]) == 2
    assert "source checkout" in capsys.readouterr().err
