"""``lineas-fast eval``: its options, :func:`validate` (the torch-free argument checks
:func:`lineas_fast.cli.main` runs first) and :func:`run`, the protocol table of one steering against the
unsteered model (``--steering``); ``--methods`` hands over to :mod:`lineas_fast.cli.compare`."""

from __future__ import annotations

import time
from pathlib import Path

from ..defaults import LINEAS as D
from ..errors import SteeringError
from .common import (check_prompts, load_model, load_steering, model_for, output_dir, positive, read_prompts,
                     refuse_given, say, secs, steering_cells, strengths)

# Options only a --methods comparison uses: with --steering they are refused, not ignored.
METHODS_ONLY = {"multipliers": "--multipliers", "sparsity": "--sparsity", "steps": "--steps", "variant": "--variant",
                "method_strengths": "--method-strengths", "source": "--source", "target": "--target"}


def add_parser(sub, common, fmt) -> None:
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
    e.add_argument("--multipliers", default=None, metavar="LIST",
                   help="--methods: ActAdd multipliers evaluated at strength 1, besides its strength sweep "
                        "[default: 2,4,8]")
    e.add_argument("--sparsity", action="append", default=[], metavar="l1=X[,group_l2=Y,density=D,refit_steps=N]",
                   help="--methods: an extra LinEAS fit with these sparsity settings, evaluated at strength 1 "
                        "(repeat for a sweep, e.g. --sparsity l1=0 --sparsity l1=20,density=0.1,refit_steps=40)")
    e.add_argument("--steps", type=int, default=None, metavar="S",
                   help=f"--methods: LinEAS steps [default: {D['steps']}]")
    e.add_argument("--variant", action="append", default=[], metavar="LABEL=METHOD[:key=value,...]",
                   help="--methods: one more fit to compare under its own label, e.g. "
                        "linear_act_q=linear_act:support=q_0_100 or lineas_mean=lineas:pooling=mean (repeatable)")
    e.add_argument("--method-strengths", action="append", default=[], metavar="LABEL=LIST",
                   help="--methods: extra strengths for one method, e.g. linear_act=0.05,0.1 (repeatable)")
    e.add_argument("--source", default=None, metavar="toxic|PATH",
                   help="--methods: source prompts to fit on (default: the toxic fit slice)")
    e.add_argument("--target", default=None, metavar="nontoxic|PATH",
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
    e.set_defaults(func=run, validate=validate)


def validate(args) -> None:
    """Refuse bad arguments before torch is imported or a model loaded: strengths that are not finite
    numbers, non-positive counts, a prompt file that is not UTF-8 text, an ``--out`` folder that cannot be
    written, and (with --steering) the options only --methods uses."""
    if args.methods is not None:
        from .compare import validate as validate_compare

        validate_compare(args)
        return
    refuse_given(args, METHODS_ONLY, "applies to eval --methods only")
    strengths(args.strengths or "1")
    positive("--prompts", args.prompts)
    positive("--passages", args.passages)
    check_prompts("--prompt-set", args.prompt_set, "eval")
    if args.out is not None:
        output_dir("--out", args.out)


def run(args) -> int:
    from .. import report
    from ..data import wiki_passages
    from ..evaluate import evaluate_steering, summary_row

    if args.methods:
        from .compare import run as run_compare

        return run_compare(args)
    lams = strengths(args.strengths or "1")
    st = load_steering(args.steering)
    prompts = read_prompts("--prompt-set", args.prompt_set, "eval")
    if args.prompts is not None:
        prompts = prompts[:args.prompts]
    model, tok = load_model(model_for(st, args.model))
    st.check_model(model)
    passages = wiki_passages(tok, "eval")
    if args.passages is not None:
        passages = passages[:args.passages]
    if not passages:
        raise SteeringError("no WikiText passages to score (the tokenizer produced none)")
    say(f"evaluating {st.meta.get('method')} steering at strengths {lams} on {len(prompts)} prompts, "
        f"{len(passages)} passages")
    t0 = time.perf_counter()
    res = evaluate_steering(model, tok, st, strengths=lams, prompts=prompts, passages=passages, progress=True)
    base = res["unsteered"]
    cells = steering_cells(st)
    rows = [summary_row("unsteered", base)]
    rows += [report.fix_cut({**summary_row(f"λ={lam:g}", res[lam], base), **cells}) for lam in lams]
    say("\n" + report.format_table(rows))
    say(report.TABLE_NOTE)
    say(f"evaluation took {secs(t0):.1f} s")
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
        say(f"saved {out / 'results.json'}, {out / 'table.md'}, {out / 'tradeoff.png'}")
    return 0
