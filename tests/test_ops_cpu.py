"""C++ CPU kernels of ``lineas::norm_affine`` / ``lineas::norm_affine_backward`` (csrc/norm_affine.cpp)
against the pure-torch oracle ``lineas_fast.ops.reference``.

Tolerances (SPEC §6): fp32 within 1e-5 (absolute, or relative where magnitudes are large); bf16/fp16
error at most 2x the error of PyTorch's own low-precision result (``reference.norm_affine(...,
upcast=False)``) — both measured as max abs vs the fp32 reference on the same (low-precision) inputs.
Covers awkward shapes, non-contiguous x, identity (k=0) and dense (k=d) tables, routing with -1 rows,
R = 1 and B = k·R, LayerNorm / RMSNorm / Gemma (offset 1), optional weight and bias, gradients,
opcheck, both import orders, every compiled ISA variant, and that the CPU kernel is really the one
dispatched. Skipped when the extension is not built, except under CI (CI=true), where that fails.
"""

import os
import subprocess
import sys

import pytest
import torch
from conftest import assert_fp32_close, assert_low_precision

from lineas_fast.ops import reference as ref

pytestmark = pytest.mark.usefixtures("one_thread")
LOW = [torch.bfloat16, torch.float16]
KINDS = {"layernorm": (ref.LAYERNORM, 0.0), "rmsnorm": (ref.RMSNORM, 0.0), "gemma": (ref.RMSNORM, 1.0)}
SHAPES = [(1, 1, 1023), (3, 7, 1500), (1024, 576), (4096, 2048), (1023,)]


@pytest.fixture(scope="module")
def ops():
    try:
        import lineas_fast._C  # noqa: F401  (loading it registers the CPU kernels)
    except ImportError as e:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"lineas_fast._C must be built under CI: {e}")
        pytest.skip(f"C++ extension not built ({e}); pip install --no-build-isolation -e .")
    return torch.ops.lineas


