"""``lineas-fast fit``: its options (the LinEAS defaults shown come from :data:`lineas_fast.defaults.LINEAS`)
:func:`validate`, the torch-free argument checks :func:`lineas_fast.cli.main` runs first, and :func:`run`,
which fits a steering with :func:`lineas_fast.fit` and saves it (``--pipeline``: on a diffusers pipeline, see
:mod:`lineas_fast.cli.pipeline`)."""

from __future__ import annotations

import inspect
import time
from pathlib import Path

from ..defaults import DEFAULT_MODEL, METHOD_NAMES
from ..defaults import LINEAS as D
from ..errors import SteeringError
from .common import (PIPELINE_ONLY, check_prompts, finite, load_model, non_negative, output_file, pipeline_args,
                     positive, read_prompts, refuse_given, say, secs, sites_arg)


def add_parser(sub, common, fmt) -> None:
    f = sub.add_parser(
        "fit", parents=[common], formatter_class=fmt,
        help="fit a steering and save it as a .safetensors file",
                       description="Fit a steering from unpaired source → target prompt sets and save it. "
                                   "Options left out use the method's library defaults (shown for LinEAS).")
    f.add_argument("--source", default="toxic", metavar="toxic|PATH",
                   help="source prompts: a built-in set ('toxic', 'nontoxic', 'wiki': its fit slice, 32 rows), a "
                        ".jsonl file (field 'text') or a text file (one prompt per line) [default: toxic]")
    f.add_argument("--target", default="nontoxic", metavar="nontoxic|PATH",
                   help="target prompts, as --source [default: nontoxic — non-toxic sentence beginnings in the "
                        "toxic prompts' register, see docs/tuning.md]")
    f.add_argument("--out", required=True, metavar="FILE", help="steering file to write (.safetensors)")
    f.add_argument("--model", default=None,
                   help=f"embedded model name or a local HF checkpoint folder [default: {DEFAULT_MODEL}]")
    f.add_argument("--method", default="lineas", choices=list(METHOD_NAMES),
                   help="fitting method: LinEAS (end to end) or a per-site baseline of the AcT family / ActAdd")
    f.add_argument("--sites", nargs="+", default=None, metavar="SITE",
                   help=f"a preset (norms, post_norms, mlp_out, attn_out, mlp_hidden), a regex, or several module "
                        f"names (':k' = tuple output k, ':in' = input) [lineas default: {D['sites']}]")
    f.add_argument("--pooling", default=None, choices=["mean", "last", "tokens"],
                   help=f"how site activations are pooled per prompt [default: {D['pooling']}]")
    f.add_argument("--steps", type=int, default=None, metavar="S", help=f"LinEAS steps [default: {D['steps']}]")
    f.add_argument("--lr", type=float, default=None, metavar="RATE", help=f"LinEAS learning rate [default: {D['lr']}]")
    f.add_argument("--schedule", default=None, choices=["cosine", "constant"],
                   help=f"LinEAS learning-rate schedule: cosine decay to lr·lr-end over --steps [default: "
                        f"{D['schedule']}]")
    f.add_argument("--lr-end", type=float, default=None, metavar="F",
                   help=f"LinEAS: the cosine ends at lr·F [default: {D['lr_end']}]")
    f.add_argument("--preserve", type=float, default=None, metavar="μ",
                   help=f"LinEAS: weight of the term that keeps the target prompts' activations in place (0: "
                        f"off) [default: {D['preserve']}]")
    f.add_argument("--preserve-loss", default=None, choices=["paired", "wasserstein", "local"],
                   help=f"LinEAS: how the preservation term measures the move of the target prompts' activations: "
                        f"per token (paired), as a distribution (wasserstein), or each map's own displacement "
                        f"without what upstream maps moved (local) [default: {D['preserve_loss']}]")
    f.add_argument("--transport-last", type=float, default=None, metavar="S",
                   help=f"LinEAS: the transport term matches the source to the target only at the last S of the sites "
                        f"(a share in (0, 1]; the maps still act at every site) [default: {D['transport_last']}]")
    f.add_argument("--tol", type=float, default=None, metavar="T",
                   help=f"LinEAS stopping rule: stop when a window's mean loss improves by less than T "
                        f"(relative; 0: run every step) [default: {D['tol']}]")
    f.add_argument("--window", type=int, default=None, metavar="W",
                   help=f"LinEAS stopping rule: steps per window [default: {D['window']}]")
    f.add_argument("--l1", type=float, default=None, metavar="λ1",
                   help=f"sparse-group-lasso l1 (neurons) [default: {D['l1']}]")
    f.add_argument("--group-l2", type=float, default=None, metavar="λG",
                   help=f"sparse-group-lasso group weight (whole sites) [default: {D['group_l2']}]")
    f.add_argument("--refit-steps", type=int, default=None, metavar="N",
                   help=f"after a sparse fit (--l1/--group-l2), refit the entries it kept without the penalty for "
                        f"N steps (the relaxed lasso; 0: no refit) [default: {D['refit_steps']}]")
    f.add_argument("--density", type=float, default=None, metavar="D",
                   help=f"after the first phase keep at most the share D of the (ω, b) entries off the identity — "
                        f"those that move the activations most — and refit them for --refit-steps (1: no cap) "
                        f"[default: {D['density']}]")
    f.add_argument("--partial", type=float, default=None, metavar="P",
                   help=f"fraction of the LinEAS steps trained at a random strength λ < 1 against the interpolated "
                        f"target, so that strengths below 1 steer part of the way [default: {D['partial']}]")
    f.add_argument("--normalize", default=None, choices=["none", "var"],
                   help=f"W-loss column normalisation [default: {D['normalize']}]")
    f.add_argument("--optimizer", default=None, choices=["adam", "sgd"],
                   help=f"optimizer of the LinEAS steps [default: {D['optimizer']}]")
    f.add_argument("--batch-size", type=int, default=None, metavar="N",
                   help=f"source prompts per step (and as many target prompts with --preserve) [default: "
                        f"{D['batch_size']}]")
    f.add_argument("--max-length", type=int, default=None, metavar="T",
                   help=f"tokens per prompt [default: {D['max_length']}]")
    f.add_argument("--seed", type=int, default=None, metavar="N", help=f"random seed [default: {D['seed']}]")
    f.add_argument("--support", default=None, metavar="q_LO_HI",
                   help="AcT family: apply the map only strictly inside the source's LO–HI percentile range per "
                        "neuron, e.g. q_0_100 (stored in the artifact; such maps cannot be folded or baked)")
    f.add_argument("--incremental", action="store_true",
                   help="AcT family: fit sites in model order with the earlier maps applied")
    f.add_argument("--multiplier", type=float, default=None, metavar="M",
                   help="actadd: scale of the mean difference [default: 1]")
    f.add_argument("--autocast", action="store_true",
                   help="lineas: run the model forward under bf16 autocast (maps, pooling and loss stay fp32)")
    f.add_argument("--compile", action="store_true",
                   help="lineas: compile the training step (torch.compile of the decoder blocks, static packed "
                        "shapes; the first step pays the compilation)")
    pipeline_args(f, fit=True)
    f.set_defaults(func=run, validate=validate)


