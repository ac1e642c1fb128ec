"""Activation collection: pooling shapes and values, padding independence, early stop, bad input."""

import pytest
import torch

import lineas_fast as lf
from conftest import ARCHS, SOURCE, make_model, make_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")

TEXTS = ["hello world", "a", "the quick brown fox jumps", "xyz 123"]  # lengths 11, 1, 25, 7


def lengths(tok, texts):
    return [len(tok(t)["input_ids"]) for t in texts]


@pytest.fixture(scope="module")
def llama():
    return make_model("llama")


@pytest.mark.parametrize("pooling", ["mean", "last", "tokens"])
def test_pooling_shapes_and_types(llama, tok, pooling):
    out = lf.collect(llama, tok, TEXTS, sites="norms", pooling=pooling)
    assert list(out) == lf.resolve_sites(llama, "norms")
    n = sum(lengths(tok, TEXTS)) if pooling == "tokens" else len(TEXTS)
    for v in out.values():
        assert v.shape == (n, 32)
        assert v.dtype == torch.float32 and v.device.type == "cpu"


def test_pooling_values_match_a_plain_forward(llama, tok):
    """mean / last / tokens of the padded batch equal what one unpadded forward per sentence shows."""
    site = "model.layers.1.post_attention_layernorm"
    res = {p: lf.collect(llama, tok, TEXTS, sites=[site], pooling=p)[site] for p in ("mean", "last", "tokens")}
    module = llama.get_submodule(site)
    blocks = []
    for i, t in enumerate(TEXTS):
        ids = tok([t], return_tensors="pt")["input_ids"]
        box = {}
        h = module.register_forward_hook(lambda m, a, o: box.setdefault("h", o))
        try:
            with torch.no_grad():
                llama(input_ids=ids)
        finally:
            h.remove()
        tokens = box["h"][0]
        torch.testing.assert_close(res["mean"][i], tokens.mean(0), atol=1e-5, rtol=0)
        torch.testing.assert_close(res["last"][i], tokens[-1], atol=1e-5, rtol=0)
        blocks.append(tokens)
    # token rows are grouped by prompt, prompts in input order (despite length bucketing inside)
    expected = torch.cat(blocks)
    assert res["tokens"].shape == expected.shape
    torch.testing.assert_close(res["tokens"], expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("arch", ARCHS)
def test_padding_independence(arch):
    """Pooled activations of a sentence do not depend on left/right padding nor on its batch mates."""
    model = make_model(arch)
    right, left = make_tokenizer("right"), make_tokenizer("left")
    texts = TEXTS
    alone = {p: [lf.collect(model, right, [t], sites="norms", pooling=p) for t in texts] for p in ("mean", "last")}
    for tok in (right, left):
        for p in ("mean", "last"):
            batched = lf.collect(model, tok, texts, sites="norms", pooling=p)
            # a different batch composition: the sentence next to a much longer one, order reversed
            other = lf.collect(model, tok, [SOURCE[0] * 2] + texts[::-1], sites="norms", pooling=p, batch_size=3)
            for s in batched:
                ref = torch.cat([a[s] for a in alone[p]])
                err = (batched[s] - ref).abs().max()
                assert err <= 1e-5, f"{arch} {tok.padding_side}-padding {p} at {s}: {err}"
                err2 = (other[s][1:].flip(0) - ref).abs().max()
                assert err2 <= 1e-5, f"{arch} batch composition {p} at {s}: {err2}"


@pytest.mark.parametrize("arch", ["gpt2", "llama", "gemma2"])
def test_tokens_pooling_padding_independent(arch):
    model = make_model(arch)
    a = lf.collect(model, make_tokenizer("left"), TEXTS, sites="mlp_out", pooling="tokens")
    b = lf.collect(model, make_tokenizer("right"), TEXTS, sites="mlp_out", pooling="tokens", batch_size=1)
    for s in a:
        assert a[s].shape == b[s].shape
        assert (a[s] - b[s]).abs().max() <= 1e-5


def test_input_and_tuple_sites(llama, tok):
    out = lf.collect(llama, tok, TEXTS, sites=["model.layers.0.mlp.down_proj:in", "model.layers.0.self_attn:0"])
    assert out["model.layers.0.mlp.down_proj:in"].shape == (4, 48)
    assert out["model.layers.0.self_attn:0"].shape == (4, 32)


def test_forward_stops_after_last_site(llama, tok):
    calls = []
    hs = [llama.lm_head.register_forward_hook(lambda *a: calls.append("head")),
          llama.model.layers[1].register_forward_hook(lambda *a: calls.append("block1"))]
    try:
        lf.collect(llama, tok, TEXTS, sites=["model.layers.0.post_attention_layernorm"])
    finally:
        for h in hs:
            h.remove()
    assert calls == []
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in llama.modules())


def test_batch_size_does_not_matter(llama, tok):
    a = lf.collect(llama, tok, TEXTS * 2, sites="norms", batch_size=16)
    b = lf.collect(llama, tok, TEXTS * 2, sites="norms", batch_size=3)
    for s in a:
        assert (a[s] - b[s]).abs().max() <= 1e-5


def test_max_length_truncates(llama, tok):
    out = lf.collect(llama, tok, TEXTS, sites=["model.layers.0.input_layernorm"], pooling="tokens", max_length=4)
    assert out["model.layers.0.input_layernorm"].shape[0] == sum(min(n, 4) for n in lengths(tok, TEXTS))


@pytest.mark.parametrize("texts", [[], "just a string", ["ok", ""], ["ok", 3], ["ok", None]])
def test_bad_texts(llama, tok, texts):
    with pytest.raises(lf.SteeringError):
        lf.collect(llama, tok, texts, sites="norms")


def test_bad_pooling_names_it(llama, tok):
    with pytest.raises(lf.SteeringError, match="median"):
        lf.collect(llama, tok, TEXTS, sites="norms", pooling="median")


def test_nan_activations_raise(tok):
    model = make_model("llama")
    with torch.no_grad():
        model.model.layers[0].post_attention_layernorm.weight[3] = float("nan")
    with pytest.raises(lf.SteeringError, match="post_attention_layernorm"):
        lf.collect(model, tok, TEXTS, sites="norms")
