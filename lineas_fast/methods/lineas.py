"""LinEAS: all sites trained jointly, end to end, with one global Wasserstein loss (SPEC §2).

Each step runs the source prompts through the model with every current map applied (so downstream
sites see upstream steering), pools each steered site, and compares the ``[n, Σd]`` matrix to the
precomputed, pre-sorted target activations with one batched sort. The forward stops after the last
site. Adam (or SGD) updates (ω, b); a proximal sparse-group-lasso step then selects neurons and sites.
The model is left exactly as found: hooks are removed and ``requires_grad`` flags restored.
"""

from __future__ import annotations

import time
from types import SimpleNamespace

import torch
from tqdm.auto import tqdm

from ..collect import POOLINGS, collect, encode, length_buckets, model_device, pool, run_to_sites, tap
from ..errors import SteeringError
from ..losses import column_weights, wasserstein_loss
from ..sites import resolve_sites, site_widths
from ..steering import Steering
from .common import check_prompt_sets, model_meta
from .prox import prox_sparse_group, step_sizes

# Chosen on the default task (SmolLM2-135M, 32 toxic vs 32 WikiText lines, SPEC §5 protocol); the sweep,
# its command and every measured point are in docs/tuning.md. In short: token pooling gives the loss ~500
# samples instead of 32 sentence means; per-column variance normalisation keeps a few huge-variance
# neurons from dominating; l1 (in units of that normalised loss, thresholded in Adam's metric) keeps
# only ~7% of the entries off identity and removes Adam's uniform drift of every scale; 40 steps keeps
# the fit near 2 minutes on 2 cores. lr 1e-2 and SGD diverged.
DEFAULTS = dict(sites="norms", pooling="tokens", steps=40, lr=3e-3, l1=10.0, group_l2=0.0, batch_size=32,
                normalize="var", optimizer="adam", max_length=64, seed=0)


class _FrozenModel:
    """Context: model params stop requiring grad (no wasted weight grads); flags restored after."""

    def __init__(self, model):
        self.model = model

    def __enter__(self):
        self.flags = [(p, p.requires_grad) for p in self.model.parameters()]
        self.training = self.model.training
        for p, _ in self.flags:
            p.requires_grad_(False)
        self.model.eval()

    def __exit__(self, *exc):
        for p, flag in self.flags:
            p.requires_grad_(flag)
        self.model.train(self.training)


class _TrainedNorms:
    """Context: norm sites run the fused ``lineas::norm_affine`` op with (ω, b) as its one-entry table,
    so forward and backward of norm + steering are one kernel each (C++ on CPU, Triton on GPU) instead
    of the eager norm followed by the affine map. ``fused=None`` uses it where the op has a native kernel
    for the model's device; other sites keep the plain affine map in the tap."""

    def __init__(self, model, sites, slices, fused):
        from ..patching.fused import norm_spec, plan_fused

        self.model, self.slices, self.patch = model, slices, None
        if fused is None:
            fused = _native_norm_kernel(model_device(model))
        # norm sites only: the tap pools a site's *output*, which for a norm is the fused op's result
        self.fused = [s for s in plan_fused(model, {}, sites)[0] if norm_spec(model, s)] if fused else []

    def __enter__(self):
        from ..patching.fused import FusedPatch

        if self.fused:
            dev = model_device(self.model)
            dummy = {s: torch.ones(1, self.slices[s].stop - self.slices[s].start, device=dev) for s in self.fused}
            self.patch = FusedPatch(self.model, self.fused, SimpleNamespace(scale=dummy, shift=dummy))
            self.patch.set_rows(torch.zeros(1, dtype=torch.long), torch.ones(1))
        return self

    def bind(self, omega, shift) -> None:
        for s in self.fused:
            m = self.model.get_submodule(s)
            m.table_scale, m.table_shift = omega[self.slices[s]][None], shift[self.slices[s]][None]

    def __exit__(self, *exc):
        if self.patch is not None:
            self.patch.remove()


def _native_norm_kernel(device) -> bool:
    from .. import ops

    key = "CUDA" if device.type == "cuda" else "CPU"
    return torch._C._dispatch_has_kernel_for_dispatch_key("lineas::norm_affine", key)


