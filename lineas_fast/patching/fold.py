"""The ``fold`` apply mode and ``bake``: steering folded exactly into weights (SPEC §4).

With a = 1−λ+λω and c = λb per site:

* LayerNorm output:  γ' = a⊙γ, β' = a⊙β + c.
* RMSNorm output:    γ' = a⊙γ (Gemma's ``(1+γ)`` form: 1+γ' = a⊙(1+γ)); the shift c goes into the
  biases of the Linear layers consuming the norm (bias += W c). A norm feeding the residual stream
  (no consumers in :mod:`lineas_fast.sites` data, e.g. Gemma post-norms) cannot absorb a shift.
* Linear output:     W'[j,:] = a_j W[j,:], bias' = a⊙bias + c  (also for sites that are the output of
  one Linear, e.g. ``mlp`` → ``mlp.down_proj``).
* Linear input (``:in``): W' = W·diag(a), bias' = bias + W c.
* GroupNorm output (diffusers' ResNets): per channel, as LayerNorm. A LayerNorm/GroupNorm without affine
  parameters (DiT blocks' pre-modulation norms) gets them at run time: γ' = a, β' = c.
* Conv2d output: W'[o] = a_o W[o], bias' = a⊙bias + c.

Sites are folded in reverse model order, each using the weights as already modified downstream, which
makes stacked folds on one Linear (input site + output site + a norm shift) compose exactly. Every
touched parameter's original is kept, so unfold restores bit-exactly (nothing is divided back).

:class:`FoldPatch` is this mode's :class:`~lineas_fast.patching.patch.Patch` and the one fold code path:
``steer_(mode='fold')`` installs one, ``set_strength`` refolds it, ``remove`` restores it, and ``bake`` is
a FoldPatch with the checkpoint extras (config flags, explicit zero biases) whose undo record is then
dropped (:meth:`FoldPatch.forget`). Folding, refolding at another strength and restoring are all or
nothing: should any step fail, every touched parameter (and config flag) is put back as it was before
the call (created ones removed or re-created) and the error re-raised.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..errors import SteeringError
from ..sites import Site, decoder_blocks, family
from .patch import Patch


@dataclass
class FoldStep:
    site: str
    kind: str               # "layernorm" | "rmsnorm" | "linear_out" | "linear_in" | "conv_out"
    module: str             # the module whose parameters change
    consumers: tuple = ()   # rmsnorm: Linear modules absorbing the shift
    offset: float = 0.0     # rmsnorm: Gemma's (1 + weight)


def _is_linear(m: nn.Module) -> bool:
    return isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D"


def _split_block(model, module_name: str) -> tuple[str, str]:
    """``model.layers.3.mlp`` → (``model.layers.3.``, ``mlp``); ('', name) outside the blocks."""
    try:
        prefix, blocks = decoder_blocks(model)
    except SteeringError:
        return "", module_name
    for i in range(len(blocks)):
        p = f"{prefix}.{i}."
        if module_name.startswith(p):
            return p, module_name[len(p):]
    return "", module_name


def plan_fold(model, sites: list[str], shift_nonzero: dict[str, bool]) -> list[FoldStep]:
    """Decide how each site folds; refuse (naming every unfoldable site) before anything changes."""
    fam = family(model)
    steps, refused = [], []
    for spec in sites:
        site = Site.parse(spec)
        module = model.get_submodule(site.module)
        cls = type(module).__name__
        prefix, rel = _split_block(model, site.module)
        rel_spec = rel + spec[len(site.module):]
        plain_norm = isinstance(module, (nn.LayerNorm, nn.GroupNorm))  # with or without affine parameters
        if not site.is_input and site.index is None and "norm" in cls.lower() and \
                (plain_norm or getattr(module, "weight", None) is not None):
            if "rms" in cls.lower():
                consumers = tuple(prefix + c for c in (fam.consumers.get(rel, ()) if fam else ()))
                if shift_nonzero[spec] and not consumers:
                    refused.append(f"{spec} (RMSNorm output feeding the residual stream: no bias can absorb its shift)")
                    continue
                steps.append(FoldStep(spec, "rmsnorm", site.module, consumers, fam.norm_offset if fam else 0.0))
            else:
                steps.append(FoldStep(spec, "layernorm", site.module))
        elif _is_linear(module) and site.index is None:
            steps.append(FoldStep(spec, "linear_in" if site.is_input else "linear_out", site.module))
        elif isinstance(module, nn.Conv2d) and site.index is None and not site.is_input:
            steps.append(FoldStep(spec, "conv_out", site.module))
        elif fam and rel_spec in fam.linear_alias:
            steps.append(FoldStep(spec, "linear_out", prefix + fam.linear_alias[rel_spec]))
        else:
            refused.append(f"{spec} ({cls} is not a norm or Linear layer)")
    if refused:
        raise SteeringError("cannot fold these sites (use mode='hooks'): " + "; ".join(refused))
    return steps


class WeightEditor:
    """Applies fold steps, remembering every original parameter (and created biases) for exact restore."""

    def __init__(self, model):
        self.model = model
        self.saved: dict[tuple[str, str], torch.Tensor | None] = {}

    def _param(self, module_name: str, attr: str, like: torch.Tensor | None = None, fill: float = 0.0) -> torch.Tensor:
        module = self.model.get_submodule(module_name)
        p = getattr(module, attr)
        key = (module_name, attr)
        if key not in self.saved:
            self.saved[key] = None if p is None else p.detach().clone()
        if p is None:  # created: removed again by restore()
            p = nn.Parameter(torch.full_like(like, fill), requires_grad=False)
            setattr(module, attr, p)
        return p.data

    def add_bias(self, module_name: str, delta: torch.Tensor) -> None:
        module = self.model.get_submodule(module_name)
        w = module.weight.data
        out_dim = w.shape[1] if type(module).__name__ == "Conv1D" else w.shape[0]
        bias = self._param(module_name, "bias", like=w.new_zeros(out_dim))
        bias.add_(delta.to(bias.dtype))

    def zero_bias(self, module_name: str) -> None:
        """Give a Linear without a bias an explicit zero one (a plain Parameter, as a checkpoint's own);
        :meth:`restore` removes it again."""
        lin = self.model.get_submodule(module_name)
        if lin.bias is None:
            w = lin.weight
            out_dim = w.shape[1] if type(lin).__name__ == "Conv1D" else w.shape[0]
            self.saved.setdefault((module_name, "bias"), None)
            lin.bias = nn.Parameter(w.new_zeros(out_dim))

    def linear_shift(self, module_name: str, c: torch.Tensor) -> torch.Tensor:
        """W c for an input shift c (in the module's input space) — the bias it induces."""
        module = self.model.get_submodule(module_name)
        w = module.weight.data.float()
        return (c @ w) if type(module).__name__ == "Conv1D" else (w @ c)

    def apply(self, step: FoldStep, a: torch.Tensor, c: torch.Tensor) -> None:
        module = self.model.get_submodule(step.module)
        dev, dtype = _home(self.model, module)
        a, c = a.to(dev), c.to(dev)
        if step.kind == "layernorm":
            w = self._param(step.module, "weight", like=a.to(dtype), fill=1.0)
            w.copy_((a * w.float()).to(w.dtype))
            if module.bias is not None or bool(c.any()):
                b = self._param(step.module, "bias", like=w)
                b.copy_((a * b.float() + c).to(b.dtype))
        elif step.kind == "rmsnorm":
            w = self._param(step.module, "weight")
            w.copy_((a * (w.float() + step.offset) - step.offset).to(w.dtype))
            if bool(c.any()):
                for name in step.consumers:
                    self.add_bias(name, self.linear_shift(name, c))
        elif step.kind == "linear_out":
            conv = type(module).__name__ == "Conv1D"
            w = self._param(step.module, "weight")
            w.copy_((w.float() * (a[None, :] if conv else a[:, None])).to(w.dtype))
            if module.bias is not None or bool(c.any()):
                b = self._param(step.module, "bias", like=w.new_zeros(a.numel()))
                b.copy_((a * b.float() + c).to(b.dtype))
        elif step.kind == "conv_out":
            w = self._param(step.module, "weight")
            w.copy_((w.float() * a[:, None, None, None]).to(w.dtype))
            if module.bias is not None or bool(c.any()):
                b = self._param(step.module, "bias", like=w.new_zeros(a.numel()))
                b.copy_((a * b.float() + c).to(b.dtype))
        elif step.kind == "linear_in":
            conv = type(module).__name__ == "Conv1D"
            if bool(c.any()):
                self.add_bias(step.module, self.linear_shift(step.module, c))
            w = self._param(step.module, "weight")
            w.copy_((w.float() * (a[:, None] if conv else a[None, :])).to(w.dtype))

    @property
    def created(self) -> list[tuple[str, str]]:
        """``(module, attr)`` of every parameter the fold had to create (absent before)."""
        return [key for key, orig in self.saved.items() if orig is None]

    def current(self) -> dict[tuple[str, str], torch.Tensor | None]:
        """A copy of every parameter this editor touched, as it stands now (None where absent)."""
        out = {}
        for module_name, attr in self.saved:
            p = getattr(self.model.get_submodule(module_name), attr)
            out[(module_name, attr)] = None if p is None else p.detach().clone()
        return out

    def put(self, values: dict[tuple[str, str], torch.Tensor | None]) -> None:
        """Write back a :meth:`current` copy: values copied in place, absent parameters re-created (as the
        fold creates them: no grad), parameters absent in ``values`` removed."""
        with torch.no_grad():
            for (module_name, attr), value in values.items():
                module = self.model.get_submodule(module_name)
                p = getattr(module, attr)
                if value is None:
                    if p is not None:
                        setattr(module, attr, None)
                elif p is None:
                    setattr(module, attr, nn.Parameter(value.clone(), requires_grad=False))
                else:
                    p.data.copy_(value)

    def restore(self) -> None:
        """Put every original back (bit-exact); created parameters are removed. All or nothing: on a
        failure half-way the parameters are left as they were before the call, and the error re-raised."""
        before = self.current()
        try:
            for (module_name, attr), orig in self.saved.items():
                module = self.model.get_submodule(module_name)
                if orig is None:
                    setattr(module, attr, None)
                else:
                    getattr(module, attr).data.copy_(orig)
        except BaseException:
            self.put(before)
            raise
        self.saved.clear()


def _home(model: nn.Module, module: nn.Module) -> tuple[torch.device, torch.dtype]:
    """Device and dtype of a module's parameters (a parameter-free norm: the model's)."""
    p = next(module.parameters(), None)
    if p is None:
        p = next(model.parameters())
    return p.device, p.dtype


_ABSENT = object()  # a config flag the model's config did not have


def _rows_message(what: str, shown, rows: int) -> str:
    return (f"{what}: strength={shown} has {rows} rows, but mode='fold' has one fixed strength: per-row "
            f"strengths need mode='hooks'")


def _route_message(what: str) -> str:
    return f"{what}: mode='fold' has one fixed steering and strength; per-row routing needs mode='hooks' or 'fused'"


class FoldPatch(Patch):
    """One steering folded into the weights at one strength: one row, routed to that steering (id 0).

    Construction folds (refusing, before anything changes, a site no weight edit can express), keeping
    every touched parameter's original; :meth:`set_rows` refolds from those originals at the new
    strength (never dividing back); :meth:`remove` puts them back bit-exactly; :meth:`forget` drops them,
    leaving the fold for good. Each is all or nothing.

    ``bake=True`` adds what a stock checkpoint needs (:func:`bake_plan_flags`): the config flags giving
    the Linear layers a bias are set and every Linear they govern gets an explicit (zero) bias; a
    parameter on the meta device is refused first. Such a fold keeps its strength (``set_rows`` refuses).
    """

    def __init__(self, model, sites: list[str], scale: dict, shift: dict, strength: float, *, bake: bool = False):
        self.model, self.sites, self.scale, self.shift, self.bake = model, list(sites), scale, shift, bake
        plan = self._plan(float(strength))  # refusals before anything changes
        self._editor, self._config, self._forgotten = WeightEditor(model), {}, False
        try:
            self._apply(self._editor, self._config, plan)
        except BaseException:
            self._editor.restore()
            self._restore_config()
            raise
        self.strength = float(strength)

    def _plan(self, lam: float):
        """``(coeffs, steps, flags, biased)`` of this steering at strength ``lam``; refuses first."""
        model = self.model
        coeffs = {s: (1 - lam + lam * self.scale[s], lam * self.shift[s]) for s in self.sites}
        steps = plan_fold(model, self.sites, {s: bool(coeffs[s][1].any()) for s in self.sites})
        flags, biased = {}, []  # bake: config flags to set, Linear modules they govern (each gets a bias)
        if self.bake:
            flags = bake_plan_flags(model, steps, coeffs)
            if flags:
                prefix, blocks = decoder_blocks(model)
                biased = [f"{prefix}.{i}.{rel}" for group in flags.values() for i in range(len(blocks))
                          for rel in group]
            refuse_unmaterialised(model, {st.module for st in steps} | {c for st in steps for c in st.consumers}
                                  | set(biased))
        return coeffs, steps, flags, biased

    def _apply(self, editor: WeightEditor, config: dict, plan) -> None:
        coeffs, steps, flags, biased = plan
        with torch.no_grad():
            for flag in flags:
                config.setdefault(flag, getattr(self.model.config, flag, _ABSENT))
                setattr(self.model.config, flag, True)
            for name in biased:
                editor.zero_bias(name)
            for step in reversed(steps):  # downstream first, so stacked folds on one Linear compose
                editor.apply(step, *coeffs[step.site])

    def _restore_config(self) -> None:
        for flag, old in self._config.items():
            if old is _ABSENT:
                delattr(self.model.config, flag)
            else:
                setattr(self.model.config, flag, old)
        self._config = {}

    @staticmethod
    def check_rows(ids: torch.Tensor, strength: torch.Tensor, what: str, shown) -> None:
        """One row, routed to the steering (a static check: also before a FoldPatch is made)."""
        if ids.numel() != 1:
            raise SteeringError(_rows_message(what, shown, ids.numel()))
        if int(ids[0]) != 0:
            raise SteeringError(_route_message(what))

    def check_route(self, what: str) -> None:
        raise SteeringError(_route_message(what))

    def set_rows(self, ids: torch.Tensor, strength: torch.Tensor) -> None:
        """Refold at ``strength[0]`` from the saved originals; on a failure the old fold stays bit-exactly."""
        self.check_rows(ids, strength, "set_rows()", strength.tolist())
        if self._editor is None or self.bake:
            raise SteeringError("this fold has a fixed strength (removed, baked, or made for bake())")
        lam = float(strength[0])
        plan = self._plan(lam)  # refusals first
        old, new = self._editor, WeightEditor(self.model)
        folded, saved = old.current(), dict(old.saved)
        try:
            old.restore()
            self._apply(new, self._config, plan)
        except BaseException:
            new.restore()        # parameters the new fold touched: back to the originals
            old.put(folded)      # then the old fold as it stood
            old.saved = saved
            raise
        self._editor, self.strength = new, lam

    def remove(self) -> None:
        """Put every original back (created parameters removed, config flags reset); a second call does
        nothing. Refused after :meth:`forget` (the originals are gone)."""
        if self._forgotten:
            raise SteeringError("this fold was baked in: forget() dropped the originals, nothing to restore")
        if self._editor is None:
            return
        self._editor.restore()  # all or nothing
        self._restore_config()
        self._editor = None

    def forget(self) -> None:
        """Keep the fold for good: drop the saved originals (``bake``)."""
        self._editor, self._config, self._forgotten = None, {}, True


def fold_into(model, steering_sites: list[str], scale: dict, shift: dict, strength: float) -> WeightEditor:
    """Fold one steering at a fixed strength (a :class:`FoldPatch`); returns the editor that can restore
    the originals. All or nothing: a failure half-way restores every touched parameter and re-raises."""
    return FoldPatch(model, steering_sites, scale, shift, strength)._editor


def refuse_unmaterialised(model, modules) -> None:
    """A parameter on the meta device has no values to fold: refuse before anything changes."""
    for name in sorted(modules):
        for pname, p in model.get_submodule(name).named_parameters(recurse=False):
            if p.is_meta:
                raise SteeringError(f"cannot bake: parameter {name}.{pname} is on the meta device (not "
                                    f"materialised); load the model's weights first")


def bake_plan_flags(model, steps: list[FoldStep], coeffs: dict) -> dict[str, tuple[str, ...]]:
    """Config flags ``bake`` must set so a stock checkpoint has every bias the fold creates.

    Refuses (naming the sites) when a created bias has no config flag in this architecture.
    """
    fam = family(model)
    need: dict[str, str] = {}   # Linear module -> site that needs its bias
    for step in steps:
        c = coeffs[step.site][1]
        if not bool(c.any()):
            continue
        if step.kind == "rmsnorm":
            targets = step.consumers
        elif step.kind in ("linear_out", "linear_in"):
            targets = (step.module,)
        else:  # layernorm
            if model.get_submodule(step.module).bias is None:
                raise SteeringError(f"cannot bake site {step.site!r}: its LayerNorm has no bias in this architecture")
            continue
        for t in targets:
            if model.get_submodule(t).bias is None:
                need[t] = step.site
    flags, refused = {}, []
    for module_name, site in need.items():
        _, rel = _split_block(model, module_name)
        flag = next((f for f, group in (fam.bias_flags if fam else {}).items() if rel in group), None)
        if flag is None:
            refused.append(f"{site} (needs a bias on {rel}, which {getattr(model.config, 'model_type', '?')} checkpoints cannot hold)")
        else:
            flags[flag] = fam.bias_flags[flag]
    if refused:
        raise SteeringError("cannot bake into a stock checkpoint: " + "; ".join(sorted(set(refused))))
    return flags
