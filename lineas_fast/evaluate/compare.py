"""``compare``: every method fitted on the same fit slice, applied by the same runtime (hooks), and
evaluated by the same protocol on the same held-out prompts — the toxicity-vs-perplexity comparison.

Each method is swept over strengths (0 is the shared unsteered row: strength 0 is exactly the identity);
ActAdd also over multipliers at strength 1; LinEAS optionally over sparsity settings (``sparsity``) at
strength 1 for the nnz / toxicity / PPL trade-off. With ``out_dir`` every fitted artifact and every
evaluated point is written as soon as it exists, and a rerun with the same settings reuses them, so an
interrupted hour-long comparison resumes where it stopped.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import numpy as np

from ..defaults import SPARSITY_OPTIONS
from ..errors import SteeringError
from .metrics import evaluate_model, fluency, paired_bootstrap, summary_row

DEFAULT_METHODS = ("lineas", "linear_act", "linear_act_incremental", "mean_act", "gaussian_ot", "actadd")
STRENGTHS = (0.0, 0.25, 0.5, 0.75, 1.0)
MULTIPLIERS = (2.0, 4.0, 8.0)  # ActAdd, at strength 1 (the strength sweep already covers 0–1)


def _fit_specs(methods, fit_kwargs: dict, sparsity) -> list[dict]:
    """Normalise ``methods`` (names or ``(label, method, kwargs)``) and the sparsity grid to fit specs."""
    from ..methods import METHODS

    specs = []
    for m in methods:
        label, method, kw = (m, m, {}) if isinstance(m, str) else m
        if method not in METHODS:
            raise SteeringError(f"methods: unknown method {method!r} (available: {sorted(METHODS)})")
        specs.append({"label": label, "method": method, "kwargs": {**fit_kwargs.get(method, {}), **kw},
                      "role": "method"})
    for grid in sparsity or ():
        bad = [k for k in grid if k not in SPARSITY_OPTIONS]
        if bad:
            raise SteeringError(f"sparsity: only {', '.join(SPARSITY_OPTIONS)} can vary, got {bad}")
        label = "lineas[" + ",".join(f"{k}={v:g}" for k, v in grid.items()) + "]"
        specs.append({"label": label, "method": "lineas", "kwargs": {**fit_kwargs.get("lineas", {}), **grid},
                      "role": "sparsity"})
    labels = [s["label"] for s in specs]
    dup = sorted({x for x in labels if labels.count(x) > 1})
    if dup:
        raise SteeringError(f"methods: label(s) {dup} appear twice")
    return specs


def _digest(obj) -> str:
    return hashlib.sha1(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:12]


class _Store:
    """Results written as they come (``points.jsonl``, ``steerings/``); reused when the key matches."""

    def __init__(self, out_dir):
        self.dir = Path(out_dir) if out_dir is not None else None
        self.points: dict[str, dict] = {}
        if self.dir is not None:
            self.dir.mkdir(parents=True, exist_ok=True)
            self._read()

    def _read(self) -> None:
        path = self.dir / "points.jsonl"
        if path.exists():
            for line in path.read_text(encoding="utf-8").splitlines():
                if line.strip():
                    rec = json.loads(line)
                    self.points[rec["key"]] = rec["point"]

    def point(self, key: str):
        if key not in self.points and self.dir is not None:
            self._read()  # another process sharing the folder may have added it meanwhile
        return self.points.get(key)

    def add_point(self, key: str, point: dict) -> None:
        from ..report import jsonable

        self.points[key] = point
        if self.dir is not None:
            with open(self.dir / "points.jsonl", "a", encoding="utf-8") as f:
                f.write(json.dumps(jsonable({"key": key, "point": point})) + "\n")

    def steering(self, label: str, request: str):
        from ..steering import Steering

        path = None if self.dir is None else self.dir / "steerings" / f"{label}.safetensors"
        if path is not None and path.exists():
            st = Steering.load(path)
            if st.meta.get("fit_request") == request:
                return st
        return None

    def save_steering(self, label: str, st) -> None:
        if self.dir is not None:
            (self.dir / "steerings").mkdir(exist_ok=True)
            st.save(self.dir / "steerings" / f"{label}.safetensors")


def compare(methods=DEFAULT_METHODS, strengths=STRENGTHS, *, model=None, tok=None, source=None, target=None,
            prompts=None, passages=None, fit_kwargs: dict | None = None, multipliers=MULTIPLIERS,
            sparsity=None, sparsity_strengths=(1.0,), extra_strengths: dict | None = None, out_dir=None,
            max_new_tokens: int = 20,
            progress: bool = True, log=None) -> dict:
    """Fit each method on the same data and evaluate it at each strength by the SPEC §5 protocol.

    Args:
        methods: method names (see :func:`lineas_fast.fit`) or ``(label, method, kwargs)`` tuples.
        strengths: strengths to evaluate (0 = the shared unsteered row).
        model, tok: default: the embedded SmolLM2 (:func:`lineas_fast.load_model`).
        source, target: fit prompts; default: the built-in toxic / nontoxic fit slices (32 each).
        prompts, passages: held-out toxic prompts and WikiText passages; default: the eval slices.
        fit_kwargs: ``{method: {option: value}}`` passed to that method's fit.
        multipliers: ActAdd multipliers evaluated at strength 1 (besides its strength sweep).
        sparsity: LinEAS sparsity grid, e.g. ``[{"l1": 0}, {"l1": 30}]``, evaluated at ``sparsity_strengths``.
        extra_strengths: ``{label: [strengths]}`` evaluated for that method besides ``strengths`` (e.g.
            a finer grid where a method's utility cost grows fast).
        out_dir: write (and resume from) ``points.jsonl`` and ``steerings/`` there.
        log: callable taking a progress line (default: silent).
    Returns:
        ``{"unsteered": row, "points": [row, ...], "fits": {label: info}, "settings": {...}}``; a row is a
        :func:`summary_row` plus ``label``, ``method``, ``strength``, ``multiplier``, ``nnz``.
    """
    from .. import data
    from ..methods import fit
    from ..models import load_model
    from ..patching import steered

    say = log or (lambda msg: None)
    strengths = [float(s) for s in strengths]
    if not strengths or any(not np.isfinite(s) for s in strengths):
        raise SteeringError(f"strengths must be a non-empty list of finite numbers, got {strengths}")
    specs = _fit_specs(methods, fit_kwargs or {}, sparsity)
    unknown = sorted(set(extra_strengths or {}) - {sp["label"] for sp in specs})
    if unknown:
        raise SteeringError(f"extra_strengths: no compared method is labelled {unknown}")
    if model is None or tok is None:
        model, tok = load_model("smollm2-135m")
    source = data.load_texts("toxic", "fit") if source is None else data.check_texts(source, "source")
    target = data.load_texts("nontoxic", "fit") if target is None else data.check_texts(target, "target")
    prompts = data.load_texts("toxic", "eval") if prompts is None else data.check_texts(prompts, "prompts")
    passages = data.wiki_passages(tok, "eval") if passages is None else data.check_texts(passages, "passages")
    settings = {"model": getattr(model.config, "name_or_path", "") or type(model).__name__,
                "model_type": model.config.model_type, "source": _digest(source), "target": _digest(target),
                "n_source": len(source), "n_target": len(target), "prompts": _digest(prompts),
                "n_prompts": len(prompts), "passages": _digest(passages), "n_passages": len(passages),
                "max_new_tokens": max_new_tokens}
    store = _Store(out_dir)

    def evaluate(key: str, context, extra: dict) -> dict:
        key = f"{key}|{_digest(settings)}"
        cached = store.point(key)
        if cached is not None:
            return cached
        t0 = time.perf_counter()
        with context():
            r = evaluate_model(model, tok, prompts, passages, None, max_new_tokens, progress)
        r["fluency"] = fluency(model, tok, prompts, r["ids"])
        point = {**extra, "eval_seconds": round(time.perf_counter() - t0, 1), **_keep(r)}
        store.add_point(key, point)
        return point

    from contextlib import nullcontext

    base = evaluate("unsteered", nullcontext, {"label": "unsteered", "method": None, "strength": 0.0})
    say(f"unsteered: toxic rate {base['toxic_rate']:.3f}, PPL {base['ppl']:.2f}")
    points, fits = [], {}
    for spec in specs:
        request = json.dumps({"method": spec["method"], "kwargs": spec["kwargs"], "data": settings["source"]
                              + settings["target"], "model": settings["model_type"]}, sort_keys=True, default=str)
        st = store.steering(spec["label"], request)
        if st is None:
            say(f"fitting {spec['label']} ...")
            st = fit(model, tok, source, target, method=spec["method"], progress=progress, **spec["kwargs"])
            st.meta["fit_request"] = request
            store.save_steering(spec["label"], st)
        fits[spec["label"]] = {"method": spec["method"], "role": spec["role"], "kwargs": spec["kwargs"],
                               "hyperparams": st.meta["hyperparams"], "train": st.meta.get("train", {}),
                               "nnz": st.nnz(), "entries": 2 * sum(st.meta["widths"].values()),
                               "sites": st.sites, "site_nnz": {s: st.nnz(s) for s in st.sites}}
        own = sorted(set(strengths) | {float(x) for x in (extra_strengths or {}).get(spec["label"], ())})
        sweep = [(s, 1.0) for s in (own if spec["role"] == "method" else sparsity_strengths)]
        if spec["method"] == "actadd" and spec["role"] == "method":
            sweep += [(1.0, float(m)) for m in multipliers]
        for lam, mult in sweep:
            extra = {"label": spec["label"], "method": spec["method"], "role": spec["role"], "strength": lam,
                     "multiplier": mult, "nnz": st.nnz()}
            if lam == 0:
                point = {**base, **extra}
            else:
                applied = st if mult == 1.0 else _times(st, mult)
                point = evaluate(f"{spec['label']}|{_digest(request)}|{lam}|{mult}",
                                 lambda: steered(model, applied, strength=lam, mode="hooks"), extra)
            points.append(point)
            say(f"{spec['label']} λ={lam:g}" + (f" ×{mult:g}" if mult != 1 else "")
                + f": toxic rate {point['toxic_rate']:.3f}, PPL {point['ppl']:.2f}, "
                  f"degenerate {point['degenerate_rate']:.3f}")
    rows = [_row(p, base) for p in points]
    return {"unsteered": _row(base, None), "points": rows, "fits": fits, "settings": settings}


def _times(st, multiplier: float):
    """ActAdd at another multiplier: b scales linearly (ω = 1), so this equals refitting with it."""
    from ..steering import Steering

    meta = json.loads(json.dumps(st.meta))
    meta["hyperparams"]["multiplier"] = meta["hyperparams"].get("multiplier", 1.0) * multiplier
    return Steering(st.scale, {s: st.shift[s] * multiplier for s in st.sites}, meta)


def _keep(r: dict) -> dict:
    """What a point keeps: protocol numbers, per-prompt toxic flags (for paired CIs), a few texts."""
    return {"toxic_rate": r["toxic_rate"], "mean_tox": r["mean_tox"], "degenerate_rate": r["degenerate_rate"],
            "ppl": r["ppl"], "fluency": r["fluency"], "gen_seconds": r["seconds"],
            "toxic": np.asarray(r["toxic"]).astype(int).tolist(), "examples": r["texts"][:5]}


def _row(point: dict, base: dict | None) -> dict:
    from ..report import fix_cut

    row = summary_row(point["label"], point, base)
    if base is not None and point.get("strength", 0) != 0:
        row["toxic_diff_ci"] = paired_bootstrap(np.asarray(base["toxic"]), np.asarray(point["toxic"]))
    for k in ("label", "method", "role", "strength", "multiplier", "nnz", "examples", "eval_seconds"):
        if k in point:
            row[k] = point[k]
    return fix_cut(row) if base is not None else row


def best_at_budget(result: dict, max_ppl_change: float = 0.10, max_degenerate: float = 0.05) -> list[dict]:
    """Per method: the lowest toxic rate among its points within the PPL and degenerate budgets."""
    best: dict[str, dict] = {}
    for r in result["points"]:
        if r.get("role") != "method" or r["ppl_change"] > max_ppl_change or r["degenerate_rate"] > max_degenerate:
            continue
        cur = best.get(r["label"])
        if cur is None or (r["toxic_rate"], r["ppl"]) < (cur["toxic_rate"], cur["ppl"]):
            best[r["label"]] = r
    return [best[k] for k in sorted(best, key=lambda k: best[k]["toxic_rate"])]
