"""steer_ / set_strength / route / remove: validated first, applied all or nothing, serialised per model.

* Bad arguments (strength, mode, backend, steering, route names) raise SteeringError naming the argument,
  the value and what is valid, before anything changes.
* A failure injected at every mutating step (k-th call of ``copy_``/``fill_``/``add_``, module setattr,
  hook registration, fold step, table/routing update) of ``steer_`` (hooks, fused, fold), ``set_strength``,
  ``route`` and ``remove`` leaves the model bit-identical to before (state_dict, module tree, hooks, probe
  outputs, config: tests/snapshot.py), and the handle works normally afterwards.
* Strength 0 is bit-identical to the unsteered model in every mode (fused included).
* Threads: of 8 simultaneous ``steer_`` calls exactly one wins; 8 threads steering, routing and removing
  on one model leave it bit-identical, with no leaked hooks or modules.
"""

from __future__ import annotations

import copy
import random
import sys
import threading
import time

import numpy as np
import pytest
import torch

import lineas_fast as lf
from conftest import make_model, random_steering, tiny_batch
from lineas_fast.errors import SteeringError
from lineas_fast.patching.fold import WeightEditor
from lineas_fast.patching.fused import FusedPatch, Routing
from lineas_fast.patching.handle import ATTR
from lineas_fast.patching.tables import SteeringTables
from snapshot import _equal, assert_unchanged, model_snapshot

pytestmark = pytest.mark.usefixtures("one_thread")

MODES = ["hooks", "fused", "fold"]


# ---------------------------------------------------------------- validation
BAD_STRENGTHS = [float("nan"), float("inf"), -float("inf"), 1 + 0j, True, "1.0", None, [], [1.0, "x"], [True],
                 np.float64("nan"), np.bool_(True), np.array([1.0, np.nan]), torch.tensor([]),
                 torch.ones(2, 2), torch.tensor(float("nan")), torch.tensor([1.0, float("inf")]),
                 torch.tensor(True), torch.tensor([1 + 0j]), {"a": 1.0}]
IDS = [repr(s).replace(" ", "") for s in BAD_STRENGTHS]


def _check_message(err: SteeringError, value) -> None:
    msg = str(err)
    assert "strength" in msg and repr(value) in msg and "expected" in msg, msg


@pytest.mark.parametrize("strength", BAD_STRENGTHS, ids=IDS)
@pytest.mark.parametrize("mode", MODES)
def test_steer_rejects_bad_strength_before_any_change(mode, strength):
    model = make_model("llama")
    st = random_steering(model, "norms", seed=1)
    snap = model_snapshot(model)
    with pytest.raises(SteeringError) as e:
        lf.steer_(model, st, strength=strength, mode=mode)
    _check_message(e.value, strength)
    assert_unchanged(model, snap)
    assert getattr(model, ATTR, None) is None


@pytest.mark.parametrize("strength", BAD_STRENGTHS, ids=IDS)
def test_set_strength_and_route_reject_bad_strength_before_any_change(strength):
    model = make_model("llama")
    a, b = random_steering(model, "norms", seed=1), random_steering(model, "norms", seed=2)
    for mode in MODES:
        h = lf.steer_(model, a if mode == "fold" else {"a": a, "b": b}, mode=mode)
        if mode != "fold":
            h.route(["a", None, "b"], strength=[1.0, 0.0, 0.5])
        snap, before = model_snapshot(model), h.strength
        with pytest.raises(SteeringError) as e:
            h.set_strength(strength)
        _check_message(e.value, strength)
        if mode != "fold":
            with pytest.raises(SteeringError) as e:
                h.route(["a", "b", None], strength=strength)
            _check_message(e.value, strength)
        assert_unchanged(model, snap)
        assert torch.equal(torch.as_tensor(h.strength), torch.as_tensor(before))
        h.remove()


@pytest.mark.parametrize("strength", [0.5, 1, np.float32(0.5), np.float64(0.5), torch.tensor(0.5),
                                      torch.tensor([0.5, 1.0, 0.0]), [0.5, 1.0, 0.0], (0.5,),
                                      np.array([0.5, 1.0, 0.0]), torch.tensor([1, 0, 1]),
                                      torch.tensor(0.5, dtype=torch.float64)])
def test_good_strengths_accepted(strength):
    model = make_model("llama")
    st = random_steering(model, "norms", seed=1)
    with lf.steered(model, st, strength=strength, mode="hooks") as h:
        want = torch.as_tensor(np.asarray(strength, dtype=np.float32) if not isinstance(strength, torch.Tensor)
                               else strength.float()).reshape(-1)
        assert torch.equal(h.strength, want)


