"""``lineas-fast eval --methods``: the method comparison (its options are defined with ``eval`` in
:mod:`lineas_fast.cli.eval`), the parsing of ``--sparsity`` and ``--variant``, :func:`validate` (the
torch-free argument checks, run before anything loads) and :func:`run`, which fits and evaluates every
method with :func:`lineas_fast.evaluate.compare` and writes a results folder."""

from __future__ import annotations

import inspect
import math
import sys
import time

from ..defaults import DEFAULT_MODEL, METHOD_NAMES, SPARSITY_OPTIONS
from ..errors import SteeringError
from .common import check_prompts, load_model, output_dir, positive, read_prompts, say, secs, strengths

DEFAULT_MULTIPLIERS = "2,4,8"


def sparsity_arg(text: str) -> dict:
    """``l1=X,group_l2=Y,density=D,refit_steps=N`` (any of them) → the LinEAS options of one sparse fit, parsed;
    their ranges are LinEAS's own rules (:func:`check_sparsity`)."""
    grid = {}
    for part in text.split(","):
        key, _, val = part.partition("=")
        key = key.strip().replace("-", "_")
        if key not in SPARSITY_OPTIONS or not val:
            raise SteeringError(f"--sparsity {text!r}: expected any of {', '.join(k + '=' for k in SPARSITY_OPTIONS)}"
                                f" e.g. l1=20,density=0.1,refit_steps=40")
        integer = key == "refit_steps"
        try:
            grid[key] = int(val) if integer else float(val)
        except ValueError:
            raise SteeringError(f"--sparsity {text!r}: {val!r} is not {'an integer' if integer else 'a number'}") \
                from None
    return grid


def check_sparsity(text: str) -> dict:
    """:func:`sparsity_arg`, then the fit's own option rules (:func:`.fit.precheck_lineas`: e.g. ``density`` in
    (0, 1], ``l1`` finite and >= 0), named after the argument; before any model is loaded."""
    from .fit import precheck_lineas

    grid = sparsity_arg(text)
    try:
        precheck_lineas(grid)
    except SteeringError as e:
        raise SteeringError(f"--sparsity {text!r}: {e}") from None
    return grid


def value(text: str):
    low = text.strip().lower()
    if low in ("true", "false"):
        return low == "true"
    if low == "none":
        return None
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text.strip()


def variant_arg(text: str, methods) -> tuple:
    """``LABEL=METHOD[:key=value,...]`` → ``(label, method, kwargs)``."""
    label, _, rest = text.partition("=")
    method, _, opts = rest.partition(":")
    label, method = label.strip(), method.strip()
    if not label or method not in methods:
        raise SteeringError(f"--variant {text!r}: expected LABEL=METHOD[:key=value,...] with METHOD one of "
                            f"{', '.join(methods)}")
    kwargs = {}
    for part in filter(None, (x.strip() for x in opts.split(","))):
        key, eq, val = part.partition("=")
        if not eq:
            raise SteeringError(f"--variant {text!r}: {part!r} is not key=value")
        kwargs[key.strip()] = value(val)
    accepted = inspect.signature(methods[method]).parameters
    wrong = [k for k in kwargs if k not in accepted]
    if wrong:
        raise SteeringError(f"--variant {text!r}: {wrong[0]!r} is not an option of method {method}")
    return label, method, kwargs


def method_list(text: str) -> list[str]:
    methods = [m.strip() for m in text.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHOD_NAMES]
    if unknown or not methods:
        raise SteeringError(f"--methods: unknown method(s) {unknown} (available: {', '.join(METHOD_NAMES)})")
    return methods


def validate(args) -> None:
    """The torch-free checks of ``eval --methods``: method names, ``--out`` given and writable, strengths
    and multipliers finite, ``--sparsity`` well-formed, counts positive, prompt files UTF-8 text, and
    ``--multipliers`` refused when no ``actadd`` would use them. (``--variant`` options are checked against
    the method's signature in :func:`run`, still before the model loads.)"""
    methods = method_list(args.methods)
    if not args.out:
        raise SteeringError("--methods needs --out DIR (the results folder; rerunning resumes it)")
    if args.steering is not None:
        raise SteeringError("give either --steering or --methods, not both")
    output_dir("--out", args.out)
    strengths(args.strengths or "0,0.25,0.5,0.75,1")
    if args.multipliers is not None:
        if "actadd" not in methods:
            raise SteeringError("--multipliers applies to actadd, which --methods does not list")
        strengths(args.multipliers, "--multipliers")
    for text in args.method_strengths:
        strengths(text.partition("=")[2], "--method-strengths")
    for text in args.sparsity:
        sparsity_arg(text)
    positive("--prompts", args.prompts)
    positive("--passages", args.passages)
    positive("--steps", args.steps)
    check_prompts("--source", args.source or "toxic", "fit")
    check_prompts("--target", args.target or "nontoxic", "fit")
    check_prompts("--prompt-set", args.prompt_set, "eval")


def run(args) -> int:
    """``eval --methods``: the method comparison, written as a results folder (arguments checked by
    :func:`validate`)."""
    import shlex

    from .. import evaluate, report
    from ..data import wiki_passages
    from ..methods import METHODS

    methods = method_list(args.methods)
    variants = [variant_arg(v, METHODS) for v in args.variant]
    extra = {}
    for text in args.method_strengths:
        label, _, values = text.partition("=")
        extra[label.strip()] = strengths(values, "--method-strengths")
    lams = strengths(args.strengths or "0,0.25,0.5,0.75,1")
    multipliers = strengths(args.multipliers or DEFAULT_MULTIPLIERS, "--multipliers") if "actadd" in methods else []
    sparsity = [check_sparsity(x) for x in args.sparsity]
    src = read_prompts("--source", args.source or "toxic", "fit")
    tgt = read_prompts("--target", args.target or "nontoxic", "fit")
    prompts = read_prompts("--prompt-set", args.prompt_set, "eval")[:args.prompts]
    model, tok = load_model(args.model or DEFAULT_MODEL)
    passages = wiki_passages(tok, "eval")[:args.passages]
    if not passages:
        raise SteeringError("no WikiText passages to score (the tokenizer produced none)")
    fit_kwargs = {"lineas": {"steps": args.steps}} if args.steps else {}
    say(f"comparing {', '.join(methods)} on {len(src)} vs {len(tgt)} fit prompts; evaluating strengths "
        f"{lams} on {len(prompts)} prompts and {len(passages)} passages"
        + (f"; LinEAS sparsity sweep {sparsity}" if sparsity else ""))
    t0 = time.perf_counter()
    result = evaluate.compare(methods + variants, lams, extra_strengths=extra, model=model, tok=tok, source=src,
                              target=tgt, prompts=prompts, passages=passages, fit_kwargs=fit_kwargs,
                              multipliers=multipliers, sparsity=sparsity, out_dir=args.out, progress=True, log=say)
    command = "lineas-fast " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv[1:] else None
    paths = evaluate.write_comparison(result, args.out, command=command)
    best = evaluate.best_at_budget(result)
    say("\nbest point per method with ΔPPL ≤ +10% and degenerate ≤ 5%:")
    from ..evaluate.write import table_row

    say(report.format_table([table_row(result, r) for r in best]) if best else "(none within budget)")
    say(f"comparison took {secs(t0):.1f} s; wrote " + ", ".join(str(p) for p in paths))
    return 0
