"""Run every benchmark in sequence and regenerate ``benchmarks/RESULTS.md`` and its plots from scratch —
what ``make bench`` and ``lineas-fast bench`` run.

Each step is one script (one concern) writing ``results/bench/<name>.json`` (numbers, settings,
machine) and its markdown tables to ``results/bench/<name>.md``; :mod:`report` then renders RESULTS.md
(stamped with machine, versions and commit), checks the issue's targets and draws the plots. Steps run
one after another, never in parallel (two torch processes on 2 cores distort each other 20×).

    python benchmarks/run_all.py [--quick] [--only kernels,inference,...] [--threads 2]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
OUT = HERE / "results" / "bench"
PEERS_PY = ROOT / ".venv-peers" / "bin" / "python"


def steps(threads: int, quick: bool) -> dict[str, list[str]]:
    """Commands run from benchmarks/ with relative output paths (nothing machine-specific in the results)."""
    q = ["--quick"] if quick else []
    t = ["--threads", str(threads)]
    py = sys.executable
    return {
        "kernels": [py, "bench_kernels.py", *t, *q, "--out", "results/bench/kernels.json", "--plot", "results/bench/kernels.png"],
        "inference": [py, "bench_inference.py", *t, *q, "--out", "results/bench/inference.json"],
        "training": [py, "bench_training.py", *t, *q, "--out", "results/bench/training.json"],
        "peers": [str(PEERS_PY), "bench_peers.py", *t, *q, "--out", "results/bench/peers.json"],
        "serving": [py, "bench_vllm.py", *q, "--out", "results/bench/serving"],
    }


def run_step(name: str, cmd: list[str]) -> dict:
    vllm_py = ROOT / ".venv-vllm" / "bin" / "python"
    if name == "serving" and not vllm_py.exists():
        msg = f"not run: {vllm_py} is missing (make vllm-venv creates it)"
        (OUT / f"{name}.md").write_text(msg + "\n")
        print(f"[bench] {name}: {msg}", flush=True)
        return {"name": name, "ok": False, "seconds": 0.0, "why": msg}
    if name == "peers" and not PEERS_PY.exists():
        msg = f"not run: {PEERS_PY} is missing (make bench creates it: bash benchmarks/peers/setup.sh)"
        (OUT / f"{name}.md").write_text(msg + "\n")
        print(f"[bench] {name}: {msg}", flush=True)
        return {"name": name, "ok": False, "seconds": 0.0, "why": msg}
    env = {**os.environ, "PYTHONPATH": f"{HERE}{os.pathsep}{ROOT}"}
    print(f"[bench] {name}: {' '.join(Path(c).name if i < 2 else c for i, c in enumerate(cmd))}", flush=True)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=HERE, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    secs = time.perf_counter() - t0
    (OUT / f"{name}.md").write_text(proc.stdout)
    (OUT / f"{name}.log").write_text(proc.stderr)
    ok = proc.returncode == 0
    print(f"[bench] {name}: {'done' if ok else 'FAILED (exit %d)' % proc.returncode} in {secs:.0f} s"
          + ("" if ok else f"; see {OUT / (name + '.log')}"), flush=True)
    return {"name": name, "ok": ok, "seconds": round(secs, 1), "command": cmd[1:], "why": None if ok else proc.stderr[-2000:]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="every script's smoke settings (minutes, not a result)")
    p.add_argument("--started-at", type=float, default=None, metavar="EPOCH",
                   help="when `make bench` started (its set-up included in the reported wall time)")
    p.add_argument("--only", default=None, metavar="LIST", help="comma-separated steps (the others keep their last results)")
    args = p.parse_args(argv)
    OUT.mkdir(parents=True, exist_ok=True)
    all_steps = steps(args.threads, args.quick)
    chosen = args.only.split(",") if args.only else list(all_steps)
    unknown = [s for s in chosen if s not in all_steps]
    if unknown:
        p.error(f"unknown step(s) {unknown}; steps: {', '.join(all_steps)}")
    import report

    commit = report.git_commit()  # before the steps rewrite the tracked results
    t0 = time.perf_counter()
    runs = [run_step(name, all_steps[name]) for name in chosen]
    meta = {"runs": runs, "quick": args.quick, "threads": args.threads, "total_s": round(time.perf_counter() - t0, 1),
            "commit": commit, "finished": f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M}",
            "make_bench_s": None if args.started_at is None else round(time.time() - args.started_at, 1),
            "only": args.only, "versions": report.versions()}
    saved = OUT / "runs.json"
    if args.only and saved.exists():  # a partial re-run: keep the full run's facts, note what was redone
        full = json.loads(saved.read_text())
        done = {r["name"] for r in runs}
        full["runs"] = [r for r in full["runs"] if r["name"] not in done] + runs
        full.setdefault("reruns", []).append({k: meta[k] for k in ("only", "commit", "finished", "total_s", "quick",
                                                                   "versions")})
        meta = full
    saved.write_text(json.dumps(meta, indent=1))
    report.write(meta)
    print(f"[bench] wrote {HERE / 'RESULTS.md'} in {time.perf_counter() - t0:.0f} s", flush=True)
    return 0 if all(r["ok"] or r["name"] == "peers" for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