def test_other_bad_arguments_name_argument_and_value():
    model = make_model("llama")
    st = random_steering(model, "norms", seed=1)
    snap = model_snapshot(model)
    for kwargs, words in [(dict(mode="turbo"), ["mode", "'turbo'", "hooks"]),
                          (dict(mode=3), ["mode", "3", "fused"]),
                          (dict(mode="fused", backend=7), ["backend", "7", "str"]),
                          (dict(mode="hooks", backend="torch"), ["backend", "'torch'", "fused"])]:
        with pytest.raises(SteeringError) as e:
            lf.steer_(model, st, **kwargs)
        assert all(w in str(e.value) for w in words), (kwargs, str(e.value))
    for bad in (None, "st", {1: st}, {"a": "x"}):
        with pytest.raises(SteeringError, match="Steering"):
            lf.steer_(model, bad)
    assert_unchanged(model, snap)
    h = lf.steer_(model, {"a": st, "b": st}, mode="hooks")
    h.route(["a", None, "b"])
    steered = model_snapshot(model)
    for names, words in [(["a", 3], ["names", "3", "loaded"]), ("a", ["names", "'a'"]), ([], ["names", "[]"]),
                         (["a", "nope"], ["nope", "loaded"]), (None, ["names", "None"])]:
        with pytest.raises(SteeringError) as e:
            h.route(names)
        assert all(w in str(e.value) for w in words), (names, str(e.value))
    with pytest.raises(SteeringError, match=r"2 names but 3 strengths"):
        h.route(["a", "b"], strength=[1.0, 0.5, 0.2])
    assert_unchanged(model, steered)
    h.remove()
    assert_unchanged(model, snap)


# ---------------------------------------------------------------- failure injection
class Injected(Exception):
    pass


class Injector:
    """Wraps every mutating call a patch makes with one shared counter; raises at call ``fail_at``."""

    TARGETS = [(torch.Tensor, "copy_"), (torch.Tensor, "fill_"), (torch.Tensor, "add_"),
               (torch.nn.Module, "__setattr__"), (torch.nn.Module, "register_forward_hook"),
               (torch.nn.Module, "register_forward_pre_hook"), (WeightEditor, "apply"),
               (SteeringTables, "set_rows"), (FusedPatch, "set_rows"), (Routing, "set")]

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

    def run(self, monkeypatch, fn):
        with monkeypatch.context() as m:
            for owner, name in self.TARGETS:
                m.setattr(owner, name, self.wrap(f"{owner.__name__}.{name}", getattr(owner, name)))
            return fn()


