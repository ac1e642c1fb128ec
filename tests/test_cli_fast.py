"""``lineas-fast --help`` / ``--version`` answer at once: building the parser imports no torch (the defaults
it shows come from the torch-free :mod:`lineas_fast.defaults`, which must agree with the library)."""

from __future__ import annotations

import subprocess
import sys
import time

# Runs in a fresh interpreter: `--help` of the top level and of every command, then `--version`, each
# caught at its SystemExit, checking after each that nothing imported torch (or the torch-side library).
_PROBE = r"""
import sys
from lineas_fast.cli import build_parser, main

heavy = ("torch", "transformers", "lineas_fast.methods", "lineas_fast.demo", "lineas_fast.evaluate",
         "lineas_fast.data", "lineas_fast.models", "lineas_fast.steering", "lineas_fast.diffusion")
commands = list(build_parser()._subparsers._group_actions[0].choices)
for argv in [["--help"], *([c, "--help"] for c in commands), ["--version"]]:
    try:
        main(argv)
    except SystemExit as e:
        assert e.code == 0, (argv, e.code)
    else:
        raise AssertionError(f"{argv} did not exit")
    loaded = [m for m in heavy if m in sys.modules]
    assert not loaded, (argv, loaded)
print("commands:", ",".join(commands), file=sys.stderr)
"""


def _run(*args, **kw):
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=120, **kw)


def test_help_and_version_of_every_command_import_no_torch():
    res = _run("-c", _PROBE)
    assert res.returncode == 0, res.stderr
    assert "commands: demo,fit,generate,eval,bake,serve,bench,env" in res.stderr
    assert res.stdout.startswith("usage: lineas-fast") and "lineas-fast fit" in res.stdout


def test_module_entry_point_imports_no_torch():
    for argv in (["--help"], ["--version"], ["fit", "--help"]):
        res = _run("-X", "importtime", "-m", "lineas_fast", *argv)
        assert res.returncode == 0, res.stderr
        imported = {line.rsplit("|", 1)[-1].strip() for line in res.stderr.splitlines() if "|" in line}
        assert "lineas_fast.cli" in imported and "torch" not in imported, argv
    assert _run("-m", "lineas_fast", "--version").stdout.startswith("lineas-fast ")
    assert _run("-m", "lineas_fast.cli", "--version").stdout.startswith("lineas-fast ")


def test_help_is_fast():
    walls = []
    for _ in range(3):  # best of three: the cores may be shared with a running experiment
        t0 = time.perf_counter()
        res = _run("-m", "lineas_fast", "--help")
        walls.append(time.perf_counter() - t0)
        assert res.returncode == 0, res.stderr
    assert min(walls) < 2.0, walls


def test_defaults_agree_with_the_library():
    import lineas_fast.demo
    import lineas_fast.methods
    from lineas_fast import defaults

    assert defaults.METHOD_NAMES == tuple(lineas_fast.methods.METHODS)
    assert defaults.LINEAS is lineas_fast.methods.LINEAS_DEFAULTS
    assert defaults.DEMO_QUICK is lineas_fast.demo.QUICK
    assert defaults.DEFAULT_MODEL == lineas_fast.demo.DEFAULT_MODEL
