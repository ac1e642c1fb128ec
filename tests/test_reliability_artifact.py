"""Strict artifact loading: every malformed steering file raises ArtifactError naming the file.

One test per reproduction of the reliability issue (other dtypes, metadata ``null``, widths ``"abc"``,
``format_version: "2"``, missing / extra tensors, truncation, a header claiming a huge tensor), and a
seeded mutation fuzz of a valid artifact: every mutation either loads a well-formed artifact or raises
ArtifactError — never another exception, never a hang.
"""

from __future__ import annotations

import json
import random
import resource
import signal
import struct
import time
from contextlib import contextmanager

import pytest
import torch
from safetensors.torch import save_file

import lineas_fast as lf
from lineas_fast.errors import ArtifactError, SteeringError
from lineas_fast.steering import FORMAT_VERSION


# ---------------------------------------------------------------- helpers
def valid_steering(support: bool = True) -> lf.Steering:
    g = torch.Generator().manual_seed(0)
    sc = {"a": 1 + 0.3 * torch.randn(4, generator=g), "b": 1 + 0.3 * torch.randn(3, generator=g)}
    sh = {"a": 0.3 * torch.randn(4, generator=g), "b": 0.3 * torch.randn(3, generator=g)}
    sup = {"b": (torch.tensor([-1.0, -float("inf"), 0.0]), torch.tensor([1.0, 2.0, float("inf")]))} if support else None
    return lf.Steering(sc, sh, {"method": "m", "model_type": "llama", "hyperparams": {"lr": 0.1}}, sup)


def meta_of(st: lf.Steering, **over) -> dict:
    """The header metadata ``Steering.save`` writes, with ``lineas_fast`` JSON fields overridden."""
    m = {**st.meta, **over}
    return {"lineas_fast": json.dumps(m), "sites": json.dumps(st.sites), "support_sites": json.dumps(st.clamped)}


def tensors_of(st: lf.Steering) -> dict:
    t = {}
    for s in st.sites:
        t[f"scale/{s}"], t[f"shift/{s}"] = st.scale[s], st.shift[s]
    for s, (lo, hi) in st.support.items():
        t[f"support_lo/{s}"], t[f"support_hi/{s}"] = lo, hi
    return t


def split(raw: bytes) -> tuple[dict, bytes]:
    n = struct.unpack("<Q", raw[:8])[0]
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def join(header: dict, data: bytes, length: int | None = None) -> bytes:
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)
    return struct.pack("<Q", len(h) if length is None else length) + h + data


def assert_same(a: lf.Steering, b: lf.Steering) -> None:
    assert a.sites == b.sites and a.meta == b.meta and a.clamped == b.clamped
    for s in a.sites:
        assert torch.equal(a.scale[s], b.scale[s]) and torch.equal(a.shift[s], b.shift[s])
    for s in a.clamped:
        assert all(torch.equal(x, y) for x, y in zip(a.support[s], b.support[s]))


def refused(path, *needles) -> str:
    with pytest.raises(ArtifactError) as e:
        lf.Steering.load(path)
    msg = str(e.value)
    assert path.name in msg, msg
    for n in needles:
        assert n.lower() in msg.lower(), (n, msg)
    return msg


@pytest.fixture
def good(tmp_path):
    st = valid_steering()
    path = tmp_path / "good.safetensors"
    st.save(path)
    return st, path


# ---------------------------------------------------------------- error classes
def test_error_hierarchy():
    from lineas_fast.errors import SiteError

    assert issubclass(ArtifactError, SteeringError) and issubclass(SiteError, SteeringError)
    assert issubclass(ArtifactError, ValueError) and not issubclass(ArtifactError, SiteError)
    assert ArtifactError.__doc__ and SiteError.__doc__


def test_valid_artifacts_load_exactly(good, tmp_path):
    st, path = good
    assert_same(lf.Steering.load(path), st)
    plain = valid_steering(support=False)
    plain.save(tmp_path / "plain.safetensors")
    assert_same(lf.Steering.load(tmp_path / "plain.safetensors"), plain)


