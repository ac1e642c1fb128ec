"""Render ``benchmarks/RESULTS.md`` and the plots from ``results/bench/*.json`` / ``*.md`` (written by the
benchmark scripts through :mod:`run_all`): a stamp (machine, versions, commit), the issue's targets with
met / missed and why, every script's tables with its command, the GPU analysis, and the earlier
one-off measurements (``earlier.md``, not regenerated)."""

from __future__ import annotations

import json
import math
import platform
import subprocess
from pathlib import Path

from timing import fmt_ratio, t95

HERE = Path(__file__).resolve().parent
OUT = HERE / "results" / "bench"
TITLES = {
    "kernels": "Kernels: `norm_affine` and `steered_linear` (C++ CPU) vs eager and `torch.compile`",
    "inference": "Inference: prefill, decode, ATen ops, per-request routing (SmolLM2 and a wide random Llama)",
    "training": "Training: LinEAS step eager vs compiled, its split, fit times, scaling, AcT fitting",
    "peers": "Peers: repeng, steering-vectors, pyvene and an ml-act-style hook vs lineas_fast",
    "serving": "Serving: the vLLM plugin vs stock vLLM (CPU server, float32)",
}
WHY_MISSED = {
    "training": "the step is dominated by the model's matmuls and attention (see the split); compile fuses the "
                "elementwise rest",
    "decode": "bounded on this machine: one norm call costs {model_us:.1f} µs as the model has it and {fused_us:.1f} µs "
              "fused, so fusing the {sites} norms saves at most {saved:.2f} ms of a {step:.1f} ms batch-1 step — "
              "{bound:.3f}× at best. The rest of a CPU decode step is the other ~{ops:,} dispatched ops and the weight "
              "reads, which steering does not touch. Where fusing pays: prefill (below) and GPU launches (GPU on paper)",
    "peers": "a tie within noise: |Δ| is within the 95 % t-interval of the two medians' standard errors plus the "
             "run's noise floor (the unsteered twin's distance from 1.000); the ops row below is the deterministic "
             "comparison",
    "peers_real": "fused is slower here by more than the noise (t-interval of the standard errors plus the "
                  "unsteered twin's distance from 1.000)",
    "fold": "RMSNorm has no bias, so each norm's shift folds into biases the fold creates on the Linears "
            "consuming it (q/k/v, gate/up): {extra:,} more ATen ops per step than unsteered, a real cost at "
            "batch 1 on CPU where each op is a dispatch",
    "linear": "within noise: the quartiles of that case's per-round ratios are [{q1:.3f}–{q3:.3f}], and the "
              "median over all forward cases is {med:.3f}×; the op is the Linear's addmm plus one steering pass "
              "over x (prologue) or y (epilogue)",
    "linear_real": "real at this shape (quartiles of the per-round ratios [{q1:.3f}–{q3:.3f}]): on CPU the "
                   "steering is a separate pass over x (prologue, M·K elements) or y (epilogue, M·N) next to the "
                   "M·K·N matmul, so its share grows as the other dimension shrinks (N = 576 here); a prologue "
                   "with one steering could scale W's columns instead (N·K work, cheaper when M > N) — not built",
}


def _load(name: str):
    path = OUT / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def git_commit() -> str:
    """Short HEAD commit, marked when tracked files other than the benchmark outputs differ from it."""
    def git(*args):
        try:
            return subprocess.run(["git", *args], cwd=HERE, capture_output=True, text=True).stdout.strip()
        except OSError:
            return ""

    dirty = git("status", "--porcelain", "--untracked-files=no", "--", ":(top)",
                ":(top,exclude)benchmarks/results", ":(top,exclude)benchmarks/RESULTS.md")
    return (git("rev-parse", "--short", "HEAD") or "unknown") + (" (uncommitted changes)" if dirty else "")


