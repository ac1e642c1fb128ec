"""Site resolution on every tiny architecture: presets, regex, explicit lists, ':k' and ':in' sites."""

import pytest
import torch

import lineas_fast as lf
from conftest import ARCHS, make_model
from lineas_fast.collect import probe_shapes
from lineas_fast.sites import Site, site_widths

pytestmark = pytest.mark.usefixtures("one_thread")

GEMMA = {"gemma2", "gemma3"}
BLOCK_PREFIX = {"gpt2": "transformer.h"}
HIDDEN, LAYERS = 32, 2
MLP_HIDDEN = {"gpt2": 4 * HIDDEN}  # GPT-2's n_inner defaults to 4·hidden; the others use intermediate_size=48


def prefix(arch):
    return BLOCK_PREFIX.get(arch, "model.layers")


@pytest.fixture(scope="module", params=ARCHS)
def arch_model(request):
    return request.param, make_model(request.param)


def expected_norms(arch):
    if arch == "gpt2":
        rel = ["ln_1", "ln_2"]
    elif arch in GEMMA:
        rel = ["input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
               "post_feedforward_layernorm"]
    else:
        rel = ["input_layernorm", "post_attention_layernorm"]
    return [f"{prefix(arch)}.{i}.{r}" for i in range(LAYERS) for r in rel]


def test_norms_preset(arch_model):
    arch, model = arch_model
    sites = lf.resolve_sites(model, "norms")
    assert sites == expected_norms(arch)
    modules = dict(model.named_modules())
    for s in sites:
        assert "norm" in type(modules[s]).__name__.lower()
    # never the final norm, never per-head q/k norms
    assert not any(s.endswith(("model.norm", "ln_f")) for s in sites)
    assert not any("q_norm" in s or "k_norm" in s for s in sites)
    assert set(site_widths(model, sites).values()) == {HIDDEN}


@pytest.mark.parametrize("arch", ["qwen3", "gemma3"])
def test_norms_excludes_qk_norms_that_exist(arch):
    model = make_model(arch)
    names = [n for n, _ in model.named_modules()]
    assert any(n.endswith("q_norm") for n in names) and any(n.endswith("k_norm") for n in names)
    assert "model.norm" in names
    sites = lf.resolve_sites(model, "norms")
    assert not any(s.endswith(("q_norm", "k_norm")) or s == "model.norm" for s in sites)


def test_post_norms_preset(arch_model):
    arch, model = arch_model
    if arch in GEMMA:
        sites = lf.resolve_sites(model, "post_norms")
        assert sites == [f"model.layers.{i}.{r}" for i in range(LAYERS)
                         for r in ("post_attention_layernorm", "post_feedforward_layernorm")]
        assert set(site_widths(model, sites).values()) == {HIDDEN}
    else:
        with pytest.raises(lf.SteeringError, match="post_norms"):
            lf.resolve_sites(model, "post_norms")


@pytest.mark.parametrize("preset", ["mlp_out", "attn_out", "mlp_hidden"])
def test_block_presets(arch_model, preset):
    arch, model = arch_model
    sites = lf.resolve_sites(model, preset)
    assert len(sites) == LAYERS
    assert [int(s.split(".")[2]) for s in sites] == list(range(LAYERS))
    widths = site_widths(model, sites)
    want = MLP_HIDDEN.get(arch, 48) if preset == "mlp_hidden" else HIDDEN
    assert set(widths.values()) == {want}, widths
    # widths read off weights agree with the widths seen in a real forward
    probed = probe_shapes(model, sites)
    assert {s: shape[-1] for s, shape in probed.items()} == widths
    if preset == "mlp_hidden":
        assert all(s.endswith(":in") for s in sites)
    if preset == "attn_out":
        assert all(s.endswith(":0") for s in sites)


