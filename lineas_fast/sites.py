"""Sites: which module outputs (or inputs) a steering transforms, and how presets resolve.

A *site* is a module name, optionally suffixed ``":k"`` or ``":in"`` (the address itself, and reading or
writing the tensor it names, is :mod:`lineas_fast.site_address`; widths are :func:`site_widths`).

Per-architecture knowledge is data (:data:`FAMILIES`), not code: which block children are norms,
which are Gemma-style post-norms, where the MLP / attention outputs and the MLP hidden neurons are,
which Linear layers consume each norm (needed to fold an RMSNorm shift into biases), and which config
flags give those Linear layers a bias in a stock checkpoint (needed by ``bake``). An architecture without
data still gets every preset but ``post_norms``, read off its first block's layers (the norms by class
name, the MLP's down projection and the attention's output projection by their widths).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
from torch import nn

from .errors import SiteError
from .forward import probe_shapes, site_widths
from .site_address import Site, channel_dim, get_module, missing_module, pick, replace, static_width
from .views import as_model, is_view

_LLAMA_CONSUMERS = {
    "input_layernorm": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "post_attention_layernorm": ("mlp.gate_proj", "mlp.up_proj"),
}
# config flag -> the Linear layers (relative to a block) that get a bias when the flag is set.
_ATTN_BIAS = {"attention_bias": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")}
_MLP_BIAS = {"mlp_bias": ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")}


@dataclass(frozen=True)
class Family:
    """What lineas_fast needs to know about one decoder-block architecture (names relative to a block)."""

    norms: tuple[str, ...]
    post_norms: tuple[str, ...] = ()
    mlp_out: str = "mlp"
    attn_out: str = "self_attn:0"
    mlp_hidden: str = "mlp.down_proj:in"
    # norm -> Linear layers reading its output (to fold an RMSNorm shift into their biases);
    # a norm absent here feeds the residual stream and cannot absorb a shift.
    consumers: dict = field(default_factory=dict)
    # sites that are module outputs produced by one Linear layer: site -> that Linear (for fold).
    linear_alias: dict = field(default_factory=dict)
    # config flags that give Linear layers a bias in a stock checkpoint (for bake).
    bias_flags: dict = field(default_factory=dict)
    # Gemma-style RMSNorm computes x_hat * (1 + weight).
    norm_offset: float = 0.0


_LLAMA = Family(
    norms=("input_layernorm", "post_attention_layernorm"),
    consumers=_LLAMA_CONSUMERS,
    linear_alias={"mlp": "mlp.down_proj", "self_attn:0": "self_attn.o_proj"},
    bias_flags={**_ATTN_BIAS, **_MLP_BIAS},
)
_GEMMA = Family(
    norms=("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm", "post_feedforward_layernorm"),
    post_norms=("post_attention_layernorm", "post_feedforward_layernorm"),
    consumers={"input_layernorm": _LLAMA_CONSUMERS["input_layernorm"],
               "pre_feedforward_layernorm": ("mlp.gate_proj", "mlp.up_proj")},
    linear_alias={"mlp": "mlp.down_proj", "self_attn:0": "self_attn.o_proj"},
    bias_flags=dict(_ATTN_BIAS),
    norm_offset=1.0,
)

FAMILIES: dict[str, Family] = {
    "gpt2": Family(
        norms=("ln_1", "ln_2"), attn_out="attn:0", mlp_hidden="mlp.c_proj:in",
        consumers={"ln_1": ("attn.c_attn",), "ln_2": ("mlp.c_fc",)},
        linear_alias={"mlp": "mlp.c_proj", "attn:0": "attn.c_proj"},
    ),
    "llama": _LLAMA,
    "mistral": Family(norms=_LLAMA.norms, consumers=_LLAMA_CONSUMERS, linear_alias=_LLAMA.linear_alias),
    "qwen2": Family(norms=_LLAMA.norms, consumers=_LLAMA_CONSUMERS, linear_alias=_LLAMA.linear_alias),
    "qwen3": Family(norms=_LLAMA.norms, consumers=_LLAMA_CONSUMERS, linear_alias=_LLAMA.linear_alias,
                    bias_flags=dict(_ATTN_BIAS)),
    "gemma2": _GEMMA,
    "gemma3": _GEMMA,
    "gemma3_text": _GEMMA,
    "phi3": Family(
        norms=_LLAMA.norms,
        consumers={"input_layernorm": ("self_attn.qkv_proj",), "post_attention_layernorm": ("mlp.gate_up_proj",)},
        linear_alias=_LLAMA.linear_alias,
    ),
}
PRESETS = ("norms", "post_norms", "mlp_out", "attn_out", "mlp_hidden")


def family(model: nn.Module) -> Family | None:
    """The :class:`Family` of a model, from ``config.model_type`` (None if unknown)."""
    return FAMILIES.get(getattr(getattr(model, "config", None), "model_type", None))


def decoder_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The ModuleList of decoder blocks: the first one as long as the model's layer count."""
    cfg = getattr(model, "config", None)
    n = getattr(cfg, "num_hidden_layers", None) or getattr(cfg, "n_layer", None)
    lists = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m) > 0]
    for name, m in lists:
        if n is None or len(m) == n:
            return name, m
    raise SiteError(f"{type(model).__name__}: cannot find its decoder blocks (a ModuleList of {n} layers)")


