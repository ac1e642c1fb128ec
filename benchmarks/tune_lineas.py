"""Sweep LinEAS (and Mean-AcT) settings on the default task and append protocol numbers to a JSONL.

Each line: the settings, fit time, nnz, and for every strength the toxic rate, mean toxicity,
degenerate rate and WikiText-passage PPL on the eval slice (SPEC §5; fluency is left out here to keep
sweeps affordable on 2 cores — the demo reports it). The unsteered baseline is computed once per run.

Usage:
    python benchmarks/tune_lineas.py --out benchmarks/tuning.jsonl \
        --config '{"method": "lineas", "pooling": "tokens", "steps": 50}' --strengths 0.5,1
"""

from __future__ import annotations

import argparse
import json
import os
import re
import time

import numpy as np

import torch

import lineas_fast as lf
from lineas_fast import evaluate as E
from lineas_fast.data import wiki_passages


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="JSONL file to append results to")
    ap.add_argument("--config", action="append", help="JSON dict of lf.fit kwargs (repeatable)")
    ap.add_argument("--render", action="store_true", help="print --out as a markdown table and exit")
    ap.add_argument("--plot", metavar="PNG", help="draw every curve of --out (settings measured at 3+ strengths) "
                                                  "as toxic rate vs PPL with CIs, and exit")
    ap.add_argument("--frontier", metavar="PNG", help="draw every point of --out (any settings, λ ≤ 1) as toxic "
                                                      "rate vs ΔPPL, one marker per method, and exit")
    ap.add_argument("--strengths", default="1", help="comma-separated strengths")
    ap.add_argument("--target", default="nontoxic", help="built-in target set of the fit (default: nontoxic)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--prompts", type=int, default=300)
    ap.add_argument("--baseline", action="store_true", help="also record the unsteered row")
    ap.add_argument("--baseline-cache", help="JSON file caching the unsteered run (computed if missing)")
    ap.add_argument("--save", metavar="DIR", help="also save each fitted steering as DIR/<settings>.safetensors")
    args = ap.parse_args()
    if args.render:
        print(render(args.out))
        return
    if args.plot:
        print(plot(args.out, args.plot))
        return
    if args.frontier:
        print(frontier(args.out, args.frontier))
        return
    if not args.config:
        ap.error("--config is required (unless --render)")
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tok = lf.load_model("smollm2-135m")
    src, tgt = lf.data.load_texts("toxic"), lf.data.load_texts(args.target)
    prompts = lf.data.load_texts("toxic", "eval")[: args.prompts]
    passages = wiki_passages(tok, "eval")
    base = _baseline(args.baseline_cache, model, tok, prompts, passages)
    if args.baseline:
        _append(args.out, {"config": "unsteered", **_metrics(base)})
    for raw in args.config:
        cfg = json.loads(raw)
        t0 = time.perf_counter()
        st = lf.fit(model, tok, src, tgt, progress=False, **cfg)
        fit_s = time.perf_counter() - t0
        if args.save:
            os.makedirs(args.save, exist_ok=True)
            name = settings_text({k: v for k, v in cfg.items() if k != "sites"}, "_") or "defaults"
            st.save(os.path.join(args.save, name.replace("/", "-") + ".safetensors"))
        for lam in [float(x) for x in args.strengths.split(",")]:
            with lf.steered(model, st, strength=lam):
                r = E.evaluate_model(model, tok, prompts, passages)
            d, lo, hi = E.paired_bootstrap(base["toxic"], r["toxic"])
            train = st.meta.get("train", {})
            row = {"config": cfg, "target": args.target, "strength": lam, "steps_run": train.get("steps_run"),
                   "step_s": round(float(np.median(train["step_seconds"])), 3) if train.get("step_seconds") else None, "fit_s": round(fit_s, 1), "nnz": st.nnz(),
                   "active_sites": len(st.active_sites()), "restarts": train.get("restarts", []), "first_loss": (train.get("loss") or [None])[0], "final_loss": (train.get("loss") or [None])[-1],
                   **_metrics(r), "cut": base["toxic_rate"] / max(r["toxic_rate"], 1e-9),
                   "ppl_change": r["ppl"] / base["ppl"] - 1, "toxic_diff_ci": [lo, hi],
                   "examples": r["texts"][:3]}
            _append(args.out, row)
            print(json.dumps({k: v for k, v in row.items() if k != "examples"}), flush=True)


