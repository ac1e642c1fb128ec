"""CPU benchmark: the C++ ``lineas::steered_linear`` op vs a plain ``F.linear`` of the same shape.

Target (SPEC §4, Linear sites fused into the matmul): the steered op costs at most 1.05x an unsteered
``torch.nn.functional.linear(x, W, b)``. Shapes are SmolLM2-135M's MLP: x [1024, 576] x W [1536, 576]
(up/gate projection) and x [1024, 1536] x W [576, 1536] (down projection); fp32 and bf16; prologue
(``where=0``, the Linear's input steered: an ``:in`` site, table width in_features) and epilogue
(``where=1``, its output steered, width out_features). Candidates, timed side by side (A/B/C
interleaved, each sample a loop of calls, median of --repeats):

* ``linear`` — ``F.linear(x, W, b)`` on the unsteered x (the baseline the target refers to);
* ``op``     — ``torch.ops.lineas.steered_linear`` (C++ CPU kernel; fails if the extension is not built);
* ``eager``  — what a steering hook does without the op: ``reference.steer_rows`` (per-row table lookup,
  ``a*x + c`` in fp32, cast back) before or after ``F.linear``;
* ``copy``   — ``F.linear(x.clone(), W, b)``: the floor of any prologue that materialises the steered
  input before an ATen matmul (writing a fresh copy of x evicts the operands the looped baseline keeps
  hot in cache; in a model x is freshly written anyway).

With ``--backward``: ``lineas::steered_linear_backward`` vs ``torch.autograd.grad`` through the eager
path (x, scale, shift requiring grad; W, b frozen; graph built once, only the backward timed).
Ratios are medians over rounds of the per-round ratio (robust to other load drifting during the run).
Routing: one dense steering (every channel steered) at strength 1 broadcast to all rows (R = 1), or
``--routing rows`` (R = B, ids cycling 0, 1, -1, strengths varying). The broader benchmark
(torch.compile, GFLOP/s, larger shapes) is ``bench_kernels.py``, which also holds the case builders
this script uses.

glibc's allocator makes large-tensor timings bimodal unless MALLOC_MMAP_THRESHOLD_ /
MALLOC_TRIM_THRESHOLD_ are set before the process starts; the script re-executes itself with both set
to 1073741824 when they are missing. Command used for benchmarks/results/steered_linear_cpu.md:

    MALLOC_MMAP_THRESHOLD_=1073741824 MALLOC_TRIM_THRESHOLD_=1073741824 OMP_NUM_THREADS=1 \\
        python benchmarks/bench_steered_linear.py --threads 1 --repeats 31 --backward
"""

from __future__ import annotations

import argparse

# benchmarks/ (the script folder) is on sys.path
from timing import ensure_malloc_env, interleaved

ensure_malloc_env()  # must happen before torch allocates anything

import torch
import torch.nn.functional as F

# The case builders (and the extension import) live in bench_kernels.py.
from bench_kernels import DTYPES, LINEAR_WRT, WHERE, grad_closure, linear_case
from bench_kernels import eager_steered_linear as eager

SHAPES = [(1024, 576, 1536), (1024, 1536, 576)]  # (rows, in_features, out_features)
make = linear_case


def candidates(args):
    x, w, b = args[:3]
    op = torch.ops.lineas.steered_linear
    return {"linear": lambda: F.linear(x, w, b), "op": lambda: op(*args), "eager": lambda: eager(*args),
            "copy": lambda: F.linear(x.clone(), w, b)}


def backward_candidates(args):
    x, w = args[:2]
    go = torch.randn(x.shape[0], w.shape[0]).to(x.dtype)
    bop = torch.ops.lineas.steered_linear_backward
    return {"op": lambda: bop(go, *args), "eager": grad_closure(eager, args, go, LINEAR_WRT)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=31, help="samples per candidate (median reported)")
    ap.add_argument("--threads", type=int, default=1, help="torch / OpenMP threads (default 1)")
    ap.add_argument("--routing", choices=["broadcast", "rows"], default="broadcast")
    ap.add_argument("--sample-ms", type=float, default=40.0, help="target duration of one sample")
    ap.add_argument("--backward", action="store_true", help="also time the backward op vs eager autograd")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    assert torch._C._dispatch_has_kernel_for_dispatch_key("lineas::steered_linear", "CPU")
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, routing {args.routing}, "
          f"repeats {args.repeats}, CPU capability {torch.backends.cpu.get_cpu_capability()}\n")
    print("| x × Wᵀ | dtype | site | linear (ms) | op (ms) | **op / linear** | eager / linear | copy / linear |")
    print("|---|---|---|---:|---:|---:|---:|---:|")
    rows = []
    for shape in SHAPES:
        for dname, dtype in DTYPES.items():
            for wname, where in WHERE.items():
                op_args = make(shape, dtype, where, args.routing)
                with torch.no_grad():
                    t = interleaved(candidates(op_args), args.repeats, args.sample_ms / 1e3)
                label = f"[{shape[0]}, {shape[1]}] × [{shape[2]}, {shape[1]}]ᵀ"
                print(f"| {label} | {dname} | {wname} | {t['linear'] * 1e3:.2f} | {t['op'] * 1e3:.2f} | "
                      f"**{t['op/first']:.3f}×** | {t['eager/first']:.3f}× | {t['copy/first']:.3f}× |", flush=True)
                if args.backward:
                    rows.append((label, dname, wname, interleaved(backward_candidates(op_args), args.repeats,
                                                                  args.sample_ms / 1e3)))
    if rows:
        print("\n| backward: x × Wᵀ | dtype | site | op (ms) | eager autograd (ms) | eager / op |")
        print("|---|---|---|---:|---:|---:|")
        for label, dname, wname, t in rows:
            print(f"| {label} | {dname} | {wname} | {t['op'] * 1e3:.2f} | {t['eager'] * 1e3:.2f} | "
                  f"{t['eager/first']:.2f}× |")


if __name__ == "__main__":
    main()