# ---------------------------------------------------------------- the reproductions
@pytest.mark.parametrize("dtype,code", [(torch.int32, "I32"), (torch.float64, "F64"), (torch.float16, "F16"),
                                        (torch.bfloat16, "BF16"), (torch.int64, "I64"), (torch.bool, "BOOL")])
def test_other_dtypes_refused(tmp_path, dtype, code):
    """An I32 scale tensor used to load as scales of ~1e9 (its values converted, not refused)."""
    st = valid_steering(support=False)
    t = tensors_of(st)
    t["scale/a"] = torch.ones(4).to(dtype) if dtype != torch.int32 else torch.ones(4).view(torch.int32)
    path = tmp_path / f"dtype_{code}.safetensors"
    save_file(t, str(path), metadata=meta_of(st))
    refused(path, "scale/a", code, "F32")


@pytest.mark.parametrize("field,value,needle", [
    ("lineas_fast", "null", "lineas_fast"),
    ("lineas_fast", "[1, 2]", "lineas_fast"),
    ("lineas_fast", '"text"', "lineas_fast"),
    ("sites", "null", "sites"),
    ("sites", '"a"', "sites"),
    ("sites", "[1, 2]", "sites"),
    ("sites", '["a", "a", "b"]', "sites"),
    ("sites", "[]", "sites"),
    ("support_sites", "null", "support_sites"),
    ("support_sites", '["zzz"]', "zzz"),
    ("support_sites", "{not json", "support_sites"),
])
def test_header_metadata_of_wrong_json_types(tmp_path, field, value, needle):
    st = valid_steering()
    md = meta_of(st)
    md[field] = value
    path = tmp_path / "hdr.safetensors"
    save_file(tensors_of(st), str(path), metadata=md)
    refused(path, needle)


@pytest.mark.parametrize("over,needle", [
    ({"widths": "abc"}, "widths"),
    ({"widths": {"a": "abc", "b": 3}}, "widths"),
    ({"widths": {"a": 4.0, "b": 3}}, "widths"),
    ({"widths": {"a": True, "b": 3}}, "widths"),
    ({"widths": {"a": -4, "b": 3}}, "widths"),
    ({"widths": {"a": 4}}, "widths"),
    ({"widths": {"a": 4, "b": 3, "c": 2}}, "widths"),
    ({"widths": None}, "widths"),
    ({"format_version": "2"}, "format_version"),
    ({"format_version": None}, "format_version"),
    ({"format_version": 0}, "format_version"),
    ({"format_version": 2.0}, "format_version"),
    ({"format_version": True}, "format_version"),
    ({"format_version": FORMAT_VERSION + 1}, "newer"),
    ({"method": None}, "method"),
    ({"model_type": 5}, "model_type"),
    ({"model_class": ["x"]}, "model_class"),
    ({"name_or_path": {}}, "name_or_path"),
    ({"hyperparams": []}, "hyperparams"),
    ({"hyperparams": "lr=1"}, "hyperparams"),
    ({"library_version": 1.0}, "library_version"),
])
def test_meta_fields_of_wrong_types(tmp_path, over, needle):
    """metadata ``widths: "abc"`` or ``format_version: "2"`` used to raise raw TypeError/AttributeError."""
    st = valid_steering()
    path = tmp_path / "meta.safetensors"
    save_file(tensors_of(st), str(path), metadata=meta_of(st, **over))
    refused(path, needle)


@pytest.mark.parametrize("key", ["method", "widths", "format_version", "hyperparams"])
def test_meta_missing_required_key(tmp_path, key):
    st = valid_steering()
    m = dict(st.meta)
    del m[key]
    md = {**meta_of(st), "lineas_fast": json.dumps(m)}
    path = tmp_path / "lacks.safetensors"
    save_file(tensors_of(st), str(path), metadata=md)
    refused(path, key)


def test_extra_meta_fields_are_kept(tmp_path):
    """``meta`` holds *at least* the required keys: extra JSON fields round-trip (e.g. compare's fit_request)."""
    st = valid_steering()
    st.meta["fit_request"] = {"method": "lineas", "steps": [1, 2]}
    st.save(tmp_path / "extra.safetensors")
    assert_same(lf.Steering.load(tmp_path / "extra.safetensors"), st)


