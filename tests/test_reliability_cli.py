"""The command line fails like a Unix tool: an argument error exits with status 2 and prints exactly one
line, ``error: ...``, on stderr — no traceback — and is found before any model is loaded (before torch is
even imported). ``--debug`` (alias of ``--traceback``) shows the full traceback instead.

One test per reproduction of the reliability issue: a non-UTF-8 prompt file, ``--lr nan``/``inf``,
``--max-length 0``, an ``--out`` that is a folder or cannot be written (refused before the fit, not after
it), an empty prompt, and options that some combination used to ignore silently (``generate --device``,
``--dtype``, ``--strengths``, ``--out`` without ``--pipeline``, and their counterparts). Every in-process
case runs with the model loaders replaced by a function that fails the test, so an error found only
after a load (the old behaviour of most of these) fails here; a subprocess probe checks that none of
them imports torch.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
import torch

import lineas_fast as lf
from lineas_fast.cli import main

NOT_UTF8 = b"\xff\xfe\x00bad"


def refuse_load(*args, **kwargs):
    raise AssertionError("a model was loaded before the argument error was reported")


@pytest.fixture
def no_model(monkeypatch):
    """Every model or pipeline loader the commands reach fails the test if called."""
    import lineas_fast.diffusion.grid as grid
    import lineas_fast.models as models
    from lineas_fast.cli import bake, common, compare, demo, fit, generate
    from lineas_fast.cli import eval as eval_command

    for mod in (models, common, bake, compare, demo, fit, generate, eval_command):
        monkeypatch.setattr(mod, "load_model", refuse_load)
    monkeypatch.setattr(grid, "load_pipeline", refuse_load)


@pytest.fixture
def files(tmp_path):
    """Valid prompt files, a non-UTF-8 one, a valid steering file (it names no model, so the commands
    would load the embedded default), a plain file and a folder."""
    src, tgt = tmp_path / "src.txt", tmp_path / "tgt.txt"
    src.write_text("you are a bad person\ni hate this\n", encoding="utf-8")
    tgt.write_text("the river flows\na history of the city\n", encoding="utf-8")
    bad = tmp_path / "bad.txt"
    bad.write_bytes(NOT_UTF8)
    st = tmp_path / "st.safetensors"
    lf.Steering({"model.norm": torch.full((4,), 1.5)}, {"model.norm": torch.zeros(4)}).save(st)
    plain = tmp_path / "plain.txt"
    plain.write_text("x")
    folder = tmp_path / "folder"
    folder.mkdir()
    return {"src": str(src), "tgt": str(tgt), "bad": str(bad), "st": str(st), "plain": str(plain),
            "folder": str(folder), "out": str(tmp_path / "out.safetensors"), "dir": str(tmp_path / "outdir")}


def one_line_error(capsys, argv, *words) -> str:
    """Run ``main(argv)``; assert exit status 2 and exactly one stderr line ``error: ...`` holding ``words``."""
    try:
        rc = main(argv)
    except SystemExit as e:  # argparse usage errors exit through SystemExit
        rc = e.code
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert rc == 2, (rc, err)
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for w in words:
        assert w in lines[0], (w, lines[0])
    return lines[0]


def fit_argv(f, *extra):
    return ["fit", "--source", f["src"], "--target", f["tgt"], "--out", f["out"], *extra]


# ---------------------------------------------------------------- non-UTF-8 prompt files
@pytest.mark.parametrize("which", ["--source", "--target"])
def test_fit_prompt_file_not_utf8(capsys, no_model, files, which):
    argv = fit_argv(files)
    argv[argv.index(which) + 1] = files["bad"]
    one_line_error(capsys, argv, which, "bad.txt", "not UTF-8", "byte 0")


def test_eval_prompt_set_not_utf8(capsys, no_model, files):
    one_line_error(capsys, ["eval", "--steering", files["st"], "--prompt-set", files["bad"]],
                   "--prompt-set", "bad.txt", "not UTF-8")


def test_eval_methods_source_not_utf8(capsys, no_model, files):
    one_line_error(capsys, ["eval", "--methods", "mean_act", "--out", files["dir"], "--source", files["bad"]],
                   "--source", "not UTF-8")


def test_not_utf8_error_names_the_line(capsys, no_model, files, tmp_path):
    """The position is the file's (not the decoder's chunk's), past valid multi-byte UTF-8."""
    head = "first prompt\nsecond prompt é\n".encode()
    late = tmp_path / "late.txt"
    late.write_bytes(head + b"third \xe9 prompt\n")
    argv = fit_argv(files)
    argv[argv.index("--source") + 1] = str(late)
    one_line_error(capsys, argv, "late.txt", "line 3", f"byte {len(head) + 6}")


