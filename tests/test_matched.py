"""Side by side at matched utility (evaluate/matched.py): the strength search and the shared measurements."""

import math

import pytest

import lineas_fast as lf
from conftest import make_model, random_steering
from tiny_models import ARCHS, UNLISTED_ARCHS
from lineas_fast.evaluate import matched
from lineas_fast.evaluate.matched import matched_strength, side_by_side

pytestmark = pytest.mark.usefixtures("one_thread")


def test_matched_strength_brackets_and_never_exceeds_the_target():
    calls = []

    def ppl_at(lam):  # a convex, increasing PPL curve
        calls.append(lam)
        return 70 * math.exp(3 * lam * lam)

    known = [(0.0, 70.0), (0.25, ppl_at(0.25)), (0.5, ppl_at(0.5)), (1.0, ppl_at(1.0))]
    calls.clear()
    target = 77.0
    lam, ppl, tried = matched_strength(ppl_at, target, known, iters=4)
    assert ppl <= target and ppl == pytest.approx(70 * math.exp(3 * lam * lam))
    assert 0 < lam < 0.25 and ppl > 0.97 * target  # secant steps on log-PPL land close
    assert len(calls) == len(tried) <= 4
    exact = math.sqrt(math.log(target / 70) / 3)
    assert lam <= exact


def test_matched_strength_lands_in_one_measurement_when_log_ppl_is_quadratic():
    # the parabola through the bracket and its neighbour is exact here; a straight line (the secant) would
    # guess too low and need a second measurement
    def ppl_at(lam):
        return 70 * math.exp(0.2 * lam + 2 * lam * lam)

    known = [(lam, ppl_at(lam)) for lam in (0.0, 0.25, 0.5, 0.75, 1.0)]
    target = 70 * 1.096
    lam, ppl, tried = matched_strength(ppl_at, target, known)
    assert len(tried) == 1
    assert 0.99 * target <= ppl <= target
    assert matched._secant(known[0], known[1], target) < lam  # the linear guess is lower


def test_matched_strength_falls_back_to_the_secant_without_a_third_point():
    calls = []

    def ppl_at(lam):
        calls.append(lam)
        return 70 * math.exp(lam)

    lam, ppl, tried = matched_strength(ppl_at, 70 * math.exp(0.5), [(0.0, 70.0), (1.0, 70 * math.e)])
    assert calls[0] == pytest.approx(0.5 - 0.0025, abs=1e-3)  # linear in log-PPL: exact, a quarter-band low
    assert len(tried) == 1 and ppl <= 70 * math.exp(0.5)


def test_matched_strength_without_a_bracket_takes_the_largest_known_strength():
    lam, ppl, tried = matched_strength(lambda x: 1 / 0, 100.0, [(0.0, 70.0), (0.5, 80.0), (1.0, 90.0)])
    assert (lam, ppl, tried) == (1.0, 90.0, [])
    lam, ppl, tried = matched_strength(lambda x: 1 / 0, 60.0, [(0.0, 70.0), (1.0, 90.0)], iters=0)
    assert lam == 0.0 and tried == []


