"""Tensor-parallel check of the vLLM plugin on CPU: a 3-rank engine against the Hugging Face hooks reference.

SmolLM2-135M has 9 attention heads, so TP=3 is the smallest split vLLM accepts; on a 2-core machine the
three ranks share cores (``VLLM_CPU_OMP_THREADS_BIND``, set below unless given). Two steerings: LinEAS's
default sites (``mlp.down_proj:in`` — the input of a row-parallel linear, so each rank's table holds a
third of the columns) and the norms (replicated). Greedy tokens of 4 prompts × {unsteered, mlp_hidden at
0.5 and 1, norms at 1} must equal the reference token for token. Not part of ``make test`` (it takes
~3 min and needs the cores to itself). Run from the project root::

    .venv-vllm/bin/python benchmarks/vllm_tp_check.py [--tp 3] [--tokens 16]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("VLLM_PLUGINS", "lineas_fast")
os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "|".join(str(i % (os.cpu_count() or 1)) for i in range(3)))

PROMPTS = ["The weather today is", "I think that you are", "Once upon a time", "My favourite food is"]


def steerings(model, folder: Path) -> dict[str, str]:
    import torch

    import lineas_fast as lf

    out = {}
    for name, preset, scale, seed in [("a", "mlp_hidden", 0.08, 1), ("b", "norms", 0.05, 2)]:
        g = torch.Generator().manual_seed(seed)
        sites = lf.resolve_sites(model, preset)
        widths = {s: (model.get_submodule(s.split(":")[0]).in_features if s.endswith(":in")
                      else model.config.hidden_size) for s in sites}
        lf.Steering({s: 1 + scale * torch.randn(d, generator=g) for s, d in widths.items()},
                    {s: scale * torch.randn(d, generator=g) for s, d in widths.items()},
                    {"method": "check", "model_type": model.config.model_type}).save(folder / f"{name}.safetensors")
        out[name] = str(folder / f"{name}.safetensors")
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tp", type=int, default=3)
    p.add_argument("--tokens", type=int, default=16)
    args = p.parse_args()
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import lineas_fast as lf
    from lineas_fast.models import local_folder

    folder = local_folder("smollm2-135m")
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    files = steerings(model, Path(tempfile.mkdtemp(prefix="vllm_tp_")))
    configs = [(None, 1.0), ("a", 0.5), ("a", 1.0), ("b", 1.0)]
    ref = {}
    for name, strength in configs:
        for prompt in PROMPTS:
            ids = tok(prompt, return_tensors="pt").input_ids
            with torch.no_grad():
                if name is None:
                    out = model.generate(ids, max_new_tokens=args.tokens, do_sample=False)
                else:
                    with lf.steered(model, lf.Steering.load(files[name]), strength=strength, mode="hooks"):
                        out = model.generate(ids, max_new_tokens=args.tokens, do_sample=False)
            ref[(prompt, name, strength)] = out[0, ids.shape[1]:].tolist()
    del model

    from vllm import LLM, SamplingParams

    t0 = time.perf_counter()
    llm = LLM(str(folder), dtype="float32", gpu_memory_utilization=0.2, seed=0, max_model_len=512,
              enforce_eager=True, enable_prefix_caching=False, tensor_parallel_size=args.tp,
              additional_config={"lineas_fast": {"steerings": files}})
    print(f"engine with tensor_parallel_size={args.tp} up in {time.perf_counter() - t0:.0f} s", flush=True)
    failures = 0
    for name, strength in configs:
        xargs = None if name is None else {"steering": name, "strength": strength}
        got = llm.generate(PROMPTS, SamplingParams(max_tokens=args.tokens, temperature=0, extra_args=xargs))
        same = sum(list(r.outputs[0].token_ids) == ref[(p, name, strength)] for p, r in zip(PROMPTS, got))
        failures += same != len(PROMPTS)
        print(f"{name or 'unsteered'} @ {strength:g}: {same}/{len(PROMPTS)} prompts token-identical to the hooks "
              f"reference ({args.tokens} tokens)", flush=True)
    print("OK" if not failures else f"FAILED: {failures} configuration(s) differ")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
