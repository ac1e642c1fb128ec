"""Text-to-image steering with diffusers pipelines (see :mod:`lineas_fast.diffusion.view` for sites).

``lf.fit(pipe, None, source=..., target=...)``, ``lf.steer_(pipe, st)``, ``lf.bake(pipe, st)`` and
``lf.collect(pipe, None, prompts, ...)`` take a pipeline wherever they take a model: the pipeline's
denoiser and text encoders are steered in place through a :class:`PipelineView`, the model view
(:mod:`lineas_fast.views`) this package registers when imported.
"""

from ..views import as_model, register_view
from .run import call_pipeline, collect_diffusion
from .view import PRESETS, PipelineView, is_pipeline, pipeline_view, view_of

register_view(pipeline_view)

__all__ = ["PRESETS", "PipelineView", "as_model", "call_pipeline", "collect_diffusion", "is_pipeline", "view_of"]
