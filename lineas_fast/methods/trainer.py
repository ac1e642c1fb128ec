"""The one LinEAS training loop (SPEC §2, Algorithm 1) with the reference recipe; only the forward varies.

A *training forward* is a context manager with two calls:

* ``bind(omega, shift)``: the flat ``[Σd]`` parameter vectors this step's forward must apply (a fresh
  autograd graph each step);
* ``forward(indices) -> (z, owner)``: run the prompts ``indices`` with every current map applied and return
  the steered, pooled site values ``z [samples, Σd]`` (sites concatenated in ``slices`` order) and, for
  every row of ``z``, the index of the prompt it came from. Indices ``0..n_source-1`` are source prompts;
  with ``preserve > 0`` the indices ``n_source..`` are the target prompts.

The eager and compiled LLM forwards live in :mod:`.lineas` and :mod:`.lineas_compile`, the pipeline forward
in :mod:`lineas_fast.diffusion.lineas`; everything else — mini-batches, loss, optimizer, learning-rate
schedule, proximal step, stopping rule, progress bar, history — is here, once.

**The loss.** ``W(steered source, target)`` — per column the 1-D Wasserstein-2 distance, optionally divided
by the target variance, summed over columns (:mod:`lineas_fast.losses`) — plus, with ``preserve = μ > 0``,
``μ · W(steered target, unsteered target)`` on a mini-batch of the *target* prompts run through the same
steered model. The first term moves the source onto the target; the second says how far the maps may move
text that already is like the target (zero at the identity). Among maps that transport equally well it
prefers those that leave ordinary text alone, which is what perplexity on unrelated text measures.
``preserve_loss``: ``"paired"`` compares each target row with its own unsteered value, ``"wasserstein"`` the
two distributions, ``"local"`` charges each map only its own displacement of those rows (:func:`local_move`),
not what the maps upstream of it moved.

**The recipe** (Apple's reference LinEAS code): Adam with betas (0.9, 0.9), a cosine decay of the learning
rate from ``lr`` to ``lr·lr_end`` over ``steps``, a random mini-batch of ``batch_size`` source prompts
per step, trained to convergence. **Stopping rule**: after every ``window`` steps past the first two
windows, stop when the mean loss of the last window improved on the window before it by less than ``tol``
(relative); ``tol=0`` always runs all ``steps``.

**Where the transport term looks** (``transport_last = s``): the maps act at every site, but the transport term
counts only the last ``ceil(s · n)`` of the ``n`` sites (their columns × n / that count, so the term keeps its size
against the preservation term, which still counts every site). The source then has to reach the target's
distribution only where the model is about to write its output, and the maps upstream are free to get it
there by whatever moves cost least, instead of also matching each early site's distribution (the prompts'
wording) to the target's. ``s = 1`` counts every site (the reference recipe). The columns it does not count are not even
sorted (:func:`transport_columns`): at ``s = 1/3`` the loss of a step costs a third, the maps are the same.

**Divergence guard.** Every fit starts at the identity map, and a fit that works ends below the identity's
loss. When a whole ``window`` of steps averages more than :data:`DIVERGED` (2) times the first step's loss, and
also more than twice the identity's loss averaged over up to :data:`REFERENCE_BATCHES` mini-batches of the first
source prompts (the first step's loss is one draw of a mini-batch; on SmolLM2's attention-head outputs the
identity's loss over 6-prompt batches ranges over 4.5× — so the confirmation is what keeps a lucky first
batch from reading as divergence; it costs those forwards only when the first test fires), the steps are too
large for this model's activations: Adam moves every entry by about ``lr`` per step, and a column whose spread
is far below the median (those attention-head outputs: 1 % of columns under 1/20 of the median std) is thrown
many of its own standard deviations at once. The fit then starts again from the identity at ``lr / 10`` (at
most :data:`RESTARTS` times, each with a ``warnings.warn`` giving the numbers; the history keeps them under
``"restarts"``) and raises :class:`SteeringError` if that diverges too. Fits that do not diverge are untouched
(the rule only reads their losses). Off for the relaxed-lasso refit (it does not start at the identity).

**Partial strengths** (``partial = p > 0``). At inference a map runs at any strength λ
(``h' = (1−λ+λω)⊙h + λb``), but a map trained only at λ = 1 need not do anything useful at λ = 0.5: the
sites' moves are fitted jointly to land together, and half of each need not land half-way. With
``partial`` a fraction ``p`` of the steps (drawn at random) run the maps at a strength λ ~ U(0, 1) and
transport the source onto the displacement interpolation at λ between its own unsteered distribution and
the target's (per column: the quantile functions mixed, ``(1−λ)·Q_source + λ·Q_target``; the other steps
run at λ = 1 against the target). The strength knob then traces a path from the unsteered model to the
full map instead of being a straight line only at its end. Costs one unsteered pass over the source
prompts (the caller's, ``source=``), nothing per step.

**The shift's unit.** ω is unitless but b lives in activation units, and Adam moves a parameter by about
``lr`` per step whatever its scale: learned as is, b would move 10× further, relative to the activations, on a
model whose neurons are 10× smaller. So b is learned as ``unit · b̃`` (:func:`shift_unit`: the target
activations' median column std relative to the model the defaults were picked on), and ``lr``, ``l1`` and
``group_l2`` mean the same on any model: a function-preserving rescaling of the neurons (×c into a site, ×1/c
out of it) gives the same fit, ω the same and b ×c (tested). On that model the unit is 1.

**Sparsity** (``l1``, ``group_l2``: the sparse group lasso, proximal steps in Adam's metric, :mod:`.prox`)
chooses which entries move; its shrinkage also pulls the entries it keeps toward the identity. With
``refit_steps > 0`` a second phase (the relaxed lasso) refits the chosen support without the penalty — a
fresh optimizer and cosine schedule over ``refit_steps``, every entry outside the support held at the
identity — so the map stays as sparse and its kept entries move as far as the loss asks. ``density = d < 1``
caps the support instead of (or on top of) the penalty: after the first phase at most ``floor(d · 2Σd)`` entries
stay off the identity, those whose own move of the activations is largest (:func:`strongest_entries`: |ω − 1| times
the column's RMS on the target prompts, |b|), and the refit then fits only those. The share at the identity is
then a guarantee on any model, where a penalty weight gives a share that depends on the model and the data.

**Checks.** Options are refused with :class:`SteeringError` naming the first bad one before anything runs
(``steps`` a positive int, ``l1``/``group_l2`` finite and >= 0, ...: :meth:`Recipe.validate`). A fit that
ends as the identity map, or whose sparsity switched off more than 95 % of its sites, still returns its
steering but says so with ``warnings.warn`` and the numbers (:func:`warn_if_inert`): such a steering does
nothing (or almost nothing), which is easy to miss when only the artifact is looked at.
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import asdict, dataclass

import torch
from tqdm.auto import tqdm

from ..errors import SteeringError
from ..losses import column_weights, paired_loss, quantile_levels, sorted_rows, wasserstein_loss_to
from .prox import prox_sparse_group, step_sizes

SCHEDULES = ("cosine", "constant")
# A window of steps whose mean loss is above DIVERGED times the identity's diverges: 2 is far above the spread of
# the identity's loss over mini-batches, of which the first step's loss is one draw.
DIVERGED = 2.0
REFERENCE_BATCHES = 4  # mini-batches of the identity's loss that confirm a divergence the first step's loss suggests
RESTARTS = 2  # restarts from the identity, each at a tenth of the learning rate, before a diverging fit is an error
PRESERVE_LOSSES = ("paired", "wasserstein", "local")
OPTIMIZERS = ("adam", "sgd")


@dataclass(frozen=True)
class Recipe:
    """Every knob of the training loop (the forward's own options — sites, pooling — live with it)."""

    steps: int
    lr: float
    schedule: str = "cosine"
    lr_end: float = 1e-3
    betas: tuple = (0.9, 0.9)
    optimizer: str = "adam"
    batch_size: int = 20
    l1: float = 0.0
    group_l2: float = 0.0
    normalize: str | None = "var"
    preserve: float = 0.0
    preserve_loss: str = "wasserstein"
    transport_last: float = 1.0
    tol: float = 0.0
    window: int = 20
    refit_steps: int = 0
    density: float = 1.0
    partial: float = 0.0
    seed: int = 0
    autocast: bool = False

    def validate(self) -> None:
        """Raise :class:`SteeringError` naming the first bad option (before anything runs)."""
        def bad(name, why):
            raise SteeringError(f"{name}={getattr(self, name)!r}: {why}")

        def number(name, ok, why):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                    or not ok(value):
                bad(name, why)

        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            bad("steps", "expected a positive integer (0 steps would return the identity map)")
        number("lr", lambda v: v > 0, "expected a finite number > 0")
        if self.schedule not in SCHEDULES:
            bad("schedule", f"expected one of {SCHEDULES}")
        number("lr_end", lambda v: 0 < v <= 1, "expected a fraction of lr in (0, 1]")
        if (not isinstance(self.betas, (tuple, list)) or len(self.betas) != 2
                or not all(isinstance(b, (int, float)) and 0 <= b < 1 for b in self.betas)):
            bad("betas", "expected two numbers in [0, 1)")
        if self.optimizer not in OPTIMIZERS:
            bad("optimizer", f"expected one of {OPTIMIZERS}")
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size < 2:
            bad("batch_size", "expected an integer >= 2")
        number("l1", lambda v: v >= 0, "expected a finite number >= 0")
        number("group_l2", lambda v: v >= 0, "expected a finite number >= 0")
        if self.normalize not in (None, "none", "var"):
            bad("normalize", "expected None or 'var'")
        number("preserve", lambda v: v >= 0, "expected a finite number >= 0")
        if self.preserve_loss not in PRESERVE_LOSSES:
            bad("preserve_loss", f"expected one of {PRESERVE_LOSSES}")
        number("transport_last", lambda v: 0 < v <= 1,
               "expected the share of the sites (the last ones) the transport term counts, in (0, 1]")
        number("tol", lambda v: v >= 0, "expected a finite number >= 0 (0: no early stop)")
        if isinstance(self.window, bool) or not isinstance(self.window, int) or self.window < 1:
            bad("window", "expected an integer >= 1")
        if isinstance(self.refit_steps, bool) or not isinstance(self.refit_steps, int) or self.refit_steps < 0:
            bad("refit_steps", "expected an integer >= 0 (0: no refit)")
        number("density", lambda v: 0 < v <= 1,
               "expected the largest share of the (ω, b) entries that may leave the identity, in (0, 1] (1: no cap)")
        number("partial", lambda v: 0 <= v <= 1, "expected the fraction of steps at a partial strength, in [0, 1]")

    def lr_at(self, step: int, steps: int | None = None) -> float:
        """Learning rate of step ``step`` (0-based): constant, or cosine from lr to lr·lr_end over ``steps``
        (default: the recipe's; the refit phase passes its own length)."""
        steps = self.steps if steps is None else steps
        if self.schedule == "constant" or steps <= 1:
            return self.lr
        end = self.lr * self.lr_end
        return end + 0.5 * (self.lr - end) * (1 + math.cos(math.pi * step / (steps - 1)))

    @property
    def sparse(self) -> bool:
        return self.l1 > 0 or self.group_l2 > 0 or self.density < 1

    def hyperparams(self) -> dict:
        out = asdict(self)
        out["betas"] = list(self.betas)
        return out


def site_slices(sites: list[str], widths: dict) -> tuple[dict, int]:
    """``{site: slice}`` of each site's columns in the flat ``[Σd]`` parameter vectors, and Σd."""
    slices, offset = {}, 0
    for s in sites:
        slices[s] = slice(offset, offset + widths[s])
        offset += widths[s]
    return slices, offset


def converged(losses: list[float], window: int, tol: float) -> bool:
    """The stopping rule: the last ``window`` losses' mean improved on the previous window's mean by less
    than ``tol`` (relative). Checked only at whole windows, from the end of the second one."""
    k = len(losses)
    if tol <= 0 or k < 2 * window or k % window:
        return False
    prev = sum(losses[-2 * window:-window]) / window
    cur = sum(losses[-window:]) / window
    return (prev - cur) <= tol * abs(prev)


def diverging(losses: list[float], window: int, identity: float) -> bool:
    """The divergence rule: the last ``window`` losses average more than :data:`DIVERGED` times ``identity`` (the
    identity map's loss). Checked only at whole windows."""
    k = len(losses)
    return k >= window and k % window == 0 and sum(losses[-window:]) / window > DIVERGED * identity


@dataclass
class Targets:
    """The unsteered target activations: ``v [rows, Σd]`` and, per target prompt, its rows (one row per
    prompt for mean/last pooling, a block of token rows for token pooling)."""

    v: torch.Tensor
    rows_of: list[torch.Tensor]

    @classmethod
    def from_counts(cls, v: torch.Tensor, counts: list[int]) -> "Targets":
        starts = [0]
        for c in counts:
            starts.append(starts[-1] + c)
        if starts[-1] != v.shape[0]:
            raise SteeringError(f"target activations have {v.shape[0]} rows for {starts[-1]} pooled samples")
        idx = torch.arange(v.shape[0], device=v.device)
        return cls(v, [idx[a:b] for a, b in zip(starts, starts[1:])])


class FrozenModel:
    """Context for a fit: model params stop requiring grad (no wasted weight grads); flags restored after."""

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


SHIFT_UNIT_REF = 0.1556810736656189
"""The median column std of the target activations where the LLM defaults were picked: SmolLM2-135M-Instruct,
its MLP hidden neurons, token pooling, the 32 ``nontoxic`` fit prompts (``v.std(0).median()`` in float32)."""


def shift_unit(v: torch.Tensor, ref: float | None = SHIFT_UNIT_REF) -> float:
    """The size b is learned in: the median over columns of ``v``'s std (the unsteered target activations),
    divided by ``ref``; 1 with ``ref=None`` (b in activation units) or when the median is 0 or not finite."""
    if ref is None or v.shape[0] < 2:
        return 1.0
    m = float(v.float().std(0).median())
    return m / ref if m > 0 and math.isfinite(m) else 1.0


def train_maps(forward, *, n_source: int, targets: Targets, slices: dict, recipe: Recipe, device,
               source: torch.Tensor | None = None, progress: bool = True, desc: str = "LinEAS",
               shift_ref: float | None = SHIFT_UNIT_REF) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Run the LinEAS loop; returns the trained flat ``(omega, shift)`` and the training history.

    Args:
        forward: a training forward (see the module docstring), not yet entered.
        n_source: number of source prompts (the forward's indices ``0..n_source-1``).
        targets: unsteered target activations (pooled like the forward pools).
        slices: ``{site: slice}`` of each site's columns in the flat vectors, in ``z``'s column order.
        source: unsteered source activations ``[rows, Σd]`` (pooled like the forward pools); needed when
            ``recipe.partial > 0`` (the λ = 0 end of the interpolated targets).
        shift_ref: the reference of :func:`shift_unit`; None learns b in activation units (the pipelines'
            fits, whose defaults were picked that way).
    """
    recipe.validate()
    if recipe.partial > 0 and source is None:
        raise SteeringError(f"partial={recipe.partial}: training at partial strengths needs the unsteered "
                            f"source activations (source=)")
    n_target = len(targets.rows_of)
    v = targets.v.to(device)
    weights = column_weights(v, recipe.normalize)
    width = v.shape[1]
    t_weights = transport_weights(weights, slices, recipe.transport_last, device)
    # the transport term sorts only the columns it counts (the others weigh exactly 0: same gradient)
    t_cols = transport_columns(t_weights, width)
    t_weights = None if t_weights is None else t_weights[t_cols]
    vt_goal = sorted_rows(v[:, t_cols])  # [counted columns, rows]: transposed and sorted once
    ends = None
    if recipe.partial > 0:  # both ends of the interpolation at common quantile levels, sorted
        s_sorted = sorted_rows(source.to(device).float()[:, t_cols])
        k = max(s_sorted.shape[1], vt_goal.shape[1])
        ends = (quantile_levels(s_sorted, k), quantile_levels(vt_goal, k))
    gen = torch.Generator().manual_seed(recipe.seed)
    unit = shift_unit(v, shift_ref)
    omega = torch.ones(width, device=device, requires_grad=True)
    shift = torch.zeros(width, device=device, requires_grad=True)  # b̃: b = unit · b̃

    def optimizer() -> torch.optim.Optimizer:
        if recipe.optimizer == "adam":
            return torch.optim.Adam([omega, shift], lr=recipe.lr, betas=tuple(recipe.betas))
        return torch.optim.SGD([omega, shift], lr=recipe.lr)

    opt = optimizer()
    groups = list(slices.values())
    history = {"loss": [], "transport": [], "preserve": [], "lr": [], "strength": [], "nnz": [], "active_sites": [],
               "step_seconds": [], "phase_seconds": []}

    def batch(n: int) -> list[int]:
        return list(range(n)) if recipe.batch_size >= n else \
            torch.randperm(n, generator=gen)[:recipe.batch_size].tolist()

    def run(n_steps: int, support: tuple | None, label: str, lr_scale: float = 1.0) -> bool:
        """``n_steps`` steps of the loop at ``lr_scale`` times the recipe's learning rates; with ``support``
        (masks of ω and b), the relaxed-lasso refit: no penalty, and every entry outside the support is held
        at the identity. Returns whether it stopped because the fit diverges (:func:`diverging`)."""
        l1, group_l2 = (0.0, 0.0) if support is not None else (recipe.l1, recipe.group_l2)
        guard = support is None
        bar = tqdm(range(n_steps), desc=label, disable=not progress)
        for step in bar:
            t_step = time.perf_counter()
            lr = lr_scale * recipe.lr_at(step, n_steps)
            for g in opt.param_groups:
                g["lr"] = lr
            lam = 1.0
            if recipe.partial > 0 and support is None and float(torch.rand((), generator=gen)) < recipe.partial:
                lam = float(torch.rand((), generator=gen))
            if lam == 1.0:
                bound = (omega, unit * shift)  # × 1.0 is exact: on SmolLM2 the fit is unchanged
                goal = vt_goal
            else:  # the maps at strength λ, against the interpolated target (sorted: a mix of sorted rows)
                bound = (1 + lam * (omega - 1), (lam * unit) * shift)
                goal = (1 - lam) * ends[0] + lam * ends[1]
            forward.bind(*bound)
            src = batch(n_source)
            tgt = batch(n_target) if recipe.preserve > 0 else []
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=recipe.autocast):
                z, owner = forward(src + [n_source + j for j in tgt])
            z = z.float()
            if not torch.isfinite(z).all():
                bad = next(s for s, sl in slices.items() if not torch.isfinite(z[:, sl]).all())
                raise SteeringError(f"site {bad!r}: NaN or inf in steered activations during fit "
                                    f"(lower lr={recipe.lr} or check the model)")
            t_fwd = time.perf_counter()
            is_src = owner < n_source
            transport = wasserstein_loss_to(z[is_src][:, t_cols], goal, t_weights)
            loss = transport
            if tgt:
                if recipe.preserve_loss == "local":  # needs no unsteered reference: the rows carry their input
                    kept = paired_loss(local_move(z[~is_src], *bound), 0.0, weights)
                else:
                    # the same target prompts unsteered, row for row in the forward's order
                    order = torch.unique_consecutive(owner[~is_src]).tolist()
                    ref = v[torch.cat([targets.rows_of[j - n_source] for j in order]).to(device)]
                    kept = (paired_loss(z[~is_src], ref, weights) if recipe.preserve_loss == "paired"
                            else wasserstein_loss_to(z[~is_src], sorted_rows(ref), weights))
                loss = transport + recipe.preserve * kept
            t_loss = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            t_bwd = time.perf_counter()
            opt.step()
            prox_sparse_group(omega.data, shift.data, step_sizes(opt, omega), step_sizes(opt, shift),
                              l1, group_l2, groups)
            with torch.no_grad():
                if support is not None:
                    omega.data[~support[0]] = 1.0
                    shift.data[~support[1]] = 0.0
                off = (omega != 1).int() + (shift != 0).int()
                nnz = int(off.sum())
                active = sum(int(off[sl].any()) for sl in groups)
            history["loss"].append(loss.item())
            history["transport"].append(transport.item())
            history["preserve"].append(kept.item() if tgt else 0.0)
            history["lr"].append(lr)
            history["strength"].append(lam)
            history["nnz"].append(nnz)
            history["active_sites"].append(active)
            t_end = time.perf_counter()
            history["step_seconds"].append(round(t_end - t_step, 4))
            history["phase_seconds"].append({"forward": round(t_fwd - t_step, 4), "loss": round(t_loss - t_fwd, 4),
                                             "backward": round(t_bwd - t_loss, 4), "update": round(t_end - t_bwd, 4)})
            bar.set_postfix(loss=f"{history['loss'][-1]:.4g}", nnz=nnz, sites=active)
            if guard and diverging(history["loss"], recipe.window, history["loss"][0]) \
                    and diverging(history["loss"], recipe.window, identity_loss()):
                bar.close()
                return True
            if support is None and converged(history["loss"], recipe.window, recipe.tol):
                break
        return False

    reference: list[float] = []

    def identity_loss() -> float:
        """The identity map's loss (transport only: the preservation term is 0 there) averaged over up to
        :data:`REFERENCE_BATCHES` mini-batches of the first source prompts, in order; computed once."""
        if not reference:
            forward.bind(torch.ones_like(omega), torch.zeros_like(shift))
            losses = []
            with torch.no_grad():
                for k in range(0, min(n_source, REFERENCE_BATCHES * recipe.batch_size), recipe.batch_size):
                    z, _ = forward(list(range(k, min(k + recipe.batch_size, n_source))))
                    losses.append(float(wasserstein_loss_to(z.float()[:, t_cols], vt_goal, t_weights)))
            reference.append(sum(losses) / len(losses))
        return reference[0]

    with forward:
        restarts, lr_scale = [], 1.0
        while run(recipe.steps, None, desc, lr_scale):
            losses = history["loss"]
            event = {"after_steps": len(losses), "lr": recipe.lr * lr_scale, "identity_loss": identity_loss(),
                     "first_loss": losses[0], "window_loss": sum(losses[-recipe.window:]) / recipe.window}
            why = (f"{desc} fit diverged at lr={event['lr']:.3g}: the mean loss of steps "
                   f"{len(losses) - recipe.window + 1}–{len(losses)} is {event['window_loss']:.4g}, over {DIVERGED} × "
                   f"the identity map's {event['identity_loss']:.4g}")
            if len(restarts) == RESTARTS:
                raise SteeringError(f"{why}, after {RESTARTS} restarts at a tenth of the learning rate each "
                                    f"(lower lr further, or check the sites' activations for columns of near-zero spread)")
            lr_scale /= 10
            restarts.append({**event, "new_lr": recipe.lr * lr_scale})
            warnings.warn(f"{why}; restarting from the identity at lr={recipe.lr * lr_scale:.3g}", stacklevel=3)
            with torch.no_grad():
                omega.fill_(1.0)
                shift.zero_()
            opt = optimizer()
            for key in history:
                history[key] = []
        history["restarts"] = restarts
        history["refit_from"] = None
        history["density_cap"] = None
        if recipe.density < 1:  # keep only the entries that move the activations most
            with torch.no_grad():
                keep_w, keep_b = strongest_entries(omega, unit * shift, v.float().pow(2).mean(0).sqrt(),
                                                   recipe.density)
                before = int((omega != 1).sum() + (shift != 0).sum())
                omega[~keep_w] = 1.0
                shift[~keep_b] = 0.0
            history["density_cap"] = {"entries": 2 * width, "moved_before": before,
                                      "kept": int(keep_w.sum() + keep_b.sum())}
        if recipe.refit_steps and recipe.sparse:
            # relaxed lasso: the penalty (or the density cap) chose the support; refitting it without the
            # penalty undoes the shrinkage the penalty put on the entries it kept (a fresh optimizer and schedule)
            history["refit_from"] = len(history["loss"])
            support = (omega.detach() != 1, shift.detach() != 0)
            opt = optimizer()
            run(recipe.refit_steps, support, desc + " refit", lr_scale)
    history["steps_run"] = len(history["loss"])
    history["stopped_early"] = (history["refit_from"] or history["steps_run"]) < recipe.steps
    history["shift_unit"] = unit
    b = unit * shift.detach()
    warn_if_inert(omega.detach(), b, groups, recipe)
    return omega.detach(), b, history


def strongest_entries(omega: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor,
                      density: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Masks of the ω and b entries to keep under a density cap: at most ``floor(density · 2d)`` of the ``2d``
    entries, those whose own move of the activations is largest — ``|ω − 1| · scale`` for a scale entry
    (``scale``: each column's RMS, so the move is in activation units) and ``|b|`` for a shift entry. Entries
    already at the identity are never kept; with no more moved entries than the cap, every moved one is."""
    effect = torch.cat([(omega - 1).abs() * scale, shift.abs()])
    moved = effect > 0
    budget = math.floor(density * effect.numel())
    if int(moved.sum()) > budget:
        keep = torch.zeros_like(moved)
        keep[torch.topk(effect, budget).indices] = True
        moved = moved & keep
    return moved[:omega.numel()], moved[omega.numel():]


def transport_weights(weights: torch.Tensor | None, slices: dict, share: float, device) -> torch.Tensor | None:
    """The transport term's column weights with only the last ``ceil(share · n)`` of the ``n`` sites (in the fit's
    site order) counted, each × n / that count so the term keeps its size against the preservation term;
    ``share = 1``: ``weights`` unchanged (every site)."""
    if share >= 1:
        return weights
    spans = list(slices.values())
    keep = max(1, math.ceil(share * len(spans) - 1e-9))
    mask = torch.zeros(max(sl.stop for sl in spans), device=device)
    for sl in spans[len(spans) - keep:]:
        mask[sl] = len(spans) / keep
    return mask if weights is None else weights * mask


def transport_columns(t_weights: torch.Tensor | None, width: int) -> slice | torch.Tensor:
    """The columns the transport term counts (weight ≠ 0): a slice where they form one block (the last sites'
    columns, as :func:`transport_weights` leaves them), else their indices; every column without weights.

    A column of weight 0 adds exactly 0 to the loss and to every gradient, so the loop sorts and compares only
    these: at ``transport_last = 1/3`` a third of the columns, the transport term ~3× cheaper, the maps the same."""
    if t_weights is None:
        return slice(0, width)
    idx = torch.nonzero(t_weights, as_tuple=True)[0]
    if len(idx) == 0:
        return idx
    first, last = int(idx[0]), int(idx[-1])
    return slice(first, last + 1) if last - first + 1 == len(idx) else idx


def local_move(z: torch.Tensor, omega: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Each map's own displacement of the rows ``z = ω⊙h + b`` it wrote: ``z − h = z − (z − b)/ω`` (|ω| kept
    ≥ 1e-3). Unlike ``z − unsteered`` it leaves out what the maps upstream moved (mean pooling is linear,
    so the identity holds for pooled rows too)."""
    safe = torch.where(omega.abs() < 1e-3, torch.full_like(omega, 1e-3).copysign(omega), omega)
    return z - (z - shift) / safe


INERT_SITES = 0.95  # warn when sparsity switched off more than this fraction of the sites


def warn_if_inert(omega: torch.Tensor, shift: torch.Tensor, groups: list[slice], recipe: Recipe) -> None:
    """``warnings.warn`` when a fit did (almost) nothing: every map is the identity (ω = 1, b = 0), or
    sparsity (``l1``/``group_l2``) left more than :data:`INERT_SITES` of the sites exactly the identity.
    The numbers go in the message, e.g. ``sparsity switched off 58 of 60 sites (96.7 %)``."""
    with torch.no_grad():
        moved = (omega != 1) | (shift != 0)
        active = sum(int(moved[sl].any()) for sl in groups)
    n, off = len(groups), len(groups) - active
    sparse = recipe.sparse
    hint = f"; lower l1={recipe.l1}/group_l2={recipe.group_l2}" + (
        f" or raise density={recipe.density}" if recipe.density < 1 else "") if sparse else \
        f"; raise lr={recipe.lr} or steps={recipe.steps}"
    if active == 0:
        warnings.warn(f"fit returned the identity map: all {n} sites and {omega.numel()} neurons are left "
                      f"unchanged (ω = 1, b = 0){hint}", stacklevel=3)
    elif sparse and n and off / n > INERT_SITES:
        warnings.warn(f"sparsity switched off {off} of {n} sites ({100 * off / n:.1f} %){hint}", stacklevel=3)
