"""Serving in vLLM (lineas_fast.vllm, ``lineas-fast serve``) against the library's own reference.

One ``lineas-fast serve`` process (vLLM's OpenAI server, default compiled mode, prefix caching on, float32)
with two steerings preloaded is shared by the module. The reference is the library's Hugging Face
``generate`` in hooks mode: greedy tokens must be equal token for token, first-token logprobs within 1e-4.
The baked checkpoints run on stock vLLM (every plugin disabled).

Needs the project's ``.venv-vllm`` (``make vllm-venv``; ``make test`` builds it). Without it the module is
skipped, except under ``CI=true`` where a missing venv fails.
"""

from __future__ import annotations

import asyncio
import copy
import json
import os
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
VLLM_PY = ROOT / ".venv-vllm" / "bin" / "python"
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")

if not VLLM_PY.is_file() and IN_CI:
    raise RuntimeError("CI must build .venv-vllm (make vllm-venv) before the serving tests")
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not VLLM_PY.is_file(), reason="no .venv-vllm: run make vllm-venv")]

MODEL = "smollm2-135m"
NEW = 32
PROMPTS = ["The weather today is", "I think that you are", "Once upon a time", "My favourite food is",
           "You are such a", "The best way to learn is", "Yesterday the city council", "He looked at me and said"]
CONFIGS = [(None, 1.0), ("a", 0.5), ("a", 1.0), ("b", 0.5), ("b", 1.0)]
PREFIX = ("In the small town where I grew up, every summer the whole street gathered for a long dinner under "
          "the trees, and the conversation always turned to the same old stories about")
SERVER_ARGS = ["--dtype", "float32", "--gpu-memory-utilization", "0.2", "--max-model-len", "512", "--seed", "0",
               "--enable-prefix-caching"]


# ---------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def hf():
    import lineas_fast as lf

    torch.manual_seed(0)
    return lf.load_model(MODEL)


def _random_steering(model, preset: str, scale: float, seed: int):
    import lineas_fast as lf

    g = torch.Generator().manual_seed(seed)
    sites = lf.resolve_sites(model, preset)
    widths = {s: (model.get_submodule(s.split(":")[0]).in_features if s.endswith(":in")
                  else model.config.hidden_size) for s in sites}
    meta = {"method": "test", "model_type": model.config.model_type, "model_class": type(model).__name__,
            "name_or_path": MODEL}
    return lf.Steering({s: 1 + scale * torch.randn(d, generator=g) for s, d in widths.items()},
                       {s: scale * torch.randn(d, generator=g) for s, d in widths.items()}, meta)


@pytest.fixture(scope="module")
def files(hf, tmp_path_factory):
    """Two steerings (LinEAS's default sites, and the norms), a foreign-model one and a garbled file."""
    model, _ = hf
    d = tmp_path_factory.mktemp("steerings")
    out = {"a": d / "a.safetensors", "b": d / "b.safetensors"}
    steerings = {"a": _random_steering(model, "mlp_hidden", 0.08, 1), "b": _random_steering(model, "norms", 0.05, 2)}
    for name, st in steerings.items():
        st.save(out[name])
    foreign = copy.deepcopy(steerings["b"])
    foreign.meta["model_type"] = "gpt2"
    foreign.save(d / "foreign.safetensors")
    narrow = _random_steering(model, "norms", 0.05, 3)
    narrow = type(narrow)({s: w[:100] for s, w in narrow.scale.items()}, {s: b[:100] for s, b in narrow.shift.items()},
                          narrow.meta)
    narrow.save(d / "narrow.safetensors")
    (d / "garbled.safetensors").write_bytes(out["a"].read_bytes()[:5000])
    out.update(foreign=d / "foreign.safetensors", narrow=d / "narrow.safetensors", garbled=d / "garbled.safetensors")
    return out, steerings


def _greedy(model, tok, prompt: str) -> tuple[list[int], float]:
    """HF greedy tokens (no EOS stop, like ignore_eos) and the first token's logprob."""
    ids = tok(prompt, return_tensors="pt").input_ids
    config = copy.deepcopy(model.generation_config)
    config.eos_token_id = None
    with torch.no_grad():
        out = model.generate(ids, generation_config=config, max_new_tokens=NEW, min_new_tokens=NEW,
                             do_sample=False, pad_token_id=tok.pad_token_id)
        first = torch.log_softmax(model(ids).logits[0, -1].double(), -1)
    new = out[0, ids.shape[1]:].tolist()
    return new, float(first[new[0]])


