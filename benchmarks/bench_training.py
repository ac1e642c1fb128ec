"""Training cost on the default task (SmolLM2-135M, toxic → nontoxic prompts, library defaults):

* step: LinEAS steady-state step time (median of a fit's per-step times after the first), eager fp32 vs
  bf16 autocast vs ``compile=True`` (fp32, bf16), fits interleaved per round, medians over quiet rounds
  (a round in which other processes used more than ``--busy`` cores is re-run); per-step losses compared
  with eager fp32; compilation timed with an empty inductor cache (a fresh ``TORCHINDUCTOR_CACHE_DIR``
  unless ``--keep-cache``), then again after ``torch._dynamo.reset()`` with the cache it left;
* split: where an eager fp32 step goes — forward to the last site, loss, backward, optimizer + prox
  (``meta["train"]["phase_seconds"]`` of the step comparison's last eager fp32 fit);
* full fit: the default fit (target collection included), eager fp32 as the demo runs it (the
  compiled full fits, cold and warm, were measured once: ``earlier.md``);
* AcT fitting: Linear-AcT all sites at once and incremental (first ``--incremental-sites`` sites) vs an
  ml-act-style pipeline on the same data (one forward per prompt, one activation file per sample and
  site, a Python loop over neurons for the closed form);
* scaling: eager step time vs number of sites (10 … 60 norm sites) and vs fit-set size (32 … 256).

Run (the malloc thresholds are set by re-executing the script):
    python benchmarks/bench_training.py --threads 2 --out benchmarks/results/bench/training.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
from timing import OtherLoad, ensure_malloc_env

import lineas_fast as lf
from lineas_fast.data import builtin_rows, load_texts
from lineas_fast.defaults import LINEAS as LINEAS_DEFAULTS

VARIANTS = {
    "eager fp32": {},
    "eager bf16": {"autocast": True},
    "compiled fp32": {"compile": True},
    "compiled bf16": {"compile": True, "autocast": True},
}


def steady(st) -> float:
    """A fit's steady step time: the median of its step times after the first (the first is the only
    one of a 1-step fit — used by the scaling fits, eager, whose first step is within 0.1 s of steady
    once the process is warm: first-step extra of eager fp32 in the step table)."""
    steps = st.meta["train"]["step_seconds"]
    return statistics.median(steps[1:] or steps)


def step_comparison(fit, args) -> dict:
    """Every variant once per round, ``--repeats`` quiet rounds; a round in which another process used more
    than ``--busy`` cores during one of its fits is discarded and re-run (at most ``--max-rounds`` rounds).
    The first round counts too: compilation (empty inductor cache) happens in each compiled fit's first
    step, which ``steady`` leaves out; a short eager fit warms the process up before it, and the variant
    that goes first rotates from round to round. Also returns the last eager fp32 fit (for the split)."""
    times = {k: [] for k in VARIANTS}
    ratios = {k: [] for k in VARIANTS}
    losses, first = {}, {}
    discarded = 0
    last_eager = None
    fit({}, 2)  # warm the process up (allocator, first-call paths), so the first round's first fit is not slow
    names = list(VARIANTS)
    for rnd in range(args.max_rounds):
        if len(times["eager fp32"]) >= args.repeats:
            break
        row, others = {}, {}
        for name in names[rnd % len(names):] + names[:rnd % len(names)]:  # the first variant rotates
            kw = VARIANTS[name]
            with OtherLoad() as o:
                st = fit(kw, args.steps)
            row[name], others[name] = steady(st), o.cores
            if name == "eager fp32":
                last_eager = st
            if rnd == 0:
                first[name] = st.meta["train"]["step_seconds"][0] - row[name]
                losses[name] = st.meta["train"]["loss"]
        quiet = max(others.values()) <= args.busy
        if quiet:
            for name in VARIANTS:
                times[name].append(row[name])
                ratios[name].append(row["eager fp32"] / row[name])
        discarded += not quiet
    if not times["eager fp32"]:
        raise SystemExit("no round ran on a quiet machine; raise --max-rounds or --busy")
    # dynamo re-traces; inductor's on-disk FX graph cache (filled above) is warm
    torch._dynamo.reset()
    st = fit(VARIANTS["compiled fp32"], args.steps)
    warm_cache = st.meta["train"]["step_seconds"][0] - steady(st)
    base = losses["eager fp32"]
    out = {name: {"step_s": statistics.median(times[name]), "speedup": statistics.median(ratios[name]),
                  "first_step_extra_s": first[name],
                  "max_rel_loss_diff": max(abs(a - b) / abs(b) for a, b in zip(losses[name], base))}
           for name in VARIANTS}
    best = max((k for k in VARIANTS if k != "eager fp32"), key=lambda k: out[k]["speedup"])
    return {"variants": out, "best": best, "best_speedup": out[best]["speedup"], "rounds": len(times["eager fp32"]),
            "discarded_busy_rounds": discarded, "compiled_fp32_first_step_extra_warm_cache_s": warm_cache}, last_eager


def split(st) -> dict:
    """Median seconds and share of each phase of an eager fp32 fit's steps (its first step left out)."""
    phases = st.meta["train"]["phase_seconds"][1:]
    keys = list(phases[0])
    med = {k: statistics.median(p[k] for p in phases) for k in keys}
    total = sum(med.values())
    return {k: {"s": v, "share": v / total} for k, v in med.items()}