def versions() -> str:
    """The versions that matter for the timings, of the running environment (``run_all`` records them)."""
    def version(mod):
        try:
            return __import__(mod).__version__
        except Exception:
            return "not installed"

    return (f"Python {platform.python_version()}, torch {version('torch')}, transformers {version('transformers')}, "
            f"diffusers {version('diffusers')}, triton {version('triton')}, lineas_fast {version('lineas_fast')}")


def stamp(meta: dict) -> list[str]:
    """``meta``: what :mod:`run_all` saved in ``runs.json`` — threads, quick, total_s, commit, finished."""
    import os

    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor()) if Path("/proc/cpuinfo").exists() else platform.processor()
    mem = ""
    if Path("/proc/meminfo").exists():
        kb = int(next(line.split()[1] for line in open("/proc/meminfo") if line.startswith("MemTotal")))
        mem = f", {kb / 2**20:.0f} GiB RAM"
    threads = meta["threads"]
    whole = f" (`make bench` in all, set-up included: {meta['make_bench_s'] / 60:.1f} min)" if meta.get("make_bench_s") else ""
    return [f"Generated by `make bench` (`python benchmarks/run_all.py --threads {threads}`), finished "
            f"{meta['finished']} UTC, benchmarks {meta['total_s'] / 60:.1f} min{whole}"
            + (" — **`--quick` smoke settings: not a result**" if meta["quick"] else "") + ".",
            f"Machine: {cpu}, {os.cpu_count()} logical cores{mem}, no GPU; {threads} torch threads. "
            f"Commit {meta['commit']}." + "".join(
                f" Re-run since with `--only {r['only']}`: commit {r['commit']}, finished {r['finished']} UTC"
                f"{' (--quick)' if r['quick'] else ''}." for r in meta.get("reruns", [])),
            f"Versions: {meta['versions']}." if meta.get("versions") else
            f"Versions (of the environment rendering this file; the run did not record its own): {versions()}.",
            "Conventions (SPEC §6): ratios measured side by side in one process, variants interleaved per round, "
            "medians; a time ratio < 1 is faster than the reference. Do not edit this file by hand: "
            "`python benchmarks/report.py` re-renders it from `results/bench/`."]


