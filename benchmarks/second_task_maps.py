"""Why a LinEAS fit does or does not steer the second task: its shifts against the plain mean shift, and its
two halves (ω alone, b alone) evaluated apart.

``second_task.py`` measures *whether* a setting steers the continuations' sentiment; this script asks
*why not*, on the same data and protocol (its module docstring). It fits LinEAS with ``--config`` and
Mean-AcT at the same sites and pooling (the mean shift δ = mean(target) − mean(source) per site, fitted
locally), then reports

* per site, how the learned shift b lines up with δ: the cosine and the projection ratio ``b·δ / δ·δ``
  (a pure transport of the means, with the paired preservation term μ and no other site, would give
  cosine 1 and ratio 1/(1+μ));
* the median |ω − 1|;
* the positive rate, mean VADER compound and passage PPL of the fit at λ = 1 as fitted, with ω alone (b = 0)
  and with b alone (ω = 1), and of Mean-AcT at λ = 0.5 — which half of the map moves sentiment, which costs
  perplexity.

Usage::

    python benchmarks/second_task_maps.py --threads 2 --config '{"sites":"norms","pooling":"mean"}' \\
        --out benchmarks/results/second_task/maps_norms_mean.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

import lineas_fast as lf
from lineas_fast import evaluate as E
from lineas_fast.steering import Steering

from second_task import POSITIVE_TEXT, checked_options, compound, load_task


def alignment(fit: Steering, mean_shift: Steering) -> dict:
    """Per site (in ``fit``'s order): cosine of b with δ and the projection ratio ``b·δ / δ·δ``, plus their
    medians and the median |ω − 1| over every neuron."""
    cos, ratio = [], []
    for site in fit.scale:
        b, d = fit.shift[site].double(), mean_shift.shift[site].double()
        dd = float(d @ d)
        cos.append(float(torch.nn.functional.cosine_similarity(b, d, dim=0)) if dd > 0 and b.any() else 0.0)
        ratio.append(float(b @ d) / dd if dd > 0 else 0.0)
    omega = torch.cat([(w - 1).abs() for w in fit.scale.values()])
    return {"sites": list(fit.scale), "cos": cos, "ratio": ratio, "median_cos": float(np.median(cos)),
            "median_ratio": float(np.median(ratio)), "median_abs_omega_minus_1": float(omega.median())}


def halves(fit: Steering) -> dict[str, Steering]:
    """The fit as fitted, with ω alone (b = 0) and with b alone (ω = 1)."""
    ones = {s: torch.ones_like(w) for s, w in fit.scale.items()}
    zeros = {s: torch.zeros_like(b) for s, b in fit.shift.items()}
    return {"as fitted": fit, "omega only": Steering(fit.scale, zeros, dict(fit.meta)),
            "shift only": Steering(ones, fit.shift, dict(fit.meta))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="{}", help="JSON dict of lf.fit kwargs for LinEAS")
    ap.add_argument("--out", default=None, help="write the numbers as JSON here")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    config = checked_options(args)
    t0 = time.perf_counter()
    src, tgt, prompts, model, tok, passages = load_task()
    fit = lf.fit(model, tok, src, tgt, **config)
    hp = fit.meta["hyperparams"]
    mean_shift = lf.fit(model, tok, src, tgt, method="mean_act", sites=hp["sites"], pooling=hp["pooling"],
                        progress=False)
    align = alignment(fit, mean_shift)
    print(f"median cos(b, δ) {align['median_cos']:.2f}, median b·δ/δ·δ {align['median_ratio']:.2f}, "
          f"median |ω−1| {align['median_abs_omega_minus_1']:.3f}", flush=True)
    base_ppl = E.perplexity(model, tok, passages)
    rows = []
    points = [(f"LinEAS {k}", s, 1.0) for k, s in halves(fit).items()] + [("Mean-AcT (same sites)", mean_shift, 0.5)]
    for name, steering, lam in points:
        with lf.steered(model, steering, strength=lam):
            texts = E.continuations(model, tok, prompts)[0]
            value = E.perplexity(model, tok, passages)
        c = compound(texts)
        rows.append({"name": name, "strength": lam, "positive_rate": float((c >= POSITIVE_TEXT).mean()),
                     "mean_compound": float(c.mean()), "ppl": value, "ppl_change": value / base_ppl - 1})
        print(f"{name} λ={lam:g}: positive rate {rows[-1]['positive_rate']:.3f}, mean compound "
              f"{rows[-1]['mean_compound']:+.3f}, PPL {value:.2f} ({100 * rows[-1]['ppl_change']:+.1f} %)", flush=True)
    if args.out:
        out = {"config": config, "hyperparams": hp, "alignment": align, "unsteered_ppl": base_ppl, "rows": rows,
               "seconds": time.perf_counter() - t0}
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(out, indent=1, ensure_ascii=False), encoding="utf-8")


if __name__ == "__main__":
    main()
