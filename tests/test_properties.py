"""Property tests and fuzzing (hypothesis) of the public API:

1. ``lf.steer_`` in every mode (``fold``, ``hooks``, ``fused``) followed by ``handle.remove()`` leaves the
   model bit-identical (``state_dict`` and outputs), for random tiny architectures, preset sites and
   subsets of them, batch shapes, padding sides, maps and strengths — also after a re-fold
   (``set_strength`` in fold mode) and after a refused ``steer_``; steering again reproduces the steered
   outputs exactly.
2. Per-row strengths through ``handle.route`` / ``handle.set_strength`` match the hooks reference — each
   row steered alone by ``mode="hooks"`` at its own scalar strength — within the fp32 tolerance (1e-5).
3. ``lf.Steering.load`` fed random mutations of a valid artifact (bit flips, truncation, appended bytes,
   header and metadata JSON edits, a rewritten length prefix) loads a well-formed artifact or raises
   :class:`lf.ArtifactError` naming the file — never another exception, never a hang.

Profiles: ``ci`` (default; the file runs in well under 2 min on 2 cores, examples derandomized so a run
is reproducible) and ``fuzz`` (``LINEAS_FAST_HYPOTHESIS=fuzz``: 20x the examples, random each run). The
module carries the ``fuzz`` marker, so ``-m fuzz`` / ``-m "not fuzz"`` select or skip it.
"""

from __future__ import annotations

import json
import os
import signal
import struct
import warnings
from contextlib import contextmanager

import pytest
import torch
from conftest import (ARCHS, assert_fp32_close, assert_state_equal, logits, make_model, no_hooks_left,
                      random_steering, snapshot, tiny_batch)
from hypothesis import HealthCheck, event, given, note, settings
from hypothesis import strategies as st

import lineas_fast as lf
from lineas_fast.sites import PRESETS

pytestmark = [pytest.mark.fuzz, pytest.mark.usefixtures("one_thread")]

_COMMON = dict(deadline=None, database=None, print_blob=True,
               suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                      HealthCheck.data_too_large])
settings.register_profile("lineas_fast-ci", max_examples=60, derandomize=True, **_COMMON)
settings.register_profile("lineas_fast-fuzz", max_examples=1200, **_COMMON)
PROFILE = settings.get_profile(f"lineas_fast-{os.environ.get('LINEAS_FAST_HYPOTHESIS', 'ci')}")


def scaled(factor: float) -> settings:
    """The selected profile with ``factor`` times its examples (cheap properties run more of them)."""
    return settings(PROFILE, max_examples=max(1, int(PROFILE.max_examples * factor)))


_PRESETS: dict = {}


def presets_of(arch: str) -> list[str]:
    """The presets that resolve on the tiny ``arch`` (computed once per architecture)."""
    if arch not in _PRESETS:
        model = make_model(arch)
        ok = []
        for p in PRESETS:
            try:
                lf.resolve_sites(model, p)
            except lf.SteeringError:
                continue
            ok.append(p)
        _PRESETS[arch] = ok
    return _PRESETS[arch]


strengths = st.one_of(st.sampled_from([0.0, 1.0, -1.0]),
                      st.floats(-2.0, 2.0, allow_nan=False, allow_infinity=False, width=32))


@st.composite
def steering_case(draw, archs=ARCHS, presets=None):
    """(model, steering, ids, mask): a fresh tiny model, a random map on a random non-empty subset of a
    preset's sites, and a random padded batch."""
    arch = draw(st.sampled_from(archs))
    preset = draw(st.sampled_from(presets or presets_of(arch)))
    model = make_model(arch)
    sites = lf.resolve_sites(model, preset)
    keep = draw(st.lists(st.sampled_from(sites), min_size=1, max_size=len(sites), unique=True))
    keep = [s for s in sites if s in keep]  # model order
    spread = draw(st.sampled_from([0.05, 0.3, 1.0]))
    shift, scale = draw(st.sampled_from([(True, True), (True, False), (False, True)]))
    steering = random_steering(model, keep, seed=draw(st.integers(0, 2**16)), spread=spread, shift=shift,
                               scale=scale)
    batch, length = draw(st.integers(1, 4)), draw(st.integers(3, 9))
    ids, mask = tiny_batch(batch, length, seed=draw(st.integers(0, 2**16)), pad_left=draw(st.booleans()))
    note(f"arch={arch} preset={preset} sites={keep} batch={batch}x{length}")
    return model, steering, ids, mask


