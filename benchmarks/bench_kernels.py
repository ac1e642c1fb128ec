"""CPU kernel benchmark: the C++ ops vs eager PyTorch vs ``torch.compile`` of the same eager code, with
achieved bandwidth (norm) or GFLOP/s (steered Linear) — the Benchmarks issue's "Kernels" item.

``lineas::norm_affine`` (LayerNorm and RMSNorm, forward and backward), x of shape [1024, 576],
[4096, 2048] and [8192, 4096] (2-D: every row is its own batch item), fp32 and bf16. Candidates, timed
side by side (samples taken in rotation, each sample a loop of calls lasting about --sample-ms; medians
of --repeats; ratios are medians over rounds of the per-round ratio):

* ``op``       — ``torch.ops.lineas.norm_affine`` / ``norm_affine_backward`` (C++ CPU kernel);
* ``eager``    — what a user writes without the fused op: HF-style RMSNorm (``x.float()``,
  ``pow(2).mean(-1, keepdim=True)``, ``rsqrt``, multiply, cast back, ``weight *``) or ``F.layer_norm``,
  then the per-row steering ``reference.steer_rows`` (table lookup + ``y*a + c`` in fp32, cast back);
  backward: ``torch.autograd.grad`` w.r.t. x, scale and shift through that graph (built once, only the
  backward timed);
* ``compiled`` — ``torch.compile(eager, backend="inductor", dynamic=False, fullgraph=True)`` of that same
  function (a fresh compile per case after ``torch._dynamo.reset()``; compile time is excluded from the
  timings — the first calls warm up — and printed in the ``compile`` column: fwd rows the first no-grad
  call, bwd rows the first forward with grad + first backward; the very first case also pays the
  one-time dynamo/inductor start-up);
* ``memcpy``   — ``dst.copy_(src)`` of 256 MiB, interleaved with the others in every case.

Bandwidth: bytes of an ideal single pass = every tensor the op reads once (x, weight, bias, scale/shift
tables, routing; backward also grad_out) + every tensor it writes once (out; backward grad_x,
grad_scale, grad_shift), divided by the op's time. memcpy bandwidth counts the same way: read + write =
2 × 256 MiB per copy (write-allocate traffic is not counted on either side). ``of memcpy`` = the op's
GB/s over memcpy's GB/s, per round, median. At [1024, 576] x and out fit in the last-level cache, so
that fraction can exceed 1; [8192, 4096] (128 MiB per fp32 tensor) is DRAM-bound like the memcpy.

``lineas::steered_linear`` (compute-bound: GFLOP/s instead of GB/s) at SmolLM2-135M's MLP shapes
([1024, 576] × [1536, 576]ᵀ up/gate projection and [1024, 1536] × [576, 1536]ᵀ down projection) and
TinyLlama-1.1B's ([1024, 2048] × [5632, 2048]ᵀ and [1024, 5632] × [2048, 5632]ᵀ), 1024 tokens each,
prologue (an ``:in`` site, the Linear's input steered) and epilogue (its output steered): ``linear`` =
plain ``F.linear(x, W, b)`` (the baseline of the ≤ 1.05× target), ``op``, ``eager`` (``steer_rows``
before or after ``F.linear``) and ``compiled`` (of that eager function). Backward: the baseline is
``go @ W`` (grad_x of a frozen plain Linear, one matmul); GFLOP/s counts 2·M·K·N for either pass (the
epilogue backward op recomputes the Linear's output for grad_scale: two matmuls).

Steering: one dense steering at strength 1 broadcast to every row (R = 1), or ``--routing rows`` (R = B,
ids cycling 0, 1, -1, strengths varying). The script re-executes itself with glibc's
MALLOC_MMAP_THRESHOLD_ / MALLOC_TRIM_THRESHOLD_ set (large-tensor timings are bimodal otherwise).
Run time: the full run (defaults: 2 threads, --repeats 5, --sample-ms 20; 28 cases, each compiling a
forward and a training graph) took 4.4 minutes with 7 repeats of 25 ms on this project's 2-core AVX-512
VM (compiling adds 2-6 s per case with a cold inductor cache). ``--quick`` (one small shape per op, 3 repeats): about 25 s warm, about a minute cold.

    python benchmarks/bench_kernels.py --threads 2 --out benchmarks/results/kernels_cpu.json \\
        --plot benchmarks/results/kernels_cpu.png

(It superseded the per-op scripts ``bench_norm_affine.py`` and ``bench_steered_linear.py``, removed.)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

# benchmarks/ (the script folder) is on sys.path
from timing import ensure_malloc_env, interleaved

ensure_malloc_env()  # must happen before torch allocates anything

import lineas_fast._C  # registers the CPU kernels (fails here if the extension is not built)
import torch
import torch.nn.functional as F

from lineas_fast.ops import reference as ref

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
KINDS = {"LayerNorm": ref.LAYERNORM, "RMSNorm": ref.RMSNORM}
WHERE = {"prologue": ref.PROLOGUE, "epilogue": ref.EPILOGUE}
EPS = 1e-5
NORM_SHAPES = [(1024, 576), (4096, 2048), (8192, 4096)]
LINEAR_SHAPES = [(1024, 576, 1536), (1024, 1536, 576), (1024, 2048, 5632), (1024, 5632, 2048)]  # (M, K, N)
QUICK_NORM_SHAPES, QUICK_LINEAR_SHAPES = [(1024, 576)], [(512, 576, 1536)]
MEMCPY_BYTES = 256 << 20


# ------------------------------------------------------------------ cases (shared with the older scripts)
def _routing(B: int, routing: str):
    if routing == "broadcast":
        return torch.tensor([0]), torch.tensor([1.0]), torch.tensor([1])
    return torch.tensor([0, 1, -1]).repeat(B // 3 + 1)[:B], torch.linspace(0.2, 1.5, B), torch.tensor([B])


def norm_case(shape, dtype, kind, routing="broadcast", seed=0):
    """``norm_affine`` op args: x, weight/bias in x's dtype (as a model holds them), a dense 2-entry fp32
    table and the routing."""
    g = torch.Generator().manual_seed(seed)
    B, d = shape
    x = torch.randn(shape, generator=g).to(dtype)
    w = (1 + 0.1 * torch.randn(d, generator=g)).to(dtype)
    b = (0.1 * torch.randn(d, generator=g)).to(dtype) if kind == ref.LAYERNORM else None
    scale, shift = 1 + 0.2 * torch.randn(2, d, generator=g), 0.1 * torch.randn(2, d, generator=g)
    return (x, w, b, EPS, kind, 0.0, scale, shift, *_routing(B, routing))


def eager_norm(x, w, b, kind, eps=EPS):
    if kind == ref.LAYERNORM:
        return F.layer_norm(x, x.shape[-1:], w, b, eps)
    h = x.float()  # transformers' LlamaRMSNorm.forward
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return w * h.to(x.dtype)


def eager_norm_affine(x, w, b, eps, kind, weight_offset, scale, shift, ids, strength, nrows):
    """The eager baseline with the op's signature: HF-style norm, then the per-row steering."""
    return ref.steer_rows(eager_norm(x, w, b, kind, eps), scale, shift, ids, strength, nrows)


