"""Write a :func:`compare` result as a results folder: ``table.md`` (all points, the best point of each
method within the utility budget, the sparsity sweep), ``results.json`` (every number), and PNG plots:
``tradeoff.png`` (toxic rate vs PPL, one curve per method, points labelled by strength),
``loss_curve.png`` (LinEAS training) and ``sparsity.png`` (per-site nnz and toxicity for the λ sweep).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .. import report
from .compare import best_at_budget

COLORS = {"lineas": "tab:red", "linear_act": "tab:blue", "linear_act_incremental": "tab:cyan",
          "mean_act": "tab:green", "gaussian_ot": "tab:purple", "actadd": "tab:brown"}


def _name(r: dict) -> str:
    s = f"{r['label']} λ={r['strength']:g}"
    return s + (f" ×{r['multiplier']:g}" if r.get("multiplier", 1.0) != 1.0 else "")


def table_row(result: dict, r: dict) -> dict:
    """A point as a table row: its name and its fit's time and active sites."""
    fit = result["fits"][r["label"]]
    return {**r, "name": _name(r), "fit_seconds": fit["train"].get("fit_seconds"),
            "active_sites": sum(1 for v in fit["site_nnz"].values() if v), "total_sites": len(fit["sites"])}


def _table_rows(result: dict, role: str) -> list[dict]:
    # λ=0 rows repeat the unsteered row
    return [table_row(result, r) for r in result["points"] if r.get("role") == role and r["strength"] != 0]