@pytest.fixture(scope="module")
def reference(hf, files):
    """{(prompt, steering, strength): (tokens, first logprob)} from the library's hooks mode."""
    import lineas_fast as lf

    model, tok = hf
    _, steerings = files
    prompts = PROMPTS + [PREFIX + " the river", PREFIX + " my grandfather"]
    ref = {}
    for name, strength in CONFIGS:
        for p in prompts:
            if name is None:
                ref[(p, None, strength)] = _greedy(model, tok, p)
            else:
                with lf.steered(model, steerings[name], strength=strength, mode="hooks"):
                    ref[(p, name, strength)] = _greedy(model, tok, p)
    return ref


@pytest.fixture(scope="module")
def server(files, tmp_path_factory):
    from lineas_fast.vllm.launch import start

    paths, _ = files
    log = tmp_path_factory.mktemp("server") / "server.log"
    with start(MODEL, {"a": paths["a"], "b": paths["b"]}, vllm_args=SERVER_ARGS, log=log) as s:
        yield s


# ---------------------------------------------------------------------------------------------- helpers
def _body(prompt, name, strength, **extra):
    body = {"model": MODEL, "prompt": prompt, "max_tokens": NEW, "temperature": 0, "logprobs": 1,
            "ignore_eos": True, "return_tokens_as_token_ids": True, **extra}
    if name is not None:
        body["vllm_xargs"] = {"steering": name, "strength": strength}
    return body


def _tokens(choice) -> tuple[list[int], float]:
    lp = choice["logprobs"]
    return [int(t.split(":", 1)[1]) for t in lp["tokens"]], lp["token_logprobs"][0]


def _http(server, method, path, body=None, raw: bytes | None = None):
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    req = urllib.request.Request(server.url + path, data=data, method=method,
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=300) as r:
            return r.status, json.loads(r.read() or b"null")
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"null")


def _post_many(server, bodies: list, workers: int = 64) -> list:
    """POST every body (a dict, or raw bytes) to /v1/completions concurrently; ``[(status, json)]`` in order."""
    from concurrent.futures import ThreadPoolExecutor

    def one(b):
        return _http(server, "POST", "/v1/completions", raw=b if isinstance(b, bytes) else json.dumps(b).encode())
    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(one, bodies))


# ---------------------------------------------------------------------------------------------- tests
def test_greedy_tokens_equal_the_hooks_reference(server, reference):
    """8 prompts × {unsteered, a, b} × strengths {0.5, 1}: 32 greedy tokens equal, first logprob ±1e-4."""
    for prompt in PROMPTS:
        for name, strength in CONFIGS:
            status, out = _http(server, "POST", "/v1/completions", _body(prompt, name, strength))
            assert status == 200, out
            tokens, first = _tokens(out["choices"][0])
            want, want_first = reference[(prompt, name, strength)]
            assert tokens == want, (prompt, name, strength)
            assert abs(first - want_first) <= 1e-4, (prompt, name, strength, first, want_first)
    # steering visibly changes the continuations
    assert reference[(PROMPTS[0], "a", 1.0)][0] != reference[(PROMPTS[0], None, 1.0)][0]


def test_concurrent_mixed_requests_are_isolated(server, reference):
    """32 concurrent requests with mixed steerings/strengths each return what they return alone."""
    from openai import AsyncOpenAI

    combos = [(p, c) for p in PROMPTS for c in CONFIGS][:32]

    async def run():
        client = AsyncOpenAI(base_url=server.url + "/v1", api_key="none", timeout=600)
        async def one(prompt, name, strength):
            extra = {"ignore_eos": True, "return_tokens_as_token_ids": True}
            if name is not None:
                extra["vllm_xargs"] = {"steering": name, "strength": strength}
            r = await client.completions.create(model=MODEL, prompt=prompt, max_tokens=NEW, temperature=0,
                                                logprobs=1, extra_body=extra)
            return [int(t.split(":", 1)[1]) for t in r.choices[0].logprobs.tokens]
        try:
            return await asyncio.gather(*(one(p, *c) for p, c in combos))
        finally:
            await client.close()

    got = asyncio.run(run())
    for (prompt, (name, strength)), tokens in zip(combos, got):
        assert tokens == reference[(prompt, name, strength)][0], (prompt, name, strength)