def linear_case(shape, dtype, where, routing="broadcast", seed=0):
    """``steered_linear`` op args: x, W, b in x's dtype; a dense 2-entry fp32 table of width in_features
    (prologue) or out_features (epilogue); the routing."""
    g = torch.Generator().manual_seed(seed)
    M, d_in, d_out = shape
    x = torch.randn(M, d_in, generator=g).to(dtype)
    w = (torch.randn(d_out, d_in, generator=g) / d_in ** 0.5).to(dtype)
    b = (0.1 * torch.randn(d_out, generator=g)).to(dtype)
    d = d_in if where == ref.PROLOGUE else d_out
    scale, shift = 1 + 0.2 * torch.randn(2, d, generator=g), 0.1 * torch.randn(2, d, generator=g)
    return (x, w, b, where, scale, shift, *_routing(M, routing))


def eager_steered_linear(x, w, b, where, scale, shift, ids, strength, nrows):
    """What a steering hook does without the op: ``steer_rows`` before or after ``F.linear``."""
    if where == ref.PROLOGUE:
        return F.linear(ref.steer_rows(x, scale, shift, ids, strength, nrows), w, b)
    return ref.steer_rows(F.linear(x, w, b), scale, shift, ids, strength, nrows)


def grad_closure(fn, args, go, wrt=(0, 6, 7)):
    """Build ``fn(*args)``'s graph once with the args at positions ``wrt`` (x, scale, shift) requiring
    grad; return a closure that runs only its backward (``torch.autograd.grad``, graph retained)."""
    a = list(args)
    for i in wrt:
        a[i] = a[i].detach().clone().requires_grad_()
    out = fn(*a)
    inputs = tuple(a[i] for i in wrt)
    return lambda: torch.autograd.grad(out, inputs, go, retain_graph=True)


