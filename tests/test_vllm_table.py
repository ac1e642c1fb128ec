"""The serving plugin's vLLM-free parts: request fields, cache salt, SlotTable (vs the hooks reference),
the site wrappers and ``lineas-fast serve``'s checks. Run without vLLM installed."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

import lineas_fast as lf
from lineas_fast.patching.tables import SteeringTables
from lineas_fast.vllm.fields import FieldError, cache_salt, parse_fields
from lineas_fast.vllm.patch import install, site_geometry
from lineas_fast.vllm.table import SlotTable

LOADED = {"detox": 1, "formal": 2}


@pytest.mark.parametrize("xargs,want", [
    (None, (None, 0.0)), ({}, (None, 0.0)), ({"other": 1}, (None, 0.0)),
    ({"steering": "detox"}, ("detox", 1.0)), ({"steering": "detox", "strength": 0.5}, ("detox", 0.5)),
    ({"steering": "formal", "strength": -2}, ("formal", -2.0)), ({"steering": "detox", "strength": 0}, ("detox", 0.0)),
])
def test_fields_accept(xargs, want):
    assert parse_fields(xargs, LOADED) == want


@pytest.mark.parametrize("xargs,words", [
    ({"steering": "nope"}, "unknown steering 'nope'; loaded steerings: 'detox', 'formal'"),
    ({"steering": 1}, "unknown steering"), ({"steering": ["detox"]}, "unknown steering"),
    ({"steering": "detox", "strength": "1"}, "finite number"), ({"steering": "detox", "strength": True}, "finite"),
    ({"steering": "detox", "strength": math.nan}, "finite"), ({"steering": "detox", "strength": math.inf}, "finite"),
    ({"steering": "detox", "strength": None}, "finite"), ({"steering": "detox", "strength": [1.0]}, "finite"),
    ({"strength": 1.0}, "without 'steering'"), ("detox", "must be an object"), ([1], "must be an object"),
])
def test_fields_reject(xargs, words):
    with pytest.raises(FieldError, match=words.replace("(", r"\(")):
        parse_fields(xargs, LOADED)


def test_fields_name_none_loaded():
    with pytest.raises(FieldError, match="loaded steerings: none"):
        parse_fields({"steering": "x"}, {})


def test_cache_salt_separates_steerings_and_strengths():
    salts = {cache_salt(n, s) for n, s in [("a", 1.0), ("a", 0.5), ("b", 1.0)]}
    assert len(salts) == 3 and None not in salts
    assert cache_salt(None, 0.0) is None and cache_salt(None, 0.0, "user") == "user"
    assert cache_salt("a", 1.0, "user") != cache_salt("a", 1.0) and cache_salt("a", 1.0, "user").endswith("|user")


def _steering(widths: dict, seed: int, model_type="llama") -> lf.Steering:
    g = torch.Generator().manual_seed(seed)
    return lf.Steering({s: 1 + 0.3 * torch.randn(d, generator=g) for s, d in widths.items()},
                       {s: 0.3 * torch.randn(d, generator=g) for s, d in widths.items()},
                       {"method": "test", "model_type": model_type})


WIDTHS = {"l.0.norm": 6, "l.0.mlp.down:in": 10, "l.1.norm": 6}


def test_table_matches_the_hooks_tables_bit_for_bit():
    """Per-token routing over a ragged batch == the library's SteeringTables row by row."""
    a, b = _steering(WIDTHS, 1), _steering({"l.1.norm": 6}, 2)
    table = SlotTable(WIDTHS, capacity=3, max_tokens=32, model_type="llama")
    table.load("a", a)
    table.load("b", b)
    ref = SteeringTables({"a": a, "b": b}, list(WIDTHS), {s: torch.device("cpu") for s in WIDTHS})
    # three requests: 4 tokens unsteered, 3 tokens a@0.5, 5 tokens b@1
    routes = [table.route(None), table.route({"steering": "a", "strength": 0.5}), table.route({"steering": "b"})]
    counts = [4, 3, 5]
    table.fill([r[0] for r in routes], [r[1] for r in routes], counts)
    ids = torch.tensor([-1] * 4 + [0] * 3 + [1] * 5)
    strength = torch.tensor([1.0] * 4 + [0.5] * 3 + [1.0] * 5)
    ref.set_rows(ids, strength)
    for site, d in WIDTHS.items():
        h = torch.randn(12, d)
        got = table.apply(site, h)
        assert torch.equal(got, ref.apply(site, h)), site
        assert torch.equal(got[:4], h[:4])  # unsteered tokens bit-exact
    assert table.slot[12:].eq(0).all() and table.strength[12:].eq(0).all()


def test_table_load_unload_and_refusals_change_nothing():
    table = SlotTable(WIDTHS, capacity=2, max_tokens=8, model_type="llama")
    table.load("a", _steering(WIDTHS, 1))
    before = {s: (table.dscale[s].clone(), table.shift[s].clone()) for s in WIDTHS}
    bad = [("a", _steering(WIDTHS, 2), "already loaded"),
           ("g", _steering(WIDTHS, 3, model_type="gpt2"), "model_type 'gpt2'"),
           ("w", _steering({"l.0.norm": 7}, 4), "width mismatch"),
           ("s", _steering({"l.9.norm": 6}, 5), "did not patch"),
           ("", _steering(WIDTHS, 6), "name"), ("x\n", _steering(WIDTHS, 6), "name")]
    clamped = _steering({"l.0.norm": 6}, 7)
    clamped = lf.Steering(clamped.scale, clamped.shift, clamped.meta,
                          {"l.0.norm": (torch.full((6,), -1.0), torch.full((6,), 1.0))})
    bad.append(("c", clamped, "support"))
    for name, st, words in bad:
        with pytest.raises(lf.SteeringError, match=words):
            table.load(name, st)
        for s in WIDTHS:
            assert torch.equal(table.dscale[s], before[s][0]) and torch.equal(table.shift[s], before[s][1])
    table.load("b", _steering(WIDTHS, 8))
    with pytest.raises(lf.SteeringError, match="slots are in use"):
        table.load("c", _steering(WIDTHS, 9))
    table.unload("a")
    assert [e["name"] for e in table.describe()] == ["b"]
    assert all(table.dscale[s][1].eq(0).all() and table.shift[s][1].eq(0).all() for s in WIDTHS)
    assert table.load("c", _steering(WIDTHS, 9)).slot == 1  # the freed slot is reused
    with pytest.raises(lf.SteeringError, match="no steering named"):
        table.unload("zz")
    with pytest.raises(lf.SteeringError, match="max_tokens"):
        table.fill([1], [1.0], [9])


