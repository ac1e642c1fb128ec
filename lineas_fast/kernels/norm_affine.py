"""Triton kernels for ``lineas::norm_affine`` (LayerNorm / RMSNorm / Gemma RMSNorm + per-row steering),
forward and backward, with their host launchers. Semantics: :mod:`lineas_fast.ops.reference`.

Layout: x is viewed as ``[B, N, d]`` (B = first dim, 1 for a 1-D x). A program owns one batch item b and
a tile of ``BLOCK_M`` of its N rows × ``BLOCK_D`` (next power of two ≥ d) columns, so the steering
coefficients ``a = 1 + s·(scale[id] − 1)``, ``c = s·shift[id]`` are loaded once per program and broadcast
over the tile. The routing entry ``r = (b·R) // B`` is computed in-kernel from the ``nrows`` *tensor*:
changing strength or routing changes no argument the kernel is specialised on, so nothing recompiles.

Backward recomputes the statistics (forward saves nothing). ``∂scale``/``∂shift`` are reduced without
atomics: each program writes its ``s``-weighted column sums ``Σ go⊙y`` and ``Σ go`` into a
``[B·P, d]`` fp32 buffer (P programs per batch item, each looping over its tiles), which the launcher
sums over P and scatters over entry ids with ``index_add_``.

The launchers are plain functions (the op registration lives in :mod:`lineas_fast.ops`). They run on CUDA
tensors, or on CPU tensors under ``TRITON_INTERPRET=1`` (set before triton is imported).
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError("lineas_fast.kernels.norm_affine needs triton (pip install 'lineas-fast[triton]')") from e

__all__ = ["MAX_D", "norm_affine_bwd", "norm_affine_fwd"]

MAX_D = 32768  # widest row held in one tile (registers); wider rows raise a ValueError
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@triton.jit
def _steer_coefs(cols, cmask, b, B, d, K, C, scale_ptr, shift_ptr, ids_ptr, strength_ptr, nrows_ptr):
    """(a [BLOCK_D], c [BLOCK_D], s) of batch item b; a = 1, c = 0, s = 0 for an unsteered row."""
    R = tl.load(nrows_ptr).to(tl.int64)
    r = (b.to(tl.int64) * R) // B
    r = tl.minimum(tl.maximum(r, 0), C - 1)  # memory safety only: callers keep 1 <= R <= C
    idx = tl.load(ids_ptr + r).to(tl.int64)
    on = (idx >= 0) & (idx < K)  # out-of-range ids never read outside the table
    s = tl.where(on, tl.load(strength_ptr + r).to(tl.float32), 0.0)
    row = tl.where(on, idx, 0) * d
    sc = tl.load(scale_ptr + row + cols, mask=cmask & on, other=1.0).to(tl.float32)
    sh = tl.load(shift_ptr + row + cols, mask=cmask & on, other=0.0).to(tl.float32)
    return 1.0 + s * (sc - 1.0), s * sh, s


@triton.jit
def _normalize(x, cmask, d, eps, IS_RMS: tl.constexpr):
    """(x̂, rstd) of an fp32 tile [BLOCK_M, BLOCK_D] over its valid columns (biased variance)."""
    if IS_RMS:
        xc = x
    else:
        xc = tl.where(cmask[None, :], x - (tl.sum(x, axis=1) / d)[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, axis=1) / d + eps)
    return xc * rstd[:, None], rstd


@triton.jit
def _cast(v, ptr, RNE_BF16: tl.constexpr):
    """fp32 -> ``ptr``'s element type. ``RNE_BF16``: round to nearest even by hand, because the interpreter's fp32->bf16
    cast truncates (GPUs round natively, so the launcher sets it only when interpreting)."""
    if RNE_BF16:
        bits = v.to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return v.to(ptr.dtype.element_ty)


@triton.jit
def _norm_affine_fwd_kernel(
    x_ptr,  # [B*N, d] x's dtype, contiguous
    out_ptr,  # [B*N, d] x's dtype
    w_ptr,  # [d] or dummy (HAS_W=False)
    bias_ptr,  # [d] or dummy (HAS_B=False)
    scale_ptr, shift_ptr,  # [K, d] steering table
    ids_ptr,  # [C] int
    strength_ptr,  # [C] float
    nrows_ptr,  # [1] int: R live routing entries
    B, N, d, K, C, n_tiles, eps, w_offset,
    IS_RMS: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr, RNE_BF16: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    b = pid // n_tiles
    t = pid % n_tiles
    cols = tl.arange(0, BLOCK_D)
    cmask = cols < d
    a, c, _ = _steer_coefs(cols, cmask, b, B, d, K, C, scale_ptr, shift_ptr, ids_ptr, strength_ptr, nrows_ptr)
    if HAS_W:
        g = tl.load(w_ptr + cols, mask=cmask, other=0.0).to(tl.float32) + w_offset
    else:
        g = tl.zeros([BLOCK_D], dtype=tl.float32) + (1.0 + w_offset)
    a2 = a * g  # out = a⊙(x̂⊙g + bias) + c = x̂⊙(a⊙g) + (a⊙bias + c)
    if HAS_B:
        c = c + a * tl.load(bias_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
    rows = t * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < N
    offs = (b.to(tl.int64) * N + rows)[:, None] * d + cols[None, :]
    mask = rmask[:, None] & cmask[None, :]
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    xhat, _ = _normalize(x, cmask, d, eps, IS_RMS)
    out = xhat * a2[None, :] + c[None, :]
    tl.store(out_ptr + offs, _cast(out, out_ptr, RNE_BF16), mask=mask)


@triton.jit
def _norm_affine_bwd_kernel(
    go_ptr,  # [B*N, d] grad_out, x's dtype, contiguous
    x_ptr,  # [B*N, d]
    gx_ptr,  # [B*N, d] grad_x (x's dtype)
    py_ptr,  # [B*P, d] fp32: s·Σ go⊙y over this program's rows
    pg_ptr,  # [B*P, d] fp32: s·Σ go over this program's rows
    w_ptr, bias_ptr,  # [d] or dummies
    scale_ptr, shift_ptr, ids_ptr, strength_ptr, nrows_ptr,  # steering table, as in the forward
    B, N, d, K, C, n_tiles, P, eps, w_offset,
    IS_RMS: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr, RNE_BF16: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    b = pid // P
    p = pid % P
    cols = tl.arange(0, BLOCK_D)
    cmask = cols < d
    a, _, s = _steer_coefs(cols, cmask, b, B, d, K, C, scale_ptr, shift_ptr, ids_ptr, strength_ptr, nrows_ptr)
    if HAS_W:
        g = tl.load(w_ptr + cols, mask=cmask, other=0.0).to(tl.float32) + w_offset
    else:
        g = tl.zeros([BLOCK_D], dtype=tl.float32) + (1.0 + w_offset)
    if HAS_B:
        beta = tl.load(bias_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
    else:
        beta = tl.zeros([BLOCK_D], dtype=tl.float32)
    ag = a * g
    acc_y = tl.zeros([BLOCK_D], dtype=tl.float32)
    acc_g = tl.zeros([BLOCK_D], dtype=tl.float32)
    for t in range(p, n_tiles, P):
        rows = t * BLOCK_M + tl.arange(0, BLOCK_M)
        offs = (b.to(tl.int64) * N + rows)[:, None] * d + cols[None, :]
        mask = (rows < N)[:, None] & cmask[None, :]
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        go = tl.load(go_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        xhat, rstd = _normalize(x, cmask, d, eps, IS_RMS)
        gy = go * ag[None, :]  # ĝ = grad⊙a⊙g (zero on masked entries)
        inner = tl.sum(gy * xhat, axis=1) / d
        gx = gy - xhat * inner[:, None]
        if not IS_RMS:
            gx = gx - (tl.sum(gy, axis=1) / d)[:, None]
        tl.store(gx_ptr + offs, _cast(gx * rstd[:, None], gx_ptr, RNE_BF16), mask=mask)
        acc_y += tl.sum(go * (xhat * g[None, :] + beta[None, :]), axis=0)
        acc_g += tl.sum(go, axis=0)
    prow = pid.to(tl.int64) * d
    tl.store(py_ptr + prow + cols, s * acc_y, mask=cmask)
    tl.store(pg_ptr + prow + cols, s * acc_g, mask=cmask)


# ---------------------------------------------------------------------------------------------- host side
def _interpreting() -> bool:
    """Whether the kernels were built for the interpreter (decided by TRITON_INTERPRET when triton
    decorated them, not by the variable's value now)."""
    return type(_norm_affine_fwd_kernel).__name__ == "InterpretedFunction"


def _tiles(N: int, d: int, interp: bool):
    """(BLOCK_M, BLOCK_D, num_warps). Under the interpreter big tiles mean fewer (slow, Python-level)
    programs; on a GPU a tile of ~4K elements keeps registers in check (tune on real hardware)."""
    bd = triton.next_power_of_2(d)
    budget, cap = (1 << 15, 256) if interp else (4096, 64)
    bm = max(1, min(cap, budget // bd, triton.next_power_of_2(max(N, 1))))
    elems = bm * bd
    warps = 32 if elems >= 32768 else 16 if elems >= 8192 else 8 if elems >= 2048 else 4
    return bm, bd, warps


def _check(x, weight, bias, kind, scale, shift, ids, strength, nrows, grad_out=None):
    """Validate the arguments; return ``(B, N, d, K, C)``. No host-device sync (ids/R are not read)."""
    if not isinstance(x, torch.Tensor) or x.dtype not in _DTYPES:
        raise ValueError(f"norm_affine: x must be a float32/float16/bfloat16 tensor, got "
                         f"{getattr(x, 'dtype', type(x).__name__)}")
    if x.dim() == 0:
        raise ValueError("norm_affine: x must have at least one dimension")
    if kind not in (0, 1):
        raise ValueError(f"norm_affine: kind={kind}: expected 0 (LayerNorm) or 1 (RMSNorm)")
    d = x.shape[-1]
    B = x.shape[0] if x.dim() > 1 else 1
    N = x.numel() // (B * d) if B * d else 0
    if d > MAX_D:
        raise ValueError(f"norm_affine: last dim {d} exceeds the Triton kernel's maximum {MAX_D}")
    dev = x.device
    if dev.type != "cuda" and not _interpreting():
        raise ValueError(f"norm_affine: Triton kernels need CUDA tensors (x is on {dev}), or TRITON_INTERPRET=1 "
                         "set before triton is imported")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and (t.shape != (d,) or not t.is_floating_point()):
            raise ValueError(f"norm_affine: {name} must be a float tensor of shape ({d},), got "
                             f"{t.dtype} {tuple(t.shape)}")
    for name, t in (("scale", scale), ("shift", shift)):
        if t.dim() != 2 or t.shape[1] != d or not t.is_floating_point():
            raise ValueError(f"norm_affine: {name} must be a float tensor [K, {d}], got {t.dtype} {tuple(t.shape)}")
    if scale.shape != shift.shape:
        raise ValueError(f"norm_affine: scale {tuple(scale.shape)} and shift {tuple(shift.shape)} differ")
    if ids.dim() != 1 or ids.numel() == 0 or ids.is_floating_point() or ids.dtype == torch.bool:
        raise ValueError(f"norm_affine: ids must be a non-empty 1-D integer tensor, got {ids.dtype} "
                         f"{tuple(ids.shape)}")
    if strength.shape != ids.shape or not strength.is_floating_point():
        raise ValueError(f"norm_affine: strength must be a float tensor of shape {tuple(ids.shape)}, got "
                         f"{strength.dtype} {tuple(strength.shape)}")
    if nrows.numel() != 1 or nrows.is_floating_point():
        raise ValueError(f"norm_affine: nrows must be a 1-element integer tensor, got {nrows.dtype} "
                         f"{tuple(nrows.shape)}")
    if grad_out is not None and (grad_out.shape != x.shape or grad_out.dtype != x.dtype):
        raise ValueError(f"norm_affine_backward: grad_out {grad_out.dtype} {tuple(grad_out.shape)} must match x "
                         f"{x.dtype} {tuple(x.shape)}")
    named = {"weight": weight, "bias": bias, "scale": scale, "shift": shift, "ids": ids, "strength": strength,
             "nrows": nrows, "grad_out": grad_out}
    for name, t in named.items():
        if t is not None and t.device != dev:
            raise ValueError(f"norm_affine: {name} is on {t.device} but x is on {dev}")
    return B, N, d, scale.shape[0], ids.numel()


def _common(x, weight, bias, scale, shift, ids, strength, nrows):
    """Contiguous operands; a missing weight/bias or an empty table (K = 0) is replaced by a never-read
    dummy pointer (x), so no null pointer reaches the kernel."""
    xc, scale, shift, ids, strength, nrows = (t.contiguous() for t in (x, scale, shift, ids, strength, nrows))
    w = weight.contiguous() if weight is not None else xc
    bb = bias.contiguous() if bias is not None else xc
    if scale.numel() == 0:
        scale = shift = xc
    return xc, w, bb, scale, shift, ids, strength, nrows


def norm_affine_fwd(x, weight, bias, eps, kind, weight_offset, scale, shift, ids, strength, nrows):
    """``lineas::norm_affine`` forward: ``a_r ⊙ norm(x) + c_r`` per batch row, fp32 math, x's dtype."""
    B, N, d, K, C = _check(x, weight, bias, kind, scale, shift, ids, strength, nrows)
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    xc, w, bb, scale, shift, ids, strength, nrows = _common(x, weight, bias, scale, shift, ids, strength, nrows)
    interp = _interpreting()
    bm, bd, warps = _tiles(N, d, interp)
    n_tiles = triton.cdiv(N, bm)
    _norm_affine_fwd_kernel[(B * n_tiles,)](
        xc, out, w, bb, scale, shift, ids, strength, nrows,
        B, N, d, K, C, n_tiles, float(eps), float(weight_offset),
        IS_RMS=kind == 1, HAS_W=weight is not None, HAS_B=bias is not None,
        RNE_BF16=interp and x.dtype == torch.bfloat16, BLOCK_M=bm, BLOCK_D=bd, num_warps=warps)
    return out


def _programs_per_item(B: int, n_tiles: int, device, interp: bool) -> int:
    """P: programs per batch item in the backward (each loops over n_tiles / P tiles). Enough programs to
    fill the GPU (~4 per SM), one per item under the interpreter."""
    if interp:
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(n_tiles, triton.cdiv(4 * sms, B)))


def norm_affine_bwd(grad_out, x, weight, bias, eps, kind, weight_offset, scale, shift, ids, strength, nrows):
    """``lineas::norm_affine_backward``: ``(grad_x in x's dtype, grad_scale fp32 [K, d], grad_shift fp32
    [K, d])``; rows routed to id −1 contribute nothing to the table gradients."""
    B, N, d, K, C = _check(x, weight, bias, kind, scale, shift, ids, strength, nrows, grad_out)
    gx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    g_scale = torch.zeros(scale.shape, dtype=torch.float32, device=x.device)
    g_shift = torch.zeros(shift.shape, dtype=torch.float32, device=x.device)
    if gx.numel() == 0:
        return gx, g_scale, g_shift
    go = grad_out.contiguous()
    xc, w, bb, scale, shift, ids, strength, nrows = _common(x, weight, bias, scale, shift, ids, strength, nrows)
    interp = _interpreting()
    bm, bd, warps = _tiles(N, d, interp)
    n_tiles = triton.cdiv(N, bm)
    P = _programs_per_item(B, n_tiles, x.device, interp)
    part = torch.empty((2, B * P, d), dtype=torch.float32, device=x.device)
    _norm_affine_bwd_kernel[(B * P,)](
        go, xc, gx, part[0], part[1], w, bb, scale, shift, ids, strength, nrows,
        B, N, d, K, C, n_tiles, P, float(eps), float(weight_offset),
        IS_RMS=kind == 1, HAS_W=weight is not None, HAS_B=bias is not None,
        RNE_BF16=interp and x.dtype == torch.bfloat16, BLOCK_M=bm, BLOCK_D=bd, num_warps=warps)
    if K:
        part = part.view(2, B, P, d).sum(2)  # [2, B, d], already s-weighted (0 for unsteered items)
        r = torch.div(torch.arange(B, device=x.device) * nrows.reshape(()).long(), B, rounding_mode="floor")
        idx = ids.long()[r.clamp(0, C - 1)]
        idx = torch.where((idx >= 0) & (idx < K), idx, 0)  # off-table items carry zeros (s = 0 in-kernel)
        g_scale.index_add_(0, idx, part[0])
        g_shift.index_add_(0, idx, part[1])
    return gx, g_scale, g_shift