@pytest.mark.parametrize("drop", ["shift/a", "scale/b", "support_lo/b", "support_hi/b"])
def test_missing_tensor(tmp_path, drop):
    st = valid_steering()
    t = tensors_of(st)
    del t[drop]
    path = tmp_path / "missing.safetensors"
    save_file(t, str(path), metadata=meta_of(st))
    refused(path, drop, "missing")


@pytest.mark.parametrize("extra", ["scale/c", "support_lo/a", "bias/a", "__other__"])
def test_extra_tensor(tmp_path, extra):
    """Tensors the metadata does not account for used to be ignored silently."""
    st = valid_steering()
    t = {**tensors_of(st), extra: torch.ones(4)}
    path = tmp_path / "extra.safetensors"
    save_file(t, str(path), metadata=meta_of(st))
    refused(path, extra, "unknown")


def test_unknown_header_metadata_key(tmp_path):
    st = valid_steering()
    path = tmp_path / "extrakey.safetensors"
    save_file(tensors_of(st), str(path), metadata={**meta_of(st), "surprise": "1"})
    refused(path, "surprise")


@pytest.mark.parametrize("site,shape", [("a", (2, 2)), ("a", (5,)), ("b", ()), ("b", (3, 1))])
def test_tensor_shape_against_widths(tmp_path, site, shape):
    st = valid_steering(support=False)
    t = tensors_of(st)
    t[f"shift/{site}"] = torch.zeros(shape)
    path = tmp_path / "shape.safetensors"
    save_file(t, str(path), metadata=meta_of(st))
    refused(path, f"shift/{site}", "widths")


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("name", ["scale/a", "shift/b"])
def test_non_finite_values(tmp_path, name, bad):
    st = valid_steering(support=False)
    t = {k: v.clone() for k, v in tensors_of(st).items()}
    t[name][1] = bad
    path = tmp_path / "nonfinite.safetensors"
    save_file(t, str(path), metadata=meta_of(st))
    refused(path, name)


@pytest.mark.parametrize("lo,hi", [([0.0, float("nan"), 0.0], [1.0, 1.0, 1.0]), ([2.0, 0.0, 0.0], [1.0, 1.0, 1.0])])
def test_bad_support_bounds(tmp_path, lo, hi):
    st = valid_steering()
    t = {**tensors_of(st), "support_lo/b": torch.tensor(lo), "support_hi/b": torch.tensor(hi)}
    path = tmp_path / "support.safetensors"
    save_file(t, str(path), metadata=meta_of(st))
    refused(path, "b")


def test_truncated_at_every_offset(good, tmp_path):
    """Every proper prefix of a valid file (header, length prefix or data cut) is refused."""
    _, path = good
    raw = path.read_bytes()
    bad = tmp_path / "trunc.safetensors"
    for cut in range(len(raw)):
        bad.write_bytes(raw[:cut])
        refused(bad)


def test_trailing_bytes_refused(good, tmp_path):
    _, path = good
    bad = tmp_path / "trailing.safetensors"
    bad.write_bytes(path.read_bytes() + b"\0" * 4)
    refused(bad)


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@pytest.mark.parametrize("edit", ["huge_tensor", "huge_offsets", "huge_length_prefix", "length_past_eof"])
def test_header_claims_are_checked_before_reading(good, tmp_path, edit):
    """A header claiming a 100 GB tensor is refused from the header alone: no allocation, no read."""
    _, path = good
    header, data = split(path.read_bytes())
    length = None
    if edit == "huge_tensor":
        header["scale/a"]["shape"] = [25_000_000_000]
        header["scale/a"]["data_offsets"] = [0, 100_000_000_000]
    elif edit == "huge_offsets":
        header["scale/a"]["data_offsets"] = [0, 2**63]
    elif edit == "huge_length_prefix":
        length = 2**62
    else:
        length = len(json.dumps(header, separators=(",", ":"))) + 10_000
    bad = tmp_path / f"{edit}.safetensors"
    bad.write_bytes(join(header, data, length))
    before, t0 = _peak_rss_mb(), time.perf_counter()
    refused(bad)
    assert time.perf_counter() - t0 < 2.0
    assert _peak_rss_mb() - before < 64