def module_types(model) -> list[tuple[str, type]]:
    return [(n, type(m)) for n, m in model.named_modules()]


# ---------------------------------------------------------------- 1. exact round-trips
@scaled(1.0)
@given(case=steering_case(), mode=st.sampled_from(["fold", "hooks", "fused"]), lam=strengths, lam2=strengths)
def test_steer_remove_round_trip_is_exact(case, mode, lam, lam2):
    model, steering, ids, mask = case
    snap, types, base = snapshot(model), module_types(model), logits(model, ids, mask)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # fused falls back to hooks (with a warning) for sites it does not cover
        try:
            h = lf.steer_(model, steering, strength=lam, mode=mode)
        except lf.SteeringError:  # e.g. a site a fold cannot express: refused before anything changed
            event(f"{mode}: refused")
            assert_state_equal(model, snap)
            assert no_hooks_left(model) == [] and module_types(model) == types
            assert torch.equal(logits(model, ids, mask), base)
            return
        event(f"{mode}: applied")
        steered = logits(model, ids, mask)
        try:
            h.set_strength(lam2)  # fold: restore the originals and refold; hooks/fused: new routing state
        except lf.SteeringError:  # fold at lam2 impossible (e.g. a shift no bias absorbs; at lam it was 0)
            event(f"{mode}: refold refused")
            assert mode == "fold" and h.strength == lam
            assert torch.equal(logits(model, ids, mask), steered)  # the refusal left the fold at lam in place
        h.set_strength(lam)
        again = logits(model, ids, mask)
        h.remove()
        assert_state_equal(model, snap)
        assert no_hooks_left(model) == [] and module_types(model) == types
        assert torch.equal(logits(model, ids, mask), base)
        h2 = lf.steer_(model, steering, strength=lam, mode=mode)
        assert torch.equal(logits(model, ids, mask), steered)  # steering again is deterministic
        h2.remove()
    assert torch.equal(again, steered)  # fold: a refold from the saved originals is bit-identical too
    assert_state_equal(model, snap)
    assert torch.equal(logits(model, ids, mask), base)


# ---------------------------------------------------------------- 2. per-row strengths vs the hooks reference
def row_reference(model, steerings: dict, names, strengths_, ids, mask) -> torch.Tensor:
    """Row i as computed with only steering ``names[i]`` applied by hooks at scalar strength
    ``strengths_[i]`` to the whole batch (``None``: the unsteered model)."""
    base = logits(model, ids, mask)
    rows = []
    for i, (name, s) in enumerate(zip(names, strengths_)):
        if name is None:
            rows.append(base[i])
            continue
        with lf.steered(model, steerings[name], strength=float(s), mode="hooks"):
            rows.append(logits(model, ids, mask)[i])
    return torch.stack(rows)


def assert_rows_close(got, want, what):
    for i in range(want.shape[0]):
        assert_fp32_close(got[i], want[i], f"{what}: row {i}")


