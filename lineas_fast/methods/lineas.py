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
from tqdm.auto import tqdm

from ..collect import POOLINGS, collect, encode, length_buckets, model_device, pool, run_to_sites, tap
from ..errors import SteeringError
from ..losses import column_weights, wasserstein_loss
from ..sites import resolve_sites, site_widths
from ..steering import Steering
from .common import check_prompt_sets, model_meta
from .lineas_compile import CompiledForward, compile_backend
from .prox import prox_sparse_group, step_sizes

# Chosen on the default task (SmolLM2-135M, 32 toxic vs 32 WikiText lines, SPEC §5 protocol); the sweep,
# its command and every measured point are in docs/tuning.md. In short: token pooling gives the loss ~500
# samples instead of 32 sentence means; per-column variance normalisation keeps a few huge-variance
# neurons from dominating; l1 (in units of that normalised loss, thresholded in Adam's metric) keeps
# only ~7% of the entries off identity and removes Adam's uniform drift of every scale; 40 steps keeps
# the fit near 2 minutes on 2 cores. lr 1e-2 and SGD diverged.
DEFAULTS = dict(sites="norms", pooling="tokens", steps=40, lr=3e-3, l1=10.0, group_l2=0.0, batch_size=32,
                normalize="var", optimizer="adam", max_length=64, seed=0)


class _FrozenModel:
    """Context: model params stop requiring grad (no wasted weight grads); flags restored after."""

    def __init__(self, model):
        self.model = model

    def __enter__(self):
        self.flags = [(p, p.requires_grad) for p in self.model.parameters()]
        self.training = self.model.training
        for p, _ in self.flags:
            p.requires_grad_(False)
        self.model.eval()

    def __exit__(self, *exc):
        for p, flag in self.flags:
            p.requires_grad_(flag)
        self.model.train(self.training)


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
            m = self.model.get_submodule(s)
            m.table_scale, m.table_shift = omega[self.slices[s]][None], shift[self.slices[s]][None]

    def __exit__(self, *exc):
        if self.patch is not None:
            self.patch.remove()


def _native_norm_kernel(device) -> bool:
    from .. import ops

    key = "CUDA" if device.type == "cuda" else "CPU"
    return torch._C._dispatch_has_kernel_for_dispatch_key("lineas::norm_affine", key)


class _EagerForward:
    """The reference training forward: length-bucketed micro-batches through the model with hooks that
    steer each site (unless a fused norm already did) and pool it. ``bind(ω, b)`` then ``self(prompts)``."""

    def __init__(self, model, tok, source, sites, slices, fused, *, pooling, max_length, micro_batch):
        self.model, self.tok, self.source, self.sites, self.slices = model, tok, source, sites, slices
        self.fused, self.pooling, self.max_length, self.micro_batch = set(fused), pooling, max_length, micro_batch
        self.device = model_device(model)
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

    def __call__(self, prompts: list[int]) -> torch.Tensor:
        key = tuple(prompts)
        batches = self._batches.get(key)
        if batches is None:
            chunks = length_buckets(self.tok, [self.source[i] for i in prompts], self.micro_batch)
            batches = [encode(self.tok, chunk, self.max_length, self.device) for chunk in chunks]
            if len(self._batches) < 4:  # the full batch repeats every step: encoded once
                self._batches[key] = batches
        for ids, mask in batches:
            self.mask = mask
            run_to_sites(self.model, ids, mask, self.seen)
        z = torch.cat([torch.cat(self.pooled[s]) for s in self.sites], dim=1)
        for s in self.sites:
            self.pooled[s].clear()
        return z


