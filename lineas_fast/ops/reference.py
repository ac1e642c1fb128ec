"""Pure-torch references of the fused ops: the oracle every kernel (C++, Triton, CUDA) is tested against,
and the fallback implementation where no kernel is available.

Steering table semantics shared by every op (SPEC §2 strength, §4 fused runtime):

* ``scale``, ``shift``: float32 ``[K, d]`` — K loaded steerings (ω, b per channel).
* ``ids``: int64 ``[C]``, ``strength``: float32 ``[C]`` — a routing table of capacity C; only the first
  ``R = nrows[0]`` entries are live (``nrows``: int64 ``[1]``, ``1 ≤ R ≤ C``). Keeping R in a tensor lets
  routing change without changing any shape, so compiled graphs never recompile.
* Batch item ``b`` of a batch of B (``x``'s first dim) reads entry ``r = (b·R) // B``: R = 1 broadcasts,
  R = B is one entry per row, and B = k·R (``generate`` expanding each row k times) gives ``r = b // k``.
* Entry r with ``ids[r] = -1`` leaves the row unsteered; otherwise ``a = 1 + s·(scale[id] − 1)`` and
  ``c = s·shift[id]`` (s = ``strength[r]``), and the op returns ``a⊙y + c``.
* Math in fp32; the result has ``x``'s dtype.
"""

from __future__ import annotations

import torch

LAYERNORM, RMSNORM = 0, 1


def row_coefficients(batch: int, device, scale, shift, ids, strength, nrows):
    """Per batch item ``(a, c)``, each float32 ``[B, d]``."""
    b = torch.arange(batch, device=device)
    r = torch.div(b * nrows.to(device).reshape(()), batch, rounding_mode="floor")
    idx, s = ids.to(device)[r], strength.to(device=device, dtype=torch.float32)[r]
    on = idx >= 0
    s = torch.where(on, s, torch.zeros_like(s))[:, None]
    idx = idx.clamp(min=0)
    return 1 + s * (scale[idx].float() - 1), s * shift[idx].float()


def _as_batched(x: torch.Tensor) -> torch.Tensor:
    """View ``x`` as ``[B, N, d]``: B = first dim (1 for a 1-D x)."""
    if x.dim() == 1:
        return x.reshape(1, 1, -1)
    return x.reshape(x.shape[0], -1, x.shape[-1])


def normalize(x32: torch.Tensor, weight, bias, eps: float, kind: int, weight_offset: float) -> torch.Tensor:
    """LayerNorm (kind 0) or RMSNorm (kind 1) of an fp32 tensor over its last dim, then ``(w + offset)``
    and ``bias`` (each optional)."""
    if kind == LAYERNORM:
        mu = x32.mean(-1, keepdim=True)
        xc = x32 - mu
        y = xc * torch.rsqrt((xc * xc).mean(-1, keepdim=True) + eps)
    elif kind == RMSNORM:
        y = x32 * torch.rsqrt((x32 * x32).mean(-1, keepdim=True) + eps)
    else:
        raise ValueError(f"kind={kind}: expected 0 (LayerNorm) or 1 (RMSNorm)")
    if weight is not None:
        y = y * (weight.float() + weight_offset)
    elif weight_offset != 0:
        y = y * (1.0 + weight_offset)
    if bias is not None:
        y = y + bias.float()
    return y


def norm_affine(x, weight, bias, eps: float, kind: int, weight_offset: float, scale, shift, ids, strength,
                nrows, upcast: bool = True):
    """``a_r ⊙ norm(x) + c_r`` per batch row (see the module docstring); ``upcast=False`` computes in
    x's dtype (the eager low-precision baseline for error budgets)."""
    xb = _as_batched(x)
    work = xb.float() if upcast else xb
    y = normalize(work, weight, bias, eps, kind, weight_offset).float()
    a, c = row_coefficients(xb.shape[0], x.device, scale, shift, ids, strength, nrows)
    out = y * a[:, None, :] + c[:, None, :]
    if not upcast:
        out = out.to(x.dtype)
    return out.to(x.dtype).reshape(x.shape)


def steer_rows(x, scale, shift, ids, strength, nrows):
    """Just the steering: ``a_r ⊙ x + c_r`` per batch row (fp32 math, x's dtype)."""
    xb = _as_batched(x)
    a, c = row_coefficients(xb.shape[0], x.device, scale, shift, ids, strength, nrows)
    return (xb.float() * a[:, None, :] + c[:, None, :]).to(x.dtype).reshape(x.shape)