def mlact_style_linear_act(model, tok, source, target, sites, workdir: Path) -> float:
    """ml-act's data flow, re-implemented: per-prompt forwards, one file per sample and site, then a
    per-neuron loop fitting the sorted-pairs least squares (returns seconds)."""
    t0 = time.perf_counter()
    for label, texts in (("s", source), ("t", target)):
        for i, text in enumerate(texts):
            acts = lf.collect(model, tok, [text], sites, pooling="mean")
            for k, s in enumerate(sites):
                torch.save(acts[s][0].clone(), workdir / f"{label}{i}_{k}.pt")
    for k, s in enumerate(sites):
        xs = torch.stack([torch.load(workdir / f"s{i}_{k}.pt") for i in range(len(source))])
        xt = torch.stack([torch.load(workdir / f"t{i}_{k}.pt") for i in range(len(target))])
        w, b = torch.empty(xs.shape[1]), torch.empty(xs.shape[1])
        for j in range(xs.shape[1]):  # the per-neuron loop
            x = torch.sort(xs[:, j].double()).values
            y = torch.sort(xt[:, j].double()).values
            xc, yc = x - x.mean(), y - y.mean()
            w[j] = (xc * yc).sum() / (xc * xc).sum().clamp(min=1e-12)
            b[j] = y.mean() - w[j] * x.mean()
    return time.perf_counter() - t0


def act_fitting(model, tok, src, tgt, args) -> dict:
    sites = lf.resolve_sites(model, "norms")
    out = {}
    t = time.perf_counter()
    lf.fit(model, tok, src, tgt, method="linear_act", progress=False)
    out["lineas_fast linear_act (60 sites at once)"] = time.perf_counter() - t
    few = sites[:args.incremental_sites]
    t = time.perf_counter()
    lf.fit(model, tok, src, tgt, method="linear_act", sites=few, incremental=True, progress=False)
    out[f"lineas_fast linear_act incremental ({len(few)} sites)"] = time.perf_counter() - t
    with tempfile.TemporaryDirectory() as d:
        out["ml-act-style pipeline (60 sites)"] = mlact_style_linear_act(model, tok, src, tgt, sites, Path(d))
    return out


def scaling(model, tok, args) -> dict:
    toxic, nontoxic = builtin_rows("toxic"), builtin_rows("nontoxic")  # the default task
    sites = lf.resolve_sites(model, "norms")
    by_sites = {}
    for k in args.site_counts:
        st = lf.fit(model, tok, toxic[:32], nontoxic[:32], sites=sites[:k], steps=args.scaling_steps,
                   progress=False)
        by_sites[k] = steady(st)
    by_n = {}
    for n in args.fit_sizes:
        st = lf.fit(model, tok, toxic[:n], nontoxic[:n], steps=args.scaling_steps, batch_size=n, progress=False)
        by_n[n] = steady(st)
    return {"step_s_by_sites": by_sites, "step_s_by_fit_size": by_n}


