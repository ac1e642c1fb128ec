"""Running a text-to-image pipeline for activations: the pipeline's own ``__call__``, cut short.

:func:`call_pipeline` runs the real pipeline code (prompt encoding, latent preparation, scheduler,
classifier-free guidance), so whatever a pipeline class does, the activations are the ones it produces;
a forward hook on the denoiser ends the call after the requested number of denoising steps (the VAE
decode never runs). With ``grad=True`` the pipeline's ``torch.no_grad`` decorator is bypassed so a fit
can backpropagate from the denoiser's sites to the steering maps.

:func:`collect_diffusion` pools site tensors per prompt: over spatial positions (``[B, C, H, W]``) or
tokens (``[B, T, C]``), from the conditional half of a CFG batch, for the first ``steps`` denoising
steps (then averaged over steps, or stacked as separate samples). Text-encoder sites are read from the
prompt's own encoding (the first text-encoder call; the negative prompt's call is skipped).
"""

from __future__ import annotations

import inspect

import torch
from tqdm.auto import tqdm

from ..forward import StopForward, tap
from ..data import check_texts
from ..errors import SteeringError
from ..views import view_of

POOLINGS = ("mean", "tokens")
TIMESTEP_POOLINGS = ("mean", "stack")
PROBE_LATENT = 8  # latent side of a shape probe (divisible by every UNet's downsampling)


def _size_kwargs(pipe, size) -> dict:
    params = inspect.signature(type(pipe).__call__).parameters
    kw = {}
    if size is not None:
        if size == "probe":
            side = PROBE_LATENT * int(getattr(pipe, "vae_scale_factor", 8))
            size = (side, side)
        kw["height"], kw["width"] = int(size[0]), int(size[1])
        if "use_resolution_binning" in params:  # binning would snap to the model's trained aspect ratios
            kw["use_resolution_binning"] = False
    return kw


def call_pipeline(pipe, prompts: list[str], *, steps: int = 1, guidance_scale: float | None = None,
                  num_inference_steps: int | None = None, seed: int = 0, size=None, grad: bool = False,
                  pipe_kwargs: dict | None = None) -> None:
    """Run ``pipe(prompts, ...)`` up to the end of denoising step ``steps`` (or an earlier StopForward)."""
    view = view_of(pipe)
    den = getattr(view, view.denoiser)
    calls = {"n": 0}

    def after_denoiser(module, args, output):
        calls["n"] += 1
        if calls["n"] >= steps:
            raise StopForward

    kw = dict(prompt=list(prompts), output_type="latent", generator=torch.Generator().manual_seed(seed),
              **_size_kwargs(pipe, size), **(pipe_kwargs or {}))
    if guidance_scale is not None:
        kw["guidance_scale"] = float(guidance_scale)
    if num_inference_steps is not None:
        kw["num_inference_steps"] = int(num_inference_steps)
    fn = type(pipe).__call__
    if grad:
        fn = inspect.unwrap(fn)  # __call__ is wrapped in torch.no_grad
    handle = den.register_forward_hook(after_denoiser)
    try:
        fn(pipe, **kw)
    except StopForward:
        pass
    finally:
        handle.remove()


def pool_site(h: torch.Tensor, how: str) -> torch.Tensor:
    """Per-row samples of a site tensor: ``mean`` → ``[B, C]``; ``tokens`` → every spatial position or
    token a sample, ``[B·positions, C]`` (row-major per prompt). Channels: dim 1 of 4-D, else last."""
    if h.ndim == 4:
        return h.mean((2, 3)) if how == "mean" else h.permute(0, 2, 3, 1).reshape(-1, h.shape[1])
    if h.ndim == 3:
        return h.mean(1) if how == "mean" else h.reshape(-1, h.shape[-1])
    if h.ndim == 2:
        return h
    raise SteeringError(f"site tensor of shape {tuple(h.shape)}: expected [B, C], [B, T, C] or [B, C, H, W]")


