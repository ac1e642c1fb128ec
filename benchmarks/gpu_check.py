"""``make gpu-check``: everything that needs a CUDA GPU, in one run (budget: 8 minutes on one H100-class GPU).

Needs a CUDA build of torch (and triton) in the Python that runs it. Steps, each a command:

1. preflight — torch sees a CUDA device, triton imports; otherwise the check FAILS (it never skips);
2. build — the CUDA extension with release flags (setup.py: nvcc -O3 -lineinfo), for this GPU's
   architecture unless TORCH_CUDA_ARCH_LIST is set: ``LINEAS_FAST_CUDA=1 pip install --no-build-isolation
   --no-deps -e .`` (``--skip-build`` reuses the extension already built);
3. registry — ``env_report()`` must call every backend usable; prints what the registry picks on CUDA;
4. tests — ``pytest -m gpu`` on the test files holding gpu tests, with LINEAS_FAST_REQUIRE_GPU=1 (a GPU test
   skipped for a missing GPU / extension / triton fails) and TRITON_INTERPRET=0 (Triton on the GPU): CUDA
   extension and Triton vs the pure-torch reference in fp32/bf16/fp16, a fused decode step in a CUDA graph;
5. bench — ``benchmarks/bench_gpu.py`` writes ``kernels.md`` and ``inference.md`` to ``--out-dir``
   (``bench_kernels.py`` and ``bench_inference.py`` time the CPU only: host clocks, the C++ extension).

Expected about 2 min build + 2 min tests (Triton compiles) + 2 min bench (not yet measured on a GPU);
the per-step timeouts only stop a hang. ``--dry-run`` prints the commands and exits 0. Otherwise
``<out-dir>/check.md`` records each step's status and wall time, and the exit status is 0 only when every
step passed.
"""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def preflight() -> int:
    """Step 1 (in a child process): a CUDA device and triton, else fail; prints ``arch X.Y`` last."""
    import torch

    if not torch.cuda.is_available():
        print(f"gpu-check: no CUDA device (torch {torch.__version__}, CUDA build {torch.version.cuda})")
        return 1
    import triton

    print(torch.cuda.get_device_name(), "torch", torch.__version__, "triton", triton.__version__)
    print("arch %d.%d" % torch.cuda.get_device_capability())
    return 0


def registry() -> int:
    """Step 3: every backend usable; what the registry picks on CUDA (and CPU)."""
    import json

    import lineas_fast.backends as B

    report = B.env_report()
    print(json.dumps(report, indent=1))
    for dev in ("cuda", "cpu"):
        print(f"registry on {dev}:", json.dumps(B.decisions(dev), indent=1))
    bad = {k: v["why"] for k, v in report.items() if not v["usable"]}
    if bad:
        print(f"gpu-check: unusable backends: {bad}")
    return 1 if bad else 0


def gpu_test_files() -> list[str]:
    return [str(p.relative_to(ROOT)) for p in sorted((ROOT / "tests").glob("test_*.py")) if "mark.gpu" in p.read_text()]


def steps(py: str, cfg, arch: str) -> list[tuple[str, list[str], dict, int]]:
    """``(name, argv, extra env, timeout s)`` of every step, in order."""
    me = "benchmarks/gpu_check.py"
    out = [("preflight", [py, me, "--step", "preflight"], {}, 60)]
    if not cfg.skip_build:
        out.append(("build", [py, "-m", "pip", "install", "--no-build-isolation", "--no-deps", "-e", "."],
                    {"LINEAS_FAST_CUDA": "1", "TORCH_CUDA_ARCH_LIST": arch}, 300))
    out += [("registry", [py, me, "--step", "registry"], {"TRITON_INTERPRET": "0"}, 60),
            ("tests", [py, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rfEs", "-m", "gpu", *gpu_test_files()],
             {"LINEAS_FAST_REQUIRE_GPU": "1", "TRITON_INTERPRET": "0"}, 240),
            ("bench", [py, "benchmarks/bench_gpu.py", "--out-dir", cfg.out_dir, "--repeats", str(cfg.repeats)],
             {"TRITON_INTERPRET": "0"}, 240)]
    return out


def run(argv: list[str], env: dict, timeout: int, capture: bool = False) -> tuple[int, str]:
    """Run in the repository root in its own process group (killed whole on timeout)."""
    p = subprocess.Popen(argv, cwd=ROOT, env={**os.environ, **env}, start_new_session=True, text=True,
                         stdout=subprocess.PIPE if capture else None)
    try:
        out, _ = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()
        return 124, f"timed out after {timeout} s"
    if capture:
        print(out, end="", flush=True)
    return p.returncode, out or ""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry-run", action="store_true", help="print the steps (commands) and exit 0")
    ap.add_argument("--skip-build", action="store_true", help="use the CUDA extension already built")
    ap.add_argument("--python", default=sys.executable, help="the Python (with a CUDA torch) to run")
    ap.add_argument("--out-dir", default="benchmarks/results/gpu", help="where the Markdown results go")
    ap.add_argument("--repeats", type=int, default=10, help="benchmark samples per candidate")
    ap.add_argument("--step", choices=["preflight", "registry"], help=argparse.SUPPRESS)  # run by the steps
    cfg = ap.parse_args()
    if cfg.step:
        return {"preflight": preflight, "registry": registry}[cfg.step]()
    arch = os.environ.get("TORCH_CUDA_ARCH_LIST", "")
    if cfg.dry_run:
        shown = arch or "<this GPU's arch, e.g. 9.0>"
        for i, (name, argv, env, timeout) in enumerate(steps(cfg.python, cfg, shown), 1):
            envs = " ".join(f"{k}={v}" for k, v in env.items())
            print(f"{i}. {name} (timeout {timeout} s):\n   {envs + ' ' if envs else ''}{shlex.join(argv)}")
        print(f"then: {cfg.out_dir}/check.md (status and wall time of each step)")
        return 0
    rows, failed, t_all = [], False, time.perf_counter()
    for i in range(len(steps(cfg.python, cfg, arch))):
        name, argv, env, timeout = steps(cfg.python, cfg, arch)[i]  # rebuilt: the build needs the arch found
        print(f"\n=== gpu-check: {name}", flush=True)
        t0 = time.perf_counter()
        rc, out = run(argv, env, timeout, capture=name == "preflight")
        if name == "preflight" and rc == 0 and not arch:
            arch = out.strip().splitlines()[-1].split()[-1]  # "arch 9.0": build for this GPU only
            print(f"gpu-check: TORCH_CUDA_ARCH_LIST={arch}", flush=True)
        dt = time.perf_counter() - t0
        status = "ok" if rc == 0 else f"FAILED (exit {rc})"
        rows.append(f"| {name} | {status} | {dt:.0f} | `{shlex.join(argv)[:200]}` |")
        print(f"=== gpu-check: {name} {'ok' if rc == 0 else 'FAILED'} in {dt:.0f} s", flush=True)
        failed |= rc != 0
        if rc != 0 and name != "tests":  # tests failing: still run the benchmark (more to look at)
            break
    total = time.perf_counter() - t_all
    try:
        out_dir = ROOT / cfg.out_dir
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "check.md").write_text("\n".join(
            ["# gpu-check", "", f"{'FAILED' if failed else 'passed'} in {total:.0f} s", "",
             "| step | status | s | command |", "|---|---|---|---|", *rows]) + "\n")
    except OSError as e:
        print(f"gpu-check: could not write check.md ({e})", file=sys.stderr)
    print(f"\ngpu-check {'FAILED' if failed else 'passed'} in {total:.0f} s", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
