"""``lineas::steered_linear`` / ``steered_linear_backward``: the pure-torch reference AND the C++ CPU kernel
(csrc/steered_linear.cpp) against hand formulas — prologue ``(a⊙x + c)Wᵀ + bias`` and epilogue
``a⊙(xWᵀ + bias) + c`` written out per batch item in fp64, gradients by autograd through that plain torch.

Tolerances (SPEC §6): fp32 within 1e-5 (relative to the magnitude where it is large); bf16/fp16 error at most
2x the error of PyTorch's own low-precision result (``reference.steered_linear(..., upcast=False)``, i.e.
eager nn.Linear + a steering hook; its autograd for gradients), both measured vs the fp64 formulas on the
same low-precision inputs. Covers awkward shapes, non-contiguous x, identity (k=0) and dense (k=d) tables,
routing with -1 rows, R = 1, R < B, no live steering, opcheck (with and without the C++ kernel), threads,
ISA variants and that the C++ kernel is the one dispatched. C++ tests skip when the extension is not built,
except under CI (CI=true), where that fails.
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
DTYPES = [torch.float32, *LOW]
WHERE = {"prologue": ref.PROLOGUE, "epilogue": ref.EPILOGUE}
SHAPES = [((1, 1, 1023), 37), ((3, 7, 1500), 130), ((1024, 576), 1536), ((1023,), 64)]  # (x shape, out)


@pytest.fixture(scope="module")
def ops():
    try:
        import lineas_fast._C  # noqa: F401  (loading it registers the CPU kernels)
    except ImportError as e:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"lineas_fast._C must be built under CI: {e}")
        pytest.skip(f"C++ extension not built ({e}); pip install --no-build-isolation -e .")
    if not torch._C._dispatch_has_kernel_for_dispatch_key("lineas::steered_linear", "CPU"):
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail("lineas_fast._C has no steered_linear kernel: rebuild the extension")
        pytest.skip("lineas_fast._C predates steered_linear: python setup.py build_ext --inplace")
    return torch.ops.lineas


@pytest.fixture(params=["reference", "cpp"])
def impl(request):
    """(forward, backward) of the implementation under test."""
    if request.param == "reference":
        return ref.steered_linear, ref.steered_linear_backward
    o = request.getfixturevalue("ops")
    return o.steered_linear, o.steered_linear_backward


# ------------------------------------------------------------------ cases and oracles
def make(shape, out, where, dtype=torch.float32, k="d", route="rows", bias=True, contiguous=True, seed=0):
    """Op args: x, weight [out, in], bias (x's dtype, as a model holds them), a [K, d] table with ``k``
    non-identity channels per entry (d = in for the prologue, out for the epilogue) and a routing table of
    capacity C > R whose entries past R are poison (id 99, NaN strength)."""
    g = torch.Generator().manual_seed(seed)
    d_in, B = shape[-1], (shape[0] if len(shape) > 1 else 1)
    x = 2 * torch.randn(*shape[:-1], 2 * d_in if not contiguous else d_in, generator=g) + 0.3
    x = x.to(dtype) if contiguous else x.to(dtype)[..., ::2]
    w = (torch.randn(out, d_in, generator=g) / d_in ** 0.5).to(dtype)
    b = (0.5 * torch.randn(out, generator=g)).to(dtype) if bias else None
    d, K = (d_in if where == ref.PROLOGUE else out), 3
    scale, shift = torch.ones(K, d), torch.zeros(K, d)
    n = {"0": 0, "few": 7, "d": d}[k]
    cols = torch.randperm(d, generator=g)[:n]
    scale[:, cols] = 1 + 0.5 * torch.randn(K, n, generator=g)
    shift[:, cols] = torch.randn(K, n, generator=g)
    C = max(B, 4) + 2
    ids, strength = torch.full((C,), 99), torch.full((C,), float("nan"))
    R = {"broadcast": 1, "rows": B, "expand": max(1, B // 3), "uneven": max(1, (2 * B) // 3), "none": B}[route]
    ids[:R] = torch.arange(R) % (K + 1) - 1 if route != "broadcast" else K - 1  # cycles through -1 and 0..K-1
    if route == "none":
        ids[:R] = -1
    strength[:R] = torch.linspace(-0.5, 1.5, R) if R > 1 else 0.8
    return x, w, b, where, scale, shift, ids, strength, torch.tensor([R])


def hand(x, w, b, where, scale, shift, ids, strength, nrows):
    """The formulas in fp64, (a, c) looked up per batch item by an explicit loop; differentiable in x,
    scale and shift."""
    B = x.shape[0] if x.dim() > 1 else 1
    xb = x.double().reshape(B, -1, x.shape[-1])
    W, bb = w.double(), (b.double() if b is not None else 0.0)
    d = scale.shape[1]
    a, c = [], []
    for i in range(B):
        r = i * int(nrows) // B
        k, s = int(ids[r]), strength[r].double()
        a.append(torch.ones(d, dtype=torch.float64) if k < 0 else 1 + s * (scale[k].double() - 1))
        c.append(torch.zeros(d, dtype=torch.float64) if k < 0 else s * shift[k].double())
    a, c = torch.stack(a)[:, None], torch.stack(c)[:, None]
    y = (a * xb + c) @ W.T + bb if where == ref.PROLOGUE else a * (xb @ W.T + bb) + c
    return y.reshape(*x.shape[:-1], w.shape[0])


def hand_grads(go, args):
    x, scale, shift = (args[i].detach().clone().requires_grad_() for i in (0, 4, 5))
    y = hand(x, *args[1:4], scale, shift, *args[6:])
    return torch.autograd.grad(y, (x, scale, shift), go.double(), materialize_grads=True)


def torch_low_grads(go, args):
    """PyTorch's own low-precision gradients: autograd through the reference computed in x's dtype."""
    x, scale, shift = (args[i].detach().clone().requires_grad_() for i in (0, 4, 5))
    y = ref.steered_linear(x, *args[1:4], scale, shift, *args[6:], upcast=False)
    return torch.autograd.grad(y, (x, scale, shift), go, materialize_grads=True)


def check_forward(y, args):
    x, w = args[0], args[1]
    assert y.shape == (*x.shape[:-1], w.shape[0]) and y.dtype == x.dtype and y.is_contiguous()
    oracle = hand(*args)
    if x.dtype == torch.float32:
        assert_fp32_close(y, oracle, "forward")
    else:
        assert_low_precision(y, oracle, ref.steered_linear(*args, upcast=False), f"forward {x.dtype}")


def check_backward(grads, args, go):
    gx, gs, gb = grads
    x, scale = args[0], args[4]
    assert gx.shape == x.shape and gx.dtype == x.dtype
    assert gs.dtype == gb.dtype == torch.float32 and gs.shape == gb.shape == scale.shape
    oracle = hand_grads(go, args)
    if x.dtype == torch.float32:
        for name, got, want in zip(("grad_x", "grad_scale", "grad_shift"), grads, oracle):
            assert_fp32_close(got, want, name)
    else:
        for name, got, want, low in zip(("grad_x", "grad_scale", "grad_shift"), grads, oracle,
                                        torch_low_grads(go, args)):
            assert_low_precision(got, want, low, f"{name} {x.dtype}")


# ------------------------------------------------------------------ forward and backward
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("where", WHERE)
@pytest.mark.parametrize("shape,out", SHAPES, ids=str)
def test_forward_backward_shapes(impl, shape, out, where, dtype):
    route = {1: "broadcast", 3: "rows", 1024: "expand", 1023: "broadcast"}[shape[0]]
    args = make(shape, out, WHERE[where], dtype, route=route, seed=len(shape))
    fwd, bwd = impl
    check_forward(fwd(*args), args)
    go = torch.randn(*shape[:-1], out, generator=torch.Generator().manual_seed(9)).to(dtype)
    check_backward(bwd(go, *args), args, go)


@pytest.mark.parametrize("route", ["broadcast", "rows", "expand", "uneven", "none"])
@pytest.mark.parametrize("k", ["0", "few", "d"])
@pytest.mark.parametrize("where", WHERE)
@pytest.mark.parametrize("shape", [(12, 5, 130), (12, 130)], ids=str)  # 2-D: entries change every row
def test_routing_and_tables(impl, shape, where, k, route):
    args = make(shape, 70, WHERE[where], k=k, route=route, bias=route != "uneven")
    fwd, bwd = impl
    y = fwd(*args)
    check_forward(y, args)
    go = torch.randn(*shape[:-1], 70)
    gx, gs, gb = bwd(go, *args)
    check_backward((gx, gs, gb), args, go)
    if k == "0" or route == "none":  # identity table / nothing steered: a plain Linear
        assert_fp32_close(y, torch.nn.functional.linear(*args[:3]), "identity")
        assert_fp32_close(gx, go @ args[1], "identity grad_x")
    if route == "none":
        assert not gs.abs().sum() and not gb.abs().sum()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("where", WHERE)
def test_non_contiguous(impl, where, dtype):
    args = make((3, 7, 150), 40, WHERE[where], dtype, contiguous=False)
    assert not args[0].is_contiguous()
    fwd, bwd = impl
    check_forward(fwd(*args), args)
    go = torch.randn(3, 7, 40).to(dtype)
    check_backward(bwd(go, *args), args, go)
    t = make((5, 9, 130), 20, WHERE[where], dtype, seed=1)  # transposed x
    args = (t[0].transpose(0, 1).contiguous().transpose(0, 1), *t[1:])
    check_forward(fwd(*args), args)


@pytest.mark.parametrize("where", WHERE)
def test_autograd(impl, where):
    """Autograd through the op (registered autograd -> backward op) == autograd through the formulas;
    the frozen weight and bias get no gradient."""
    fwd = torch.ops.lineas.steered_linear if impl[0] is not ref.steered_linear else ref.steered_linear
    args = make((3, 7, 150), 40, WHERE[where], k="few")
    go = torch.randn(3, 7, 40)
    x, scale, shift = (args[i].clone().requires_grad_() for i in (0, 4, 5))
    w = args[1].clone().requires_grad_()
    y = fwd(x, w, args[2], args[3], scale, shift, *args[6:])
    y.backward(go)
    for name, got, want in zip(("x", "scale", "shift"), (x.grad, scale.grad, shift.grad), hand_grads(go, args)):
        assert_fp32_close(got, want, f"grad {name}")
    if fwd is not ref.steered_linear:
        assert w.grad is None


def test_edges(ops):
    for shape in [(0, 16), (2, 0, 16)]:  # empty tensors
        for where in WHERE.values():
            args = make(shape, 8, where, route="broadcast")
            y = ops.steered_linear(*args)
            assert y.shape == (*shape[:-1], 8)
            gx, gs, gb = ops.steered_linear_backward(torch.zeros(y.shape), *args)
            assert gx.shape == shape and not gs.abs().sum() and not gb.abs().sum()
    args = make((4, 64), 16, ref.EPILOGUE)  # mixed dtypes: fp32 grad for a bf16 x -> grad_x in bf16
    low = (args[0].bfloat16(), args[1].bfloat16(), *args[2:])
    go = torch.randn(4, 16)
    gx, gs, _ = ops.steered_linear_backward(go, *low)
    assert gx.dtype == torch.bfloat16
    rx, rs, _ = ref.steered_linear_backward(go, *low)
    torch.testing.assert_close(gx, rx.bfloat16())
    assert_fp32_close(gs, rs, "grad_scale (mixed dtypes)")


@pytest.mark.parametrize("dtype", LOW, ids=str)
def test_rounding_bit_exact(ops, dtype):
    """Epilogue with W = I and a = 1: the op's output is x + shift rounded once, so it must equal torch's
    own rounding bit for bit — ties to even, NaN, inf, overflow — in the vector body and the tail."""
    d = 40  # 2 vectors of 16 + a tail of 8
    big = 3e38 if dtype == torch.bfloat16 else 6e4  # x + shift overflows to inf
    ulp = 2 ** -8 if dtype == torch.bfloat16 else 2 ** -11  # half a unit in the last place at 1.0
    x = torch.tensor([1.0, 1.0 + 2 * ulp, -1.0, 3.0, 2.0, 2.0, -2.0, big] * 5).to(dtype)  # finite: W = I is exact
    shift = torch.tensor([ulp, ulp, -ulp, 1.5 * ulp, float("nan"), float("inf"), -float("inf"), big] * 5)[None]
    x = x.repeat(3, 1)  # rows sharing an entry: the cached (a, c) row loop, not the single-row path
    args = (x, torch.eye(d, dtype=dtype), None, ref.EPILOGUE, torch.ones(1, d), shift, torch.tensor([0]),
            torch.tensor([1.0]), torch.tensor([1]))
    got, want = ops.steered_linear(*args), ref.steered_linear(*args, upcast=False)
    assert got.isnan().sum() == 15 and got.isinf().sum() == 45
    assert torch.equal(got.isnan(), want.isnan())
    assert torch.equal(got.nan_to_num(0.0), want.nan_to_num(0.0)), (got, want)
    assert got[0, 0] == 1.0 and got[0, 1] == 1.0 + 4 * ulp  # ties went to even


def test_rejects_bad_input(ops):
    args = list(make((2, 3, 8), 5, ref.PROLOGUE))

    def bad(i, value, match):
        a = list(args)
        a[i] = value
        with pytest.raises(RuntimeError, match=match):
            ops.steered_linear(*a)

    bad(0, args[0].double(), "float32, bfloat16 or float16")
    bad(1, torch.ones(5, 7), r"weight must be a floating \[out_features, in_features\] tensor with in_features")
    bad(2, torch.ones(4), r"bias must be a floating tensor of shape \[5\]")
    bad(3, 2, "where=2")
    bad(4, torch.ones(3, 5), r"scale/shift must both have shape \[K, d\] with d = in_features = 8")
    bad(6, torch.tensor([0, 3, 0, 0, 0, 0]), r"ids\[1\] = 3 is out of range -1..2")
    bad(8, torch.tensor([7]), r"nrows\[0\] = 7 is out of range 1..6")
    a = list(args)
    a[3] = ref.EPILOGUE
    with pytest.raises(RuntimeError, match=r"d = out_features = 5"):
        ops.steered_linear(*a)
    with pytest.raises(RuntimeError, match="grad_out must have the output's shape"):
        ops.steered_linear_backward(torch.zeros(2, 3, 8), *args)


# ------------------------------------------------------------------ opcheck, dispatch, threads, ISA
def _opcheck_cases():
    cases = []
    for where in WHERE.values():
        for dtype in (torch.float32, torch.bfloat16):
            args = make((2, 3, 24), 16, where, dtype, k="few")
            x, scale, shift = (args[i].clone().requires_grad_(dtype == torch.float32) for i in (0, 4, 5))
            cases.append(((x, *args[1:4], scale, shift, *args[6:]), torch.randn(2, 3, 16).to(dtype), args))
    return cases


def test_opcheck(ops):
    for fwd_args, go, args in _opcheck_cases():
        torch.library.opcheck(ops.steered_linear.default, fwd_args)
        torch.library.opcheck(ops.steered_linear_backward.default, (go, *args))


def _python(code, env=None):
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False,
                       env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout


def test_opcheck_without_cpp_kernel():
    """With lineas_fast._C unimportable the ops run the pure-torch reference and still pass opcheck."""
    _python("import sys, torch\nsys.modules['lineas_fast._C'] = None\n"
            "import lineas_fast.ops as ops\n"
            "assert ops.CPU_KERNELS_MISSING\n"
            "assert not torch._C._dispatch_has_kernel_for_dispatch_key('lineas::steered_linear', 'CPU')\n"
            f"sys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r})\n"
            "from test_steered_linear import _opcheck_cases, hand, assert_fp32_close\n"
            "for f, go, a in _opcheck_cases():\n"
            "    torch.library.opcheck(torch.ops.lineas.steered_linear.default, f)\n"
            "    torch.library.opcheck(torch.ops.lineas.steered_linear_backward.default, (go, *a))\n"
            "    if a[0].dtype == torch.float32:\n"
            "        assert_fp32_close(torch.ops.lineas.steered_linear(*a), hand(*a))\n")


def test_cpu_kernel_is_dispatched(ops):
    for name in ("steered_linear", "steered_linear_backward"):
        cpu = [ln for ln in torch._C._dispatch_dump(f"lineas::{name}").splitlines() if ln.startswith("CPU:")]
        assert cpu and "steered_linear.cpp" in cpu[0], cpu
    args = make((3, 7, 64), 32, ref.EPILOGUE)  # the reference would index the table (aten::index)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        ops.steered_linear(*args)
        ops.steered_linear_backward(torch.randn(3, 7, 32), *args)
    names = {e.name for e in prof.events()}
    assert "lineas::steered_linear" in names and "lineas::steered_linear_backward" in names
    assert not names & {"aten::index", "aten::index_add_", "aten::where"}, names


def test_threads_and_determinism(ops):
    """The OpenMP row pass on 2 threads: same results (to fp32 rounding: the matmul may split differently),
    and a deterministic backward."""
    for where in WHERE.values():
        args = make((64, 2048), 96, where, route="rows")
        go = torch.randn(64, 96)
        y1, g1 = ops.steered_linear(*args), ops.steered_linear_backward(go, *args)
        torch.set_num_threads(2)  # the one_thread fixture restores it
        y2, g2, g3 = ops.steered_linear(*args), ops.steered_linear_backward(go, *args), \
            ops.steered_linear_backward(go, *args)
        torch.set_num_threads(1)
        assert_fp32_close(y2, y1, "2 threads")
        for a, b, c in zip(g1, g2, g3):
            assert_fp32_close(b, a, "2 threads backward")
            assert torch.equal(b, c)
        check_backward(g2, args, go)


@pytest.mark.parametrize("isa", ["default", "avx2"])
def test_isa_variants(ops, isa, tmp_path):
    """The narrower compiled variants are correct too (LINEAS_FAST_CPU_ISA caps the choice per process)."""
    cases = []
    for where in WHERE.values():
        for dtype in DTYPES:
            args = make((12, 300), 50, where, dtype, seed=11)
            cases.append((args, torch.randn(12, 50).to(dtype)))
    torch.save(cases, tmp_path / "cases.pt")
    _python("import torch, lineas_fast.ops, lineas_fast._C\n"
            f"cases = torch.load({str(tmp_path / 'cases.pt')!r})\n"
            "out = [(torch.ops.lineas.steered_linear(*a), torch.ops.lineas.steered_linear_backward(g, *a))"
            " for a, g in cases]\n"
            f"torch.save(out, {str(tmp_path / 'out.pt')!r})\n", env={"LINEAS_FAST_CPU_ISA": isa})
    for (args, go), (y, grads) in zip(cases, torch.load(tmp_path / "out.pt")):
        check_forward(y, args)
        check_backward(grads, args, go)
