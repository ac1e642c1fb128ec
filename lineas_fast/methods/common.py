"""Pieces every fitting method shares: input checks and the artifact's model metadata."""

from __future__ import annotations

from ..data import check_texts
from ..errors import SteeringError


def check_prompt_sets(source, target) -> tuple[list[str], list[str]]:
    """Source and target must each hold at least two non-empty prompts (a distribution, not a point)."""
    src = check_texts(source, "source", min_count=2)
    tgt = check_texts(target, "target", min_count=2)
    return src, tgt


def model_meta(model) -> dict:
    cfg = getattr(model, "config", None)
    if cfg is None:
        raise SteeringError(f"{type(model).__name__} has no .config: pass a transformers model")
    return {
        "model_type": getattr(cfg, "model_type", ""),
        "model_class": getattr(model, "model_class", type(model).__name__),  # a pipeline view: its pipeline
        "name_or_path": str(getattr(cfg, "name_or_path", "") or getattr(model, "name_or_path", "") or ""),
    }
