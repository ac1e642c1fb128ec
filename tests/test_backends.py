"""The backend registry (:mod:`lineas_fast.backends`): what ``resolve``/``resolve_backend`` return or raise for
each (backend, device) pair, on this machine and in faked machines.

Fakes replace the registry's probes (``_probe_cpp``, ``_probe_triton``, ``_probe_cuda_ext``) and its record
of the dispatcher (``_dispatch_table``, built with the registry's own ``plan_cuda`` from what
csrc/cuda/binding.cpp registers), so "CUDA present + extension built", "extension missing", "triton
missing"... run on a CPU machine. Real checks: the record matches ``_dispatch_has_kernel_for_dispatch_key``,
and without ``lineas_fast._C`` the automatic choice on CPU is the torch reference.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import make_model, random_steering, snapshot, assert_state_equal

import lineas_fast as lf
import lineas_fast.backends as B
from lineas_fast import kernels, ops
from lineas_fast.ops import reference
from lineas_fast.patching.fused import resolve_backend

ROOT = Path(__file__).resolve().parents[1]
NAMES = tuple(ops.SCHEMAS)
CPU, GPU = torch.device("cpu"), torch.device("cuda", 0)
# what the CUDA extension registers for the CUDA key, read from its binding (not assumed)
_BINDING = (ROOT / "csrc" / "cuda" / "binding.cpp").read_text()
_CUDA_BLOCK = _BINDING[_BINDING.index("TORCH_LIBRARY_IMPL(lineas, CUDA"):]
EXT_OPS = {n for n in re.findall(r'm\.impl\("(\w+)"', _CUDA_BLOCK.split("}")[0]) if n in NAMES}


def test_binding_registers_norm_affine_only():
    """Pins what the fakes below model: update the registry docstring and these tests when it changes."""
    assert EXT_OPS == {"norm_affine", "norm_affine_backward"}


def fake(monkeypatch, gpu=True, cuda_ext=True, triton=True, cpp=True):
    """Fake machine: probes and the dispatcher record as ``install`` would leave them."""
    table = {(n, "CPU"): "cpp" for n in NAMES} if cpp else {}
    ext = EXT_OPS if gpu and cuda_ext else set()
    table.update({(n, "CUDA"): who for n, who in B.plan_cuda(ext, gpu and triton, NAMES).items()})
    monkeypatch.setattr(B, "_dispatch_table", lambda: dict(table))
    monkeypatch.setattr(B, "_probe_cpp", lambda: (cpp, "fake _C" if cpp else "C++ extension not built (fake)"))
    why_cuda = "fake _C_cuda" if cuda_ext else "CUDA extension not built (fake)"
    monkeypatch.setattr(B, "_probe_cuda_ext", lambda: (gpu and cuda_ext, why_cuda if gpu else "no CUDA device"))
    why_triton = ("triton 3.7.1 on a fake GPU" if gpu else "triton 3.7.1 is installed but no CUDA GPU is visible"
                  ) if triton else "triton is not importable (ImportError: fake)"
    monkeypatch.setattr(B, "_probe_triton", lambda: (triton and gpu, why_triton))
    return table


def names(backend, device):
    return {op: B.resolve(op, backend, device).backend for op in B.OPS}


# ------------------------------------------------------------------ this machine (no fakes)
def test_dispatch_record_matches_dispatcher():
    has = torch._C._dispatch_has_kernel_for_dispatch_key
    table = B._dispatch_table()
    for op in NAMES:
        for key in ("CPU", "CUDA"):
            assert ((op, key) in table) == has(f"lineas::{op}", key), (op, key, table)


def test_this_machine():
    cpp = B._dispatch_table().get(("norm_affine", "CPU"))
    assert names(None, "cpu") == {op: cpp or "torch" for op in B.OPS}
    assert resolve_backend(None, CPU) == (ops.norm_affine, ops.steered_linear)
    assert resolve_backend("torch", CPU) == (reference.norm_affine, reference.steered_linear)
    assert resolve_backend("triton", CPU) == (kernels.norm_affine_fwd, kernels.steered_linear_fwd)  # interpreter
    if not torch.cuda.is_available():
        with pytest.raises(lf.SteeringError, match="backend='cuda' is unusable here: no CUDA device"):
            resolve_backend("cuda", CPU)
    with pytest.raises(lf.SteeringError, match=r"backend='mps': expected None or one of \('torch'"):
        resolve_backend("mps", CPU)
    report = lf.env_report()
    assert set(report) == {"torch", "cpp", "triton", "cuda"}
    assert all(set(v) == {"usable", "why"} and isinstance(v["usable"], bool) and v["why"] for v in report.values())


def test_without_cpp_extension_the_reference_serves_cpu():
    code = ("import sys, torch\nsys.modules['lineas_fast._C'] = None\n"
            "import lineas_fast.backends as B\nfrom lineas_fast import ops\n"
            "d = B.decisions('cpu')\n"
            "assert d['None'] == {'norm_affine': 'torch', 'steered_linear': 'torch'}, d\n"
            "assert not torch._C._dispatch_has_kernel_for_dispatch_key('lineas::norm_affine', 'CPU')\n"
            "assert B.resolve('norm_affine', None, 'cpu').fn is ops.norm_affine\n"
            "assert not B.env_report()['cpp']['usable']\n"
            "assert B.decisions('cpu')['cpp']['norm_affine'].startswith(\"raises: backend='cpp' is unusable here\")\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]


# ------------------------------------------------------------------ faked machines
def test_plan_cuda():
    assert B.plan_cuda(EXT_OPS, True, NAMES) == {"norm_affine": "cuda", "norm_affine_backward": "cuda",
                                                 "steered_linear": "triton", "steered_linear_backward": "triton"}
    assert B.plan_cuda(EXT_OPS, False, NAMES) == {"norm_affine": "cuda", "norm_affine_backward": "cuda"}
    assert B.plan_cuda(set(), False, NAMES) == {}


def test_gpu_with_cuda_extension_and_triton(monkeypatch):
    fake(monkeypatch)
    assert names(None, GPU) == {"norm_affine": "cuda", "steered_linear": "triton"}
    assert names(None, "cuda") == names(None, GPU)
    assert resolve_backend(None, GPU) == (ops.norm_affine, ops.steered_linear)
    assert names(None, CPU) == {"norm_affine": "cpp", "steered_linear": "cpp"}
    # explicit cuda: the op (its CUDA kernel is the extension's) for norms; steered_linear is named as missing
    impl = B.resolve("norm_affine", "cuda", GPU)
    assert (impl.backend, impl.fn, impl.why) == ("cuda", ops.norm_affine, "fake _C_cuda")
    with pytest.raises(B.OpUnavailable, match=r"lineas_fast\._C_cuda\) has no steered_linear kernel"):
        B.resolve("steered_linear", "cuda", GPU)
    norm, lin = resolve_backend("cuda", GPU)
    assert norm is ops.norm_affine and isinstance(lin, B.Unavailable) and lin.op == "steered_linear"
    with pytest.raises(lf.SteeringError, match="has no steered_linear kernel"):
        lin(torch.ones(1))
    with pytest.raises(lf.SteeringError, match="backend='cuda' runs on CUDA tensors, the model is on cpu"):
        resolve_backend("cuda", CPU)
    assert resolve_backend("triton", GPU) == (kernels.norm_affine_fwd, kernels.steered_linear_fwd)
    assert resolve_backend("torch", GPU) == (reference.norm_affine, reference.steered_linear)
    with pytest.raises(lf.SteeringError, match="backend='cpp' runs on CPU tensors, the model is on cuda:0"):
        resolve_backend("cpp", GPU)
    assert lf.env_report()["cuda"] == {"usable": True, "why": "fake _C_cuda"}


def test_gpu_without_cuda_extension(monkeypatch):
    fake(monkeypatch, cuda_ext=False)
    assert names(None, GPU) == {"norm_affine": "triton", "steered_linear": "triton"}
    with pytest.raises(lf.SteeringError, match="backend='cuda' is unusable here: CUDA extension not built"):
        resolve_backend("cuda", GPU)
    assert resolve_backend("triton", GPU) == (kernels.norm_affine_fwd, kernels.steered_linear_fwd)


def test_gpu_without_triton(monkeypatch):
    fake(monkeypatch, triton=False)
    assert names(None, GPU) == {"norm_affine": "cuda", "steered_linear": "torch"}
    assert resolve_backend(None, GPU) == (ops.norm_affine, ops.steered_linear)
    with pytest.raises(lf.SteeringError, match="backend='triton' is unusable here: triton is not importable"):
        resolve_backend("triton", GPU)
    assert resolve_backend("cuda", GPU)[0] is ops.norm_affine


def test_gpu_with_neither(monkeypatch):
    fake(monkeypatch, cuda_ext=False, triton=False)
    assert names(None, GPU) == {"norm_affine": "torch", "steered_linear": "torch"}
    assert "CompositeExplicitAutograd" in B.resolve("norm_affine", None, GPU).why


def test_cpu_only_without_extension(monkeypatch):
    fake(monkeypatch, gpu=False, cpp=False)
    assert names(None, CPU) == {"norm_affine": "torch", "steered_linear": "torch"}
    assert names(None, GPU) == {"norm_affine": "torch", "steered_linear": "torch"}
    with pytest.raises(lf.SteeringError, match="backend='cpp' is unusable here: C.. extension not built"):
        resolve_backend("cpp", CPU)
    with pytest.raises(lf.SteeringError, match="backend='cuda' is unusable here: no CUDA device"):
        resolve_backend("cuda", GPU)
    with pytest.raises(lf.SteeringError, match="backend='triton' is unusable here: .*no CUDA GPU"):
        resolve_backend("triton", CPU)


def test_other_devices_get_the_reference(monkeypatch):
    fake(monkeypatch)
    meta = torch.device("meta")
    assert names(None, meta) == {"norm_affine": "torch", "steered_linear": "torch"}
    with pytest.raises(lf.SteeringError, match="backend='triton' runs on CUDA tensors, the model is on meta"):
        resolve_backend("triton", meta)
    with pytest.raises(lf.SteeringError, match="backend='cuda' runs on CUDA tensors, the model is on meta"):
        resolve_backend("cuda", meta)


def test_missing_op_refused_at_patch_time_untouched(monkeypatch):
    """An explicit backend lacking one op (here a fake ``cpp`` without steered_linear, as ``cuda`` is today)
    patches norm sites, and refuses a Linear site before touching the model."""
    table = fake(monkeypatch, gpu=False)
    del table[("steered_linear", "CPU")]
    monkeypatch.setattr(B, "_dispatch_table", lambda: dict(table))
    norm, lin = resolve_backend("cpp", CPU)
    assert norm is ops.norm_affine and isinstance(lin, B.Unavailable)
    model = make_model("llama")
    with lf.steered(model, random_steering(model, "norms"), mode="fused", backend="cpp"):
        pass
    st = random_steering(model, "mlp_hidden")
    snap = snapshot(model)
    with pytest.raises(lf.SteeringError, match="site .*mlp.*backend='cpp': lineas_fast._C has no CPU kernel for "
                                               "steered_linear"):
        lf.steer_(model, st, mode="fused", backend="cpp")
    assert_state_equal(model, snap)
    assert not any(type(m).__name__.startswith("Fused") for m in model.modules())
