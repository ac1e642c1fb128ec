"""Inference overhead of steering on SmolLM2-135M (CPU): greedy decode latency, ATen ops per decode step,
and mixed-routing throughput.

* latency: batch 1, ``--new-tokens`` greedy tokens, 60 norm sites steered, for unsteered / hooks /
  fused / fold, interleaved (A/B/C/D per repeat), median of ``--repeats``; ratios vs unsteered.
* ops per decode step: ATen ops dispatched (torch profiler) for one forward of one new token with a
  KV cache, for unsteered / hooks / fused.
* routing: a batch of 8 rows routed to 4 different steerings + unsteered rows vs the same batch under
  one steering (fused mode), tokens/s ratio.

Run (glibc malloc thresholds must be set before the process starts):
    MALLOC_MMAP_THRESHOLD_=1073741824 MALLOC_TRIM_THRESHOLD_=1073741824 \\
        python benchmarks/bench_decode.py --threads 2 --repeats 15
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import lineas_fast as lf


def random_steering(model, seed: int, spread: float = 0.05) -> lf.Steering:
    """Small random maps on every norm site (the cost does not depend on the values)."""
    from lineas_fast.sites import site_widths

    sites = lf.resolve_sites(model, "norms")
    g = torch.Generator().manual_seed(seed)
    widths = site_widths(model, sites)
    return lf.Steering({s: 1 + spread * torch.randn(widths[s], generator=g) for s in sites},
                       {s: spread * torch.randn(widths[s], generator=g) for s in sites},
                       {"model_type": model.config.model_type})


def decode(model, ids, new_tokens: int) -> float:
    t0 = time.perf_counter()
    model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                   min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    return time.perf_counter() - t0


def ops_per_step(model, ids) -> int:
    """ATen ops dispatched by one cached decode step (a single new token)."""
    from torch.profiler import ProfilerActivity, profile

    out = model(input_ids=ids, use_cache=True)
    nxt = out.logits[:, -1:].argmax(-1)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        model(input_ids=nxt, past_key_values=out.past_key_values, use_cache=True)
    return sum(e.count for e in prof.key_averages() if e.key.startswith("aten::"))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--new-tokens", type=int, default=32)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    model, tok = lf.load_model("smollm2-135m")
    ids = tok(["The history of the city begins"], return_tensors="pt")["input_ids"]
    st = random_steering(model, 0)
    print(f"backends: {lf.env_report()['cpp']['why']}")

    def variants():
        yield "unsteered", None
        for mode in ("hooks", "fused", "fold"):
            yield mode, mode

    times: dict[str, list[float]] = {name: [] for name, _ in variants()}
    with torch.inference_mode():
        for rep in range(args.repeats + 1):
            for name, mode in variants():
                h = lf.steer_(model, st, mode=mode) if mode else None
                t = decode(model, ids, args.new_tokens)
                if h:
                    h.remove()
                if rep:  # the first round warms up
                    times[name].append(t)
    base = statistics.median(times["unsteered"])
    print(f"\n## Greedy decode, batch 1, {args.new_tokens} new tokens, 60 norm sites, {args.threads} threads, "
          f"median of {args.repeats}\n")
    print("| variant | median ms | ratio vs unsteered |\n|---|---:|---:|")
    for name, ts in times.items():
        m = statistics.median(ts)
        print(f"| {name} | {1e3 * m:.1f} | {m / base:.3f} |")

    counts = {}
    with torch.inference_mode():
        for name, mode in (("unsteered", None), ("hooks", "hooks"), ("fused", "fused")):
            h = lf.steer_(model, st, mode=mode) if mode else None
            counts[name] = ops_per_step(model, ids)
            if h:
                h.remove()
    print("\n## ATen ops per cached decode step\n\n| variant | aten ops |\n|---|---:|")
    for name, c in counts.items():
        print(f"| {name} | {c} |")

    batch = tok(["The history of the city begins"] * 8, return_tensors="pt")["input_ids"]
    many = {f"s{k}": random_steering(model, k + 1) for k in range(4)}
    route = ["s0", "s1", None, "s2", "s3", None, "s0", "s1"]
    t_one, t_mixed = [], []
    with torch.inference_mode():
        h = lf.steer_(model, many, mode="fused")
        for rep in range(args.repeats + 1):
            h.route(["s0"] * 8)
            a = decode(model, batch, args.new_tokens)
            h.route(route)
            b = decode(model, batch, args.new_tokens)
            if rep:
                t_one.append(a)
                t_mixed.append(b)
        h.remove()
    ratio = statistics.median(t_one) / statistics.median(t_mixed)
    print(f"\n## Batch of 8, {args.new_tokens} new tokens, fused: 4 steerings + unsteered rows vs one steering\n")
    print(f"| routing | median ms | throughput vs one steering |\n|---|---:|---:|\n"
          f"| one steering | {1e3 * statistics.median(t_one):.1f} | 1.000 |\n"
          f"| 4 steerings + unsteered | {1e3 * statistics.median(t_mixed):.1f} | {ratio:.3f} |")


if __name__ == "__main__":
    main()
