"""``lineas-fast generate``: its options and :func:`run`, which prints unsteered and steered greedy
continuations side by side (``--pipeline``: a PNG strength grid, see :mod:`lineas_fast.cli.pipeline`)."""

from __future__ import annotations

import shutil

from ..errors import SteeringError
from .common import load_model, load_steering, model_for, pipeline_args, positive, say


def add_parser(sub, common, fmt) -> None:
    g = sub.add_parser(
        "generate", parents=[common], formatter_class=fmt,
        help="print unsteered and steered continuations side by side",
                       description="Greedy continuations of each PROMPT without and with the steering.")
    g.add_argument("prompt", nargs="*", metavar="PROMPT", help="one or more prompts (or --prompt, repeatable)")
    g.add_argument("--prompt", dest="prompts_opt", action="append", default=[], metavar="PROMPT",
                   help="a prompt (repeatable); with --pipeline, one grid row each")
    g.add_argument("--steering", required=True, metavar="FILE", help="steering file (.safetensors)")
    g.add_argument("--strength", type=float, default=1.0, help="steering strength λ (0 = unsteered, 1 = learned map)")
    g.add_argument("--model", default=None,
                   help="embedded model name or local folder (default: the model recorded in the steering file)")
    g.add_argument("--max-new-tokens", type=int, default=30, metavar="N", help="tokens to generate per prompt")
    pipeline_args(g, fit=False)
    g.set_defaults(func=run)


def run(args) -> int:
    import lineas_fast as lf

    from .. import report
    from ..evaluate import continuations

    if args.pipeline:
        from .pipeline import run_generate

        return run_generate(args)
    args.prompt = list(args.prompt) + list(args.prompts_opt)
    if not args.prompt:
        raise SteeringError("generate: give at least one PROMPT")
    positive("--max-new-tokens", args.max_new_tokens)
    st = load_steering(args.steering)
    model, tok = load_model(model_for(st, args.model))
    st.check_model(model)
    base, _ = continuations(model, tok, args.prompt, max_new_tokens=args.max_new_tokens)
    with lf.steered(model, st, strength=args.strength):
        steered, _ = continuations(model, tok, args.prompt, max_new_tokens=args.max_new_tokens)
    width = max(30, (shutil.get_terminal_size((120, 20)).columns - 3) // 2)
    for prompt, a, b in zip(args.prompt, base, steered):
        say(f"\nprompt: {prompt!r}")
        for line in report.side_by_side("UNSTEERED", f"STEERED (strength {args.strength:g})", width):
            say(line)
        say(f"{'-' * width}-┼-{'-' * width}")
        for line in report.side_by_side(a, b, width):
            say(line)
    return 0
