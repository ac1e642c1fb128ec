"""Build layer: the C++ CPU extension (lineas_fast._C) and the torch-free CUDA sources.

* `lineas::affine_rows` from the C++ extension is checked against the pure-torch formula
  y = x + s_b * (scale * x + shift - x). Skipped when the extension is not built, except under CI
  (CI=true), where a missing extension is a failure.
* Every csrc/cuda/*.cu file must compile with nvcc for sm_80 and sm_90 (skipped without nvcc), so
  the CUDA kernels never rot on machines without a GPU.
"""
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
LOW = [torch.bfloat16, torch.float16]


@pytest.fixture(scope="module")
def op():
    try:
        import lineas_fast._C  # noqa: F401  (loading it registers torch.ops.lineas.*)
    except ImportError as e:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"lineas_fast._C must be built under CI: {e}")
        pytest.skip(f"C++ extension not built ({e}); pip install --no-build-isolation -e .")
    return torch.ops.lineas.affine_rows


def reference(x, scale, shift, s):
    s = s.view(-1, *([1] * (x.dim() - 1))) if x.dim() > 1 else s
    return x + s * (scale * x + shift - x)


def make(shape, dtype=torch.float32, seed=0, contiguous=True):
    g = torch.Generator().manual_seed(seed)
    d, b = shape[-1], (shape[0] if len(shape) > 1 else 1)
    if contiguous:
        x = torch.randn(shape, generator=g)
    else:  # same shape, last dim strided (every other column of a wider tensor)
        x = torch.randn(*shape[:-1], 2 * d, generator=g)[..., ::2]
        assert not x.is_contiguous()
    scale = 1 + 0.5 * torch.randn(d, generator=g)
    shift = torch.randn(d, generator=g)
    s = torch.linspace(-0.5, 1.5, b) if b != 1 else torch.tensor([0.7])
    return x.to(dtype), scale, shift, s


# awkward sizes; (8, 64, 300) is big enough to take the OpenMP-parallel path
SHAPES = [(1, 1, 1023), (3, 7, 1500), (4, 33), (2, 3, 5, 64), (1023,), (8, 64, 300)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("contiguous", [True, False])
def test_affine_rows_fp32(op, shape, contiguous):
    x, scale, shift, s = make(shape, contiguous=contiguous)
    y = op(x, scale, shift, s)
    assert y.shape == x.shape and y.dtype == x.dtype and y.is_contiguous()
    torch.testing.assert_close(y, reference(x, scale, shift, s), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", LOW, ids=str)
@pytest.mark.parametrize("shape", SHAPES)
def test_affine_rows_low_precision(op, dtype, shape):
    x, scale, shift, s = make(shape, dtype=dtype, seed=1, contiguous=len(shape) != 3)
    y = op(x, scale, shift, s)
    assert y.dtype == dtype and y.shape == x.shape
    ref32 = reference(x.float(), scale, shift, s)
    torch_low = reference(x, scale.to(dtype), shift.to(dtype), s.to(dtype)).float()
    err, err_torch = (y.float() - ref32).abs().max(), (torch_low - ref32).abs().max()
    assert err <= 2 * err_torch + 1e-6, f"{dtype}: err {err} vs torch's own {err_torch}"
    # fp32 compute + one round-to-nearest-even: matches ref32 rounded by torch (allow 1 ulp on a
    # handful of elements for compilers that contract to FMA)
    same = (y == ref32.to(dtype)).float().mean()
    assert same >= 0.999, f"{dtype}: only {same:.4f} of elements round like torch"


@pytest.mark.parametrize("dtype", [torch.float32, *LOW], ids=str)
def test_affine_rows_edges(op, dtype):
    x, scale, shift, s = make((3, 4, 16), dtype=dtype)
    assert torch.equal(op(x, scale, shift, torch.zeros(3)), x)  # strength 0 is the identity
    y = op(x, scale, shift, torch.tensor([0.0, 1.0, 0.0]))
    assert torch.equal(y[0], x[0]) and torch.equal(y[2], x[2]) and not torch.equal(y[1], x[1])
    x[1, 2, 3], x[0, 0, 0] = float("nan"), float("inf")  # NaN/inf propagate like the formula
    y = op(x, scale, shift, s)
    assert torch.equal(y.isnan(), reference(x.float(), scale, shift, s).isnan())
    for shape in [(0, 16), (2, 0, 16), (2, 3, 0)]:  # empty tensors
        e, sc, sh, st = make(shape, dtype=dtype)
        assert op(e, sc, sh, st).shape == e.shape


@pytest.mark.parametrize("dtype", LOW, ids=str)
def test_affine_rows_all_bit_patterns(op, dtype):
    """Every 16-bit pattern (subnormals, inf, NaN, overflow to inf) converts and rounds like torch."""
    x = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(dtype).reshape(4, 128, 128)
    g = torch.Generator().manual_seed(2)
    scale, shift = 1 + 0.01 * torch.randn(128, generator=g), 1e-3 * torch.randn(128, generator=g)
    s = torch.tensor([0.0, 1.0, 0.5, -2.0])
    y, ref = op(x, scale, shift, s), reference(x.float(), scale, shift, s).to(dtype)
    assert torch.equal(y.isnan(), ref.isnan())
    ok = ~ref.isnan()
    assert torch.equal(y[ok].view(torch.int16), ref[ok].view(torch.int16))


def test_affine_rows_rejects_bad_input(op):
    x, scale, shift, s = make((2, 3, 8))
    with pytest.raises(RuntimeError, match="strength"):
        op(x, scale, shift, torch.ones(3))
    with pytest.raises(RuntimeError, match="scale/shift"):
        op(x, scale[:4], shift, s)
    with pytest.raises(RuntimeError, match="scale/shift"):
        op(x, scale.double(), shift, s)
    with pytest.raises(RuntimeError, match="float32, bfloat16 or float16"):
        op(x.double(), scale, shift, s)


def test_extension_helpers(op):
    import lineas_fast._C as C

    assert C.has_openmp() and C.max_threads() >= 1


def test_cuda_sources_compile_with_nvcc(tmp_path):
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc not on PATH")
    sources = sorted((ROOT / "csrc" / "cuda").glob("*.cu"))
    assert sources, "no csrc/cuda/*.cu sources"
    arch = ["-gencode", "arch=compute_80,code=sm_80", "-gencode", "arch=compute_90,code=sm_90"]
    for src in sources:
        obj = tmp_path / (src.stem + ".o")
        cmd = [nvcc, "-c", "-O3", "-std=c++20", *arch, str(src), "-o", str(obj)]  # as setup.py
        r = subprocess.run(cmd, capture_output=True, text=True)
        assert r.returncode == 0, f"{' '.join(cmd)}\n{r.stdout}\n{r.stderr}"
        assert obj.stat().st_size > 0
