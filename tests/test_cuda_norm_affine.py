"""CUDA kernels of ``lineas::norm_affine`` / ``norm_affine_backward``: csrc/cuda/norm_affine.cu (torch-free)
and its binding in csrc/cuda/binding.cpp (``lineas_fast._C_cuda``).

* Everywhere (skipped without the tools): norm_affine.cu compiles with nvcc for sm_80 and sm_90 with every
  nvcc, host-compiler and ptxas warning (register spills included) an error; binding.cpp passes a host
  syntax check against this torch's headers (a CPU torch ships the c10/cuda headers it uses).
* With a GPU and the extension built: the CUDA ops against the pure-torch oracle
  :mod:`lineas_fast.ops.reference` (fp32 1e-5 relative to the magnitude; bf16/fp16 within 2x the error of
  PyTorch's own low-precision result), determinism, routing read on the device (CUDA graph replay after
  an in-place routing change), input validation and ``torch.library.opcheck``.
"""

import os
import shutil
import subprocess
import sysconfig
from pathlib import Path

import pytest
import torch

from lineas_fast.ops import reference as ref

ROOT = Path(__file__).resolve().parents[1]
CUDA_DIR = ROOT / "csrc" / "cuda"
NVCC = shutil.which("nvcc")
VARIANTS = {"layernorm": (0, 0.0), "rmsnorm": (1, 0.0), "gemma": (1, 1.0)}  # name -> (kind, weight_offset)