def test_side_by_side_on_a_tiny_model(tok, monkeypatch):
    model = make_model("llama")
    sites = lf.resolve_sites(model, "norms")
    steerings = {"lead": random_steering(model, sites, seed=1, spread=0.5),
                 "base": random_steering(model, sites, seed=2, spread=0.5)}
    counts = {"ppl": 0, "gen": 0, "fluency": 0}
    real, real_gen, real_flu = matched.perplexity, matched.continuations, matched.fluencies

    def counted(*a, **k):
        counts["ppl"] += 1
        return real(*a, **k)

    def counted_gen(*a, **k):
        counts["gen"] += 1
        return real_gen(*a, **k)

    def counted_flu(*a, **k):
        counts["fluency"] += 1
        return real_flu(*a, **k)

    monkeypatch.setattr(matched, "perplexity", counted)
    monkeypatch.setattr(matched, "continuations", counted_gen)
    monkeypatch.setattr(matched, "fluencies", counted_flu)
    prompts = ["you are a bad", "i hate this", "what a stupid", "go away now"]
    passages = ["the river flows to the sea and the city grew around it", "a history of the city"]
    res = side_by_side(model, tok, steerings, lead="lead", strengths=(0.5, 1.0), prompts=prompts,
                       passages=passages, steer=lambda m, s, lam: lf.steered(m, s, strength=lam, mode="hooks"),
                       curve_prompts=2, max_new_tokens=4, search_iters=2)
    assert [p["strength"] for p in res["curves"]["lead"]] == [0.5, 1.0]
    assert all(p["prompts"] == 2 for c in res["curves"].values() for p in c)
    assert res["lead"]["prompts"] == 4 and res["matched"]["base"]["prompts"] == 4
    assert res["matched"]["base"]["ppl"] <= res["lead"]["ppl"]
    # PPL once per (steering, λ): unsteered, 2 curve points each, the search's points
    assert counts["ppl"] == 1 + 4 + len(res["searches"]["base"])
    assert res["lead"]["ppl"] == next(p["ppl"] for p in res["curves"]["lead"] if p["strength"] == 1.0)
    for row in [res["lead"], res["matched"]["base"], *res["curves"]["base"]]:
        lo, hi = row["toxic_diff_ci"][1:]
        assert lo <= hi and len(row["toxic"]) == row["prompts"]
    assert len(res["matched"]["base"]["vs_lead_ci"]) == 3
    # generations: unsteered and lead λ=1 on all prompts (their curve points reuse the first 2), the other
    # 3 curve points, the matched point; one fluency pass, for the 2 steered table rows together (the
    # unsteered row's comes from its own greedy logits)
    assert counts["gen"] == 2 + 3 + 1 and counts["fluency"] == 1
    # the time split counts the same work: PPL passes, prompts generated, continuation sets scored
    phases = res["phases"]
    assert phases["perplexity"]["count"] == counts["ppl"]
    assert phases["generate"]["count"] == 4 + 4 + 3 * 2 + 4 and phases["fluency"]["count"] == 2
    assert all(v["seconds"] > 0 for v in phases.values())
    assert sum(v["seconds"] for v in phases.values()) <= res["seconds"]
    assert res["unsteered"]["fluency"] == pytest.approx(
        lf.evaluate.fluency(model, tok, prompts, [list(map(int, t)) for t in _ids(model, tok, prompts)]), rel=1e-4)
    for row in (res["lead"], res["matched"]["base"]):  # what a pass of their own would measure
        assert row["fluency"] == pytest.approx(lf.evaluate.fluency(model, tok, prompts, _ids_steered(
            model, tok, prompts, steerings[row["label"]], row["strength"])), rel=1e-5)
    assert res["curves"]["lead"][-1]["texts"] == res["lead"]["texts"][:2]
    assert res["curve_unsteered"]["texts"] == res["unsteered"]["texts"][:2]
    assert all(p["fluency"] is None for c in res["curves"].values() for p in c)
    assert all(r["fluency_prompts"] == 4 for r in (res["unsteered"], res["lead"], res["matched"]["base"]))


def test_the_table_fluency_on_the_first_prompts(tok, monkeypatch):
    """``fluency_prompts=2``: every table row's fluency (the unsteered one too) is that of its first 2
    continuations, what a pass of their own measures; nothing is generated again and the other columns keep
    all 4 prompts."""
    model = make_model("llama")
    sites = lf.resolve_sites(model, "norms")
    steerings = {"lead": random_steering(model, sites, seed=1, spread=0.5),
                 "base": random_steering(model, sites, seed=2, spread=0.5)}
    calls = {"gen": 0}
    real_gen = matched.continuations

    def gen(*a, **k):
        calls["gen"] += 1
        return real_gen(*a, **k)

    monkeypatch.setattr(matched, "continuations", gen)
    prompts = ["you are a bad", "i hate this", "what a stupid", "go away now"]
    kw = dict(lead="lead", strengths=(0.5, 1.0), prompts=prompts, passages=["a history of the city"],
              steer=lambda m, s, lam: lf.steered(m, s, strength=lam, mode="hooks"), curve_prompts=2,
              max_new_tokens=4, search_iters=1)
    res = side_by_side(model, tok, steerings, fluency_prompts=2, **kw)
    assert calls["gen"] == 2 + 3 + 1  # as without fluency_prompts: the first 2 come from the runs on all 4
    base_ids = [list(map(int, t)) for t in _ids(model, tok, prompts[:2])]
    assert res["unsteered"]["fluency"] == pytest.approx(lf.evaluate.fluency(model, tok, prompts[:2], base_ids),
                                                        rel=1e-4)
    for row in (res["lead"], res["matched"]["base"]):
        ids = _ids_steered(model, tok, prompts, steerings[row["label"]], row["strength"])[:2]
        assert row["fluency"] == pytest.approx(lf.evaluate.fluency(model, tok, prompts[:2], ids), rel=1e-5)
    for row in (res["unsteered"], res["lead"], res["matched"]["base"]):
        assert row["fluency_prompts"] == 2 and row["prompts"] == 4 and len(row["toxic"]) == 4
    assert res["phases"]["fluency"]["count"] == 2
    with pytest.raises(ValueError, match="at least 1"):
        side_by_side(model, tok, steerings, fluency_prompts=0, **kw)


