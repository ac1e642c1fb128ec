"""CPU benchmark: the C++ ``lineas::norm_affine`` kernel vs eager PyTorch ``norm -> affine``.

For x of shape [1024, 576] and [4096, 2048] (2-D: every row is its own batch item), fp32 and bf16, and
both norms, it times side by side (A/B interleaved, each sample a loop of calls, median of --repeats):

* ``op``     — ``torch.ops.lineas.norm_affine`` (C++ CPU kernel; fails if the extension is not built);
* ``eager``  — what a user writes without the fused op: HF-style RMSNorm (``x.float()``,
  ``pow(2).mean(-1, keepdim=True)``, ``rsqrt``, multiply, cast back, ``weight *``) or
  ``F.layer_norm``, then the per-row steering ``reference.steer_rows`` (table lookup + ``y*a + c`` in
  fp32, cast back) — the library's own pure-torch fallback path;
* ``lean``   — the same norm, then ``(y.float()*a + c).to(dtype)`` with a, c precomputed outside the
  timed loop (the most favourable eager variant: a fixed steering, nothing looked up per call);
* backward: ``lineas::norm_affine_backward`` vs ``torch.autograd.grad`` through ``reference.norm_affine``
  (graph built once, only the backward pass timed).

Ratios > 1 mean the C++ op is faster. Routing: one steering at strength 1 broadcast to every row
(R = 1, the common case), or ``--routing rows`` (R = B, ids cycling over 0, 1, -1, strengths varying).
The broader benchmark (torch.compile, GB/s, shapes up to [8192, 4096]) is ``bench_kernels.py``, which
also holds the case builders this script uses.

glibc's allocator makes large-tensor timings bimodal unless MALLOC_MMAP_THRESHOLD_ /
MALLOC_TRIM_THRESHOLD_ are set before the process starts; the script re-executes itself with both set
to 1073741824 when they are missing. Command used for benchmarks/results/norm_affine_cpu.md:

    MALLOC_MMAP_THRESHOLD_=1073741824 MALLOC_TRIM_THRESHOLD_=1073741824 \\
        python benchmarks/bench_norm_affine.py --threads 1 --repeats 15
"""

from __future__ import annotations

import argparse

# benchmarks/ (the script folder) is on sys.path
from timing import ensure_malloc_env, interleaved

ensure_malloc_env()  # must happen before torch allocates anything

import torch

# The case builders (and the extension import) live in bench_kernels.py.
from bench_kernels import DTYPES, KINDS, eager_norm, grad_closure, norm_case

from lineas_fast.ops import reference as ref

SHAPES = [(1024, 576), (4096, 2048)]


def make(shape, dtype, kind, routing, seed=0):
    """Op args and the precomputed (a, c) of the "lean" baseline ([d] broadcast or one row per item)."""
    args = norm_case(shape, dtype, kind, routing, seed)
    a, c = ref.row_coefficients(shape[0], args[0].device, *args[6:])
    return args, ((a[0], c[0]) if routing == "broadcast" else (a, c))


def candidates(args, ac):
    x, w, b, _, kind, _, scale, shift, ids, strength, nrows = args
    a, c = ac
    op = torch.ops.lineas.norm_affine
    return {
        "op": lambda: op(*args),
        "eager": lambda: ref.steer_rows(eager_norm(x, w, b, kind), scale, shift, ids, strength, nrows),
        "lean": lambda: (eager_norm(x, w, b, kind).float() * a + c).to(x.dtype),
    }


def backward_candidates(args):
    go = torch.randn_like(args[0])
    bop = torch.ops.lineas.norm_affine_backward
    return {"op": lambda: bop(go, *args), "eager": grad_closure(ref.norm_affine, args, go)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=15, help="samples per candidate (median reported)")
    ap.add_argument("--threads", type=int, default=1, help="torch / OpenMP threads (default 1)")
    ap.add_argument("--routing", choices=["broadcast", "rows"], default="broadcast")
    ap.add_argument("--sample-ms", type=float, default=20.0, help="target duration of one sample")
    ap.add_argument("--no-backward", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    assert torch._C._dispatch_has_kernel_for_dispatch_key("lineas::norm_affine", "CPU")
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, routing {args.routing}, "
          f"repeats {args.repeats}, CPU capability {torch.backends.cpu.get_cpu_capability()}\n")
    print("| pass | shape | dtype | norm | op (µs) | eager (µs) | eager / op | lean (µs) | lean / op |")
    print("|---|---|---|---|---:|---:|---:|---:|---:|")
    for shape in SHAPES:
        for dname, dtype in DTYPES.items():
            for kname, kind in KINDS.items():
                op_args, ac = make(shape, dtype, kind, args.routing)
                with torch.no_grad():
                    t = interleaved(candidates(op_args, ac), args.repeats, args.sample_ms / 1e3)
                print(f"| fwd | {shape[0]}×{shape[1]} | {dname} | {kname} | {t['op'] * 1e6:.0f} | "
                      f"{t['eager'] * 1e6:.0f} | **{t['eager'] / t['op']:.2f}×** | {t['lean'] * 1e6:.0f} | "
                      f"{t['lean'] / t['op']:.2f}× |", flush=True)
                if args.no_backward:
                    continue
                t = interleaved(backward_candidates(op_args), args.repeats, args.sample_ms / 1e3)
                print(f"| bwd | {shape[0]}×{shape[1]} | {dname} | {kname} | {t['op'] * 1e6:.0f} | "
                      f"{t['eager'] * 1e6:.0f} | **{t['eager'] / t['op']:.2f}×** | – | – |", flush=True)


if __name__ == "__main__":
    main()
