"""Reporting for the CLI and the demo: protocol tables (aligned text and markdown), the loss-curve and
trade-off PNGs, example continuations, and a JSON dump of every number.

Plots use matplotlib's object API (``Figure`` + Agg canvas), never ``pyplot``: no global backend state,
no display needed.
"""

from __future__ import annotations

import json
import math
import os
import textwrap
from pathlib import Path
from typing import Sequence

import numpy as np

# ------------------------------------------------------------------ table

# Per-prompt arrays of an evaluate_model() result: dropped from JSON (continuations are kept).
_PER_PROMPT = ("toxic", "probs", "degenerate", "ids")


def _num(x, fmt: str) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    return format(x, fmt)


def _ci(row: dict) -> str:
    ci = row.get("toxic_diff_ci")
    if not ci:
        return "–"
    mean, lo, hi = ci
    star = "*" if lo > 0 or hi < 0 else ""
    return f"{mean:+.3f} [{lo:+.3f}, {hi:+.3f}]{star}"


def _cut(row: dict) -> str:
    cut = row.get("cut")
    if cut is None or (isinstance(cut, float) and math.isnan(cut)):
        return "–"
    return "∞" if math.isinf(cut) else f"{cut:.2f}×"


def fix_cut(row: dict) -> dict:
    """Make the cut factor exact at the edges: ∞ when the steered toxic rate is 0 (and the base is not),
    NaN when both are 0 (instead of the huge number a division by an epsilon gives)."""
    if "cut" in row and row["toxic_rate"] == 0:
        row["cut"] = math.inf if row["cut"] > 0 else math.nan
    return row


def _pct(x) -> str:
    return "–" if x is None else f"{100 * x:+.1f}%"


def _nnz(row: dict) -> str:
    if row.get("nnz") is None:
        return "–"
    s = f"{row['nnz']:,}"
    if row.get("active_sites") is not None:
        s += f" ({row['active_sites']}/{row['total_sites']} sites)"
    return s


# (header, right-aligned?, cell(row) -> str)
COLUMNS = [
    ("", False, lambda r: str(r["name"])),
    ("toxic rate", True, lambda r: _num(r["toxic_rate"], ".3f")),
    ("cut", True, lambda r: _cut(r)),
    ("Δ toxic [95% CI]", True, _ci),
    ("mean tox", True, lambda r: _num(r["mean_tox"], ".3f")),
    ("degenerate", True, lambda r: _num(r["degenerate_rate"], ".3f")),
    ("passage PPL", True, lambda r: _num(r["ppl"], ".2f")),
    ("ΔPPL", True, lambda r: _pct(r.get("ppl_change"))),
    ("fluency", True, lambda r: _num(r["fluency"], ".2f")),
    ("fit time", True, lambda r: "–" if r.get("fit_seconds") is None else f"{r['fit_seconds']:.1f} s"),
    ("nnz", True, _nnz),
]

TABLE_NOTE = ("toxic rate: share of continuations with profanity prob > 0.5; cut = unsteered / steered toxic rate; "
              "Δ toxic: steered − unsteered toxic rate, paired-bootstrap 95% CI (* = CI excludes 0); "
              "degenerate: < 3 alphabetic words or a token repeated ≥ 4× in a row; passage PPL: WikiText "
              "passages (~128 tokens, BOS); fluency: PPL of the continuations under the unsteered model; "
              "nnz: (ω, b) entries off identity.")


def table_cells(rows: Sequence[dict]) -> tuple[list[str], list[list[str]]]:
    """Headers and cell strings for summary rows (:func:`lineas_fast.evaluate.summary_row` + extras)."""
    return [c[0] for c in COLUMNS], [[c[2](r) for c in COLUMNS] for r in rows]


