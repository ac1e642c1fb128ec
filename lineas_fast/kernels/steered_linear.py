"""Triton kernels for ``lineas::steered_linear`` (a Linear layer with per-row steering of its input or
output), forward and backward, with their host launchers. Semantics: :mod:`lineas_fast.ops.reference`.

One matmul kernel, ``acc[M, N] = A[M, K] @ Bᵀ`` with ``B`` read as ``[N, K]`` through its strides (so the
backward's ``… @ W`` is the same kernel with W's strides swapped, and a transposed GPT-2 ``Conv1D``
weight needs no copy). Rows are the flattened leading dims of x: row m belongs to batch item
``b = m // T`` (T tokens per item), which reads routing entry ``r = (b·R) // B``. Tiling: a program owns
a ``BLOCK_M × BLOCK_N`` output tile (grouped along M so neighbouring programs share W tiles in L2) and
walks K in ``BLOCK_K`` steps, accumulating in fp32. The steering is applied in-kernel from the tables —
the per-row id and strength are loaded once per program, the ``scale``/``shift`` rows gathered per tile
(a masked load: unsteered rows read nothing), so no per-call host gather and nothing recompiles when
routing or strength change:

* prologue (``where`` 0, an ``:in`` site): each x tile is steered as it is loaded, ``a⊙x + c`` with a, c
  gathered at the tile's K columns, then (low precision) rounded to x's dtype for the tensor-core dot;
* epilogue (``where`` 1): ``a⊙(acc + bias) + c`` with a, c at the tile's N columns, before the one store.

fp32 operands use an exact fp32 dot (``input_precision="ieee"``, no TF32); bf16/fp16 operands of one
dtype use a native dot with fp32 accumulation; mixed dtypes are computed in fp32. The result has x's dtype.

Backward (the weight and bias are frozen: gradients for x and the tables only). Prologue:
``g = grad_out @ W`` with ``∂x = a⊙g`` applied as an epilogue; epilogue: ``∂x = (a⊙grad_out) @ W``
applied as a prologue, plus one recomputation of ``p = x Wᵀ + bias`` (the forward saves nothing). The
table gradients ``∂scale[k] = Σ s·g⊙x`` (resp. ``s·grad_out⊙p``) and ``∂shift[k] = Σ s·g`` (resp.
``s·grad_out``) are reduced in the epilogue of those matmuls, without atomics: each output tile writes
one fp32 column-sum row per batch item it overlaps (at most ``SLOTS`` of them) into a partial buffer,
which the launcher sums over entry ids with ``index_add_`` — an ``[n_tiles·SLOTS, d]`` reduction, cheap
next to the matmuls, so it stays in torch.

Launchers are plain functions with the ops' argument order (:mod:`lineas_fast.ops` registers them for
CUDA tensors). They run on CUDA tensors, or on CPU tensors under ``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError("lineas_fast.kernels.steered_linear needs triton (pip install 'lineas-fast[triton]')") from e

from .norm_affine import _cast

__all__ = ["steered_linear_bwd", "steered_linear_fwd"]

PROLOGUE, EPILOGUE, NONE = 0, 1, 2  # STEER: on the A tile as loaded, on the accumulator, or not at all
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@triton.jit
def _row_entries(rows, rmask, T, B, Kt, C, ids_ptr, strength_ptr, nrows_ptr):
    """(table row, strength s, steered?) per row of a tile; s = 0 and steered = False for id −1 rows."""
    R = tl.load(nrows_ptr).to(tl.int64)
    r = ((rows.to(tl.int64) // T) * R) // B
    r = tl.minimum(tl.maximum(r, 0), C - 1)  # memory safety only: callers keep 1 <= R <= C
    idx = tl.load(ids_ptr + r, mask=rmask, other=-1).to(tl.int64)
    on = rmask & (idx >= 0) & (idx < Kt)  # out-of-range ids never read outside the table
    s = tl.load(strength_ptr + r, mask=on, other=0.0).to(tl.float32)
    return tl.where(on, idx, 0).to(tl.int32), s, on


@triton.jit
def _table(ptr, idx, on, cols, cmask, d, other):
    """The fp32 tile ``table[idx[m], cols[n]]`` (``other`` where the row is unsteered or off the edge);
    int32 offsets, as in the main loop (tables hold < 2³¹ elements)."""
    offs = idx[:, None] * d + cols[None, :]
    return tl.load(ptr + offs, mask=on[:, None] & cmask[None, :], other=other).to(tl.float32)


@triton.jit
def _steered_mm_kernel(
    a_ptr,  # [M, K] left operand (x; grad_out in the backward), strides (s_am, s_ak)
    w_ptr,  # [N, K] right operand, element (n, k) at n·s_wn + k·s_wk
    bias_ptr,  # [N] or a dummy (HAS_BIAS=False)
    y_ptr,  # [M, N] contiguous output, or a dummy (STORE=False)
    v_ptr,  # [M, N] paired with acc in the table-gradient sums (REDUCE), strides (s_vm, s_vn), or a dummy
    ps_ptr, pg_ptr,  # [n_mtiles·SLOTS, N] fp32 partial Σ s·grad⊙value and Σ s·grad (REDUCE), or dummies
    scale_ptr, shift_ptr,  # [Kt, d] steering table, d = K (STEER=PROLOGUE) or N (EPILOGUE / REDUCE)
    ids_ptr, strength_ptr, nrows_ptr,  # routing: [C] ids, [C] strength, [1] R
    M, N, K, T, B, Kt, C, SLOTS,
    s_am, s_ak, s_wn, s_wk, s_vm, s_vn,
    STEER: tl.constexpr,  # PROLOGUE, EPILOGUE or NONE
    SHIFT: tl.constexpr,  # add c (forward); the backward applies a only
    HAS_BIAS: tl.constexpr, STORE: tl.constexpr,
    REDUCE: tl.constexpr,  # 0: none; 1: Σ s·acc⊙v, Σ s·acc (acc = g); 2: Σ s·v⊙acc, Σ s·v (v = grad_out)
    ROUND_A: tl.constexpr,  # round the steered A tile to A's dtype (a low-precision dot)
    DOT_F32: tl.constexpr,  # both tiles in fp32, exact (ieee) dot
    RNE_A: tl.constexpr, RNE_Y: tl.constexpr,  # bf16 rounded by hand (the interpreter's cast truncates)
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    pid = tl.program_id(0)
    n_m = tl.cdiv(M, BLOCK_M)
    n_n = tl.cdiv(N, BLOCK_N)
    group = GROUP_M * n_n  # programs per group of GROUP_M tile rows: consecutive programs reuse W tiles
    first_m = (pid // group) * GROUP_M
    size_m = tl.minimum(n_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group) % size_m
    pid_n = (pid % group) // size_m

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < M
    cmask = cols < N
    rows64 = rows.to(tl.int64)
    cols64 = cols.to(tl.int64)
    idx, s, on = _row_entries(rows, rmask, T, B, Kt, C, ids_ptr, strength_ptr, nrows_ptr)

    # Main loop: rows/cols past M/N wrap around (% M, % N) instead of being masked — those results are
    # never stored and carry s = 0 into the reductions — so only the K tail is masked; pointers advance
    # by BLOCK_K each step (fewer registers than re-deriving 64-bit offsets).
    ks = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + (rows % M).to(tl.int64)[:, None] * s_am + ks[None, :] * s_ak
    w_ptrs = w_ptr + (cols % N).to(tl.int64)[None, :] * s_wn + ks[:, None] * s_wk  # [BLOCK_K, BLOCK_N]
    if STEER == 0:
        t_offs = idx[:, None] * K + ks[None, :]  # the gathered table rows, at this step's K columns
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kmask = ks < K - k0
        a = tl.load(a_ptrs, mask=kmask[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=kmask[:, None], other=0.0)
        if STEER == 0:  # a⊙x + c in fp32, zero in the K tail (c too), as the dot needs
            tmask = on[:, None] & kmask[None, :]
            sc = tl.load(scale_ptr + t_offs, mask=tmask, other=1.0).to(tl.float32)
            h = a.to(tl.float32) * (1.0 + s[:, None] * (sc - 1.0))
            if SHIFT:
                h += s[:, None] * tl.load(shift_ptr + t_offs, mask=tmask, other=0.0).to(tl.float32)
            if ROUND_A:
                a = _cast(h, a_ptr, RNE_A)
            else:
                a = h
            t_offs += BLOCK_K
        if DOT_F32:
            acc = tl.dot(a.to(tl.float32), w.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(a, w, acc)
        a_ptrs += BLOCK_K * s_ak
        w_ptrs += BLOCK_K * s_wk

    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
    offs = rows64[:, None] * N + cols64[None, :]
    omask = rmask[:, None] & cmask[None, :]
    if STORE:
        out = acc
        if STEER == 1:
            out = out * (1.0 + s[:, None] * (_table(scale_ptr, idx, on, cols, cmask, N, 1.0) - 1.0))
            if SHIFT:
                out += s[:, None] * _table(shift_ptr, idx, on, cols, cmask, N, 0.0)
        tl.store(y_ptr + offs, _cast(out, y_ptr, RNE_Y), mask=omask)
    if REDUCE != 0:
        v = tl.load(v_ptr + rows64[:, None] * s_vm + cols64[None, :] * s_vn, mask=omask, other=0.0).to(tl.float32)
        if REDUCE == 1:
            grad = acc * s[:, None]  # s = 0 on unsteered and out-of-range rows
            prod = grad * v
        else:
            grad = v * s[:, None]
            prod = grad * acc
        item = rows // T
        lo = (pid_m * BLOCK_M) // T
        hi = (tl.minimum(pid_m * BLOCK_M + BLOCK_M, M) - 1) // T
        for j in range(hi - lo + 1):  # the batch items this tile overlaps (≤ 2 when T ≥ BLOCK_M)
            sel = (item == lo + j)[:, None]
            p = (pid_m.to(tl.int64) * SLOTS + j) * N + cols64
            tl.store(ps_ptr + p, tl.sum(tl.where(sel, prod, 0.0), axis=0), mask=cmask)
            tl.store(pg_ptr + p, tl.sum(tl.where(sel, grad, 0.0), axis=0), mask=cmask)


# ---------------------------------------------------------------------------------------------- host side
def _interpreting() -> bool:
    """Whether the kernel was built for the interpreter (decided when triton decorated it)."""
    return type(_steered_mm_kernel).__name__ == "InterpretedFunction"


def _tiles(M: int, N: int, K: int, lowp: bool, interp: bool):
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages); every block ≥ 16 (the GPU dot's minimum).

    Interpreter: tiles as large as the problem (up to 64 × 128 × 128): fewer Python-level programs and
    steps. GPU: not autotuned (no GPU to time on when written) but chosen from ptxas register reports
    (sm_90, every kernel variant): decoding (M ≤ 16) gets short wide tiles with a long K step; fp32 (an
    ieee dot on CUDA cores) and mid-sized M get 64 × 64 × 32; large low-precision M gets 128 × 128 × 32
    on 8 warps. These spill at most ~120 bytes per thread, except the epilogue-steered variants at
    128 × 128 (~1.6 KB, which the plain matmul at that tile does not: the gathered [128, 128] table tiles
    of the epilogue, run once per tile)."""
    np2 = triton.next_power_of_2
    if interp:
        return min(64, max(16, np2(M))), min(128, max(16, np2(N))), min(128, max(16, np2(K))), 4, 1
    if M <= 16:
        return 16, 64, (128 if lowp else 32), 4, 4
    if M <= 64 or not lowp:
        return 64, 64, 32, 4, 4
    return 128, 128, 32, 8, 4


