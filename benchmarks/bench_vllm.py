"""Serving overhead of the vLLM steering plugin: throughput and latency against stock vLLM.

Starts two servers on the same model and options (float32, prefix caching off so that repeated rounds
do real work): **stock** vLLM with every plugin disabled, and ``lineas-fast serve`` with two steerings
(LinEAS's default sites and the norms). Then, in interleaved rounds (the order rotates every round):

* a batch of 16 concurrent requests, 64 new tokens each (``ignore_eos``) — output tokens/s — sent
  (1) to stock vLLM, (2) to the plugin server unsteered, (3) to the plugin server with mixed
  steerings/strengths (a third unsteered, a third each steering);
* one request, 32 new tokens — its latency — to the same three.

Reports medians and the ratios (3)/(1), (3)/(2) and (2)/(1) in ``benchmarks/results/bench/serving.md``
(+ ``.json``; the ``serving`` step of ``run_all.py``). Usage::

    .venv/bin/python benchmarks/bench_vllm.py [--rounds 7] [--eager] [--quick]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
MODEL = "smollm2-135m"
PROMPTS = ["The weather today is", "I think that you are", "Once upon a time", "My favourite food is",
           "You are such a", "The best way to learn is", "Yesterday the city council", "He looked at me and said"]


def make_steerings(folder: Path) -> dict[str, Path]:
    import lineas_fast as lf

    model, _ = lf.load_model(MODEL)
    out = {}
    for name, preset, scale, seed in [("detox", "mlp_hidden", 0.08, 1), ("norms", "norms", 0.05, 2)]:
        g = torch.Generator().manual_seed(seed)
        sites = lf.resolve_sites(model, preset)
        widths = {s: (model.get_submodule(s.split(":")[0]).in_features if s.endswith(":in")
                      else model.config.hidden_size) for s in sites}
        st = lf.Steering({s: 1 + scale * torch.randn(d, generator=g) for s, d in widths.items()},
                         {s: scale * torch.randn(d, generator=g) for s, d in widths.items()},
                         {"method": "bench", "model_type": model.config.model_type, "name_or_path": MODEL})
        out[name] = folder / f"{name}.safetensors"
        st.save(out[name])
    return out


def post(url: str, body: dict) -> dict:
    req = urllib.request.Request(url + "/v1/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=600) as r:
        return json.loads(r.read())


def body(model: str, prompt: str, tokens: int, steering=None) -> dict:
    b = {"model": model, "prompt": prompt, "max_tokens": tokens, "temperature": 0, "ignore_eos": True}
    if steering is not None:
        b["vllm_xargs"] = {"steering": steering[0], "strength": steering[1]}
    return b


def batch(url, model, steerings) -> float:
    """Output tokens/s of 16 concurrent requests (64 new tokens each)."""
    bodies = [body(model, PROMPTS[i % len(PROMPTS)], 64, steerings[i % len(steerings)]) for i in range(16)]
    t0 = time.perf_counter()
    with ThreadPoolExecutor(16) as pool:
        outs = list(pool.map(lambda b: post(url, b), bodies))
    wall = time.perf_counter() - t0
    return sum(o["usage"]["completion_tokens"] for o in outs) / wall


def single(url, model, steering) -> float:
    t0 = time.perf_counter()
    post(url, body(model, PROMPTS[0], 32, steering))
    return time.perf_counter() - t0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--eager", action="store_true", help="--enforce-eager on both servers (no torch.compile)")
    p.add_argument("--quick", action="store_true", help="smoke settings: 2 rounds, eager (not a result)")
    p.add_argument("--out", default=str(HERE / "results" / "bench" / "serving"))
    args = p.parse_args(argv)
    if args.quick:
        args.rounds, args.eager = 2, True
    from lineas_fast.models import local_folder
    from lineas_fast.vllm.launch import start

    common = ["--dtype", "float32", "--gpu-memory-utilization", "0.2", "--max-model-len", "512", "--seed", "0",
              "--no-enable-prefix-caching"] + (["--enforce-eager"] if args.eager else [])
    tmp = Path(tempfile.mkdtemp(prefix="bench_vllm_"))
    files = make_steerings(tmp)
    folder = local_folder(MODEL)
    t0 = time.perf_counter()
    stock = start(folder, vllm_args=common + ["--served-model-name", MODEL], log=tmp / "stock.log", stock=True)
    plugin = start(MODEL, {k: str(v) for k, v in files.items()}, vllm_args=common, log=tmp / "plugin.log")
    print(f"servers up in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    mixed = [None, ("detox", 1.0), ("norms", 0.5), None, ("detox", 0.5), ("norms", 1.0)]
    arms = {"stock": (stock.url, [None]), "plugin_unsteered": (plugin.url, [None]), "plugin_mixed": (plugin.url, mixed)}
    tput = {k: [] for k in arms}
    lat = {k: [] for k in arms}
    try:
        for url, steer in arms.values():  # warm-up
            batch(url, MODEL, steer)
            single(url, MODEL, steer[-1])
        names = list(arms)
        for r in range(args.rounds):
            order = names[r % 3:] + names[:r % 3]
            for k in order:
                url, steer = arms[k]
                tput[k].append(batch(url, MODEL, steer))
                lat[k].append(single(url, MODEL, steer[1 % len(steer)]))
            print(f"round {r + 1}/{args.rounds}: " + ", ".join(f"{k} {tput[k][-1]:.1f} tok/s {lat[k][-1]:.2f} s"
                                                              for k in names), file=sys.stderr)
    finally:
        stock.stop()
        plugin.stop()
    med_t = {k: statistics.median(v) for k, v in tput.items()}
    med_l = {k: statistics.median(v) for k, v in lat.items()}
    result = {"rounds": args.rounds, "eager": args.eager, "throughput_tok_s": tput, "latency_s": lat,
              "median_throughput": med_t, "median_latency": med_l,
              "ratios": {"mixed_vs_stock_throughput": med_t["plugin_mixed"] / med_t["stock"],
                         "mixed_vs_unsteered_throughput": med_t["plugin_mixed"] / med_t["plugin_unsteered"],
                         "unsteered_vs_stock_throughput": med_t["plugin_unsteered"] / med_t["stock"],
                         "steered_vs_stock_latency": med_l["plugin_mixed"] / med_l["stock"],
                         "steered_vs_unsteered_latency": med_l["plugin_mixed"] / med_l["plugin_unsteered"]},
              "torch": torch.__version__, "threads": torch.get_num_threads()}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    rt = result["ratios"]
    md = [f"# vLLM serving overhead ({'eager' if args.eager else 'compiled'}, CPU, {args.rounds} interleaved rounds)",
          "", "Command: `.venv/bin/python benchmarks/bench_vllm.py" + (" --eager" if args.eager else "")
          + f" --rounds {args.rounds}`", "",
          "| arm | batch of 16 × 64 tokens: output tok/s (median) | single request, 32 tokens: latency s (median) |",
          "|---|---:|---:|"]
    md += [f"| {k} | {med_t[k]:.1f} | {med_l[k]:.3f} |" for k in arms]
    md += ["", f"* mixed-steering batch vs stock vLLM: **{rt['mixed_vs_stock_throughput']:.3f}×** throughput; "
               f"vs the same server unsteered: **{rt['mixed_vs_unsteered_throughput']:.3f}×**",
           f"* plugin server unsteered vs stock: {rt['unsteered_vs_stock_throughput']:.3f}× throughput",
           f"* steered single request vs stock: **{rt['steered_vs_stock_latency']:.3f}×** latency; vs unsteered "
           f"on the same server: {rt['steered_vs_unsteered_latency']:.3f}×", ""]
    out.with_suffix(".md").write_text("\n".join(md))
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