def _generic_norms(block: nn.Module) -> tuple[str, ...]:
    return tuple(n for n, m in block.named_children() if "norm" in type(m).__name__.lower())


_ANY_INPUT, _ANY_OUTPUT = Site.parse("module:in"), Site.parse("module")


def _linear_shape(m: nn.Module) -> tuple[int, int] | None:
    """``(in, out)`` features of a Linear layer or a GPT-2-style ``Conv1D`` (weight ``[in, out]``), else None."""
    if not (isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D"):
        return None
    return static_width(m, _ANY_INPUT), static_width(m, _ANY_OUTPUT)


def _generic_relative(model: nn.Module, preset: str, mtype: str) -> tuple[str, ...]:
    """A preset's place in a decoder block of an architecture without :data:`FAMILIES` data, read off the
    first block's Linear layers — so that the default sites work on any decoder LM that names its parts
    differently (``dense_4h_to_h``, ``fc2``, ``out_proj``, ``dense``):

    * ``mlp_hidden``: the input of the one Linear outside the attention that writes the hidden width from
      another width (the MLP's down projection); ``mlp_out``: that Linear's output;
    * ``attn_out``: the output of the attention's last Linear that writes the hidden width (its output
      projection, registered after the query/key/value ones in every Hugging Face attention).

    "Attention" is any submodule whose name contains ``attn`` or ``attention``. Raises :class:`SiteError`
    when the block does not show exactly one such layer (e.g. a mixture of experts), naming what it saw.
    """
    if preset == "post_norms":
        raise SiteError(f"sites='post_norms': no preset data for model_type {mtype!r} (Gemma-style post-norms)")
    cfg = getattr(model, "config", None)
    hidden = getattr(cfg, "hidden_size", None)
    if not isinstance(hidden, int):
        emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
        hidden = getattr(emb, "embedding_dim", None)
    block = decoder_blocks(model)[1][0]
    shapes = [(n, sh) for n, m in block.named_modules() if (sh := _linear_shape(m)) is not None]

    def in_attention(name: str) -> bool:
        return any(w in part.lower() for part in name.split(".")[:-1] for w in ("attn", "attention"))

    if preset in ("mlp_hidden", "mlp_out"):
        down = [n for n, (i, o) in shapes if o == hidden and i != hidden and not in_attention(n)]
        if len(down) == 1:
            return (f"{down[0]}:in" if preset == "mlp_hidden" else down[0],)
        what = f"Linear layers outside the attention writing width {hidden} from another width: {down or 'none'}"
    else:
        proj = [n for n, (i, o) in shapes if o == hidden and in_attention(n)]
        if proj:
            return (proj[-1],)
        what = f"no Linear layer inside an attention module writes width {hidden}"
    raise SiteError(f"sites={preset!r}: no preset data for model_type {mtype!r}, and its blocks do not show "
                    f"one place for it ({what}); pass module names or a regex")


def _preset_relative(model: nn.Module, preset: str) -> tuple[str, ...]:
    fam = family(model)
    mtype = getattr(getattr(model, "config", None), "model_type", "?")
    if preset == "norms":
        return fam.norms if fam else _generic_norms(decoder_blocks(model)[1][0])
    if fam is None:
        return _generic_relative(model, preset, mtype)
    if preset == "post_norms":
        if not fam.post_norms:
            raise SiteError(f"sites='post_norms': model_type {mtype!r} has no post-norms (Gemma-style)")
        return fam.post_norms
    return ({"mlp_out": fam.mlp_out, "attn_out": fam.attn_out, "mlp_hidden": fam.mlp_hidden}[preset],)


def is_preset(sites) -> bool:
    """Whether ``sites`` is a preset name, or several joined by ``+`` (e.g. ``attn_out+mlp_out``)."""
    return isinstance(sites, str) and bool(sites) and all(p in PRESETS for p in sites.split("+"))


def preset_sites(model: nn.Module, preset: str) -> list[str]:
    """A preset's site strings for every decoder block, from the family data (for an architecture without
    data, from its first block's layers): no probe forward. For models that keep Hugging Face's module names
    but cannot run a plain forward (a serving engine's model); :func:`resolve_sites` is this plus the checks."""
    prefix, blocks = decoder_blocks(model)
    rel = [r for p in preset.split("+") for r in _preset_relative(model, p)]
    return [f"{prefix}.{i}.{r}" for i in range(len(blocks)) for r in rel]


def resolve_sites(model: nn.Module, sites) -> list[str]:
    """Turn a preset (or presets joined by ``+``), regex, site string or list of them into site strings, in
    model order.

    Raises :class:`SiteError` naming the site when a module does not exist (and what does: ``model.layers has
    2 blocks: 0..1``), nothing matches, or a ``":k"`` suffix does not fit the module's output (see
    :func:`check_sites`).
    A registered model view (:mod:`lineas_fast.views`, e.g. a diffusers pipeline's) resolves its own presets.
    """
    model = as_model(model)
    if is_view(model):
        return model.resolve(sites)
    if is_preset(sites):
        out = preset_sites(model, sites)
    else:
        out = match_names(model, sites, PRESETS)
    check_sites(model, out)
    order = {n: i for i, (n, _) in enumerate(model.named_modules())}
    out = sorted(dict.fromkeys(out), key=lambda s: (_block_index(s), order[Site.parse(s).module]))
    return out


def match_names(model: nn.Module, sites, presets: tuple) -> list[str]:
    """A site string that is not a preset (a module name, or a regex matched against module names), or a
    list of site strings, as a list; ``presets`` only words the errors."""
    if isinstance(sites, (list, tuple)) and sites and all(isinstance(s, str) for s in sites):
        return list(sites)
    if not isinstance(sites, str):
        raise SiteError(f"sites={sites!r}: expected a preset {presets}, a regex, or a non-empty list of names")
    modules = dict(model.named_modules())
    if Site.parse(sites).module in modules:
        return [sites]
    try:
        pattern = re.compile(sites)
    except re.error as e:
        raise SiteError(f"sites={sites!r}: not a module name, preset {presets} or valid regex ({e})") from None
    out = [n for n in modules if n and pattern.fullmatch(n)]
    if not out:
        # a plain dotted name (no regex syntax): say which step of the path does not exist
        why = missing_module(model, Site.parse(sites).module) if re.fullmatch(r"[\w.]+(:\w+)?", sites) else None
        raise SiteError(f"sites={sites!r}: no module matches (presets: {', '.join(presets)})"
                        + (f"; {why}" if why else ""))
    return out


def _block_index(spec: str) -> int:
    m = re.search(r"\.(\d+)(\.|:|$)", spec)
    return int(m.group(1)) if m else -1


def check_sites(model: nn.Module, sites: list[str]) -> None:
    """Every site names an existing module, and every ``":k"`` suffix an element of its module's tuple
    output; else one :class:`SiteError` naming the site and what is valid instead (``model.layers has 2
    blocks: 0..1``, ``output is a tensor, not a tuple; drop ":7"``, ``output is a tuple of 2 element(s)``).

    ``":k"`` needs a look at the output: one 1-token probe forward, run in eval mode (no dropout draws)
    with each module's train/eval flag put back, and only when some site has a ``":k"`` suffix. A model
    view (e.g. a pipeline, whose probe is a denoising step) is checked by name only; its ``":k"`` sites are
    checked by :func:`~lineas_fast.site_address.pick` on the first forward.
    """
    modules = dict(model.named_modules())
    parsed = [Site.parse(s) for s in sites]
    missing = [s.spec for s in parsed if s.module not in modules]
    if missing:
        why = missing_module(model, Site.parse(missing[0]).module)
        raise SiteError(f"unknown site(s) for {type(model).__name__}: {missing[:5]}"
                        + (f"; {missing[0]!r}: {why}" if why else ""))
    indexed = [s.spec for s in parsed if s.index is not None]
    if indexed and not is_view(model):
        modes = [(m, m.training) for m in model.modules()]
        try:
            model.eval()
            probe_shapes(model, indexed)  # pick() raises SiteError at the first element that does not fit
        finally:
            for m, flag in modes:
                m.training = flag


__all__ = ["FAMILIES", "PRESETS", "Family", "Site", "channel_dim", "check_sites", "decoder_blocks", "family",
           "is_preset", "preset_sites",
           "get_module", "match_names", "pick", "replace", "resolve_sites", "site_widths", "static_width"]
