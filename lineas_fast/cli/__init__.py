"""``lineas-fast`` — the command line (also ``python -m lineas_fast``).

Commands: ``demo`` (what ``make demo`` runs), ``fit``, ``generate``, ``eval``, ``bake``, ``serve``, ``bench``,
``env``.
Deliberate errors (:class:`lineas_fast.SteeringError`), missing packages and file-system errors are
printed as one line ``error: ...`` on stderr with exit status 2; ``--traceback`` (alias ``--debug``) shows
the full trace. Usage errors (argparse) print one such line too. Argument errors come before any work:
:func:`main` runs the command's ``validate`` (torch-free checks: finite numbers, counts, readable UTF-8
prompt files, writable ``--out``, options that would be ignored in the combination given) before torch is
imported or a model is loaded.

This package holds :func:`build_parser` and :func:`main`; each command is a module owning its options
(``add_parser``) and its work (``run``): :mod:`~lineas_fast.cli.demo`, :mod:`~lineas_fast.cli.fit`,
:mod:`~lineas_fast.cli.generate`, :mod:`~lineas_fast.cli.eval` (``--methods``:
:mod:`~lineas_fast.cli.compare`), :mod:`~lineas_fast.cli.bake`, :mod:`~lineas_fast.cli.serve` (vLLM),
:mod:`~lineas_fast.cli.bench`,
:mod:`~lineas_fast.cli.env`; :mod:`~lineas_fast.cli.pipeline` is the ``--pipeline`` side of ``fit`` and
``generate``, :mod:`~lineas_fast.cli.common` what they share. Building the parser imports no torch (the
defaults shown come from :mod:`lineas_fast.defaults`), so ``--help`` and ``--version`` answer at once;
each ``run`` imports the library it needs.
"""

from __future__ import annotations

import argparse
import sys

from .._version import __version__
from ..errors import SteeringError
from . import bake, bench, demo, env, fit, generate, serve
from . import eval as eval_command
from .common import HelpFormatter, Parser, common_parser, positive

__all__ = ["build_parser", "main"]

COMMANDS = (demo, fit, generate, eval_command, bake, serve, bench, env)  # in the order --help lists them


def build_parser() -> argparse.ArgumentParser:
    fmt = HelpFormatter
    p = Parser(
        prog="lineas-fast", formatter_class=fmt,
        description="Learn per-neuron affine steering maps (LinEAS; the AcT family and ActAdd as baselines) from "
                    "two small prompt sets and apply them to a transformers model or a diffusers pipeline. Errors "
                    "print one line and exit with status 2.",
        epilog="Run 'lineas-fast COMMAND --help' for a command's options. Start with 'lineas-fast demo'.")
    p.add_argument("--version", action="version", version=f"lineas-fast {__version__}")
    p.add_argument("--traceback", "--debug", dest="traceback", action="store_true",
                   help="show the full Python traceback on errors (--debug is the same flag)")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)
    common = common_parser()
    for command in COMMANDS:
        command.add_parser(sub, common, fmt)
    return p


def main(argv=None) -> int:
    """Entry point of ``lineas-fast`` / ``python -m lineas_fast``; returns the exit status."""
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if getattr(args, "passthrough", False):
        args.vllm_args = rest  # `serve` hands the options it does not know to `vllm serve`
    elif rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    try:
        positive("--threads", args.threads)
        validate = getattr(args, "validate", None)
        if validate is not None:  # argument checks first: no torch import, no model load before them
            validate(args)
        if args.threads is not None:
            import torch

            torch.set_num_threads(args.threads)
        return int(args.func(args) or 0)
    except (SteeringError, OSError, ModuleNotFoundError) as e:
        if args.traceback:
            raise
        if isinstance(e, ModuleNotFoundError):
            msg = f"missing package {e.name!r} ({e}); see README.md for the set-up (make demo)"
        elif isinstance(e, SteeringError):
            msg = str(e)
        else:
            msg = f"{e.strerror or e}" + (f": {e.filename}" if getattr(e, "filename", None) else "")
        print(f"error: {' '.join(msg.split())}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
