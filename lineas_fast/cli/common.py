"""What the command modules share: printing, argument checks, loading a model or a steering, the help
formatter, the one-line-error parser and the shared argument groups (the ``common`` parent parser with
``--threads``, and the text-to-image ``--pipeline`` group of ``fit`` and ``generate``).

Importing this module imports no torch: the loaders import their libraries when called. The argument
checks import none either, so each command's ``validate`` (run by :func:`lineas_fast.cli.main` before the
command) refuses a bad argument at once, before torch is imported or any model is loaded.
"""

from __future__ import annotations

import argparse
import math
import os
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


def strengths(text: str, name: str = "--strengths") -> list[float]:
    """``"0,0.5,1"`` → ``[0.0, 0.5, 1.0]``: one or more finite numbers (``nan``/``inf`` are refused)."""
    try:
        vals = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise SteeringError(f"{name} {text!r}: expected comma-separated numbers, e.g. 0,0.5,1") from None
    if not vals:
        raise SteeringError(f"{name}: give at least one value, e.g. 0,0.5,1")
    bad = [v for v in vals if not math.isfinite(v)]
    if bad:
        raise SteeringError(f"{name} {text!r}: {bad[0]} is not a finite number")
    return vals


def positive(name: str, value) -> None:
    """``value`` (None: not given) must be a finite number > 0 (``--lr nan`` passes ``value <= 0``)."""
    if value is not None and not (math.isfinite(value) and value > 0):
        raise SteeringError(f"{name}={value}: must be a finite number > 0" if not math.isfinite(value)
                            else f"{name}={value}: must be positive")


def non_negative(name: str, value) -> None:
    """``value`` (None: not given) must be a finite number >= 0."""
    if value is not None and not (math.isfinite(value) and value >= 0):
        raise SteeringError(f"{name}={value}: must be a finite number >= 0")


def finite(name: str, value) -> None:
    """``value`` (None: not given) must be finite: argparse's ``type=float`` accepts ``nan`` and ``inf``."""
    if value is not None and not math.isfinite(value):
        raise SteeringError(f"{name}={value}: must be a finite number")


def refuse_given(args, options: dict, why: str) -> None:
    """Refuse the first of ``options`` (``{dest: flag}``) that was given: an option that would be silently
    ignored in this combination is an error, not a no-op. An option counts as given when it is not None
    (or, for a list option, not empty) — so such options take ``default=None`` and resolve it later."""
    for dest, flag in options.items():
        value = getattr(args, dest)
        if value is not None and value != [] and value is not False:
            raise SteeringError(f"{flag} {why}")


def _first_existing(path: Path) -> Path:
    for p in (path, *path.parents):
        if os.path.lexists(p):
            return p
    return Path(".")


def output_file(name: str, value: str) -> None:
    """A file the command will write (``--out FILE``): refused before any work if it is an existing folder,
    if its folder is missing or not a folder, or if the file or its folder is not writable."""
    path = Path(value)
    if not value or path.is_dir():
        raise SteeringError(f"{name} {value!r} is a folder; give the path of a file to write")
    parent = path.parent
    if not parent.exists():
        where = _first_existing(parent)
        if where.exists() and not where.is_dir():
            raise SteeringError(f"{name} {value!r}: {str(where)!r} is a file, not a folder")
        raise SteeringError(f"{name} {value!r}: folder {str(parent)!r} does not exist")
    if not parent.is_dir():
        raise SteeringError(f"{name} {value!r}: {str(parent)!r} is not a folder")
    if not os.access(parent, os.W_OK | os.X_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise SteeringError(f"{name} {value!r}: not writable (permission denied)")


def output_dir(name: str, value: str) -> None:
    """A folder the command will create or write into (``--out DIR``): refused before any work if it is an
    existing file, if one of its parents is a file, or if the folder (or the parent it would be created
    in) is not writable."""
    if not value:
        raise SteeringError(f"{name}: give a folder")
    path = Path(value)
    if path.exists() and not path.is_dir():
        raise SteeringError(f"{name} {value!r} exists and is not a folder")
    where = _first_existing(path)
    if not where.is_dir():
        raise SteeringError(f"{name} {value!r}: {str(where)!r} is a file, not a folder")
    if not os.access(where, os.W_OK | os.X_OK):
        raise SteeringError(f"{name} {value!r}: {str(where)!r} is not writable (permission denied)")


def read_prompts(name: str, value: str, split: str) -> list[str]:
    """:func:`lineas_fast.data.load_texts` for a prompt-set option, with a one-line error for a file that
    is not UTF-8 text (``load_texts`` lets the decoder's ``UnicodeDecodeError`` through)."""
    from ..data import load_texts

    try:
        return load_texts(value, split)
    except UnicodeDecodeError:
        raw = Path(value).read_bytes()
        try:
            raw.decode("utf-8")
            pos = 0
        except UnicodeDecodeError as e:  # the decoder's own position is relative to a read chunk
            pos = e.start
        line = raw.count(b"\n", 0, pos) + 1
        raise SteeringError(f"{name} {value!r}: not UTF-8 text (byte {pos}, line {line}); save it as UTF-8") from None


def check_prompts(name: str, value: str, split: str) -> None:
    """Check a prompt-set option up front: a file must hold UTF-8 prompts (built-in sets are read later,
    by the command, as they need the data package)."""
    from ..data import BUILTIN_FILES

    if value not in BUILTIN_FILES:
        read_prompts(name, value, split)


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


class Parser(argparse.ArgumentParser):
    """argparse with the CLI's error rule: a usage error (unknown option, missing or malformed value) is one
    line on stderr, ``error: ...``, with exit status 2 — like every other error of the command line.
    Subparsers inherit the class (``add_subparsers`` uses the parent's type)."""

    def error(self, message):
        self.exit(2, f"error: {' '.join(message.split())} (see '{self.prog} --help')\n")


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


# Options of the --pipeline group that only a pipeline run uses: given without --pipeline they are refused
# (``refuse_given``), never silently ignored. ``generate`` adds the grid options.
PIPELINE_ONLY = {"size": "--size", "num_inference_steps": "--num-inference-steps", "device": "--device",
                 "dtype": "--dtype"}
GRID_ONLY = {**PIPELINE_ONLY, "strengths": "--strengths", "guidance_scale": "--guidance-scale", "seed": "--seed",
             "out": "--out"}
GRID_DEFAULTS = {"strengths": "0,0.5,1", "seed": 0, "out": "grid.png"}


def pipeline_args(p: argparse.ArgumentParser, fit: bool) -> None:
    """Text-to-image options shared by ``fit`` and ``generate`` (see lineas_fast.diffusion). Every default
    is None, so a command can tell a given option from a default one; ``generate`` fills in
    :data:`GRID_DEFAULTS` (stated in the help) when it runs a pipeline."""
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
        t.add_argument("--strengths", default=None, metavar="LIST",
                       help=f"grid columns: comma-separated strengths [default: {GRID_DEFAULTS['strengths']}]")
        t.add_argument("--guidance-scale", type=float, default=None, metavar="G", help="CFG scale [pipeline default]")
        t.add_argument("--seed", type=int, default=None, metavar="N",
                       help=f"noise seed (the same for every column) [default: {GRID_DEFAULTS['seed']}]")
        t.add_argument("--out", default=None, metavar="FILE", help=f"PNG grid to write [default: {GRID_DEFAULTS['out']}]")
