"""Reliability of the entry paths that take sites, prompts and fit options (SPEC §6: one clear error naming
the problem, never a silent wrong result, never a changed model).

* out-of-range sites (a block index past the end, ``":k"`` on a tensor output or past a tuple's end) raise
  :class:`lf.SiteError` naming what is valid, from resolve_sites / check_sites / collect / fit / steer_;
* prompts longer than the model's positions (the tiny GPT-2 has ``n_positions=128``, one char per token)
  are truncated to ``min(max_length, max positions)`` with a warning, in collect, fit and the evaluation
  protocol, instead of an IndexError inside the position embedding;
* ``fit`` refuses ``steps=0``, non-finite or negative ``l1``/``group_l2`` and prompts of zero tokens, and
  warns when its result is the identity or sparsity switched off more than 95 % of its sites.
"""

import math
import warnings

import pytest
import torch

import lineas_fast as lf
from conftest import SOURCE, TARGET, make_model, make_tokenizer
from snapshot import assert_unchanged, model_snapshot

pytestmark = pytest.mark.usefixtures("one_thread")

FAST = dict(steps=2, lr=1e-2, sites="norms", pooling="mean", normalize=None, preserve=0.0, progress=False)
LIMIT = 128  # tests/tiny_models.py: GPT-2 n_positions, Llama max_position_embeddings


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer("right")


def no_position_warnings(record) -> list[str]:
    return [str(w.message) for w in record if "positions" in str(w.message)]


# ---------------------------------------------------------------- 1. out-of-range sites
BAD_SITES = [
    ("llama", "model.layers.99.input_layernorm", "model.layers has 2 blocks: 0..1"),
    ("llama", ["model.layers.0.input_layernorm", "model.layers.2.mlp"], "model.layers has 2 blocks: 0..1"),
    ("llama", "model.layers.1.mlp:7", "output is a tensor, not a tuple; drop ':7'"),
    ("llama", "model.layers.0.input_layernorm:0", "output is a tensor, not a tuple; drop ':0'"),
    ("llama", "model.layers.1.self_attn:7", "output is a tuple of 2 element\\(s\\): valid suffixes are ':0'..':1'"),
    ("llama", "model.layers.1.self_attn:1", "element 1 of the output is NoneType, not a tensor"),
    ("llama", "model.layers.0.mlp.gate_prj", "model.layers.0.mlp has no child 'gate_prj' \\(children: gate_proj"),
    ("gpt2", "transformer.h.5.ln_1", "transformer.h has 2 blocks: 0..1"),
    ("gpt2", "transformer.h.0.mlp:1", "output is a tensor, not a tuple; drop ':1'"),
]


@pytest.mark.parametrize("arch, site, why", BAD_SITES)
def test_resolve_sites_names_the_valid_range(arch, site, why):
    model = make_model(arch)
    snap = model_snapshot(model)
    with pytest.raises(lf.SiteError, match=why) as e:
        lf.resolve_sites(model, site)
    assert isinstance(e.value, lf.SteeringError)
    assert_unchanged(model, snap)


def test_check_sites_probe_keeps_train_eval_flags_and_rng():
    """The ``:k`` probe runs in eval mode (no dropout draw) and puts each module's flag back."""
    from lineas_fast.sites import check_sites

    model = make_model("gpt2")
    model.train()
    model.transformer.h[1].eval()
    flags = [m.training for m in model.modules()]
    rng = torch.random.get_rng_state()
    check_sites(model, ["transformer.h.0.attn:0", "transformer.h.1.attn:0"])
    assert torch.equal(torch.random.get_rng_state(), rng)
    assert [m.training for m in model.modules()] == flags
    with pytest.raises(lf.SiteError, match="transformer.h.1.attn:3"):
        check_sites(model, ["transformer.h.0.attn:0", "transformer.h.1.attn:3"])
    assert [m.training for m in model.modules()] == flags


@pytest.mark.parametrize("site, why", [("model.layers.99.input_layernorm", "2 blocks: 0..1"),
                                       ("model.layers.1.mlp:7", "drop ':7'"),
                                       ("model.layers.0.input_layernorm:0", "drop ':0'")])
def test_collect_and_fit_refuse_bad_sites_untouched(tok, site, why):
    model = make_model("llama")
    snap = model_snapshot(model)
    with pytest.raises(lf.SiteError, match=why):
        lf.collect(model, tok, SOURCE, sites=site)
    assert_unchanged(model, snap)
    for method in ("lineas", "mean_act"):
        kw = FAST if method == "lineas" else {}
        with pytest.raises(lf.SiteError, match=why):
            lf.fit(model, tok, SOURCE, TARGET, method=method, **{**kw, "sites": site})
        assert_unchanged(model, snap)