def every_failure(monkeypatch, build, action, after=None):
    """Run ``action(model, handle)`` once cleanly (counting the mutating calls), then once per call with a
    failure injected there: each time the model must be bit-identical to before, and (at a few k) the same
    action must then succeed and give the clean run's result."""
    model, handle = build()
    dry = Injector()
    dry.run(monkeypatch, lambda: action(model, handle))
    done = model_snapshot(model)
    if after is not None:
        after(model)
    assert dry.calls >= 1, dry.log
    for k in range(1, dry.calls + 1):
        model, handle = build()
        snap = model_snapshot(model)
        with pytest.raises(Injected):
            Injector(k).run(monkeypatch, lambda: action(model, handle))
        try:
            assert_unchanged(model, snap)
            assert getattr(model, ATTR, None) is handle
        except AssertionError as e:
            raise AssertionError(f"failure injected at call {k} ({dry.log[k - 1]}): {e}") from None
        if k in (1, dry.calls // 2, dry.calls):  # the model / handle still work normally
            action(model, handle)
            assert_same_result(model, done)
        if after is not None:
            after(model)
    return dry


def assert_same_result(model, done: dict) -> None:
    """Same state_dict, module tree and outputs as the clean run's snapshot (hooks are other objects on
    another model instance, so they are compared by where they sit only)."""
    now = model_snapshot(model)
    assert list(now["state"]) == list(done["state"])
    assert all(_equal(now["state"][k], v) for k, v in done["state"].items())
    assert now["tree"] == done["tree"]
    assert {k: len(v) for k, v in now["hooks"].items()} == {k: len(v) for k, v in done["hooks"].items()}
    assert _equal(now["outputs"], done["outputs"]) and now["config"] == done["config"]


STEER_CASES = [("llama", "norms+mlp_hidden", "hooks", 0.8), ("llama", "norms+mlp_hidden", "fused", 0.8),
               ("gpt2", "norms+mlp_out", "fused", 1.0), ("llama", "norms", "fold", 0.7),
               ("gpt2", "mlp_hidden", "fold", 1.0), ("llama", "mlp_hidden", "fold", 0.5)]


def _remove(model):
    h = getattr(model, ATTR, None)
    if h is not None:
        h.remove()


@pytest.mark.parametrize("arch,sites,mode,strength", STEER_CASES,
                         ids=[f"{a}-{s}-{m}" for a, s, m, _ in STEER_CASES])
def test_steer_failure_at_every_step_leaves_model_unchanged(monkeypatch, arch, sites, mode, strength):
    st = random_steering(make_model(arch), sites, seed=5)

    def build():
        return make_model(arch), None

    def action(model, _):
        lf.steer_(model, st, strength=strength, mode=mode)

    dry = every_failure(monkeypatch, build, action, after=_remove)
    kinds = set(dry.log)
    if mode == "fold":
        assert "WeightEditor.apply" in kinds and "Tensor.copy_" in kinds
    else:
        assert "Module.register_forward_hook" in kinds or "Module.register_forward_pre_hook" in kinds \
            or mode == "fused"
    if mode == "fused":
        assert {"Module.__setattr__", "Routing.set", "Tensor.copy_"} <= kinds


HANDLE_CASES = [("hooks", "set_strength"), ("fused", "set_strength"), ("fold", "set_strength"),
                ("hooks", "route"), ("fused", "route"), ("fused", "remove"), ("fold", "remove")]


@pytest.mark.parametrize("mode,op", HANDLE_CASES, ids=[f"{m}-{o}" for m, o in HANDLE_CASES])
def test_handle_failure_at_every_step_leaves_model_unchanged(monkeypatch, mode, op):
    """A failed set_strength / route / remove leaves the steered model (and its handle) exactly as it was."""
    model0 = make_model("llama")
    a = random_steering(model0, "norms+mlp_hidden", seed=6)
    b = random_steering(model0, "norms+mlp_hidden", seed=7)
    fold_a = random_steering(model0, "norms", seed=8)

    def build():
        model = make_model("llama")
        if mode == "fold":
            h = lf.steer_(model, fold_a, strength=1.0, mode=mode)
        else:
            h = lf.steer_(model, {"a": a, "b": b}, mode=mode)
            h.route(["a", None, "b"], strength=[1.0, 0.0, 0.5])
        return model, h

    def action(model, h):
        if op == "set_strength":
            h.set_strength(0.3 if mode == "fold" else torch.tensor([0.2, 0.9, 1.4]))
        elif op == "route":
            h.route(["b", "a", None], strength=[0.7, 1.0, 0.2])
        else:
            h.remove()

    every_failure(monkeypatch, build, action)


def test_routing_growth_failure_puts_the_old_buffers_back(monkeypatch):
    """route() past the routing capacity allocates new buffers; a failure while filling them puts the old
    buffer objects and values back (the routing still serves the old rows)."""
    model = make_model("llama")
    st = random_steering(model, "norms", seed=1)
    h = lf.steer_(model, {"a": st, "b": st}, mode="fused")
    h.route(["a", None, "b"], strength=[1.0, 0.0, 0.5])
    snap = model_snapshot(model)
    r = model.get_submodule(st.sites[0]).routing
    before = (r.ids, r.strength, r.ids.clone(), r.strength.clone(), r.nrows.clone(), r.rows)
    for k in (1, 2, 3):  # copy_ of ids, copy_ of strength, fill_ of nrows
        inj = Injector(k)
        inj.TARGETS = [(torch.Tensor, "copy_"), (torch.Tensor, "fill_")]
        with pytest.raises(Injected):
            inj.run(monkeypatch, lambda: h.route(["b"] * 70, strength=0.7))
        assert r.ids is before[0] and r.strength is before[1] and r.rows == before[5]
        assert torch.equal(r.ids, before[2]) and torch.equal(r.strength, before[3])
        assert torch.equal(r.nrows, before[4])
        assert_unchanged(model, snap)
    h.route(["b"] * 70, strength=0.7)
    assert r.ids.numel() == 70 and r.nrows.item() == 70
    h.remove()


def test_fold_refold_failure_keeps_created_biases(monkeypatch):
    """strength 0 → 1 in fold mode creates q/k/v biases (RMSNorm shift); a failure half-way keeps the
    strength-0 fold (no biases) bit-exactly, and 1 → 0 removes them."""
    model0 = make_model("llama")
    st = random_steering(model0, ["model.layers.0.input_layernorm"], seed=9)

    for start, end in ((0.0, 1.0), (1.0, 0.0)):
        def build():
            model = make_model("llama")
            return model, lf.steer_(model, st, strength=start, mode="fold")

        every_failure(monkeypatch, build, lambda m, h: h.set_strength(end))


# ---------------------------------------------------------------- strength 0 is exact
def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().view(torch.int32)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma2", "phi3"])
@pytest.mark.parametrize("mode", MODES)
def test_strength_zero_is_bit_identical(arch, mode):
    model = make_model(arch)
    sites = "mlp_hidden" if mode == "fold" else "norms+mlp_hidden"  # fused: norm_affine + steered_linear
    a, b = random_steering(model, sites, seed=1), random_steering(model, sites, seed=2)
    ids, mask = tiny_batch()
    snap = model_snapshot(model)
    base = snap["outputs"]
    h = lf.steer_(model, a, strength=0.0, mode=mode)
    with torch.no_grad():
        assert torch.equal(_bits(model(input_ids=ids, attention_mask=mask).logits), _bits(base))
        h.set_strength(1.0)
        assert not torch.equal(model(input_ids=ids, attention_mask=mask).logits, base)
        h.set_strength(0.0)
        assert torch.equal(_bits(model(input_ids=ids, attention_mask=mask).logits), _bits(base))
    h.remove()
    assert_unchanged(model, snap)
    if mode != "fold":  # several steerings: rows start unsteered; None / 0 rows everywhere are exact too
        h = lf.steer_(model, {"a": a, "b": b}, mode=mode)
        with torch.no_grad():
            assert torch.equal(_bits(model(input_ids=ids, attention_mask=mask).logits), _bits(base))
            h.route(["a", None, "b"], strength=[0.0, 1.0, 0.0])
            assert torch.equal(_bits(model(input_ids=ids, attention_mask=mask).logits), _bits(base))
        h.remove()
        assert_unchanged(model, snap)


# ---------------------------------------------------------------- threads
def test_simultaneous_steer_exactly_one_wins():
    model = make_model("llama")
    st = random_steering(model, "norms", seed=1)
    snap = model_snapshot(model)
    for mode in MODES:
        barrier, won, lost, other = threading.Barrier(8), [], [], []

        def attempt():
            barrier.wait()
            try:
                won.append(lf.steer_(model, st, mode=mode))
            except SteeringError as e:
                lost.append(str(e))
            except BaseException as e:  # noqa: BLE001 - reported below
                other.append(e)

        threads = [threading.Thread(target=attempt) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert other == [] and len(won) == 1 and len(lost) == 7, (other, lost)
        assert all("already steered" in m for m in lost)
        assert getattr(model, ATTR) is won[0]
        won[0].remove()
        assert_unchanged(model, snap)


def test_threads_steer_route_remove_leave_model_bit_identical():
    """8 threads × 1000 iterations of steer_ (every mode) / set_strength / route / remove on one model."""
    model = make_model("llama")
    a, b = random_steering(model, "norms", seed=1), random_steering(model, "norms", seed=2)
    snap = model_snapshot(model)
    errors, counts, lock = [], {}, threading.Lock()
    iterations, deadline = 1000, time.monotonic() + 45

    def worker(seed):
        rng = random.Random(seed)
        for _ in range(iterations):
            if time.monotonic() > deadline:
                break
            h, op = getattr(model, ATTR, None), rng.random()
            try:
                if op < 0.3 or h is None:
                    mode = rng.choice(MODES)
                    st = a if mode == "fold" or rng.random() < 0.4 else {"a": a, "b": b}
                    lf.steer_(model, st, strength=rng.choice([0.0, 0.5, 1.0]), mode=mode)
                    what = "steer_"
                elif op < 0.55:
                    h.set_strength(rng.choice([0.0, 0.3, torch.tensor([0.5, 1.0, 0.0])]))
                    what = "set_strength"
                elif op < 0.8:
                    names = [rng.choice(h.names + [None]) for _ in range(3)]
                    h.route(names, strength=rng.choice([1.0, [0.2, 0.0, 1.1]]))
                    what = "route"
                else:
                    h.remove()
                    what = "remove"
            except SteeringError:  # already steered / removed handle / fold refusing per-row: expected
                what = "refused"
            except BaseException as e:  # noqa: BLE001 - any other error fails the test
                errors.append(e)
                return
            with lock:
                counts[what] = counts.get(what, 0) + 1

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)  # switch threads often: many more interleavings per iteration
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        sys.setswitchinterval(interval)
    assert errors == [], errors[:3]
    assert sum(counts.values()) >= 1000 and all(counts.get(k, 0) > 0 for k in ("steer_", "route", "remove"))
    _remove(model)
    assert getattr(model, ATTR, None) is None
    assert_unchanged(model, snap)  # state_dict, module tree (no stand-ins left), hooks, outputs


def test_lock_lives_outside_the_model():
    """The per-model lock is not stored on the model: a model steered before still deep-copies."""
    model = make_model("llama")
    st = random_steering(model, "norms", seed=1)
    with lf.steered(model, st, mode="fused"):
        pass
    twin = copy.deepcopy(model)
    assert_unchanged(twin, model_snapshot(model))
