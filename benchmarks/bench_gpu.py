"""GPU benchmark (CUDA only; step 5 of ``make gpu-check``): kernels and a decode step, written as Markdown.

The CPU scripts (``bench_kernels.py``, ``bench_inference.py``) time with host clocks and the C++ extension
and have no GPU mode; this is their GPU counterpart, small enough for the gpu-check budget:

* ``kernels.md`` — ``lineas::norm_affine`` forward and backward: the CUDA extension (the op, whose CUDA
  kernel is ``lineas_fast._C_cuda``'s), the Triton launcher, and eager PyTorch (HF-style norm, then
  ``reference.steer_rows``; backward: autograd through it); ``lineas::steered_linear`` forward: Triton (the
  op) vs plain ``F.linear`` vs eager (steer, then ``F.linear``). fp32 / bf16 / fp16; one steering
  broadcast to every row. µs per call: CUDA events around ``--inner`` calls, candidates interleaved,
  median of ``--repeats`` samples; GB/s counts x read + out written (backward: + grad_out, grad_x).
* ``inference.md`` — a random Llama (hidden 2048, ``--layers`` layers, bf16; steering on every norm site)
  for one greedy decode step with a static KV cache at batch 1 and 8: unsteered / hooks / fused eager,
  and unsteered / fused replayed as CUDA graphs (the fused routing buffers are updated in place, so a
  captured step stays valid). ms per step and the ratio to unsteered of the same kind.

    python benchmarks/bench_gpu.py --out-dir benchmarks/results/gpu --repeats 10

``decode_step`` and ``capture`` are shared with tests/test_gpu.py.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
NORM_SHAPES = [(4096, 2048), (8192, 4096)]  # [rows, d]: every row its own batch item
LINEAR_SHAPES = [(1024, 2048, 5632)]  # (M, K, N)


# ------------------------------------------------------------------ shared with tests/test_gpu.py
def decode_step(model, batch: int, prompt_len: int, seed: int = 0):
    """Prefill ``prompt_len`` random tokens into a StaticCache, then return ``step()``: one greedy decode
    step over fixed input buffers (logits ``[batch, 1, vocab]``), what a CUDA graph captures. Each call
    first rewinds the cache's device-side length, so it rewrites the same slot: calls are repeatable."""
    import inspect

    from transformers import StaticCache

    dev = next(model.parameters()).device
    g = torch.Generator().manual_seed(seed)
    vocab = model.config.vocab_size
    ids = torch.randint(3, vocab, (batch, prompt_len), generator=g).to(dev)
    cache = StaticCache(config=model.config, max_cache_len=prompt_len + 1)
    params = inspect.signature(model.forward).parameters
    kw = {"cache": cache} if "cache" in params else {"past_key_values": cache}  # transformers >= 5.2x: cache=
    with torch.no_grad():
        model(input_ids=ids, use_cache=True, **kw)
    tok = torch.randint(3, vocab, (batch, 1), generator=g).to(dev)
    if "cache_position" in params:  # older transformers take the position explicitly
        kw["cache_position"] = torch.tensor([prompt_len], device=dev)
    lengths = [t for t in (getattr(layer, "cumulative_length", None) for layer in getattr(cache, "layers", []))
               if isinstance(t, torch.Tensor)]  # newer ones advance a device-side length per call

    @torch.no_grad()
    def step():
        for t in lengths:
            t.fill_(prompt_len)
        return model(input_ids=tok, use_cache=True, **kw).logits

    return step