@scaled(1.0)
@given(data=st.data(), mode=st.sampled_from(["fused", "hooks"]))
def test_routed_rows_match_hooks_reference(data, mode):
    model, a, ids, mask = data.draw(steering_case(archs=["llama", "gpt2", "qwen3", "gemma2"]))
    b = random_steering(model, a.sites, seed=data.draw(st.integers(0, 2**16)), spread=0.5)
    steerings = {"a": a, "b": b}
    batch = ids.shape[0]
    names = data.draw(st.lists(st.sampled_from(["a", "b", None]), min_size=batch, max_size=batch))
    first = data.draw(st.lists(strengths, min_size=batch, max_size=batch))
    second = data.draw(st.lists(strengths, min_size=batch, max_size=batch))
    want_route = row_reference(model, steerings, names, first, ids, mask)
    want_rescaled = row_reference(model, steerings, names, second, ids, mask)
    snap = snapshot(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with lf.steered(model, steerings, mode=mode) as h:
            h.route(names, strength=first)
            assert_rows_close(logits(model, ids, mask), want_route, f"{mode} route")
            h.set_strength(torch.tensor(second))  # keeps the names, new strength per row
            assert_rows_close(logits(model, ids, mask), want_rescaled, f"{mode} set_strength")
    assert_state_equal(model, snap)


@scaled(1.0)
@given(data=st.data(), mode=st.sampled_from(["fused", "hooks"]))
def test_per_row_strength_vector_matches_hooks_reference(data, mode):
    model, steering, ids, mask = data.draw(steering_case(archs=["llama", "mistral", "phi3", "gemma3"]))
    batch = ids.shape[0]
    vec = data.draw(st.lists(strengths, min_size=batch, max_size=batch))
    want = row_reference(model, {"x": steering}, ["x"] * batch, vec, ids, mask)
    base = logits(model, ids, mask)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with lf.steered(model, steering, strength=torch.tensor(vec), mode=mode) as h:
            assert_rows_close(logits(model, ids, mask), want, f"{mode} strength=[batch]")
            h.set_strength(0.0)
            assert_rows_close(logits(model, ids, mask), base, f"{mode} set_strength(0)")
            h.set_strength(torch.tensor(vec))
            assert_rows_close(logits(model, ids, mask), want, f"{mode} set_strength([batch])")


# ---------------------------------------------------------------- 3. artifact loader fuzz
class _Hang(Exception):
    pass


@contextmanager
def deadline(seconds: float):
    def on_alarm(*_):
        raise _Hang(f"Steering.load took more than {seconds} s")

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def valid_artifact() -> lf.Steering:
    g = torch.Generator().manual_seed(0)
    sc = {"a": 1 + 0.3 * torch.randn(4, generator=g), "b": 1 + 0.3 * torch.randn(3, generator=g)}
    sh = {"a": 0.3 * torch.randn(4, generator=g), "b": 0.3 * torch.randn(3, generator=g)}
    sup = {"b": (torch.tensor([-1.0, -float("inf"), 0.0]), torch.tensor([1.0, 2.0, float("inf")]))}
    return lf.Steering(sc, sh, {"method": "m", "model_type": "llama", "hyperparams": {"lr": 0.1}}, sup)


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fuzz")
    original = valid_artifact()
    path = folder / "good.safetensors"
    original.save(path)
    return original, path.read_bytes(), folder


def split(raw: bytes) -> tuple[dict, bytes, int]:
    n = struct.unpack("<Q", raw[:8])[0]
    return json.loads(raw[8:8 + n]), raw[8 + n:], 8 + n


def join(header, data: bytes) -> bytes:
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)
    return struct.pack("<Q", len(h)) + h + data


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=6)


def edit_json(data, obj):
    """One random edit somewhere in ``obj``: replace a value, delete or add a key, or go one level deeper."""
    if not isinstance(obj, (dict, list)) or not obj or data.draw(st.integers(0, 3)) == 0:
        return data.draw(json_values)
    key = data.draw(st.sampled_from(sorted(obj) if isinstance(obj, dict) else range(len(obj))))
    op = data.draw(st.sampled_from(["deeper", "deeper", "replace", "delete", "add"]))
    if op == "delete" and isinstance(obj, dict):
        del obj[key]
    elif op == "add" and isinstance(obj, dict):
        obj[data.draw(st.sampled_from(["zz", "scale/zz", "format_version", f"{key}x"]) | st.text(max_size=6))] = \
            data.draw(json_values)
    elif op == "replace":
        obj[key] = data.draw(json_values)
    else:
        obj[key] = edit_json(data, obj[key])
    return obj