@pytest.mark.parametrize("edit", ["overlap", "hole", "wrong_size", "negative", "not_ints", "reversed",
                                  "no_dtype", "shape_str", "dup_key", "not_object", "bad_utf8", "not_json",
                                  "metadata_not_str", "metadata_list"])
def test_garbled_headers(good, tmp_path, edit):
    _, path = good
    header, data = split(path.read_bytes())
    raw = None
    if edit == "overlap":
        header["scale/b"]["data_offsets"] = [12, 24]
    elif edit == "hole":
        header["scale/b"]["data_offsets"] = [20, 32]
    elif edit == "wrong_size":
        header["scale/a"]["shape"] = [3]
    elif edit == "negative":
        header["scale/a"]["data_offsets"] = [-16, 0]
    elif edit == "not_ints":
        header["scale/a"]["data_offsets"] = [0.0, 16.0]
    elif edit == "reversed":
        header["scale/a"]["data_offsets"] = [16, 0]
    elif edit == "no_dtype":
        del header["scale/a"]["dtype"]
    elif edit == "shape_str":
        header["scale/a"]["shape"] = "4"
    elif edit == "metadata_not_str":
        header["__metadata__"]["sites"] = ["a", "b"]
    elif edit == "metadata_list":
        header["__metadata__"] = []
    if edit == "dup_key":
        text = json.dumps(header, separators=(",", ":"))
        text = text[:-1] + ',"scale/a":' + json.dumps(header["scale/a"]) + "}"
        raw = struct.pack("<Q", len(text)) + text.encode() + data
    elif edit == "not_object":
        raw = join([1, 2], data)
    elif edit in ("bad_utf8", "not_json"):
        body = b'{"a":"\xff\xfe"}' if edit == "bad_utf8" else b"{not json at all"
        raw = struct.pack("<Q", len(body)) + body + data
    bad = tmp_path / f"{edit}.safetensors"
    bad.write_bytes(raw if raw is not None else join(header, data))
    refused(bad)


def test_foreign_files_refused(tmp_path):
    for name, content in [("empty.safetensors", b""), ("text.safetensors", b"hello world, not a tensor file\n"),
                          ("zeros.safetensors", b"\0" * 64), ("brace.safetensors", struct.pack("<Q", 2) + b"{}")]:
        p = tmp_path / name
        p.write_bytes(content)
        refused(p)
    d = tmp_path / "dir.safetensors"
    d.mkdir()
    with pytest.raises(ArtifactError, match="dir.safetensors"):
        lf.Steering.load(d)


def test_format_1_without_support_sites_loads(tmp_path):
    st = valid_steering(support=False)
    md = meta_of(st, format_version=1)
    del md["support_sites"]
    path = tmp_path / "v1.safetensors"
    save_file(tensors_of(st), str(path), metadata=md)
    back = lf.Steering.load(path)
    assert back.sites == st.sites and back.clamped == []
    assert all(torch.equal(back.scale[s], st.scale[s]) for s in st.sites)


# ---------------------------------------------------------------- mutation fuzz
class _Hang(Exception):
    pass


@contextmanager
def deadline(seconds: float):
    def on_alarm(*_):
        raise _Hang(f"load took more than {seconds}s")

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


_ODD_VALUES = [None, "abc", "2", "", -1, 0, 1, 3, 2**70, 1.5, float("nan"), True, [], {}, [1], {"a": 1}]


def _edit_json(rng: random.Random, obj):
    """Change one random leaf or key of ``obj`` (a JSON value) in place; returns the new value."""
    if not isinstance(obj, (dict, list)) or not obj:
        return rng.choice(_ODD_VALUES)
    key = rng.choice(list(obj)) if isinstance(obj, dict) else rng.randrange(len(obj))
    op = rng.random()
    if op < 0.2 and isinstance(obj, dict):
        del obj[key]
    elif op < 0.3 and isinstance(obj, dict):
        obj[rng.choice(["zz", "scale/zz", "format_version", key + "x"])] = rng.choice(_ODD_VALUES)
    elif op < 0.6:
        obj[key] = _edit_json(rng, obj[key])
    else:
        obj[key] = rng.choice(_ODD_VALUES)
    return obj


