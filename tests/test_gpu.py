"""GPU checks run by ``make gpu-check`` (``benchmarks/gpu_check.py``), and the plumbing of that check on CPU.

On a CUDA machine (``gpu`` marker; skipped at setup elsewhere, failures under LINEAS_FAST_REQUIRE_GPU=1):
the registry's answers match the dispatcher; the CUDA extension and the Triton launchers against the
pure-torch oracle :mod:`lineas_fast.ops.reference` (fp32 1e-5; bf16/fp16 at most 2x PyTorch's own
low-precision error, grad_x within 1 ulp of the fp32 math), forward and backward; ``backend="cuda"``
end to end; a fused decode step (CUDA-extension norms, Triton Linear prologues) captured in a CUDA graph,
replayed after in-place routing changes, against eager hooks.

Everywhere: the gpu-check dry run lists its steps; without a GPU the check fails (never skips); setup.py's
CUDA build flags; the decode step that the graph test captures makes no host sync (no ``.item()`` or
data-dependent shapes: the condition for CUDA-graph capture, checked on CPU with a dispatch mode).
"""

import os
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import assert_fp32_close, assert_low_precision, make_model, random_steering, snapshot

import lineas_fast as lf
import lineas_fast.backends as B
from lineas_fast import ops
from lineas_fast.ops import reference as ref

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from bench_gpu import capture, decode_step  # noqa: E402

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
VARIANTS = {"layernorm": (0, 0.0), "rmsnorm": (1, 0.0), "gemma": (1, 1.0)}


# ------------------------------------------------------------------ gpu-check plumbing (CPU)
def _check(*args, timeout=300):
    return subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout, env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_gpu_check_dry_run_lists_steps():
    r = _check("--dry-run")
    assert r.returncode == 0, r.stderr
    out = r.stdout
    for needle in ("LINEAS_FAST_CUDA=1", "pip install --no-build-isolation --no-deps -e .", "-m gpu",
                   "LINEAS_FAST_REQUIRE_GPU=1", "TRITON_INTERPRET=0", "tests/test_gpu.py",
                   "tests/test_cuda_norm_affine.py", "benchmarks/bench_gpu.py", "benchmarks/results/gpu"):
        assert needle in out, f"{needle!r} not in the dry run:\n{out}"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the failure without a GPU")
def test_gpu_check_fails_without_gpu(tmp_path):
    r = _check("--skip-build", "--out-dir", str(tmp_path))
    assert r.returncode != 0 and "no CUDA device" in r.stdout + r.stderr, r.stdout + r.stderr
    assert "| preflight | FAILED (exit 1) |" in (tmp_path / "check.md").read_text()


def test_setup_cuda_flags(monkeypatch):
    setup = runpy.run_path(str(ROOT / "setup.py"), run_name="setup_under_test")
    make = lambda name, sources, extra_compile_args: (name, sources, extra_compile_args)  # noqa: E731
    monkeypatch.chdir(ROOT)
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST", raising=False)
    monkeypatch.delenv("LINEAS_FAST_CUDA", raising=False)
    name, sources, args = setup["cuda_extension"]("12.8", "/usr/local/cuda", make)
    assert name == "lineas_fast._C_cuda" and "csrc/cuda/norm_affine.cu" in sources
    assert {"-O3", "-lineinfo"} <= set(args["nvcc"]) and os.environ["TORCH_CUDA_ARCH_LIST"] == "8.0;9.0+PTX"
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "9.0")
    setup["cuda_extension"]("12.8", "/usr/local/cuda", make)
    assert os.environ["TORCH_CUDA_ARCH_LIST"] == "9.0"
    with pytest.warns(UserWarning, match="torch is not a CUDA build"):
        assert setup["cuda_extension"](None, "/usr/local/cuda", make) is None  # auto: today's CPU default
    monkeypatch.setenv("LINEAS_FAST_CUDA", "1")
    with pytest.raises(SystemExit, match="LINEAS_FAST_CUDA=1 but .* CUDA_HOME not found"):
        setup["cuda_extension"]("12.8", None, make)
    monkeypatch.setenv("LINEAS_FAST_CUDA", "0")
    with pytest.warns(UserWarning, match="LINEAS_FAST_CUDA=0"):
        assert setup["cuda_extension"]("12.8", "/usr/local/cuda", make) is None


class _HostSyncs(torch.utils._python_dispatch.TorchDispatchMode):
    """Records ops that read device data on the host or have data-dependent shapes (break graph capture)."""

    BAD = ("_local_scalar_dense", "item", "nonzero", "masked_select", "unique", "_unique2")

    def __init__(self):
        super().__init__()
        self.bad = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.__name__.split(".")[0] in self.BAD:
            self.bad.append(str(func))
        return func(*args, **(kwargs or {}))