KINDS = ["flip", "flip_header", "flip_data", "truncate", "append", "header_json", "meta_json", "length"]


def mutate(data, raw: bytes) -> tuple[str, bytes]:
    header, payload, start = split(raw)
    kind = data.draw(st.sampled_from(KINDS))
    b = bytearray(raw)
    if kind in ("flip", "flip_header", "flip_data"):
        lo, hi = {"flip": (0, len(raw)), "flip_header": (0, start), "flip_data": (start, len(raw))}[kind]
        for pos in data.draw(st.lists(st.integers(lo, hi - 1), min_size=1, max_size=3)):
            b[pos] ^= 1 << data.draw(st.integers(0, 7))
    elif kind == "truncate":
        b = b[:data.draw(st.integers(0, len(raw) - 1))]
    elif kind == "append":
        b += data.draw(st.binary(min_size=1, max_size=16))
    elif kind == "header_json":
        b = bytearray(join(edit_json(data, json.loads(json.dumps(header))), payload))
    elif kind == "meta_json":
        h = json.loads(json.dumps(header))
        field = data.draw(st.sampled_from(["lineas_fast", "lineas_fast", "sites", "support_sites"]))
        h["__metadata__"][field] = json.dumps(edit_json(data, json.loads(h["__metadata__"][field])))
        b = bytearray(join(h, payload))
    else:  # the 8-byte length prefix
        n = start - 8
        b[:8] = struct.pack("<Q", data.draw(st.sampled_from([0, 1, n - 1, n + 1, n + 8, 2**40, 2**64 - 1])
                                            | st.integers(0, 2**64 - 1)))
    return kind, bytes(b)


def assert_equivalent(a: lf.Steering, b: lf.Steering) -> None:
    assert a.sites == b.sites and a.meta == b.meta and a.clamped == b.clamped
    for s in a.sites:
        assert torch.equal(a.scale[s], b.scale[s]) and torch.equal(a.shift[s], b.shift[s])
    for s in a.clamped:
        assert all(torch.equal(x, y) for x, y in zip(a.support[s], b.support[s]))


@scaled(10.0)
@given(data=st.data())
def test_artifact_loader_refuses_or_loads_mutations(artifact, data):
    original, raw, folder = artifact
    kind, mutated = mutate(data, raw)
    path = folder / "mutated.safetensors"
    path.write_bytes(mutated)
    try:
        with deadline(5.0):
            back = lf.Steering.load(path)
    except lf.ArtifactError as e:  # any other exception, or a hang, fails the test (and is shrunk)
        event(f"{kind}: refused")
        assert "mutated.safetensors" in str(e), str(e)
        return
    event(f"{kind}: loaded")
    assert isinstance(back, lf.Steering) and back.sites
    assert back.meta["widths"] == {s: back.scale[s].numel() for s in back.sites}
    for s in back.sites:
        for t in (back.scale[s], back.shift[s]):
            assert t.dtype == torch.float32 and t.ndim == 1 and bool(torch.isfinite(t).all())
    again = folder / "again.safetensors"
    back.save(again)
    assert_equivalent(lf.Steering.load(again), back)  # what loads, round-trips
    _, payload, start = split(raw)
    if mutated == raw:
        assert_equivalent(back, original)
    elif mutated[:start] == raw[:start]:  # only tensor bytes changed: same structure, other values
        assert back.sites == original.sites and back.meta == original.meta and back.clamped == original.clamped


def test_artifact_non_string_dtype_is_an_artifact_error(artifact):
    original, raw, folder = artifact
    header, payload, _ = split(raw)
    header["scale/a"]["dtype"] = []
    path = folder / "dtype_list.safetensors"
    path.write_bytes(join(header, payload))
    with pytest.raises(lf.ArtifactError, match="dtype_list.safetensors"):
        lf.Steering.load(path)
