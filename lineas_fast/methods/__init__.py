"""Fitting methods; :func:`fit` dispatches by name. Every method returns a :class:`Steering` and leaves
the model exactly as it found it."""

from __future__ import annotations

from ..errors import SteeringError
from ..views import as_model, is_view
from .act import fit_gaussian_ot, fit_linear_act, fit_linear_act_incremental, fit_mean_act
from .actadd import fit_actadd
from .lineas import DEFAULTS as LINEAS_DEFAULTS
from .lineas import fit_lineas

METHODS = {
    "lineas": fit_lineas,
    "linear_act": fit_linear_act,
    "linear_act_incremental": fit_linear_act_incremental,
    "mean_act": fit_mean_act,
    "gaussian_ot": fit_gaussian_ot,
    "actadd": fit_actadd,
}


def fit(model, tok, source, target, method: str = "lineas", **kwargs):
    """Fit a steering from unpaired ``source`` → ``target`` prompt sets.

    Args:
        model, tok: a transformers causal LM and its tokenizer, or a diffusers text-to-image pipeline and
            None (sites then default to the denoiser's norms; see :mod:`lineas_fast.diffusion`).
        source, target: lists of prompts (at least 2 each), e.g. 32 toxic and 32 non-toxic sentences.
        method: ``"lineas"`` (end-to-end, default), ``"linear_act"``, ``"linear_act_incremental"``,
            ``"mean_act"``, ``"gaussian_ot"`` or ``"actadd"`` (see :mod:`lineas_fast.methods.act`).
        **kwargs: method options.
            LinEAS (defaults: :data:`lineas_fast.defaults.LINEAS`): ``sites`` (preset, presets joined by
            ``+``, regex or list), ``pooling`` (mean|last|tokens), ``steps``, ``lr``, ``schedule``
            (cosine|constant) and ``lr_end`` (the cosine ends at lr·lr_end), ``betas`` (Adam), ``l1``,
            ``group_l2`` (sparse group lasso) and ``refit_steps`` (after a sparse fit, refit the entries it
            kept without the penalty for this many steps: the relaxed lasso), ``density`` (a cap: after the
            first phase at most this share of the (ω, b) entries stay off the identity, those that move the
            activations most, then ``refit_steps`` refit them; 1: no cap), ``partial`` (the fraction of steps
            trained at a random strength λ < 1 against the interpolated target, so that λ < 1 steers part of the
            way: :mod:`lineas_fast.methods.trainer`), ``batch_size`` (prompts per step), ``normalize``
            (None|"var"), ``optimizer`` (adam|sgd), ``preserve`` (μ: weight of the term that keeps the target
            prompts' own activations in place) and ``preserve_loss`` (paired: per token; wasserstein: as a
            distribution; local: each map's own move only), ``transport_last`` (the share of the sites, the
            last ones, whose distributions the transport term matches; the maps still act at every site),
            ``tol``/``window`` (the stopping rule,
            :func:`lineas_fast.methods.trainer.converged`),
            ``max_length``, ``seed``, ``progress``, ``fused`` (None: norm sites through the fused
            op where a native kernel exists), ``autocast`` (bf16 autocast of the forward; the maps, pooling
            and loss stay fp32 — 1.18× faster steps on the demo task with losses within 0.1 %), ``compile``
            (True: the training forward runs with static packed shapes — prompts packed into fixed-width rows —
            and each decoder block ``torch.compile``d; a backend name such as ``"aot_eager"`` picks another
            backend; losses within 1e-4 of eager, no recompiles after the first step, the first step pays
            the compilation (see :mod:`lineas_fast.methods.lineas_compile`); with ``autocast`` the fastest
            option: see benchmarks/RESULTS.md), ``micro_batch`` (eager only: prompts per forward).
            AcT family: ``sites``, ``pooling`` (default mean), ``support`` (None or ``"q_0_100"``: apply only
            strictly inside the source range), ``incremental`` (fit sites in order with earlier maps
            applied), ``max_length``, ``batch_size``, ``seed``, ``progress``.
            ActAdd: ``sites`` (default: the middle block's MLP output), ``multiplier``, ``pooling``, ...

    Prompts are truncated to ``min(max_length, model max positions)`` (a warning counts those the model's
    limit cut). Bad input raises :class:`SteeringError` naming it before the model is touched: unknown
    methods, prompt sets that are empty or hold a prompt of zero tokens, LinEAS ``steps`` that is not a
    positive int, ``l1``/``group_l2`` not finite and >= 0, and sites (:class:`SiteError`). A LinEAS fit that
    ends as the identity map, or whose sparsity switches off more than 95 % of its sites, warns.
    """
    if method not in METHODS:
        raise SteeringError(f"method={method!r}: available methods are {sorted(METHODS)}")
    model = as_model(model)
    if is_view(model):  # e.g. a diffusers pipeline: the view fits its own way (lineas_fast.views)
        return model.fit(method, METHODS[method], tok, source, target, **kwargs)
    return METHODS[method](model, tok, source, target, **kwargs)


__all__ = ["LINEAS_DEFAULTS", "METHODS", "fit", "fit_actadd", "fit_gaussian_ot", "fit_lineas", "fit_linear_act",
           "fit_linear_act_incremental", "fit_mean_act"]