def steered_pair(device, dtype=torch.float32):
    """A tiny Llama fused (norms + MLP hidden: norm_affine and steered_linear) and a copy under hooks, with
    the same two steerings and routing."""
    model = make_model("llama").to(device, dtype)
    twin = make_model("llama").to(device, dtype)
    a, b = (random_steering(model, "norms+mlp_hidden", seed=s) for s in (0, 1))
    hf = lf.steer_(model, {"a": a, "b": b}, mode="fused")
    hh = lf.steer_(twin, {"a": a, "b": b}, mode="hooks")
    return (model, hf), (twin, hh)


ROUTES = [(["a", None, "b"], [0.7, 1.0, 1.3]), (["b", "a", None], [1.0, 0.5, 1.0]), (["a", "a", "a"], 1.0)]


def test_decode_step_makes_no_host_sync():
    (model, hf), (twin, hh) = steered_pair("cpu")
    for h in (hf, hh):
        h.route(*ROUTES[0])
    step, want = decode_step(model, 3, 6), decode_step(twin, 3, 6)
    with _HostSyncs() as mode:
        got = step()
    assert mode.bad == []
    assert_fp32_close(got, want(), "fused vs hooks")
    assert torch.equal(step(), got)  # repeatable: each call rewrites the same cache slot


# ------------------------------------------------------------------ GPU
@pytest.fixture
def gpu():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    if INTERPRET:
        pytest.skip("TRITON_INTERPRET=1: set TRITON_INTERPRET=0 to run the Triton kernels on the GPU")


@pytest.fixture
def cuda_ext(gpu):
    if ops.CUDA_KERNELS_MISSING:
        pytest.skip(f"CUDA extension unavailable: {ops.CUDA_KERNELS_MISSING}")


@pytest.fixture
def triton_gpu(gpu):
    if ops.GPU_KERNELS_MISSING:
        pytest.skip(f"Triton kernels not registered for CUDA: {ops.GPU_KERNELS_MISSING}")


