"""Triton ``norm_affine`` kernels (forward and backward) against the pure-torch oracle
:mod:`lineas_fast.ops.reference`. On machines without a GPU they run under ``TRITON_INTERPRET=1``
(set by conftest before triton is imported), so shapes stay small; ``[1024, 576]`` is marked slow.

Tolerances (SPEC §6): fp32 1e-5 (relative to the magnitude for wide rows and long sums); bf16/fp16 at
most 2× the error of PyTorch's own low-precision result (``reference.norm_affine(upcast=False)``) vs the
fp32 reference.
"""

import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed: the Triton kernels cannot be tested")

from lineas_fast.kernels import norm_affine as K

from lineas_fast.ops import reference as ref

pytestmark = pytest.mark.usefixtures("one_thread")
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
DEV = "cuda" if torch.cuda.is_available() and not INTERPRET else "cpu"  # GPU run: TRITON_INTERPRET=0
VARIANTS = {"layernorm": (0, 0.0), "rmsnorm": (1, 0.0), "gemma": (1, 1.0)}  # name -> (kind, weight_offset)


def make_case(shape, variant="layernorm", dtype=torch.float32, weight=True, bias=True, n_tables=3, ids=None,
              R=None, table="random", seed=0):
    """(x, args) with ``args`` in the op's order after x. Default routing: one live entry per batch item
    (R = B) cycling through ids 0, −1, 1, 2, ... plus a spare entry past R that must never be read."""
    g = torch.Generator().manual_seed(seed)
    kind, offset = VARIANTS[variant]
    d = shape[-1]
    B = shape[0] if len(shape) > 1 else 1
    x = (1.5 * torch.randn(shape, generator=g) + 0.3).to(dtype)
    w = (0.5 + torch.rand(d, generator=g)) if weight else None
    b = 0.2 * torch.randn(d, generator=g) if bias else None
    if table == "identity":  # k = 0: no entry off identity
        scale, shift = torch.ones(n_tables, d), torch.zeros(n_tables, d)
    else:  # k = d: every entry off identity
        sign = torch.sign(torch.randn(n_tables, d, generator=g))
        scale = 1 + (0.2 + 0.3 * torch.rand(n_tables, d, generator=g)) * sign
        shift = 0.1 + 0.3 * torch.rand(n_tables, d, generator=g)
    if ids is None:
        cycle = [0, -1] + list(range(1, n_tables))
        ids = [cycle[i % len(cycle)] if n_tables else -1 for i in range(B)]
        R = B
    ids = torch.tensor(list(ids) + [n_tables - 1 if n_tables else -1])  # spare entry past R
    strength = torch.linspace(0.4, 1.3, len(ids))
    nrows = torch.tensor([R if R is not None else len(ids) - 1])
    args = [w, b, 1e-5, kind, offset, scale, shift, ids, strength, nrows]
    return x.to(DEV), [a.to(DEV) if isinstance(a, torch.Tensor) else a for a in args]


def assert_close(got, want, tol=1e-5, what=""):
    """max |got − want| ≤ tol·max(1, max |want|); on failure, name the worst element."""
    err = (got.float() - want.float()).abs()
    bound = tol * max(1.0, float(want.float().abs().max()) if want.numel() else 1.0)
    if err.numel() and float(err.max()) > bound:
        i = tuple(int(j) for j in torch.unravel_index(err.argmax(), err.shape))
        raise AssertionError(f"{what}: max err {float(err.max()):.3g} > {bound:.3g} at {i}: "
                             f"got {float(got[i]):.6g}, want {float(want[i]):.6g}")


def check_fp32(x, args, go=None):
    assert_close(K.norm_affine_fwd(x, *args), ref.norm_affine(x, *args), what="out")
    go = torch.randn_like(x) if go is None else go
    got, want = K.norm_affine_bwd(go, x, *args), ref.norm_affine_backward(go, x, *args)
    for name, a, b in zip(("grad_x", "grad_scale", "grad_shift"), got, want):
        assert a.dtype == b.dtype and a.shape == b.shape, name
        assert_close(a, b, what=name)