def format_table(rows: Sequence[dict], fmt: str = "text") -> str:
    """Render summary rows as an aligned text table (``fmt="text"``) or a markdown table (``"markdown"``).

    A row is a dict with ``name``, ``toxic_rate``, ``mean_tox``, ``degenerate_rate``, ``ppl``,
    ``fluency`` and optionally ``cut``, ``toxic_diff_ci``, ``ppl_change``, ``fit_seconds``, ``nnz``,
    ``active_sites``, ``total_sites``; missing optional cells print as "–".
    """
    headers, cells = table_cells(rows)
    right = [c[1] for c in COLUMNS]
    if fmt == "markdown":
        lines = ["| " + " | ".join(h or "model" for h in headers) + " |",
                 "|" + "|".join("---:" if r else ":---" for r in right) + "|"]
        lines += ["| " + " | ".join(row) + " |" for row in cells]
        return "\n".join(lines)
    if fmt != "text":
        raise ValueError(f"fmt={fmt!r}: expected 'text' or 'markdown'")
    widths = [max(len(h), *(len(row[i]) for row in cells)) for i, h in enumerate(headers)]

    def line(vals):
        return "  ".join(v.rjust(w) if r else v.ljust(w) for v, w, r in zip(vals, widths, right)).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(headers), rule, *(line(row) for row in cells)])


# ------------------------------------------------------------------ examples


def pick_examples(base: dict, k: int = 3) -> list[int]:
    """Indices of the first ``k`` prompts whose unsteered continuation is toxic, topped up with the
    first prompts when fewer than ``k`` are."""
    toxic = [i for i, p in enumerate(base["probs"]) if p > 0.5][:k]
    rest = [i for i in range(len(base["texts"])) if i not in toxic]
    return (toxic + rest)[:k]


def examples(prompts: Sequence[str], base: dict, steered: dict, k: int = 3) -> list[dict]:
    """Example continuations (same prompts, unsteered vs steered) with their toxicity probs."""
    return [{"index": i, "prompt": prompts[i],
             "unsteered": base["texts"][i], "unsteered_tox": float(base["probs"][i]),
             "steered": steered["texts"][i], "steered_tox": float(steered["probs"][i])}
            for i in pick_examples(base, k)]


def format_examples(exs: Sequence[dict], width: int = 100, label: str = "steered") -> str:
    """Human-readable example continuations, wrapped to ``width``."""
    out = []
    pad = max(len("unsteered"), len(label))
    for n, e in enumerate(exs, 1):
        out.append(textwrap.fill(f"[{n}] prompt: {e['prompt']!r}", width, subsequent_indent="    "))
        for key, name in (("unsteered", "unsteered"), ("steered", label)):
            head = f"    {name.ljust(pad)} (tox {e[key + '_tox']:.2f}): "
            out.append(textwrap.fill(head + repr(e[key]), width, subsequent_indent=" " * len(head)))
    return "\n".join(out)


def side_by_side(left: str, right: str, width: int) -> list[str]:
    """Two texts wrapped into columns of ``width`` characters each, as lines."""
    a = textwrap.wrap(left, width) or [""]
    b = textwrap.wrap(right, width) or [""]
    n = max(len(a), len(b))
    a += [""] * (n - len(a))
    b += [""] * (n - len(b))
    return [f"{x.ljust(width)} │ {y}" for x, y in zip(a, b)]


# ------------------------------------------------------------------ plots