def capture(step, warmup: int = 2):
    """``(graph, out)``: ``step`` warmed up on a side stream (Triton compiles, cuBLAS handles), then captured;
    ``graph.replay()`` refreshes ``out``."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(warmup):
            step()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()
    return graph, out


# ------------------------------------------------------------------ timing
def time_cuda(fns: dict, repeats: int, inner: int) -> dict:
    """µs per call of each candidate: CUDA events around ``inner`` calls, candidates interleaved, median."""
    for f in fns.values():  # warm-up (Triton compiles here)
        f()
    torch.cuda.synchronize()
    samples = {k: [] for k in fns}
    for _ in range(repeats):
        for k, f in fns.items():
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            for _ in range(inner):
                f()
            b.record()
            b.synchronize()
            samples[k].append(a.elapsed_time(b) * 1e3 / inner)
    return {k: statistics.median(v) for k, v in samples.items()}


def _routing(dev):
    return torch.tensor([0], device=dev), torch.tensor([1.0], device=dev), torch.tensor([1], device=dev)


# ------------------------------------------------------------------ kernels
def bench_norm(shape, dname, kind, cfg, ref, kernels, ops) -> list[str]:
    dtype = DTYPES[dname]
    g = torch.Generator().manual_seed(0)
    rows, d = shape
    x = torch.randn(shape, generator=g).to("cuda", dtype)
    w = (1 + 0.1 * torch.randn(d, generator=g)).to("cuda", dtype)
    b = (0.1 * torch.randn(d, generator=g)).to("cuda", dtype) if kind == ref.LAYERNORM else None
    scale = (1 + 0.2 * torch.randn(2, d, generator=g)).cuda()
    shift = (0.1 * torch.randn(2, d, generator=g)).cuda()
    args = (w, b, 1e-5, kind, 0.0, scale, shift, *_routing("cuda"))

    def eager(xx, sc, sh):
        if kind == ref.LAYERNORM:
            y = F.layer_norm(xx, (d,), w, b, 1e-5)
        else:  # transformers' LlamaRMSNorm.forward
            h = xx.float()
            y = w * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-5)).to(dtype)
        return ref.steer_rows(y, sc, sh, *args[7:])

    fwd = time_cuda({"cuda_ext": lambda: ops.norm_affine(x, *args), "triton": lambda: kernels.norm_affine_fwd(x, *args),
                     "eager": lambda: eager(x, scale, shift)}, cfg.repeats, cfg.inner)
    go = torch.randn(shape, generator=g).to("cuda", dtype)
    xg, sg, hg = (t.detach().clone().requires_grad_() for t in (x, scale, shift))
    y = eager(xg, sg, hg)
    bwd = time_cuda({"cuda_ext": lambda: ops.norm_affine_backward(go, x, *args),
                     "triton": lambda: kernels.norm_affine_bwd(go, x, *args),
                     "eager": lambda: torch.autograd.grad(y, (xg, sg, hg), go, retain_graph=True)},
                    cfg.repeats, cfg.inner)
    nbytes = x.numel() * x.element_size()
    name = "LayerNorm" if kind == ref.LAYERNORM else "RMSNorm"
    lines = []
    for pas, t, moved in (("fwd", fwd, 2 * nbytes), ("bwd", bwd, 3 * nbytes)):
        lines.append(f"| {name} {pas} | {rows}×{d} | {dname} | {t['cuda_ext']:.1f} | {t['triton']:.1f} | "
                     f"{t['eager']:.1f} | {t['eager'] / t['cuda_ext']:.2f}× | {t['eager'] / t['triton']:.2f}× | "
                     f"{moved / t['cuda_ext'] / 1e3:.0f} | {moved / t['triton'] / 1e3:.0f} |")
    return lines


def bench_linear(shape, dname, where, cfg, ref, ops) -> str:
    dtype = DTYPES[dname]
    g = torch.Generator().manual_seed(0)
    M, K, N = shape
    x = torch.randn(M, K, generator=g).to("cuda", dtype)
    W = (torch.randn(N, K, generator=g) / K ** 0.5).to("cuda", dtype)
    bias = (0.1 * torch.randn(N, generator=g)).to("cuda", dtype)
    d = K if where == ref.PROLOGUE else N
    scale = (1 + 0.2 * torch.randn(2, d, generator=g)).cuda()
    shift = (0.1 * torch.randn(2, d, generator=g)).cuda()
    routing = _routing("cuda")

    def eager():
        if where == ref.PROLOGUE:
            return F.linear(ref.steer_rows(x, scale, shift, *routing), W, bias)
        return ref.steer_rows(F.linear(x, W, bias), scale, shift, *routing)

    t = time_cuda({"linear": lambda: F.linear(x, W, bias),
                   "triton": lambda: ops.steered_linear(x, W, bias, where, scale, shift, *routing),
                   "eager": eager}, cfg.repeats, cfg.inner)
    tflops = 2 * M * K * N / 1e6
    return (f"| {'prologue' if where == ref.PROLOGUE else 'epilogue'} | {M}×{K}×{N} | {dname} | "
            f"{t['linear']:.1f} | {t['triton']:.1f} | {t['eager']:.1f} | {t['triton'] / t['linear']:.2f}× | "
            f"{t['eager'] / t['linear']:.2f}× | {tflops / t['triton']:.0f} |")


def kernels_md(cfg) -> list[str]:
    from lineas_fast import kernels, ops
    from lineas_fast.ops import reference as ref

    out = ["## lineas::norm_affine (µs per call; speed-up = eager ÷ kernel; GB/s: x read + out written)", "",
           "| op | shape | dtype | CUDA ext µs | Triton µs | eager µs | ext speed-up | Triton speed-up | ext GB/s "
           "| Triton GB/s |", "|---|---|---|---|---|---|---|---|---|---|"]
    for shape in NORM_SHAPES:
        for dname in DTYPES:
            for kind in (ref.RMSNORM, ref.LAYERNORM):
                out += bench_norm(shape, dname, kind, cfg, ref, kernels, ops)
                print(out[-1], flush=True)
    out += ["", "## lineas::steered_linear forward (µs per call; ratios to plain F.linear; TFLOP/s of Triton)", "",
            "| site | M×K×N | dtype | F.linear µs | Triton µs | eager µs | Triton ÷ linear | eager ÷ linear "
            "| Triton TFLOP/s |", "|---|---|---|---|---|---|---|---|---|"]
    for shape in LINEAR_SHAPES:
        for dname in DTYPES:
            for where in (ref.PROLOGUE, ref.EPILOGUE):
                out.append(bench_linear(shape, dname, where, cfg, ref, ops))
                print(out[-1], flush=True)
    return out


# ------------------------------------------------------------------ inference
def inference_md(cfg) -> list[str]:
    import transformers as T

    import lineas_fast as lf
    from lineas_fast.sites import site_widths

    torch.manual_seed(0)
    conf = T.LlamaConfig(vocab_size=8192, hidden_size=2048, intermediate_size=5632, num_hidden_layers=cfg.layers,
                         num_attention_heads=16, num_key_value_heads=4, max_position_embeddings=512,
                         pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=True)
    base = T.AutoModelForCausalLM.from_config(conf).eval().to("cuda", torch.bfloat16)
    sites = lf.resolve_sites(base, "norms")
    widths = site_widths(base, sites)
    st = lf.Steering({s: 1 + 0.05 * torch.randn(widths[s]) for s in sites},
                     {s: 0.05 * torch.randn(widths[s]) for s in sites}, {"model_type": "llama"})
    out = [f"## Decode step, random Llama hidden 2048 × {cfg.layers} layers, bf16, {len(sites)} norm sites steered, "
           f"prompt {cfg.prompt_len} (ms per step; ratio to unsteered of the same kind)", "",
           "| batch | unsteered | hooks | fused | graph: unsteered | graph: fused | hooks ÷ unst. | fused ÷ unst. "
           "| graph fused ÷ graph unst. |", "|---|---|---|---|---|---|---|---|---|"]
    for batch in (1, 8):
        models = {m: copy.deepcopy(base) for m in ("unsteered", "hooks", "fused")}
        for m in ("hooks", "fused"):
            lf.steer_(models[m], st, mode=m)
        steps = {m: decode_step(mod, batch, cfg.prompt_len) for m, mod in models.items()}
        graphs = {m: capture(steps[m])[0] for m in ("unsteered", "fused")}
        t = time_cuda({**steps, **{f"graph {m}": g.replay for m, g in graphs.items()}}, cfg.repeats, cfg.inner)
        ms = {k: v / 1e3 for k, v in t.items()}
        out.append(f"| {batch} | {ms['unsteered']:.3f} | {ms['hooks']:.3f} | {ms['fused']:.3f} | "
                   f"{ms['graph unsteered']:.3f} | {ms['graph fused']:.3f} | {ms['hooks'] / ms['unsteered']:.2f} | "
                   f"{ms['fused'] / ms['unsteered']:.2f} | {ms['graph fused'] / ms['graph unsteered']:.2f} |")
        print(out[-1], flush=True)
        del models, steps, graphs
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out-dir", default="benchmarks/results/gpu")
    ap.add_argument("--repeats", type=int, default=10, help="samples per candidate (median reported)")
    ap.add_argument("--inner", type=int, default=20, help="calls per sample")
    ap.add_argument("--layers", type=int, default=2, help="decoder layers of the random Llama")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--only", choices=["kernels", "inference"])
    cfg = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_gpu.py: no CUDA device")
    from lineas_fast import backends

    report = backends.env_report()
    bad = {k: v["why"] for k, v in report.items() if k in ("cuda", "triton") and not v["usable"]}
    if bad:
        raise SystemExit(f"bench_gpu.py: GPU backends unusable: {bad}")
    head = [f"Command: `{' '.join([Path(sys.executable).name, *sys.argv])}`  ",
            f"Device: {torch.cuda.get_device_name()}, torch {torch.__version__} (CUDA {torch.version.cuda}); "
            f"repeats {cfg.repeats} × {cfg.inner} calls; registry on CUDA: {backends.decisions('cuda')['None']}", ""]
    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, fn in (("kernels", kernels_md), ("inference", inference_md)):
        if cfg.only in (None, name):
            t0 = time.perf_counter()
            lines = fn(cfg)
            lines += ["", f"Wall time {time.perf_counter() - t0:.0f} s."]
            (out_dir / f"{name}.md").write_text("\n".join([f"# GPU {name}", "", *head, *lines]) + "\n")
            print(f"wrote {out_dir / f'{name}.md'}", flush=True)


if __name__ == "__main__":
    main()