LINEAR_WRT = (0, 4, 5)  # x, scale, shift in the steered_linear signature


# ------------------------------------------------------------------ helpers
def nbytes(*ts) -> int:
    return sum(t.numel() * t.element_size() for t in ts if isinstance(t, torch.Tensor))


def compile_fn(fn):
    torch._dynamo.reset()  # a fresh cache per case: no recompile limit, no stale guards
    return torch.compile(fn, backend="inductor", dynamic=False, fullgraph=True)


def timed(f):
    t = time.perf_counter()
    out = f()
    return out, time.perf_counter() - t


def check_close(name, got, want, dtype):
    """The candidates must compute the same thing (a broken setup would make every ratio meaningless)."""
    for g_, w_ in zip(got if isinstance(got, tuple) else (got,), want if isinstance(want, tuple) else (want,)):
        scale = max(1.0, w_.float().abs().max().item())
        err = (g_.float() - w_.float()).abs().max().item()
        if err > (1e-3 if dtype == torch.float32 else 6e-2) * scale:
            raise AssertionError(f"{name}: max abs diff {err:.3g} (magnitude {scale:.3g})")


def kernel_isa() -> str:
    """The ISA variant the C++ kernels dispatch to (same rule as ``cpu_isa`` in csrc/cpu_kernels.h)."""
    flags = cpu_flags()
    best = "avx2" if {"avx2", "fma"} <= flags else "default"
    if best == "avx2" and {"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= flags:
        best = "avx512"
    cap = os.environ.get("LINEAS_FAST_CPU_ISA")
    order = ["default", "avx2", "avx512"]
    if cap in order and order.index(cap) < order.index(best):
        best = cap
    return best


def cpu_flags() -> set:
    try:
        with open("/proc/cpuinfo") as f:
            return set(next((ln.split(":", 1)[1].split() for ln in f if ln.startswith("flags")), []))
    except OSError:
        return set()


def machine_info(threads: int) -> dict:
    model = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            model = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), model)
    except OSError:
        pass
    from lineas_fast.backends import env_report

    return {
        "cpu_model": model, "logical_cores": os.cpu_count(), "usable_cores": len(os.sched_getaffinity(0)),
        "threads": threads, "torch": torch.__version__, "python": platform.python_version(),
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(), "kernel_isa": kernel_isa(),
        "cpu_flags": sorted(cpu_flags() & {"avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512dq",
                                           "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_tile"}),
        "openmp": lineas_fast._C.has_openmp(), "env_report": env_report(),
        "env": {k: os.environ.get(k) for k in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "OMP_NUM_THREADS",
                                               "LINEAS_FAST_CPU_ISA")},
        "load_avg_start": os.getloadavg(),
    }


