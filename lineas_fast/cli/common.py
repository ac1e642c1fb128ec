"""What the command modules share: printing, argument checks, loading a model or a steering, the help
formatter and the shared argument groups (the ``common`` parent parser with ``--threads``, and the
text-to-image ``--pipeline`` group of ``fit`` and ``generate``).

Importing this module imports no torch: the loaders import their libraries when called.
"""

from __future__ import annotations

import argparse
import time
from contextlib import contextmanager
from pathlib import Path

from ..defaults import DEFAULT_MODEL
from ..errors import SteeringError


def say(msg: str = "") -> None:
    print(msg, flush=True)


def secs(t0: float) -> float:
    return time.perf_counter() - t0


# ------------------------------------------------------------------ argument helpers


def strengths(text: str) -> list[float]:
    try:
        vals = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise SteeringError(f"--strengths {text!r}: expected comma-separated numbers, e.g. 0,0.5,1") from None
    if not vals:
        raise SteeringError("--strengths: give at least one strength, e.g. 0,0.5,1")
    return vals


def positive(name: str, value) -> None:
    if value is not None and value <= 0:
        raise SteeringError(f"{name}={value}: must be positive")


def sites_arg(values):
    """``--sites norms`` → "norms"; ``--sites a b`` → ["a", "b"]; absent → None."""
    if not values:
        return None
    return values[0] if len(values) == 1 else list(values)


# ------------------------------------------------------------------ loading


def model_for(steering, explicit: str | None) -> str:
    """The model to load for an artifact: ``--model`` if given, else the one its metadata names."""
    from ..models import EMBEDDED

    if explicit:
        return explicit
    name = steering.meta.get("name_or_path") or ""
    if not name:
        return DEFAULT_MODEL
    if name in EMBEDDED or Path(name).is_dir():
        return name
    raise SteeringError(f"the steering was fitted on model {name!r}, which is not available here: pass --model")


@contextmanager
def no_hf_bars():
    """Silence transformers' sub-second "Loading weights" bar (our own line reports the load)."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()


def load_model(name: str):
    from ..models import load_model as load

    t0 = time.perf_counter()
    with no_hf_bars():
        model, tok = load(name)
    say(f"loaded {name} ({type(model).__name__}, {sum(p.numel() for p in model.parameters()) / 1e6:.0f}M params) "
        f"in {secs(t0):.1f} s")
    return model, tok


def load_steering(path: str):
    from ..steering import Steering

    return Steering.load(path)


def steering_cells(st) -> dict:
    train = st.meta.get("train") or {}
    return {"fit_seconds": train.get("fit_seconds"), "nnz": st.nnz(), "active_sites": len(st.active_sites()),
            "total_sites": len(st.sites)}


# ------------------------------------------------------------------ parser pieces


class HelpFormatter(argparse.HelpFormatter):
    """Shows ``(default: X)`` where an option has a real default not already stated in its help."""

    def _get_help_string(self, action):
        text = action.help or ""
        if (action.default not in (None, False, argparse.SUPPRESS) and "default" not in text
                and action.option_strings):
            text += " (default: %(default)s)"
        return text


def common_parser() -> argparse.ArgumentParser:
    """The parent parser of every command: the options each command accepts."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--threads", type=int, default=None, metavar="N",
                        help="torch CPU threads (default: torch's choice, one per physical core; use 1 when "
                             "other heavy processes share the cores — OpenMP threads spinning against them "
                             "can slow a run down 10x or more)")
    return common


def pipeline_args(p: argparse.ArgumentParser, fit: bool) -> None:
    """Text-to-image options shared by ``fit`` and ``generate`` (see lineas_fast.diffusion)."""
    t = p.add_argument_group("text-to-image pipelines (diffusers)")
    t.add_argument("--pipeline", default=None, metavar="DIR",
                   help="a local diffusers pipeline folder (model_index.json); steer its denoiser and text "
                        "encoders instead of a language model" + ("" if fit else "; writes a PNG grid to --out"))
    t.add_argument("--size", default=None, metavar="HxW", help="image height x width, e.g. 512x512 [pipeline default]")
    t.add_argument("--num-inference-steps", type=int, default=None, metavar="N",
                   help="denoising schedule length [pipeline default]" + (" (the fit reads its first step)" if fit else ""))
    t.add_argument("--device", default=None, help="move the pipeline here, e.g. cuda")
    t.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"], help="load the pipeline in this dtype")
    if not fit:
        t.add_argument("--strengths", default="0,0.5,1", metavar="LIST", help="grid columns: comma-separated strengths")
        t.add_argument("--guidance-scale", type=float, default=None, metavar="G", help="CFG scale [pipeline default]")
        t.add_argument("--seed", type=int, default=0, metavar="N", help="noise seed (the same for every column)")
        t.add_argument("--out", default="grid.png", metavar="FILE", help="PNG grid to write")
