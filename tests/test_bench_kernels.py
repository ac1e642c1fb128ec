"""pytest-benchmark suite for the C++ CPU kernels: ``lineas::norm_affine`` (LayerNorm, RMSNorm) and
``lineas::steered_linear`` (prologue, epilogue), forward and backward, the C++ op and its pure-torch
reference (``lineas_fast.ops.reference``), at one small and one medium shape, fp32 and bf16.

Inside ``make test`` (plain ``pytest``) every case is only a smoke: ``benchmark.pedantic`` with 1 warm-up
and 3 rounds of 1 call, not a timing gate — the whole file takes a few seconds. Each case also checks
that the op matches the reference (fp32 within 1e-5; bf16 within 2x the error of PyTorch's own
low-precision result vs the fp32 oracle, SPEC §6), so it can fail. For real timings (the fixture then
calibrates its rounds and honours the ``--benchmark-*`` options; op and reference of a case share a
benchmark group, so the table compares them side by side):

    MALLOC_MMAP_THRESHOLD_=1073741824 MALLOC_TRIM_THRESHOLD_=1073741824 OMP_NUM_THREADS=1 \\
        pytest tests/test_bench_kernels.py --benchmark-only --benchmark-min-rounds=20 \\
        --benchmark-columns=median,iqr,rounds --benchmark-sort=name

(``--benchmark-only`` switches to real timings; ``--benchmark-skip`` skips this file; the malloc
thresholds keep large-tensor timings from being bimodal.) The fuller benchmark, with ``torch.compile``
and bandwidth / GFLOP/s figures, is ``benchmarks/bench_kernels.py``. Skipped when pytest-benchmark is
not installed, and when the C++ extension is not built (except under CI, where that fails).
"""

import os

import pytest

pytest.importorskip("pytest_benchmark")

import torch
from conftest import assert_fp32_close, assert_low_precision

from lineas_fast import ops as lops
from lineas_fast.ops import reference as ref

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
NORM_SHAPES = {"small": (128, 576), "medium": (1024, 2048)}  # [rows, d]
LINEAR_SHAPES = {"small": (64, 576, 1536), "medium": (512, 576, 1536)}  # [M, K] x [N, K]^T
KINDS = {"LayerNorm": ref.LAYERNORM, "RMSNorm": ref.RMSNORM}
WHERE = {"prologue": ref.PROLOGUE, "epilogue": ref.EPILOGUE}
IMPLS = ["op", "reference"]


@pytest.fixture(scope="module", autouse=True)
def cpu_kernels():
    if lops.CPU_KERNELS_MISSING:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"the C++ extension must be built under CI: {lops.CPU_KERNELS_MISSING}")
        pytest.skip(lops.CPU_KERNELS_MISSING)


def run(benchmark, request, fn, group, **info):
    """Smoke (3 rounds) unless --benchmark-only asks for real, calibrated timings."""
    benchmark.group = group
    benchmark.extra_info.update(info)
    if request.config.getoption("benchmark_only", False):
        return benchmark(fn)
    return benchmark.pedantic(fn, rounds=3, iterations=1, warmup_rounds=1)


def table(d, g):
    """A dense 2-entry fp32 steering table of width d, entry 0 at strength 0.8 broadcast to every row."""
    return (1 + 0.2 * torch.randn(2, d, generator=g), 0.1 * torch.randn(2, d, generator=g),
            torch.tensor([0]), torch.tensor([0.8]), torch.tensor([1]))


def low_grads(fn, args, go, wrt):
    """PyTorch's own low-precision gradients: autograd through the reference computed in x's dtype."""
    a = list(args)
    for i in wrt:
        a[i] = a[i].detach().clone().requires_grad_()
    return torch.autograd.grad(fn(*a, upcast=False), [a[i] for i in wrt], go)


def check(dtype, op_out, ref_out, oracle, low):
    """fp32: op == reference within 1e-5. bf16: op and reference (each rounded once from fp32 math) within
    2x the error of PyTorch's bf16 result vs the fp32 oracle."""
    single = isinstance(op_out, torch.Tensor)
    names = ["out"] if single else ["grad_x", "grad_scale", "grad_shift"]

    def parts(t):
        return [None] * len(names) if t is None else [t] if single else list(t)

    for name, o, r, orc, lo in zip(names, *map(parts, (op_out, ref_out, oracle, low))):
        if dtype == torch.float32:
            assert_fp32_close(o, r, f"op vs reference, {name}")
        elif name != "grad_x":
            # table gradients are fp32 sums: where PyTorch's own result is exact up to summation order
            # (grad_shift), a 2x budget would be 0, so the floor is fp32 rounding of the sum's magnitude
            floor = 1e-5 * max(1.0, orc.abs().max().item())
            for got, who in ((o, "op"), (r, "reference")):
                err = (got.double() - orc.double()).abs().max().item()
                err_torch = (lo.double() - orc.double()).abs().max().item()
                assert err <= 2 * err_torch + floor, f"{who} {name}: err {err} vs torch's own {err_torch}"
        else:
            assert_low_precision(o, orc, lo, f"op {name}")
            assert_low_precision(r, orc, lo, f"reference {name}")


