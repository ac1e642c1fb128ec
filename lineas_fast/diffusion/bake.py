"""``bake`` for a diffusers pipeline: fold a steering into the existing weights for good.

Stock diffusers rebuilds every module from its config, so a parameter the fold would have to create
(an affine for a DiT block's parameter-free LayerNorm, a bias on a bias-free Linear/Conv2d) would be
dropped on reload: such sites are refused by name and the pipeline is left exactly as it was.
"""

from __future__ import annotations

from ..errors import SteeringError
from ..patching.fold import fold_into


def bake_pipeline(pipe, view, steering, strength: float, refuse_clamped):
    """Fold ``steering`` at ``strength`` into ``pipe``'s denoiser / text encoders; returns ``pipe``."""
    if getattr(view, "_lineas_fast_handle", None) is not None:
        raise SteeringError("pipeline is currently steered: remove() the handle before baking")
    steering.check_model(view)
    refuse_clamped(steering, "bake()")
    editor = fold_into(view, steering.sites, steering.scale, steering.shift, float(strength))
    created = editor.created
    if created:
        editor.restore()
        names = sorted({f"{m}.{attr}" for m, attr in created})
        raise SteeringError(f"cannot bake into a stock diffusers checkpoint: the fold needs parameters these "
                            f"modules do not have: {names[:4]}" + (f" +{len(names) - 4} more" if len(names) > 4 else "")
                            + " (apply with steer_ instead, or choose sites with affine norms / biases)")
    return pipe