# ------------------------------------------------------------------ cases
def routing(B, mode, K, g):
    """(ids, strength, nrows) with capacity C > R; entries past R are poison (id 99, NaN strength)."""
    C = max(B, 4) + 2
    ids, strength = torch.full((C,), 99, dtype=torch.int64), torch.full((C,), float("nan"))
    if mode == "broadcast":  # R = 1: one entry for every row
        R = 1
        ids[0], strength[0] = K - 1, 0.8
    elif mode == "rows":  # R = B, ids cycling through -1 (unsteered) and every entry
        R = B
        ids[:R] = torch.arange(R) % (K + 1) - 1
        strength[:R] = 2 * torch.rand(R, generator=g) - 0.5
        strength[min(1, R - 1)] = 0.0
    elif mode == "expand":  # B = k·R (generate expanding each row k times)
        k = next(k for k in (4, 3, 2, 1) if B % k == 0)
        R = B // k
        ids[:R] = torch.arange(R) % (K + 1) - 1
        strength[:R] = torch.linspace(-0.5, 1.5, R)
    else:  # "uneven": R does not divide B
        R = max(1, (2 * B) // 3)
        ids[:R] = torch.arange(R) % (K + 1) - 1
        strength[:R] = torch.linspace(0.3, 1.2, R)
    return ids, strength, torch.tensor([R])


def make(shape, dtype=torch.float32, kind="rmsnorm", k="d", route="rows", weight=True, bias=None,
         contiguous=True, seed=0):
    """Op args: x (in ``dtype``), weight/bias (in ``dtype``, as a model holds them; bias=None: only for
    LayerNorm), a [K, d] table with ``k`` non-identity channels per entry (0, a few, or all d) and a
    routing table."""
    g = torch.Generator().manual_seed(seed)
    d, B = shape[-1], (shape[0] if len(shape) > 1 else 1)
    if contiguous:
        x = (3 * torch.randn(shape, generator=g) + 0.5).to(dtype)
    else:  # same shape, last dim strided
        x = (3 * torch.randn(*shape[:-1], 2 * d, generator=g) + 0.5).to(dtype)[..., ::2]
    code, offset = KINDS[kind]
    w = (0.1 if offset else 1.0) * torch.randn(d, generator=g) + (0 if offset else 1)
    b = 0.2 * torch.randn(d, generator=g)
    K = 3
    scale, shift = torch.ones(K, d), torch.zeros(K, d)
    n = {"0": 0, "few": 7, "d": d}[k]
    cols = torch.randperm(d, generator=g)[:n]
    scale[:, cols] = 1 + 0.5 * torch.randn(K, n, generator=g)
    shift[:, cols] = torch.randn(K, n, generator=g)
    ids, strength, nrows = routing(B, route, K, g)
    bias = code == ref.LAYERNORM if bias is None else bias
    return (x, w.to(dtype) if weight else None, b.to(dtype) if bias else None,
            1e-5, code, offset, scale, shift, ids, strength, nrows)


def up(args):
    """The same case with x / weight / bias upcast to fp32 (the fp32 reference's inputs)."""
    return tuple(a.float() if i in (0, 1, 2) and a is not None else a for i, a in enumerate(args))


def check_forward(y, args):
    x = args[0]
    assert y.shape == x.shape and y.dtype == x.dtype and y.is_contiguous()
    ref32 = ref.norm_affine(*up(args))
    if x.dtype == torch.float32:
        assert_fp32_close(y, ref32, "forward")
    else:
        assert_low_precision(y, ref32, ref.norm_affine(*args, upcast=False), f"forward {x.dtype}")


def check_backward(grads, args, go):
    """grad_x vs the fp32 explicit formulas (dtype-aware), grad_scale/grad_shift in fp32."""
    gx, gs, gb = grads
    x = args[0]
    assert gx.shape == x.shape and gx.dtype == x.dtype
    assert gs.dtype == gb.dtype == torch.float32 and gs.shape == gb.shape == args[6].shape
    rx, rs, rb = ref.norm_affine_backward(go.float(), *up(args))
    assert_fp32_close(gs, rs, "grad_scale")
    assert_fp32_close(gb, rb, "grad_shift")
    if x.dtype == torch.float32:
        assert_fp32_close(gx, rx, "grad_x")
    else:  # PyTorch's own: autograd through the reference computed in x's dtype
        xl = x.detach().clone().requires_grad_()
        (tl,) = torch.autograd.grad(ref.norm_affine(xl, *args[1:], upcast=False), xl, go)
        assert_low_precision(gx, rx, tl, f"grad_x {x.dtype}")


# ------------------------------------------------------------------ forward
@pytest.mark.parametrize("dtype", [torch.float32, *LOW], ids=str)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_forward_shapes(ops, shape, kind, dtype):
    route = {1: "broadcast", 3: "rows", 1024: "expand", 4096: "uneven", 1023: "rows"}[shape[0]]
    args = make(shape, dtype, kind, k="d", route=route, seed=len(shape))
    check_forward(ops.norm_affine(*args), args)


@pytest.mark.parametrize("route", ["broadcast", "rows", "expand", "uneven"])
@pytest.mark.parametrize("k", ["0", "few", "d"])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("shape", [(12, 5, 130), (12, 130)], ids=str)  # 2-D: entries change every row
def test_forward_routing_and_tables(ops, shape, kind, k, route):
    args = make(shape, torch.float32, kind, k=k, route=route)
    y = ops.norm_affine(*args)
    check_forward(y, args)
    if k == "0":  # identity table: plain norm, whatever the routing
        plain = ref.normalize(args[0].float(), args[1], args[2], args[3], args[4], args[5])
        assert_fp32_close(y, plain, "identity table")


@pytest.mark.parametrize("dtype", [torch.float32, *LOW], ids=str)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("weight,bias", [(False, False), (False, True), (True, False)])
def test_forward_optional_weight_bias(ops, kind, weight, bias, dtype):
    args = make((3, 7, 1500), dtype, kind, weight=weight, bias=bias, seed=3)
    check_forward(ops.norm_affine(*args), args)


@pytest.mark.parametrize("dtype", [torch.float32, *LOW], ids=str)
@pytest.mark.parametrize("shape", [(3, 7, 1500), (1023,), (64, 576)], ids=str)
def test_forward_non_contiguous(ops, shape, dtype):
    args = make(shape, dtype, "layernorm", contiguous=False)
    assert not args[0].is_contiguous()
    check_forward(ops.norm_affine(*args), args)
    t = make((5, 9, 130), dtype, "rmsnorm", seed=1)  # transposed x, fp64 weight: converted once
    args = (t[0].transpose(0, 1).contiguous().transpose(0, 1), t[1].double(), *t[2:])
    check_forward(ops.norm_affine(*args), args)


@pytest.mark.parametrize("dtype", [torch.float32, *LOW], ids=str)
def test_edges(ops, dtype):
    for shape in [(0, 16), (2, 0, 16), (2, 3, 0)]:  # empty tensors
        args = make(shape, dtype, route="broadcast")
        assert ops.norm_affine(*args).shape == args[0].shape
        gx, gs, gb = ops.norm_affine_backward(torch.zeros_like(args[0]), *args)
        assert gx.shape == args[0].shape and not gs.abs().sum() and not gb.abs().sum()
    args = make((2, 3, 64), dtype, "layernorm")  # NaN/inf stay in their row, like the reference
    args[0][1, 2, 3] = float("nan")
    y, want = ops.norm_affine(*args), ref.norm_affine(*up(args))
    assert torch.equal(y.isnan(), want.isnan()) and y.isnan().any()


def test_rejects_bad_input(ops):
    args = list(make((2, 3, 8), route="rows"))

    def bad(i, value, match):
        a = list(args)
        a[i] = value
        with pytest.raises(RuntimeError, match=match):
            ops.norm_affine(*a)

    bad(0, args[0].double(), "float32, bfloat16 or float16")
    bad(1, torch.ones(7), r"weight must be a floating tensor of shape \[8\]")
    bad(2, torch.ones(9), r"bias must be a floating tensor of shape \[8\]")
    bad(4, 2, "kind=2")
    bad(6, torch.ones(3, 7), r"scale/shift must both have shape \[K, d\] with d = x.size\(-1\) = 8")
    bad(7, torch.zeros(3, 8, dtype=torch.float64), "scale/shift must be float32")
    bad(8, args[8].int(), "ids must be a non-empty int64")
    bad(9, args[9][:3], "strength must be float32 of shape")
    bad(10, torch.tensor([0]), r"nrows\[0\] = 0 is out of range 1..6")
    bad(10, torch.tensor([7]), r"nrows\[0\] = 7 is out of range 1..6")
    bad(8, torch.tensor([0, 3, 0, 0, 0, 0]), r"ids\[1\] = 3 is out of range -1..2")
    with pytest.raises(RuntimeError, match="grad_out must have x's shape"):
        ops.norm_affine_backward(torch.zeros(2, 3, 7), *args)


# ------------------------------------------------------------------ backward
@pytest.mark.parametrize("dtype", [torch.float32, *LOW], ids=str)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("shape", [(1, 1, 1023), (3, 7, 1500), (1024, 576), (1023,)], ids=str)
def test_backward(ops, shape, kind, dtype):
    route = {1: "broadcast", 3: "rows", 1024: "expand", 1023: "rows"}[shape[0]]
    args = make(shape, dtype, kind, route=route, seed=5)
    go = torch.randn(shape, generator=torch.Generator().manual_seed(9)).to(dtype)
    check_backward(ops.norm_affine_backward(go, *args), args, go)


@pytest.mark.parametrize("route", ["broadcast", "expand", "uneven"])
@pytest.mark.parametrize("weight,bias", [(False, False), (True, True)])
@pytest.mark.parametrize("kind", KINDS)
def test_backward_routing_and_optional(ops, kind, weight, bias, route):
    args = make((12, 5, 130), torch.float32, kind, k="few", route=route, weight=weight, bias=bias)
    go = torch.randn(args[0].shape)
    check_backward(ops.norm_affine_backward(go, *args), args, go)
    # mixed dtypes: fp32 grad for a bf16 x is computed on fp32 copies, grad_x returned in x's dtype
    low = (args[0].bfloat16(), *args[1:])
    gx, gs, _ = ops.norm_affine_backward(go, *low)
    rx, rs, _ = ref.norm_affine_backward(go, *up(low))
    assert gx.dtype == torch.bfloat16
    torch.testing.assert_close(gx, rx.bfloat16())
    assert_fp32_close(gs, rs, "grad_scale (mixed dtypes)")


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("shape", [(3, 7, 1500), (1023,)], ids=str)
def test_autograd_matches_reference(ops, shape, kind):
    """Autograd through the op (registered autograd -> C++ backward) == autograd through the
    pure-torch reference."""
    args = make(shape, torch.float32, kind, k="few", route="rows" if len(shape) > 1 else "broadcast")
    go = torch.randn(shape)
    grads = []
    for fn in (ops.norm_affine, ref.norm_affine):
        x, scale, shift = (args[i].clone().requires_grad_() for i in (0, 6, 7))
        a = (x, *args[1:6], scale, shift, *args[8:])
        grads.append(torch.autograd.grad(fn(*a), (x, scale, shift), go))
    for name, got, want in zip(("x", "scale", "shift"), *grads):
        assert_fp32_close(got, want, f"grad {name}")


def test_opcheck(ops):
    for kind in KINDS:
        args = make((2, 3, 64), torch.float32, kind, k="few", route="rows")
        x, scale, shift = (args[i].clone().requires_grad_() for i in (0, 6, 7))
        torch.library.opcheck(ops.norm_affine.default, (x, *args[1:6], scale, shift, *args[8:]))
        torch.library.opcheck(ops.norm_affine_backward.default, (torch.randn(2, 3, 64), *args))
    args = make((5, 64), torch.bfloat16, "layernorm", route="broadcast")
    torch.library.opcheck(ops.norm_affine.default, args)
    torch.library.opcheck(ops.norm_affine_backward.default, (torch.randn(5, 64).bfloat16(), *args))


# ------------------------------------------------------------------ threads, dispatch, ISA variants
def test_threads_and_determinism(ops):
    """The OpenMP path (2 threads) gives the 1-thread forward bit for bit, and a deterministic backward."""
    args = make((64, 2048), torch.float32, "layernorm", route="expand")
    go = torch.randn(64, 2048)
    y1, g1 = ops.norm_affine(*args), ops.norm_affine_backward(go, *args)
    torch.set_num_threads(2)  # the one_thread fixture restores it
    y2, g2, g3 = ops.norm_affine(*args), ops.norm_affine_backward(go, *args), ops.norm_affine_backward(go, *args)
    assert torch.equal(y1, y2) and torch.equal(g1[0], g2[0])
    assert all(torch.equal(a, b) for a, b in zip(g2, g3))
    check_backward(g2, args, go)


def test_cpu_kernel_is_dispatched(ops):
    assert torch._C._dispatch_has_kernel_for_dispatch_key("lineas::norm_affine", "CPU")
    assert torch._C._dispatch_has_kernel_for_dispatch_key("lineas::norm_affine_backward", "CPU")
    for name in ("norm_affine", "norm_affine_backward"):
        cpu = [ln for ln in torch._C._dispatch_dump(f"lineas::{name}").splitlines() if ln.startswith("CPU:")]
        assert cpu and "norm_affine.cpp" in cpu[0], cpu
    # the pure-torch fallback would run aten::mean / aten::rsqrt; the C++ kernel runs neither
    args = make((3, 7, 64), torch.float32, "layernorm")
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        ops.norm_affine(*args)
        ops.norm_affine_backward(torch.randn(3, 7, 64), *args)
    names = {e.name for e in prof.events()}
    assert "lineas::norm_affine" in names and "lineas::norm_affine_backward" in names
    assert not names & {"aten::mean", "aten::rsqrt", "aten::index_add_"}, names


def _python(code, env=None):
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False,
                       env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout


def test_import_orders(ops):
    """Schemas come from Python, kernels from C++: either may load first (C++ first = load_library
    before lineas_fast.ops has defined the schemas)."""
    check = ("assert torch._C._dispatch_has_kernel_for_dispatch_key('lineas::norm_affine', 'CPU')\n"
             "from lineas_fast.ops import reference as ref\n"
             "a = (torch.randn(2, 3, 16), None, None, 1e-5, 1, 0.0, torch.full((1, 16), 2.0),"
             " torch.ones(1, 16), torch.tensor([0]), torch.tensor([1.0]), torch.tensor([1]))\n"
             "assert torch.allclose(torch.ops.lineas.norm_affine(*a), ref.norm_affine(*a), atol=1e-5)\n")
    _python("import torch, importlib.util\n"
            "torch.ops.load_library(importlib.util.find_spec('lineas_fast._C').origin)\n"
            "import lineas_fast.ops\n" + check)
    _python("import torch, lineas_fast.ops, lineas_fast._C\n" + check)


@pytest.mark.parametrize("isa", ["default", "avx2"])
def test_isa_variants(ops, isa, tmp_path):
    """Every compiled variant (x86-64 baseline, AVX2, AVX-512) is correct: narrower ones run in a
    subprocess capped by LINEAS_FAST_CPU_ISA (the choice is made once per process)."""
    cases = []
    for shape in ((3, 7, 1500), (12, 1500)):  # cached (A, C) per entry / applied on the fly per row
        for dtype in (torch.float32, *LOW):
            for kind in KINDS:
                args = make(shape, dtype, kind, route="rows", seed=11)
                cases.append((args, torch.randn(shape).to(dtype)))
    torch.save(cases, tmp_path / "cases.pt")
    _python("import torch, lineas_fast.ops, lineas_fast._C, sys\n"
            f"cases = torch.load({str(tmp_path / 'cases.pt')!r})\n"
            "out = [(torch.ops.lineas.norm_affine(*a), torch.ops.lineas.norm_affine_backward(g, *a)) for a, g in cases]\n"
            f"torch.save(out, {str(tmp_path / 'out.pt')!r})\n", env={"LINEAS_FAST_CPU_ISA": isa})
    for (args, go), (y, grads) in zip(cases, torch.load(tmp_path / "out.pt")):
        check_forward(y, args)
        check_backward(grads, args, go)