@pytest.mark.parametrize("dname", DTYPES)
@pytest.mark.parametrize("size", NORM_SHAPES)
@pytest.mark.parametrize("kname", KINDS)
@pytest.mark.parametrize("pas", ["fwd", "bwd"])
@pytest.mark.parametrize("impl", IMPLS)
def test_norm_affine(benchmark, request, impl, pas, kname, size, dname):
    dtype, kind, shape = DTYPES[dname], KINDS[kname], NORM_SHAPES[size]
    g = torch.Generator().manual_seed(0)
    B, d = shape
    x = (2 * torch.randn(shape, generator=g) + 0.3).to(dtype)
    w = (1 + 0.1 * torch.randn(d, generator=g)).to(dtype)
    b = (0.1 * torch.randn(d, generator=g)).to(dtype) if kind == ref.LAYERNORM else None
    args = (x, w, b, 1e-5, kind, 0.0, *table(d, g))
    go = torch.randn(shape, generator=g).to(dtype)
    if pas == "fwd":
        fns = {"op": lambda: lops.norm_affine(*args), "reference": lambda: ref.norm_affine(*args)}
    else:
        fns = {"op": lambda: lops.norm_affine_backward(go, *args),
               "reference": lambda: ref.norm_affine_backward(go, *args)}
    got = run(benchmark, request, fns[impl], f"norm_affine {pas} {kname} {dname} {B}x{d}", impl=impl)
    outs = {impl: got, **{k: f() for k, f in fns.items() if k != impl}}
    oracle = low = None
    if dtype != torch.float32:
        if pas == "fwd":
            oracle, low = ref.norm_affine(x.float(), *args[1:]), ref.norm_affine(*args, upcast=False)
        else:
            oracle = ref.norm_affine_backward(go.float(), x.float(), *args[1:])
            low = low_grads(ref.norm_affine, args, go, (0, 6, 7))
    check(dtype, outs["op"], outs["reference"], oracle, low)


@pytest.mark.parametrize("dname", DTYPES)
@pytest.mark.parametrize("size", LINEAR_SHAPES)
@pytest.mark.parametrize("wname", WHERE)
@pytest.mark.parametrize("pas", ["fwd", "bwd"])
@pytest.mark.parametrize("impl", IMPLS)
def test_steered_linear(benchmark, request, impl, pas, wname, size, dname):
    dtype, where, (M, K, N) = DTYPES[dname], WHERE[wname], LINEAR_SHAPES[size]
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(M, K, generator=g) + 0.3).to(dtype)
    w = (torch.randn(N, K, generator=g) / K ** 0.5).to(dtype)
    b = (0.1 * torch.randn(N, generator=g)).to(dtype)
    args = (x, w, b, where, *table(K if where == ref.PROLOGUE else N, g))
    go = torch.randn(M, N, generator=g).to(dtype)
    if pas == "fwd":
        fns = {"op": lambda: lops.steered_linear(*args), "reference": lambda: ref.steered_linear(*args)}
    else:
        fns = {"op": lambda: lops.steered_linear_backward(go, *args),
               "reference": lambda: ref.steered_linear_backward(go, *args)}
    got = run(benchmark, request, fns[impl], f"steered_linear {pas} {wname} {dname} {M}x{K}->{N}", impl=impl)
    outs = {impl: got, **{k: f() for k, f in fns.items() if k != impl}}
    oracle = low = None
    if dtype != torch.float32:
        if pas == "fwd":
            oracle, low = ref.steered_linear(x.float(), *args[1:]), ref.steered_linear(*args, upcast=False)
        else:
            oracle = ref.steered_linear_backward(go.float(), x.float(), *args[1:])
            low = low_grads(ref.steered_linear, args, go, (0, 4, 5))
    check(dtype, outs["op"], outs["reference"], oracle, low)
