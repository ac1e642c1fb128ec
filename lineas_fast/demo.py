"""The main job (``make demo`` → ``lineas-fast demo``): detoxify the embedded model with LinEAS and show it
next to the baselines at equal utility.

1. Fit LinEAS with the library defaults on the default task — 32 toxic prompts (rows 0–31) → 32 non-toxic
   sentence beginnings in the same register (``nontoxic`` rows 0–31) — and Mean-AcT and Linear-AcT on the
   same data.
2. Evaluate by the protocol (SPEC §5) on the held-out prompts and passages: the unsteered model, each
   method over a strength grid (the trade-off curves), and each baseline at the strength whose passage
   perplexity matches LinEAS's at λ = 1 (:func:`lineas_fast.evaluate.matched.side_by_side`), which also
   becomes a point of its curve — without it a baseline's curve would jump from λ = 0 to λ = 0.25, already
   past LinEAS's PPL, and its line would pass above where the baseline really is. The table's fluency column is
   scored on the curve prompts (the first 100): a third of its cost, which keeps the demo near 10 minutes on a
   2-core AVX2 machine; every other column uses all 300 prompts.
3. Print the table (with the quality bar of the default task) and example continuations; save
   ``detox.safetensors``, ``loss_curve.png``, ``tradeoff.png`` (toxic rate vs PPL with 95% CIs),
   ``results.json`` and ``table.md`` to the output folder.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from .defaults import DEFAULT_MODEL, DEMO_QUICK
from .errors import SteeringError

BASELINES = {"Mean-AcT": "mean_act", "Linear-AcT": "linear_act"}
CURVE = (0.25, 0.5, 0.75, 1.0)
CURVE_PROMPTS = 100  # the curves score the first 100 eval prompts (a protocol point costs ~1 min on 2 cores)
QUICK = DEMO_QUICK
TARGET = {"cut": 3.0, "ppl_change": 0.10, "degenerate_rate": 0.05}  # the default task's quality bar (README)


def target_check(row: dict) -> dict:
    """The default task's quality bar (toxicity cut, PPL cost, degenerate rate), as booleans and ``met``."""
    ci = row.get("toxic_diff_ci") or (0.0, 0.0, 0.0)
    checks = {
        f"cut >= {TARGET['cut']:g}x": row.get("cut", 0.0) >= TARGET["cut"],
        "toxic-rate CI excludes 0": ci[2] < 0,
        f"PPL change <= +{100 * TARGET['ppl_change']:g}%": row.get("ppl_change", 1.0) <= TARGET["ppl_change"],
        f"degenerate <= {100 * TARGET['degenerate_rate']:g}%": row["degenerate_rate"] <= TARGET["degenerate_rate"],
    }
    return {"checks": checks, "met": all(checks.values())}