class SiteRecorder:
    """Tap callback that keeps, per site and call, the pooled conditional rows of one pipeline call."""

    def __init__(self, view, n_prompts: int, pooling: str, on_value=None):
        self.view, self.n, self.pooling, self.on_value = view, n_prompts, pooling, on_value
        self.values: dict[str, list[torch.Tensor]] = {}

    def cond_rows(self, site: str, h: torch.Tensor) -> torch.Tensor:
        if self.view.is_denoiser_site(site) and h.shape[0] == 2 * self.n:
            return h[self.n:]  # CFG batch: [negative | positive]
        if h.shape[0] != self.n:
            raise SteeringError(f"site {site!r}: batch of {h.shape[0]} rows for {self.n} prompts")
        return h

    def __call__(self, site: str, h: torch.Tensor):
        new = self.on_value(site, h) if self.on_value is not None else None
        out = h if new is None else new
        calls = self.values.setdefault(site, [])
        if not self.view.is_denoiser_site(site) and calls:
            return new  # text encoders: the prompt's own encoding only (first call)
        calls.append(pool_site(self.cond_rows(site, out).float(), self.pooling))
        return new


def collect_diffusion(pipe, prompts, sites="norms", *, steps: int = 1, timestep_pooling: str = "mean",
                      pooling: str = "mean", batch_size: int = 8, guidance_scale: float | None = None,
                      num_inference_steps: int | None = None, seed: int = 0, size=None,
                      pipe_kwargs: dict | None = None, progress: bool = False) -> dict[str, torch.Tensor]:
    """Pooled activations ``{site: float32 CPU [N, C]}`` of a text-to-image pipeline.

    Args:
        sites: a preset of :mod:`lineas_fast.diffusion.view`, a regex, or site names (``unet.…``).
        steps: denoising steps to read (default 1, the first — as AcT does for single-step models).
        timestep_pooling: ``mean`` over the steps (one row per prompt) or ``stack`` (one row per prompt
            and step; within each batch of prompts, step-major).
        pooling: ``mean`` over spatial positions/tokens, or ``tokens`` (each position a sample).
        guidance_scale, num_inference_steps, size (``(height, width)``), pipe_kwargs: passed to the pipeline.
        seed: the latents' noise (each batch of prompts uses ``seed + batch index``).
    """
    prompts = check_texts(prompts, "prompts")
    if pooling not in POOLINGS:
        raise SteeringError(f"pooling={pooling!r}: diffusion sites pool as one of {POOLINGS}")
    if timestep_pooling not in TIMESTEP_POOLINGS:
        raise SteeringError(f"timestep_pooling={timestep_pooling!r}: expected one of {TIMESTEP_POOLINGS}")
    if int(steps) < 1:
        raise SteeringError(f"steps={steps!r}: need at least one denoising step")
    view = view_of(pipe)
    site_list = view.resolve(sites)
    chunks = [prompts[i:i + batch_size] for i in range(0, len(prompts), batch_size)]
    per_site: dict[str, list] = {s: [] for s in site_list}
    with torch.no_grad():
        for b, chunk in enumerate(tqdm(chunks, desc="collect", disable=not progress, leave=False)):
            rec = SiteRecorder(view, len(chunk), pooling)
            with tap(view, site_list, rec, stop_early=False):
                call_pipeline(pipe, chunk, steps=steps, guidance_scale=guidance_scale,
                              num_inference_steps=num_inference_steps, seed=seed + b, size=size,
                              pipe_kwargs=pipe_kwargs)
            for s in site_list:
                calls = rec.values.get(s)
                if not calls:
                    raise SteeringError(f"site {s!r} is never reached by {type(pipe).__name__}")
                if timestep_pooling == "mean":
                    per_site[s].append(torch.stack(calls).mean(0).cpu())
                else:
                    per_site[s].append(torch.cat(calls).cpu())
    out = {s: torch.cat(v) for s, v in per_site.items()}
    for s, v in out.items():
        if not torch.isfinite(v).all():
            raise SteeringError(f"site {s!r}: activations contain NaN or inf")
    return out