def test_table_tensor_parallel_shard():
    """A sharded site keeps this rank's columns only, and steers them like the full map's slice."""
    st = _steering({"l.0.mlp.down:in": 10}, 1)
    table = SlotTable({"l.0.mlp.down:in": 10}, shards={"l.0.mlp.down:in": slice(5, 10)}, max_tokens=4)
    table.load("a", st)
    table.fill([1], [1.0], [2])
    h = torch.randn(2, 5)
    want = h * st.scale["l.0.mlp.down:in"][5:] + st.shift["l.0.mlp.down:in"][5:]
    torch.testing.assert_close(table.apply("l.0.mlp.down:in", h), want, rtol=0, atol=1e-6)


class _FusedNorm(nn.Module):
    """vLLM-style RMSNorm: with a residual it returns (normed, residual)."""

    def __init__(self, d):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x, residual=None):
        if residual is None:
            return x * 2
        return (x + residual) * 2, x + residual


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = _FusedNorm(6)
        self.down = nn.Linear(10, 6)


def test_wrappers_steer_normed_not_residual_and_inputs():
    model = nn.Module()
    model.l = nn.ModuleList([_Block()])
    widths = {"l.0.norm": 6, "l.0.down:in": 10}
    assert site_geometry(model, "l.0.norm", 99) == (6, None)
    assert site_geometry(model, "l.0.down:in", 99) == (10, None)
    with pytest.raises(lf.SteeringError, match="no module"):
        site_geometry(model, "l.3.norm", 99)
    st = _steering(widths, 1)
    table = SlotTable(widths, max_tokens=4)
    table.load("a", st)
    assert sorted(install(model, table)) == sorted(widths) and install(model, table) == []  # idempotent
    table.fill([1], [1.0], [3])
    x, r = torch.randn(3, 6), torch.randn(3, 6)
    normed, residual = model.l[0].norm(x, r)
    assert torch.equal(residual, x + r)
    assert torch.equal(normed, ((x + r) * 2) * st.scale["l.0.norm"] + st.shift["l.0.norm"])
    assert torch.equal(model.l[0].norm(x), (x * 2) * st.scale["l.0.norm"] + st.shift["l.0.norm"])
    h = torch.randn(3, 10)
    lin = model.l[0].down
    want = nn.functional.linear(h * st.scale["l.0.down:in"] + st.shift["l.0.down:in"], lin.weight, lin.bias)
    torch.testing.assert_close(lin(h), want, rtol=0, atol=0)
    table.fill([0], [0.0], [3])  # unsteered: bit-exact passthrough
    assert torch.equal(model.l[0].norm(x), x * 2)


def test_serve_checks_before_starting(tmp_path, capsys):
    """`lineas-fast serve` refuses bad --steering values and prints the vLLM command with --dry-run."""
    from lineas_fast.cli import main
    from tiny_models import tiny_model

    model = tiny_model("llama")
    model.save_pretrained(tmp_path / "m")
    sites = lf.resolve_sites(model, "norms")
    widths = {s: model.config.hidden_size for s in sites}
    _steering(widths, 1).save(tmp_path / "ok.safetensors")
    _steering(widths, 1, model_type="gpt2").save(tmp_path / "gpt2.safetensors")
    (tmp_path / "bad.safetensors").write_bytes(b"garbage")
    m = str(tmp_path / "m")
    for argv, words in [(["--steering", "x"], "NAME=PATH"), (["--steering", f"a={tmp_path}/none"], "no such file"),
                        (["--steering", f"a={tmp_path}/ok.safetensors", "--steering", f"a={tmp_path}/ok.safetensors"],
                         "given twice"),
                        (["--steering", f"a={tmp_path}/gpt2.safetensors"], "gpt2"),
                        (["--steering", f"a={tmp_path}/bad.safetensors"], "bad.safetensors"),
                        (["--max-steerings", "0"], ">= 1"),
                        (["--additional-config", "{nope"], "not JSON")]:
        assert main(["serve", m, *argv, "--dry-run"]) == 2, argv
        assert words in capsys.readouterr().err, argv
    env_python = tmp_path / "python"
    env_python.write_text("")
    import os
    os.environ["LINEAS_FAST_VLLM_PYTHON"] = str(env_python)
    try:
        assert main(["serve", m, "--steering", f"a={tmp_path}/ok.safetensors", "--port", "9", "--dry-run"]) == 0
    finally:
        del os.environ["LINEAS_FAST_VLLM_PYTHON"]
    out = capsys.readouterr().out
    assert out.startswith("VLLM_PLUGINS=lineas_fast ") and "--port 9" in out and '"lineas_fast"' in out
    assert "--served-model-name" in out and sites[0] in out
