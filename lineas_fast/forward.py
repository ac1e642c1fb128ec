"""Running a model up to its sites: the one mechanism that reads (or rewrites) site tensors on the way.

``tap`` is used by collection, LinEAS training (which rewrites site tensors with the current maps,
differentiably) and shape probing. It stops the forward with :class:`StopForward` as soon as every site
has been seen, so nothing after the last site (later blocks, the LM head) runs. Position ids are
computed from the attention mask, so pooled activations of a sentence do not depend on left/right
padding or on the other sentences in its batch. A registered model view (:mod:`lineas_fast.views`)
supplies its own cheapest probe run.

**Prompt length.** Prompts are truncated to ``min(max_length, model max positions)`` tokens, the model's
limit read from its config (``n_positions`` / ``max_position_embeddings``, :func:`max_positions`): a longer
prompt would end in an ``IndexError`` inside the position embedding (GPT-2) or run positions the model
never saw. Where the model's limit cuts prompts that ``max_length`` alone would have kept,
:func:`prompt_budget` emits one ``warnings.warn`` saying how many; a prompt that tokenises to no token at
all is refused with :class:`SteeringError` naming the argument (it has no activation to pool).
"""

from __future__ import annotations

import warnings
from contextlib import contextmanager
from typing import Callable

import torch
from torch import nn

from .errors import SiteError, SteeringError
from .site_address import Site, channel_dim, pick, replace, static_width
from .views import is_view

POOLINGS = ("mean", "last", "tokens")


class StopForward(Exception):
    """Raised inside a hook to end a forward pass once every site has been captured."""