def plot(res: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    for ax, key, label in ((axes[0], "step_s_by_sites", "norm sites steered"),
                           (axes[1], "step_s_by_fit_size", "source prompts per step")):
        data = res["scaling"][key]
        ax.plot([int(k) for k in data], list(data.values()), "o-")
        ax.set_xlabel(label)
        ax.set_ylabel("eager step (s)")
        ax.grid(alpha=0.3)
    fig.suptitle("LinEAS step time scaling (SmolLM2-135M)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def markdown(res: dict) -> str:
    s = res["step"]
    lines = [f"LinEAS step, default task, {res['settings']['steps']} steps per fit (the first not counted), "
             f"median of {s['rounds']} interleaved quiet rounds ({s['discarded_busy_rounds']} busy rounds "
             "discarded); speed-up = median over rounds of eager fp32 / variant. First-step extra: the first "
             "step's excess over the steady step in the first round — for compiled variants the compilation, "
             "with an empty inductor cache for the first of them.", "",
             "| variant | step (s) | speed-up vs eager fp32 | first-step extra (s) | max loss diff vs eager fp32 |",
             "|---|---:|---:|---:|---:|"]
    for name, v in s["variants"].items():
        lines.append(f"| {name} | {v['step_s']:.3f} | {v['speedup']:.2f}× | {v['first_step_extra_s']:.1f} | "
                     f"{v['max_rel_loss_diff']:.1e} |")
    lines += ["", f"Compiling again after `torch._dynamo.reset()` (dynamo re-traces, inductor's on-disk cache is "
              f"warm): first step {s['compiled_fp32_first_step_extra_warm_cache_s']:.1f} s extra (compiled fp32)."]
    if "split" in res:
        lines += ["", "Eager fp32 step split: " + ", ".join(f"{k} {v['s']:.2f} s ({v['share']:.0%})"
                                                            for k, v in res["split"].items())]
    if "full_fit" in res:
        full, n = res["full_fit"]["wall_s"], res["full_fit"]["steps"]
        best = s["variants"][s["best"]]
        lines += ["", f"Full default fit (the demo's: {n} steps, eager fp32, target collection included): "
                  f"**{full:.1f} s**. With `compile=True` the {n - 1} steady steps would take "
                  f"{(n - 1) * best['step_s']:.0f} s instead of {(n - 1) * s['variants']['eager fp32']['step_s']:.0f} s "
                  f"({s['best']}, whose first step "
                  f"took {best['first_step_extra_s']:.0f} s more, compiling, in the first round above); the measured "
                  "compiled full fits are in the earlier measurements below."]
    if "act" in res:
        lines += ["", "| Linear-AcT fitting (32 vs 32 prompts) | seconds |", "|---|---:|"]
        lines += [f"| {k} | {v:.1f} |" for k, v in res["act"].items()]
    if "scaling" in res:
        sc = res["scaling"]
        lines += ["", "Eager step time by sites: " + ", ".join(f"{k}: {v:.2f} s" for k, v in sc["step_s_by_sites"].items()),
                  "", "Eager step time by fit-set size: " + ", ".join(f"{k}: {v:.2f} s" for k, v in sc["step_s_by_fit_size"].items())]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--steps", type=int, default=4, help="steps per timed fit (the first is not counted)")
    p.add_argument("--repeats", type=int, default=2, help="timed quiet rounds (all variants in each)")
    p.add_argument("--busy", type=float, default=0.1,
                   help="discard a round if other processes used more than this many cores during one of its fits")
    p.add_argument("--max-rounds", type=int, default=6, help="give up after this many rounds (warm-up included)")
    p.add_argument("--keep-cache", action="store_true",
                   help="use the usual inductor cache (default: a fresh, empty one, so compilation is timed cold)")
    p.add_argument("--incremental-sites", type=int, default=10)
    p.add_argument("--scaling-steps", type=int, default=1,
                   help="steps per scaling fit (with more than one, the first is not counted)")
    p.add_argument("--site-counts", type=int, nargs="+", default=[10, 20, 40, 60])
    p.add_argument("--fit-sizes", type=int, nargs="+", default=[32, 64, 128, 256])
    p.add_argument("--no-full", dest="full", action="store_false", help="skip the full default fit")
    p.add_argument("--quick", action="store_true", help="smoke: 3 steps, 1 round, small scaling grid, no full fit")
    p.add_argument("--out", default=None, metavar="FILE.json")
    args = p.parse_args()
    if args.quick:
        args.steps, args.repeats, args.full = 3, 1, False
        args.site_counts, args.fit_sizes, args.incremental_sites = [10, 20], [16, 32], 3
    ensure_malloc_env()
    if not args.keep_cache:  # read by inductor when it first compiles
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="lineas_bench_inductor_")
    torch.set_num_threads(args.threads)
    model, tok = lf.load_model("smollm2-135m")
    src, tgt = load_texts("toxic", "fit"), load_texts("nontoxic", "fit")  # the default task

    def fit(kw, steps):
        return lf.fit(model, tok, src, tgt, method="lineas", steps=steps, progress=False, **kw)

    res = {"settings": vars(args)}
    res["step"], eager = step_comparison(fit, args)
    res["split"] = split(eager)
    if args.full:  # the demo's fit: library defaults (eager fp32, their steps), target collection included
        t = time.perf_counter()
        fit({}, LINEAS_DEFAULTS["steps"])
        res["full_fit"] = {"wall_s": time.perf_counter() - t, "steps": LINEAS_DEFAULTS["steps"]}
    res["act"] = act_fitting(model, tok, src, tgt, args)
    res["scaling"] = scaling(model, tok, args)
    print(markdown(res))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)
        plot(res, str(Path(args.out).with_suffix(".png")))


if __name__ == "__main__":
    main()
