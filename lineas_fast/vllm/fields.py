"""The per-request steering fields (``vllm_xargs``), their validation and the prefix-cache salt.

Shared by the HTTP side (which answers 400 before a request reaches the engine) and the worker (which
maps a validated request to a table slot). Plain Python: no vLLM import.
"""

from __future__ import annotations

import math

STEERING, STRENGTH = "steering", "strength"
SALT_PREFIX = "lineas_fast"


class FieldError(ValueError):
    """A request's steering fields are invalid (the HTTP side turns this into a 400)."""


def parse_fields(xargs, loaded) -> tuple[str | None, float]:
    """``(name, strength)`` of a request's ``vllm_xargs`` (``(None, 0.0)`` = unsteered).

    ``loaded`` is the collection of steering names the server holds; an unknown name, a strength that is
    not a finite number (strings and booleans included), or a strength without a steering raises
    :class:`FieldError` with a message naming the loaded steerings.
    """
    if xargs is None:
        return None, 0.0
    if not isinstance(xargs, dict):
        raise FieldError(f"vllm_xargs must be an object, got {type(xargs).__name__}")
    name = xargs.get(STEERING)
    has_strength = STRENGTH in xargs
    if name is None:
        if has_strength:
            raise FieldError(f"'{STRENGTH}' given without '{STEERING}' (loaded steerings: {_names(loaded)})")
        return None, 0.0
    if not isinstance(name, str) or name not in loaded:
        raise FieldError(f"unknown steering {name!r}; loaded steerings: {_names(loaded)}")
    strength = xargs.get(STRENGTH, 1.0)
    if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not math.isfinite(strength):
        raise FieldError(f"strength must be a finite number, got {strength!r}")
    return name, float(strength)


def cache_salt(name: str | None, strength: float, user_salt: str | None = None) -> str | None:
    """The prefix-cache salt of a steered request: KV blocks computed under one (steering, strength) are
    never reused by a request with another (an unsteered request keeps the user's salt, or none)."""
    if name is None:
        return user_salt
    mine = f"{SALT_PREFIX}:{name}:{strength!r}"
    return mine if not user_salt else f"{mine}|{user_salt}"


def _names(loaded) -> str:
    names = sorted(loaded)
    return ", ".join(repr(n) for n in names) if names else "none"


__all__ = ["FieldError", "STEERING", "STRENGTH", "cache_salt", "parse_fields"]