def fit_lineas(model, tok, source, target, *, sites=DEFAULTS["sites"], pooling=DEFAULTS["pooling"],
               steps=DEFAULTS["steps"], lr=DEFAULTS["lr"], l1=DEFAULTS["l1"], group_l2=DEFAULTS["group_l2"],
               batch_size=DEFAULTS["batch_size"], normalize=DEFAULTS["normalize"],
               optimizer=DEFAULTS["optimizer"], max_length=DEFAULTS["max_length"], seed=DEFAULTS["seed"],
               micro_batch: int = 8, fused: bool | None = None, autocast: bool = False,
               progress: bool = True) -> Steering:
    """Fit LinEAS maps; see :func:`lineas_fast.fit` for the arguments."""
    source, target = check_prompt_sets(source, target)
    if pooling not in POOLINGS:
        raise SteeringError(f"pooling={pooling!r}: expected one of {POOLINGS}")
    if optimizer not in ("adam", "sgd"):
        raise SteeringError(f"optimizer={optimizer!r}: expected 'adam' or 'sgd'")
    if normalize not in (None, "none", "var"):
        raise SteeringError(f"normalize={normalize!r}: expected None or 'var'")
    if steps < 0 or lr <= 0 or l1 < 0 or group_l2 < 0 or batch_size < 2:
        raise SteeringError(f"need steps >= 0, lr > 0, l1 >= 0, group_l2 >= 0, batch_size >= 2 "
                            f"(got {steps}, {lr}, {l1}, {group_l2}, {batch_size})")
    site_list = resolve_sites(model, sites)
    widths = site_widths(model, site_list)
    offsets, slices = 0, {}
    for s in site_list:
        slices[s] = slice(offsets, offsets + widths[s])
        offsets += widths[s]
    device = model_device(model)
    t0 = time.perf_counter()

    # 1. targets, unsteered, once; sorted once.
    v = collect(model, tok, target, site_list, pooling=pooling, max_length=max_length)
    v = torch.cat([v[s] for s in site_list], dim=1).to(device)
    v_sorted = torch.sort(v, dim=0).values
    weights = column_weights(v, normalize)

    # 2. identity init; flat parameter vectors, one slice per site.
    gen = torch.Generator().manual_seed(seed)
    omega = torch.ones(offsets, device=device, requires_grad=True)
    shift = torch.zeros(offsets, device=device, requires_grad=True)
    opt = (torch.optim.Adam if optimizer == "adam" else torch.optim.SGD)([omega, shift], lr=lr)
    n = len(source)

    def _batches(rows: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        chunks = length_buckets(tok, [source[i] for i in rows], micro_batch)
        return [encode(tok, chunk, max_length, device) for chunk in chunks]

    full_batches = _batches(list(range(n))) if batch_size >= n else None  # encoded once when every step uses all
    history = {"loss": [], "nnz": [], "active_sites": []}
    pooled: dict[str, list] = {s: [] for s in site_list}
    box = {}

    def steer_and_pool(spec, h):
        if spec in trained.fused:  # the fused norm already applied (ω, b): only pool
            pooled[spec].append(pool(h.float(), box["mask"], pooling))
            return None
        sl = slices[spec]
        out = (h.float() * omega[sl] + shift[sl])
        pooled[spec].append(pool(out, box["mask"], pooling))
        return out.to(h.dtype)

    bar = tqdm(range(steps), desc="LinEAS", disable=not progress)
    trained = _TrainedNorms(model, site_list, slices, fused)
    with _FrozenModel(model), trained, tap(model, site_list, steer_and_pool) as seen:
        for _ in bar:
            trained.bind(omega, shift)  # fresh views of the parameters: one autograd graph per step
            for ids, mask in (full_batches or _batches(torch.randperm(n, generator=gen)[:batch_size].tolist())):
                box["mask"] = mask
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                    run_to_sites(model, ids, mask, seen)
            z = torch.cat([torch.cat(pooled[s]) for s in site_list], dim=1)
            for s in site_list:
                pooled[s].clear()
            if not torch.isfinite(z).all():
                bad = next(s for s in site_list if not torch.isfinite(z[:, slices[s]]).all())
                raise SteeringError(f"site {bad!r}: NaN or inf in steered activations during fit "
                                    f"(lower lr={lr} or check the model)")
            loss = wasserstein_loss(z, v_sorted, weights)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            gw, gb = step_sizes(opt, omega), step_sizes(opt, shift)
            prox_sparse_group(omega.data, shift.data, gw, gb, l1, group_l2, list(slices.values()))
            with torch.no_grad():
                off = (omega != 1).int() + (shift != 0).int()
                nnz = int(off.sum())
                active = sum(int(off[sl].any()) for sl in slices.values())
            history["loss"].append(loss.item())
            history["nnz"].append(nnz)
            history["active_sites"].append(active)
            bar.set_postfix(loss=f"{history['loss'][-1]:.4g}", nnz=nnz, sites=active)
    fit_seconds = time.perf_counter() - t0

    scale = {s: omega.detach()[slices[s]].cpu() for s in site_list}
    shift_d = {s: shift.detach()[slices[s]].cpu() for s in site_list}
    hyper = dict(sites=sites if isinstance(sites, str) else list(sites), pooling=pooling, steps=steps, lr=lr,
                 l1=l1, group_l2=group_l2, batch_size=batch_size, normalize=normalize, optimizer=optimizer,
                 max_length=max_length, seed=seed, n_source=len(source), n_target=len(target), autocast=autocast)
    meta = {"method": "lineas", **model_meta(model), "hyperparams": hyper,
            "train": {**history, "fit_seconds": round(fit_seconds, 3)}}
    return Steering(scale, shift_d, meta)