def test_prefix_cache_is_never_shared_across_steerings(server, reference):
    """Requests sharing a long prefix but differing in steering: the cache salt keeps them apart."""
    p1, p2 = PREFIX + " the river", PREFIX + " my grandfather"
    for prompt, name, strength in [(p1, None, 1.0), (p2, "a", 1.0), (p1, "b", 0.5), (p2, None, 1.0), (p2, "a", 0.5)]:
        status, out = _http(server, "POST", "/v1/completions", _body(prompt, name, strength))
        assert status == 200, out
        assert _tokens(out["choices"][0])[0] == reference[(prompt, name, strength)][0], (prompt, name, strength)
    bodies = [_body(p, *c) for p in (p1, p2) for c in CONFIGS]
    for (status, out), body in zip(_post_many(server, bodies), bodies):
        name = body.get("vllm_xargs", {}).get("steering")
        strength = body.get("vllm_xargs", {}).get("strength", 1.0)
        assert status == 200 and _tokens(out["choices"][0])[0] == reference[(body["prompt"], name, strength)][0]


BAD_XARGS = [
    ({"steering": "nope"}, "unknown steering 'nope'"),
    ({"steering": "a", "strength": "0.5"}, "finite number"),
    ({"steering": "a", "strength": True}, "finite number"),
    ({"steering": "a", "strength": [1]}, "finite number"),
    ({"strength": 1.0}, "without 'steering'"),
    ({"steering": 3}, "unknown steering"),
]
BAD_RAW = [
    (b'{"model": "%s", "prompt": "hi", "max_tokens": 2, "vllm_xargs": {"steering": "a", "strength": NaN}}', "nan"),
    (b'{"model": "%s", "prompt": "hi", "max_tokens": 2, "vllm_xargs": {"steering": "a", "strength": Infinity}}', "inf"),
    (b'{"model": "%s", "prompt": "hi", "max_tokens": 2, "vllm_xargs": "a"}', "must be an object"),
]


def test_bad_requests_get_400_naming_the_loaded_steerings(server):
    for xargs, words in BAD_XARGS:
        status, out = _http(server, "POST", "/v1/completions",
                            {"model": MODEL, "prompt": "hi", "max_tokens": 2, "vllm_xargs": xargs})
        assert status == 400 and words in out["error"]["message"], (xargs, out)
        assert "'a', 'b'" in out["error"]["message"] or "finite" in words or "object" in words
    for raw, words in BAD_RAW:
        status, out = _http(server, "POST", "/v1/completions", raw=raw.replace(b"%s", MODEL.encode()))
        assert status == 400 and words in out["error"]["message"], (raw, out)
    status, out = _http(server, "POST", "/v1/chat/completions",
                        {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2,
                         "vllm_xargs": {"steering": "nope"}})
    assert status == 400 and "unknown steering" in out["error"]["message"]


def test_steering_endpoints_validate_what_they_load(server, files):
    paths, _ = files
    status, listing = _http(server, "GET", "/v1/steerings")
    assert status == 200 and listing["model"] == MODEL
    assert {e["name"] for e in listing["data"]} == {"a", "b"}
    entry = next(e for e in listing["data"] if e["name"] == "a")
    assert entry["nnz"] > 0 and entry["sites"][0].endswith("mlp.down_proj:in") and entry["model_type"] == "llama"
    cases = [({"name": "x", "path": str(paths["garbled"])}, 400, "garbled.safetensors"),
             ({"name": "x", "path": str(paths["foreign"])}, 400, "gpt2"),
             ({"name": "x", "path": str(paths["narrow"])}, 400, "width mismatch"),
             ({"name": "x", "path": "/nonexistent/file.safetensors"}, 400, "nonexistent"),
             ({"name": "x"}, 400, "exactly"),
             ({"name": "a", "path": str(paths["a"])}, 409, "already loaded")]
    for body, code, words in cases:
        status, out = _http(server, "POST", "/v1/steerings", body)
        assert status == code and words in out["error"]["message"], (body, out)
    status, out = _http(server, "POST", "/v1/steerings", raw=b"\xff\xfe not json")
    assert status == 400
    assert _http(server, "DELETE", "/v1/steerings/nope")[0] == 404
    status, listing = _http(server, "GET", "/v1/steerings")
    assert {e["name"] for e in listing["data"]} == {"a", "b"}  # nothing half-loaded


