"""LinEAS: all sites trained jointly, end to end, with one global Wasserstein loss (SPEC §2).

Each step runs the source prompts through the model with every current map applied (so downstream
sites see upstream steering), pools each steered site, and compares the ``[n, Σd]`` matrix to the
precomputed, pre-sorted target activations with one batched sort. The forward stops after the last
site. Adam (or SGD) updates (ω, b); a proximal sparse-group-lasso step then selects neurons and sites.
The model is left exactly as found: hooks are removed and ``requires_grad`` flags restored.

The forward of a step is :class:`_EagerForward` (length-bucketed micro-batches, hooks that steer and
pool) or, with ``compile=``, :class:`~.lineas_compile.CompiledForward` (packed static shapes, compiled
decoder blocks); everything after it — loss, backward, optimizer, prox, bookkeeping — is shared.
"""

from __future__ import annotations

import time
from types import SimpleNamespace

import torch

from ..collect import POOLINGS, collect, encode, model_device, pool, prompt_budget, run_to_sites, tap
from ..forward import pad_id
from ..defaults import LINEAS as LINEAS_DEFAULTS
from ..errors import SteeringError
from ..sites import resolve_sites, site_widths
from ..steering import Steering
from .common import check_prompt_sets, model_meta
from .lineas_compile import CompiledForward, compile_backend
from .trainer import FrozenModel, Recipe, Targets, site_slices, train_maps

DEFAULTS = LINEAS_DEFAULTS  # lineas_fast.defaults.LINEAS (plain data, shown by --help)


class _TrainedNorms:
    """Context: norm sites run the fused ``lineas::norm_affine`` op with (ω, b) as its one-entry table,
    so forward and backward of norm + steering are one kernel each (C++ on CPU, Triton on GPU) instead
    of the eager norm followed by the affine map. ``fused=None`` uses it where the op has a native kernel
    for the model's device; other sites keep the plain affine map in the tap."""

    def __init__(self, model, sites, slices, fused):
        from ..patching.fused import norm_spec, plan_fused

        self.model, self.slices, self.patch = model, slices, None
        if fused is None:
            fused = _native_norm_kernel(model_device(model))
        # norm sites only: the tap pools a site's *output*, which for a norm is the fused op's result
        self.fused = [s for s in plan_fused(model, {}, sites)[0] if norm_spec(model, s)] if fused else []

    def __enter__(self):
        from ..patching.fused import FusedPatch

        if self.fused:
            dev = model_device(self.model)
            dummy = {s: torch.ones(1, self.slices[s].stop - self.slices[s].start, device=dev) for s in self.fused}
            self.patch = FusedPatch(self.model, self.fused, SimpleNamespace(scale=dummy, shift=dummy))
            self.patch.set_rows(torch.zeros(1, dtype=torch.long), torch.ones(1))
        return self

    def bind(self, omega, shift) -> None:
        for s in self.fused:
            self.patch.bind_tables(s, omega[self.slices[s]][None], shift[self.slices[s]][None])

    def __exit__(self, *exc):
        if self.patch is not None:
            self.patch.remove()


def _native_norm_kernel(device) -> bool:
    from .. import ops

    key = "CUDA" if device.type == "cuda" else "CPU"
    return torch._C._dispatch_has_kernel_for_dispatch_key("lineas::norm_affine", key)


