"""Inference cost of steering (CPU): prefill throughput, decode latency, ATen ops per decode step, and
per-request routing — unsteered vs ``hooks`` / ``fused`` / ``fold``, eager and ``torch.compile``.

Models: SmolLM2-135M (the embedded default; 60 norm sites) and a tiny-but-wide random Llama (hidden 2048,
``--wide-layers`` layers; kernel-bound: big norms and matmuls, few layers). A random steering sits on
every norm site (the cost does not depend on the values).

* prefill: batch 8 × 128 tokens, one forward without cache (``logits_to_keep=1``: the LM head on the
  last position only, as generation does), tokens/s;
* decode: greedy, batch 1 and 8, ``--new-tokens`` tokens; static KV cache when compiled;
* every variant of one measurement runs in rotation (A/B/C/D per round), medians over rounds, and
  ``ratio`` = the median over rounds of variant / unsteered of the same round;
* ops: ATen ops dispatched by one cached decode step (torch profiler), eager;
* routing (SmolLM2, fused, batch 8, decode): rows routed to 4 steerings + unsteered rows vs the same
  batch under one steering vs the 5 groups run as separate batches one after another.

Run (the malloc thresholds are set by re-executing the script):
    python benchmarks/bench_inference.py --threads 2 --out benchmarks/results/bench/inference.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from contextlib import nullcontext

import torch

import lineas_fast as lf
from timing import ensure_malloc_env

MODES = ("unsteered", "hooks", "fused", "fold")


def random_steering(model, seed: int, spread: float = 0.05) -> lf.Steering:
    from lineas_fast.sites import site_widths

    sites = lf.resolve_sites(model, "norms")
    g = torch.Generator().manual_seed(seed)
    widths = site_widths(model, sites)
    return lf.Steering({s: 1 + spread * torch.randn(widths[s], generator=g) for s in sites},
                       {s: spread * torch.randn(widths[s], generator=g) for s in sites},
                       {"model_type": model.config.model_type})


def wide_llama(layers: int):
    """Random Llama with SmolLM2's layout but hidden 2048 (norms and matmuls dominate, not dispatch)."""
    import transformers as T

    torch.manual_seed(0)
    cfg = T.LlamaConfig(vocab_size=8192, hidden_size=2048, intermediate_size=5632, num_hidden_layers=layers,
                        num_attention_heads=16, num_key_value_heads=4, max_position_embeddings=512,
                        pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=True)
    return T.AutoModelForCausalLM.from_config(cfg).eval()


class Variant:
    """One steering mode (eager); ``__enter__`` patches, ``__exit__`` restores."""

    def __init__(self, model, st, mode: str):
        self.model, self.st, self.mode, self.name = model, st, mode, mode

    def __enter__(self):
        self.handle = lf.steer_(self.model, self.st, mode=self.mode) if self.mode != "unsteered" else None
        return self

    def __exit__(self, *exc):
        if self.handle is not None:
            self.handle.remove()


def compiled_decode(model, st, ids, args) -> dict:
    """Each variant on its own copy of the model, patched and compiled once (static KV cache), then
    timed in rotation; ``first_call_s`` is the compiling first generate."""
    import copy

    torch._dynamo.reset()
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    # by default dynamo does not guard on module hooks: the hooked copy would silently reuse the graph
    # compiled for the unsteered copy (same code object). Guard on them, and check every copy's logits.
    torch._dynamo.config.skip_nnmodule_hook_guards = False
    copies = {}
    for mode in MODES:
        m = copy.deepcopy(model)
        if mode != "unsteered":
            lf.steer_(m, st, mode=mode)
        eager = m(ids).logits
        m.forward = torch.compile(type(m).forward.__get__(m), dynamic=False)
        err = (m(ids).logits - eager).abs().max().item()
        if err > 1e-3 * max(1.0, eager.abs().max().item()):
            raise AssertionError(f"compiled {mode} differs from eager {mode} by {err}")
        copies[mode] = m
    samples, first = {m: [] for m in MODES}, {}
    for rnd in range(args.decode_repeats + 1):
        for mode, m in copies.items():
            t = decode(m, ids, args.new_tokens, True)
            if rnd:
                samples[mode].append(t)
            else:
                first[mode] = t
    base = samples["unsteered"]
    return {f"{mode} +compile": {"median_s": statistics.median(v), "first_call_s": first[mode],
                                 "ratio": statistics.median(a / b for a, b in zip(v, base))} for mode, v in samples.items()}


