"""The variants bench_peers.py times: unsteered, lineas_fast's three apply modes, and each peer library
applying the same additive steering (see bench_peers.py's docstring for how each expresses it), plus the
models and the steering they share. Runs in the peers venv (transformers 4.x)."""

from __future__ import annotations

import copy

PEERS = ("repeng", "steering_vectors", "pyvene", "mlact_style")
LF_MODES = ("hooks", "fused", "fold")


class Variant:
    """One way of running the model: ``attach``/``detach`` apply and remove the steering, ``call`` is a
    forward (the model's keywords), ``generate`` a HF generate."""

    kind = "base"  # "base" | "lineas" | "peer"

    def __init__(self, name: str, model):
        self.name, self.model = name, model

    def attach(self) -> None:
        pass

    def detach(self) -> None:
        pass

    def call(self, **kw):
        return self.model(**kw)

    def generate(self, **kw):
        return self.model.generate(**kw)


class Unsteered(Variant):
    pass


class LineasFast(Variant):
    kind = "lineas"

    def __init__(self, name, model, st, mode):
        super().__init__(name, model)
        self.st, self.mode, self.h = st, mode, None

    def attach(self):
        import lineas_fast as lf

        self.h = lf.steer_(self.model, self.st, mode=self.mode)

    def detach(self):
        self.h.remove()
        self.h = None


class Repeng(Variant):
    kind = "peer"

    def __init__(self, name, model, vectors):
        super().__init__(name, model)
        self.vectors, self.cm = vectors, None

    def attach(self):
        from repeng import ControlModel, ControlVector

        layers = sorted(self.vectors)
        self.cm = ControlModel(self.model, layer_ids=layers)
        cv = ControlVector(model_type=self.model.config.model_type,
                           directions={i: self.vectors[i].numpy() for i in layers})
        self.cm.set_control(cv, coeff=1.0)

    def detach(self):
        self.cm.reset()
        self.cm.unwrap()
        self.cm = None

    def call(self, **kw):
        return self.cm(**kw)

    def generate(self, **kw):
        return self.cm.generate(**kw)


class SteeringVectors(Variant):
    kind = "peer"

    def __init__(self, name, model, vectors):
        super().__init__(name, model)
        from steering_vectors import SteeringVector

        self.sv = SteeringVector(layer_activations=dict(vectors), layer_type="decoder_block")
        self.ctx = None

    def attach(self):
        self.ctx = self.sv.apply(self.model)
        self.ctx.__enter__()

    def detach(self):
        self.ctx.__exit__(None, None, None)
        self.ctx = None


class Pyvene(Variant):
    kind = "peer"

    def __init__(self, name, model, vectors):
        super().__init__(name, model)
        self.vectors, self.pv = vectors, None

    def attach(self):
        import pyvene as pv

        d = self.model.config.hidden_size
        reps = [{"layer": i, "component": "block_output",
                 "intervention": pv.AdditionIntervention(source_representation=v.clone(), embed_dim=d)}
                for i, v in sorted(self.vectors.items())]
        # pyvene's constructor sets requires_grad=False on the model's parameters (harmless here: every
        # measurement runs under inference_mode); its hooks live only during each call.
        self.pv = pv.IntervenableModel(reps, model=self.model)

    def detach(self):
        self.pv = None

    def call(self, **kw):
        return self.pv(base=kw)[1]

    def generate(self, input_ids, attention_mask, **kw):
        return self.pv.generate(base={"input_ids": input_ids, "attention_mask": attention_mask},
                                intervene_on_prompt=True, **kw)[1]


class MlActStyleHook:
    """A forward hook doing, per call, the work of ml-act's ``InterventionHook.__call__`` around
    ``LinearOTHook.forward``: cast in, float support mask, per-neuron map, strength blend, masked blend,
    cast back. ω, b, lo, hi are fp32 buffers of shape [d]."""

    def __init__(self, scale, shift, lo, hi, strength: float = 1.0, dtype=None):
        import torch

        self.dtype = dtype or torch.float32
        self.scale, self.shift, self.lo, self.hi = (t.to(self.dtype) for t in (scale, shift, lo, hi))
        self.strength = float(strength)

    def __call__(self, module, inputs, output):
        out_dtype, device = output.dtype, output.device
        z = output.to(dtype=self.dtype, device=device)                     # cast to the hook dtype
        mask = ((self.lo < z) & (z < self.hi)).to(z.dtype)                 # support from per-neuron bounds
        z_ot = z * self.scale + self.shift                                 # the per-neuron linear map
        z_ot = self.strength * z_ot + (1 - self.strength) * z              # strength blend
        z = mask * z_ot + (1 - mask) * z                                   # map only inside the support
        return z.to(dtype=out_dtype, device=device)                        # cast back


class MlActStyle(Variant):
    kind = "peer"

    def __init__(self, name, model, st):
        super().__init__(name, model)
        import torch

        self.hooks = {}
        for site in st.sites:
            d = st.shift[site].numel()
            inf = torch.full((d,), float("inf"))
            self.hooks[site] = MlActStyleHook(st.scale[site], st.shift[site], -inf, inf)
        self.handles = []

    def attach(self):
        self.handles = [self.model.get_submodule(s).register_forward_hook(h) for s, h in self.hooks.items()]

    def detach(self):
        for h in self.handles:
            h.remove()
        self.handles = []


# ----------------------------------------------------------------------------------------------------
# models and the steering
# ----------------------------------------------------------------------------------------------------

def build_model(name: str, args):
    import torch

    if name == "smollm2":
        import lineas_fast as lf

        model, _ = lf.load_model("smollm2-135m")
        return model
    from transformers import LlamaConfig, LlamaForCausalLM

    hidden, inter, layers = (256, 704, 2) if args.quick else (2048, 5632, args.wide_layers)
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=16, num_key_value_heads=4, vocab_size=1024,
                      max_position_embeddings=1024, tie_word_embeddings=False,
                      bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).eval()
    model.generation_config.pad_token_id = 0
    return model


def make_vectors(model, scale: float, seed: int = 0) -> dict:
    """One random vector per decoder layer (fp32, [hidden])."""
    import torch

    g = torch.Generator().manual_seed(seed)
    d = model.config.hidden_size
    return {i: scale * torch.randn(d, generator=g) for i in range(model.config.num_hidden_layers)}


def make_steering(model, vectors: dict):
    import torch

    import lineas_fast as lf

    sites = lf.resolve_sites(model, "mlp_out")
    expected = [f"model.layers.{i}.mlp" for i in sorted(vectors)]
    assert sites == expected, (sites, expected)
    return lf.Steering({s: torch.ones_like(vectors[i]) for i, s in enumerate(sites)},
                       {s: vectors[i] for i, s in enumerate(sites)},
                       {"model_type": model.config.model_type})


def make_variants(model, st, vectors) -> list:
    """Every variant on its own deep copy of the model (the unsteered reference too, and its twin: the
    null comparison), so that all of them can stay attached while their decode steps are interleaved
    token by token."""
    def own():
        return copy.deepcopy(model)

    # "unsteered_twin" does exactly the unsteered work on another copy: its ratio's distance from 1 is this
    # run's noise floor, which the fused-vs-peer verdicts add to the medians' standard errors
    variants = [Unsteered("unsteered", own()), Unsteered("unsteered_twin", own())]
    variants += [LineasFast(f"lf_{m}", own(), st, m) for m in LF_MODES]
    variants += [Repeng("repeng", own(), vectors), SteeringVectors("steering_vectors", own(), vectors),
                 Pyvene("pyvene", own(), vectors), MlActStyle("mlact_style", own(), st)]
    return variants