def _matmul(a, w, bias, steer, shift, tables, routing, B, T, y=None, v=None, reduce=0, grads=None):
    """One launch of :func:`_steered_mm_kernel`: ``a [M, K] @ w [N, K]ᵀ`` (any strides), steered per
    ``steer``/``shift`` with ``tables = (scale, shift, Kt)``, stored into ``y`` (contiguous ``[M, N]``)
    when given; with ``reduce`` (and ``v [M, N]``), the table-gradient partial sums are added into
    ``grads = (g_scale, g_shift)`` (fp32 ``[Kt, N]``)."""
    M, K = a.shape
    N = w.shape[0]
    if M == 0 or N == 0:
        return
    if a.stride(1) >= 2 ** 24 or w.stride(1) >= 2 ** 24:  # K strides step in int32 (BLOCK_K·stride < 2³¹)
        a, w = a.contiguous(), w.contiguous()
    scale, shift_t, Kt = tables
    ids, strength, nrows = routing
    interp = _interpreting()
    lowp = a.dtype == w.dtype and a.dtype != torch.float32  # a native low-precision dot
    bm, bn, bk, warps, stages = _tiles(M, N, K, lowp, interp)
    n_m = triton.cdiv(M, bm)
    slots = min(bm, triton.cdiv(bm - 1, T) + 1, B) if reduce else 1  # batch items one M tile can overlap
    part = torch.zeros((2, n_m * slots, N), dtype=torch.float32, device=a.device) if reduce else None
    dummy = a
    _steered_mm_kernel[(n_m * triton.cdiv(N, bn),)](
        a, w, bias if bias is not None else dummy, y if y is not None else dummy, v if v is not None else dummy,
        part[0] if reduce else dummy, part[1] if reduce else dummy, scale, shift_t, ids, strength, nrows,
        M, N, K, T, B, Kt, ids.numel(), slots,
        a.stride(0), a.stride(1), w.stride(0), w.stride(1),
        v.stride(0) if v is not None else 0, v.stride(1) if v is not None else 0,
        STEER=steer, SHIFT=shift, HAS_BIAS=bias is not None, STORE=y is not None, REDUCE=reduce,
        ROUND_A=lowp and steer == PROLOGUE, DOT_F32=not lowp or (interp and a.dtype == torch.bfloat16),
        RNE_A=interp and a.dtype == torch.bfloat16, RNE_Y=interp and y is not None and y.dtype == torch.bfloat16,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8, num_warps=warps, num_stages=stages)
    if reduce and Kt:  # partial row (tile t, slot j) belongs to batch item t·BLOCK_M // T + j
        rows = torch.arange(n_m * slots, device=a.device)
        item = ((rows // slots) * bm // T + rows % slots).clamp(max=B - 1)  # unused slots hold zeros
        r = (item * nrows.reshape(()).long() // B).clamp(0, ids.numel() - 1)
        idx = ids.long()[r]
        idx = torch.where((idx >= 0) & (idx < Kt), idx, 0)  # unsteered items carry zeros (s = 0 in-kernel)
        grads[0].index_add_(0, idx, part[0])
        grads[1].index_add_(0, idx, part[1])


def _check(x, weight, bias, where, scale, shift, ids, strength, nrows, grad_out=None):
    """Validate the arguments; return ``(M, N, K, B, T)`` (rows, out/in features, batch items, rows per
    item). No host-device sync (ids and R are not read)."""
    op = "steered_linear" if grad_out is None else "steered_linear_backward"
    if not isinstance(x, torch.Tensor) or x.dtype not in _DTYPES or x.dim() == 0:
        raise ValueError(f"{op}: x must be a float32/float16/bfloat16 tensor of ≥ 1 dims, got "
                         f"{getattr(x, 'dtype', type(x).__name__)} {tuple(getattr(x, 'shape', ()))}")
    K = x.shape[-1]
    if weight.dim() != 2 or weight.shape[1] != K or weight.dtype not in _DTYPES:
        raise ValueError(f"{op}: weight must be a float [out_features, {K}] tensor, got {weight.dtype} "
                         f"{tuple(weight.shape)}")
    N = weight.shape[0]
    if bias is not None and (bias.shape != (N,) or bias.dtype not in _DTYPES):
        raise ValueError(f"{op}: bias must be a float tensor of shape ({N},), got {bias.dtype} {tuple(bias.shape)}")
    if where not in (PROLOGUE, EPILOGUE):
        raise ValueError(f"{op}: where={where}: expected 0 (prologue, input site) or 1 (epilogue, output site)")
    d = K if where == PROLOGUE else N
    if scale.dim() != 2 or scale.shape[1] != d or scale.shape != shift.shape or not (
            scale.is_floating_point() and shift.is_floating_point()):
        raise ValueError(f"{op}: scale/shift must both be float [K, {d}] tensors (d = "
                         f"{'in' if where == PROLOGUE else 'out'}_features), got {tuple(scale.shape)} and "
                         f"{tuple(shift.shape)}")
    if scale.numel() >= 2 ** 31:
        raise ValueError(f"{op}: the steering table has {scale.numel()} elements; the kernel indexes < 2^31")
    if ids.dim() != 1 or ids.numel() == 0 or ids.is_floating_point() or ids.dtype == torch.bool:
        raise ValueError(f"{op}: ids must be a non-empty 1-D integer tensor, got {ids.dtype} {tuple(ids.shape)}")
    if strength.shape != ids.shape or not strength.is_floating_point():
        raise ValueError(f"{op}: strength must be a float tensor of shape {tuple(ids.shape)}, got "
                         f"{strength.dtype} {tuple(strength.shape)}")
    if nrows.numel() != 1 or nrows.is_floating_point():
        raise ValueError(f"{op}: nrows must be a 1-element integer tensor, got {nrows.dtype} {tuple(nrows.shape)}")
    if grad_out is not None and (grad_out.shape != (*x.shape[:-1], N) or grad_out.dtype not in _DTYPES):
        raise ValueError(f"{op}: grad_out must be a float tensor of the output's shape {(*x.shape[:-1], N)}, "
                         f"got {grad_out.dtype} {tuple(grad_out.shape)}")
    dev = x.device
    if dev.type != "cuda" and not _interpreting():
        raise ValueError(f"{op}: Triton kernels need CUDA tensors (x is on {dev}), or TRITON_INTERPRET=1 set "
                         "before triton is imported")
    named = {"weight": weight, "bias": bias, "scale": scale, "shift": shift, "ids": ids, "strength": strength,
             "nrows": nrows, "grad_out": grad_out}
    for name, t in named.items():
        if t is not None and t.device != dev:
            raise ValueError(f"{op}: {name} is on {t.device} but x is on {dev}")
    M = x.shape[:-1].numel()  # 1 for a 1-D x
    B = x.shape[0] if x.dim() > 1 else 1
    return M, N, K, B, (M // B if B else 0)


def _operands(x, scale, shift, ids, strength, nrows, M, K):
    """x as ``[M, K]`` (a strided view where the leading dims flatten to one, else one copy), contiguous
    tables and routing; an empty table (K = 0) is replaced by a never-read dummy pointer (x)."""
    x2 = x.reshape(M, K)
    scale, shift, ids, strength, nrows = (t.contiguous() for t in (scale, shift, ids, strength, nrows))
    Kt = scale.shape[0]
    if scale.numel() == 0:
        scale = shift = x2
    return x2, (scale, shift, Kt), (ids, strength, nrows)


def steered_linear_fwd(x, weight, bias, where, scale, shift, ids, strength, nrows):
    """``lineas::steered_linear``: ``(a⊙x + c) Wᵀ + bias`` (where 0) or ``a⊙(x Wᵀ + bias) + c`` (where 1)
    per batch row, fp32 accumulation and steering, x's dtype."""
    M, N, K, B, T = _check(x, weight, bias, where, scale, shift, ids, strength, nrows)
    y = torch.empty((*x.shape[:-1], N), dtype=x.dtype, device=x.device)
    if y.numel() == 0:
        return y
    x2, tables, routing = _operands(x, scale, shift, ids, strength, nrows, M, K)
    _matmul(x2, weight, bias, where, True, tables, routing, B, T, y=y.view(M, N))
    return y


def steered_linear_bwd(grad_out, x, weight, bias, where, scale, shift, ids, strength, nrows):
    """``lineas::steered_linear_backward``: ``(grad_x in x's dtype, grad_scale fp32 [K, d], grad_shift fp32
    [K, d])``; no gradient for the frozen weight and bias, and unsteered rows add nothing to the tables.

    Prologue: one matmul ``g = grad_out @ W`` whose epilogue stores ``a⊙g`` and reduces ``s·g⊙x``, ``s·g``.
    Epilogue: ``(a⊙grad_out) @ W`` (a prologue), then ``p = x Wᵀ + bias`` recomputed (not stored) with
    ``s·grad_out⊙p``, ``s·grad_out`` reduced in its epilogue.
    """
    M, N, K, B, T = _check(x, weight, bias, where, scale, shift, ids, strength, nrows, grad_out)
    gx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    grads = (torch.zeros(scale.shape, dtype=torch.float32, device=x.device),
             torch.zeros(shift.shape, dtype=torch.float32, device=x.device))
    if M == 0:
        return gx, *grads
    x2, tables, routing = _operands(x, scale, shift, ids, strength, nrows, M, K)
    go = grad_out.reshape(M, N)
    wt = weight.t()  # [in, out]: the backward's right operand, read through swapped strides
    if where == PROLOGUE:
        _matmul(go, wt, None, EPILOGUE, False, tables, routing, B, T, y=gx.view(M, K), v=x2, reduce=1, grads=grads)
    else:
        _matmul(go, wt, None, PROLOGUE, False, tables, routing, B, T, y=gx.view(M, K))
        _matmul(x2, weight, bias, NONE, False, tables, routing, B, T, v=go, reduce=2, grads=grads)
    return gx, *grads
