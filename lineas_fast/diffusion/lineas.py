"""LinEAS on a text-to-image pipeline: every site trained jointly, end to end (SPEC §2).

Targets are pooled once, unsteered, with :func:`~lineas_fast.diffusion.run.collect_diffusion`. The
training forward (:class:`PipelineForward`) runs prompts through the pipeline's own code with the current
maps applied at every site (text-encoder sites change what the denoiser is conditioned on; earlier
denoiser sites change what later ones see), pools the steered sites per prompt, and stops right after the
last site of the first denoising step. Everything else — loss, Adam, schedule, prox, stopping rule — is
the one LinEAS loop of :mod:`lineas_fast.methods.trainer`. The fit runs without classifier-free guidance:
the first step's conditional activations are the same with or without it, at half the compute.
"""

from __future__ import annotations

import time

import torch

from ..forward import tap
from ..errors import SteeringError
from ..methods.common import check_prompt_sets, model_meta
from ..methods.trainer import FrozenModel, Recipe, Targets, site_slices, train_maps
from ..sites import site_widths
from ..steering import Steering
from .run import POOLINGS, SiteRecorder, call_pipeline, collect_diffusion

DEFAULTS = dict(sites="norms", pooling="mean", steps=40, lr=3e-3, schedule="constant", lr_end=1e-3,
                betas=(0.9, 0.999), l1=0.0, group_l2=0.0, batch_size=32, normalize="var", optimizer="adam",
                preserve=0.0, tol=0.0, window=20, refit_steps=0, density=1.0, seed=0)


class _FrozenComponents(FrozenModel):
    """As for an LLM, plus each module's own train/eval flag restored (components differ: a pipeline
    built from configs leaves them in train mode)."""

    def __enter__(self):
        self.modes = [(m, m.training) for m in self.model.modules()]
        super().__enter__()

    def __exit__(self, *exc):
        super().__exit__(*exc)
        for m, flag in self.modes:
            m.training = flag