def decode(model, ids, new_tokens: int, static: bool) -> float:
    kw = {"cache_implementation": "static"} if static else {}
    t0 = time.perf_counter()
    model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                   min_new_tokens=new_tokens, do_sample=False, pad_token_id=0, **kw)
    return time.perf_counter() - t0


def prefill(model, ids) -> float:
    t0 = time.perf_counter()
    model(input_ids=ids, use_cache=False, logits_to_keep=1)
    return time.perf_counter() - t0


def ops_per_step(model, ids) -> int:
    from torch.profiler import ProfilerActivity, profile

    out = model(input_ids=ids, use_cache=True)
    nxt = out.logits[:, -1:].argmax(-1)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        model(input_ids=nxt, past_key_values=out.past_key_values, use_cache=True)
    return sum(e.count for e in prof.key_averages() if e.key.startswith("aten::"))


def rotate(model, st, variants, fn, repeats: int) -> dict:
    """Each variant patched, warmed up, timed once per round, in rotation; medians and ratios."""
    samples = {v.name: [] for v in variants}
    warm = {}
    for rnd in range(repeats + 1):
        for v in variants:
            with v:
                if rnd == 0:  # warm-up round
                    t0 = time.perf_counter()
                    fn(v)
                    warm[v.name] = time.perf_counter() - t0
                    continue
                samples[v.name].append(fn(v))
    base = samples[variants[0].name]
    return {name: {"median_s": statistics.median(s), "ratio": statistics.median(a / b for a, b in zip(s, base)),
                   "first_call_s": warm[name], "samples": len(s)} for name, s in samples.items()}


def measure_model(label, model, tok_ids, args) -> dict:
    st = random_steering(model, 0)
    out = {"model": label, "sites": len(st.sites)}
    variants = [Variant(model, st, m) for m in MODES]
    with torch.inference_mode():
        b8 = tok_ids(8, args.prefill_len)
        out["prefill"] = rotate(model, st, variants, lambda v: prefill(model, b8), args.repeats)
        for k in out["prefill"].values():
            k["tokens_per_s"] = 8 * args.prefill_len / k["median_s"]
        for batch in (1, 8):
            ids = tok_ids(batch, 16)
            out[f"decode_b{batch}"] = rotate(model, st, variants,
                                             lambda v: decode(model, ids, args.new_tokens, False),
                                             args.decode_repeats)
        if args.compile and label.split()[0].lower() in args.compile_models:  # a compilation per variant and shape
            out["decode_b1_compiled"] = compiled_decode(model, st, tok_ids(1, 16), args)
        counts = {}
        for v in variants:
            with v:
                counts[v.name] = ops_per_step(model, tok_ids(1, 16))
        out["aten_ops_per_decode_step"] = counts
    return out


def routing(model, tok_ids, args) -> dict:
    many = {f"s{k}": random_steering(model, k + 1) for k in range(4)}
    route = ["s0", "s1", None, "s2", "s3", None, "s0", "s1"]
    ids = tok_ids(8, 16)
    groups = {}
    for i, name in enumerate(route):
        groups.setdefault(name, []).append(i)
    t = {"one steering": [], "mixed (4 steerings + unsteered)": [], "groups as separate batches": []}
    with torch.inference_mode():
        h = lf.steer_(model, many, mode="fused")
        for rnd in range(args.decode_repeats + 1):
            h.route(["s0"] * 8)
            a = decode(model, ids, args.new_tokens, False)
            h.route(route)
            b = decode(model, ids, args.new_tokens, False)
            c = 0.0
            for name, rows in groups.items():
                h.route([name] * len(rows))
                c += decode(model, ids[rows], args.new_tokens, False)
            if rnd:
                for key, val in zip(t, (a, b, c)):
                    t[key].append(val)
        h.remove()
    one = statistics.median(t["one steering"])
    return {k: {"median_s": statistics.median(v), "throughput_vs_one": one / statistics.median(v)} for k, v in t.items()}