def write_comparison(result: dict, out_dir, max_ppl_change: float = 0.10, max_degenerate: float = 0.05,
                     command: str | None = None) -> list[Path]:
    """Write the results folder; returns the paths written."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    base = result["unsteered"]
    s = result["settings"]
    lines = [f"# Method comparison on {s['model']} ({s['n_source']} source vs {s['n_target']} target prompts)", ""]
    if command:
        lines += ["Produced by:", "", "```", command, "```", ""]
    lines += [f"Evaluated on {s['n_prompts']} held-out toxic prompts ({s['max_new_tokens']} greedy tokens) and "
              f"{s['n_passages']} WikiText passages. λ = strength (λ=0 is the unsteered model); ×m = ActAdd "
              "multiplier at λ=1.", "", "## All points", "",
              report.format_table([{**base, "name": "unsteered"}] + _table_rows(result, "method"), "markdown"), ""]
    best = best_at_budget(result, max_ppl_change, max_degenerate)
    lines += [f"## Best point per method with ΔPPL ≤ {100 * max_ppl_change:+.0f}% and degenerate ≤ "
              f"{100 * max_degenerate:.0f}%", "",
              report.format_table([table_row(result, r) for r in best], "markdown") if best
              else "(no point of any method is within this budget)", ""]
    sparse = _table_rows(result, "sparsity")
    if sparse:
        lines += ["## LinEAS sparsity sweep", "", sparsity_table(result), "",
                  report.format_table(sparse, "markdown"), ""]
    lines += [report.TABLE_NOTE, ""]
    paths = [out / "table.md"]
    paths[0].write_text("\n".join(lines), encoding="utf-8")
    slim = {**result, "unsteered": _slim(base), "points": [_slim(r) for r in result["points"]]}
    paths.append(report.save_json(slim, out / "results.json"))
    paths.append(tradeoff_curves_png(result, out / "tradeoff.png"))
    lineas = [k for k, f in result["fits"].items() if f["method"] == "lineas" and f["role"] == "method"]
    if lineas and result["fits"][lineas[0]]["train"].get("loss"):
        paths.append(report.loss_curve_png(result["fits"][lineas[0]]["train"], out / "loss_curve.png",
                                           title=f"{lineas[0]}: training loss and nnz"))
    if any(f["method"] == "lineas" for f in result["fits"].values()):
        paths.append(sparsity_png(result, out / "sparsity.png"))
    return paths


def _slim(r: dict) -> dict:
    return {k: v for k, v in r.items() if k != "toxic"}


def _sparsity_points(result: dict) -> list[tuple[str, dict, dict]]:
    """(label, fit, row at λ=1) for the default LinEAS fit and its sparsity variants, densest first
    (other LinEAS variants, e.g. another pooling, are not part of the sweep)."""
    out = []
    for label, fit in result["fits"].items():
        if fit["method"] != "lineas" or not (fit["role"] == "sparsity" or label == "lineas"):
            continue
        rows = [r for r in result["points"] if r["label"] == label and r["strength"] == 1.0]
        if rows:
            out.append((label, fit, rows[0]))
    return sorted(out, key=lambda t: -t[1]["nnz"])


def sparsity_table(result: dict) -> str:
    """nnz, identity share, toxic rate, PPL and share of the densest fit's toxicity reduction kept."""
    pts = _sparsity_points(result)
    if not pts:
        return ""
    base = result["unsteered"]["toxic_rate"]
    dense_cut = base - pts[0][2]["toxic_rate"]
    lines = ["| LinEAS fit (λ=1) | l1 | group_l2 | nnz | identity entries | active sites | toxic rate | "
             f"reduction kept vs {pts[0][0]} | ΔPPL |", "|:---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for label, fit, r in pts:
        hp = fit["hyperparams"]
        kept = (base - r["toxic_rate"]) / dense_cut if dense_cut > 0 else float("nan")
        active = sum(1 for v in fit["site_nnz"].values() if v)
        lines.append(f"| {label} | {hp.get('l1', 0):g} | {hp.get('group_l2', 0):g} | {fit['nnz']:,} | "
                     f"{100 * (1 - fit['nnz'] / fit['entries']):.1f}% | {active}/{len(fit['sites'])} | "
                     f"{r['toxic_rate']:.3f} | {'–' if np.isnan(kept) else f'{100 * kept:.0f}%'} | "
                     f"{100 * r['ppl_change']:+.1f}% |")
    return "\n".join(lines)


def tradeoff_curves_png(result: dict, path) -> Path:
    """Toxic rate vs passage PPL, one curve per compared method, each point labelled by its strength:
    left, the usable region (PPL up to twice the unsteered value, linear axis); right, everything (log)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(13, 5.5), dpi=120, layout="constrained")
    zoom, full = fig.subplots(1, 2, width_ratios=[1.6, 1])
    base = result["unsteered"]
    labels = list(dict.fromkeys(r["label"] for r in result["points"] if r.get("role") == "method"))
    for ax, zoomed in ((zoom, True), (full, False)):
        ax.scatter([base["ppl"]], [base["toxic_rate"]], color="black", zorder=5, label="unsteered")
        for i, label in enumerate(labels):
            rows = sorted((r for r in result["points"] if r["label"] == label),
                          key=lambda r: r["strength"] * r.get("multiplier", 1.0))
            color = COLORS.get(label, f"C{i}")
            ax.plot([r["ppl"] for r in rows], [r["toxic_rate"] for r in rows], marker="o", color=color,
                    label=label, linewidth=1.2, markersize=4)
            for r in rows:
                if r["strength"] == 0 or (zoomed and r["ppl"] > 2 * base["ppl"]):
                    continue
                tag = f"{r['strength']:g}" + (f"×{r['multiplier']:g}" if r.get("multiplier", 1.0) != 1 else "")
                ax.annotate(tag, (r["ppl"], r["toxic_rate"]), textcoords="offset points", xytext=(4, 3),
                            fontsize=7, color=color)
        ax.axvline(base["ppl"] * 1.1, color="gray", linestyle=":", linewidth=1, label="+10% PPL")
        ax.grid(alpha=0.3, which="both")
        ax.set_ylabel("toxic rate (lower is better)")
    zoom.set_xlim(base["ppl"] * 0.97, base["ppl"] * 2)
    zoom.set_xlabel("WikiText passage perplexity (lower is better)")
    zoom.set_title("usable region (PPL ≤ 2× unsteered); labels: λ, ×ActAdd multiplier", fontsize=10)
    zoom.legend(fontsize=8)
    full.set_xscale("log")
    full.set_xlabel("passage perplexity (log scale)")
    full.set_title("all points (λ up to 1)", fontsize=10)
    path = Path(path)
    fig.savefig(path)
    return path


def sparsity_png(result: dict, path) -> Path:
    """Left: nnz per site for each LinEAS fit. Right: toxic rate and ΔPPL against total nnz."""
    from matplotlib.figure import Figure

    pts = _sparsity_points(result)
    fig = Figure(figsize=(11, 4.2), dpi=120, layout="constrained")
    left, right = fig.subplots(1, 2)
    for i, (label, fit, _) in enumerate(pts):
        left.plot(range(len(fit["sites"])), [fit["site_nnz"][s] for s in fit["sites"]], color=f"C{i}",
                  label=f"{label} (nnz {fit['nnz']:,})", linewidth=1.2)
    left.set_xlabel("site index (model order)")
    left.set_ylabel("nnz per site")
    left.set_yscale("symlog", linthresh=10)
    left.grid(alpha=0.3)
    left.legend(fontsize=7)
    left.set_title("where the non-identity entries sit", fontsize=10)
    if pts:
        x = [max(f["nnz"], 1) for _, f, _ in pts]
        right.plot(x, [r["toxic_rate"] for _, _, r in pts], marker="o", color="tab:red", label="toxic rate")
        right.axhline(result["unsteered"]["toxic_rate"], color="tab:red", linestyle=":", linewidth=1,
                      label="unsteered toxic rate")
        for (label, _, r), xi in zip(pts, x):
            right.annotate(f"{label}\nΔPPL {100 * r['ppl_change']:+.0f}%", (xi, r["toxic_rate"]), fontsize=6,
                           textcoords="offset points", xytext=(3, 3))
        right.set_xscale("log")
    right.set_xlabel("nnz (entries off identity)")
    right.set_ylabel("toxic rate at λ=1")
    right.grid(alpha=0.3, which="both")
    right.legend(fontsize=7)
    right.set_title("sparsity vs toxicity", fontsize=10)
    path = Path(path)
    fig.savefig(path)
    return path
