"""lineas_fast — learn per-neuron affine steering maps (LinEAS, AcT) and apply them with near-zero overhead.

The public API (SPEC §3)::

    import lineas_fast as lf
    model, tok = lf.load_model("smollm2-135m")
    st = lf.fit(model, tok, source=lf.data.load_texts("toxic"), target=lf.data.load_texts("wiki"))
    with lf.steered(model, st, strength=1.0):
        model.generate(...)
"""

from . import data
from ._version import __version__
from .backends import env_report
from .collect import collect
from . import diffusion
from .diffusion import collect_diffusion
from .errors import SteeringError
from .methods import fit
from .models import load_model
from . import evaluate
from .patching import bake, steer_, steered
from .patching.handle import SteerHandle
from .sites import resolve_sites
from .steering import Steering, compose

__all__ = ["Steering", "SteerHandle", "SteeringError", "__version__", "bake", "collect", "collect_diffusion", "compose",
           "data", "diffusion", "env_report",
           "evaluate", "fit", "load_model", "resolve_sites", "steer_", "steered"]
