"""``lineas-fast generate``: its options, :func:`validate` (the torch-free argument checks
:func:`lineas_fast.cli.main` runs first) and :func:`run`, which prints unsteered and steered greedy
continuations side by side (``--pipeline``: a PNG strength grid, see :mod:`lineas_fast.cli.pipeline`)."""

from __future__ import annotations

import shutil

from ..errors import SteeringError
from .common import (GRID_DEFAULTS, GRID_ONLY, finite, load_model, load_steering, model_for, output_file,
                     pipeline_args, positive, refuse_given, say, strengths)
from .pipeline import parse_size

DEFAULT_STRENGTH = 1.0
DEFAULT_MAX_NEW_TOKENS = 30
# The language-model options: a --pipeline run has no use for them, so there they are refused.
TEXT_ONLY = {"strength": "--strength", "max_new_tokens": "--max-new-tokens", "model": "--model"}


def add_parser(sub, common, fmt) -> None:
    g = sub.add_parser(
        "generate", parents=[common], formatter_class=fmt,
        help="print unsteered and steered continuations side by side",
                       description="Greedy continuations of each PROMPT without and with the steering.")
    g.add_argument("prompt", nargs="*", metavar="PROMPT", help="one or more prompts (or --prompt, repeatable)")
    g.add_argument("--prompt", dest="prompts_opt", action="append", default=[], metavar="PROMPT",
                   help="a prompt (repeatable); with --pipeline, one grid row each")
    g.add_argument("--steering", required=True, metavar="FILE", help="steering file (.safetensors)")
    g.add_argument("--strength", type=float, default=None,
                   help=f"steering strength λ (0 = unsteered, 1 = learned map) [default: {DEFAULT_STRENGTH}]")
    g.add_argument("--model", default=None,
                   help="embedded model name or local folder (default: the model recorded in the steering file)")
    g.add_argument("--max-new-tokens", type=int, default=None, metavar="N",
                   help=f"tokens to generate per prompt [default: {DEFAULT_MAX_NEW_TOKENS}]")
    pipeline_args(g, fit=False)
    g.set_defaults(func=run, validate=validate)


def validate(args) -> None:
    """Refuse bad arguments before torch is imported or a model loaded: no prompt or an empty one, a
    non-finite strength, and options the chosen mode would ignore (the grid options without --pipeline,
    the language-model options with it)."""
    prompts = list(args.prompt) + list(args.prompts_opt)
    if not prompts:
        raise SteeringError("generate: give at least one PROMPT" + (" (or --prompt)" if args.pipeline else ""))
    empty = [i for i, p in enumerate(prompts, 1) if not p.strip()]
    if empty:
        raise SteeringError(f"generate: prompt {empty[0]} of {len(prompts)} is empty")
    if args.pipeline:
        refuse_given(args, TEXT_ONLY, "does not apply to generate --pipeline (an image grid: its columns are "
                                      "--strengths)")
        if args.strengths is not None:
            strengths(args.strengths)
        parse_size(args.size)
        positive("--num-inference-steps", args.num_inference_steps)
        finite("--guidance-scale", args.guidance_scale)
        output_file("--out", GRID_DEFAULTS["out"] if args.out is None else args.out)
    else:
        refuse_given(args, GRID_ONLY, "applies to generate --pipeline only (the image grid)")
        finite("--strength", args.strength)
        positive("--max-new-tokens", args.max_new_tokens)


def run(args) -> int:
    import lineas_fast as lf

    from .. import report
    from ..evaluate import continuations

    if args.pipeline:
        from .pipeline import run_generate

        return run_generate(args)
    prompts = list(args.prompt) + list(args.prompts_opt)
    strength = DEFAULT_STRENGTH if args.strength is None else args.strength
    max_new = DEFAULT_MAX_NEW_TOKENS if args.max_new_tokens is None else args.max_new_tokens
    st = load_steering(args.steering)
    model, tok = load_model(model_for(st, args.model))
    st.check_model(model)
    base, _ = continuations(model, tok, prompts, max_new_tokens=max_new)
    with lf.steered(model, st, strength=strength):
        steered, _ = continuations(model, tok, prompts, max_new_tokens=max_new)
    width = max(30, (shutil.get_terminal_size((120, 20)).columns - 3) // 2)
    for prompt, a, b in zip(prompts, base, steered):
        say(f"\nprompt: {prompt!r}")
        for line in report.side_by_side("UNSTEERED", f"STEERED (strength {strength:g})", width):
            say(line)
        say(f"{'-' * width}-┼-{'-' * width}")
        for line in report.side_by_side(a, b, width):
            say(line)
    return 0