def test_hot_load_and_unload_during_traffic(server, files, reference):
    """Requests in flight finish with the steering they started with; unloading a used one is refused."""
    import time
    from concurrent.futures import ThreadPoolExecutor

    paths, _ = files
    assert _http(server, "POST", "/v1/steerings", {"name": "c", "path": str(paths["a"])})[0] == 200
    bodies = [_body(p, "c", 1.0) for p in PROMPTS[:6]]
    with ThreadPoolExecutor(6) as pool:
        futures = [pool.submit(_http, server, "POST", "/v1/completions", b) for b in bodies]
        time.sleep(0.5)
        refused = _http(server, "DELETE", "/v1/steerings/c")
        in_flight = [e["in_flight"] for e in _http(server, "GET", "/v1/steerings")[1]["data"] if e["name"] == "c"]
        loaded = _http(server, "POST", "/v1/steerings", {"name": "d", "path": str(paths["b"])})
        done_early = sum(f.done() for f in futures)
        results = [f.result() for f in futures]
    assert done_early < 6, "the requests finished before the hot load/unload: the test saw no traffic"
    assert refused[0] == 409 and "in flight" in refused[1]["error"]["message"], refused
    assert in_flight and in_flight[0] > 0
    assert loaded[0] == 200, loaded
    for prompt, (status, out) in zip(PROMPTS[:6], results):
        assert status == 200, out
        assert _tokens(out["choices"][0])[0] == reference[(prompt, "a", 1.0)][0]
    assert _http(server, "DELETE", "/v1/steerings/c")[0] == 200
    assert _http(server, "DELETE", "/v1/steerings/d")[0] == 200
    status, out = _http(server, "POST", "/v1/completions", _body(PROMPTS[0], "c", 1.0))
    assert status == 400 and "'a', 'b'" in out["error"]["message"]


def test_bad_request_storm_leaves_the_server_correct_and_bounded(server, reference):
    """200 bad requests interleaved with good ones, twice: good ones exact, server alive, RSS stable."""
    bad = [json.dumps({"model": MODEL, "prompt": "hi", "max_tokens": 2, "vllm_xargs": x}).encode()
           for x, _ in BAD_XARGS] + [r.replace(b"%s", MODEL.encode()) for r, _ in BAD_RAW]
    good = [(p, c) for p in PROMPTS[:4] for c in CONFIGS]

    def storm():
        bodies, kinds = [], []
        for i in range(200):
            bodies.append(bad[i % len(bad)])
            kinds.append(None)
            if i % 10 == 0:
                p, (name, strength) = good[(i // 10) % len(good)]
                bodies.append(json.dumps(_body(p, name, strength)).encode())
                kinds.append((p, name, strength))
        for (status, out), kind in zip(_post_many(server, bodies), kinds):
            if kind is None:
                assert status == 400, out
            else:
                assert status == 200 and _tokens(out["choices"][0])[0] == reference[kind][0], kind

    storm()
    before = server.rss_bytes()
    storm()
    after = server.rss_bytes()
    assert server.alive()
    assert after - before < 64 * 2**20, (before, after)


@pytest.mark.parametrize("name", ["a", "b"])
def test_baked_checkpoint_on_stock_vllm(name, hf, files, reference, tmp_path):
    """lf.bake + save_pretrained, served by vLLM with every plugin disabled == the steered reference."""
    import lineas_fast as lf
    from lineas_fast.vllm.launch import start

    model, tok = hf
    _, steerings = files
    baked = copy.deepcopy(model)
    lf.bake(baked, steerings[name], strength=1.0)
    baked.save_pretrained(tmp_path / "ckpt")
    tok.save_pretrained(tmp_path / "ckpt")
    del baked
    with start(tmp_path / "ckpt", vllm_args=SERVER_ARGS + ["--enforce-eager"], log=tmp_path / "stock.log",
               stock=True) as s:
        for prompt in PROMPTS:
            status, out = _http(s, "POST", "/v1/completions", _body(prompt, None, 1.0, model=str(tmp_path / "ckpt")))
            assert status == 200, out
            assert _tokens(out["choices"][0])[0] == reference[(prompt, name, 1.0)][0], prompt