def norm_affine_backward(grad_out, x, weight, bias, eps: float, kind: int, weight_offset: float, scale, shift,
                         ids, strength, nrows):
    """Gradients of :func:`norm_affine` w.r.t. ``x``, ``scale`` and ``shift`` (explicit formulas, fp32).

    With x̂ the normalised row, g = w + offset, y = x̂⊙g + bias and out = a⊙y + c per row:
    ∂scale[k] = Σ_{rows→k} s·Σ_tokens grad⊙y, ∂shift[k] = Σ_{rows→k} s·Σ_tokens grad, and
    ∂x = rstd·(ĝ − x̂·mean(ĝ⊙x̂)) (RMSNorm) or rstd·(ĝ − mean(ĝ) − x̂·mean(ĝ⊙x̂)) (LayerNorm) with
    ĝ = grad⊙a⊙g. Rows whose entry is −1 contribute nothing to ∂scale/∂shift.
    """
    xb = _as_batched(x).float()
    go = _as_batched(grad_out).float()
    B = xb.shape[0]
    if kind == LAYERNORM:
        xc = xb - xb.mean(-1, keepdim=True)
        rstd = torch.rsqrt((xc * xc).mean(-1, keepdim=True) + eps)
        xhat = xc * rstd
    else:
        rstd = torch.rsqrt((xb * xb).mean(-1, keepdim=True) + eps)
        xhat = xb * rstd
    g = (weight.float() + weight_offset) if weight is not None else torch.full_like(xb[0, 0], 1.0 + weight_offset)
    y = xhat * g + (bias.float() if bias is not None else 0.0)
    a, _ = row_coefficients(B, x.device, scale, shift, ids, strength, nrows)
    gy = go * a[:, None, :] * g
    inner = (gy * xhat).mean(-1, keepdim=True)
    if kind == LAYERNORM:
        gx = rstd * (gy - gy.mean(-1, keepdim=True) - xhat * inner)
    else:
        gx = rstd * (gy - xhat * inner)
    r = torch.div(torch.arange(B, device=x.device) * nrows.to(x.device).reshape(()), B, rounding_mode="floor")
    idx, s = ids.to(x.device)[r], strength.to(device=x.device, dtype=torch.float32)[r]
    w_row = torch.where(idx >= 0, s, torch.zeros_like(s))[:, None]
    idx = idx.clamp(min=0)
    g_scale = torch.zeros(scale.shape, dtype=torch.float32, device=x.device).index_add_(
        0, idx, w_row * (go * y).sum(1))
    g_shift = torch.zeros(shift.shape, dtype=torch.float32, device=x.device).index_add_(
        0, idx, w_row * go.sum(1))
    return gx.to(x.dtype).reshape(x.shape), g_scale, g_shift


# ------------------------------------------------------------------ steered Linear (SPEC §4 Linear sites)
PROLOGUE, EPILOGUE = 0, 1  # ``where``: steer the Linear's input (an ":in" site) or its output


def _entry_weights(batch: int, device, ids, strength, nrows):
    """Per batch item: the table entry id (−1 clamped to 0) and the weight ``s`` of its gradient
    contributions (0 for unsteered rows), as used by the ``*_backward`` references."""
    r = torch.div(torch.arange(batch, device=device) * nrows.to(device).reshape(()), batch, rounding_mode="floor")
    idx, s = ids.to(device)[r], strength.to(device=device, dtype=torch.float32)[r]
    return idx.clamp(min=0), torch.where(idx >= 0, s, torch.zeros_like(s))[:, None]


def steered_linear(x, weight, bias, where: int, scale, shift, ids, strength, nrows, upcast: bool = True):
    """A Linear layer steered per batch row (table semantics: module docstring).

    ``where = PROLOGUE``: ``(a_r ⊙ x + c_r) Wᵀ + bias`` (table width = in_features); ``where = EPILOGUE``:
    ``a_r ⊙ (x Wᵀ + bias) + c_r`` (width = out_features). Steering in fp32; ``upcast=True`` does the matmul
    in fp32 too (the oracle), ``upcast=False`` in x's dtype exactly as eager nn.Linear + a steering hook
    would (the steered input rounded to x's dtype before the matmul; the matmul result steered in fp32
    and rounded once) — the low-precision baseline for error budgets. Returns x's dtype.
    """
    if where not in (PROLOGUE, EPILOGUE):
        raise ValueError(f"where={where}: expected 0 (prologue, input site) or 1 (epilogue, output site)")
    xb = _as_batched(x)
    dt = torch.float32 if upcast else x.dtype
    w, b = weight.to(dt), (bias.to(dt) if bias is not None else None)
    a, c = row_coefficients(xb.shape[0], x.device, scale, shift, ids, strength, nrows)
    a, c = a[:, None, :], c[:, None, :]
    if where == PROLOGUE:
        y = torch.nn.functional.linear((xb.float() * a + c).to(dt), w, b)
    else:
        y = torch.nn.functional.linear(xb.to(dt), w, b).float() * a + c
    return y.to(x.dtype).reshape(*x.shape[:-1], weight.shape[0])


def steered_linear_backward(grad_out, x, weight, bias, where: int, scale, shift, ids, strength, nrows):
    """Gradients of :func:`steered_linear` w.r.t. ``x``, ``scale`` and ``shift`` (explicit formulas, fp32;
    none for the frozen weight/bias).

    Prologue (h = a⊙x + c, y = h Wᵀ + bias): g = grad·W, ∂x = g⊙a, ∂scale[k] += s·Σ g⊙x, ∂shift[k] += s·Σ g.
    Epilogue (p = x Wᵀ + bias, y = a⊙p + c): ∂x = (grad⊙a)·W, ∂scale[k] += s·Σ grad⊙p, ∂shift[k] += s·Σ grad.
    Sums run over the tokens of the rows mapped to entry k; rows whose entry is −1 contribute nothing.
    """
    xb = _as_batched(x).float()
    go = _as_batched(grad_out).float()
    w = weight.float()
    a, _ = row_coefficients(xb.shape[0], x.device, scale, shift, ids, strength, nrows)
    a = a[:, None, :]
    if where == PROLOGUE:
        g = go @ w
        gx, g_sum, other = g * a, g, xb
    elif where == EPILOGUE:
        gx = (go * a) @ w
        g_sum, other = go, torch.nn.functional.linear(xb, w, bias.float() if bias is not None else None)
    else:
        raise ValueError(f"where={where}: expected 0 (prologue, input site) or 1 (epilogue, output site)")
    idx, w_row = _entry_weights(xb.shape[0], x.device, ids, strength, nrows)
    g_scale = torch.zeros(scale.shape, dtype=torch.float32, device=x.device).index_add_(
        0, idx, w_row * (g_sum * other).sum(1))
    g_shift = torch.zeros(shift.shape, dtype=torch.float32, device=x.device).index_add_(
        0, idx, w_row * g_sum.sum(1))
    return gx.to(x.dtype).reshape(x.shape), g_scale, g_shift
