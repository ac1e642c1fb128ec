"""Methods side by side at equal utility: trade-off curves over strength, and the strength at which a
baseline costs the same passage perplexity as the method it is compared with (SPEC §5: "methods are
compared at matched utility").

:func:`side_by_side` evaluates the unsteered model once, every steering over a strength grid (the curves),
then, for each baseline, searches the strength whose passage PPL matches the lead's at its operating
strength — by secant steps on log-PPL between the curve points that bracket it, measuring PPL alone (a
fraction of a full evaluation) — and evaluates the baseline fully there. Every point carries its toxic-rate
CI (paired bootstrap against the unsteered run), and the matched rows carry the paired CI of their
difference from the lead.
"""

from __future__ import annotations

import math
import time
from typing import Callable

import numpy as np

from .metrics import evaluate_model, fluency, paired_bootstrap, perplexity, summary_row


def _secant(lo: tuple[float, float], hi: tuple[float, float], target: float) -> float:
    """Strength where log-PPL, linear between ``lo=(λ, ppl)`` and ``hi``, reaches ``target``."""
    (l0, p0), (l1, p1) = lo, hi
    a, b, t = math.log(p0), math.log(p1), math.log(target)
    if not (math.isfinite(a) and math.isfinite(b)) or b <= a:
        return 0.5 * (l0 + l1)
    w = min(max((t - a) / (b - a), 0.05), 0.95)  # stay strictly inside the bracket
    return l0 + w * (l1 - l0)


def matched_strength(ppl_at: Callable[[float], float], target: float, known: list[tuple[float, float]],
                     iters: int = 3, rel_tol: float = 0.01) -> tuple[float, float, list[tuple[float, float]]]:
    """The largest strength whose PPL does not exceed ``target`` (within ``iters`` secant steps).

    Args:
        ppl_at: passage PPL of the steered model at a strength (called ``iters`` times at most).
        target: the PPL to match (e.g. the lead method's at λ = 1).
        known: ``(λ, ppl)`` already measured, including ``(0, unsteered ppl)``.
    Returns:
        ``(λ, its ppl, every (λ, ppl) measured here)``. Stops early once a strength is within ``rel_tol``
        of the target (below it).
    """
    pts = sorted(known)
    below = max((p for p in pts if p[1] <= target), default=pts[0])
    above = min((p for p in pts if p[0] > below[0] and p[1] > target), default=None)
    tried = []
    for _ in range(iters if above is not None else 0):
        if below[1] >= target * (1 - rel_tol):
            break
        lam = _secant(below, above, target)
        ppl = float(ppl_at(lam))
        tried.append((lam, ppl))
        if ppl <= target:
            below = (lam, ppl)
        else:
            above = (lam, ppl)
    return below[0], below[1], tried


def side_by_side(model, tok, steerings: dict, *, lead: str, strengths=(0.25, 0.5, 0.75, 1.0),
                 lead_strength: float = 1.0, prompts, passages, steer: Callable, max_new_tokens: int = 20,
                 search_iters: int = 3, progress: bool = False, log: Callable = lambda msg: None) -> dict:
    """Evaluate ``steerings`` ({label: Steering}) over ``strengths`` and at matched PPL.

    Args:
        lead: the label whose ``lead_strength`` point sets the PPL the others are matched to.
        steer: ``steer(model, steering, strength)`` → a context manager that steers the model (e.g.
            :func:`lineas_fast.steered`); kept as an argument so evaluation does not import the patching layer.
    Returns:
        ``{"unsteered": point, "curves": {label: [point, ...]}, "matched": {label: point}, "lead": point,
        "searches": {label: [(λ, ppl), ...]}, "seconds": float}``; a point is a :func:`summary_row` plus
        ``label``, ``strength``, ``toxic`` (per-prompt flags) and example texts.
    """
    t0 = time.perf_counter()

    def point(label, st, lam):
        if st is None or lam == 0:
            r = evaluate_model(model, tok, prompts, passages, None, max_new_tokens, progress)
        else:
            with steer(model, st, lam):
                r = evaluate_model(model, tok, prompts, passages, None, max_new_tokens, progress)
        r["fluency"] = fluency(model, tok, prompts, r["ids"])
        row = summary_row(label, r, None if label == "unsteered" else base_r)
        if label != "unsteered":
            row["toxic_diff_ci"] = paired_bootstrap(base_r["toxic"], r["toxic"])
        row.update(label=label, strength=float(lam), toxic=np.asarray(r["toxic"]).astype(int).tolist(),
                   probs=[float(x) for x in r["probs"]], texts=r["texts"])
        log(f"{label} λ={lam:g}: toxic rate {row['toxic_rate']:.3f}, PPL {row['ppl']:.2f}, "
            f"degenerate {row['degenerate_rate']:.3f}")
        return row

    base_r = None
    base = point("unsteered", None, 0.0)
    base_r = {"toxic": np.asarray(base["toxic"], dtype=float), "toxic_rate": base["toxic_rate"], "ppl": base["ppl"]}
    grid = sorted({float(s) for s in strengths} | {float(lead_strength)})
    curves = {label: [point(label, st, lam) for lam in (grid if label == lead else sorted(set(strengths)))]
              for label, st in steerings.items()}
    lead_pt = next(p for p in curves[lead] if p["strength"] == lead_strength)
    matched, searches = {}, {}
    for label, st in steerings.items():
        if label == lead:
            continue
        known = [(0.0, base["ppl"])] + [(p["strength"], p["ppl"]) for p in curves[label]]

        def ppl_at(lam, st=st):
            with steer(model, st, lam):
                return perplexity(model, tok, passages)

        lam, _, tried = matched_strength(ppl_at, lead_pt["ppl"], known, iters=search_iters)
        searches[label] = tried
        done = next((p for p in curves[label] if p["strength"] == lam), None)
        pt = done if done is not None else (base if lam == 0 else point(label, st, lam))
        pt = dict(pt, label=label)
        d = paired_bootstrap(np.asarray(lead_pt["toxic"]), np.asarray(pt["toxic"]))  # baseline − lead
        pt["vs_lead_ci"] = d
        matched[label] = pt
    return {"unsteered": base, "curves": curves, "matched": matched, "lead": lead_pt, "searches": searches,
            "seconds": time.perf_counter() - t0}