def targets(meta: dict | None = None) -> list[tuple[str, str, str, bool | None, str]]:
    """(item, target, measured, met, note) for every acceptance figure of the Benchmarks issue."""
    rows = []
    if meta and meta.get("make_bench_s") and not meta.get("quick") and not meta.get("only"):
        m = meta["make_bench_s"] / 60
        rows.append(("`make bench`, set-up included", "≤ 30 min on 2 cores", f"{m:.1f} min", m <= 30,
                     f"benchmarks {meta['total_s'] / 60:.1f} min + set-up (venvs, build, peers) "
                     f"{m - meta['total_s'] / 60:.1f} min"))
    inf, ker, tr, peers = _load("inference"), _load("kernels"), _load("training"), _load("peers")
    if inf:
        smol = inf["models"][0]
        d1, nc = smol["step_b1"], smol["norm_call"]
        step = d1["unsteered"]["median_s"]
        saved = nc["sites"] * (nc["model_us"] - nc["fused_us"]) * 1e-6
        why = WHY_MISSED["decode"].format(model_us=nc["model_us"], fused_us=nc["fused_us"], sites=nc["sites"],
                                          saved=1e3 * saved, step=1e3 * step, bound=1 - saved / step,
                                          ops=smol["aten_ops_per_decode_step"]["fused"])
        ok = d1["fused"]["ratio"] <= 0.98
        rows.append(("fused decode step, batch 1, SmolLM2", "≤ 0.98× unsteered", fmt_ratio(d1["fused"], "×"), ok, "" if ok else why))
        p = smol["prefill"]["fused"]
        rows.append(("fused prefill 8×128, SmolLM2", "(not a target)", fmt_ratio(p, "×"), None, ""))
        fold = d1["fold"]
        tol = max(0.02, 2 * fold["ratio_se"])
        ok = abs(fold["ratio"] - 1) <= tol
        ops = smol["aten_ops_per_decode_step"]
        rows.append(("fold decode step, batch 1, SmolLM2", "1.00× within noise", fmt_ratio(fold, "×"), ok,
                     f"noise: ±{tol:.3f} (the larger of 2 % and 2 standard errors)" + ("" if ok else "; " + WHY_MISSED[
                         "fold"].format(extra=ops["fold"] - ops["unsteered"]))))
        mixed = inf["routing"]["mixed (4 steerings + unsteered)"]["throughput_vs_one"]
        rows.append(("mixed batch throughput", "≥ 0.95× single steering", f"{mixed:.3f}×", mixed >= 0.95, ""))
        ops = smol["aten_ops_per_decode_step"]
        rows.append(("ATen ops per decode step", "fused ≤ unsteered", f"{ops['fused']:,} vs {ops['unsteered']:,}",
                     ops["fused"] <= ops["unsteered"], ""))
    if peers and peers.get("fused_vs_peers"):
        for peer, (ours, theirs, se_ours, se_theirs, pairs, *null) in peers["fused_vs_peers"].items():
            ok = ours <= theirs
            tie = abs(ours - theirs) <= t95(pairs) * (se_ours ** 2 + se_theirs ** 2) ** 0.5 + (null[0] if null else 0.0)
            rows.append((f"fused vs {peer}", "fused overhead ≤ peer's", f"{ours:.3f}× vs {theirs:.3f}×", ok,
                         "" if ok else WHY_MISSED["peers" if tie else "peers_real"]))
        more = [k for k, (f, p, _) in peers["ops_vs_peers"].items() if f > p]
        rows.append(("ATen ops per decode step vs peers", "fused ≤ every peer",
                     ", ".join(f"{k}: {f:,} vs {p:,}" for k, (f, p, _) in peers["ops_vs_peers"].items()), not more,
                     f"fused dispatches more than: {', '.join(more)}" if more else "(deterministic, unlike the timings)"))
    if tr and tr.get("step"):
        sp = tr["step"].get("best_speedup")
        rows.append(("LinEAS step, compiled vs eager fp32", "≥ 1.3×", f"{sp:.2f}× ({tr['step'].get('best')})" if sp else "–",
                     None if sp is None else sp >= 1.3, "" if sp is None or sp >= 1.3 else WHY_MISSED["training"]))
    if ker:
        na = ker["norm_affine"]
        worst = min(na, key=lambda r: r["speedup_vs_eager"])
        rows.append(("norm_affine vs eager (all shapes, fwd+bwd)", "≥ 2.5×",
                     f"min {worst['speedup_vs_eager']:.1f}× ({worst['norm']} {worst['dtype']} {worst['pass']} "
                     f"{worst['shape']})", worst["speedup_vs_eager"] >= 2.5, ""))
        big = [r for r in na if r["shape"] == max(x["shape"] for x in na) and r["pass"] == "fwd"]
        if big:
            frac = ", ".join(f"{r['norm']} {r['dtype']} {r['fraction_of_memcpy']:.0%}" for r in big)
            rows.append((f"norm_affine fwd GB/s at {big[0]['shape']}", "reported as a fraction of memcpy", frac, None,
                         f"memcpy {ker['memcpy']['GBps']:.1f} GB/s"))
        sl = [r for r in ker["steered_linear"] if r["pass"] == "fwd"]
        if sl:
            worst = max(sl, key=lambda r: r["op_over_linear"])
            ok = worst["op_over_linear"] <= 1.05
            q1, q3 = worst.get("op_over_linear_q1", float("nan")), worst.get("op_over_linear_q3", float("nan"))
            med = sorted(r["op_over_linear"] for r in sl)[len(sl) // 2]
            real = not math.isnan(q1) and q1 > 1.05  # (nan: results written before quartiles were recorded)
            why = "" if ok else WHY_MISSED["linear_real" if real else "linear"].format(q1=q1, q3=q3, med=med)
            rows.append(("steered_linear fwd vs plain linear", "≤ 1.05× (Kernels issue)",
                         f"max {worst['op_over_linear']:.3f}× ({worst['dtype']} {worst['site']} {worst['shape']})",
                         ok, why))
    return rows


def plot_inference(inf: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(inf["models"]), figsize=(6 * len(inf["models"]), 3.6), squeeze=False)
    for ax, m in zip(axes[0], inf["models"]):
        measures = [k for k in ("prefill", "step_b1", "step_b8", "decode_b1", "decode_b8", "decode_b1_compiled")
                    if k in m and (k.startswith("step") or next(iter(m[k].values())).get("pairs", 3) >= 3)]
        names = list(m[measures[0]])
        width = 0.8 / len(names)
        for i, name in enumerate(names):
            rs = [list(m[k].values())[i] if k == "decode_b1_compiled" else m[k][name] for k in measures]
            vals = [r["ratio"] for r in rs]
            err = [[r["ratio"] - r.get("ratio_q1", r["ratio"]) for r in rs],
                   [r.get("ratio_q3", r["ratio"]) - r["ratio"] for r in rs]]
            ax.bar([j + i * width for j in range(len(measures))], vals, width, yerr=err, capsize=2, label=name)
        ax.axhline(1.0, color="black", lw=0.8)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(measures))], measures)
        ax.set_ylabel("time / unsteered (bars: quartiles)")
        ax.set_ylim(0.8, max(1.2, ax.get_ylim()[1]))
        ax.set_title(m["model"], fontsize=9)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(meta: dict) -> Path:
    """RESULTS.md from ``meta`` (``runs.json``: the steps run, their commands and times, the stamp's
    facts) and every ``results/bench/<name>.json`` / ``.md``."""
    runs = meta["runs"]
    lines = ["# Measured results", ""] + stamp(meta) + [""]
    lines += ["## Targets (Benchmarks issue)", "", "| item | target | measured | met | note |", "|---|---|---|---|---|"]
    for item, target, measured, met, note in targets(meta):
        lines.append(f"| {item} | {target} | {measured} | {'–' if met is None else ('yes' if met else '**no**')} | {note} |")
    lines.append("")
    status = {r["name"]: r for r in runs}
    inf = _load("inference")
    if inf:
        plot_inference(inf, OUT / "inference.png")
    for name, title in TITLES.items():
        md = OUT / f"{name}.md"
        lines += [f"## {title}", ""]
        run = status.get(name)
        if run:
            py = "../.venv-peers/bin/python" if name == "peers" else "python"
            lines.append(f"Command: `cd benchmarks && {py} {' '.join(run.get('command') or [])}` ({run['seconds']:.0f} s)"
                         if run.get("command") else f"Not run: {run.get('why')}")
            if run.get("command") and not run["ok"]:
                lines.append(f"**Failed** — last lines of its log: `{(run.get('why') or '').strip().splitlines()[-1:]}`")
        else:
            lines.append("(kept from an earlier `run_all.py` run: not selected with `--only` this time)")
        lines += ["", md.read_text().strip() if md.exists() else "(no results yet)", ""]
        for png in (f"{name}.png",):
            if (OUT / png).exists():
                lines += [f"![{name}](results/bench/{png})", ""]
    from gpu_on_paper import analysis

    ops = None
    if inf:
        ops = {**inf["models"][0]["aten_ops_per_decode_step"], "_sites": inf["models"][0]["sites"]}
    lines += ["## GPU on paper: a 7B Llama at batch-1 decode", "", analysis(ops), ""]
    earlier = HERE / "earlier.md"
    if earlier.exists():
        lines += [earlier.read_text().strip(), ""]
    path = HERE / "RESULTS.md"
    path.write_text("\n".join(lines))
    return path


def main() -> None:
    """Re-render RESULTS.md and the plots from the saved results (no benchmark runs)."""
    path = write(json.loads((OUT / "runs.json").read_text()))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