def markdown(res: dict) -> str:
    lines = []
    for m in res["models"]:
        lines += [f"### {m['model']} ({m['sites']} norm sites steered)", "",
                  "| variant | prefill 8×128 tok/s | ratio | decode b1 ms | ratio | decode b8 ms | ratio | first call s |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|"]
        for name in m["prefill"]:
            p, d1, d8 = m["prefill"][name], m["decode_b1"][name], m["decode_b8"][name]
            lines.append(f"| {name} | {p['tokens_per_s']:.0f} | {p['median_s'] / m['prefill'][next(iter(m['prefill']))]['median_s']:.3f}"
                         f" | {1e3 * d1['median_s']:.0f} | {d1['ratio']:.3f} | {1e3 * d8['median_s']:.0f} | {d8['ratio']:.3f}"
                         f" | {max(p['first_call_s'], d1['first_call_s']):.1f} |")
        if "decode_b1_compiled" in m:
            lines += ["", "| torch.compile (static KV cache) | decode b1 ms | ratio vs compiled unsteered | compile s |",
                      "|---|---:|---:|---:|"]
            for name, d in m["decode_b1_compiled"].items():
                lines.append(f"| {name} | {1e3 * d['median_s']:.0f} | {d['ratio']:.3f} | {d['first_call_s']:.0f} |")
        lines += ["", "ATen ops per cached decode step: " + ", ".join(
            f"{k} {v:,}" for k, v in m["aten_ops_per_decode_step"].items()), ""]
    if "routing" in res:
        lines += ["### Per-request routing (SmolLM2, fused, decode batch 8)", "",
                  "| batch | median ms | throughput vs one steering |", "|---|---:|---:|"]
        for k, v in res["routing"].items():
            lines.append(f"| {k} | {1e3 * v['median_s']:.0f} | {v['throughput_vs_one']:.3f} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=7, help="rounds for prefill")
    p.add_argument("--decode-repeats", type=int, default=5, help="rounds for decode")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--prefill-len", type=int, default=128)
    p.add_argument("--wide-layers", type=int, default=4)
    p.add_argument("--no-compile", dest="compile", action="store_false", help="eager variants only")
    p.add_argument("--compile-models", default="random", metavar="LIST",
                   help="models whose compiled decode is measured: 'random' (the wide Llama) and/or 'smollm2-135m' "
                        "(each SmolLM2 variant takes about a minute to compile on 2 cores, four variants)")
    p.add_argument("--quick", action="store_true", help="smoke: 2 rounds, 8 tokens, prefill 32, 1 wide layer")
    p.add_argument("--out", default=None, metavar="FILE.json")
    args = p.parse_args()
    if args.quick:
        args.repeats = args.decode_repeats = 2
        args.new_tokens, args.prefill_len, args.wide_layers = 8, 32, 1
    ensure_malloc_env()
    torch.set_num_threads(args.threads)
    res = {"settings": vars(args), "models": []}
    model, tok = lf.load_model("smollm2-135m")
    text = "The history of the city begins with a small settlement on the river, " * 40
    base = tok([text], return_tensors="pt")["input_ids"][0]

    def tok_ids(batch, length):
        return base[:length].repeat(batch, 1)

    res["models"].append(measure_model("SmolLM2-135M", model, tok_ids, args))
    res["routing"] = routing(model, tok_ids, args)
    wide = wide_llama(args.wide_layers)
    res["models"].append(measure_model(f"random Llama, hidden 2048, {args.wide_layers} layers", wide,
                                       lambda b, n: torch.randint(3, 8192, (b, n), generator=torch.Generator().manual_seed(0)),
                                       args))
    print(markdown(res))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
