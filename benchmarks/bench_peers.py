"""lineas_fast against the peer steering libraries, in the same process, applying the same steering.

The steering: one additive vector c_l per decoder layer on the residual stream after each block. Each
library expresses it its own way:

* ``lf_hooks`` / ``lf_fused`` / ``lf_fold``: an ``lf.Steering`` with ω = 1, b = c_l at the ``mlp_out``
  sites (``model.layers.l.mlp``; adding c to the MLP output of a Llama block adds it to the block output);
* ``repeng``: ``ControlModel`` over every layer + a ``ControlVector`` built from the same vectors (no
  training; repeng adds at the decoder block output, masking left-padding positions; its mask needs
  ``position_ids`` of shape [B, T], so every forward here passes them explicitly, as ``generate`` does);
* ``steering_vectors``: ``SteeringVector(layer_activations={l: c_l}, layer_type="decoder_block")``,
  applied with ``.apply(model)`` (block output, every token);
* ``pyvene``: an ``IntervenableModel`` with one ``AdditionIntervention`` per layer at ``block_output``
  whose fixed ``source_representation`` is c_l, called with no unit locations (= every position) and, for
  ``generate``, ``intervene_on_prompt=True`` (= prompt and every generated token);
* ``mlact_style``: a forward hook at the same ``mlp_out`` sites that does, per call, what Apple ml-act's
  ``InterventionHook.__call__`` + ``LinearOTHook.forward`` do (cast to the hook dtype fp32, per-neuron
  support mask ``lo < z < hi`` cast to float, the affine map, the strength blend, the masked blend
  ``m·z_ot + (1−m)·z``, cast back), with ω = 1, b = c_l, strength 1 and an infinite support (written
  here from that description; no ml-act code is used).

Equivalence first (asserted before anything is timed): every variant's prefill logits on a 2×32 batch
must match ``lf_hooks``' within 1e-4 × the largest logit, and its greedy continuations (4 tokens at batch
1 and 8) must be identical. Every variant runs on its own deep copy of the model (``peers/variants.py``),
attached once, so that all are live at the same time; then, per model (SPEC §6):

* decode latency: one cached greedy decode step at batch 1 and ``--batch``, all variants interleaved token
  by token (``timing.interleaved_steps``: ``--step-rounds`` rounds × ``--new-tokens`` steps, the starting
  variant rotating per step; the tokens of every steered variant must equal lf_hooks'). Pairing at the
  scale of one step cancels the machine's drift, which moves whole 2-second generates by ±10 % between
  rounds on this shared VM;
* prefill: one forward of batch 8 × 128 tokens, no cache (tokens/s), ``--repeats`` rotated rounds after a
  warm-up round;
* ratio = median over paired samples of (variant / unsteered), with the quartiles [q1–q3];
* ATen ops dispatched per cached decode step (torch profiler, one new token, batch 1).

``torch.compile`` of lineas_fast's modes is measured by ``bench_inference.py`` (main venv); the peers
are eager libraries.

Models: ``smollm2`` = the embedded SmolLM2-135M (``lf.load_model``), ``wide`` = a random Llama with
hidden 2048, intermediate 5632, 16 heads (4 KV heads), vocab 1024 and ``--wide-layers`` layers, built
from a ``LlamaConfig`` (no download) — the kernel-bound case.

Runs in the peers venv (``benchmarks/peers/setup.sh``), with lineas_fast from this source tree (the
script puts the repo root first on ``sys.path``; the C++ extension must have been built by ``make venv``):

    bash benchmarks/peers/setup.sh
    .venv-peers/bin/python benchmarks/bench_peers.py --threads 2 --out benchmarks/results/peers.json

(the script re-executes itself with the malloc thresholds if they are not set).
``--quick`` is a smoke run (tiny wide model, short decode, 1 round).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata as md
import io
import json
import os
import platform
import sys
import time
import warnings
from functools import partial
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))  # lineas_fast from this source tree (it is not installed in .venv-peers)
from peers.checks import check_equivalence, run_once
from peers.variants import (
    PEERS,
    build_model,
    make_steering,
    make_variants,
    make_vectors,
)
from timing import (
    ensure_malloc_env,
    fmt_ratio,
    hf_decoder,
    interleaved_steps,
    paired_ratios,
    rotated,
)


def _point_cache() -> None:
    """Under transformers 4.x use the peers venv's own embedded-model cache (setup.sh converted it there;
    a folder written by transformers 5.x does not load correctly under 4.x)."""
    import transformers

    if int(transformers.__version__.split(".")[0]) < 5:
        os.environ.setdefault("LINEAS_FAST_CACHE", str(Path(sys.prefix) / "lineas_fast_cache"))


# ----------------------------------------------------------------------------------------------------
# measurements
# ----------------------------------------------------------------------------------------------------

def gen_kwargs(ids, new_tokens: int) -> dict:
    import torch

    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "max_new_tokens": new_tokens,
            "min_new_tokens": new_tokens, "do_sample": False, "pad_token_id": 0}


def decode(v, ids, new_tokens: int):
    """(seconds, generated ids) of one greedy generate."""
    t0 = time.perf_counter()
    out = v.generate(**gen_kwargs(ids, new_tokens))
    dt = time.perf_counter() - t0
    assert out.shape[1] == ids.shape[1] + new_tokens, out.shape
    return dt, out


def positions(ids, start: int = 0):
    """Explicit ``position_ids`` [B, T] (what generate passes). Every forward here passes them: repeng's
    padding mask reshapes them to [B, T, 1] and crashes on the [1, T] ones HF makes when they are left out."""
    import torch

    b, t = ids.shape
    return torch.arange(start, start + t).expand(b, t)


def prefill(v, ids, pos):
    """(seconds, logits at every 8th position) of one forward without cache."""
    t0 = time.perf_counter()
    out = v.call(input_ids=ids, position_ids=pos, use_cache=False)
    dt = time.perf_counter() - t0
    return dt, out.logits[:, ::8].float().clone()


def ops_per_step(v, ids) -> int:
    """ATen ops dispatched by one cached decode step (a single new token), as in bench_decode.py."""
    from torch.profiler import ProfilerActivity, profile

    out = v.call(input_ids=ids, position_ids=positions(ids), use_cache=True)
    nxt = out.logits[:, -1:].argmax(-1)
    pos = positions(nxt, ids.shape[1])
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        v.call(input_ids=nxt, position_ids=pos, past_key_values=out.past_key_values, use_cache=True)
    return sum(e.count for e in prof.key_averages() if e.key.startswith("aten::"))


def measure_prefill(variants, ids, repeats: int) -> dict:
    """One no-cache forward per variant per round (:func:`timing.rotated`: the starting variant rotating,
    ``repeats`` rounds after a warm-up round); paired ratios to unsteered."""
    pos = positions(ids)
    return rotated({v.name: partial(prefill, v, ids, pos) for v in variants}, repeats, "unsteered")


def measure_steps(variants, ids, args) -> dict:
    """Cached greedy decode steps of every variant interleaved token by token (``timing.interleaved_steps``,
    ``--step-rounds`` rounds of ``--new-tokens`` steps); the steered variants' tokens must equal lf_hooks'."""
    import torch

    samples, states = interleaved_steps({v.name: hf_decoder(v.call, ids, position_ids=True) for v in variants},
                                        args.new_tokens, args.step_rounds)
    toks = {k: torch.cat(s[3], 1) for k, s in states.items()}
    differ = [k for k in toks if not k.startswith("unsteered") and not torch.equal(toks[k], toks["lf_hooks"])]
    if differ:
        raise AssertionError(f"greedy decode steps differ from lf_hooks': {differ}")
    return paired_ratios(samples, "unsteered")


def run_model(mname: str, args, log) -> dict:
    import torch

    t0 = time.perf_counter()
    model = build_model(mname, args)
    cfg = model.config
    log(f"\n# {mname}: hidden {cfg.hidden_size}, intermediate {cfg.intermediate_size}, "
        f"{cfg.num_hidden_layers} layers, vocab {cfg.vocab_size} ({time.perf_counter() - t0:.1f} s to build)")
    vectors = make_vectors(model, args.vector_scale)
    st = make_steering(model, vectors)
    res = {"config": {k: getattr(cfg, k) for k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                                     "num_attention_heads", "num_key_value_heads", "vocab_size")}}
    g = torch.Generator().manual_seed(1)
    ids = {b: torch.randint(3, cfg.vocab_size, (b, args.prompt_len), generator=g) for b in (1, args.batch)}
    pre = torch.randint(3, cfg.vocab_size, (args.prefill_batch, args.prefill_len), generator=g)
    small_pre = pre[:2, :32]
    small = {
        "decode_b1": lambda v: decode(v, ids[1], 4),
        f"decode_b{args.batch}": lambda v: decode(v, ids[args.batch], 4),
        "prefill": lambda v: prefill(v, small_pre, positions(small_pre)),
    }
    with torch.inference_mode():
        t = time.perf_counter()
        variants = make_variants(model, st, vectors)
        res["equivalence"] = check_equivalence(variants, small, log)
        res["aten_ops_per_decode_step"] = {}
        for v in variants:
            res["aten_ops_per_decode_step"][v.name] = run_once(v, {"ops": lambda v: (None, ops_per_step(v, ids[1]))})["ops"]
        log(f"  set-up and checks: {time.perf_counter() - t:.1f} s; timing {len(variants)} variants")
        for v in variants:
            v.attach()
        try:
            res["timings"] = {}
            for b in (1, args.batch):
                t = time.perf_counter()
                res["timings"][f"step_b{b}"] = measure_steps(variants, ids[b], args)
                log(f"  decode steps b{b}: {time.perf_counter() - t:.1f} s")
            t = time.perf_counter()
            res["timings"]["prefill"] = measure_prefill(variants, pre, args.repeats)
            log(f"  prefill: {time.perf_counter() - t:.1f} s")
        finally:
            for v in variants:
                v.detach()
    res["wall_s"] = round(time.perf_counter() - t0, 1)
    return res


# ----------------------------------------------------------------------------------------------------
# report
# ----------------------------------------------------------------------------------------------------

def table(mname: str, res: dict, args) -> str:
    tm, ops = res["timings"], res["aten_ops_per_decode_step"]
    wl = list(tm)
    ntok = args.prefill_batch * args.prefill_len
    lines = [(f"\n## {mname}: hidden {res['config']['hidden_size']}, {res['config']['num_hidden_layers']} layers "
              f"— {args.threads} threads\n"),
             ("time ratio = median over paired samples of (variant / unsteered, side by side), [q1–q3] their "
              f"quartiles; decode steps: {args.step_rounds} rounds × {args.new_tokens} tokens interleaved token by "
              f"token; prefill: {args.repeats} rotated rounds after a warm-up round.\n"),
             (f"| variant | decode step b1 ms | ratio | decode step b{args.batch} ms | ratio | "
              f"prefill {args.prefill_batch}×{args.prefill_len} tok/s | ratio | ATen ops/step |"),
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name in tm[wl[0]]:
        cells = [name]
        for w in wl:
            r = tm[w][name]
            cells += [f"{ntok / r['median_s']:.0f}" if w == "prefill" else f"{1e3 * r['median_s']:.1f}", fmt_ratio(r)]
        cells.append(f"{ops[name]:,}" if name in ops else "—")
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines.append("* unsteered_twin: the same unsteered work on another copy of the model — its distance from 1.000 "
                 "is this run's noise floor")
    for w in wl:  # the acceptance line of the issue: fused overhead <= every peer's
        fused = tm[w]["lf_fused"]["ratio"]
        peers = {p: tm[w][p]["ratio"] for p in PEERS if p in tm[w]}
        best = min(peers, key=peers.get)
        ok = all(fused <= r for r in peers.values())
        lines.append(f"* {w}: lf_fused {fused:.3f} vs cheapest peer {best} {peers[best]:.3f} → "
                     f"{'fused ≤ every peer' if ok else 'NOT ≤ every peer'}")
    eq = res["equivalence"]
    rows = {k: r for k, r in eq.items() if not k.startswith("_")}
    lines.append(f"* equivalence (max |Δlogit| vs lf_hooks on a 2×32 prefill + 4 greedy tokens at b1/b{args.batch}; "
                 f"logits up to {eq['_logit_scale']:.1f}, the steering moves them by "
                 f"{eq['_steered_vs_unsteered_max_abs']:.3g}): " + ", ".join(
                     f"{k} {r['max_abs_diff']:.2g}" for k, r in rows.items()) + "; identical greedy continuations: "
                 + ("all" if all(r["same_greedy_tokens"] for r in rows.values()) else "NOT all")
                 + "; the timed decode steps produced identical tokens in every steered variant")
    return "\n".join(lines)


def versions() -> dict:
    out = {}
    for p in ("torch", "transformers", "numpy", "repeng", "steering-vectors", "pyvene", "tokenizers"):
        try:
            out[p] = md.version(p)
        except md.PackageNotFoundError:
            out[p] = None
    import lineas_fast as lf

    out["lineas_fast"] = lf.__version__ if hasattr(lf, "__version__") else None
    out["lineas_fast_cpp"] = lf.env_report()["cpp"]["why"]
    out["python"] = platform.python_version()
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=4, help="timed prefill rounds per model (all variants in each)")
    p.add_argument("--step-rounds", type=int, default=2,
                   help="rounds of --new-tokens decode steps, all variants interleaved token by token")
    p.add_argument("--models", default="smollm2,wide", help="comma list of: smollm2, wide")
    p.add_argument("--wide-layers", type=int, default=2)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--batch", type=int, default=8, help="the batched decode's batch size")
    p.add_argument("--prompt-len", type=int, default=8)
    p.add_argument("--prefill-batch", type=int, default=8)
    p.add_argument("--prefill-len", type=int, default=128)
    p.add_argument("--vector-scale", type=float, default=0.1, help="std of the random steering vectors")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: tiny wide model, 4 new tokens, batch 2, prefill 2x16, 1 round")
    p.add_argument("--out", type=Path, help="write every number, the versions and the settings as JSON")
    args = p.parse_args()
    if args.quick:
        args.new_tokens, args.prefill_batch, args.prefill_len, args.batch = 4, 2, 16, 2
        if "--repeats" not in sys.argv:
            args.repeats = 1
        args.step_rounds = 1
    ensure_malloc_env()
    _point_cache()
    import torch

    import lineas_fast as lf  # noqa: F401

    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    import transformers

    transformers.logging.set_verbosity_error()
    logging_quiet()

    def log(msg: str) -> None:  # progress on stderr; stdout carries only the markdown report
        print(msg, file=sys.stderr, flush=True)

    t0 = time.perf_counter()
    vers = versions()
    log(f"versions: {json.dumps(vers)}")
    results = {"settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
               "versions": vers, "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                                              "torch_threads": torch.get_num_threads()},
               "models": {}}
    for mname in [m.strip() for m in args.models.split(",") if m.strip()]:
        results["models"][mname] = run_model(mname, args, log)
    results["wall_s"] = round(time.perf_counter() - t0, 1)
    results.update(summary(results))
    print(header(results, args))
    for mname, res in results["models"].items():
        print(table(mname, res, args))
    log(f"\ntotal wall time {results['wall_s']:.0f} s")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=1))
        log(f"wrote {args.out}")


def summary(results: dict) -> dict:
    """The issue's acceptance figure, per peer: ``fused_vs_peers[peer] = [lf_fused ratio, peer ratio, their
    standard errors, pairs, |unsteered_twin ratio - 1| (the run's noise floor)]`` on the
    model/workload where lf_fused fares worst against that peer (largest fused − peer), and the same for
    ATen ops per decode step (``ops_vs_peers``; deterministic, unlike the timings); every comparison in
    ``fused_vs_peers_all``."""
    worst, every, ops = {}, {}, {}
    for mname, res in results["models"].items():
        for w, per in res["timings"].items():
            fused = per["lf_fused"]
            for p in PEERS:
                if p not in per:
                    continue
                theirs = per[p]
                null = abs(per["unsteered_twin"]["ratio"] - 1) if "unsteered_twin" in per else 0.0
                pair = [fused["ratio"], theirs["ratio"], fused["ratio_se"], theirs["ratio_se"], fused["pairs"], null]
                every[f"{p}, {mname} {w}"] = pair
                if p not in worst or pair[0] - pair[1] > worst[p][2]:
                    worst[p] = (f"{p} (worst case: {mname} {w})", pair, pair[0] - pair[1])
        counts = res["aten_ops_per_decode_step"]
        for p in PEERS:
            if p in counts and "lf_fused" in counts:
                ops[f"{p}, {mname}"] = [counts["lf_fused"], counts[p], counts["unsteered"]]
    return {"fused_vs_peers": {k: v for k, v, _ in worst.values()}, "fused_vs_peers_all": every,
            "ops_vs_peers": ops}


def header(results: dict, args) -> str:
    v = results["versions"]
    return (f"Command: `.venv-peers/bin/python benchmarks/bench_peers.py --threads {args.threads} --repeats "
            f"{args.repeats} --step-rounds {args.step_rounds}{' --quick' if args.quick else ''}` (peers venv: "
            f"`bash benchmarks/peers/setup.sh`), {results['wall_s'] / 60:.1f} min. torch {v['torch']}, transformers "
            f"{v['transformers']}, repeng {v['repeng']}, steering-vectors {v['steering-vectors']}, pyvene "
            f"{v['pyvene']}. Steering: one random vector (std {args.vector_scale}) per decoder layer added to the "
            f"residual stream (lineas_fast: ω = 1, b = c at `mlp_out`; repeng / steering-vectors / pyvene: at the "
            f"block output; ml-act-style hook: at `mlp_out`). Decode: greedy cached steps after a "
            f"{args.prompt_len}-token prompt; prefill: {args.prefill_batch}×{args.prefill_len} tokens, no cache. "
            "Every variant's output is checked against lf_hooks before timing. The compiled lineas_fast modes are "
            "measured by bench_inference.py.")


def logging_quiet() -> None:
    """pyvene and HF log a warning per call on some paths; keep the output to the tables."""
    import logging

    for name in ("pyvene", "root", "transformers", "torch._dynamo", "torch._inductor"):
        logging.getLogger(name).setLevel(logging.ERROR)
    with contextlib.redirect_stdout(io.StringIO()):
        import pyvene  # noqa: F401  (its import prints a note about nnsight)


if __name__ == "__main__":
    main()