SHAPES = [(4, 33), (1023,), (1, 1, 1023), (3, 7, 1500), (2, 3, 5, 64), (3, 1)]


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_fp32_matches_reference(shape, variant):
    check_fp32(*make_case(shape, variant))


@pytest.mark.parametrize("R", [1, 2, 3, 6])
def test_routing(R):
    """B = 6 items over R live entries (R = 1 broadcasts, R = B one each, B = k·R repeats each k times);
    entries past R (capacity 8) are garbage that must be ignored."""
    ids = [2, -1, 0, 1, -1, 2, 0, 1][:R] + [1, 0, 1, 0][: 7 - R]
    check_fp32(*make_case((6, 5, 40), "rmsnorm", ids=ids, R=R))


@pytest.mark.parametrize("variant", ["layernorm", "gemma"])
@pytest.mark.parametrize("weight,bias", [(False, False), (True, False), (False, True)])
def test_optional_weight_bias(weight, bias, variant):
    check_fp32(*make_case((2, 3, 48), variant, weight=weight, bias=bias))


def test_identity_table_and_empty_table():
    """k = 0: an identity table, or no table at all (K = 0, every id −1), gives the plain norm."""
    x, args = make_case((3, 4, 100), "layernorm", table="identity")
    plain = torch.nn.functional.layer_norm(x, (100,), args[0], args[1], eps=1e-5)
    assert_close(K.norm_affine_fwd(x, *args), plain, what="identity table")
    check_fp32(x, args)
    empty = list(args)
    empty[5], empty[6], empty[7] = args[5][:0], args[6][:0], torch.full_like(args[7], -1)
    assert_close(K.norm_affine_fwd(x, *empty), plain, what="empty table")
    go = torch.randn_like(x)
    gx, gs, gb = K.norm_affine_bwd(go, x, *empty)
    assert gs.shape == gb.shape == (0, 100)
    unsteered = list(args)  # the reference needs K >= 1: the same rows, all routed to -1
    unsteered[7] = empty[7]
    assert_close(gx, ref.norm_affine_backward(go, x, *unsteered)[0], what="grad_x (empty table)")


def test_all_entries_steered():
    """k = d: every scale ≠ 1 and every shift ≠ 0, all rows routed."""
    x, args = make_case((4, 3, 77), "rmsnorm", ids=[0, 1, 2, 0], R=4)
    assert bool((args[5] != 1).all() and (args[6] != 0).all())
    check_fp32(x, args)


def test_non_contiguous():
    """Strided x, grad_out, weight and shift (the launcher makes them contiguous)."""
    x, args = make_case((3, 6, 40), "layernorm")

    def strided(t):  # same values, non-contiguous layout
        out = torch.empty(t.shape[::-1], device=DEV).permute(*reversed(range(t.dim())))
        return out.copy_(t)

    x, go = strided(x), strided(torch.randn(3, 6, 40, device=DEV))
    args[0], args[6] = torch.empty(80, device=DEV)[::2].copy_(args[0]), strided(args[6])
    assert not (x.is_contiguous() or go.is_contiguous() or args[0].is_contiguous() or args[6].is_contiguous())
    check_fp32(x, args, go=go)


def test_wide_rows():
    check_fp32(*make_case((2, 2, 4096), "rmsnorm"))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("shape", [(4, 33), (1, 1, 1023), (3, 7, 1500)], ids=str)
