"""``lineas-fast bench``: its options and :func:`run`, which runs ``benchmarks/run_all.py`` of the source
checkout this package lives in (the benchmark scripts are not part of the installed package)."""

from __future__ import annotations

import sys
from pathlib import Path

from ..errors import SteeringError


def add_parser(sub, common, fmt) -> None:
    r = sub.add_parser(
        "bench", parents=[common], formatter_class=fmt,
        help="run every benchmark and regenerate benchmarks/RESULTS.md (source checkout)",
        description="Run benchmarks/run_all.py of this source checkout: kernels, inference, training and the "
                    "peer libraries (their venv comes from `make bench`; without it that step is reported as "
                    "not run), then regenerate benchmarks/RESULTS.md and its plots. About 30 min on 2 cores.")
    r.add_argument("--quick", action="store_true", help="every script's smoke settings (minutes; not a result)")
    r.add_argument("--only", default=None, metavar="LIST",
                   help="comma-separated steps among kernels,inference,training,peers (others keep their results)")
    r.set_defaults(func=run)


def checkout_root() -> Path:
    """The folder holding the ``lineas_fast`` package, from where ``lineas_fast/cli/__init__.py`` is."""
    return Path(sys.modules[__package__].__file__).resolve().parent.parent.parent


def run(args) -> int:
    """Run benchmarks/run_all.py of this source checkout (the scripts are not part of the package)."""
    import subprocess

    script = checkout_root() / "benchmarks" / "run_all.py"
    if not script.is_file():
        raise SteeringError("lineas-fast bench runs the benchmark scripts of a source checkout "
                            "(benchmarks/run_all.py), which this installation does not have: clone the "
                            "repository and run `make bench` there")
    cmd = [sys.executable, str(script), "--threads", str(args.threads or 2)]
    if args.quick:
        cmd.append("--quick")
    if args.only:
        cmd += ["--only", args.only]
    return subprocess.call(cmd)