class _EagerForward:
    """The reference training forward: length-bucketed micro-batches through the model with hooks that
    steer each site (unless a fused norm already did) and pool it. ``bind(ω, b)`` then ``self(indices)``
    → ``(z, owner)`` (see :mod:`.trainer`)."""

    def __init__(self, model, tok, texts, sites, slices, fused, *, pooling, max_length, micro_batch):
        self.model, self.tok, self.texts, self.sites, self.slices = model, tok, texts, sites, slices
        self.fused, self.pooling, self.max_length, self.micro_batch = set(fused), pooling, max_length, micro_batch
        self.device = model_device(model)
        self.lengths = [len(t) for t in tok(texts, truncation=max_length is not None, max_length=max_length)["input_ids"]]
        self.pooled: dict[str, list] = {s: [] for s in sites}
        self._batches: dict[tuple, list] = {}
        self.mask = None

    def __enter__(self):
        self._tap = tap(self.model, self.sites, self._steer_and_pool)
        self.seen = self._tap.__enter__()
        return self

    def __exit__(self, *exc):
        self._tap.__exit__(*exc)

    def bind(self, omega, shift) -> None:
        self.omega, self.shift = omega, shift

    def _steer_and_pool(self, spec, h):
        if spec in self.fused:  # the fused norm already applied (ω, b): only pool
            self.pooled[spec].append(pool(h.float(), self.mask, self.pooling))
            return None
        sl = self.slices[spec]
        out = h.float() * self.omega[sl] + self.shift[sl]
        self.pooled[spec].append(pool(out, self.mask, self.pooling))
        return out.to(h.dtype)

    def _encoded(self, prompts: list[int]) -> list:
        key = tuple(prompts)
        batches = self._batches.get(key)
        if batches is None:  # chunks of similar length (less padding); pooled values do not depend on it
            order = sorted(prompts, key=lambda i: (self.lengths[i], i))
            batches = []
            for k in range(0, len(order), self.micro_batch):
                chunk = order[k:k + self.micro_batch]
                ids, mask = encode(self.tok, [self.texts[i] for i in chunk], self.max_length, self.device)
                rows = torch.tensor(chunk, device=self.device)
                owner = rows.repeat_interleave(mask.sum(1)) if self.pooling == "tokens" else rows
                batches.append((ids, mask, owner))
            if len(self._batches) < 4:  # the full batch repeats every step: encoded once
                self._batches[key] = batches
        return batches

    def __call__(self, prompts: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        batches = self._encoded(prompts)
        for ids, mask, _ in batches:
            self.mask = mask
            run_to_sites(self.model, ids, mask, self.seen)
        z = torch.cat([torch.cat(self.pooled[s]) for s in self.sites], dim=1)
        for s in self.sites:
            self.pooled[s].clear()
        return z, torch.cat([owner for _, _, owner in batches])


def fit_lineas(model, tok, source, target, *, sites=DEFAULTS["sites"], pooling=DEFAULTS["pooling"],
               steps=DEFAULTS["steps"], lr=DEFAULTS["lr"], schedule=DEFAULTS["schedule"],
               lr_end=DEFAULTS["lr_end"], betas=DEFAULTS["betas"], l1=DEFAULTS["l1"],
               group_l2=DEFAULTS["group_l2"], batch_size=DEFAULTS["batch_size"], normalize=DEFAULTS["normalize"],
               optimizer=DEFAULTS["optimizer"], preserve=DEFAULTS["preserve"],
               preserve_loss=DEFAULTS["preserve_loss"], transport_last=DEFAULTS["transport_last"], tol=DEFAULTS["tol"],
               window=DEFAULTS["window"], refit_steps=DEFAULTS["refit_steps"], density=DEFAULTS["density"],
               partial=DEFAULTS["partial"], max_length=DEFAULTS["max_length"],
               seed=DEFAULTS["seed"], micro_batch: int = 8, fused: bool | None = None, autocast: bool = DEFAULTS["autocast"],
               compile: bool | str = DEFAULTS["compile"], progress: bool = True) -> Steering:
    """Fit LinEAS maps; see :func:`lineas_fast.fit` for the arguments.

    Every check runs before the model is touched: prompt sets (at least two prompts each, none that
    tokenises to zero tokens), the recipe (:meth:`~.trainer.Recipe.validate`), the sites. Prompts are
    truncated to ``min(max_length, model max positions)`` (a warning counts those the model's limit cut;
    ``hyperparams["max_length"]`` keeps the value asked for).
    """
    source, target = check_prompt_sets(source, target)
    if pooling not in POOLINGS:
        raise SteeringError(f"pooling={pooling!r}: expected one of {POOLINGS}")
    recipe = Recipe(steps=steps, lr=lr, schedule=schedule, lr_end=lr_end, betas=tuple(betas) if isinstance(
        betas, (list, tuple)) else betas, optimizer=optimizer, batch_size=batch_size, l1=l1, group_l2=group_l2,
        normalize=normalize, preserve=preserve, preserve_loss=preserve_loss, transport_last=transport_last, tol=tol, window=window,
        refit_steps=refit_steps, density=density, partial=partial, seed=seed, autocast=autocast)
    recipe.validate()
    if isinstance(micro_batch, bool) or not isinstance(micro_batch, int) or micro_batch < 1:
        raise SteeringError(f"micro_batch={micro_batch!r}: expected an integer >= 1")
    backend = compile_backend(compile)
    asked_length = max_length
    max_length = prompt_budget(model, tok, source, max_length, "source")
    prompt_budget(model, tok, target, asked_length, "target")  # the same limit; its own count and zero check
    site_list = resolve_sites(model, sites)
    widths = site_widths(model, site_list)
    slices, _ = site_slices(site_list, widths)
    device = model_device(model)
    t0 = time.perf_counter()

    # 1. targets, unsteered, once (and which rows belong to which target prompt, for ``preserve``).
    v = collect(model, tok, target, site_list, pooling=pooling, max_length=max_length)
    v = torch.cat([v[s] for s in site_list], dim=1)
    counts = ([len(t) for t in tok(target, truncation=max_length is not None, max_length=max_length)["input_ids"]]
              if pooling == "tokens" else [1] * len(target))
    targets = Targets.from_counts(v, counts)

    # the source unsteered, once: the λ = 0 end of the targets of steps at a partial strength
    source_v = None
    if recipe.partial > 0:
        source_v = collect(model, tok, source, site_list, pooling=pooling, max_length=max_length)
        source_v = torch.cat([source_v[s] for s in site_list], dim=1)

    # 2. the forward: source prompts (and target prompts, to measure how far the maps move them).
    texts = source + (target if preserve > 0 else [])
    trained = _TrainedNorms(model, site_list, slices, fused)
    if backend is None:
        forward = _EagerForward(model, tok, texts, site_list, slices, trained.fused, pooling=pooling,
                                max_length=max_length, micro_batch=micro_batch)
    else:
        tokens = [list(t) for t in tok(texts, truncation=max_length is not None, max_length=max_length)["input_ids"]]
        per_step = min(batch_size, len(source)) + (min(batch_size, len(target)) if preserve > 0 else 0)
        forward = CompiledForward(model, tokens, site_list, slices, trained.fused, pooling=pooling,
                                  rows_for=per_step, pad_id=pad_id(tok), backend=backend)
    with FrozenModel(model), trained:
        omega, shift, history = train_maps(_Bound(forward, trained), n_source=len(source), targets=targets,
                                           slices=slices, recipe=recipe, device=device, source=source_v,
                                           progress=progress)
    fit_seconds = time.perf_counter() - t0

    scale = {s: omega[slices[s]].cpu() for s in site_list}
    shift_d = {s: shift[slices[s]].cpu() for s in site_list}
    hyper = dict(sites=sites if isinstance(sites, str) else list(sites), pooling=pooling, **recipe.hyperparams(),
                 max_length=asked_length, n_source=len(source), n_target=len(target), compile=backend or False)
    meta = {"method": "lineas", **model_meta(model), "hyperparams": hyper,
            "train": {**history, "fit_seconds": round(fit_seconds, 3)}}
    return Steering(scale, shift_d, meta)


class _Bound:
    """A training forward whose ``bind`` also hands (ω, b) to the fused norms."""

    def __init__(self, forward, trained: _TrainedNorms):
        self.forward, self.trained = forward, trained

    def __enter__(self):
        self.forward.__enter__()
        return self

    def __exit__(self, *exc):
        return self.forward.__exit__(*exc)

    def bind(self, omega, shift) -> None:
        self.trained.bind(omega, shift)
        self.forward.bind(omega, shift)

    def __call__(self, prompts):
        return self.forward(prompts)