def loss_curve_png(train: dict, path: str | os.PathLike, title: str = "LinEAS training") -> Path:
    """Plot ``train["loss"]`` per step (left axis, log scale when it spans > 10×) with ``train["nnz"]``
    on a twin right axis; writes a PNG and returns its path. Steps a ``partial`` fit ran at a strength
    λ < 1 (``train["strength"]``) are drawn as separate dots: their loss is against another target."""
    from matplotlib.figure import Figure

    loss = [float(x) for x in train.get("loss", [])]
    nnz = [int(x) for x in train.get("nnz", [])]
    steps = np.arange(1, len(loss) + 1)
    fig = Figure(figsize=(7, 4), dpi=120, layout="constrained")
    ax = fig.subplots()
    full = np.asarray(train.get("strength") or [1.0] * len(loss), dtype=float) == 1.0  # λ of each step
    y = np.array(loss)
    ax.plot(steps[full], y[full], color="tab:blue", marker="o" if len(loss) <= 20 else None,
            label="W-loss" if full.all() else "W-loss, steps at λ = 1")
    if not full.all():
        ax.plot(steps[~full], y[~full], linestyle="none", marker=".", color="tab:gray",
                label="steps at λ < 1 (interpolated target)")
        ax.legend(loc="upper right", fontsize=8)
    ax.set_xlabel("step")
    ax.set_ylabel("Wasserstein loss (sum over sites)", color="tab:blue")
    ax.tick_params(axis="y", labelcolor="tab:blue")
    from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator, NullFormatter

    if loss and min(loss) > 0 and max(loss) / min(loss) > 10:
        ax.set_yscale("log")
        ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.yaxis.set_minor_formatter(NullFormatter())
    ax.grid(alpha=0.3)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if nnz:
        ax2 = ax.twinx()
        ax2.plot(steps, nnz, color="tab:orange", linestyle="--", label="nnz")
        ax2.set_ylabel("nnz: (ω, b) entries off identity", color="tab:orange")
        ax2.tick_params(axis="y", labelcolor="tab:orange")
        ax2.set_ylim(bottom=0, top=max(max(nnz) * 1.05, 1))
    ax.set_title(title, fontsize=10)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path


