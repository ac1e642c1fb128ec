"""GPU on paper: kernel launches and bytes moved per token for a 7B Llama at batch-1 decode, for hooks vs
fused vs fold — derived from tensor sizes and the per-site ATen op counts measured on the CPU
(``bench_inference.py``), not measured on a GPU (none is available to this project).

Run: python benchmarks/gpu_on_paper.py --inference benchmarks/results/bench/inference.json
"""

from __future__ import annotations

import argparse
import json

# Llama-2-7B
LAYERS, D, D_FF, VOCAB = 32, 4096, 11008, 32000
SITES = 2 * LAYERS                       # the "norms" preset: input_layernorm + post_attention_layernorm
BF16, FP32 = 2, 4
HBM_TBS = 3.35                           # H100 SXM HBM3, TB/s
LAUNCH_US = 5.0                          # eager PyTorch per-kernel CPU dispatch + launch, µs (typical)
HOOK_PY_US = 15.0                        # one Python forward hook call, µs (typical)
CTX = 1024                               # tokens of KV cache read per decode step
# top-level kernels per site (what the GPU launches; the CPU profiler also counts nested ATen calls)
HF_RMSNORM_KERNELS = 8                   # to(fp32), pow, mean, add eps, rsqrt, mul, to(bf16), mul weight
HOOK_KERNELS = 4                         # to(fp32), mul a, add c, to(bf16)   (a, c cached per routing)


def params() -> int:
    attn = 4 * D * D
    mlp = 3 * D * D_FF
    return LAYERS * (attn + mlp + 2 * D) + 2 * VOCAB * D + D


def analysis(ops: dict | None) -> str:
    weights = params() * BF16
    kv = 2 * LAYERS * D * CTX * BF16
    base_bytes = weights + kv
    per_layer_kernels = 2 * HF_RMSNORM_KERNELS + 20 + 6  # norms + attention (proj, rotary, sdpa, o, add) + MLP
    base_launches = LAYERS * per_layer_kernels + 4
    rows = {
        "unsteered": (0, 0, 0),
        # hooks: cast, mul, add, cast around each site: 36·d bytes (bf16 in/out, fp32 temporaries)
        "hooks": (SITES * HOOK_KERNELS, SITES * 36 * D, SITES),
        # fused: the norm's own kernel reads the two fp32 table rows (a, c) and replaces 8 kernels by 1
        "fused": (-SITES * (HF_RMSNORM_KERNELS - 1), SITES * 2 * D * FP32, 0),
        # fold: weights changed in place; an RMSNorm shift becomes biases on q/k/v and gate/up (read once)
        "fold": (0, LAYERS * (3 * D + 2 * D_FF) * BF16, 0),
    }
    hbm_ms = base_bytes / (HBM_TBS * 1e12) * 1e3
    lines = ["**Analysis, not measurement** (no GPU is available to this project). Llama-2-7B, bf16, batch-1 "
             f"decode, KV cache of {CTX} tokens, {SITES} norm sites steered, H100 SXM ({HBM_TBS} TB/s HBM3).", "",
             f"Bytes per token without steering: weights {weights / 1e9:.2f} GB + KV cache {kv / 1e9:.2f} GB → "
             f"{hbm_ms:.2f} ms at full HBM bandwidth. Kernel launches per token in eager PyTorch: ≈ {base_launches:,} "
             f"(≈ {per_layer_kernels} per layer) × ~{LAUNCH_US:g} µs of CPU dispatch ≈ {base_launches * LAUNCH_US / 1e3:.1f} ms "
             "— at batch 1 eager decode is dispatch-bound, so launches, not bytes, decide steering's cost.", "",
             "| mode | extra launches / token | extra bytes / token | share of HBM bytes | Python hook calls | "
             "est. eager Δ ms/token | est. compiled + CUDA-graph Δ ms/token |", "|---|---:|---:|---:|---:|---:|---:|"]
    for name, (launch, nbytes, hooks) in rows.items():
        eager = launch * LAUNCH_US / 1e3 + hooks * HOOK_PY_US / 1e3 + nbytes / (HBM_TBS * 1e12) * 1e3
        graph = nbytes / (HBM_TBS * 1e12) * 1e3  # compiled + CUDA graph: elementwise ops fused, bytes remain
        lines.append(f"| {name} | {launch:+,} | {nbytes / 1e6:.2f} MB | {nbytes / base_bytes:.3%} | {hooks} | "
                     f"{eager:+.2f} | {graph:+.3f} |")
    eager_base = max(base_launches * LAUNCH_US / 1e3, hbm_ms)
    hooks_ms = rows["hooks"][0] * LAUNCH_US / 1e3 + SITES * HOOK_PY_US / 1e3
    lines += ["", f"* **hooks** add {HOOK_KERNELS} elementwise kernels and a Python call per site: ≈ "
              f"{hooks_ms / eager_base:+.0%} latency in eager batch-1 decode (on ≈ {eager_base:.1f} ms/token). Under "
              "`torch.compile` with CUDA graphs (last column) the casts/mul/add fuse into neighbouring kernels and "
              f"the cost falls to the bytes (≈ {rows['hooks'][1] / base_bytes:.2%} of the traffic).",
              "* **fused** replaces HF's 8-kernel RMSNorm by one `norm_affine` kernel that also reads the two "
              "table rows: 448 fewer launches per token than the *unsteered* model in eager mode, and ≈ 2 MB more "
              "bytes (0.015 %) — bandwidth-neutral under CUDA graphs.",
              "* **fold** costs nothing at run time (a few biases where an RMSNorm shift is folded).",
              "* **Kernels vs HBM.** `norm_affine` is one read of x and one write of y (plus two table rows and γ) "
              "per row: at prefill (8×128 rows × 4096, bf16) that is ≈ 16.8 MB, i.e. ≈ 5 µs at 100 % of 3.35 TB/s; a "
              "one-row-per-program Triton kernel of this kind typically reaches 60–80 % of HBM bandwidth, i.e. "
              "≈ 7–8 µs. At batch-1 decode (one 4096-wide row) it is launch-latency-bound (a few µs), like the "
              "norm it replaces. `steered_linear` is a GEMM whose prologue/epilogue adds two gathered table "
              "tiles per K step (prologue) or one per output tile (epilogue): ≈ 1–3 % of the tile loop's "
              "loads, so with tuned tiles it should stay within ~1.05× of cuBLAS for large shapes; its tile "
              "sizes are a heuristic (not autotuned), so expect less until tuned on a GPU.",
              ""]
    if ops:
        u, h, f = ops.get("unsteered"), ops.get("hooks"), ops.get("fused")
        n = ops.get("_sites", 60)
        if u and h and f:
            lines.append(f"Measured on the CPU (SmolLM2-135M, {n} norm sites, ATen ops per cached decode step, nested "
                         f"ATen calls included): unsteered {u:,}, hooks {h:,} ({(h - u) / n:+.1f} per site), fused "
                         f"{f:,} ({(f - u) / n:+.1f} per site) — the same direction as the launch counts above.")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--inference", default=None, metavar="JSON", help="bench_inference.py output (op counts)")
    args = p.parse_args()
    ops = None
    if args.inference:
        with open(args.inference) as f:
            m = json.load(f)["models"][0]
        ops = {**m["aten_ops_per_decode_step"], "_sites": m["sites"]}
    print(analysis(ops))


if __name__ == "__main__":
    main()
