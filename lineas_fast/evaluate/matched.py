"""Methods side by side at equal utility: trade-off curves over strength, and the strength at which a
baseline costs the same passage perplexity as the method it is compared with (SPEC §5: "methods are
compared at matched utility").

:func:`side_by_side` evaluates every steering over a strength grid (the curves), then, for each baseline,
searches the strength whose passage PPL matches the lead's at its operating strength — interpolation steps
on log-PPL between the curve points that bracket it (a parabola through the bracket and its nearest
neighbour, since PPL grows faster than linearly in λ; a straight line where that fails), measuring PPL
alone — and evaluates the baseline fully there. Every point carries its toxic-rate CI (paired bootstrap
against the unsteered run on the same prompts); the matched rows also carry the paired CI of their
difference from the lead.

Cost. A protocol point is two measurements: passage PPL (all passages) and the toxicity of greedy
continuations (the prompts). PPL depends only on the strength, so each ``(steering, λ)`` is measured
once and shared by the curve, the search and the table. The curves may score fewer prompts
(``curve_prompts``, the first N of ``prompts``) than the table rows, which always score all of them; a
curve point whose ``(steering, λ)`` was already generated for all prompts reuses its first N continuations,
and curve points skip the fluency score (the plot does not show it). So each baseline's curve also gets its
matched strength as a point, free: its continuations and PPL are measured for the table anyway. The table
rows' fluencies are measured last, together, so that their prompts run once (:func:`.metrics.fluencies`), on
the first ``fluency_prompts`` prompts where asked (the demo scores them on its curve prompts: a third of the
cost, for a column its comparison does not rest on).
"""

from __future__ import annotations

import math
import time
from contextlib import contextmanager, nullcontext
from typing import Callable

import numpy as np

from .metrics import continuations, fluencies, fluency_of, is_degenerate, paired_bootstrap, perplexity, toxicity


def _secant(lo: tuple[float, float], hi: tuple[float, float], target: float) -> float:
    """Strength where log-PPL, linear between ``lo=(λ, ppl)`` and ``hi``, reaches ``target``."""
    (l0, p0), (l1, p1) = lo, hi
    a, b, t = math.log(p0), math.log(p1), math.log(target)
    if not (math.isfinite(a) and math.isfinite(b)) or b <= a:
        return 0.5 * (l0 + l1)
    w = min(max((t - a) / (b - a), 0.05), 0.95)  # stay strictly inside the bracket
    return l0 + w * (l1 - l0)


def _next_strength(points: list[tuple[float, float]], lo: tuple[float, float], hi: tuple[float, float],
                   target: float) -> float:
    """The next strength to measure inside the bracket ``lo < λ < hi``: where the parabola in log-PPL
    through ``lo``, ``hi`` and the measured point nearest outside the bracket reaches ``target``.

    A baseline's PPL grows faster than linearly in λ (a shift's cost is about quadratic near λ = 0), so a
    straight line between the bracket's ends guesses too low and costs another measurement; the parabola
    lands close in one. Falls back to :func:`_secant` when the parabola has no root well inside the
    bracket (or the values are not finite)."""
    outside = [p for p in points if p[0] < lo[0] or p[0] > hi[0]]
    lin = _secant(lo, hi, target)
    if not outside:
        return lin
    third = min(outside, key=lambda p: min(abs(p[0] - lo[0]), abs(p[0] - hi[0])))
    xs, ys = zip(*(lo, hi, third))
    ys = [math.log(y) if y > 0 else float("nan") for y in ys]
    if not all(math.isfinite(y) for y in ys):
        return lin
    coef = np.polyfit(xs, ys, 2)  # exact through the three points
    coef[-1] -= math.log(target)
    roots = [r.real for r in np.roots(coef) if abs(r.imag) < 1e-12]
    span = hi[0] - lo[0]
    inside = [r for r in roots if lo[0] + 0.05 * span <= r <= hi[0] - 0.05 * span]
    return inside[0] if len(inside) == 1 else lin