def _mutations(raw: bytes, rng: random.Random, n: int):
    header, data = split(raw)
    hlen = len(raw) - len(data)
    for i in range(n):
        kind = ("flip", "flip_header", "flip_data", "truncate", "append", "header_json", "meta_json", "length")[i % 8]
        b = bytearray(raw)
        if kind == "flip":
            pos = rng.randrange(len(b))
            b[pos] ^= 1 << rng.randrange(8)
        elif kind == "flip_header":
            for _ in range(rng.randint(1, 3)):
                pos = rng.randrange(hlen)
                b[pos] ^= 1 << rng.randrange(8)
        elif kind == "flip_data":  # a valid file with other values, unless they become NaN/inf or lo > hi
            pos = rng.randrange(hlen, len(b))
            b[pos] ^= 1 << rng.randrange(8)
        elif kind == "truncate":
            b = b[:rng.randrange(len(b))]
        elif kind == "append":
            b += bytes(rng.randrange(256) for _ in range(rng.randint(1, 16)))
        elif kind == "header_json":
            h = json.loads(json.dumps(header))
            h = _edit_json(rng, h)
            b = bytearray(join(h, data) if isinstance(h, dict) else join({"x": h}, data))
        elif kind == "meta_json":
            h = json.loads(json.dumps(header))
            field = rng.choice(["lineas_fast", "lineas_fast", "sites", "support_sites"])
            val = json.loads(h["__metadata__"][field])
            h["__metadata__"][field] = json.dumps(_edit_json(rng, val))
            b = bytearray(join(h, data))
        else:  # the 8-byte length prefix
            n_hdr = struct.unpack("<Q", raw[:8])[0]
            b[:8] = struct.pack("<Q", rng.choice([0, 1, n_hdr - 1, n_hdr + 1, n_hdr + 8, 2**40, 2**64 - 1]))
        yield kind, bytes(b), data


def _well_formed(st: lf.Steering) -> None:
    assert isinstance(st, lf.Steering) and st.sites
    assert st.meta["widths"] == {s: st.scale[s].numel() for s in st.sites}
    for s in st.sites:
        for t in (st.scale[s], st.shift[s]):
            assert t.dtype == torch.float32 and t.ndim == 1 and t.device.type == "cpu"
            assert torch.isfinite(t).all()


def test_mutation_fuzz(good, tmp_path):
    st, path = good
    raw = path.read_bytes()
    rng = random.Random(1234)
    bad = tmp_path / "fuzz.safetensors"
    outcomes, failures = {"refused": 0, "loaded": 0}, []
    t0 = time.perf_counter()
    for i, (kind, mutated, data) in enumerate(_mutations(raw, rng, 208)):
        bad.write_bytes(mutated)
        try:
            with deadline(5.0):
                back = lf.Steering.load(bad)
        except ArtifactError as e:
            outcomes["refused"] += 1
            if "fuzz.safetensors" not in str(e):
                failures.append((i, kind, "message lacks the file name", str(e)))
            continue
        except Exception as e:  # noqa: BLE001 - any other exception (or a hang) is the bug under test
            failures.append((i, kind, type(e).__name__, str(e)[:200]))
            continue
        outcomes["loaded"] += 1
        try:
            _well_formed(back)
            again = tmp_path / "again.safetensors"
            back.save(again)
            assert_same(lf.Steering.load(again), back)  # what loads, round-trips
            if mutated == raw:
                assert_same(back, st)
            elif mutated[:len(raw) - len(data)] == raw[:len(raw) - len(data)]:  # only tensor bytes changed
                assert back.sites == st.sites and back.meta == st.meta
        except AssertionError as e:
            failures.append((i, kind, "loaded but malformed", str(e)[:200]))
    assert not failures, failures[:10]
    assert outcomes["refused"] > 100 and outcomes["loaded"] > 10, outcomes
    assert time.perf_counter() - t0 < 30
