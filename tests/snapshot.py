"""A whole-model snapshot for "nothing changed" assertions (``from snapshot import model_snapshot, assert_unchanged``).

``model_snapshot(model)`` captures, bit-exactly:

* ``state``   — the ``state_dict`` (keys in order, values cloned, dtypes);
* ``tree``    — the module tree: every module's name and type, every parameter's and buffer's name,
  dtype, device, shape, ``requires_grad``, and which parameter/buffer slots are None;
* ``hooks``   — every registered hook on every module (forward, forward-pre, backward, backward-pre,
  full-backward, state-dict hooks), by id and function, plus the global module hooks;
* ``outputs`` — the model's output on a fixed probe batch (``tiny_batch()`` logits for a causal LM,
  or ``probe(model)`` when given; ``probe=False`` skips it);
* ``config``  — ``model.config.to_dict()`` where the model has a config (flags ``bake`` may set).

``assert_unchanged(model, snap)`` recomputes each part and compares it with ``torch.equal`` / ``==``,
failing with the first differences by name. tests/ is on ``sys.path`` (see conftest.py).
"""

from __future__ import annotations

import torch
from torch.nn.modules import module as _module_mod

from tiny_models import tiny_batch

_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks",
               "_forward_hooks_with_kwargs", "_forward_pre_hooks_with_kwargs", "_forward_hooks_always_called",
               "_state_dict_hooks", "_state_dict_pre_hooks", "_load_state_dict_pre_hooks",
               "_load_state_dict_post_hooks")
_GLOBAL_HOOKS = ("_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks",
                 "_global_backward_pre_hooks", "_global_forward_hooks_always_called")


def _state(model) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _tree(model) -> list:
    out = []
    for name, m in model.named_modules():
        out.append(("module", name, type(m).__qualname__))
        for pname, p in m._parameters.items():
            out.append(("param", name, pname, None if p is None else
                        (type(p).__name__, p.dtype, str(p.device), tuple(p.shape), p.requires_grad)))
        for bname, b in m._buffers.items():
            out.append(("buffer", name, bname, None if b is None else
                        (b.dtype, str(b.device), tuple(b.shape), bname in m._non_persistent_buffers_set)))
    return out


def _hooks(model) -> dict:
    out = {}
    for name, m in model.named_modules():
        for attr in _HOOK_DICTS:
            d = getattr(m, attr, None)
            if d:
                out[(name, attr)] = [(k, v) for k, v in d.items()]
    for attr in _GLOBAL_HOOKS:
        d = getattr(_module_mod, attr, None)
        if d:
            out[("<global>", attr)] = [(k, v) for k, v in d.items()]
    return out


@torch.no_grad()
def _outputs(model, probe):
    if probe is False:
        return None
    if probe is None:
        ids, mask = tiny_batch()
        out = model(input_ids=ids, attention_mask=mask)
        out = out.logits if hasattr(out, "logits") else out
    else:
        out = probe(model)
    return out.detach().clone() if isinstance(out, torch.Tensor) else out


def _config(model):
    cfg = getattr(model, "config", None)
    return cfg.to_dict() if hasattr(cfg, "to_dict") else None


def model_snapshot(model, probe=None) -> dict:
    """Capture ``model`` (see the module docstring). ``probe``: None (tiny_batch logits), a callable
    ``probe(model) -> Tensor``, or False (no forward, e.g. for a model that cannot run)."""
    return {"state": _state(model), "tree": _tree(model), "hooks": _hooks(model),
            "outputs": _outputs(model, probe), "config": _config(model), "probe": probe}


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


def _equal(a, b) -> bool:
    """Bit-exact: same dtype, shape, device and bytes (so NaN == NaN and -0.0 != 0.0)."""
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        if a.dtype != b.dtype or a.shape != b.shape or a.device != b.device:
            return False
        return a.device.type == "meta" or bool(torch.equal(_bits(a), _bits(b)))  # meta: no data to compare
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return type(a) is type(b) and len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
    return a == b


def assert_unchanged(model, snap: dict) -> None:
    """``model`` is bit-identical to ``snap``: state_dict, module tree, hooks, probe outputs (and config)."""
    state = model.state_dict()
    assert list(state) == list(snap["state"]), \
        f"state_dict keys changed: {sorted(set(state) ^ set(snap['state']))[:8]}"
    diff = [k for k, v in snap["state"].items() if not _equal(state[k], v)]
    assert not diff, f"state_dict values changed: {diff[:8]}"
    tree = _tree(model)
    if tree != snap["tree"]:
        changed = [x for x in tree if x not in snap["tree"]] + [x for x in snap["tree"] if x not in tree]
        raise AssertionError(f"module tree changed: {changed[:6]}")
    hooks = _hooks(model)
    assert hooks == snap["hooks"], \
        f"hooks changed: {sorted(set(hooks) ^ set(snap['hooks']))[:6] or 'same slots, other hooks'}"
    cfg = _config(model)
    if cfg != snap["config"]:
        keys = sorted(k for k in set(cfg or {}) | set(snap["config"] or {})
                      if (cfg or {}).get(k, "<absent>") != (snap["config"] or {}).get(k, "<absent>"))
        raise AssertionError(f"config changed: {keys[:8]}")
    if snap["outputs"] is not None:
        out = _outputs(model, snap["probe"])
        assert _equal(out, snap["outputs"]), "outputs on the probe batch changed"
