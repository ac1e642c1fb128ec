"""Build layer: the C++ CPU extension (lineas_fast._C) and the torch-free CUDA sources.

* `lineas::norm_affine` from the C++ extension (csrc/norm_affine.cpp) is checked against the pure-torch
  reference (`lineas_fast.ops.reference.norm_affine`): fp32, bf16 and fp16 inputs, contiguous and strided,
  a few shapes. Skipped when the extension is not built, except under CI (CI=true), where a missing
  extension is a failure. (tests/test_ops_cpu.py is the thorough test of the op; this is the build check.)
* Every csrc/cuda/*.cu file must compile with nvcc for sm_80 and sm_90 (skipped without nvcc), so
  the CUDA kernels never rot on machines without a GPU.
"""
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import assert_fp32_close, assert_low_precision

from lineas_fast.ops import reference as ref  # importing lineas_fast.ops defines the lineas::* schemas

ROOT = Path(__file__).resolve().parents[1]
LOW = [torch.bfloat16, torch.float16]


@pytest.fixture(scope="module")
def op():
    try:
        import lineas_fast._C  # noqa: F401  (loading it registers the CPU kernels of torch.ops.lineas.*)
    except ImportError as e:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"lineas_fast._C must be built under CI: {e}")
        pytest.skip(f"C++ extension not built ({e}); pip install --no-build-isolation -e .")
    cpu = [ln for ln in torch._C._dispatch_dump("lineas::norm_affine").splitlines() if ln.startswith("CPU:")]
    assert cpu and "norm_affine.cpp" in cpu[0], f"the CPU kernel is not the C++ one: {cpu}"
    return torch.ops.lineas.norm_affine


def make(shape, dtype=torch.float32, kind=ref.RMSNORM, contiguous=True, seed=0):
    """norm_affine args: x (in ``dtype``), weight/bias (in ``dtype``), a K=3 table and one routing entry per
    batch row (ids 0, 1, 2, -1 (unsteered), 0, ...; strengths in [-0.5, 1.5])."""
    g = torch.Generator().manual_seed(seed)
    d, b = shape[-1], (shape[0] if len(shape) > 1 else 1)
    if contiguous:
        x = 3 * torch.randn(shape, generator=g) + 0.5
    else:  # same shape, last dim strided (every other column of a wider tensor)
        x = (3 * torch.randn(*shape[:-1], 2 * d, generator=g) + 0.5)[..., ::2]
        assert not x.is_contiguous()
    weight, bias = 1 + 0.1 * torch.randn(d, generator=g), 0.2 * torch.randn(d, generator=g)
    K = 3
    scale, shift = 1 + 0.5 * torch.randn(K, d, generator=g), torch.randn(K, d, generator=g)
    ids = (torch.arange(b) + 1) % (K + 1) - 1
    strength = torch.linspace(-0.5, 1.5, b) if b != 1 else torch.tensor([0.7])
    return (x.to(dtype), weight.to(dtype), bias.to(dtype), 1e-5, kind, 0.0, scale, shift, ids, strength,
            torch.tensor([b]))


def up(args):
    """The same case with x / weight / bias upcast to fp32 (the fp32 reference's inputs)."""
    return tuple(a.float() if i in (0, 1, 2) else a for i, a in enumerate(args))


# awkward sizes; (8, 64, 300) is big enough to take the OpenMP-parallel path
SHAPES = [(1, 1, 1023), (3, 7, 1500), (4, 33), (1023,), (8, 64, 300)]
KINDS = {"layernorm": ref.LAYERNORM, "rmsnorm": ref.RMSNORM}


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("contiguous", [True, False])
def test_norm_affine_fp32(op, shape, kind, contiguous):
    args = make(shape, kind=KINDS[kind], contiguous=contiguous)
    y = op(*args)
    assert y.shape == args[0].shape and y.dtype == torch.float32 and y.is_contiguous()
    assert_fp32_close(y, ref.norm_affine(*args), f"norm_affine {kind} {shape}")


@pytest.mark.parametrize("dtype", LOW, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_norm_affine_low_precision(op, dtype, shape):
    args = make(shape, dtype, kind=ref.LAYERNORM, contiguous=len(shape) != 3, seed=1)
    y = op(*args)
    assert y.shape == args[0].shape and y.dtype == dtype and y.is_contiguous()
    assert_low_precision(y, ref.norm_affine(*up(args)), ref.norm_affine(*args, upcast=False),
                         f"norm_affine {dtype} {shape}")


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