def validate(args) -> None:
    """Refuse bad arguments before torch is imported or the model loaded: non-finite or out-of-range
    numbers, prompt files that are not UTF-8 text, an ``--out`` that cannot be written (checked now, not
    after the fit), and options the chosen kind of model would ignore."""
    if args.pipeline:
        if args.model is not None:
            raise SteeringError("--model does not apply to --pipeline (the pipeline folder is the model)")
        if args.max_length is not None or args.autocast:
            raise SteeringError("--max-length/--autocast apply to language models, not to --pipeline")
        from .pipeline import parse_size

        parse_size(args.size)
        positive("--num-inference-steps", args.num_inference_steps)
    else:
        refuse_given(args, PIPELINE_ONLY, "applies to --pipeline only (fitting a text-to-image pipeline)")
    if args.steps is not None and args.steps < 0:
        raise SteeringError(f"--steps={args.steps}: must be >= 0")
    positive("--lr", args.lr)
    for name, value in (("--lr-end", args.lr_end), ("--multiplier", args.multiplier)):
        finite(name, value)
    for name, value in (("--preserve", args.preserve), ("--tol", args.tol), ("--l1", args.l1),
                        ("--group-l2", args.group_l2), ("--refit-steps", args.refit_steps),
                        ("--partial", args.partial), ("--density", args.density)):
        non_negative(name, value)
    for name, value in (("--window", args.window), ("--batch-size", args.batch_size),
                        ("--max-length", args.max_length)):
        positive(name, value)
    check_prompts("--source", args.source, "fit")
    check_prompts("--target", args.target, "fit")
    output_file("--out", args.out)


