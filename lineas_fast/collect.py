"""Activation capture: run prompts through a model and read (or rewrite) site tensors on the way.

``tap`` is the one mechanism used by collection, LinEAS training (which rewrites site tensors with
the current maps, differentiably) and shape probing. It stops the forward with :class:`StopForward`
as soon as every site has been seen, so nothing after the last site (later blocks, the LM head) runs.
Position ids are computed from the attention mask, so pooled activations of a sentence do not depend
on left/right padding or on the other sentences in its batch.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable

import torch
from torch import nn

from .data import check_texts
from .errors import SteeringError
from .sites import Site, pick, replace, resolve_sites

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

    def after(spec: str):
        seen.add(spec)
        if stop_early and len(seen) == len(sites):
            seen.clear()
            raise StopForward

    def out_hook(spec, site):
        def hook(module, args, output):
            new = on_value(spec, pick(output, site))
            output = output if new is None else replace(output, site, new)
            after(spec)
            return output
        return hook

    def in_hook(spec):
        def hook(module, args):
            new = on_value(spec, args[0])
            after(spec)
            return None if new is None else (new, *args[1:])
        return hook

    try:
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


def encode(tok, texts: list[str], max_length: int | None, device) -> tuple[torch.Tensor, torch.Tensor]:
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
def collect(model, tok, texts, sites="norms", pooling: str = "mean", batch_size: int = 16,
            max_length: int | None = 128, progress: bool = False) -> dict[str, torch.Tensor]:
    """Pooled activations ``{site: float32 CPU tensor [N, d]}`` (``[tokens, d]`` for ``tokens``).

    Args:
        sites: preset, regex, or list of site strings (see :mod:`lineas_fast.sites`); keys of the result
            are the resolved site strings.
        pooling: ``mean`` over non-pad tokens (default), ``last`` non-pad token, or ``tokens``.
        max_length: truncate prompts to this many tokens (None: no truncation).
    """
    from .diffusion.view import as_model

    model = as_model(model)
    if getattr(model, "is_pipeline_view", False):  # a diffusers pipeline: tok unused, max_length moot
        from .diffusion.run import collect_diffusion

        opts = dict(model.run_options)
        opts["steps"] = opts.pop("denoise_steps", 1)
        return collect_diffusion(model.pipe, texts, sites, pooling=pooling, batch_size=batch_size, progress=progress,
                                 **opts)
    texts = check_texts(texts, "texts")
    if pooling not in POOLINGS:
        raise SteeringError(f"pooling={pooling!r}: expected one of {POOLINGS}")
    sites = resolve_sites(model, sites)
    out: dict[str, list] = {s: [] for s in sites}
    device = model_device(model)
    mask_box, counts = {}, []

    def record(spec, h):
        out[spec].append(pool(h.float(), mask_box["mask"], pooling).cpu())

    from tqdm.auto import tqdm

    # Batches of similar length waste less compute on padding; rows are put back in input order.
    lengths = [len(x) for x in tok(texts, truncation=max_length is not None, max_length=max_length)["input_ids"]]
    order = sorted(range(len(texts)), key=lambda i: (lengths[i], i))
    starts = range(0, len(texts), batch_size)
    with tap(model, sites, record) as seen:
        for i in tqdm(starts, desc="collect", disable=not progress, leave=False):
            ids, mask = encode(tok, [texts[j] for j in order[i:i + batch_size]], max_length, device)
            mask_box["mask"] = mask
            counts.extend(mask.sum(1).tolist())
            run_to_sites(model, ids, mask, seen)
    # put rows back in input order (for tokens: each prompt's block of token rows)
    blocks_in_order = [None] * len(order)
    for s, v in out.items():
        rows = torch.cat(v)
        parts = rows.split(counts) if pooling == "tokens" else rows.split(1)
        for pos, part in zip(order, parts):
            blocks_in_order[pos] = part
        out[s] = [torch.cat(blocks_in_order)]
    result = {s: torch.cat(v) for s, v in out.items()}
    for s, v in result.items():
        if not torch.isfinite(v).all():
            raise SteeringError(f"site {s!r}: activations contain NaN or inf")
    return result


@torch.no_grad()
def probe_shapes(model: nn.Module, sites: list[str]) -> dict[str, tuple]:
    """Shapes of site tensors on a 1-token input (for widths that cannot be read off weights)."""
    shapes = {}
    with tap(model, sites, lambda s, h: shapes.__setitem__(s, tuple(h.shape))) as seen:
        _probe_forward(model, seen)
    return shapes


def _probe_forward(model: nn.Module, seen: set) -> None:
    """The cheapest forward that reaches every site: one token (an LLM) or one pipeline step."""
    if getattr(model, "is_pipeline_view", False):
        seen.clear()
        model.probe_run()
        return
    ids = torch.ones(1, 1, dtype=torch.long, device=model_device(model))
    run_to_sites(model, ids, torch.ones_like(ids), seen)


def collect_sets(model, tok, sets: list[list[str]], sites: list[str], pooling: str = "mean",
                 batch_size: int = 64, max_length: int | None = 128,
                 progress: bool = False) -> list[dict[str, torch.Tensor]]:
    """Like :func:`collect` for several prompt sets at once (one pass over their union, so e.g. source
    and target cost a single truncated forward); returns one ``{site: tensor}`` per set."""
    if getattr(model, "is_pipeline_view", False):  # no token counts to split by: one pass per set
        return [collect(model, tok, s, sites, pooling=pooling, batch_size=batch_size, progress=progress) for s in sets]
    texts = [t for s in sets for t in s]
    acts = collect(model, tok, texts, sites, pooling=pooling, batch_size=batch_size, max_length=max_length,
                   progress=progress)
    if pooling == "tokens":
        lengths = [len(x) for x in tok(texts, truncation=max_length is not None, max_length=max_length)["input_ids"]]
        bounds, start = [], 0
        for s in sets:
            bounds.append(sum(lengths[start:start + len(s)]))
            start += len(s)
    else:
        bounds = [len(s) for s in sets]
    parts = {site: v.split(bounds) for site, v in acts.items()}
    return [{site: parts[site][k] for site in acts} for k in range(len(sets))]


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
        raise SteeringError(f"site(s) {missing[:3]} are never reached by a forward pass")
    return order
