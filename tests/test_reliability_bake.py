"""bake is validated and all-or-nothing.

* ``strength`` must be one finite real number: NaN, ±inf, complex, bool, strings and tensors of the wrong
  shape raise SteeringError naming the value, before anything changes (it used to bake NaN into weights).
* A failure at any point of the edit — injected at the k-th config setattr, module setattr (bias
  creation), fold step, ``copy_`` or ``add_`` of a weight — leaves the model bit-identical (state_dict,
  module tree, hooks, probe outputs, config), and the model then bakes normally.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import lineas_fast as lf
from conftest import make_model, random_steering
from lineas_fast.errors import SteeringError
from lineas_fast.patching.fold import WeightEditor
from lineas_fast.patching.handle import ATTR
from snapshot import assert_unchanged, model_snapshot

pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------- strength
BAD_STRENGTHS = [float("nan"), float("inf"), -float("inf"), 1 + 0j, complex(0.5, 0.5), True, False, "1.0", None,
                 [1.0], np.float64("nan"), np.bool_(True), torch.tensor([1.0, 2.0]), torch.tensor([]),
                 torch.ones(1, 2), torch.tensor(float("nan")), torch.tensor([float("inf")]), torch.tensor(True),
                 torch.tensor(1 + 0j)]


@pytest.mark.parametrize("strength", BAD_STRENGTHS, ids=[repr(s).replace(" ", "") for s in BAD_STRENGTHS])
def test_bake_rejects_bad_strength_before_any_change(strength):
    model = make_model("llama")
    st = random_steering(model, "norms", seed=1)
    snap = model_snapshot(model)
    with pytest.raises(SteeringError) as e:
        lf.bake(model, st, strength=strength)
    assert "strength" in str(e.value) and repr(strength) in str(e.value), str(e.value)
    assert_unchanged(model, snap)
    assert getattr(model, ATTR, None) is None


@pytest.mark.parametrize("strength", [0.5, np.float32(0.5), np.float64(0.5), torch.tensor(0.5),
                                      torch.tensor([0.5]), torch.tensor(0.5, dtype=torch.float64)])
def test_bake_accepts_real_scalars_alike(strength):
    model, ref = make_model("gpt2"), make_model("gpt2")
    st = random_steering(model, "norms", seed=2)
    lf.bake(ref, st, strength=0.5)
    lf.bake(model, st, strength=strength)
    assert_unchanged(model, model_snapshot(ref))


def test_integer_strengths_are_reals():
    model, ref = make_model("gpt2"), make_model("gpt2")
    st = random_steering(model, "mlp_out", seed=2)
    lf.bake(ref, st, strength=1.0)
    lf.bake(model, st, strength=1)
    assert_unchanged(model, model_snapshot(ref))


# ---------------------------------------------------------------- all or nothing
class Injected(Exception):
    pass


class Injector:
    """Wraps the mutating calls of a bake with one shared counter; raises at call ``fail_at``."""

    def __init__(self, fail_at: int | None = None):
        self.fail_at, self.calls, self.log = fail_at, 0, []

    def wrap(self, what: str, fn):
        def wrapper(*args, **kwargs):
            self.calls += 1
            self.log.append(what)
            if self.calls == self.fail_at:
                raise Injected(f"injected failure at call {self.calls} ({what})")
            return fn(*args, **kwargs)
        return wrapper

    def install(self, monkeypatch, model):
        cfg_cls = type(model.config)
        for owner, name, what in [(torch.Tensor, "copy_", "copy_"), (torch.Tensor, "add_", "add_"),
                                  (torch.nn.Module, "__setattr__", "module setattr"),
                                  (cfg_cls, "__setattr__", "config setattr"),
                                  (WeightEditor, "apply", "fold step")]:
            monkeypatch.setattr(owner, name, self.wrap(what, getattr(owner, name)))


def bake_with(monkeypatch, model, st, strength, fail_at=None) -> Injector:
    inj = Injector(fail_at)
    with monkeypatch.context() as m:
        inj.install(m, model)
        lf.bake(model, st, strength=strength)
    return inj


CASES = [  # (arch, sites, strength): flags + created biases + RMSNorm folds; Conv1D input/output folds; ...
    ("llama", "norms", 0.8),
    ("gpt2", "mlp_hidden", 1.0),
    ("qwen2", r"model\.layers\.\d+\.input_layernorm", 1.0),   # native q/k/v biases, no flag
    ("llama", "mlp_hidden", 0.7),                              # Linear input site: mlp_bias + W c
]


@pytest.mark.parametrize("arch,sites,strength", CASES, ids=[f"{a}-{s[:12]}" for a, s, _ in CASES])
def test_failure_at_every_step_leaves_model_unchanged(monkeypatch, arch, sites, strength):
    model = make_model(arch)
    st = random_steering(model, sites, seed=11)
    dry = bake_with(monkeypatch, model, st, strength)  # the clean run: how many mutating calls there are
    baked = model_snapshot(model)
    assert dry.calls >= 4 and {"fold step", "copy_"} <= set(dry.log), dry.log
    if arch == "llama":
        assert {"config setattr", "module setattr"} <= set(dry.log)
    for k in range(1, dry.calls + 1):
        model = make_model(arch)
        snap = model_snapshot(model)
        with pytest.raises(Injected):
            bake_with(monkeypatch, model, st, strength, fail_at=k)
        try:
            assert_unchanged(model, snap)
            assert getattr(model, ATTR, None) is None
        except AssertionError as e:
            raise AssertionError(f"failure injected at call {k} ({dry.log[k - 1]}): {e}") from None
        if k in (1, dry.calls // 2, dry.calls):  # and the model bakes normally afterwards
            lf.bake(model, st, strength=strength)
            assert_unchanged(model, baked)


def test_meta_device_parameter_refused_before_any_change():
    """A parameter that was never materialised used to fail half-way (biases created, flags flipped)."""
    model = make_model("llama")
    mlp = model.model.layers[0].mlp
    mlp.up_proj.weight = torch.nn.Parameter(mlp.up_proj.weight.to("meta"))
    st = random_steering(model, "norms", seed=3)
    snap = model_snapshot(model, probe=False)
    with pytest.raises(SteeringError, match=r"model\.layers\.0\.mlp\.up_proj\.weight.*meta"):
        lf.bake(model, st)
    assert_unchanged(model, snap)


def test_unexpected_error_is_reraised_not_swallowed(monkeypatch):
    model = make_model("llama")
    st = random_steering(model, "norms", seed=4)
    snap = model_snapshot(model)

    def boom(self, step, a, c):
        raise MemoryError("out of memory half-way")

    monkeypatch.setattr(WeightEditor, "apply", boom)
    with pytest.raises(MemoryError, match="half-way"):
        lf.bake(model, st)
    assert_unchanged(model, snap)