def render(path: str) -> str:
    """Markdown table of a results JSONL, one row per (settings, strength)."""
    lines = ["| target | method | settings | λ | toxic rate | cut | Δtoxic 95% CI | degenerate | passage PPL | ΔPPL | nnz "
             "| fit s | s/step |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for line in open(path):
        r = json.loads(line)
        if r["config"] == "unsteered":
            lines.append(f"| – | unsteered | – | 0 | {r['toxic_rate']:.3f} | – | – | {r['degenerate_rate']:.3f} | "
                         f"{r['ppl']:.1f} | – | 0 | – | – |")
            continue
        cfg = dict(r["config"])
        method = cfg.pop("method", "lineas")
        settings = settings_text(cfg) or "defaults"
        ppl = f"{r['ppl']:.1f}" if r["ppl"] < 1e4 else f"{r['ppl']:.1e}"
        dppl = f"{100 * r['ppl_change']:+.1f}%" if r["ppl_change"] < 100 else "diverged"
        cut = f"{r['cut']:.2f}×" if r["cut"] < 100 else "∞"
        lo, hi = r["toxic_diff_ci"]
        step = r.get("step_s")
        lines.append(f"| {r.get('target', 'wiki')} | {method} | {settings} | {r['strength']:g} | {r['toxic_rate']:.3f} | "
                     f"{cut} | [{lo:+.3f}, {hi:+.3f}] | {r['degenerate_rate']:.3f} | {ppl} | {dppl} | {r['nnz']} | "
                     f"{r['fit_s']} | {'–' if step is None else step} |")
    return "\n".join(lines)


def settings_text(cfg: dict, sep: str = ", ") -> str:
    """``k=v`` of every setting, joined by ``sep``; an explicit list of sites in short (:func:`sites_text`)."""
    return sep.join(f"{k}={sites_text(v) if k == 'sites' else v}" for k, v in cfg.items())


def sites_text(sites) -> str:
    """A preset as is; an explicit site list with the block indices taken out of each site and kept as ranges,
    ``+`` between kinds: the 30 ``model.layers.{i}.self_attn.o_proj:in`` → ``self_attn.o_proj:in[0–29]``."""
    if isinstance(sites, str):
        return sites
    blocks: dict = {}
    for site in sites:
        m = re.fullmatch(r".*?\.(\d+)\.(.+)", site)
        name, index = (m.group(2), int(m.group(1))) if m else (site, None)
        blocks.setdefault(name, [])
        if index is not None:
            blocks[name].append(index)
    parts = []
    for name, idx in blocks.items():
        runs: list = []
        for b in sorted(set(idx)):
            if runs and b == runs[-1][1] + 1:
                runs[-1][1] = b
            else:
                runs.append([b, b])
        spans = ",".join(f"{a}" if a == b else f"{a}–{b}" for a, b in runs)
        parts.append(f"{name}[{spans}]" if spans else name)
    return "+".join(parts)


def nontoxic_rows(path, display: bool = False):
    """``(row, method, settings without "method")`` for every steered row of a results JSONL whose fit targeted
    the default ``nontoxic`` set (the rows :func:`plot` and :func:`frontier` draw, and
    ``utility_corpora.py`` reads). ``method`` is ``lf.fit``'s name (``"mean_act"``), or with ``display`` the
    demo's (``"Mean-AcT"``)."""
    from lineas_fast.demo import BASELINES

    names = {"lineas": "LinEAS", **{method: label for label, method in BASELINES.items()}} if display else {}
    for line in open(path):
        r = json.loads(line)
        if r["config"] == "unsteered" or r.get("target", "wiki") != "nontoxic":
            continue
        cfg = dict(r["config"])
        method = cfg.pop("method", "lineas")
        yield r, names.get(method, method), cfg


def plot(path: str, png: str):
    """The curves of a results JSONL — each (target, method, settings) measured at 3+ strengths — drawn by
    :func:`lineas_fast.report.tradeoff_ci_png`; the unsteered point is recovered from any row (its toxic
    rate is ``toxic_rate × cut``, its PPL ``ppl / (1 + ppl_change)``)."""
    from lineas_fast import report

    groups: dict = {}
    for r, method, cfg in nontoxic_rows(path, display=True):
        label = method + ("" if not cfg else " (" + settings_text(cfg) + ")")
        groups.setdefault(label, {})[r["strength"]] = r
    curves = {k: v for k, v in groups.items() if len(v) >= 3}
    any_row = next(iter(next(iter(curves.values())).values()))
    base_rate = any_row["toxic_rate"] * any_row["cut"]
    base = {"ppl": any_row["ppl"] / (1 + any_row["ppl_change"]), "toxic_rate": base_rate}
    res = {"unsteered": base, "curves": {
        label: [{"strength": lam, "ppl": r["ppl"], "toxic_rate": r["toxic_rate"],
                 "toxic_diff_ci": (r["toxic_rate"] - base_rate, *r["toxic_diff_ci"])} for lam, r in pts.items()]
        for label, pts in curves.items()}}
    return report.tradeoff_ci_png(res, png, title="every curve of " + os.path.basename(path) + " (300 prompts)",
                                  zoom=1.15)


DEFAULT_CONFIGS = {"library defaults": {"transport_last": 0.3333, "preserve": 2},
                   "defaults until 2026-12-05": {}}
"""Row configs that are a set of library defaults: the current ones (measured with both settings named, so the
rows stay true when the defaults move) and the previous ones (measured as ``{}`` while they were the defaults)."""


def frontier_points(path: str, max_change: float = 0.25) -> tuple[dict, float]:
    """``({label: [(ΔPPL %, toxic rate), ...]}, unsteered toxic rate)`` of every nontoxic-target row of a results
    JSONL at λ ≤ 1 and ΔPPL ≤ ``max_change``. Labels: the method's display name; LinEAS rows split into
    ``"LinEAS (library defaults)"``, ``"LinEAS (defaults until 2026-12-05)"`` (:data:`DEFAULT_CONFIGS`) and
    ``"LinEAS (any settings)"``."""
    groups: dict = {}
    base_rate = None
    for r, label, cfg in nontoxic_rows(path, display=True):
        base_rate = r["toxic_rate"] * r["cut"]
        if r["strength"] > 1 or r["ppl_change"] > max_change:
            continue
        if label == "LinEAS":
            label += next((f" ({name})" for name, c in DEFAULT_CONFIGS.items() if cfg == c), " (any settings)")
        groups.setdefault(label, []).append((100 * r["ppl_change"], r["toxic_rate"]))
    if base_rate is None:
        raise SystemExit(f"{path}: no nontoxic-target rows to draw")
    return groups, base_rate


def frontier(path: str, png: str, max_change: float = 0.25) -> str:
    """:func:`frontier_points` drawn as toxic rate vs ΔPPL, one marker per method, the library defaults large:
    shows at a glance whether any setting moved off the trade-off curve the others share."""
    from matplotlib.figure import Figure

    groups, base_rate = frontier_points(path, max_change)
    style = {"LinEAS (any settings)": dict(color="C0", marker="o", s=14, alpha=0.45),
             "LinEAS (library defaults)": dict(color="C3", marker="*", s=120, zorder=4),
             "LinEAS (defaults until 2026-12-05)": dict(color="C4", marker="P", s=60, zorder=4),
             "Mean-AcT": dict(color="C1", marker="s", s=36, zorder=3),
             "Linear-AcT": dict(color="C2", marker="^", s=40, zorder=3)}
    fig = Figure(figsize=(8, 5.5), dpi=120, layout="constrained")
    ax = fig.subplots()
    ax.scatter([0], [base_rate], color="black", zorder=5, label="unsteered")
    for i, (label, pts) in enumerate(sorted(groups.items())):
        kw = style.get(label, dict(color=f"C{i + 4}", marker="Dv"[i % 2], s=30))
        ax.scatter(*zip(*pts), label=f"{label}: {len(pts)} points", **kw)
    ax.axvline(10, color="gray", linestyle=":", linewidth=1, label="+10 % PPL")
    ax.axhline(base_rate / 3, color="gray", linestyle="--", linewidth=1, label="3× cut")
    ax.set_xlabel("passage perplexity change (%)")
    ax.set_ylabel("toxic rate (300 eval prompts; each point's 95 % CI about ±0.05)")
    ax.set_title(f"every measured point of {os.path.basename(path)} (λ ≤ 1, ΔPPL ≤ {100 * max_change:.0f} %)",
                 fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.savefig(png)
    return png


def _baseline(cache, model, tok, prompts, passages) -> dict:
    """The unsteered run, read from ``cache`` when it was computed for the same prompts."""
    if cache and os.path.isfile(cache):
        saved = json.load(open(cache))
        if saved["prompts"] == prompts:
            return {**saved, "toxic": np.asarray(saved["toxic"])}
    base = E.evaluate_model(model, tok, prompts, passages)
    if cache:
        keep = {k: base[k] for k in ("toxic_rate", "mean_tox", "degenerate_rate", "ppl")}
        json.dump({**keep, "toxic": base["toxic"].tolist(), "prompts": prompts}, open(cache, "w"))
    return base


def _metrics(r: dict) -> dict:
    return {k: round(r[k], 4) for k in ("toxic_rate", "mean_tox", "degenerate_rate", "ppl")}


def _append(path: str, row: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