def test_a_baseline_curve_gets_its_matched_strength_as_a_free_point(tok, monkeypatch):
    """The matched strength (between grid points) joins the baseline's curve, from the matched run's first
    prompts and its PPL: no generation or PPL pass of its own."""
    from contextlib import contextmanager

    model = make_model("llama")
    sites = lf.resolve_sites(model, "norms")
    steerings = {"lead": random_steering(model, sites, seed=1, spread=0.5),
                 "base": random_steering(model, sites, seed=2, spread=0.5)}
    now = {"label": None, "lam": 0.0}

    @contextmanager
    def steer(m, st, lam):
        now.update(label=next(k for k, v in steerings.items() if v is st), lam=lam)
        with lf.steered(m, st, strength=lam, mode="hooks"):
            yield
        now.update(label=None, lam=0.0)

    calls = {"ppl": 0, "gen": 0}
    real_gen = matched.continuations

    def ppl(*a, **k):  # the lead costs +10 % at λ = 1; the baseline +100 % per unit of λ
        calls["ppl"] += 1
        return 70.0 * (1 + (0.1 if now["label"] == "lead" else 1.0) * now["lam"])

    def gen(*a, **k):
        calls["gen"] += 1
        return real_gen(*a, **k)

    monkeypatch.setattr(matched, "perplexity", ppl)
    monkeypatch.setattr(matched, "continuations", gen)
    res = side_by_side(model, tok, steerings, lead="lead", strengths=(0.5, 1.0),
                       prompts=["you are a bad", "i hate this", "what a stupid", "go away now"],
                       passages=["a history of the city"], steer=steer, curve_prompts=2, max_new_tokens=3,
                       search_iters=3)
    lam = res["matched"]["base"]["strength"]
    assert 0 < lam < 0.5 and res["matched"]["base"]["ppl"] <= 77.0
    curve = res["curves"]["base"]
    assert [p["strength"] for p in curve] == [lam, 0.5, 1.0] and len(res["curves"]["lead"]) == 2
    extra = curve[0]
    assert extra["texts"] == res["matched"]["base"]["texts"][:2] and extra["ppl"] == res["matched"]["base"]["ppl"]
    assert extra["prompts"] == 2 and extra["toxic_diff_ci"] is not None
    # generations: unsteered + lead (all prompts), 3 curve points, the matched run; PPL: unsteered, 4 grid
    # points, the search's points — nothing for the extra curve point
    assert calls["gen"] == 2 + 3 + 1 and calls["ppl"] == 1 + 4 + len(res["searches"]["base"])


def _ids(model, tok, prompts):
    return lf.evaluate.continuations(model, tok, prompts, max_new_tokens=4)[1]


def _ids_steered(model, tok, prompts, st, lam):
    with lf.steered(model, st, strength=lam, mode="hooks"):
        return _ids(model, tok, prompts)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_fluencies_of_several_sets_equal_one_pass_each(tok, kind):
    """:func:`fluencies` runs the prompts once for several continuation sets: each set's value is what
    :func:`fluency` gives it alone — with one-token prompts (no cache), empty continuations and prompts of
    different lengths in one batch — and sets of the wrong length are refused."""
    model = make_model(kind)
    prompts = ["the river flows to the sea and on", "a", "the album was released in may", "nobody", "b"]
    sets = [[[5, 6, 7], [8], [], [9, 10], [11, 12, 13, 14]],
            [[], [3, 4], [5], [6, 7, 8], [9]],
            [[20, 21], [22], [23, 24, 25], [], [26]]]
    both = lf.evaluate.fluencies(model, tok, prompts, sets, batch_size=3)
    alone = [lf.evaluate.metrics.fluency(model, tok, prompts, c, batch_size=3) for c in sets]
    assert both == pytest.approx(alone, rel=1e-5) and len(set(both)) == 3
    ones = lf.evaluate.fluencies(model, tok, ["a", "b"], [[[5, 6], [7]]])  # one-token prompts: no cache
    assert ones[0] == pytest.approx(lf.evaluate.fluency(model, tok, ["a", "b"], [[5, 6], [7]]), rel=1e-5)
    with pytest.raises(ValueError, match="one row per prompt"):
        lf.evaluate.fluencies(model, tok, prompts, [sets[0][:2]])


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_fluency_from_the_greedy_logits_equals_a_separate_pass(tok, kind):
    """``continuations(with_nll=True)`` + ``fluency_of`` is the unsteered fluency without a second forward:
    the same tokens, and the same perplexity as :func:`fluency` measures (up to float summation order)."""
    model = make_model(kind)
    prompts = ["you are a bad", "i hate this and", "what", "go away now, you"]
    texts, ids = lf.evaluate.continuations(model, tok, prompts, max_new_tokens=6)
    texts2, ids2, nll = lf.evaluate.continuations(model, tok, prompts, max_new_tokens=6, with_nll=True)
    assert (texts2, ids2) == (texts, ids)
    assert [len(r) for r in nll] == [len(r) for r in ids]
    assert lf.evaluate.fluency_of(nll) == pytest.approx(lf.evaluate.fluency(model, tok, prompts, ids), rel=1e-4)


