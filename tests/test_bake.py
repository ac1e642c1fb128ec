"""bake: fold for good, save_pretrained, reload with stock transformers → the steered logits (1e-4).

Where a stock checkpoint cannot express a shift (no config flag for the bias it needs), bake refuses,
names the sites and leaves the model (weights and config) untouched.
"""

import json
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

import lineas_fast as lf
from conftest import assert_state_equal, logits, make_model, max_diff, no_hooks_left, random_steering, snapshot
from lineas_fast.patching.handle import ATTR

pytestmark = pytest.mark.usefixtures("one_thread")

TOL = 1e-4
STEERED_MIN = 1e-3


def bake_and_reload(model, st, tmp_path, strength=1.0):
    """(hooks-steered logits, baked in-memory logits, stock-reloaded logits)."""
    with lf.steered(model, st, strength=strength, mode="hooks"):
        want = logits(model)
    out = lf.bake(model, st, strength=strength)
    assert out is model
    assert getattr(model, ATTR, None) is None and no_hooks_left(model) == []
    baked = logits(model)
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert no_hooks_left(reloaded) == []
    return want, baked, logits(reloaded)


@pytest.mark.parametrize("sites", ["norms", "mlp_out", "attn_out", "mlp_hidden"])
def test_bake_gpt2(tmp_path, sites):
    model = make_model("gpt2")
    base = logits(model)
    st = random_steering(model, sites, seed=3)
    want, baked, reloaded = bake_and_reload(model, st, tmp_path)
    assert max_diff(want, base) > STEERED_MIN
    assert max_diff(baked, want) <= TOL
    assert max_diff(reloaded, want) <= TOL


@pytest.mark.parametrize("sites,flags", [
    ("norms", {"attention_bias", "mlp_bias"}),
    ("mlp_hidden", {"mlp_bias"}),
    ("mlp_out", {"mlp_bias"}),
    ("attn_out", {"attention_bias"}),
])
def test_bake_llama_sets_bias_flags(tmp_path, sites, flags):
    model = make_model("llama")
    assert not model.config.attention_bias and not model.config.mlp_bias
    base = logits(model)
    st = random_steering(model, sites, seed=4)
    want, baked, reloaded = bake_and_reload(model, st, tmp_path, strength=0.8)
    assert max_diff(want, base) > STEERED_MIN
    assert max_diff(baked, want) <= TOL
    assert max_diff(reloaded, want) <= TOL
    saved = json.loads((tmp_path / "config.json").read_text())
    for flag in ("attention_bias", "mlp_bias"):
        assert saved[flag] is (flag in flags), (flag, saved[flag])
        assert getattr(model.config, flag) is (flag in flags)


def test_bake_llama_scale_only_needs_no_flags(tmp_path):
    model = make_model("llama")
    st = random_steering(model, "norms", shift=False)
    keys = list(model.state_dict())
    want, baked, reloaded = bake_and_reload(model, st, tmp_path)
    assert not model.config.attention_bias and not model.config.mlp_bias
    assert list(model.state_dict()) == keys
    assert max_diff(reloaded, want) <= TOL


_RELOAD = r"""
import sys, torch
from transformers import AutoModelForCausalLM
m = AutoModelForCausalLM.from_pretrained(sys.argv[1]).eval()
ids, mask = torch.load(sys.argv[2])
with torch.no_grad():
    torch.save(m(input_ids=ids, attention_mask=mask).logits, sys.argv[3])
assert "lineas_fast" not in sys.modules
"""


def test_bake_llama_reloads_in_a_clean_process(tmp_path):
    """Stock transformers in a fresh interpreter (lineas_fast never imported) gives the steered logits."""
    from conftest import tiny_batch

    model = make_model("llama")
    st = random_steering(model, "norms", seed=6)
    with lf.steered(model, st, mode="hooks"):
        want = logits(model)
    lf.bake(model, st)
    model.save_pretrained(tmp_path / "ckpt")
    torch.save(tiny_batch(), tmp_path / "batch.pt")
    env_cmd = [sys.executable, "-c", _RELOAD, str(tmp_path / "ckpt"), str(tmp_path / "batch.pt"),
               str(tmp_path / "out.pt")]
    r = subprocess.run(env_cmd, capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    got = torch.load(tmp_path / "out.pt")
    assert max_diff(got, want) <= TOL


def test_bake_qwen2_input_norm_shift_uses_native_qkv_bias(tmp_path):
    model = make_model("qwen2")
    st = random_steering(model, r"model\.layers\.\d+\.input_layernorm", seed=7)
    cfg = model.config.to_dict()
    want, baked, reloaded = bake_and_reload(model, st, tmp_path)
    ignore = {"architectures", "dtype", "torch_dtype", "transformers_version"}  # written by save_pretrained
    after = model.config.to_dict()
    assert {k: v for k, v in after.items() if k not in ignore} == {k: v for k, v in cfg.items() if k not in ignore}
    assert max_diff(reloaded, want) <= TOL


def test_bake_mistral_scale_only(tmp_path):
    model = make_model("mistral")
    st = random_steering(model, "norms", shift=False, seed=8)
    want, baked, reloaded = bake_and_reload(model, st, tmp_path)
    assert max_diff(reloaded, want) <= TOL


@pytest.mark.parametrize("arch,sites,named", [
    ("mistral", "norms", ["input_layernorm", "post_attention_layernorm"]),
    ("mistral", "mlp_out", ["mlp"]),
    ("qwen2", "norms", ["post_attention_layernorm"]),
    ("qwen2", "mlp_hidden", ["down_proj:in"]),
    ("phi3", "norms", ["input_layernorm", "post_attention_layernorm"]),
    ("gemma2", "post_norms", ["post_attention_layernorm", "post_feedforward_layernorm"]),
])
def test_bake_refuses_and_leaves_model_untouched(arch, sites, named):
    model = make_model(arch)
    st = random_steering(model, sites, seed=9)
    snap, base, cfg = snapshot(model), logits(model), model.config.to_dict()
    with pytest.raises(lf.SteeringError) as e:
        lf.bake(model, st)
    for n in named:
        assert n in str(e.value)
    assert_state_equal(model, snap)
    assert model.config.to_dict() == cfg
    assert torch.equal(logits(model), base)
    assert getattr(model, ATTR, None) is None


def test_bake_refusal_names_only_unbakeable_sites():
    model = make_model("qwen2")
    st = random_steering(model, "norms", seed=10)
    with pytest.raises(lf.SteeringError) as e:
        lf.bake(model, st)
    assert "post_attention_layernorm" in str(e.value)
    assert "input_layernorm" not in str(e.value)


def test_bake_rejects_a_dict_and_a_steered_model():
    model = make_model("gpt2")
    st = random_steering(model, "norms")
    snap = snapshot(model)
    with pytest.raises(lf.SteeringError):
        lf.bake(model, {"a": st})
    with lf.steered(model, st, mode="hooks"):
        with pytest.raises(lf.SteeringError, match="remove"):
            lf.bake(model, st)
    assert_state_equal(model, snap)
