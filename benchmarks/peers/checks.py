"""Equivalence checks bench_peers.py runs before timing anything: every variant's prefill logits and greedy
continuations against ``lf_hooks``' (and the steering must change the unsteered output)."""

from __future__ import annotations


def run_once(v, workloads: dict) -> dict:
    """Each workload's output for variant ``v`` (a ``peers.variants.Variant``, attached for the duration)."""
    v.attach()
    try:
        return {w: fn(v)[1] for w, fn in workloads.items()}
    finally:
        v.detach()


def compare(outputs: dict, pairs: dict, inputs: str) -> dict:
    """``pairs``: variant -> reference variant. Prefill logits: max |Δ| (must be <= 1e-4 x the largest
    reference logit); greedy continuations: must be identical."""
    import torch

    res = {}
    for name, ref in pairs.items():
        a, b = outputs[name], outputs[ref]
        scale = max(1.0, b["prefill"].abs().max().item())
        diff = (a["prefill"] - b["prefill"]).abs().max().item()
        same = all(torch.equal(a[w], b[w]) for w in a if w != "prefill")
        res[name] = {"against": ref, "inputs": inputs, "max_abs_diff": diff, "logit_scale": scale,
                     "rel": diff / scale, "same_greedy_tokens": same, "ok": diff <= 1e-4 * scale and same}
    return res


def check_equivalence(variants, small: dict, log) -> dict:
    """Every variant's outputs on ``small`` workloads (a 2x32 prefill, 4 greedy tokens at batch 1 and N) vs
    lf_hooks'; raises if any differs, or if the steering changes nothing."""
    import torch

    outs = {v.name: run_once(v, small) for v in variants}
    ref = outs["lf_hooks"]["prefill"]
    res = {"_steered_vs_unsteered_max_abs": (outs["unsteered"]["prefill"] - ref).abs().max().item(),
           "_logit_scale": max(1.0, ref.abs().max().item()),
           "_unsteered_same_greedy_tokens": all(torch.equal(outs["unsteered"][w], outs["lf_hooks"][w])
                                                for w in small if w != "prefill")}
    assert res["_steered_vs_unsteered_max_abs"] > 1e-2 * res["_logit_scale"], "the steering changes nothing"
    res.update(compare(outs, {v.name: "lf_hooks" for v in variants if v.kind != "base" and v.name != "lf_hooks"},
                       "small"))
    log(f"  max |logit - lf_hooks| (logits up to {res['_logit_scale']:.1f}, steered vs unsteered "
        f"{res['_steered_vs_unsteered_max_abs']:.3g}): " + ", ".join(
            f"{k} {r['max_abs_diff']:.2g}{'' if r['same_greedy_tokens'] else ' (greedy tokens differ)'}"
            for k, r in res.items() if not k.startswith("_")))
    res["_failures"] = [k for k, r in res.items() if not k.startswith("_") and not r["ok"]]
    if res["_failures"]:
        raise AssertionError(f"not equivalent to lf_hooks: {res['_failures']}")
    return res
