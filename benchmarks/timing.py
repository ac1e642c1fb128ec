"""Timing helpers the kernel benchmarks share (SPEC §6 conventions): glibc malloc thresholds set before the
process starts, and A/B/C-interleaved samples with medians."""

from __future__ import annotations

import os
import statistics
import sys
import time

MALLOC = {"MALLOC_MMAP_THRESHOLD_": "1073741824", "MALLOC_TRIM_THRESHOLD_": "1073741824"}


def ensure_malloc_env() -> None:
    """Re-execute this script with the malloc thresholds set (glibc reads them only at start-up;
    without them large-tensor timings are bimodal)."""
    if any(os.environ.get(k) != v for k, v in MALLOC.items()):
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **MALLOC})


def calibrate(fn, target_s: float) -> int:
    """Calls per sample so that one sample takes about target_s."""
    fn()
    t = time.perf_counter()
    fn()
    return max(1, int(target_s / max(time.perf_counter() - t, 1e-6)))


def interleaved(fns: dict, repeats: int, target_s: float) -> dict:
    """Seconds per call of each candidate (samples taken in rotation A, B, C, A, B, C, ...): the median,
    and ``k/first`` = the median over rounds of the ratio to the first candidate's sample of the same
    round (robust to the load drifting during the run)."""
    inner = {k: calibrate(f, target_s) for k, f in fns.items()}
    samples = {k: [] for k in fns}
    for _ in range(repeats):
        for k, f in fns.items():
            t = time.perf_counter()
            for _ in range(inner[k]):
                f()
            samples[k].append((time.perf_counter() - t) / inner[k])
    first = next(iter(fns))
    out = {k: statistics.median(v) for k, v in samples.items()}
    for k, v in samples.items():
        out[f"{k}/first"] = statistics.median(a / b for a, b in zip(v, samples[first]))
    return out