class PipelineForward:
    """A training forward (:mod:`lineas_fast.methods.trainer`) through a pipeline: micro-batches of prompts,
    each one pipeline call cut after the first denoising step's last site, one pooled row per prompt."""

    def __init__(self, view, texts, sites, slices, *, pooling, micro_batch, seed, run):
        self.view, self.texts, self.sites, self.slices = view, texts, sites, slices
        self.pooling, self.micro_batch, self.seed, self.run = pooling, micro_batch, seed, run

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return None

    def bind(self, omega, shift) -> None:
        self.omega, self.shift = omega, shift

    def _steer(self, site, h):
        sl = self.slices[site]
        shape = (1, -1, 1, 1) if h.ndim == 4 else (-1,)  # channels: dim 1 of conv features, else last
        return (h.float() * self.omega[sl].view(shape) + self.shift[sl].view(shape)).to(h.dtype)

    def __call__(self, prompts: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        pooled = {s: [] for s in self.sites}
        for b in range(0, len(prompts), self.micro_batch):
            chunk = [self.texts[i] for i in prompts[b:b + self.micro_batch]]
            rec = SiteRecorder(self.view, len(chunk), self.pooling, on_value=self._steer)
            with tap(self.view, self.sites, rec):
                call_pipeline(self.view.pipe, chunk, steps=1, guidance_scale=1.0,
                              seed=self.seed + b // self.micro_batch, grad=True, **self.run)
            for s in self.sites:
                if not rec.values.get(s):
                    raise SteeringError(f"site {s!r} is never reached by {type(self.view.pipe).__name__}")
                pooled[s].append(rec.values[s][0])
        z = torch.cat([torch.cat(pooled[s]) for s in self.sites], dim=1)
        rows = z.shape[0] // len(prompts)  # token pooling: every position of a prompt is a row
        return z, torch.tensor(prompts, device=z.device).repeat_interleave(rows)


def fit_lineas_pipeline(view, source, target, *, sites=DEFAULTS["sites"], pooling=DEFAULTS["pooling"],
                        steps=DEFAULTS["steps"], lr=DEFAULTS["lr"], schedule=DEFAULTS["schedule"],
                        lr_end=DEFAULTS["lr_end"], betas=DEFAULTS["betas"], l1=DEFAULTS["l1"],
                        group_l2=DEFAULTS["group_l2"], batch_size=DEFAULTS["batch_size"],
                        normalize=DEFAULTS["normalize"], optimizer=DEFAULTS["optimizer"],
                        preserve=DEFAULTS["preserve"], tol=DEFAULTS["tol"], window=DEFAULTS["window"],
                        refit_steps=DEFAULTS["refit_steps"], density=DEFAULTS["density"], seed=DEFAULTS["seed"],
                        micro_batch: int = 8,
                        num_inference_steps: int | None = None,
                        size=None, pipe_kwargs: dict | None = None, progress: bool = True) -> Steering:
    """Fit LinEAS maps on a pipeline's sites (``view`` from :func:`~lineas_fast.diffusion.view_of`).

    Options as for the LLM fit, plus ``num_inference_steps`` (the schedule whose first step is used),
    ``size`` (``(height, width)``; default the pipeline's) and ``pipe_kwargs`` (extra pipeline arguments).
    """
    source, target = check_prompt_sets(source, target)
    if pooling not in POOLINGS:
        raise SteeringError(f"pooling={pooling!r}: diffusion sites pool as one of {POOLINGS}")
    recipe = Recipe(steps=steps, lr=lr, schedule=schedule, lr_end=lr_end, betas=tuple(betas) if isinstance(
        betas, (list, tuple)) else betas, optimizer=optimizer, batch_size=batch_size, l1=l1, group_l2=group_l2,
        normalize=normalize, preserve=preserve, tol=tol, window=window, refit_steps=refit_steps,
        density=density, seed=seed)
    recipe.validate()
    if isinstance(micro_batch, bool) or not isinstance(micro_batch, int) or micro_batch < 1:
        raise SteeringError(f"micro_batch={micro_batch!r}: expected an integer >= 1")
    pipe = view.pipe
    site_list = view.resolve(sites)
    widths = site_widths(view, site_list)
    slices, _ = site_slices(site_list, widths)
    device = next(getattr(view, view.denoiser).parameters()).device
    run = dict(num_inference_steps=num_inference_steps, size=size, pipe_kwargs=pipe_kwargs)
    t0 = time.perf_counter()

    v = collect_diffusion(pipe, target, site_list, pooling=pooling, batch_size=micro_batch, seed=seed + 10_000,
                          guidance_scale=1.0, progress=progress, **run)
    v = torch.cat([v[s] for s in site_list], dim=1)
    targets = Targets.from_counts(v, [v.shape[0] // len(target)] * len(target))
    texts = source + (target if preserve > 0 else [])
    forward = PipelineForward(view, texts, site_list, slices, pooling=pooling, micro_batch=micro_batch, seed=seed,
                              run=run)
    with _FrozenComponents(view):
        omega, shift, history = train_maps(forward, n_source=len(source), targets=targets, slices=slices,
                                           recipe=recipe, device=device, progress=progress,
                                           desc="LinEAS (pipeline)", shift_ref=None)

    hyper = dict(sites=sites if isinstance(sites, str) else list(sites), pooling=pooling, **recipe.hyperparams(),
                 num_inference_steps=num_inference_steps, size=list(size) if size else None,
                 n_source=len(source), n_target=len(target))
    meta = {"method": "lineas", **model_meta(view), "hyperparams": hyper,
            "train": {**history, "fit_seconds": round(time.perf_counter() - t0, 3)}}
    return Steering({s: omega[slices[s]].cpu() for s in site_list},
                    {s: shift[slices[s]].cpu() for s in site_list}, meta)