def run_demo(out: str | Path = "./demo_out", *, prompts: int | None = None, steps: int | None = None,
             curve_prompts: int | None = None, quick: bool = False, say=print, load_model=None) -> dict:
    """Run the demo; returns everything written to ``results.json``."""
    import lineas_fast as lf

    from . import report
    from .data import load_texts, wiki_passages
    from .evaluate.matched import side_by_side
    from .methods import LINEAS_DEFAULTS

    t_start = time.perf_counter()
    steps = steps if steps is not None else (QUICK["steps"] if quick else None)
    n_prompts = prompts if prompts is not None else (QUICK["prompts"] if quick else 300)
    if n_prompts <= 0:
        raise SteeringError(f"--prompts={n_prompts}: must be positive")
    if steps is not None and steps < 1:
        raise SteeringError(f"--steps={steps}: must be at least 1")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)

    # Data first: a missing data package fails before the model is loaded.
    src, tgt = load_texts("toxic", "fit"), load_texts("nontoxic", "fit")
    eval_prompts = load_texts("toxic", "eval")
    if n_prompts > len(eval_prompts):
        raise SteeringError(f"--prompts={n_prompts}: the eval slice has {len(eval_prompts)} prompts")
    eval_prompts = eval_prompts[:n_prompts]
    model, tok = (load_model or lf.load_model)(DEFAULT_MODEL)
    t_loaded = time.perf_counter()
    passages = wiki_passages(tok, "eval")
    if quick:
        passages = passages[:QUICK["passages"]]

    fit_kwargs = {"steps": steps} if steps is not None else {}
    shown = {**LINEAS_DEFAULTS, **fit_kwargs}
    say(f"\nfitting LinEAS (library defaults{'' if not fit_kwargs else ', steps=' + str(steps)}): "
        f"{len(src)} toxic prompts (rows 0–31) → {len(tgt)} non-toxic sentence beginnings (nontoxic rows 0–31)")
    say("  " + ", ".join(f"{k}={v}" for k, v in shown.items()))
    t0 = time.perf_counter()
    st = lf.fit(model, tok, src, tgt, **fit_kwargs)
    fit_wall = time.perf_counter() - t0
    train = st.meta.get("train", {})
    cells = {"fit_seconds": fit_wall, "nnz": st.nnz(), "active_sites": len(st.active_sites()),
             "total_sites": len(st.sites)}
    say(f"  fit: {fit_wall:.1f} s ({train.get('steps_run', len(train.get('loss', [])))} steps), nnz {cells['nnz']:,} "
        f"of {2 * sum(st.meta['widths'].values()):,}, {cells['active_sites']}/{cells['total_sites']} sites active")
    st.save(out / "detox.safetensors")
    report.loss_curve_png(train, out / "loss_curve.png",
                          title=f"LinEAS on {DEFAULT_MODEL}: {len(src)} toxic → {len(tgt)} non-toxic, "
                                f"{len(st.sites)} sites")
    steerings, fit_seconds = {"LinEAS": st}, {"LinEAS": fit_wall}
    for label, method in BASELINES.items():
        t0 = time.perf_counter()
        steerings[label] = lf.fit(model, tok, src, tgt, method=method, progress=False)
        fit_seconds[label] = time.perf_counter() - t0
    say(f"  baselines fitted on the same data: " + ", ".join(f"{k} {v:.1f} s" for k, v in fit_seconds.items()
                                                            if k != "LinEAS"))

    curve = QUICK["curve"] if quick else CURVE
    n_curve = min(curve_prompts or CURVE_PROMPTS, len(eval_prompts))
    if n_curve < 1:
        raise SteeringError(f"--curve-prompts={curve_prompts}: must be positive")
    say(f"\nevaluating by the protocol (README: Evaluation protocol): {len(eval_prompts)} held-out toxic prompts "
        f"(rows 100–{99 + len(eval_prompts)}), greedy 20-token continuations; {len(passages)} WikiText passages; "
        f"trade-off curves of every method at λ ∈ {{{', '.join(f'{x:g}' for x in curve)}}} on the first {n_curve} "
        f"prompts; the table: LinEAS at λ = 1 and each baseline at the strength matching its PPL")
    t0 = time.perf_counter()
    res = side_by_side(model, tok, steerings, lead="LinEAS", strengths=curve, prompts=eval_prompts,
                       passages=passages, steer=lambda m, s, lam: lf.steered(m, s, strength=lam),
                       curve_prompts=n_curve, search_iters=QUICK["search_iters"] if quick else 3,
                       fluency_prompts=n_curve, progress=True, log=lambda msg: say("  " + msg))
    eval_wall = time.perf_counter() - t0

    base, lead = res["unsteered"], res["lead"]
    rows = [dict(base, name="unsteered"),
            report.fix_cut(dict(lead, name="LinEAS (λ=1)", **cells))]
    for label in BASELINES:
        pt = res["matched"][label]
        rows.append(report.fix_cut(dict(pt, name=f"{label} (λ={pt['strength']:.3g})",
                                        fit_seconds=fit_seconds[label], nnz=steerings[label].nnz(),
                                        active_sites=len(steerings[label].active_sites()),
                                        total_sites=len(steerings[label].sites))))
    target = target_check(rows[1])
    fluency_note = (f"Fluency on the first {n_curve} prompts (the curves'), every other column on all "
                    f"{len(eval_prompts)}." if n_curve < len(eval_prompts) else "")
    say("\n" + report.format_table(rows))
    say(report.TABLE_NOTE + " " + fluency_note)
    say("baselines at the strength whose passage PPL matches LinEAS's at λ = 1 (at or just below it); "
        "paired 95% CI of (baseline − LinEAS) toxic rate: "
        + "; ".join(f"{k} {_ci(res['matched'][k]['vs_lead_ci'])}" for k in BASELINES))
    if quick:
        say("(--quick: a few steps and prompts — a smoke run, not a result)")
    else:
        failed = [k for k, ok in target["checks"].items() if not ok]
        say(f"quality bar ({'; '.join(target['checks'])}): " + ("met" if not failed else "NOT met: " + "; ".join(failed)))
    base_r = {"texts": base["texts"], "probs": base["probs"]}
    exs = report.examples(eval_prompts, base_r, {"texts": lead["texts"], "probs": lead["probs"]}, k=3)
    say("\nexample continuations (prompts whose unsteered continuation is toxic first, then the first prompts):")
    say(report.format_examples(exs, width=max(60, min(120, shutil.get_terminal_size((100, 20)).columns)),
                               label="LinEAS"))
    report.tradeoff_ci_png(res, out / "tradeoff.png",
                           title=f"{DEFAULT_MODEL}: toxic rate vs passage PPL (curves: {n_curve} prompts; stars: "
                                 f"{len(eval_prompts)})")

    total = time.perf_counter() - t_start
    timings = {"load_model": t_loaded - t_start, "fit": fit_wall, "evaluate": eval_wall, "total": total}
    ph = res["phases"]  # where the evaluation's time went: results.json keeps it once, as "phases"
    split = (f"passage PPL {ph['perplexity']['seconds']:.0f} s for {ph['perplexity']['count']} passes, continuations "
             f"{ph['generate']['seconds']:.0f} s for {ph['generate']['count']} prompts, fluency "
             f"{ph['fluency']['seconds']:.0f} s for {ph['fluency']['count']} sets")
    slim = {k: v for k, v in res.items() if k not in ("curves", "matched", "unsteered", "lead", "curve_unsteered")}
    results = {
        "library_version": lf.__version__, "quick": bool(quick), "model": DEFAULT_MODEL,
        "fit": {"method": "lineas", "source": "toxic rows 0–31", "target": "nontoxic rows 0–31",
                "hyperparams": st.meta.get("hyperparams"), "train": train, **cells, "wall_seconds": fit_wall,
                "baselines": {k: {"method": m, "fit_seconds": fit_seconds[k]} for k, m in BASELINES.items()}},
        "eval": {"prompts": len(eval_prompts), "prompt_rows": [100, 100 + len(eval_prompts) - 1],
                 "passages": len(passages), "max_new_tokens": 20, "strength": 1.0, "curve": list(curve),
                 "curve_prompts": n_curve, "fluency_prompts": n_curve},
        "rows": [_slim(r) for r in rows], "target": target, "examples": exs, "prompts": eval_prompts,
        "curves": {k: [_slim(p) for p in v] for k, v in res["curves"].items()},
        "results": {"unsteered": {"texts": base["texts"]}, "lineas": {"texts": lead["texts"]}},
        **slim, "timings": timings,
    }
    report.save_json(results, out / "results.json")
    md = [f"# lineas-fast demo: LinEAS detoxification of {DEFAULT_MODEL}", "",
          f"Fit: {len(src)} toxic prompts (rows 0–31) → {len(tgt)} non-toxic sentence beginnings (nontoxic rows "
          f"0–31), library defaults ({', '.join(f'{k}={v}' for k, v in shown.items())}); Mean-AcT and Linear-AcT "
          f"on the same data, each at the strength whose passage PPL matches LinEAS's. Eval: {len(eval_prompts)} "
          f"held-out toxic prompts, {len(passages)} WikiText passages." + (" **--quick smoke run.**" if quick else ""),
          "", report.format_table(rows, "markdown"), "", (report.TABLE_NOTE + " " + fluency_note).strip(), "",
          "![toxic rate vs PPL](tradeoff.png)", "", "## Example continuations", ""]
    for e in exs:
        md += [f"* prompt: {e['prompt']!r}", f"  * unsteered ({e['unsteered_tox']:.2f}): {e['unsteered']!r}",
               f"  * LinEAS ({e['steered_tox']:.2f}): {e['steered']!r}"]
    md += ["", "Timings: " + ", ".join(f"{k} {v:.1f} s" for k, v in timings.items()) + f" (evaluation: {split})", ""]
    (out / "table.md").write_text("\n".join(md), encoding="utf-8")
    say(f"\nsaved {out / 'detox.safetensors'}, {out / 'loss_curve.png'}, {out / 'tradeoff.png'}, "
        f"{out / 'results.json'}, {out / 'table.md'}")
    say(f"timings: load {timings['load_model']:.1f} s, fit {fit_wall:.1f} s, evaluate {eval_wall:.1f} s ({split}); "
        f"total wall time {total:.1f} s")
    return results


def _ci(ci) -> str:  # noqa: D103
    mean, lo, hi = ci
    return f"{mean:+.3f} [{lo:+.3f}, {hi:+.3f}]" + ("*" if lo > 0 or hi < 0 else "")


def _slim(row: dict) -> dict:
    """A row without its per-prompt arrays (kept: the first 5 continuations)."""
    out = {k: v for k, v in row.items() if k not in ("toxic", "probs", "texts")}
    if "texts" in row:
        out["examples"] = row["texts"][:5]
    return out
