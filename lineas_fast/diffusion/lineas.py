"""LinEAS on a text-to-image pipeline: every site trained jointly, end to end (SPEC §2).

Targets are pooled once, unsteered, with :func:`~lineas_fast.diffusion.run.collect_diffusion`. Each
step runs the source prompts through the pipeline's own code with the current maps applied at every
site (text-encoder sites change what the denoiser is conditioned on; earlier denoiser sites change
what later ones see), pools the steered sites per prompt, and stops right after the last site of the
first denoising step; one Wasserstein loss over all sites, Adam, then the sparse-group-lasso prox.
The fit runs without classifier-free guidance: the first step's conditional activations are the same
with or without it, at half the compute.
"""

from __future__ import annotations

import time

import torch
from tqdm.auto import tqdm

from ..collect import tap
from ..errors import SteeringError
from ..losses import column_weights, wasserstein_loss
from ..methods.common import check_prompt_sets, model_meta
from ..methods.lineas import _FrozenModel
from ..methods.prox import prox_sparse_group, step_sizes
from ..sites import site_widths
from ..steering import Steering
from .run import POOLINGS, SiteRecorder, call_pipeline, collect_diffusion

DEFAULTS = dict(sites="norms", pooling="mean", steps=40, lr=3e-3, l1=0.0, group_l2=0.0, batch_size=32,
                normalize="var", optimizer="adam", seed=0)


class _FrozenComponents(_FrozenModel):
    """As for an LLM, plus each module's own train/eval flag restored (components differ: a pipeline
    built from configs leaves them in train mode)."""

    def __enter__(self):
        self.modes = [(m, m.training) for m in self.model.modules()]
        super().__enter__()

    def __exit__(self, *exc):
        super().__exit__(*exc)
        for m, flag in self.modes:
            m.training = flag


def fit_lineas_pipeline(view, source, target, *, sites=DEFAULTS["sites"], pooling=DEFAULTS["pooling"],
                        steps=DEFAULTS["steps"], lr=DEFAULTS["lr"], l1=DEFAULTS["l1"],
                        group_l2=DEFAULTS["group_l2"], batch_size=DEFAULTS["batch_size"],
                        normalize=DEFAULTS["normalize"], optimizer=DEFAULTS["optimizer"], seed=DEFAULTS["seed"],
                        micro_batch: int = 8, num_inference_steps: int | None = None, size=None,
                        pipe_kwargs: dict | None = None, progress: bool = True) -> Steering:
    """Fit LinEAS maps on a pipeline's sites (``view`` from :func:`~lineas_fast.diffusion.view_of`).

    Options as for the LLM fit, plus ``num_inference_steps`` (the schedule whose first step is used),
    ``size`` (``(height, width)``; default the pipeline's) and ``pipe_kwargs`` (extra pipeline arguments).
    """
    source, target = check_prompt_sets(source, target)
    if pooling not in POOLINGS:
        raise SteeringError(f"pooling={pooling!r}: diffusion sites pool as one of {POOLINGS}")
    if optimizer not in ("adam", "sgd"):
        raise SteeringError(f"optimizer={optimizer!r}: expected 'adam' or 'sgd'")
    if steps < 0 or lr <= 0 or l1 < 0 or group_l2 < 0 or batch_size < 2 or micro_batch < 1:
        raise SteeringError(f"need steps >= 0, lr > 0, l1 >= 0, group_l2 >= 0, batch_size >= 2, micro_batch >= 1 "
                            f"(got {steps}, {lr}, {l1}, {group_l2}, {batch_size}, {micro_batch})")
    pipe = view.pipe
    site_list = view.resolve(sites)
    widths = site_widths(view, site_list)
    slices, offset = {}, 0
    for s in site_list:
        slices[s] = slice(offset, offset + widths[s])
        offset += widths[s]
    device = next(getattr(view, view.denoiser).parameters()).device
    run = dict(num_inference_steps=num_inference_steps, size=size, pipe_kwargs=pipe_kwargs)
    t0 = time.perf_counter()

    v = collect_diffusion(pipe, target, site_list, pooling=pooling, batch_size=micro_batch, seed=seed + 10_000,
                          guidance_scale=1.0, progress=progress, **run)
    v = torch.cat([v[s] for s in site_list], dim=1).to(device)
    v_sorted = torch.sort(v, dim=0).values
    weights = column_weights(v, normalize)

    gen = torch.Generator().manual_seed(seed)
    omega = torch.ones(offset, device=device, requires_grad=True)
    shift = torch.zeros(offset, device=device, requires_grad=True)
    opt = (torch.optim.Adam if optimizer == "adam" else torch.optim.SGD)([omega, shift], lr=lr)
    history = {"loss": [], "nnz": [], "active_sites": []}

    def steer(site, h):
        sl = slices[site]
        shape = (1, -1, 1, 1) if h.ndim == 4 else (-1,)  # channels: dim 1 of conv features, else last
        return (h.float() * omega[sl].view(shape) + shift[sl].view(shape)).to(h.dtype)

    bar = tqdm(range(steps), desc="LinEAS (pipeline)", disable=not progress)
    with _FrozenComponents(view):
        for _ in bar:
            rows = list(range(len(source))) if batch_size >= len(source) else \
                torch.randperm(len(source), generator=gen)[:batch_size].tolist()
            pooled = {s: [] for s in site_list}
            for b in range(0, len(rows), micro_batch):
                chunk = [source[i] for i in rows[b:b + micro_batch]]
                rec = SiteRecorder(view, len(chunk), pooling, on_value=steer)
                with tap(view, site_list, rec):
                    call_pipeline(pipe, chunk, steps=1, guidance_scale=1.0, seed=seed + b // micro_batch, grad=True,
                                  **run)
                for s in site_list:
                    if not rec.values.get(s):
                        raise SteeringError(f"site {s!r} is never reached by {type(pipe).__name__}")
                    pooled[s].append(rec.values[s][0])
            z = torch.cat([torch.cat(pooled[s]) for s in site_list], dim=1)
            if not torch.isfinite(z).all():
                bad = next(s for s in site_list if not torch.isfinite(z[:, slices[s]]).all())
                raise SteeringError(f"site {bad!r}: NaN or inf in steered activations during fit (lower lr={lr})")
            loss = wasserstein_loss(z, v_sorted, weights)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            prox_sparse_group(omega.data, shift.data, step_sizes(opt, omega), step_sizes(opt, shift), l1, group_l2,
                              list(slices.values()))
            with torch.no_grad():
                off = (omega != 1).int() + (shift != 0).int()
                history["nnz"].append(int(off.sum()))
                history["active_sites"].append(sum(int(off[sl].any()) for sl in slices.values()))
            history["loss"].append(loss.item())
            bar.set_postfix(loss=f"{history['loss'][-1]:.4g}", nnz=history["nnz"][-1])

    hyper = dict(sites=sites if isinstance(sites, str) else list(sites), pooling=pooling, steps=steps, lr=lr, l1=l1,
                 group_l2=group_l2, batch_size=batch_size, normalize=normalize, optimizer=optimizer, seed=seed,
                 num_inference_steps=num_inference_steps, size=list(size) if size else None,
                 n_source=len(source), n_target=len(target))
    meta = {"method": "lineas", **model_meta(view), "hyperparams": hyper,
            "train": {**history, "fit_seconds": round(time.perf_counter() - t0, 3)}}
    return Steering({s: omega.detach()[slices[s]].cpu() for s in site_list},
                    {s: shift.detach()[slices[s]].cpu() for s in site_list}, meta)
