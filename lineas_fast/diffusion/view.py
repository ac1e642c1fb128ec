"""A diffusers pipeline seen as one steerable module tree.

A pipeline is not an ``nn.Module``: its denoiser (``unet`` or ``transformer``) and text encoders are
separate components. :class:`PipelineView` registers those components (the same objects, nothing
copied) under one root, so every site is a module name prefixed by its component —
``unet.down_blocks.0.resnets.0.norm1``, ``transformer.transformer_blocks.3.norm1``,
``text_encoder.text_model.encoder.layers.0.layer_norm1`` — and every apply mode (hooks, fold, fused),
``collect`` and the fitting methods work on it unchanged. The view is cached on the pipeline, so a
second ``steer_`` sees the first one's handle.

Site presets on a view (the denoiser's blocks; per channel: dim 1 of ``[B, C, H, W]`` conv features,
the last dim of ``[B, T, C]`` token features):

* ``norms`` — the normalisation modules inside the denoiser's blocks (ResNet GroupNorms, the
  transformer blocks' LayerNorms; not per-head q/k norms, not the final output norm);
* ``resnet_out`` — ResNet block outputs; ``attn_out`` — attention outputs; ``mlp_out`` — feed-forward
  outputs; ``mlp_hidden`` — the feed-forward hidden neurons (input of its output Linear);
* ``text_norms`` — the norms inside the text encoders' layers.
"""

from __future__ import annotations

import inspect
import re
from contextlib import contextmanager
from types import SimpleNamespace

import torch
from torch import nn

from ..errors import SteeringError
from ..sites import Site, check_sites, decoder_blocks, match_names
from ..views import ModelView
from .run import call_pipeline, collect_diffusion

DENOISERS = ("unet", "transformer")
TEXT_ENCODERS = ("text_encoder", "text_encoder_2", "text_encoder_3")
PRESETS = ("norms", "resnet_out", "attn_out", "mlp_out", "mlp_hidden", "text_norms")
RUN_OPTIONS = ("size", "num_inference_steps", "guidance_scale", "pipe_kwargs", "denoise_steps", "timestep_pooling")
_CACHE = "_lineas_fast_view"
_IN_BLOCKS = re.compile(r"(^|\.)(down_blocks|up_blocks|mid_block|transformer_blocks|single_transformer_blocks)\.")
_QK_NORM = re.compile(r"norm_(added_)?[qk]$")


def is_pipeline(obj) -> bool:
    """Duck-typed diffusers ``DiffusionPipeline`` (components dict, not a module)."""
    return not isinstance(obj, nn.Module) and isinstance(getattr(obj, "components", None), dict)


def pipeline_view(obj) -> "PipelineView | None":
    """The adapter :mod:`lineas_fast.diffusion` registers with :func:`lineas_fast.views.register_view`."""
    return view_of(obj) if is_pipeline(obj) else None


def view_of(pipe) -> "PipelineView":
    view = pipe.__dict__.get(_CACHE)
    if view is None or not view.matches(pipe):
        if view is not None and getattr(view, "_lineas_fast_handle", None) is not None:
            raise SteeringError("the pipeline's components were replaced while it is steered: remove() first")
        view = PipelineView(pipe)
        object.__setattr__(pipe, _CACHE, view)  # plain attribute: not a pipeline component or config entry
    return view


