"""``lineas-fast demo``: its options, :func:`validate` (the torch-free argument checks
:func:`lineas_fast.cli.main` runs first) and :func:`run` (what ``make demo`` runs; the work is in
:func:`lineas_fast.demo.run_demo`)."""

from __future__ import annotations

from ..defaults import DEFAULT_MODEL, DEMO_QUICK as QUICK
from ..defaults import LINEAS as D
from .common import load_model, output_dir, positive, say


def add_parser(sub, common, fmt) -> None:
    d = sub.add_parser(
        "demo", parents=[common], formatter_class=fmt,
        help="fit LinEAS on the embedded model and compare it with the unsteered model",
        description=f"Load {DEFAULT_MODEL}, fit LinEAS with the library defaults on the fit slices (toxic rows "
                    "0–31 → nontoxic rows 0–31) and Mean-AcT and Linear-AcT on the same data, evaluate them by "
                    "the protocol on held-out toxic prompts (rows 100–399) and WikiText passages (lines "
                    "100–599) — each over λ ∈ {0.25, 0.5, 0.75, 1}, the baselines also at the strength whose "
                    "PPL matches LinEAS's at λ = 1 — print the table and example continuations, and save "
                    "detox.safetensors, loss_curve.png, tradeoff.png, results.json and table.md to --out.")
    d.add_argument("--out", default="./demo_out", metavar="DIR", help="output folder")
    d.add_argument("--prompts", type=int, default=None, metavar="N",
                   help=f"held-out toxic prompts to evaluate (default 300, the whole eval slice; "
                        f"{QUICK['prompts']} with --quick)")
    d.add_argument("--steps", type=int, default=None, metavar="S",
                   help=f"LinEAS training steps (default: the library default, {D['steps']}; "
                        f"{QUICK['steps']} with --quick)")
    d.add_argument("--curve-prompts", type=int, default=None, metavar="N",
                   help="score the trade-off curves on the first N of those prompts (default 100: each curve "
                        "point costs a protocol evaluation; the table rows always use all of them)")
    d.add_argument("--quick", action="store_true",
                   help=f"smoke run: {QUICK['steps']} steps, {QUICK['prompts']} prompts, {QUICK['passages']} passages")
    d.set_defaults(func=run, validate=validate)


def validate(args) -> None:
    """Refuse non-positive counts and an ``--out`` that cannot be written, before the model loads."""
    positive("--prompts", args.prompts)
    positive("--steps", args.steps)
    positive("--curve-prompts", args.curve_prompts)
    output_dir("--out", args.out)


def run(args) -> int:
    from ..demo import run_demo

    run_demo(args.out, prompts=args.prompts, steps=args.steps, curve_prompts=args.curve_prompts, quick=args.quick,
             say=say, load_model=load_model)
    return 0