def norm_case(shape, variant, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    kind, offset = VARIANTS[variant]
    d, n_items = shape[-1], shape[0]
    x = (1.5 * torch.randn(shape, generator=g) + 0.3).to(dtype)
    w, b = 0.5 + torch.rand(d, generator=g), 0.2 * torch.randn(d, generator=g)
    scale = 1 + 0.3 * torch.randn(3, d, generator=g)
    shift = 0.2 * torch.randn(3, d, generator=g)
    ids = torch.tensor([[0, -1, 1, 2][i % 4] for i in range(n_items)] + [2])  # + a spare entry past R
    args = [w, b, 1e-5, kind, offset, scale, shift, ids, torch.linspace(0.4, 1.3, n_items + 1),
            torch.tensor([n_items])]
    return x.cuda(), [a.cuda() if isinstance(a, torch.Tensor) else a for a in args]


@pytest.mark.gpu
def test_registry_matches_dispatcher_on_cuda(cuda_ext, triton_gpu):
    has = torch._C._dispatch_has_kernel_for_dispatch_key
    assert B.decisions("cuda")["None"] == {"norm_affine": "cuda", "steered_linear": "triton"}
    for op in ops.SCHEMAS:
        assert has(f"lineas::{op}", "CUDA"), op
    for op in ("norm_affine", "norm_affine_backward"):  # the extension's kernel, not a Triton launcher
        line = next(x for x in torch._C._dispatch_dump(f"lineas::{op}").splitlines() if x.startswith("CUDA"))
        assert "binding.cpp" in line, line
    norm, lin = B.resolve_backend("cuda", torch.device("cuda"))
    assert norm is ops.norm_affine and isinstance(lin, B.Unavailable)
    assert lf.env_report()["cuda"]["usable"] and lf.env_report()["triton"]["usable"]


@pytest.mark.gpu
@pytest.mark.parametrize("impl", ["cuda_ext", "triton"])
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_norm_affine_vs_reference(impl, variant, dtype, cuda_ext, triton_gpu):
    from lineas_fast import kernels

    fwd, bwd = ((ops.norm_affine, ops.norm_affine_backward) if impl == "cuda_ext" else
                (kernels.norm_affine_fwd, kernels.norm_affine_bwd))
    for shape in [(3, 37, 1000), (5, 4096), (1, 1, 1023)]:
        x, args = norm_case(shape, variant, dtype)
        out = fwd(x, *args)
        go = torch.randn(x.shape, device="cuda").to(dtype)
        gx, gs, gb = bwd(go, x, *args)
        rx, rs, rb = ref.norm_affine_backward(go, x, *args)
        assert out.dtype == gx.dtype == dtype and out.shape == gx.shape == x.shape
        if dtype == torch.float32:
            assert_fp32_close(out, ref.norm_affine(x, *args), f"{impl} out")
            assert_fp32_close(gx, rx, f"{impl} grad_x")
        else:
            assert_low_precision(out, ref.norm_affine(x.float(), *args), ref.norm_affine(x, *args, upcast=False),
                                 f"{impl} out {dtype}")
            ulp = torch.finfo(dtype).eps
            assert bool(((gx.float() - rx.float()).abs() <= ulp * rx.float().abs() + 1e-6).all()), f"{impl} grad_x"
        assert_fp32_close(gs, rs, f"{impl} grad_scale")
        assert_fp32_close(gb, rb, f"{impl} grad_shift")


@pytest.mark.gpu
@pytest.mark.parametrize("where", [ref.PROLOGUE, ref.EPILOGUE], ids=["prologue", "epilogue"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_steered_linear_triton_vs_reference(where, dtype, triton_gpu):
    """The op on CUDA tensors (Triton: the CUDA extension has no steered_linear), forward and autograd."""
    g = torch.Generator().manual_seed(0)
    B_, T, d_in, d_out = 3, 7, 150, 70
    d = d_in if where == ref.PROLOGUE else d_out
    cpu = [torch.randn(B_, T, d_in, generator=g), torch.randn(d_out, d_in, generator=g) / 12,
           0.1 * torch.randn(d_out, generator=g)]
    x, w, b = (t.to("cuda", dtype) for t in cpu)
    tables = [(1 + 0.3 * torch.randn(3, d, generator=g)).cuda(), (0.2 * torch.randn(3, d, generator=g)).cuda()]
    routing = [torch.tensor([0, -1, 2, 1], device="cuda"), torch.linspace(0.5, 1.5, 4, device="cuda"),
               torch.tensor([3], device="cuda")]

    def run(xx, upcast=None):
        xs, sc, sh = (t.detach().clone().requires_grad_() for t in (xx, *tables))
        fn = ops.steered_linear if upcast is None else lambda *a: ref.steered_linear(*a, upcast=upcast)
        ww, bb = (w, b) if xx.dtype == dtype else (w.float(), b.float())
        y = fn(xs, ww, bb, where, sc, sh, *routing)
        go = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to("cuda", dtype).to(y.dtype)
        return (y, *torch.autograd.grad(y, (xs, sc, sh), go))

    got = run(x)
    if dtype == torch.float32:
        for name, a, e in zip(("y", "grad_x", "grad_scale", "grad_shift"), got, run(x, upcast=True)):
            assert_fp32_close(a, e, name)
    else:
        for name, a, e, low in zip(("y", "grad_x", "grad_scale", "grad_shift"), got, run(x.float(), upcast=True),
                                   run(x, upcast=False)):
            assert_low_precision(a, e, low, f"{name} {dtype}")


@pytest.mark.gpu
def test_explicit_cuda_backend_end_to_end(cuda_ext):
    model = make_model("llama").cuda()
    st = random_steering(model, "norms")
    ids = torch.randint(3, 128, (2, 5), device="cuda")
    with lf.steered(model, st, mode="hooks"):
        want = model(input_ids=ids).logits
    with lf.steered(model, st, mode="fused", backend="cuda"):
        assert all(m.fn is ops.norm_affine for m in model.modules() if type(m).__name__ == "FusedNorm")
        got = model(input_ids=ids).logits
    assert_fp32_close(got, want, "backend='cuda' vs hooks")
    snap = snapshot(model)
    with pytest.raises(lf.SteeringError, match="has no steered_linear kernel"):
        lf.steer_(model, random_steering(model, "mlp_hidden"), mode="fused", backend="cuda")
    assert all(torch.equal(v, snap[k]) for k, v in model.state_dict().items())


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_fused_decode_step_in_cuda_graph(dtype, cuda_ext, triton_gpu):
    """A decode step of the fused model (CUDA-extension norms, Triton Linear prologues) captured once, then
    replayed after in-place route() changes, matches the eager hooks model at each routing."""
    (model, hf), (twin, hh) = steered_pair("cuda", dtype)
    fused = [m for m in model.modules() if type(m).__name__.startswith("Fused")]
    assert {type(m).__name__ for m in fused} == {"FusedNorm", "FusedLinear"}
    for h in (hf, hh):
        h.route(*ROUTES[0])
    graph, out = capture(decode_step(model, 3, 6))
    eager = decode_step(twin, 3, 6)
    for names, strength in ROUTES:
        for h in (hf, hh):
            h.route(names, strength)
        graph.replay()
        want = eager()
        tol = 1e-4 if dtype == torch.float32 else 5e-2
        assert float((out.float() - want.float()).abs().max()) <= tol * max(1.0, float(want.abs().max())), names
    assert float((out.float() - decode_step(make_model("llama").to("cuda", dtype), 3, 6)().float()).abs().max()) > 1e-3