class PipelineView(ModelView):
    """The denoiser and text encoders of ``pipe`` under one root (see the module docstring)."""

    def __init__(self, pipe):
        super().__init__()
        object.__setattr__(self, "pipe", pipe)  # not a submodule
        object.__setattr__(self, "owner", pipe)
        comps = pipe.components
        self.denoiser = next((n for n in DENOISERS if isinstance(comps.get(n), nn.Module)), None)
        if self.denoiser is None:
            raise SteeringError(f"{type(pipe).__name__}: no 'unet' or 'transformer' component to steer")
        for name in (self.denoiser, *TEXT_ENCODERS):
            if isinstance(comps.get(name), nn.Module):
                self.add_module(name, comps[name])
        den = comps[self.denoiser]
        self.config = SimpleNamespace(model_type=f"diffusers:{type(den).__name__}",
                                      name_or_path=str(getattr(pipe, "name_or_path", "") or ""))
        self.model_class = type(pipe).__name__
        self.layout = (1, 1)  # (CFG halves, images per prompt) of the pipeline call under way
        self.run_options: dict = {}  # collect_diffusion arguments for collect() on this view (see options)

    def matches(self, pipe) -> bool:
        return all(pipe.components.get(n) is m for n, m in self.named_children())

    # ------------------------------------------------------------------ sites
    def resolve(self, sites) -> list[str]:
        """Preset (:data:`PRESETS`), regex, or list of site names → site strings in module order."""
        if isinstance(sites, str) and sites in PRESETS:
            out = self._preset(sites)
            if not out:
                raise SteeringError(f"sites={sites!r}: {self.model_class} has no such modules")
        else:
            out = match_names(self, sites, PRESETS)
        check_sites(self, out)
        order = {n: i for i, (n, _) in enumerate(self.named_modules())}
        return sorted(dict.fromkeys(out), key=lambda s: order[Site.parse(s).module])

    def _preset(self, preset: str) -> list[str]:
        if preset == "text_norms":
            return [s for name in TEXT_ENCODERS if hasattr(self, name) for s in _text_norms(self, name)]
        den, out = self.denoiser, []
        for name, m in getattr(self, den).named_modules():
            if not _IN_BLOCKS.search(name + "."):
                continue
            cls = type(m).__name__
            if preset == "norms" and "norm" in cls.lower() and not any(True for _ in m.children()) \
                    and not _QK_NORM.search(name):
                out.append(f"{den}.{name}")
            elif preset == "resnet_out" and "resnet" in cls.lower():
                out.append(f"{den}.{name}")
            elif preset == "attn_out" and cls.endswith("Attention") and hasattr(m, "to_q"):
                joint = getattr(m, "added_kv_proj_dim", None) is not None  # joint attention: (image, text)
                out.append(f"{den}.{name}" + (":0" if joint else ""))
            elif preset in ("mlp_out", "mlp_hidden") and cls == "FeedForward":
                if preset == "mlp_out":
                    out.append(f"{den}.{name}")
                else:
                    last = [n for n, c in m.named_modules() if isinstance(c, nn.Linear)][-1]
                    out.append(f"{den}.{name}.{last}:in")
        return out

    def is_denoiser_site(self, site: str) -> bool:
        return site.startswith(self.denoiser + ".")

    # ------------------------------------------------------------------ running
    @contextmanager
    def options(self, **kwargs):
        """Pipeline-call options (:data:`RUN_OPTIONS`) that ``collect`` on this view uses meanwhile, e.g.
        for the AcT methods: ``size``, ``num_inference_steps``, ``guidance_scale``, ``pipe_kwargs``,
        ``denoise_steps`` (steps read) and ``timestep_pooling``."""
        bad = sorted(set(kwargs) - set(RUN_OPTIONS))
        if bad:
            raise SteeringError(f"unknown pipeline option(s) {bad}: expected some of {RUN_OPTIONS}")
        saved, self.run_options = self.run_options, {**self.run_options, **kwargs}
        try:
            yield self
        finally:
            self.run_options = saved

    def probe_run(self) -> None:
        """One cheap pipeline call (1 prompt, 1 denoising step, the smallest latent) for shape probes."""
        call_pipeline(self.pipe, ["a"], steps=1, guidance_scale=1.0, size="probe")

    def collect(self, texts, sites, *, pooling: str, batch_size: int, progress: bool) -> dict:
        """:func:`~.run.collect_diffusion` with the pipeline options set by :meth:`options`."""
        opts = dict(self.run_options)
        opts["steps"] = opts.pop("denoise_steps", 1)
        return collect_diffusion(self.pipe, texts, sites, pooling=pooling, batch_size=batch_size, progress=progress,
                                 **opts)

    def fit(self, method: str, fitter, tok, source, target, **kwargs):
        """LinEAS through the pipeline's own call (:mod:`.lineas`); the local fitters through :meth:`collect`
        with the pipeline options (:data:`RUN_OPTIONS`) taken out of ``kwargs``."""
        if method == "lineas":
            from .lineas import fit_lineas_pipeline

            return fit_lineas_pipeline(self, source, target, **kwargs)
        with self.options(**{k: kwargs.pop(k) for k in RUN_OPTIONS if k in kwargs}):
            return fitter(self, tok, source, target, **kwargs)

    def bake(self, steering, strength: float, refuse_clamped):
        from .bake import bake_pipeline

        return bake_pipeline(self.pipe, self, steering, strength, refuse_clamped)

    def per_prompt_needs_hooks(self) -> bool:
        return True  # the fused kernels expand rows for generate(), not for a CFG-doubled denoiser batch

    def forward(self, *args, **kwargs):
        raise SteeringError("a PipelineView is not callable: call the pipeline itself")

    # ------------------------------------------------------------------ routing layout
    def track_layout(self):
        """Wrap the pipeline's ``encode_prompt`` (on this instance) to learn, per call, whether the
        denoiser batch is CFG-doubled and how many images each prompt gets; returns the undo callable."""
        pipe = self.pipe
        if not hasattr(pipe, "encode_prompt") or "encode_prompt" in pipe.__dict__:
            return lambda: None
        original = pipe.encode_prompt
        sig = inspect.signature(original)

        def encode_prompt(*args, **kwargs):
            try:
                bound = sig.bind(*args, **kwargs)
                bound.apply_defaults()
                cfg = bool(bound.arguments.get("do_classifier_free_guidance", False))
                k = int(bound.arguments.get("num_images_per_prompt", 1) or 1)
                self.layout = (2 if cfg else 1, k)
            except TypeError:
                self.layout = (1, 1)
            return original(*args, **kwargs)

        object.__setattr__(pipe, "encode_prompt", encode_prompt)
        return lambda: pipe.__dict__.pop("encode_prompt", None)

    def row_index(self, site: str, batch: int, rows: int):
        """Per-row table entry for a denoiser batch laid out ``[negative | positive] × prompts × images``;
        None where the plain expansion rule applies (text encoders, or a batch that is not that layout)."""
        halves, k = self.layout
        if not self.is_denoiser_site(site) or rows == 1 or batch != halves * k * rows or halves == 1:
            return None
        return (torch.arange(batch) % (batch // halves)) // k


def _text_norms(view: PipelineView, name: str) -> list[str]:
    encoder = getattr(view, name)
    try:
        prefix, blocks = decoder_blocks(encoder)
    except SteeringError:
        return []
    return [f"{name}.{prefix}.{i}.{n}" for i, block in enumerate(blocks) for n, m in block.named_modules()
            if n and "norm" in type(m).__name__.lower() and not any(True for _ in m.children())]