def precheck_lineas(kwargs: dict) -> None:
    """LinEAS's own option rules (:meth:`Recipe.validate`, e.g. ``lr_end`` in (0, 1]), applied before the
    model is loaded rather than by :func:`lineas_fast.fit` after it."""
    from dataclasses import fields

    from ..methods.trainer import Recipe

    names = {f.name for f in fields(Recipe)}
    Recipe(**{k: v for k, v in {**D, **kwargs}.items() if k in names}).validate()


def run(args) -> int:
    import lineas_fast as lf

    from ..methods import METHODS

    src = read_prompts("--source", args.source, "fit")
    tgt = read_prompts("--target", args.target, "fit")
    if args.pipeline:
        from .pipeline import pipeline_fit_options

        accepted, pipe_opts = pipeline_fit_options(args)
    else:
        accepted, pipe_opts = None, {}
    given = {"sites": sites_arg(args.sites), "pooling": args.pooling, "steps": args.steps, "lr": args.lr,
             "l1": args.l1, "group_l2": args.group_l2, "seed": args.seed, "normalize": args.normalize,
             "schedule": args.schedule, "lr_end": args.lr_end, "preserve": args.preserve,
             "preserve_loss": args.preserve_loss, "transport_last": args.transport_last, "tol": args.tol, "window": args.window,
             "refit_steps": args.refit_steps, "density": args.density, "partial": args.partial,
             "optimizer": args.optimizer, "batch_size": args.batch_size, "max_length": args.max_length,
             "support": args.support, "incremental": args.incremental or None, "multiplier": args.multiplier,
             "autocast": args.autocast or None, "compile": args.compile or None}
    kwargs = {k: v for k, v in given.items() if v is not None}
    if kwargs.get("normalize") == "none":
        kwargs["normalize"] = None
    if accepted is None:
        accepted = inspect.signature(METHODS[args.method]).parameters if args.method in METHODS else {}
    kwargs.update(pipe_opts)
    wrong = [k for k in kwargs if accepted and k not in accepted]
    if wrong:
        raise SteeringError(f"--{wrong[0].replace('_', '-')} does not apply to --method {args.method}")
    if args.method == "lineas":
        precheck_lineas(kwargs)
    out = Path(args.out)
    if args.pipeline:
        from ..diffusion.grid import load_pipeline

        model, tok = load_pipeline(args.pipeline, args.device, args.dtype), None
    else:
        model, tok = load_model(args.model or DEFAULT_MODEL)
    t0 = time.perf_counter()
    st = lf.fit(model, tok, src, tgt, method=args.method, progress=True, **kwargs)
    wall = secs(t0)
    st.save(out)
    say(f"fitted {args.method} on {len(src)} source / {len(tgt)} target prompts in {wall:.1f} s")
    say(f"nnz {st.nnz():,} of {2 * sum(st.meta['widths'].values()):,} entries; "
        f"{len(st.active_sites())}/{len(st.sites)} sites active")
    say(f"saved {out}")
    return 0