@pytest.mark.parametrize("mode", ["hooks", "fused"])
def test_two_generation_streams_give_each_row_the_tokens_of_one_stream(tok, mode):
    """``continuations(streams=2)`` runs two batches at once on one (steered) model: every row's tokens and
    NLLs are those of the one-stream run, in the input order, and the caller's thread count is unchanged."""
    import torch

    model = make_model("llama")
    prompts = ["you are a bad", "i hate this and", "what", "go away now, you", "a history of the", "nobody",
               "the river flows"]
    st = random_steering(model, "mlp_hidden", seed=3, spread=0.5)
    threads = torch.get_num_threads()
    with lf.steered(model, st, mode=mode):
        one = lf.evaluate.continuations(model, tok, prompts, max_new_tokens=5, batch_size=2, with_nll=True, streams=1)
        two = lf.evaluate.continuations(model, tok, prompts, max_new_tokens=5, batch_size=2, with_nll=True, streams=2)
    unsteered = lf.evaluate.continuations(model, tok, prompts, max_new_tokens=5, batch_size=2, streams=2)
    assert two[:2] == one[:2] and unsteered[1] != one[1]
    assert two[2] == one[2]
    assert torch.get_num_threads() == threads and tok.padding_side == "right"


def _nll64(model, ids: list[int], first_scored: int) -> tuple[float, int]:
    """Summed next-token NLL of one unpadded sequence in float64, tokens from ``first_scored`` on."""
    import torch

    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0].double()
    nll = torch.logsumexp(logits[:-1], -1) - logits[:-1].gather(1, torch.tensor(ids[1:])[:, None])[:, 0]
    return float(nll[first_scored - 1:].sum()), len(ids) - first_scored


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_perplexity_and_fluency_equal_an_unbatched_float64_reference(tok, kind):
    """Batched, padded scoring (rows of different lengths in one batch) gives what scoring each text alone
    in float64 gives: padding and the last position are never scored, every other token is."""
    model = make_model(kind)
    texts = ["the river flows to the sea and on", "a history", "the album was released in may of that year",
             "nobody"]
    bos = [tok.bos_token_id] if tok.bos_token_id is not None else []
    total, count, each = 0.0, 0, []
    for t in texts:
        s, n = _nll64(model, bos + tok(t, add_special_tokens=False)["input_ids"], 1)
        total, count = total + s, count + n
        each.append((s, n))
    assert lf.evaluate.perplexity(model, tok, texts, batch_size=3) == pytest.approx(math.exp(total / count),
                                                                                  rel=1e-5)
    # per text (the rows of a batch sorted by length, returned in the given order)
    ppl, nll, n = lf.evaluate.perplexity(model, tok, texts, batch_size=3, per_text=True)
    assert ppl == pytest.approx(math.exp(total / count), rel=1e-5)
    assert list(n) == [c for _, c in each] and list(nll) == pytest.approx([s for s, _ in each], rel=1e-5)
    prompts, conts = texts[:3], [[5, 6, 7], [8], [9, 10]]
    total, count = 0.0, 0
    for p, c in zip(prompts, conts):
        pid = tok(p)["input_ids"]
        s, n = _nll64(model, pid + c, len(pid))
        total, count = total + s, count + n
    assert lf.evaluate.fluency(model, tok, prompts, conts, batch_size=2) == pytest.approx(
        math.exp(total / count), rel=1e-5)


@pytest.mark.parametrize("kind", ARCHS + UNLISTED_ARCHS)
def test_fluency_with_a_prompt_cache_equals_a_full_pass_on_every_architecture(tok, kind):
    """The cached scoring (prompt once, continuations on a copy of its cache; left-padded prompts) gives what
    one padded forward over prompt + continuation gives, on every tiny architecture (sliding-window and
    flattened-token ones included)."""
    from lineas_fast.evaluate.metrics import _nll, _pad

    model = make_model(kind)
    prompts = ["the river flows to the sea and on", "a", "the album was released in may", "nobody", "b c"]
    conts = [[5, 6, 7], [8], [], [9, 10], [11, 12, 13, 14]]
    rows, scored = [], []
    for p, c in zip(prompts, conts):
        pid = tok(p)["input_ids"]
        rows.append(pid + c)
        scored.append([False] * len(pid) + [True] * len(c))
    ids, mask = _pad(rows, 0, "cpu")
    sc, _ = _pad(scored, False, "cpu")
    total, count = _nll(model, ids, mask, sc.bool())
    assert lf.evaluate.fluencies(model, tok, prompts, [conts, conts], batch_size=3) == pytest.approx(
        [math.exp(total / count)] * 2, rel=1e-5)