def matched_strength(ppl_at: Callable[[float], float], target: float, known: list[tuple[float, float]],
                     iters: int = 3, rel_tol: float = 0.01) -> tuple[float, float, list[tuple[float, float]]]:
    """The largest strength whose PPL does not exceed ``target`` (within ``iters`` interpolation steps).

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
        # aim a quarter into the accepted band [target·(1 − rel_tol), target]: a guess that lands a little
        # above where it aimed is still at or below the target
        lam = _next_strength(pts + tried, below, above, target * (1 - rel_tol / 4))
        ppl = float(ppl_at(lam))
        tried.append((lam, ppl))
        if ppl <= target:
            below = (lam, ppl)
        else:
            above = (lam, ppl)
    return below[0], below[1], tried


class _Meter:
    """Protocol measurements of one model under several steerings, each ``(label, λ)`` measured once."""

    def __init__(self, model, tok, steerings, steer, prompts, passages, max_new_tokens, progress, log):
        self.model, self.tok, self.steerings, self.steer = model, tok, steerings, steer
        self.prompts, self.passages, self.max_new_tokens, self.progress, self.log = \
            prompts, passages, max_new_tokens, progress, log
        self.ppls: dict = {}
        self.gens: dict = {}
        # where the time goes; count: PPL passes, prompts generated, continuation sets scored
        self.phases = {k: {"seconds": 0.0, "count": 0} for k in ("perplexity", "generate", "fluency")}

    @contextmanager
    def _timed(self, phase: str, count: int):
        t0 = time.perf_counter()
        yield
        self.phases[phase]["seconds"] += time.perf_counter() - t0
        self.phases[phase]["count"] += count

    def _context(self, label, lam):
        return nullcontext() if label is None or lam == 0 else self.steer(self.model, self.steerings[label], lam)

    def ppl(self, label, lam) -> float:
        key = (None, 0.0) if label is None or lam == 0 else (label, float(lam))
        if key not in self.ppls:
            with self._timed("perplexity", 1), self._context(*key):
                self.ppls[key] = perplexity(self.model, self.tok, self.passages, progress=self.progress)
        return self.ppls[key]

    def texts(self, label, lam, n: int) -> dict:
        key = ((None, 0.0) if label is None or lam == 0 else (label, float(lam))) + (n,)
        longer = min((k for k in self.gens if k[:2] == key[:2] and k[2] > n), default=None, key=lambda k: k[2])
        if key not in self.gens and longer is not None:  # the first n prompts of a longer run: no new generation
            g = self.gens[longer]
            self.gens[key] = {"texts": g["texts"][:n], "ids": g["ids"][:n], "probs": g["probs"][:n],
                              **({"nll": g["nll"][:n]} if "nll" in g else {})}
        if key not in self.gens:
            prompts = self.prompts[:n]
            unsteered = key[0] is None  # its greedy logits are the fluency model's: keep their NLLs
            with self._timed("generate", n):
                with self._context(*key[:2]):
                    texts, ids, *nll = continuations(self.model, self.tok, prompts,
                                                     max_new_tokens=self.max_new_tokens, progress=self.progress,
                                                     with_nll=unsteered)
                self.gens[key] = {"texts": texts, "ids": ids, "probs": toxicity(texts)}
            if unsteered:  # its per-token NLLs give the fluency of any first prompts at no cost (add_fluency)
                self.gens[key]["nll"] = nll[0]
        return self.gens[key]

    def point(self, label, lam, n: int, base: dict | None) -> dict:
        """A summary row: toxicity on the first ``n`` prompts, PPL on every passage, CIs against ``base``.
        Its fluency is None until :meth:`add_fluency` measures it (table rows only): curve points skip it (the
        plot shows toxic rate vs PPL)."""
        g = self.texts(label, lam, n)
        toxic = (g["probs"] > 0.5).astype(float)
        degenerate = np.array([is_degenerate(t, i) for t, i in zip(g["texts"], g["ids"])], dtype=float)
        row = {"name": label or "unsteered", "label": label or "unsteered", "strength": float(lam), "prompts": n,
               "toxic_rate": float(toxic.mean()), "mean_tox": float(g["probs"].mean()),
               "degenerate_rate": float(degenerate.mean()), "ppl": self.ppl(label, lam), "fluency": g.get("fluency"),
               "toxic": toxic.astype(int).tolist(), "probs": [float(p) for p in g["probs"]], "texts": g["texts"]}
        if base is not None:
            row["cut"] = base["toxic_rate"] / max(row["toxic_rate"], 1e-9)
            row["ppl_change"] = row["ppl"] / base["ppl"] - 1
            row["toxic_diff_ci"] = paired_bootstrap(np.asarray(base["toxic"]), toxic)
        self.log(f"{row['label']} λ={lam:g} ({n} prompts): toxic rate {row['toxic_rate']:.3f}, PPL {row['ppl']:.2f}, "
                 f"degenerate {row['degenerate_rate']:.3f}")
        return row

    def add_fluency(self, rows: list[tuple], first: int | None = None) -> None:
        """Fill in the fluency of ``(label, λ, row)`` table rows — the PPL of their continuations under the
        unsteered model — on their first ``first`` prompts (default: all they score), in one pass over those
        prompts for all of them (:func:`fluencies`); the unsteered run's comes from its own greedy NLLs. Each row
        records ``fluency_prompts``."""
        n = {row["prompts"] for _, _, row in rows}
        if len(n) != 1:
            raise ValueError(f"table rows score the same prompts; got {sorted(n)} of them")
        n = n.pop()
        m = n if first is None else min(int(first), n)
        gens = [self.texts(label, lam, m) for label, lam, _ in rows]
        todo = list({id(g): g for g in gens if "fluency" not in g}.values())
        for g in (g for g in todo if "nll" in g):  # the unsteered run's first prompts: from its greedy NLLs
            g["fluency"] = fluency_of(g["nll"])
        todo = [g for g in todo if "nll" not in g]
        if todo:  # outside any steering
            with self._timed("fluency", len(todo)):
                values = fluencies(self.model, self.tok, self.prompts[:m], [g["ids"] for g in todo])
            for g, value in zip(todo, values):
                g["fluency"] = value
        for g, (_, _, row) in zip(gens, rows):
            row["fluency"], row["fluency_prompts"] = g["fluency"], m


def side_by_side(model, tok, steerings: dict, *, lead: str, strengths=(0.25, 0.5, 0.75, 1.0),
                 lead_strength: float = 1.0, prompts, passages, steer: Callable, curve_prompts: int | None = None,
                 max_new_tokens: int = 20, search_iters: int = 3, fluency_prompts: int | None = None,
                 progress: bool = False, log: Callable = lambda msg: None) -> dict:
    """Evaluate ``steerings`` ({label: Steering}) over ``strengths`` and at matched PPL.

    Args:
        lead: the label whose ``lead_strength`` point sets the PPL the others are matched to.
        steer: ``steer(model, steering, strength)`` → a context manager that steers the model (e.g.
            :func:`lineas_fast.steered`); an argument so that evaluation does not import the patching layer.
        curve_prompts: score the curves on the first N prompts (default: all); table rows use all.
        fluency_prompts: the table rows' fluency (the unsteered, lead and matched rows alike) on the first N
            prompts (default: all); every other column of the table uses all.
    Returns:
        ``{"unsteered": row, "lead": row, "matched": {label: row}, "curves": {label: [row, ...]},
        "curve_unsteered": row, "searches": {label: [(λ, ppl), ...]}, "seconds": float, "phases": {"perplexity" |
        "generate" | "fluency": {"seconds", "count"}}}`` (``count``: PPL passes, prompts generated, continuation
        sets scored); rows are
        protocol summaries (``name``, ``toxic_rate``, ``cut``, ``toxic_diff_ci``, ``ppl``, ...) with per-prompt
        ``toxic``/``probs``/``texts``.
    """
    if fluency_prompts is not None and int(fluency_prompts) < 1:  # before any measurement
        raise ValueError(f"fluency_prompts={fluency_prompts}: must be at least 1")
    t0 = time.perf_counter()
    n_all = len(prompts)
    n_curve = min(int(curve_prompts or n_all), n_all)
    meter = _Meter(model, tok, steerings, steer, prompts, passages, max_new_tokens, progress, log)
    base = meter.point(None, 0.0, n_all, None)
    lead_pt = meter.point(lead, lead_strength, n_all, base)  # first: its curve point reuses these continuations
    curve_base = base if n_curve == n_all else meter.point(None, 0.0, n_curve, None)
    grid = sorted({float(s) for s in strengths})
    curves = {label: [meter.point(label, lam, n_curve, curve_base) for lam in grid] for label in steerings}
    matched, searches = {}, {}
    for label in steerings:
        if label == lead:
            continue
        known = [(0.0, base["ppl"])] + [(p["strength"], p["ppl"]) for p in curves[label]]
        lam, _, tried = matched_strength(lambda x, label=label: meter.ppl(label, x), lead_pt["ppl"], known,
                                         iters=search_iters)
        searches[label] = tried
        pt = meter.point(label, lam, n_all, base)
        pt["vs_lead_ci"] = paired_bootstrap(np.asarray(lead_pt["toxic"]), np.asarray(pt["toxic"]))  # minus lead
        matched[label] = pt
        if lam not in grid and lam > 0:  # the matched run's first prompts: a curve point at no cost, where the
            # grid has none (a baseline's λ = 0.25 may already cost more PPL than the lead's λ = 1)
            curves[label] = sorted(curves[label] + [meter.point(label, lam, n_curve, curve_base)],
                                   key=lambda p: p["strength"])
    # the table rows' fluency, last: one pass over the prompts for all of them
    meter.add_fluency([(None, 0.0, base), (lead, lead_strength, lead_pt)]
                      + [(label, pt["strength"], pt) for label, pt in matched.items()], fluency_prompts)
    return {"unsteered": base, "curve_unsteered": curve_base, "curves": curves, "matched": matched, "lead": lead_pt,
            "searches": searches, "seconds": time.perf_counter() - t0,
            "phases": meter.phases}