@contextmanager
def tap(model: nn.Module, sites: list[str], on_value: Callable, stop_early: bool = True):
    """Call ``on_value(site, tensor)`` at every site during forwards inside the block.

    ``on_value`` may return a replacement tensor (used downstream) or None. With ``stop_early``, the
    forward raises :class:`StopForward` right after the last site; use :func:`run_to_sites`.
    """
    seen: set[str] = set()
    handles = []
    grid: list[int] = []  # (batch, tokens) of the forward in progress

    def after(spec: str):
        seen.add(spec)
        if stop_early and len(seen) == len(sites):
            seen.clear()
            raise StopForward

    def call(spec, value):
        """``on_value`` on a ``[batch, tokens, width]`` view of a site some architectures see with the tokens
        flattened (OPT's MLP runs on ``[batch · tokens, width]``); a replacement goes back in that shape."""
        if value.dim() == 2 and len(grid) == 2 and value.shape[0] == grid[0] * grid[1] and grid[1] > 1:
            new = on_value(spec, value.view(grid[0], grid[1], value.shape[1]))
            return None if new is None else new.reshape(value.shape)
        return on_value(spec, value)

    def out_hook(spec, site):
        def hook(module, args, output):
            new = call(spec, pick(output, site))
            output = output if new is None else replace(output, site, new)
            after(spec)
            return output
        return hook

    def in_hook(spec):
        def hook(module, args):
            new = call(spec, args[0])
            after(spec)
            return None if new is None else (new, *args[1:])
        return hook

    def grid_hook(module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        ids = kwargs.get("inputs_embeds") if ids is None else ids
        grid[:] = list(ids.shape[:2]) if isinstance(ids, torch.Tensor) and ids.dim() >= 2 else []

    try:
        if isinstance(model, nn.Module) and not is_view(model):
            handles.append(model.register_forward_pre_hook(grid_hook, with_kwargs=True))
        for spec in sites:
            site = Site.parse(spec)
            module = model.get_submodule(site.module)
            if site.is_input:
                handles.append(module.register_forward_pre_hook(in_hook(spec)))
            else:
                handles.append(module.register_forward_hook(out_hook(spec, site)))
        yield seen
    finally:
        for h in handles:
            h.remove()


def model_inputs(ids: torch.Tensor, mask: torch.Tensor) -> dict:
    """Forward kwargs with position ids derived from the mask (padding-independent positions)."""
    pos = (mask.long().cumsum(-1) - 1).clamp(min=0)
    return {"input_ids": ids, "attention_mask": mask, "position_ids": pos, "use_cache": False}


def run_to_sites(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor, seen: set | None = None) -> None:
    """One forward that ends at the last tapped site."""
    if seen is not None:
        seen.clear()
    try:
        model(**model_inputs(ids, mask))
    except StopForward:
        pass


def max_positions(model: nn.Module) -> int | None:
    """The most token positions ``model`` accepts, from its config (``n_positions`` for GPT-2,
    ``max_position_embeddings`` elsewhere); None when the config names no limit."""
    cfg = getattr(model, "config", None)
    for key in ("n_positions", "max_position_embeddings"):
        value = getattr(cfg, key, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def length_limit(model: nn.Module, max_length: int | None, reserve: int = 0) -> int | None:
    """``min(max_length, max positions − reserve)`` (None: no limit at all); ``reserve`` keeps room for
    tokens added after the prompt (generated tokens, a BOS prepended by hand)."""
    limit = max_positions(model)
    if limit is not None:
        limit -= reserve
        if limit < 1:
            raise SteeringError(f"{type(model).__name__} accepts {limit + reserve} positions: no room for a prompt "
                                f"after reserving {reserve} (lower max_new_tokens)")
    if max_length is not None and (limit is None or max_length <= limit):
        return max_length
    return limit


def warn_cut(model: nn.Module, lengths: list[int], max_length: int | None, what: str, reserve: int = 0) -> int | None:
    """The length limit of :func:`length_limit`, warning once when the model's position limit cuts some of
    the sequences of token lengths ``lengths`` that ``max_length`` alone would have kept."""
    limit = length_limit(model, max_length, reserve)
    if limit is None or limit == max_length:
        return limit
    cut = sum(n > limit for n in lengths)
    if cut:
        extra = f" minus {reserve} reserved" if reserve else ""
        warnings.warn(f"{cut} of {len(lengths)} {what} are longer than {type(model).__name__}'s "
                      f"{limit + reserve} positions{extra} (max_length={max_length}): truncated to {limit} tokens",
                      stacklevel=3)
    return limit


def prompt_budget(model: nn.Module, tok, texts: list[str], max_length: int | None, what: str) -> int | None:
    """The token limit to truncate ``texts`` to: ``min(max_length, model max positions)``.

    Warns (``warnings.warn``) how many prompts the model's limit cuts beyond ``max_length``; raises
    :class:`SteeringError` naming ``what`` (the argument, e.g. ``"source"``) when a prompt tokenises to
    no token at all. Call it once per prompt set and pass the result on as ``max_length``.
    """
    lengths = [len(ids) for ids in tok(list(texts))["input_ids"]]
    empty = [i for i, n in enumerate(lengths) if n == 0]
    if empty:
        raise SteeringError(f"{what}: prompts {empty[:5]}" + (f" (+{len(empty) - 5} more)" if len(empty) > 5 else "")
                            + f" of {len(lengths)} tokenise to zero tokens (nothing to pool)")
    return warn_cut(model, lengths, max_length, f"prompts in {what}")


def pad_id(tok) -> int:
    """The id padding uses: the tokenizer's pad token, else its EOS (what Hugging Face generation falls back
    to), else its unknown token, else 0. Padded positions are masked out, so any valid id serves."""
    return next((t for t in (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) if t is not None), 0)


@contextmanager
def padding_token(tok):
    """``tok`` with a pad token (:func:`pad_id`'s) inside the block when it has none — GPT-2's, Pythia's and
    many Llama tokenizers ship without one, and padding a batch would raise — put back to None on exit."""
    if tok.pad_token_id is not None:
        yield tok
        return
    tok.pad_token = tok.convert_ids_to_tokens(pad_id(tok))
    try:
        yield tok
    finally:
        tok.pad_token = None


def encode(tok, texts: list[str], max_length: int | None, device) -> tuple[torch.Tensor, torch.Tensor]:
    with padding_token(tok):
        batch = tok(texts, return_tensors="pt", padding=True, truncation=max_length is not None,
                    max_length=max_length)
    return batch["input_ids"].to(device), batch["attention_mask"].to(device)


def length_buckets(tok, texts: list[str], size: int) -> list[list[str]]:
    """Split texts into chunks of similar token length (less padding, same pooled results).

    Chunks keep a fixed order (by length, ties by position), so results concatenate deterministically;
    pooled activations do not depend on batch composition, so this changes speed, not values.
    """
    lengths = [len(ids) for ids in tok(texts, add_special_tokens=True)["input_ids"]]
    order = sorted(range(len(texts)), key=lambda i: (lengths[i], i))
    return [[texts[i] for i in order[k:k + size]] for k in range(0, len(order), size)]


def pool(h: torch.Tensor, mask: torch.Tensor, how: str) -> torch.Tensor:
    """Pool a site tensor ``[B, T, d]`` over non-pad tokens: ``mean`` → [B, d], ``last`` → [B, d],
    ``tokens`` → [non-pad tokens, d]. Pad positions never enter (``where``, not multiply: pads may be NaN)."""
    m = mask.bool()
    if how == "mean":
        h = torch.where(m[..., None], h, torch.zeros((), dtype=h.dtype, device=h.device))
        return h.sum(1) / m.sum(1, keepdim=True).clamp(min=1).to(h.dtype)
    if how == "last":
        t = torch.arange(m.shape[1], device=m.device)
        last = torch.where(m, t, -1).argmax(-1)
        return h[torch.arange(h.shape[0], device=h.device), last]
    if how == "tokens":
        return h[m]
    raise SteeringError(f"pooling={how!r}: expected one of {POOLINGS}")


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def probe_shapes(model: nn.Module, sites: list[str]) -> dict[str, tuple]:
    """Shapes of site tensors on a 1-token input (for widths that cannot be read off weights)."""
    shapes = {}
    with tap(model, sites, lambda s, h: shapes.__setitem__(s, tuple(h.shape))) as seen:
        _probe_forward(model, seen)
    return shapes


def _probe_forward(model: nn.Module, seen: set) -> None:
    """The cheapest forward that reaches every site: one token (an LLM) or one pipeline step."""
    if is_view(model):
        seen.clear()
        model.probe_run()
        return
    ids = torch.ones(1, 1, dtype=torch.long, device=model_device(model))
    run_to_sites(model, ids, torch.ones_like(ids), seen)


@torch.no_grad()
def execution_order(model: nn.Module, sites: list[str]) -> list[str]:
    """``sites`` sorted by when the forward reaches them (one 1-token probe forward)."""
    order: list[str] = []

    def seen_first(spec, h):
        if spec not in order:
            order.append(spec)

    with tap(model, sites, seen_first) as seen:
        _probe_forward(model, seen)
    missing = [s for s in sites if s not in order]
    if missing:
        raise SiteError(f"site(s) {missing[:3]} are never reached by a forward pass")
    return order


def site_widths(model: nn.Module, sites: list[str]) -> dict[str, int]:
    """Width d of each site: from the module's weights when obvious, else from a probe forward (channels:
    :func:`channel_dim`)."""
    widths, unknown = {}, []
    for spec in sites:
        site = Site.parse(spec)
        w = static_width(model.get_submodule(site.module), site)
        if w is None:
            unknown.append(spec)
        else:
            widths[spec] = w
    if unknown:
        widths.update({s: shape[channel_dim(len(shape))] for s, shape in probe_shapes(model, unknown).items()})
    return widths