def tradeoff_png(rows: Sequence[dict], path: str | os.PathLike, title: str = "toxicity vs perplexity") -> Path:
    """Toxic rate (y) against passage PPL (x), one labelled point per row (e.g. a strength sweep)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4), dpi=120, layout="constrained")
    ax = fig.subplots()
    x = [r["ppl"] for r in rows]
    y = [r["toxic_rate"] for r in rows]
    ax.plot(x, y, marker="o", color="tab:red")
    for r, xi, yi in zip(rows, x, y):
        ax.annotate(str(r["name"]), (xi, yi), textcoords="offset points", xytext=(5, 5), fontsize=8)
    ax.set_xlabel("WikiText passage perplexity")
    ax.set_ylabel("toxic rate")
    ax.grid(alpha=0.3)
    ax.set_title(title, fontsize=10)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path


def tradeoff_ci_png(res: dict, path: str | os.PathLike, title: str = "toxic rate vs passage PPL",
                    zoom: float = 1.6) -> Path:
    """Trade-off curves of :func:`lineas_fast.evaluate.matched.side_by_side`: toxic rate (with its paired-
    bootstrap 95% CI as an error bar) against passage PPL for each method over its strength grid, starting at
    the unsteered point; the matched-PPL baseline points as stars; the +10 % PPL budget as a dotted line.
    Left: the usable region (PPL up to ``zoom``× unsteered); right: every point, log PPL."""
    from matplotlib.figure import Figure

    base = res.get("curve_unsteered", res["unsteered"])
    fig = Figure(figsize=(12, 5), dpi=120, layout="constrained")
    left, full = fig.subplots(1, 2, width_ratios=[1.5, 1])
    colors = {"LinEAS": "tab:red", "Mean-AcT": "tab:green", "Linear-AcT": "tab:blue"}
    for ax, zoomed in ((left, True), (full, False)):
        ax.scatter([base["ppl"]], [base["toxic_rate"]], color="black", zorder=5, label="unsteered")
        for i, (label, pts) in enumerate(res["curves"].items()):
            color = colors.get(label, f"C{i}")
            pts = [base] + sorted(pts, key=lambda p: p["strength"])
            x = [p["ppl"] for p in pts]
            y = [p["toxic_rate"] for p in pts]
            err = [[max(0.0, -(p.get("toxic_diff_ci") or (0, 0, 0))[1] + (p.get("toxic_diff_ci") or (0, 0, 0))[0])
                    for p in pts],
                   [max(0.0, (p.get("toxic_diff_ci") or (0, 0, 0))[2] - (p.get("toxic_diff_ci") or (0, 0, 0))[0])
                    for p in pts]]
            ax.errorbar(x, y, yerr=err, marker="o", color=color, label=label, linewidth=1.2, markersize=4,
                        capsize=2, elinewidth=0.8)
            for p in pts[1:]:
                if not zoomed or p["ppl"] <= zoom * base["ppl"]:
                    ax.annotate(f"{p['strength']:g}", (p["ppl"], p["toxic_rate"]), textcoords="offset points",
                                xytext=(4, 3), fontsize=7, color=color)
            m = res.get("matched", {}).get(label)
            if m is not None:
                ax.scatter([m["ppl"]], [m["toxic_rate"]], marker="*", s=140, color=color, edgecolor="black",
                           zorder=6, label=f"{label} at LinEAS's PPL (λ={m['strength']:.2g})")
        ax.axvline(base["ppl"] * 1.1, color="gray", linestyle=":", linewidth=1, label="+10% PPL")
        ax.grid(alpha=0.3, which="both")
        ax.set_ylabel("toxic rate (lower is better)")
        ax.set_ylim(bottom=-0.005)  # a rate is never below 0 (a CI bar of a few prompts can reach there)
    left.set_xlim(base["ppl"] * 0.95, base["ppl"] * zoom)
    left.set_xlabel("WikiText passage perplexity (lower is better)")
    left.set_title(f"{title}\nusable region; labels: strength λ; bars: 95% CI", fontsize=9)
    left.legend(fontsize=7)
    full.set_xscale("log")
    full.set_xlabel("passage perplexity (log scale)")
    full.set_title("all points", fontsize=9)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path


def site_support_png(steering, path: str | os.PathLike, title: str = "which sites the fit kept") -> Path:
    """Per layer, the share of each site kind's (ω, b) entries off identity — one line per kind (e.g.
    ``input_layernorm``, ``post_attention_layernorm``), x = block index — so a sparse fit shows at a glance
    which layers and sites survive; the legend counts the active sites of each kind."""
    import re

    from matplotlib.figure import Figure

    kinds: dict[str, list[tuple[int, float]]] = {}
    for i, site in enumerate(steering.sites):
        m = re.search(r"\.(\d+)\.(.+)$", site)
        layer, kind = (int(m.group(1)), m.group(2)) if m else (i, site)
        d = steering.scale[site].numel()
        kinds.setdefault(kind, []).append((layer, steering.nnz(site) / (2 * d)))
    fig = Figure(figsize=(8, 3.8), dpi=120, layout="constrained")
    ax = fig.subplots()
    for k, (kind, pts) in enumerate(kinds.items()):
        pts.sort()
        active = sum(1 for _, f in pts if f > 0)
        ax.plot([p[0] for p in pts], [100 * p[1] for p in pts], marker="o", markersize=3, color=f"C{k}",
                label=f"{kind} ({active}/{len(pts)} active)")
    total = sum(2 * steering.scale[s].numel() for s in steering.sites)
    ax.set_xlabel("block (layer) index")
    ax.set_ylabel("entries off identity (%)")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title(f"{title}: nnz {steering.nnz():,} of {total:,} ({100 * steering.nnz() / max(total, 1):.1f}%)",
                 fontsize=9)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path


# ------------------------------------------------------------------ JSON


def jsonable(obj):
    """Recursively convert numpy / torch scalars and arrays, tuples and non-string keys to plain JSON."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return jsonable(obj.tolist())
    if isinstance(obj, (np.floating, float)):
        f = float(obj)
        return f if math.isfinite(f) else None
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, np.bool_):
        return bool(obj)
    if hasattr(obj, "tolist") and hasattr(obj, "dtype"):  # torch tensors
        return jsonable(obj.tolist())
    if isinstance(obj, Path):
        return str(obj)
    return obj


def compact_result(r: dict) -> dict:
    """An evaluate_model() result without its big per-prompt arrays (continuation texts are kept)."""
    return {k: v for k, v in r.items() if k not in _PER_PROMPT}


def save_json(obj, path: str | os.PathLike) -> Path:
    """Write ``jsonable(obj)`` as indented UTF-8 JSON."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(jsonable(obj), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return path
