"""Timing helpers every benchmark script shares (SPEC §6 conventions): glibc malloc thresholds set before
the process starts; A/B/C-interleaved samples with medians; paired ratios with quartiles; decode steps
interleaved token by token; and how much CPU other processes took meanwhile (busy rounds are re-run).

Imports only the standard library at module level: the peers venv (transformers 4.x) imports it too."""

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
    round (robust to the load drifting during the run), with its quartiles ``k/first_q1``, ``k/first_q3``."""
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
        q1, out[f"{k}/first"], q3 = quartiles(a / b for a, b in zip(v, samples[first]))
        out[f"{k}/first_q1"], out[f"{k}/first_q3"] = q1, q3
    return out


def quartiles(xs) -> tuple[float, float, float]:
    """(q1, median, q3) of a sample (inclusive method: exact for 2 or 3 values)."""
    xs = sorted(xs)
    if len(xs) == 1:
        return xs[0], xs[0], xs[0]
    q1, q2, q3 = statistics.quantiles(xs, n=4, method="inclusive")
    return q1, q2, q3


def paired_ratios(samples: dict, base: str) -> dict:
    """Per candidate: median seconds, and the ratio to ``base`` as the median (with quartiles) over
    paired samples — sample i of a candidate against sample i of ``base``, taken side by side — and
    ``ratio_se``, the median's standard error estimated from the quartiles (1.2533 σ / √n, σ = IQR / 1.349)."""
    out = {}
    for name, ts in samples.items():
        q1, med, q3 = quartiles(a / b for a, b in zip(ts, samples[base]))
        out[name] = {"median_s": statistics.median(ts), "ratio": med, "ratio_q1": q1, "ratio_q3": q3,
                     "ratio_se": 1.2533 * (q3 - q1) / 1.349 / len(ts) ** 0.5, "pairs": len(ts)}
    return out


def rotated(fns: dict, repeats: int, base: str, warm_up: bool = True) -> dict:
    """Each ``fns[name]()`` once per round, the starting one rotating from round to round (round r starts
    at r mod n), ``repeats`` timed rounds after a warm-up round (its times: ``first_call_s``) unless
    ``warm_up`` is False; :func:`paired_ratios` to ``base``."""
    names = list(fns)
    samples, warm = {k: [] for k in names}, {}
    for rnd in range(0 if warm_up else 1, repeats + 1):
        j = rnd % len(names)
        for k in names[j:] + names[:j]:
            t0 = time.perf_counter()
            fns[k]()
            dt = time.perf_counter() - t0
            if rnd:
                samples[k].append(dt)
            else:
                warm[k] = dt
    out = paired_ratios(samples, base)
    for k, t in warm.items():
        out[k]["first_call_s"] = t
    return out


T95 = {1: 12.71, 2: 4.30, 3: 3.18, 4: 2.78, 5: 2.57, 6: 2.45, 7: 2.36, 8: 2.31, 9: 2.26, 10: 2.23, 15: 2.13,
       20: 2.09, 30: 2.04}


def t95(pairs: int) -> float:
    """Two-sided 95 % Student t quantile for ``pairs - 1`` degrees of freedom (2.0 from 60 on): how many
    standard errors apart two medians must be before a difference counts as more than noise."""
    dof = max(1, pairs - 1)
    if dof >= 60:
        return 2.0
    return T95[max(k for k in T95 if k <= dof)]


def fmt_ratio(r: dict, unit: str = "") -> str:
    """A :func:`paired_ratios` entry as ``0.994 [0.988–1.011]`` (the quartiles; left out for the reference
    itself and for a single pair)."""
    spread = r.get("pairs", 2) > 1 and r.get("ratio_q1", r["ratio"]) != r.get("ratio_q3", r["ratio"])
    return f"{r['ratio']:.3f}{unit}" + (f" [{r['ratio_q1']:.3f}–{r['ratio_q3']:.3f}]" if spread else "")


def interleaved_steps(variants: dict, steps: int, rounds: int) -> tuple[dict, dict]:
    """Decode steps of several variants, interleaved token by token.

    ``variants`` maps a name to ``(start, step)``: ``start()`` runs the prompt (untimed) and returns a state,
    ``step(state)`` runs one cached decode step and returns the next state. Per round every variant starts,
    then each of ``steps`` steps is timed for every variant in turn, the starting variant rotating from step
    to step. Pairing step k of a variant with step k of the reference (same round) cancels the machine's
    drift, which on a shared 2-core VM moves whole 2-second generates by ±10 % between rounds.
    Returns ``({name: [seconds per step, ...]}, {name: last round's final state})``, samples aligned
    across variants.
    """
    names = list(variants)
    samples = {k: [] for k in names}
    for r in range(rounds):
        states = {k: variants[k][0]() for k in names}
        for i in range(steps):
            j = (r * steps + i) % len(names)
            for k in names[j:] + names[:j]:
                t = time.perf_counter()
                states[k] = variants[k][1](states[k])
                samples[k].append(time.perf_counter() - t)
    return samples, states


def hf_decoder(call, ids, position_ids: bool = False):
    """``(start, step)`` for :func:`interleaved_steps` over a HF causal LM's ``__call__`` (or a wrapper
    taking the same keywords): greedy, DynamicCache; the state carries the generated tokens, which
    :func:`interleaved_steps`' callers compare across variants. ``position_ids``: pass them explicitly
    (repeng's padding mask needs [B, T] ones)."""
    import torch

    def kw(x, start):
        d = {"input_ids": x, "use_cache": True}
        if position_ids:
            d["position_ids"] = torch.arange(start, start + x.shape[1]).expand(x.shape[0], -1)
        return d

    def start():
        out = call(**kw(ids, 0))
        nxt = out.logits[:, -1:].argmax(-1)
        return out.past_key_values, nxt, ids.shape[1], [nxt]

    def step(state):
        cache, nxt, pos, toks = state
        out = call(**kw(nxt, pos), past_key_values=cache)
        nxt = out.logits[:, -1:].argmax(-1)
        toks.append(nxt)
        return out.past_key_values, nxt, pos + 1, toks

    return start, step


def _cpu() -> tuple[float, float]:
    """(CPU seconds the whole machine has spent busy, CPU seconds of this process and its live children,
    e.g. inductor's compile workers)."""
    tick = os.sysconf("SC_CLK_TCK")
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    busy = sum(v) - v[3] - v[4]  # all but idle and iowait
    stats, parent = {}, {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            parent[int(d)], stats[int(d)] = int(fields[1]), sum(int(x) for x in fields[11:15])  # ppid; u,s,cu,cs

    def mine(pid):
        while pid > 1:
            if pid == os.getpid():
                return True
            pid = parent.get(pid, 0)
        return False

    return busy / tick, sum(t for pid, t in stats.items() if mine(pid)) / tick


class OtherLoad:
    """Context: how many cores' worth of CPU other processes used while it was open (``.cores``). On 2 cores
    another process's threads slow a 2-thread torch run many times over; such samples are re-taken."""

    def __enter__(self):
        self.t, (self.busy, self.own) = time.perf_counter(), _cpu()
        return self

    def __exit__(self, *exc):
        busy, own = _cpu()
        self.cores = max(0.0, (busy - self.busy) - (own - self.own)) / (time.perf_counter() - self.t)