def measure_memcpy(repeats: int, target_s: float):
    src = torch.ones(MEMCPY_BYTES // 4)
    dst = torch.empty_like(src)
    t = interleaved({"memcpy": lambda: dst.copy_(src)}, repeats, target_s)["memcpy"]
    return (src, dst), 2 * MEMCPY_BYTES / t / 1e9


def shape_label(shape) -> str:
    return "×".join(map(str, shape))


# ------------------------------------------------------------------ norm_affine
def bench_norm(shape, dname, kname, cfg, bufs):
    dtype, kind = DTYPES[dname], KINDS[kname]
    args = norm_case(shape, dtype, kind, cfg.routing)
    src, dst = bufs
    memcpy = lambda: dst.copy_(src)
    mc_bytes = 2 * MEMCPY_BYTES
    op, bop = torch.ops.lineas.norm_affine, torch.ops.lineas.norm_affine_backward
    cf = compile_fn(eager_norm_affine)
    with torch.no_grad():
        _, c_fwd = timed(lambda: cf(*args))
        out = op(*args)
        check_close(f"norm fwd {kname} {dname} eager", eager_norm_affine(*args), out, dtype)
        check_close(f"norm fwd {kname} {dname} compiled", cf(*args), out, dtype)
        fwd = {"op": lambda: op(*args), "eager": lambda: eager_norm_affine(*args), "compiled": lambda: cf(*args),
               "memcpy": memcpy}
        t_f = interleaved(fwd, cfg.repeats, cfg.sample_s)
    go = torch.randn(shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    grads = bop(go, *args)
    eager_b = grad_closure(eager_norm_affine, args, go)
    (comp_b, c_train) = timed(lambda: grad_closure(cf, args, go))
    _, c_bwd = timed(comp_b)
    check_close(f"norm bwd {kname} {dname} eager", eager_b(), grads, dtype)
    check_close(f"norm bwd {kname} {dname} compiled", comp_b(), grads, dtype)
    bwd = {"op": lambda: bop(go, *args), "eager": eager_b, "compiled": comp_b, "memcpy": memcpy}
    t_b = interleaved(bwd, cfg.repeats, cfg.sample_s)
    rows = []
    for pas, t, nb, comp in (("fwd", t_f, nbytes(*args, out), c_fwd),
                             ("bwd", t_b, nbytes(go, *args, *grads), c_train + c_bwd)):
        rows.append({
            "op": "norm_affine", "pass": pas, "shape": list(shape), "dtype": dname, "norm": kname,
            "routing": cfg.routing, "time_s": {k: t[k] for k in ("op", "eager", "compiled", "memcpy")},
            "speedup_vs_eager": t["eager/first"], "speedup_vs_compiled": t["compiled/first"],
            "bytes": nb, "op_GBps": nb / t["op"] / 1e9, "memcpy_GBps": mc_bytes / t["memcpy"] / 1e9,
            "fraction_of_memcpy": nb / mc_bytes * t["memcpy/first"], "compile_s": comp,
        })
    return rows


def print_norm(rows):
    print("\n### norm_affine: C++ op vs eager vs torch.compile (speed-ups > 1: the op is faster)\n")
    print("| pass | shape | dtype | norm | op (µs) | eager (µs) | compiled (µs) | **eager / op** | compiled / op "
          "| op GB/s | of memcpy | compile (s) |")
    print("|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        t = r["time_s"]
        print(f"| {r['pass']} | {shape_label(r['shape'])} | {r['dtype']} | {r['norm']} | {t['op'] * 1e6:.0f} | "
              f"{t['eager'] * 1e6:.0f} | {t['compiled'] * 1e6:.0f} | **{r['speedup_vs_eager']:.2f}×** | "
              f"{r['speedup_vs_compiled']:.2f}× | {r['op_GBps']:.1f} | {100 * r['fraction_of_memcpy']:.0f} % | "
              f"{r['compile_s']:.1f} |", flush=True)


# ------------------------------------------------------------------ steered_linear
def bench_linear(shape, dname, wname, cfg):
    dtype, where = DTYPES[dname], WHERE[wname]
    args = linear_case(shape, dtype, where, cfg.routing)
    x, w, b = args[:3]
    M, K, N = shape
    flops = 2 * M * K * N
    op, bop = torch.ops.lineas.steered_linear, torch.ops.lineas.steered_linear_backward
    cf = compile_fn(eager_steered_linear)
    with torch.no_grad():
        _, c_fwd = timed(lambda: cf(*args))
        out = op(*args)
        check_close(f"linear fwd {wname} {dname} eager", eager_steered_linear(*args), out, dtype)
        check_close(f"linear fwd {wname} {dname} compiled", cf(*args), out, dtype)
        fwd = {"linear": lambda: F.linear(x, w, b), "op": lambda: op(*args),
               "eager": lambda: eager_steered_linear(*args), "compiled": lambda: cf(*args)}
        t_f = interleaved(fwd, cfg.repeats, cfg.sample_s)
    go = torch.randn(M, N, generator=torch.Generator().manual_seed(1)).to(dtype)
    grads = bop(go, *args)
    eager_b = grad_closure(eager_steered_linear, args, go, LINEAR_WRT)
    comp_b, c_train = timed(lambda: grad_closure(cf, args, go, LINEAR_WRT))
    _, c_bwd = timed(comp_b)
    check_close(f"linear bwd {wname} {dname} eager", eager_b(), grads, dtype)
    check_close(f"linear bwd {wname} {dname} compiled", comp_b(), grads, dtype)
    bwd = {"linear": lambda: torch.mm(go, w), "op": lambda: bop(go, *args), "eager": eager_b, "compiled": comp_b}
    t_b = interleaved(bwd, cfg.repeats, cfg.sample_s)
    rows = []
    for pas, t, comp in (("fwd", t_f, c_fwd), ("bwd", t_b, c_train + c_bwd)):
        rows.append({
            "op": "steered_linear", "pass": pas, "shape": list(shape), "dtype": dname, "site": wname,
            "routing": cfg.routing, "time_s": {k: t[k] for k in ("linear", "op", "eager", "compiled")},
            "op_over_linear": t["op/first"], "op_over_linear_q1": t["op/first_q1"],
            "op_over_linear_q3": t["op/first_q3"], "eager_over_linear": t["eager/first"],
            "compiled_over_linear": t["compiled/first"], "flops": flops,
            "op_GFLOPs": flops / t["op"] / 1e9, "linear_GFLOPs": flops / t["linear"] / 1e9, "compile_s": comp,
        })
    return rows


def print_linear(rows):
    print("\n### steered_linear: time relative to a plain Linear of the same shape (target op ≤ 1.05×)\n")
    print("Backward baseline: `go @ W` (grad_x of a frozen plain Linear). GFLOP/s count 2·M·K·N.\n")
    print("| pass | x [M, K] × Wᵀ [K, N] | dtype | site | linear (ms) | op (ms) | **op / linear** | eager / linear "
          "| compiled / linear | op GFLOP/s | compile (s) |")
    print("|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        t, (M, K, N) = r["time_s"], r["shape"]
        print(f"| {r['pass']} | [{M}, {K}] × [{K}, {N}] | {r['dtype']} | {r['site']} | {t['linear'] * 1e3:.2f} | "
              f"{t['op'] * 1e3:.2f} | **{r['op_over_linear']:.3f}×** | {r['eager_over_linear']:.3f}× | "
              f"{r['compiled_over_linear']:.3f}× | {r['op_GFLOPs']:.0f} | {r['compile_s']:.1f} |", flush=True)


# ------------------------------------------------------------------ plot
def plot(result, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    norm, lin = result["norm_affine"], result["steered_linear"]
    fig, axes = plt.subplots(3, 1, figsize=(max(10, 0.45 * len(norm) + 3), 13), constrained_layout=True)
    m = result["machine"]
    fig.suptitle(f"lineas C++ CPU kernels — {m['cpu_model']}, {m['threads']} thread(s), torch {m['torch']}, "
                 f"kernel ISA {m['kernel_isa']}")
    short = {"LayerNorm": "LN", "RMSNorm": "RMS"}
    labels = [f"{r['pass']} {short[r['norm']]} {r['dtype']}\n{shape_label(r['shape'])}" for r in norm]
    xs = range(len(norm))
    ax = axes[0]
    ax.bar([i - 0.2 for i in xs], [r["speedup_vs_eager"] for r in norm], 0.4, label="eager / op")
    ax.bar([i + 0.2 for i in xs], [r["speedup_vs_compiled"] for r in norm], 0.4, label="torch.compile / op")
    ax.axhline(1, color="k", lw=0.8)
    ax.axhline(2.5, color="r", lw=0.8, ls="--", label="2.5× target (vs eager)")
    ax.set_yscale("log")
    ax.set_ylabel("speed-up of the op (×)")
    ax.set_title("norm_affine: speed-up of the C++ op")
    ax.set_xticks(list(xs), labels, fontsize=7)
    ax.legend(fontsize=8)
    ax = axes[1]
    ax.bar(list(xs), [r["fraction_of_memcpy"] for r in norm], 0.6, color="tab:green")
    ax.axhline(1, color="k", lw=0.8)
    ax.set_ylabel("op GB/s ÷ memcpy GB/s")
    ax.set_title(f"norm_affine: achieved bandwidth as a fraction of memcpy "
                 f"({result['memcpy']['GBps']:.1f} GB/s read+write, 256 MiB)")
    ax.set_xticks(list(xs), labels, fontsize=7)
    ax = axes[2]
    labels = [f"{r['pass']} {r['site'][:3]} {r['dtype']}\n{r['shape'][0]}×{r['shape'][1]}→{r['shape'][2]}"
              for r in lin]
    xs = range(len(lin))
    for off, key, name in ((-0.27, "op_over_linear", "op"), (0, "compiled_over_linear", "torch.compile"),
                           (0.27, "eager_over_linear", "eager")):
        ax.bar([i + off for i in xs], [r[key] for r in lin], 0.27, label=name)
    ax.axhline(1, color="k", lw=0.8)
    ax.axhline(1.05, color="r", lw=0.8, ls="--", label="1.05× target (op)")
    vals = [r[k] for r in lin for k in ("op_over_linear", "compiled_over_linear", "eager_over_linear")] or [1]
    ax.set_ylim(min(0.8, min(vals) * 0.95), max(1.5, max(vals) * 1.05))
    ax.set_ylabel("time ÷ plain Linear")
    ax.set_title("steered_linear: time relative to an unsteered Linear (lower is better)")
    ax.set_xticks(list(xs), labels, fontsize=7)
    ax.legend(fontsize=8)
    fig.savefig(path, dpi=110)


# ------------------------------------------------------------------ main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2, help="torch / OpenMP threads (default 2)")
    ap.add_argument("--repeats", type=int, default=None, help="samples per candidate (default 5; 3 with --quick)")
    ap.add_argument("--sample-ms", type=float, default=20.0, help="target duration of one sample (default 20)")
    ap.add_argument("--quick", action="store_true", help="one small shape per op, 3 repeats (< 1 minute)")
    ap.add_argument("--routing", choices=["broadcast", "rows"], default="broadcast")
    ap.add_argument("--only", choices=["norm", "linear"], help="run one op only")
    ap.add_argument("--out", help="write every number and the machine info to this JSON file")
    ap.add_argument("--plot", help="write a PNG (speed-ups, GB/s fraction, Linear ratios)")
    cfg = ap.parse_args()
    cfg.repeats = cfg.repeats or (3 if cfg.quick else 5)
    cfg.sample_s = cfg.sample_ms / 1e3
    torch.set_num_threads(cfg.threads)
    for name in ("norm_affine", "norm_affine_backward", "steered_linear", "steered_linear_backward"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"lineas::{name}", "CPU"), name
    t_start = time.perf_counter()
    machine = machine_info(torch.get_num_threads())
    print(f"{machine['cpu_model']}, {machine['usable_cores']} cores, threads {machine['threads']}, "
          f"torch {machine['torch']} (CPU capability {machine['torch_cpu_capability']}), kernel ISA "
          f"{machine['kernel_isa']}, routing {cfg.routing}, repeats {cfg.repeats}, sample {cfg.sample_ms:g} ms, "
          f"load average {machine['load_avg_start'][0]:.2f}{' (quick)' if cfg.quick else ''}")
    bufs, mc = measure_memcpy(cfg.repeats, cfg.sample_s)
    print(f"memcpy (dst.copy_(src), 256 MiB, read + write counted): {mc:.1f} GB/s", flush=True)
    result = {"machine": machine, "config": {k: v for k, v in vars(cfg).items()}, "command": " ".join(sys.argv),
              "memcpy": {"bytes_per_copy": 2 * MEMCPY_BYTES, "GBps": mc}, "norm_affine": [], "steered_linear": []}
    if cfg.only != "linear":
        for shape in QUICK_NORM_SHAPES if cfg.quick else NORM_SHAPES:
            for dname in DTYPES:
                for kname in KINDS:
                    result["norm_affine"] += bench_norm(shape, dname, kname, cfg, bufs)
        print_norm(result["norm_affine"])
    if cfg.only != "norm":
        for shape in QUICK_LINEAR_SHAPES if cfg.quick else LINEAR_SHAPES:
            for dname in DTYPES:
                for wname in WHERE:
                    result["steered_linear"] += bench_linear(shape, dname, wname, cfg)
        print_linear(result["steered_linear"])
    del bufs
    result["memcpy"]["GBps_per_case_median"] = statistics.median(
        [r["memcpy_GBps"] for r in result["norm_affine"]] or [mc])
    machine["load_avg_end"] = os.getloadavg()
    result["wall_s"] = time.perf_counter() - t_start
    print(f"\nwall time {result['wall_s']:.0f} s, load average at the end {machine['load_avg_end'][0]:.2f}")
    if cfg.out:
        with open(cfg.out, "w") as f:
            json.dump(result, f, indent=1)
        print(f"wrote {cfg.out}")
    if cfg.plot:
        plot(result, cfg.plot)
        print(f"wrote {cfg.plot}")


if __name__ == "__main__":
    main()