# ------------------------------------------------------------------ no GPU needed
@pytest.mark.skipif(NVCC is None, reason="nvcc not on PATH")
def test_norm_affine_cu_compiles_without_warnings(tmp_path):
    arch = ["-gencode", "arch=compute_80,code=sm_80", "-gencode", "arch=compute_90,code=sm_90"]
    strict = ["-Werror", "all-warnings", "-Xcompiler", "-Wall,-Wextra,-Werror", "-Xptxas", "-warn-spills",
              "-Xptxas", "-Werror"]
    obj = tmp_path / "norm_affine.o"
    cmd = [NVCC, "-c", "-O3", "-std=c++20", *arch, *strict, str(CUDA_DIR / "norm_affine.cu"), "-o", str(obj)]
    r = subprocess.run(cmd, capture_output=True, text=True, check=False, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0 and not r.stderr.strip(), f"{' '.join(cmd)}\n{r.stdout}\n{r.stderr}"
    assert obj.stat().st_size > 0


def test_binding_syntax_against_torch_headers():
    """binding.cpp cannot be built without a CUDA torch, but its includes and ATen/c10 API use can be
    checked: g++ -fsyntax-only with torch's headers (c10/cuda ships even in CPU wheels) and CUDA's."""
    from torch.utils.cpp_extension import include_paths

    gxx = shutil.which("g++")
    torch_inc = Path(include_paths()[0])
    py_inc = Path(sysconfig.get_paths()["include"])
    homes = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    if NVCC:
        homes.append(str(Path(NVCC).resolve().parent.parent))
    cuda_inc = next((Path(h) / "include" for h in homes if h and (Path(h) / "include" / "cuda_runtime_api.h").exists()),
                    None)
    if gxx is None or cuda_inc is None:
        pytest.skip("needs g++ and the CUDA toolkit's headers (cuda_runtime_api.h)")
    if not (torch_inc / "c10" / "cuda" / "CUDAStream.h").exists() or not (py_inc / "Python.h").exists():
        pytest.skip("torch's c10/cuda headers or Python.h are missing")
    defs = ["-DTORCH_EXTENSION_NAME=_C_cuda", "-DTORCH_API_INCLUDE_EXTENSION_H"]
    if not (torch_inc / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h").exists():  # generated in CUDA builds only
        defs.append("-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE")
    incs = [a for p in [*include_paths(), str(cuda_inc), str(py_inc)] for a in ("-isystem", p)]
    cmd = [gxx, "-fsyntax-only", "-std=c++20", "-Wall", "-Wextra", "-Werror", *defs, *incs,
           str(CUDA_DIR / "binding.cpp")]
    r = subprocess.run(cmd, capture_output=True, text=True, check=False)
    assert r.returncode == 0, f"{' '.join(cmd)}\n{r.stdout}\n{r.stderr}"


# ------------------------------------------------------------------ GPU
def _cuda_ext_reason():
    if not torch.cuda.is_available():
        return "no CUDA device"
    from lineas_fast import ops

    return ops.CUDA_KERNELS_MISSING


_WHY = _cuda_ext_reason()


def gpu_test(fn):
    """Mark a test as needing a GPU and the built extension (skipped with the reason otherwise)."""
    fn = pytest.mark.skipif(_WHY is not None, reason=f"CUDA extension unavailable: {_WHY}")(fn)
    return pytest.mark.gpu(fn)

def make_case(shape, variant="layernorm", dtype=torch.float32, weight=True, bias=True, n_tables=3, ids=None,
              R=None, seed=0, param_dtype=torch.float32):
    """(x, args) on the GPU, args in the op's order after x. Default routing: one entry per batch item
    (R = B) cycling through ids 0, -1, 1, 2, ... plus a spare entry past R that must never be read."""
    g = torch.Generator().manual_seed(seed)
    kind, offset = VARIANTS[variant]
    d = shape[-1]
    B = shape[0] if len(shape) > 1 else 1
    x = (1.5 * torch.randn(shape, generator=g) + 0.3).to(dtype)
    w = (0.5 + torch.rand(d, generator=g)).to(param_dtype) if weight else None
    b = (0.2 * torch.randn(d, generator=g)).to(param_dtype) if bias else None
    sign = torch.sign(torch.randn(n_tables, d, generator=g))
    scale = 1 + (0.2 + 0.3 * torch.rand(n_tables, d, generator=g)) * sign
    shift = 0.1 + 0.3 * torch.rand(n_tables, d, generator=g)
    if ids is None:
        cycle = [0, -1] + list(range(1, n_tables))
        ids, R = [cycle[i % len(cycle)] for i in range(B)], B
    ids = torch.tensor(list(ids) + [n_tables - 1])
    strength = torch.linspace(0.4, 1.3, len(ids))
    nrows = torch.tensor([R])
    args = [w, b, 1e-5, kind, offset, scale, shift, ids, strength, nrows]
    return x.cuda(), [a.cuda() if isinstance(a, torch.Tensor) else a for a in args]


def assert_close(got, want, tol=1e-5, what=""):
    """max |got - want| <= tol * max(1, max |want|)."""
    assert got.shape == want.shape and got.dtype == want.dtype, f"{what}: {got.dtype} {tuple(got.shape)}"
    if want.numel() == 0:
        return
    err = (got.float() - want.float()).abs().max()
    bound = tol * max(1.0, float(want.float().abs().max()))
    assert float(err) <= bound, f"{what}: max err {float(err):.3g} > {bound:.3g}"


def check(x, args, go=None, ref_args=None):
    """Forward and backward vs the reference (ref_args: what the reference runs on, default args)."""
    ref_args = args if ref_args is None else ref_args
    go = torch.randn(x.shape, device="cuda").to(x.dtype) if go is None else go
    out = torch.ops.lineas.norm_affine(x, *args)
    grads = torch.ops.lineas.norm_affine_backward(go, x, *args)
    assert out.is_contiguous() and grads[0].is_contiguous()
    rx, rs, rb = ref.norm_affine_backward(go, x, *ref_args)
    if x.dtype == torch.float32:
        assert_close(out, ref.norm_affine(x, *ref_args), what="out")
        assert_close(grads[0], rx, what="grad_x")
    else:  # <= 2x eager low-precision error; grad_x: fp32 math rounded once (<= 1 ulp)
        want = ref.norm_affine(x.float(), *ref_args)
        err = float((out.float() - want).abs().max())
        eager = float((ref.norm_affine(x, *ref_args, upcast=False).float() - want).abs().max())
        assert out.dtype == x.dtype and err <= 2 * eager + 1e-6, f"error {err:.3g} > 2x eager {eager:.3g}"
        ulp = torch.finfo(x.dtype).eps
        assert grads[0].dtype == x.dtype
        assert bool(((grads[0].float() - rx.float()).abs() <= ulp * rx.float().abs() + 1e-6).all()), "grad_x"
    assert_close(grads[1], rs, what="grad_scale")
    assert_close(grads[2], rb, what="grad_shift")
    return out, grads


SHAPES = [(1, 1, 1023), (3, 7, 1500), (1024, 576), (4096, 2048), (1023,), (4, 33), (2, 3, 5, 64)]


@gpu_test
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_matches_reference(shape, variant, dtype):
    check(*make_case(shape, variant, dtype))


@gpu_test
@pytest.mark.parametrize("shape", [(2, 2048, 4096), (1, 4096, 12288), (1, 512, 20000), (1, 1024, 32768)], ids=str)
def test_many_rows_and_wide_rows(shape):
    """Blocks of several rows: shared-memory caches (above 48 KiB: opted in), and rows too wide for them
    (backward d = 20000 and 32768, forward d = 32768: per-element coefficients, sums in the workspace)."""
    check(*make_case(shape, "layernorm", torch.bfloat16))
    check(*make_case(shape[:-1] + (shape[-1] // 2,), "rmsnorm"))


@gpu_test
@pytest.mark.parametrize("R", [1, 2, 3, 6])
def test_routing(R):
    """B = 6 items over R live entries (R < B: several items per entry, -1 rows unsteered)."""
    ids = [2, -1, 0, 1, -1, 2, 0, 1][:R] + [1, 0, 1, 0][: 7 - R]
    check(*make_case((6, 5, 40), "rmsnorm", ids=ids, R=R))
    check(*make_case((6, 50, 1024), "layernorm", torch.bfloat16, ids=ids, R=R))


@gpu_test
@pytest.mark.parametrize("variant", ["layernorm", "gemma"])
@pytest.mark.parametrize("weight,bias", [(False, False), (True, False), (False, True)])
def test_optional_weight_bias(weight, bias, variant):
    check(*make_case((2, 3, 48), variant, weight=weight, bias=bias))
    check(*make_case((2, 9, 512), variant, torch.float16, weight=weight, bias=bias))


@gpu_test
@pytest.mark.parametrize("param_dtype", [torch.bfloat16, torch.float16, torch.float64], ids=str)
def test_weight_dtypes(param_dtype):
    """weight/bias in the model's dtype are read as they are (float64 is converted)."""
    check(*make_case((3, 4, 256), "layernorm", torch.bfloat16, param_dtype=param_dtype))


@gpu_test
def test_non_contiguous_and_misaligned():
    """Strided x / grad_out / weight / shift, and x at an offset that rules out 16-byte vectors."""
    x, args = make_case((3, 6, 40), "layernorm")
    xs = torch.empty(40, 6, 3, device="cuda").permute(2, 1, 0).copy_(x)
    go = torch.empty(40, 6, 3, device="cuda").permute(2, 1, 0).copy_(torch.randn(3, 6, 40))
    args[0] = torch.empty(80, device="cuda")[::2].copy_(args[0])
    args[6] = torch.empty(40, 3, device="cuda").t().copy_(args[6])
    assert not (xs.is_contiguous() or go.is_contiguous() or args[0].is_contiguous() or args[6].is_contiguous())
    check(xs, args, go=go)
    x, args = make_case((3, 5, 64), "rmsnorm", torch.bfloat16)
    shifted = torch.empty(x.numel() + 1, dtype=x.dtype, device="cuda")[1:].view(x.shape).copy_(x)
    assert shifted.data_ptr() % 16 != 0
    check(shifted, args)


@gpu_test
def test_off_table_ids_and_empty_table():
    """ids outside 0..K-1 act as -1 (never read off the table); K = 0 gives the plain norm."""
    x, args = make_case((3, 6, 40), "layernorm", ids=[5, -7, 1], R=3)
    ref_args = list(args)
    ref_args[7] = torch.tensor([-1, -1, 1, 2], device="cuda")
    check(x, args, ref_args=ref_args)
    empty = list(args)
    empty[5], empty[6], empty[7] = args[5][:0], args[6][:0], torch.full_like(args[7], -1)
    ref_args[7] = empty[7]
    go = torch.randn_like(x)
    assert_close(torch.ops.lineas.norm_affine(x, *empty), ref.norm_affine(x, *ref_args), what="out")
    gx, gs, gb = torch.ops.lineas.norm_affine_backward(go, x, *empty)
    assert gs.shape == gb.shape == (0, 40)
    assert_close(gx, ref.norm_affine_backward(go, x, *ref_args)[0], what="grad_x")


@gpu_test
def test_empty_and_mixed_grad_dtype():
    x, args = make_case((0, 5, 16), "layernorm", ids=[0], R=1)
    assert torch.ops.lineas.norm_affine(x, *args).shape == (0, 5, 16)
    gx, gs, gb = torch.ops.lineas.norm_affine_backward(x, x, *args)
    assert gx.shape == x.shape and gs.shape == (3, 16) and not gs.any() and not gb.any()
    x, args = make_case((2, 3, 64), "rmsnorm", torch.bfloat16)
    go = torch.randn(2, 3, 64, device="cuda")  # fp32 grad for a bf16 x
    gx, gs, gb = torch.ops.lineas.norm_affine_backward(go, x, *args)
    rx, rs, rb = ref.norm_affine_backward(go, x, *args)
    assert gx.dtype == torch.bfloat16
    assert_close(gx.float(), rx.float(), tol=1e-2, what="grad_x")
    assert_close(gs, rs, what="grad_scale")
    assert_close(gb, rb, what="grad_shift")


@gpu_test
def test_deterministic_and_graph_safe():
    """Bitwise-repeatable backward (no atomics); routing (nrows, ids, strength) changed in place is picked up
    by a replayed CUDA graph, so the kernels never read it on the host."""
    x, args = make_case((8, 64, 1024), "layernorm", torch.bfloat16)
    go = torch.randn(x.shape, device="cuda").to(x.dtype)
    g1 = torch.ops.lineas.norm_affine_backward(go, x, *args)
    g2 = torch.ops.lineas.norm_affine_backward(go, x, *args)
    assert all(torch.equal(a, b) for a, b in zip(g1, g2))
    torch.ops.lineas.norm_affine(x, *args)  # warm-up outside capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = torch.ops.lineas.norm_affine(x, *args)
    args[7].copy_(torch.tensor([1, 0, -1, 2, 0, 1, 2, -1, 0], device="cuda"))
    args[8].mul_(0.5)
    args[9].fill_(3)
    graph.replay()
    want = ref.norm_affine(x.float(), *args)
    eager = float((ref.norm_affine(x, *args, upcast=False).float() - want).abs().max())
    assert float((out.float() - want).abs().max()) <= 2 * eager + 1e-6


@gpu_test
def test_invalid_inputs():
    x, args = make_case((2, 3, 8), "layernorm")
    bad = [  # (message, x, argument index, replacement)
        ("x must be float32", x.double(), None, None),
        ("weight must be", x, 0, torch.ones(7, device="cuda")),
        ("kind=2", x, 3, 2),
        ("scale/shift must both have shape", x, 5, torch.ones(3, 9, device="cuda")),
        ("ids must be", x, 7, torch.zeros(3, device="cuda")),
        ("strength must be", x, 8, torch.ones(2, device="cuda")),
        ("nrows must be", x, 9, torch.tensor([1, 2], device="cuda")),
        ("ids is on cpu", x, 7, args[7].cpu()),
    ]
    for msg, xx, i, v in bad:
        aa = list(args)
        if i is not None:
            aa[i] = v
        with pytest.raises(RuntimeError, match=msg):
            torch.ops.lineas.norm_affine(xx, *aa)
    with pytest.raises(RuntimeError, match="grad_out must have"):
        torch.ops.lineas.norm_affine_backward(x[:1], x, *args)


@gpu_test
def test_dispatches_to_the_cuda_extension():
    """The CUDA key holds the extension's kernel (registered before Triton could take it)."""
    import lineas_fast._C_cuda  # noqa: F401

    for op in ("norm_affine", "norm_affine_backward"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"lineas::{op}", "CUDA")
        dump = torch._C._dispatch_dump(f"lineas::{op}")
        cuda_line = next(line for line in dump.splitlines() if line.startswith("CUDA:"))
        assert "binding.cpp" in cuda_line, cuda_line  # the extension's kernel, not the Triton launcher


@gpu_test
def test_opcheck():
    for variant in VARIANTS:
        x, args = make_case((2, 3, 64), variant)
        xg, scale, shift = (t.clone().requires_grad_() for t in (x, args[5], args[6]))
        torch.library.opcheck(torch.ops.lineas.norm_affine.default, (xg, *args[:5], scale, shift, *args[7:]))
        torch.library.opcheck(torch.ops.lineas.norm_affine_backward.default,
                              (torch.randn(2, 3, 64, device="cuda"), x, *args))
    x, args = make_case((5, 64), "layernorm", torch.bfloat16, ids=[0], R=1)
    torch.library.opcheck(torch.ops.lineas.norm_affine.default, (x, *args))
    torch.library.opcheck(torch.ops.lineas.norm_affine_backward.default,
                          (torch.randn(5, 64, device="cuda").bfloat16(), x, *args))