# ---------------------------------------------------------------- numbers
@pytest.mark.parametrize("argv_tail, words", [
    (["--lr", "nan"], ["--lr", "nan"]),
    (["--lr", "inf"], ["--lr", "inf"]),
    (["--lr", "-inf"], ["--lr"]),
    (["--lr", "0"], ["--lr", "positive"]),
    (["--max-length", "0"], ["--max-length", "positive"]),
    (["--batch-size", "0"], ["--batch-size"]),
    (["--window", "0"], ["--window"]),
    (["--steps", "-1"], ["--steps"]),
    (["--preserve", "nan"], ["--preserve"]),
    (["--l1", "-1"], ["--l1"]),
    (["--tol", "inf"], ["--tol"]),
    (["--lr-end", "nan"], ["--lr-end"]),
    (["--lr-end", "0"], ["lr_end"]),  # LinEAS's own rule, (0, 1], applied before the model loads
    (["--density", "0"], ["density", "(0, 1]"]),  # the same, for the density cap
    (["--density", "nan"], ["--density"]),
    (["--method", "actadd", "--multiplier", "nan"], ["--multiplier"]),
    (["--threads", "0"], ["--threads"]),
])
def test_fit_bad_numbers(capsys, no_model, files, argv_tail, words):
    one_line_error(capsys, fit_argv(files, *argv_tail), *words)


@pytest.mark.parametrize("argv, words", [
    (["generate", "--steering", "{st}", "--strength", "nan", "hello"], ["--strength", "nan"]),
    (["generate", "--steering", "{st}", "--max-new-tokens", "0", "hello"], ["--max-new-tokens"]),
    (["eval", "--steering", "{st}", "--strengths", "0,nan,1"], ["--strengths", "nan"]),
    (["eval", "--steering", "{st}", "--prompts", "0"], ["--prompts"]),
    (["eval", "--methods", "lineas", "--out", "{dir}", "--sparsity", "l1=nan"], ["--sparsity"]),
    (["eval", "--methods", "actadd", "--out", "{dir}", "--multipliers", "2,inf"], ["--multipliers"]),
    (["bake", "--steering", "{st}", "--strength", "inf", "--out", "{dir}"], ["--strength", "inf"]),
    (["demo", "--prompts", "0", "--out", "{dir}"], ["--prompts"]),
])
def test_other_commands_bad_numbers(capsys, no_model, files, argv, words):
    one_line_error(capsys, [a.format(**files) for a in argv], *words)


# ---------------------------------------------------------------- --out checked before the work
def test_fit_out_is_a_folder(capsys, no_model, files):
    argv = fit_argv(files)
    argv[argv.index("--out") + 1] = files["folder"]
    one_line_error(capsys, argv, "--out", "folder")


@pytest.mark.parametrize("cmd", ["fit", "generate_pipeline", "bake", "eval", "eval_methods", "demo"])
def test_out_under_a_regular_file(capsys, no_model, files, cmd):
    """A path through a plain file cannot be created, whoever runs it (root included)."""
    target = os.path.join(files["plain"], "x")
    argv = {"fit": fit_argv(files),
            "generate_pipeline": ["generate", "--pipeline", files["folder"], "--steering", files["st"],
                                  "--prompt", "a cat", "--out", files["out"]],
            "bake": ["bake", "--steering", files["st"], "--strength", "1", "--out", files["dir"]],
            "eval": ["eval", "--steering", files["st"], "--out", files["dir"]],
            "eval_methods": ["eval", "--methods", "mean_act", "--out", files["dir"]],
            "demo": ["demo", "--out", files["dir"]]}[cmd]
    argv[argv.index("--out") + 1] = target
    one_line_error(capsys, argv, "--out", "plain.txt", "not a folder")