@pytest.mark.parametrize("mode", [None, "hooks", "fold"])
@pytest.mark.parametrize("site, why", [("model.layers.1.mlp:7", "drop ':7'"),
                                       ("model.layers.1.self_attn:4", "tuple of 2"),
                                       ("model.layers.5.input_layernorm", "2 blocks: 0..1")])
def test_steer_refuses_a_steering_with_a_bad_site_untouched(mode, site, why):
    from lineas_fast.patching.handle import ATTR

    model = make_model("llama")
    good = "model.layers.0.input_layernorm"
    st = lf.Steering({good: torch.full((32,), 1.5), site: torch.full((32,), 2.0)},
                     {good: torch.zeros(32), site: torch.ones(32)},
                     {"method": "custom", "model_type": "llama", "model_class": type(model).__name__})
    snap = model_snapshot(model)
    with pytest.raises(lf.SiteError, match=why):
        lf.steer_(model, st, mode=mode)
    assert getattr(model, ATTR, None) is None
    assert_unchanged(model, snap)


# ---------------------------------------------------------------- 2. prompts longer than the model's positions
LONG = ["a" * 200 + " tail", "short prompt here", "b" * 129, "c" * LIMIT]  # 205, 17, 129, 128 tokens


def test_collect_truncates_to_the_model_positions_with_a_warning(tok):
    model = make_model("gpt2")
    snap = model_snapshot(model)
    with pytest.warns(UserWarning, match=r"2 of 4 prompts in texts are longer than GPT2LMHeadModel's 128 positions"
                                         r" \(max_length=None\): truncated to 128 tokens"):
        got = lf.collect(model, tok, LONG, sites="norms", max_length=None)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        want = lf.collect(model, tok, [t[:LIMIT] for t in LONG], sites="norms", max_length=None)
        same = lf.collect(model, tok, LONG, sites="norms", max_length=LIMIT)  # max_length alone cuts: no warning
    assert no_position_warnings(record) == []
    for s in want:
        torch.testing.assert_close(got[s], want[s], rtol=0, atol=0)
        torch.testing.assert_close(same[s], want[s], rtol=0, atol=0)
    assert_unchanged(model, snap)


def test_collect_tokens_pooling_and_sets_count_truncated_rows(tok):
    from lineas_fast.collect import collect_sets

    model = make_model("gpt2")
    with pytest.warns(UserWarning, match="2 of 4 prompts"):
        a, b = collect_sets(model, tok, [LONG[:2], LONG[2:]], ["transformer.h.0.ln_1"], pooling="tokens",
                            max_length=1000)
    assert a["transformer.h.0.ln_1"].shape[0] == LIMIT + 17
    assert b["transformer.h.0.ln_1"].shape[0] == LIMIT + LIMIT


@pytest.mark.parametrize("pooling", ["mean", "tokens"])
def test_fit_truncates_long_prompts_with_a_warning(tok, pooling):
    model = make_model("gpt2")
    snap = model_snapshot(model)
    source = SOURCE[:4] + LONG[:1]
    target = TARGET[:4] + LONG[2:3]
    with pytest.warns(UserWarning, match="positions") as record:
        st = lf.fit(model, tok, source, target, **{**FAST, "pooling": pooling, "preserve": 1.0},
                    max_length=512)
    messages = no_position_warnings(record)
    assert any("1 of 5 prompts in source" in m for m in messages), messages
    assert any("1 of 5 prompts in target" in m for m in messages), messages
    assert st.meta["hyperparams"]["max_length"] == 512  # what was asked for
    assert all(torch.isfinite(st.scale[s]).all() for s in st.sites)
    assert_unchanged(model, snap)
    with pytest.warns(UserWarning, match="2 of 10 prompts in texts"):
        lf.fit(model, tok, source, target, method="mean_act", max_length=None)
    assert_unchanged(model, snap)


def test_perplexity_continuations_fluency_fit_the_positions(tok):
    from lineas_fast.evaluate.metrics import continuations, fluency, perplexity

    model = make_model("gpt2")
    passages = ["d" * 300, "a plain sentence"]
    with pytest.warns(UserWarning, match="1 of 2 passages are longer than GPT2LMHeadModel's 128 positions "
                                         "minus 1 reserved"):
        ppl = perplexity(model, tok, passages)  # max_length=192 and BOS: 193 positions without the rule
    assert math.isfinite(ppl)
    prompts = ["e" * 126, "short one"]  # 126 + 5 new tokens: 131 positions without the rule
    with pytest.warns(UserWarning, match="1 of 2 prompts are longer .* minus 5 reserved.*truncated to 123 tokens"):
        texts, ids = continuations(model, tok, prompts, max_new_tokens=5)
    assert [len(i) <= 5 for i in ids] == [True, True]
    conts = [[5, 6, 7, 8, 9, 10, 11, 12, 13, 14], [5, 6]]
    with pytest.warns(UserWarning, match="1 of 2 prompts \\+ continuations"):
        assert math.isfinite(fluency(model, tok, prompts, conts))