def test_presets_joined_by_plus(arch_model):
    """"attn_out+mlp_out" (the residual-stream writers) is the union of both presets, in model order."""
    arch, model = arch_model
    both = lf.resolve_sites(model, "attn_out+mlp_out")
    assert sorted(both) == sorted(lf.resolve_sites(model, "attn_out") + lf.resolve_sites(model, "mlp_out"))
    assert [int(s.split(".")[2]) for s in both] == sorted(int(s.split(".")[2]) for s in both)
    with pytest.raises(lf.SteeringError, match="attn_out\\+bogus"):
        lf.resolve_sites(model, "attn_out+bogus")


def test_regex_and_list(arch_model):
    arch, model = arch_model
    norms = expected_norms(arch)
    # a regex selecting the first norm of every block
    first_rel = norms[0].rsplit(".", 1)[1]
    regex = rf"{prefix(arch)}\.\d+\.{first_rel}"
    assert lf.resolve_sites(model, regex) == [n for n in norms if n.endswith("." + first_rel)]
    # an explicit list is returned in model order, deduplicated
    lst = [norms[-1], norms[0], norms[-1]]
    assert lf.resolve_sites(model, lst) == [norms[0], norms[-1]]
    # a single module name is itself a site
    assert lf.resolve_sites(model, norms[1]) == [norms[1]]


def test_colon_k_and_in_sites(arch_model):
    arch, model = arch_model
    attn = "attn" if arch == "gpt2" else "self_attn"
    down = "mlp.c_proj" if arch == "gpt2" else "mlp.down_proj"
    sites = [f"{prefix(arch)}.1.{attn}:0", f"{prefix(arch)}.0.{down}:in"]
    resolved = lf.resolve_sites(model, sites)
    assert resolved == sites[::-1]  # model order: block 0 before block 1
    assert Site.parse(sites[0]) == Site(sites[0], f"{prefix(arch)}.1.{attn}", index=0)
    assert Site.parse(sites[1]) == Site(sites[1], f"{prefix(arch)}.0.{down}", is_input=True)
    w = site_widths(model, resolved)
    assert w == {sites[0]: HIDDEN, sites[1]: MLP_HIDDEN.get(arch, 48)}


def test_colon_k_values_are_what_the_module_outputs():
    """The ':0' site of an attention module is its hidden output (element 0 of the tuple)."""
    model = make_model("llama")
    site = "model.layers.0.self_attn:0"
    got = lf.collect(model, _tok(), ["abc de"], [site], pooling="tokens")[site]
    seen = {}
    h = model.model.layers[0].self_attn.register_forward_hook(lambda m, a, o: seen.setdefault("o", o))
    try:
        with torch.no_grad():
            model(input_ids=torch.tensor([[68, 69, 70, 3, 71, 72]]))
    finally:
        h.remove()
    assert isinstance(seen["o"], tuple)
    torch.testing.assert_close(got, seen["o"][0][0], atol=1e-5, rtol=0)


def _tok():
    from conftest import make_tokenizer

    return make_tokenizer()


@pytest.mark.parametrize("bad", ["model.layers.7.input_layernorm", "no_such_module_anywhere",
                                 ["model.layers.0.input_layernorm", "model.layers.0.nope"]])
def test_unknown_site_names_it(bad):
    model = make_model("llama")
    with pytest.raises(lf.SteeringError) as e:
        lf.resolve_sites(model, bad)
    name = bad[-1] if isinstance(bad, list) else bad
    assert name in str(e.value)


@pytest.mark.parametrize("bad", ["model.layers.0.mlp:out", "model.layers.0.mlp:x1"])
def test_bad_suffix(bad):
    with pytest.raises(lf.SteeringError, match="suffix"):
        lf.resolve_sites(make_model("llama"), bad)


@pytest.mark.parametrize("bad", [[], 3, None, ["ok", 5]])
def test_bad_site_argument(bad):
    with pytest.raises(lf.SteeringError):
        lf.resolve_sites(make_model("llama"), bad)


def test_steering_error_is_value_error():
    assert issubclass(lf.SteeringError, ValueError)