@pytest.mark.parametrize("cmd", ["bake", "eval"])
def test_out_folder_is_a_file(capsys, no_model, files, cmd):
    argv = {"bake": ["bake", "--steering", files["st"], "--strength", "1", "--out", files["plain"]],
            "eval": ["eval", "--steering", files["st"], "--out", files["plain"]]}[cmd]
    one_line_error(capsys, argv, "--out", "not a folder")


def test_fit_out_folder_missing(capsys, no_model, files, tmp_path):
    argv = fit_argv(files)
    argv[argv.index("--out") + 1] = str(tmp_path / "nope" / "s.safetensors")
    one_line_error(capsys, argv, "--out", "does not exist")


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root may write anywhere")
def test_fit_out_not_writable(capsys, no_model, files, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        argv = fit_argv(files)
        argv[argv.index("--out") + 1] = str(locked / "s.safetensors")
        one_line_error(capsys, argv, "--out", "not writable")
    finally:
        locked.chmod(0o755)


# ---------------------------------------------------------------- prompts
@pytest.mark.parametrize("prompts", [[""], ["hello", "   "], ["--prompt", ""]])
def test_generate_empty_prompt(capsys, no_model, files, prompts):
    one_line_error(capsys, ["generate", "--steering", files["st"], *prompts], "empty")


def test_generate_no_prompt(capsys, no_model, files):
    one_line_error(capsys, ["generate", "--steering", files["st"]], "at least one PROMPT")


# ---------------------------------------------------------------- options that would be ignored
@pytest.mark.parametrize("flag, value", [("--device", "cpu"), ("--dtype", "float32"), ("--strengths", "0,1"),
                                         ("--out", "grid.png"), ("--seed", "3"), ("--size", "8x8"),
                                         ("--guidance-scale", "2"), ("--num-inference-steps", "3")])
def test_generate_grid_options_need_pipeline(capsys, no_model, files, flag, value):
    one_line_error(capsys, ["generate", "--steering", files["st"], flag, value, "hello"], flag, "--pipeline")


@pytest.mark.parametrize("flag, value", [("--strength", "0.5"), ("--max-new-tokens", "5"), ("--model", "m")])
def test_generate_text_options_refused_with_pipeline(capsys, no_model, files, flag, value):
    one_line_error(capsys, ["generate", "--pipeline", files["folder"], "--steering", files["st"], flag, value,
                            "--prompt", "a cat", "--out", files["out"]], flag, "--pipeline")


@pytest.mark.parametrize("flag, value", [("--device", "cpu"), ("--dtype", "bfloat16"), ("--size", "8x8"),
                                         ("--num-inference-steps", "3")])
def test_fit_pipeline_options_need_pipeline(capsys, no_model, files, flag, value):
    one_line_error(capsys, fit_argv(files, flag, value), flag, "--pipeline")


def test_fit_model_refused_with_pipeline(capsys, no_model, files):
    one_line_error(capsys, fit_argv(files, "--pipeline", files["folder"], "--model", "x"), "--model", "--pipeline")


@pytest.mark.parametrize("flag, value", [("--steps", "3"), ("--source", "toxic"), ("--target", "wiki"),
                                         ("--multipliers", "2"), ("--sparsity", "l1=1"),
                                         ("--variant", "a=mean_act"), ("--method-strengths", "a=0.5")])
def test_eval_steering_refuses_methods_options(capsys, no_model, files, flag, value):
    one_line_error(capsys, ["eval", "--steering", files["st"], flag, value], flag, "--methods")


def test_eval_multipliers_need_actadd(capsys, no_model, files):
    one_line_error(capsys, ["eval", "--methods", "mean_act", "--out", files["dir"], "--multipliers", "2"],
                   "--multipliers", "actadd")


# ---------------------------------------------------------------- usage errors are one line too
@pytest.mark.parametrize("argv, words", [
    (["fit", "--source", "toxic"], ["--out", "lineas-fast fit --help"]),
    (["fit", "--out", "x", "--lr", "fast"], ["--lr", "fast"]),
    (["fit", "--out", "x", "--no-such-option"], ["--no-such-option"]),
    (["generate", "--steering", "x", "--dtype", "int8", "hi"], ["--dtype", "int8"]),
    ([], ["COMMAND"]),
])
def test_usage_errors_are_one_line(capsys, no_model, argv, words):
    one_line_error(capsys, argv, *words)


# ---------------------------------------------------------------- --debug
def test_debug_reraises_like_traceback(files, no_model):
    with pytest.raises(lf.SteeringError, match="--lr"):
        main(["--debug", *fit_argv(files, "--lr", "nan")])


def test_debug_prints_the_full_traceback(files):
    argv = [sys.executable, "-m", "lineas_fast", "fit", "--source", files["src"], "--target", files["tgt"],
            "--out", files["out"], "--lr", "nan"]
    plain = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert plain.returncode == 2 and plain.stderr.strip().splitlines() == ["error: --lr=nan: must be a finite number > 0"]
    debug = subprocess.run(argv[:3] + ["--debug"] + argv[3:], capture_output=True, text=True, timeout=120)
    assert debug.returncode == 1
    assert "Traceback (most recent call last)" in debug.stderr and "SteeringError: --lr=nan" in debug.stderr


# ---------------------------------------------------------------- acting options still act
def test_pipeline_only_options_are_accepted_with_pipeline(capsys, no_model, files):
    """The options refused without --pipeline pass validation with it (and the run reaches the loader)."""
    with pytest.raises(AssertionError, match="model was loaded"):
        main(["generate", "--pipeline", files["folder"], "--steering", files["st"], "--prompt", "a cat",
              "--strengths", "0,1", "--device", "cpu", "--dtype", "float32", "--seed", "3", "--size", "8x8",
              "--guidance-scale", "2", "--num-inference-steps", "2", "--out", files["out"]])


# ---------------------------------------------------------------- no torch, no model: a subprocess probe
_PROBE = r"""
import contextlib, io, json, sys, time
from lineas_fast.cli import main

results = []
for argv in json.loads(sys.argv[1]):
    err = io.StringIO()
    t0 = time.perf_counter()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            rc = main(argv)
        except SystemExit as e:
            rc = e.code
    results.append({"argv": argv, "rc": rc, "err": err.getvalue(), "seconds": time.perf_counter() - t0,
                    "torch": "torch" in sys.modules, "models": "lineas_fast.models" in sys.modules})
print(json.dumps(results))
"""


def test_argument_errors_import_no_torch(files):
    cases = [
        fit_argv(files, "--lr", "nan"), fit_argv(files, "--lr", "inf"), fit_argv(files, "--max-length", "0"),
        ["fit", "--source", files["bad"], "--target", files["tgt"], "--out", files["out"]],
        ["fit", "--source", files["src"], "--target", files["tgt"], "--out", files["folder"]],
        ["generate", "--steering", files["st"], ""],
        ["generate", "--steering", files["st"], "--device", "cpu", "hi"],
        ["generate", "--steering", files["st"], "--dtype", "float16", "hi"],
        ["generate", "--steering", files["st"], "--strengths", "0,1", "hi"],
        ["generate", "--steering", files["st"], "--out", "g.png", "hi"],
        ["eval", "--steering", files["st"], "--prompt-set", files["bad"]],
        ["bake", "--steering", files["st"], "--strength", "nan", "--out", files["dir"]],
        ["--threads", "1", *fit_argv(files, "--lr", "nan")],
        ["fit", "--out"],
    ]
    res = subprocess.run([sys.executable, "-c", _PROBE, json.dumps(cases)], capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, res.stderr
    for r in json.loads(res.stdout):
        lines = [ln for ln in r["err"].splitlines() if ln.strip()]
        assert r["rc"] == 2 and len(lines) == 1 and lines[0].startswith("error: "), r
        assert not r["torch"] and not r["models"], r
        assert r["seconds"] < 1.0, r


def test_help_and_version_stay_fast():
    """The new checks add nothing to ``--help``/``--version``: still no torch, well under a second."""
    walls = []
    for argv in (["--help"], ["--version"], ["fit", "--help"]):
        t0 = time.perf_counter()
        res = subprocess.run([sys.executable, "-c", "import sys; from lineas_fast.cli import main\n"
                              "try:\n    main(sys.argv[1:])\nexcept SystemExit as e:\n    assert e.code == 0\n"
                              "assert 'torch' not in sys.modules", *argv], capture_output=True, text=True,
                             timeout=120)
        walls.append(time.perf_counter() - t0)
        assert res.returncode == 0, res.stderr
    assert min(walls) < 1.0, walls
