"""Shared test setup: Triton interpreter mode, tiny random models, an offline char tokenizer, helpers.

``TRITON_INTERPRET`` must be set before anything imports triton (SPEC §4), hence the very top.
Helpers that are plain functions (``random_steering``, ``logits``, ``snapshot``, ...) live here and are
imported by the test modules (``from conftest import ...``); tests/ is on ``sys.path``.

``LINEAS_FAST_REQUIRE_GPU=1`` (set by ``make gpu-check``) turns a ``gpu``-marked test skipped at setup (a
``skipif`` or a fixture saying the GPU, the CUDA extension or triton is missing) into a failure.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import contextlib  # noqa: E402
import copy  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

TESTS = Path(__file__).resolve().parent
if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))

import pytest  # noqa: E402
import torch  # noqa: E402

from tiny_models import ARCHS, tiny_batch, tiny_model  # noqa: E402,F401

FP32_TOL = 1e-5  # SPEC §6
REQUIRE_GPU = os.environ.get("LINEAS_FAST_REQUIRE_GPU", "0") not in ("", "0")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Under LINEAS_FAST_REQUIRE_GPU=1 a gpu test skipped for a missing prerequisite fails instead."""
    outcome = yield
    rep = outcome.get_result()
    if REQUIRE_GPU and rep.skipped and rep.when == "setup" and item.get_closest_marker("gpu") is not None:
        reason = rep.longrepr[2] if isinstance(rep.longrepr, tuple) else str(rep.longrepr)
        rep.outcome, rep.longrepr = "failed", f"LINEAS_FAST_REQUIRE_GPU=1 but this GPU test was skipped: {reason}"

# ------------------------------------------------------------------ threads
@pytest.fixture
def one_thread():
    """Tiny-model tests run single-threaded: on tiny tensors OpenMP threads only add overhead, and on a
    shared 2-core machine they spin against other processes (a 30x slowdown). Restored afterwards so
    kernel tests elsewhere keep their threading. Use with ``pytestmark = pytest.mark.usefixtures(...)``."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ------------------------------------------------------------------ models
_PRISTINE: dict = {}


def make_model(arch: str, seed: int = 0):
    """A fresh copy of the tiny ``arch`` model (built once per session, deep-copied per call)."""
    key = (arch, seed)
    if key not in _PRISTINE:
        _PRISTINE[key] = tiny_model(arch, seed=seed)
    return copy.deepcopy(_PRISTINE[key])


@pytest.fixture
def model_factory():
    return make_model


# ------------------------------------------------------------------ tokenizer (offline, char level)
_CHARS = [chr(c) for c in range(32, 127)]
VOCAB = {"<pad>": 0, "<s>": 1, "</s>": 2, **{c: i + 3 for i, c in enumerate(_CHARS)}}  # 98 ids < 128


def make_tokenizer(padding_side: str = "right"):
    """A real ``PreTrainedTokenizerFast``: one token per printable ASCII char, pad=0, bos=1, eos=2."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.WordLevel(VOCAB, unk_token="<pad>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", bos_token="<s>",
                                  eos_token="</s>", unk_token="<pad>")
    tok.padding_side = padding_side
    return tok


@pytest.fixture(scope="session")
def tok():
    return make_tokenizer("right")


@pytest.fixture(scope="session")
def tok_left():
    return make_tokenizer("left")


SOURCE = ["you are a bad person", "i hate this so much", "what a stupid idea", "go away now you fool",
          "this is awful and dumb", "nobody likes you here"]
TARGET = ["the river flows to the sea", "a history of the city", "the album was released in may",
          "he studied at the university", "the station opened in 1901", "it is a small village"]


# ------------------------------------------------------------------ helpers
def random_steering(model, sites, seed: int = 0, shift: bool = True, scale: bool = True, spread: float = 0.3,
                    method: str = "custom"):
    """A Steering with random (ω, b) on resolved ``sites`` (meta carries the model's identity)."""
    import lineas_fast as lf
    from lineas_fast.sites import site_widths

    sites = lf.resolve_sites(model, sites)
    widths = site_widths(model, sites)
    g = torch.Generator().manual_seed(seed)
    sc, sh = {}, {}
    for s in sites:
        d = widths[s]
        sc[s] = 1 + spread * torch.randn(d, generator=g) if scale else torch.ones(d)
        sh[s] = spread * torch.randn(d, generator=g) if shift else torch.zeros(d)
    meta = {"method": method, "model_type": model.config.model_type, "model_class": type(model).__name__}
    return lf.Steering(sc, sh, meta)


@torch.no_grad()
def logits(model, ids=None, mask=None):
    """Logits of ``model`` on ``tiny_batch()`` (or the given batch), fp32."""
    if ids is None:
        ids, mask = tiny_batch()
    return model(input_ids=ids, attention_mask=mask).logits.float()


def snapshot(model) -> dict:
    """A deep copy of the state_dict (keys and values)."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_state_equal(model, snap: dict) -> None:
    """Same keys and bit-equal tensors (``torch.equal``)."""
    now = model.state_dict()
    assert list(now) == list(snap), f"state_dict keys changed: {sorted(set(now) ^ set(snap))}"
    diff = [k for k in snap if not (now[k].dtype == snap[k].dtype and torch.equal(now[k], snap[k]))]
    assert not diff, f"state_dict values changed: {diff[:5]}"


def no_hooks_left(model) -> list[str]:
    """Names of modules that still carry forward (pre-)hooks."""
    return [n for n, m in model.named_modules() if m._forward_hooks or m._forward_pre_hooks]


@contextlib.contextmanager
def fit_leaves_llama_as_found(model):
    """Around fits of a tiny Llama: put it in training mode with a mix of ``requires_grad`` flags and a
    hook counting LM-head calls; afterwards assert what every fit must leave as it found — parameters,
    flags, mode, no hooks, no grads, no steering handle — and that the forward stopped before the head."""
    from lineas_fast.patching.handle import ATTR

    model.train()
    model.model.embed_tokens.weight.requires_grad_(False)  # a mix of flags must survive
    flags = [(n, p.requires_grad) for n, p in model.named_parameters()]
    snap = snapshot(model)
    head_calls = []
    h = model.lm_head.register_forward_hook(lambda *a: head_calls.append(1))
    try:
        yield
    finally:
        h.remove()
    assert head_calls == []  # the forward stops after the last site's block
    assert_state_equal(model, snap)
    assert [(n, p.requires_grad) for n, p in model.named_parameters()] == flags
    assert model.training
    assert no_hooks_left(model) == []
    assert all(p.grad is None for p in model.parameters())
    assert getattr(model, ATTR, None) is None


def assert_fp32_close(got: torch.Tensor, want: torch.Tensor, what: str = "") -> None:
    """SPEC §6 fp32 tolerance: 1e-5, relative where magnitudes are large."""
    want = want.float()
    atol = FP32_TOL * max(1.0, want.abs().max().item())
    torch.testing.assert_close(got, want, atol=atol, rtol=FP32_TOL, msg=lambda m: f"{what}: {m}")


def assert_low_precision(got: torch.Tensor, oracle: torch.Tensor, torch_low: torch.Tensor, what: str = "") -> None:
    """SPEC §6 bf16/fp16 budget: at most 2x the error of PyTorch's own low-precision result vs the
    fp32 (or fp64) oracle, plus a tiny floor so an exact PyTorch result does not make the budget 0."""
    err = (got.double() - oracle.double()).abs().max().item()
    err_torch = (torch_low.double() - oracle.double()).abs().max().item()
    assert err <= 2 * err_torch + 1e-6, f"{what}: err {err} vs torch's own {err_torch}"


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max())
