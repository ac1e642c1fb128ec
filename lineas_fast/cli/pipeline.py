"""The ``--pipeline`` side of ``lineas-fast fit`` and ``lineas-fast generate``: argument handling only
(the options themselves are :func:`lineas_fast.cli.common.pipeline_args`; the work is in
:mod:`lineas_fast.diffusion.lineas`, :mod:`~lineas_fast.diffusion.run` and :mod:`~lineas_fast.diffusion.grid`,
imported when called)."""

from __future__ import annotations

import inspect

from ..errors import SteeringError
from .common import GRID_DEFAULTS, load_steering, say, strengths


def parse_size(text: str | None):
    if text is None:
        return None
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise SteeringError(f"--size {text!r}: expected HEIGHTxWIDTH, e.g. 512x512") from None
    if h <= 0 or w <= 0:
        raise SteeringError(f"--size {text!r}: height and width must be positive")
    return h, w


def pipeline_fit_options(args) -> tuple[set, dict]:
    """The option names ``--method`` accepts on a pipeline, and the pipeline-call options to pass."""
    from ..methods import METHODS
    from ..diffusion.lineas import fit_lineas_pipeline
    from ..diffusion.view import RUN_OPTIONS

    fn = fit_lineas_pipeline if args.method == "lineas" else METHODS[args.method]
    accepted = set(inspect.signature(fn).parameters) | (set(RUN_OPTIONS) if args.method != "lineas" else set())
    opts = {"size": parse_size(args.size), "num_inference_steps": args.num_inference_steps}
    return accepted, {k: v for k, v in opts.items() if v is not None}


def run_generate(args) -> int:
    """``generate --pipeline``: a PNG grid, one row per prompt and one column per strength (the arguments
    were checked by :func:`lineas_fast.cli.generate.validate`; options left out take
    :data:`~lineas_fast.cli.common.GRID_DEFAULTS`)."""
    from ..diffusion.grid import load_pipeline, save_grid, strength_grid

    prompts = list(args.prompt) + list(args.prompts_opt)
    if not prompts:
        raise SteeringError("generate --pipeline: give at least one --prompt")
    given = {k: getattr(args, k) for k in GRID_DEFAULTS}
    opts = {k: GRID_DEFAULTS[k] if v is None else v for k, v in given.items()}
    columns = strengths(opts["strengths"])
    st = load_steering(args.steering)
    pipe = load_pipeline(args.pipeline, args.device, args.dtype)
    pipe.set_progress_bar_config(disable=True)
    images = strength_grid(pipe, st, prompts, columns, num_inference_steps=args.num_inference_steps,
                           guidance_scale=args.guidance_scale, seed=opts["seed"], size=parse_size(args.size))
    path = save_grid(images, prompts, columns, opts["out"])
    say(f"saved {path}: {len(prompts)} prompt row(s) x {len(columns)} strength column(s) {columns}")
    return 0