def test_low_precision(shape, variant, dtype):
    """Forward: ≤ 2× eager low-precision error vs fp32. Backward: the same fp32 math, then one rounding
    of grad_x to x's dtype (≤ 1 ulp apart); table gradients are fp32 (1e-5)."""
    x, args = make_case(shape, variant, dtype=dtype)
    want = ref.norm_affine(x.float(), *args).float()
    got = K.norm_affine_fwd(x, *args)
    assert got.dtype == dtype and got.shape == x.shape
    err = float((got.float() - want).abs().max())
    eager = float((ref.norm_affine(x, *args, upcast=False).float() - want).abs().max())
    assert err <= 2 * eager + 1e-6, f"kernel error {err:.3g} > 2x eager {eager:.3g}"
    go = torch.randn(x.shape, device=DEV).to(dtype)
    gx, gs, gb = K.norm_affine_bwd(go, x, *args)
    rx, rs, rb = ref.norm_affine_backward(go, x, *args)
    ulp = torch.finfo(dtype).eps
    assert gx.dtype == dtype and bool(((gx.float() - rx.float()).abs() <= ulp * rx.float().abs() + 1e-6).all())
    assert_close(gs, rs, what="grad_scale")
    assert_close(gb, rb, what="grad_shift")


def test_empty_batch():
    x, args = make_case((0, 5, 16), "layernorm", ids=[0], R=1)
    assert K.norm_affine_fwd(x, *args).shape == (0, 5, 16)
    gx, gs, gb = K.norm_affine_bwd(x, x, *args)
    assert gx.shape == x.shape and not gs.any() and not gb.any()


def test_invalid_inputs():
    x, args = make_case((2, 3, 8), "layernorm")
    bad = [  # (message, x, argument index, replacement)
        ("x must be a float32", x.double(), None, None),
        ("exceeds", torch.zeros(1, K.MAX_D + 1), None, None),
        ("weight must be", x, 0, torch.ones(7)),
        ("kind=2", x, 3, 2),
        ("scale must be", x, 5, torch.ones(3, 9)),
        ("ids must be", x, 7, torch.zeros(3)),
        ("strength must be", x, 8, torch.ones(2)),
        ("nrows must be", x, 9, torch.tensor([1, 2])),
    ]
    for msg, xx, i, v in bad:
        aa = list(args)
        if i is not None:
            aa[i] = v
        with pytest.raises(ValueError, match=msg):
            K.norm_affine_fwd(xx, *aa)
    with pytest.raises(ValueError, match="grad_out"):
        K.norm_affine_bwd(x[:1], x, *args)


def test_package_import_without_triton():
    """``lineas_fast.kernels`` imports without triton; ``available()`` says why, launchers raise ImportError."""
    code = ("import sys; sys.modules['triton'] = None\n"
            "import lineas_fast.kernels as k\n"
            "ok, why = k.available(); assert not ok and 'triton' in why, why\n"
            "try:\n    k.norm_affine_fwd\nexcept ImportError as e:\n    assert 'triton' in str(e)\n"
            "else:\n    raise SystemExit('no ImportError')\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
    import lineas_fast.kernels as pkg

    assert pkg.norm_affine_fwd is K.norm_affine_fwd and pkg.available()[0]


@pytest.mark.gpu
@pytest.mark.skipif(DEV != "cuda", reason="needs a CUDA GPU and TRITON_INTERPRET=0 (compile cache)")
def test_routing_change_does_not_recompile():
    """R, ids and strength are read from tensors in-kernel: changing them in place compiles nothing new."""
    def compiled():
        return sum(len(v[0]) for v in K._norm_affine_fwd_kernel.device_caches.values())

    x, args = make_case((4, 8, 256), "rmsnorm")
    K.norm_affine_fwd(x, *args)
    n = compiled()
    args[7].copy_(torch.tensor([1, 0, -1, 2, 0], device=DEV))
    args[8].mul_(0.5)
    args[9].fill_(2)
    assert_close(K.norm_affine_fwd(x, *args), ref.norm_affine(x, *args), what="rerouted")
    assert compiled() == n


@pytest.mark.slow
@pytest.mark.parametrize("shape", [(1024, 576), (4, 256, 576)], ids=str)
def test_large(shape):
    check_fp32(*make_case(shape, "rmsnorm", ids=[0, -1, 1, 2], R=4))
