"""Inference cost of steering (CPU): prefill throughput, decode latency, ATen ops per decode step, and
per-request routing — unsteered vs ``hooks`` / ``fused`` / ``fold``, eager and ``torch.compile``.

Models: SmolLM2-135M (the embedded default; 60 norm sites) and a tiny-but-wide random Llama (hidden 2048,
``--wide-layers`` layers; kernel-bound: big norms and matmuls, few layers). A random steering sits on
every norm site (the cost does not depend on the values).

Every mode runs on its own deep copy of the model, steered once, so that variants can be timed side by
side without patching in between; ratios are paired (variant / unsteered, sample by sample) and reported
as the median with the quartiles [q1–q3] of the paired ratios (SPEC §6):

* prefill: batch 8 × 128 tokens, one forward without cache (``logits_to_keep=1``: the LM head on the
  last position only, as generation does), tokens/s; copies rotated per round, ``--repeats`` rounds;
* step (the decode ratio the targets use): one cached greedy decode step at batch 1 and 8, the four
  copies interleaved token by token for ``--new-tokens`` steps × ``--step-rounds`` rounds — pairing
  at the scale of one step cancels the machine's drift, which moves whole 2-second generates by ±10 %
  between rounds on this shared VM; the greedy tokens of every steered copy must equal hooks';
* generate: ``--new-tokens``-token greedy ``generate`` latency (what a user waits for), rotated;
  static KV cache when compiled (each mode on its own compiled copy, wide model by default);
* ops: ATen ops dispatched by one cached decode step (torch profiler), eager;
* norm call: µs per call of one norm module as the model has it vs as ``fused`` replaces it — times the
  number of sites, the most fusing the norms can save per decode step (the bound for the decode ratio);
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
from functools import partial

import torch
from timing import (
    ensure_malloc_env,
    fmt_ratio,
    hf_decoder,
    interleaved_steps,
    paired_ratios,
    rotated,
)

import lineas_fast as lf

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


def steered_copies(model, st) -> dict:
    """One deep copy of ``model`` per mode, steered once: every measurement runs the copies side by side
    (no patching between samples; step-level interleaving needs all variants live at once)."""
    import copy

    copies = {}
    for mode in MODES:
        m = copy.deepcopy(model)
        if mode != "unsteered":
            lf.steer_(m, st, mode=mode)
        copies[mode] = m
    return copies


def private_forward(model, tag: str):
    """``model.forward`` bound to ``model`` with its own code object. Dynamo keeps one cache per code object
    and tries its entries newest first: copies sharing ``forward``'s code would each pay the guard checks
    of the copies compiled after them (the first copy compiled, unsteered, ran ~3 % slower for it)."""
    import types

    f = type(model).forward
    code = f.__code__.replace(co_name=f"{f.__code__.co_name}_{tag}")
    g = types.FunctionType(code, f.__globals__, code.co_name, f.__defaults__, f.__closure__)
    g.__kwdefaults__, g.__wrapped__ = f.__kwdefaults__, getattr(f, "__wrapped__", f)
    return g.__get__(model)


def compiled_decode(model, st, ids, args) -> dict:
    """Each variant on its own copy of the model, patched, then its ``forward`` compiled (static KV cache);
    every copy's compiled prefill is checked against its eager logits, then the copies' generates are
    timed in rotation (:func:`rotate`; ``first_call_s`` is the warm-up generate, which compiles)."""
    torch._dynamo.reset()
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    # by default dynamo does not guard on module hooks: the hooked copy would silently reuse the graph
    # compiled for the unsteered copy (same code object). Guard on them, and check every copy's logits.
    torch._dynamo.config.skip_nnmodule_hook_guards = False
    copies = steered_copies(model, st)
    for mode, m in copies.items():
        eager = m(ids).logits
        m.forward = torch.compile(private_forward(m, mode), dynamic=False)
        err = (m(ids).logits - eager).abs().max().item()
        if err > 1e-3 * max(1.0, eager.abs().max().item()):
            raise AssertionError(f"compiled {mode} differs from eager {mode} by {err}")
    timed = rotate(copies, lambda m: decode(m, ids, args.new_tokens, True), args.compile_repeats)
    return {f"{mode} +compile": r for mode, r in timed.items()}


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


def rotate(copies: dict, fn, repeats: int, warm_up: bool = True) -> dict:
    """``fn(model)`` for every copy, rotated rounds (:func:`timing.rotated`), paired ratios to unsteered."""
    return rotated({k: partial(fn, m) for k, m in copies.items()}, repeats, "unsteered", warm_up)


def decode_steps(copies: dict, ids, args) -> dict:
    """Per-token decode latency, all copies interleaved token by token (:func:`timing.interleaved_steps`);
    checks that every steered copy produced the same greedy tokens as the hooked one."""
    samples, states = interleaved_steps({k: hf_decoder(m, ids) for k, m in copies.items()}, args.new_tokens,
                                        args.step_rounds)
    toks = {k: torch.cat(state[3], 1) for k, state in states.items()}
    for k in copies:
        if k not in ("unsteered", "hooks") and not torch.equal(toks[k], toks["hooks"]):
            raise AssertionError(f"{k}: greedy tokens differ from hooks'")
    return paired_ratios(samples, "unsteered")


def norm_call_cost(model, st) -> dict:
    """Microseconds per call of one site's norm module, as the model has it vs as ``fused`` replaces it
    (batch 1, one token): the most that fusing the norms can save per decode step is sites × the
    difference — the bound the decode ratio is compared with."""
    from timing import interleaved

    site = st.sites[0]
    x = torch.randn(1, 1, st.scale[site].numel())
    plain = model.get_submodule(site)
    h = lf.steer_(model, st, mode="fused")
    try:
        fused = model.get_submodule(site)
        t = interleaved({"model's norm": lambda: plain(x), "fused": lambda: fused(x)}, repeats=9, target_s=0.02)
    finally:
        h.remove()
    return {"model_us": 1e6 * t["model's norm"], "fused_us": 1e6 * t["fused"], "sites": len(st.sites)}


def measure_model(label, model, tok_ids, args) -> dict:
    st = random_steering(model, 0)
    out = {"model": label, "sites": len(st.sites)}
    with torch.inference_mode():
        out["norm_call"] = norm_call_cost(model, st)
        copies = steered_copies(model, st)
        b8 = tok_ids(8, args.prefill_len)
        out["prefill"] = rotate(copies, lambda m: prefill(m, b8), args.repeats)
        for k in out["prefill"].values():
            k["tokens_per_s"] = 8 * args.prefill_len / k["median_s"]
        for batch in (1, 8):
            ids = tok_ids(batch, 16)
            out[f"step_b{batch}"] = decode_steps(copies, ids, args)
            # the decode steps warmed every copy up at this batch size
            out[f"decode_b{batch}"] = rotate(copies, lambda m, ids=ids: decode(m, ids, args.new_tokens, False),
                                             args.decode_repeats, warm_up=False)
        out["aten_ops_per_decode_step"] = {k: ops_per_step(m, tok_ids(1, 16)) for k, m in copies.items()}
        del copies
        if args.compile and label.split()[0].lower() in args.compile_models:  # a compilation per variant
            out["decode_b1_compiled"] = compiled_decode(model, st, tok_ids(1, 16), args)
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
        for rnd in range(args.routing_repeats + 1):
            h.route(["s0"] * 8)
            a = decode(model, ids, args.new_tokens, False)
            h.route(route)
            b = decode(model, ids, args.new_tokens, False)
            c = 0.0
            for name, rows in groups.items():
                if not rnd:  # warm-up round: the two single batches above are enough
                    break
                h.route([name] * len(rows))
                c += decode(model, ids[rows], args.new_tokens, False)
            if rnd:
                for key, val in zip(t, (a, b, c)):
                    t[key].append(val)
        h.remove()
    one = statistics.median(t["one steering"])
    return {k: {"median_s": statistics.median(v), "throughput_vs_one": one / statistics.median(v)} for k, v in t.items()}


def markdown(res: dict) -> str:
    a = res["settings"]
    lines = [f"Time ratios are to unsteered, paired side by side; [q1–q3] are the quartiles of the paired ratios. "
             f"*step*: one cached decode step, all four copies interleaved token by token ({a['step_rounds']} "
             f"rounds × {a['new_tokens']} tokens = {a['step_rounds'] * a['new_tokens']} pairs) — the decode "
             f"ratio the targets use; *generate*: {a['new_tokens']}-token greedy `generate` latency, rotated, "
             f"{a['decode_repeats']} round(s) — absolute ms only (its ratio is shown from 3 rounds on: whole "
             f"generates drift ±10 % between rounds); prefill: {a['repeats']} rounds.", ""]
    for m in res["models"]:
        lines += [f"### {m['model']} ({m['sites']} norm sites steered)", "",
                  "| variant | prefill 8×128 tok/s | ratio | step b1 ms | ratio | step b8 ms | ratio "
                  "| generate b1 ms | ratio | generate b8 ms | ratio |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for name in m["prefill"]:
            p = m["prefill"][name]
            cells = [name, f"{p['tokens_per_s']:.0f}", fmt_ratio(p)]
            for key in ("step_b1", "step_b8", "decode_b1", "decode_b8"):
                r = m[key][name]
                # a ratio of one or two whole generates is drift, not a measurement (see the step columns)
                ratio = fmt_ratio(r) if key.startswith("step") or r["pairs"] >= 3 else "—"
                cells += [f"{1e3 * r['median_s']:.1f}", ratio]
            lines.append("| " + " | ".join(cells) + " |")
        if "decode_b1_compiled" in m:
            lines += ["", "| torch.compile (static KV cache) | generate b1 ms | ratio vs compiled unsteered | "
                      "first generate s (compiles) |", "|---|---:|---:|---:|"]
            for name, d in m["decode_b1_compiled"].items():
                lines.append(f"| {name} | {1e3 * d['median_s']:.0f} | {fmt_ratio(d)} | {d['first_call_s']:.0f} |")
        nc = m["norm_call"]
        bound = 1 - nc["sites"] * (nc["model_us"] - nc["fused_us"]) * 1e-6 / m["step_b1"]["unsteered"]["median_s"]
        lines += ["", "ATen ops per cached decode step: " + ", ".join(
            f"{k} {v:,}" for k, v in m["aten_ops_per_decode_step"].items()) + ".",
            "", f"One norm call, batch 1: the model's module {nc['model_us']:.1f} µs, fused {nc['fused_us']:.1f} µs. "
            f"Fusing saves at most {nc['sites']} × {nc['model_us'] - nc['fused_us']:.1f} µs per decode step of "
            f"{1e3 * m['step_b1']['unsteered']['median_s']:.1f} ms: fused step b1 can reach **{bound:.3f}×** "
            f"unsteered at best on this machine.", ""]
    if "routing" in res:
        lines += ["### Per-request routing (SmolLM2, fused, decode batch 8)", "",
                  "| batch | median ms | throughput vs one steering |", "|---|---:|---:|"]
        for k, v in res["routing"].items():
            lines.append(f"| {k} | {1e3 * v['median_s']:.0f} | {v['throughput_vs_one']:.3f} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3, help="rounds for prefill (after a warm-up)")
    p.add_argument("--decode-repeats", type=int, default=1, help="rounds for the generate latency")
    p.add_argument("--step-rounds", type=int, default=2, help="rounds of token-interleaved decode steps")
    p.add_argument("--compile-repeats", type=int, default=3, help="rounds for the compiled generates")
    p.add_argument("--routing-repeats", type=int, default=2, help="rounds for per-request routing (after a warm-up)")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--prefill-len", type=int, default=128)
    p.add_argument("--wide-layers", type=int, default=2)
    p.add_argument("--no-compile", dest="compile", action="store_false", help="eager variants only")
    p.add_argument("--compile-models", default="random", metavar="LIST",
                   help="models whose compiled decode is measured: 'random' (the wide Llama) and/or 'smollm2-135m' "
                        "(each SmolLM2 variant takes about a minute to compile on 2 cores, four variants)")
    p.add_argument("--quick", action="store_true", help="smoke: 2 rounds, 8 tokens, prefill 32, 1 wide layer")
    p.add_argument("--out", default=None, metavar="FILE.json")
    args = p.parse_args()
    if args.quick:
        args.repeats = args.compile_repeats = args.routing_repeats = 2
        args.decode_repeats = args.step_rounds = 1
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