def fit_lineas(model, tok, source, target, *, sites=DEFAULTS["sites"], pooling=DEFAULTS["pooling"],
               steps=DEFAULTS["steps"], lr=DEFAULTS["lr"], l1=DEFAULTS["l1"], group_l2=DEFAULTS["group_l2"],
               batch_size=DEFAULTS["batch_size"], normalize=DEFAULTS["normalize"],
               optimizer=DEFAULTS["optimizer"], max_length=DEFAULTS["max_length"], seed=DEFAULTS["seed"],
               micro_batch: int = 8, fused: bool | None = None, autocast: bool = False, compile: bool | str = False,
               progress: bool = True) -> Steering:
    """Fit LinEAS maps; see :func:`lineas_fast.fit` for the arguments."""
    source, target = check_prompt_sets(source, target)
    if pooling not in POOLINGS:
        raise SteeringError(f"pooling={pooling!r}: expected one of {POOLINGS}")
    if optimizer not in ("adam", "sgd"):
        raise SteeringError(f"optimizer={optimizer!r}: expected 'adam' or 'sgd'")
    if normalize not in (None, "none", "var"):
        raise SteeringError(f"normalize={normalize!r}: expected None or 'var'")
    if steps < 0 or lr <= 0 or l1 < 0 or group_l2 < 0 or batch_size < 2:
        raise SteeringError(f"need steps >= 0, lr > 0, l1 >= 0, group_l2 >= 0, batch_size >= 2 "
                            f"(got {steps}, {lr}, {l1}, {group_l2}, {batch_size})")
    backend = compile_backend(compile)
    site_list = resolve_sites(model, sites)
    widths = site_widths(model, site_list)
    offsets, slices = 0, {}
    for s in site_list:
        slices[s] = slice(offsets, offsets + widths[s])
        offsets += widths[s]
    device = model_device(model)
    t0 = time.perf_counter()

    # 1. targets, unsteered, once; sorted once.
    v = collect(model, tok, target, site_list, pooling=pooling, max_length=max_length)
    v = torch.cat([v[s] for s in site_list], dim=1).to(device)
    v_sorted = torch.sort(v, dim=0).values
    weights = column_weights(v, normalize)

    # 2. identity init; flat parameter vectors, one slice per site.
    gen = torch.Generator().manual_seed(seed)
    omega = torch.ones(offsets, device=device, requires_grad=True)
    shift = torch.zeros(offsets, device=device, requires_grad=True)
    opt = (torch.optim.Adam if optimizer == "adam" else torch.optim.SGD)([omega, shift], lr=lr)
    n = len(source)
    history = {"loss": [], "nnz": [], "active_sites": [], "step_seconds": [], "phase_seconds": []}

    trained = _TrainedNorms(model, site_list, slices, fused)
    if backend is None:
        forward = _EagerForward(model, tok, source, site_list, slices, trained.fused, pooling=pooling,
                                max_length=max_length, micro_batch=micro_batch)
    else:
        tokens = [list(t) for t in tok(source, truncation=max_length is not None, max_length=max_length)["input_ids"]]
        pad = next((t for t in (tok.pad_token_id, tok.eos_token_id) if t is not None), 0)
        forward = CompiledForward(model, tokens, site_list, slices, trained.fused, pooling=pooling,
                                  rows_for=min(batch_size, n), pad_id=pad, backend=backend)
    bar = tqdm(range(steps), desc="LinEAS", disable=not progress)
    with _FrozenModel(model), trained, forward:
        for _ in bar:
            t_step = time.perf_counter()
            trained.bind(omega, shift)  # fresh views of the parameters: one autograd graph per step
            forward.bind(omega, shift)
            prompts = list(range(n)) if batch_size >= n else torch.randperm(n, generator=gen)[:batch_size].tolist()
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                z = forward(prompts)
            if not torch.isfinite(z).all():
                bad = next(s for s in site_list if not torch.isfinite(z[:, slices[s]]).all())
                raise SteeringError(f"site {bad!r}: NaN or inf in steered activations during fit "
                                    f"(lower lr={lr} or check the model)")
            t_fwd = time.perf_counter()
            loss = wasserstein_loss(z, v_sorted, weights)
            t_loss = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            t_bwd = time.perf_counter()
            opt.step()
            gw, gb = step_sizes(opt, omega), step_sizes(opt, shift)
            prox_sparse_group(omega.data, shift.data, gw, gb, l1, group_l2, list(slices.values()))
            with torch.no_grad():
                off = (omega != 1).int() + (shift != 0).int()
                nnz = int(off.sum())
                active = sum(int(off[sl].any()) for sl in slices.values())
            history["loss"].append(loss.item())
            history["nnz"].append(nnz)
            history["active_sites"].append(active)
            t_end = time.perf_counter()
            history["step_seconds"].append(round(t_end - t_step, 4))
            history["phase_seconds"].append({"forward": round(t_fwd - t_step, 4), "loss": round(t_loss - t_fwd, 4),
                                             "backward": round(t_bwd - t_loss, 4), "update": round(t_end - t_bwd, 4)})
            bar.set_postfix(loss=f"{history['loss'][-1]:.4g}", nnz=nnz, sites=active)
    fit_seconds = time.perf_counter() - t0

    scale = {s: omega.detach()[slices[s]].cpu() for s in site_list}
    shift_d = {s: shift.detach()[slices[s]].cpu() for s in site_list}
    hyper = dict(sites=sites if isinstance(sites, str) else list(sites), pooling=pooling, steps=steps, lr=lr,
                 l1=l1, group_l2=group_l2, batch_size=batch_size, normalize=normalize, optimizer=optimizer,
                 max_length=max_length, seed=seed, n_source=len(source), n_target=len(target), autocast=autocast,
                 compile=backend or False)
    meta = {"method": "lineas", **model_meta(model), "hyperparams": hyper,
            "train": {**history, "fit_seconds": round(fit_seconds, 3)}}
    return Steering(scale, shift_d, meta)
