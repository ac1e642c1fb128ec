"""Models the defaults were not written for. Architectures without preset data (``lineas_fast.sites.FAMILIES``):
the presets are read off their first block's layers, and the library defaults fit, steer (hooks, fused, fold),
route and restore on them (Pythia, OPT, Phi, Falcon name their parts otherwise). Tokenizers without a pad
token (GPT-2's, Pythia's, many Llama ones): fitting and evaluating pad with EOS and leave the tokenizer as it was."""

import pytest
import torch
from torch import nn

import lineas_fast as lf
from conftest import make_model
from snapshot import assert_unchanged, model_snapshot
from tiny_models import UNLISTED_ARCHS, tiny_batch
from lineas_fast.errors import SiteError
from lineas_fast.sites import FAMILIES, site_widths

pytestmark = pytest.mark.usefixtures("one_thread")

# (block list, MLP down projection, attention output projection, MLP width) of each tiny model
EXPECTED = {
    "gpt_neox": ("gpt_neox.layers", "mlp.dense_4h_to_h", "attention.dense", 64),
    "opt": ("model.decoder.layers", "fc2", "self_attn.out_proj", 64),
    "phi": ("model.layers", "mlp.fc2", "self_attn.dense", 64),
    "falcon": ("transformer.h", "mlp.dense_4h_to_h", "self_attention.dense", 128),
}
SRC = ["you are a stupid idiot", "shut up you fool", "what a dumb thing to say"]
TGT = ["the river flows to the sea", "a history of the city", "the album was released in may"]


def test_the_tiny_models_really_have_no_preset_data():
    assert not set(UNLISTED_ARCHS) & set(FAMILIES) and set(EXPECTED) == set(UNLISTED_ARCHS)


@pytest.mark.parametrize("arch", UNLISTED_ARCHS)
def test_presets_are_read_off_the_layers(arch):
    model = make_model(arch)
    blocks, down, proj, width = EXPECTED[arch]
    want = {"mlp_hidden": f"{down}:in", "mlp_out": down, "attn_out": proj}
    for preset, rel in want.items():
        sites = lf.resolve_sites(model, preset)
        assert sites == [f"{blocks}.{i}.{rel}" for i in range(2)], preset
    assert set(site_widths(model, lf.resolve_sites(model, "mlp_hidden")).values()) == {width}
    assert set(site_widths(model, lf.resolve_sites(model, "attn_out+mlp_out")).values()) == {32}
    with pytest.raises(SiteError, match="post_norms"):
        lf.resolve_sites(model, "post_norms")


@pytest.mark.parametrize("arch", UNLISTED_ARCHS)
def test_the_library_defaults_fit_steer_and_restore(arch, tok):
    """``lf.fit`` with the defaults (2 steps) on the default sites; the three apply modes agree; the model
    comes back bit-exactly."""
    model = make_model(arch)
    st = lf.fit(model, tok, SRC, TGT, steps=2, progress=False)
    assert st.sites == lf.resolve_sites(model, "mlp_hidden") and st.nnz() > 0
    ids, mask = tiny_batch()
    snap = model_snapshot(model)
    with torch.no_grad():
        plain = model(input_ids=ids, attention_mask=mask).logits
        out = {}
        for mode in ("hooks", "fused", "fold"):
            with lf.steered(model, st, strength=1.0, mode=mode):
                out[mode] = model(input_ids=ids, attention_mask=mask).logits
            assert_unchanged(model, snap)
    keep = mask.bool()
    assert not torch.allclose(out["hooks"][keep], plain[keep], atol=1e-4)  # steering changes the outputs
    for mode in ("fused", "fold"):
        torch.testing.assert_close(out[mode][keep], out["hooks"][keep], atol=1e-4, rtol=1e-4)


def test_per_row_routing_where_the_tokens_are_flattened(tok):
    """OPT's MLP runs on ``[batch · tokens, width]``: a per-row strength still reaches each row's tokens —
    every row of a mixed batch gets what a batch of that row alone at its strength gets."""
    model = make_model("opt")
    st = lf.fit(model, tok, SRC, TGT, steps=2, progress=False)
    ids, mask = tiny_batch(batch=3, pad_left=False)
    strengths = [1.0, 0.0, 0.5]
    with torch.no_grad():
        h = lf.steer_(model, st, strength=strengths, mode="hooks")
        try:
            mixed = model(input_ids=ids, attention_mask=mask).logits
        finally:
            h.remove()
        for r, lam in enumerate(strengths):
            with lf.steered(model, st, strength=lam, mode="hooks"):
                alone = model(input_ids=ids[r:r + 1], attention_mask=mask[r:r + 1]).logits
            keep = mask[r].bool()
            torch.testing.assert_close(mixed[r][keep], alone[0][keep], atol=1e-5, rtol=1e-5)


def test_an_ambiguous_block_is_refused_naming_what_it_saw():
    """Two Linear layers that could be the MLP's down projection (e.g. experts): no guess, a SiteError."""
    model = make_model("gpt_neox")
    for layer in model.gpt_neox.layers:
        layer.mlp.extra_out = nn.Linear(64, 32)
    with pytest.raises(SiteError, match=r"mlp_hidden.*gpt_neox.*dense_4h_to_h.*extra_out"):
        lf.resolve_sites(model, "mlp_hidden")


def test_a_tokenizer_without_a_pad_token(tok):
    """Every padded path works without a pad token, gives what it gives with one (padding is masked), and
    leaves the tokenizer without one."""
    from conftest import make_tokenizer

    bare = make_tokenizer("right")
    bare.pad_token = None
    model = make_model("gpt2")
    conts = [[5, 6], [7], [8, 9]]
    runs = {}
    for name, t in (("pad", tok), ("bare", bare)):
        runs[name] = {
            "collect": lf.collect(model, t, SRC, sites="mlp_hidden", pooling="mean", progress=False),
            "fit": lf.fit(model, t, SRC, TGT, steps=2, progress=False),
            "mean_act": lf.fit(model, t, SRC, TGT, method="mean_act", progress=False),
            "gen": lf.evaluate.continuations(model, t, SRC, max_new_tokens=3)[1],
            "ppl": lf.evaluate.perplexity(model, t, TGT),
            "fluency": lf.evaluate.fluency(model, t, SRC, conts),
        }
    assert bare.pad_token is None and bare.pad_token_id is None
    a, b = runs["pad"], runs["bare"]
    for site in a["collect"]:
        torch.testing.assert_close(a["collect"][site], b["collect"][site], atol=1e-5, rtol=1e-5)
    for key in ("fit", "mean_act"):
        for site in a[key].sites:
            torch.testing.assert_close(a[key].shift[site], b[key].shift[site], atol=1e-5, rtol=1e-4)
    assert a["gen"] == b["gen"]
    assert a["ppl"] == pytest.approx(b["ppl"], rel=1e-5) and a["fluency"] == pytest.approx(b["fluency"], rel=1e-5)