def test_no_warning_within_the_positions(tok):
    model = make_model("gpt2")
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        lf.collect(model, tok, SOURCE, sites="norms", max_length=None)
        lf.collect(model, tok, LONG, sites="norms", max_length=64)
    assert no_position_warnings(record) == []


# ---------------------------------------------------------------- 3. fit arguments and inert results
@pytest.mark.parametrize("kw, name", [
    (dict(steps=0), "steps"), (dict(steps=-3), "steps"), (dict(steps=True), "steps"),
    (dict(l1=math.inf), "l1"), (dict(l1=math.nan), "l1"), (dict(l1=-1e-3), "l1"),
    (dict(group_l2=math.inf), "group_l2"), (dict(group_l2=-1.0), "group_l2"),
])
def test_fit_refuses_invalid_values_naming_them(tok, kw, name):
    model = make_model("llama")
    snap = model_snapshot(model)
    with pytest.raises(lf.SteeringError, match=f"^{name}="):
        lf.fit(model, tok, SOURCE, TARGET, **{**FAST, **kw})
    assert_unchanged(model, snap)


def stripping_tokenizer():
    """The char tokenizer behind a normaliser that drops control characters (as many real tokenizers'
    cleaning does): a prompt of control characters is a non-empty string of zero tokens."""
    from tokenizers import Regex, normalizers

    tok = make_tokenizer("right")
    tok.backend_tokenizer.normalizer = normalizers.Replace(Regex("[\\x00-\\x1f]"), "")
    assert tok(["\x01\x02", "ab"])["input_ids"] == [[], [VOCAB_A, VOCAB_A + 1]]
    return tok


VOCAB_A = 3 + ord("a") - 32


@pytest.mark.parametrize("which", ["source", "target"])
def test_fit_refuses_prompts_of_zero_tokens(which):
    tok = stripping_tokenizer()
    model = make_model("llama")
    snap = model_snapshot(model)
    bad = ["\x01\x02", "\x03\x04\x05"]
    sets = {"source": SOURCE, "target": TARGET, which: bad + (SOURCE if which == "source" else TARGET)[:2]}
    with pytest.raises(lf.SteeringError, match=f"{which}: prompts \\[0, 1\\] of 4 tokenise to zero tokens"):
        lf.fit(model, tok, sets["source"], sets["target"], **FAST)
    assert_unchanged(model, snap)
    with pytest.raises(lf.SteeringError, match="texts: prompts \\[0, 1\\] of 2 tokenise to zero tokens"):
        lf.collect(model, tok, bad, sites="norms")
    with pytest.raises(lf.SteeringError, match="tokenise to zero tokens"):
        lf.fit(model, tok, sets["source"], sets["target"], method="mean_act")
    assert_unchanged(model, snap)


@pytest.mark.parametrize("kw", [dict(group_l2=10.0), dict(l1=100.0)])
def test_fit_warns_when_it_returns_the_identity(tok, kw):
    model = make_model("llama")
    with pytest.warns(UserWarning, match="fit returned the identity map: all 4 sites and 128 neurons"):
        st = lf.fit(model, tok, SOURCE, TARGET, **{**FAST, **kw})
    assert all(torch.equal(st.scale[s], torch.ones_like(st.scale[s])) for s in st.sites)
    assert all(torch.equal(st.shift[s], torch.zeros_like(st.shift[s])) for s in st.sites)


def test_fit_without_sparsity_does_not_warn(tok):
    model = make_model("llama")
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        lf.fit(model, tok, SOURCE, TARGET, **FAST)
    assert [str(w.message) for w in record if "identity" in str(w.message) or "sparsity" in str(w.message)] == []


@pytest.mark.parametrize("active, warns", [(2, True), (0, True), (3, False), (60, False)])
def test_sparsity_warning_threshold(active, warns):
    """More than 95 % of the sites switched off warns with the numbers; 57 of 60 (95.0 %) does not."""
    from lineas_fast.methods.trainer import Recipe, warn_if_inert

    groups = [slice(4 * i, 4 * i + 4) for i in range(60)]
    omega, shift = torch.ones(240), torch.zeros(240)
    for i in range(active):
        shift[4 * i + 1] = 0.5
    recipe = Recipe(steps=10, lr=1e-2, l1=0.1, group_l2=0.2)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        warn_if_inert(omega, shift, groups, recipe)
    messages = [str(w.message) for w in record]
    if not warns:
        assert messages == []
    elif active:
        assert messages == [f"sparsity switched off {60 - active} of 60 sites (96.7 %); lower l1=0.1/group_l2=0.2"]
    else:
        assert len(messages) == 1 and messages[0].startswith("fit returned the identity map: all 60 sites")
