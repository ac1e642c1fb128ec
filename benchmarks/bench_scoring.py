"""The evaluation's two costs, side by side: passage-perplexity scoring and greedy generation.

Scoring: each round times, interleaved, on the demo's 39 eval WikiText passages (batches of 16): the
decoder's forward without the LM head (a lower bound), ``lf.evaluate.perplexity`` as shipped, and the
former formulation (cross-entropy over ``logits.transpose(1, 2)``) on the same batches. Prints the medians,
their ratios and the two PPLs (which must agree to 1e-3).

Generation (``--generate``): each round times ``lf.evaluate.continuations`` on the 300 eval prompts (greedy,
20 tokens, batches of 50) with one stream on every thread and with two streams (two batches at once, each
on half the threads), interleaved; the two must give every prompt the same tokens.

Fluency (``--fluency``): the demo's table scores three continuation sets of the 300 eval prompts under the
unsteered model; each round times them one ``lf.evaluate.fluency`` call per set and all together with
``lf.evaluate.fluencies`` (the prompts run once), interleaved. The sets are the unsteered model's
continuations at 20, 16 and 12 tokens (three different sets with the demo's lengths); the two ways must agree
to 1e-5.

Usage: python benchmarks/bench_scoring.py --threads 2 --rounds 3 [--generate] [--fluency] [--no-ppl]
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import torch


def _batches(tok, texts, batch_size=16, max_length=192):
    """The batches :func:`lineas_fast.evaluate.perplexity` scores: BOS + each passage, padded per batch."""
    from lineas_fast.evaluate.metrics import _pad

    rows = [[tok.bos_token_id] + tok(t, add_special_tokens=False)["input_ids"][:max_length] for t in texts]
    for i in range(0, len(rows), batch_size):
        yield _pad(rows[i:i + batch_size], tok.pad_token_id, "cpu")


def former_perplexity(model, tok, texts):
    """The scoring before the fix: same batches, cross-entropy over the vocabulary as dimension 1."""
    total, count = 0.0, 0
    with torch.no_grad():
        for ids, mask in _batches(tok, texts):
            pos = (mask.cumsum(-1) - 1).clamp(min=0)
            logits = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False).logits[:, :-1]
            nll = torch.nn.functional.cross_entropy(logits.float().transpose(1, 2), ids[:, 1:], reduction="none")
            keep = mask[:, 1:].bool()
            total, count = total + float(nll[keep].sum()), count + int(keep.sum())
    return math.exp(total / count)


def body_only(model, tok, texts):
    """The decoder's forward on the same batches, without the LM head or any scoring."""
    with torch.no_grad():
        for ids, mask in _batches(tok, texts):
            model.base_model(input_ids=ids, attention_mask=mask)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--generate", action="store_true", help="also time generation: one stream against two")
    ap.add_argument("--fluency", action="store_true", help="also time fluency: one pass per set against one for all")
    ap.add_argument("--no-ppl", action="store_true", help="skip the perplexity arms")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    import lineas_fast as lf
    from lineas_fast.data import wiki_passages

    model, tok = lf.load_model()
    if not args.no_ppl:
        scoring(model, tok, wiki_passages(tok, "eval"), args.rounds)
    if args.generate:
        generation(model, tok, args.rounds)
    if args.fluency:
        fluency(model, tok, args.rounds)


def scoring(model, tok, passages, rounds: int) -> None:
    """Perplexity as shipped against its lower bound and the former scoring, interleaved."""
    import lineas_fast as lf

    arms = {"forward only": lambda: body_only(model, tok, passages),
            "perplexity (shipped)": lambda: lf.evaluate.perplexity(model, tok, passages),
            "former scoring": lambda: former_perplexity(model, tok, passages)}
    times, ppl = {k: [] for k in arms}, {}
    for _ in range(rounds):
        for name, fn in arms.items():
            t0 = time.perf_counter()
            ppl[name] = fn()
            times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    print({k: [round(x, 2) for x in v] for k, v in times.items()})
    print(f"{len(passages)} passages, {rounds} rounds, {torch.get_num_threads()} threads (median s)")
    for name in arms:
        print(f"  {name:22s} {med[name]:6.2f} s  ({med[name] / med['forward only']:.2f}× the forward)")
    print(f"  former / shipped: {med['former scoring'] / med['perplexity (shipped)']:.2f}×;  "
          f"PPL {ppl['perplexity (shipped)']:.4f} (shipped) vs {ppl['former scoring']:.4f} (former)")
    assert abs(ppl["perplexity (shipped)"] / ppl["former scoring"] - 1) < 1e-3


def generation(model, tok, rounds: int) -> None:
    """Greedy continuations of the 300 eval prompts with one stream and with two, interleaved."""
    import lineas_fast as lf

    prompts = lf.data.load_texts("toxic", "eval")
    times, ids = {1: [], 2: []}, {}
    for _ in range(rounds):
        for streams in times:
            t0 = time.perf_counter()
            ids[streams] = lf.evaluate.continuations(model, tok, prompts, streams=streams)[1]
            times[streams].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    print({f"{k} stream(s)": [round(x, 2) for x in v] for k, v in times.items()})
    print(f"generation, {len(prompts)} prompts × 20 tokens: one stream {med[1]:.2f} s, two streams {med[2]:.2f} s "
          f"→ {med[1] / med[2]:.2f}×; same tokens for {sum(a == b for a, b in zip(ids[1], ids[2]))} of {len(prompts)}")
    assert ids[1] == ids[2]


def fluency(model, tok, rounds: int) -> None:
    """Fluency of three continuation sets of the 300 eval prompts: a pass per set against one for all."""
    import lineas_fast as lf

    prompts = lf.data.load_texts("toxic", "eval")
    full = lf.evaluate.continuations(model, tok, prompts)[1]
    sets = [full, [r[:16] for r in full], [r[:12] for r in full]]
    times, vals = {"a pass per set": [], "one for all": []}, {}
    for _ in range(rounds):
        t0 = time.perf_counter()
        vals["a pass per set"] = [lf.evaluate.fluency(model, tok, prompts, c) for c in sets]
        times["a pass per set"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        vals["one for all"] = lf.evaluate.fluencies(model, tok, prompts, sets)
        times["one for all"].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    print({k: [round(x, 2) for x in v] for k, v in times.items()})
    print(f"fluency of 3 sets × {len(prompts)} prompts: a pass per set {med['a pass per set']:.2f} s, one for all "
          f"{med['one for all']:.2f} s → {med['a pass per set'] / med['one for all']:.2f}×; values "
          + ", ".join(f"{a:.4f}/{b:.4f}" for a, b in zip(vals["a pass per set"], vals["one for all"])))
    assert all(abs(a / b - 1) < 1e-5 for a, b in zip(vals["a pass per set"], vals["one for all"]))


if __name__ == "__main__":
    main()
