"""Activation collection: pooled site values of a prompt set (``lf.collect``), one set or several at once.

Running the model to its sites is :mod:`lineas_fast.forward` (whose names are re-exported here); a
registered model view (:mod:`lineas_fast.views`) collects its own way.
"""

from __future__ import annotations

import torch

from .data import check_texts
from .errors import SteeringError
from .forward import (POOLINGS, StopForward, encode, execution_order, length_buckets, length_limit, model_device,
                      model_inputs, pool, probe_shapes, prompt_budget, run_to_sites, tap)
from .sites import resolve_sites
from .views import as_model, is_view


@torch.no_grad()
def collect(model, tok, texts, sites="norms", pooling: str = "mean", batch_size: int = 16,
            max_length: int | None = 128, progress: bool = False) -> dict[str, torch.Tensor]:
    """Pooled activations ``{site: float32 CPU tensor [N, d]}`` (``[tokens, d]`` for ``tokens``).

    Args:
        sites: preset, regex, or list of site strings (see :mod:`lineas_fast.sites`); keys of the result
            are the resolved site strings.
        pooling: ``mean`` over non-pad tokens (default), ``last`` non-pad token, or ``tokens``.
        max_length: truncate prompts to this many tokens (None: no truncation). Prompts are never longer
            than the model's positions (``n_positions`` / ``max_position_embeddings``): they are truncated to
            ``min(max_length, max positions)``, with a warning saying how many the model's limit cut.

    Raises :class:`SteeringError` for an empty prompt list, a prompt that tokenises to zero tokens, or a
    bad pooling; :class:`SiteError` for a site that does not exist or does not fit its module's output.
    """
    model = as_model(model)
    if is_view(model):  # e.g. a diffusers pipeline: tok unused, max_length moot
        return model.collect(texts, sites, pooling=pooling, batch_size=batch_size, progress=progress)
    texts = check_texts(texts, "texts")
    if pooling not in POOLINGS:
        raise SteeringError(f"pooling={pooling!r}: expected one of {POOLINGS}")
    sites = resolve_sites(model, sites)
    max_length = prompt_budget(model, tok, texts, max_length, "texts")
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


def collect_sets(model, tok, sets: list[list[str]], sites: list[str], pooling: str = "mean",
                 batch_size: int = 64, max_length: int | None = 128,
                 progress: bool = False) -> list[dict[str, torch.Tensor]]:
    """Like :func:`collect` for several prompt sets at once (one pass over their union, so e.g. source
    and target cost a single truncated forward); returns one ``{site: tensor}`` per set."""
    if is_view(model):  # no token counts to split by: one pass per set
        return [collect(model, tok, s, sites, pooling=pooling, batch_size=batch_size, progress=progress) for s in sets]
    texts = [t for s in sets for t in s]
    acts = collect(model, tok, texts, sites, pooling=pooling, batch_size=batch_size, max_length=max_length,
                   progress=progress)
    if pooling == "tokens":
        limit = length_limit(as_model(model), max_length)  # what collect truncated to (it warned)
        lengths = [len(x) for x in tok(texts, truncation=limit is not None, max_length=limit)["input_ids"]]
        bounds, start = [], 0
        for s in sets:
            bounds.append(sum(lengths[start:start + len(s)]))
            start += len(s)
    else:
        bounds = [len(s) for s in sets]
    parts = {site: v.split(bounds) for site, v in acts.items()}
    return [{site: parts[site][k] for site in acts} for k in range(len(sets))]


__all__ = ["POOLINGS", "StopForward", "collect", "collect_sets", "encode", "execution_order", "length_buckets",
           "length_limit", "model_device", "model_inputs", "pool", "probe_shapes", "prompt_budget", "run_to_sites",
           "tap"]
