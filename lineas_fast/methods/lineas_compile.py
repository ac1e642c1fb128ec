"""``lf.fit(..., method="lineas", compile=True)``: the LinEAS training forward with static shapes and
compiled decoder blocks (the loss, backward, Adam, prox and bookkeeping are those of :mod:`.trainer`).

* **Static, packed layout.** A step's source prompts are packed, first-fit decreasing by token count,
  into rows of a fixed width ``L`` (the longest prompt rounded up to a multiple of 8). Position ids
  restart at 0 for each prompt and no attention mask is passed, so transformers builds a block-diagonal
  causal mask (its packed-sequence support): a token sees exactly the tokens it sees alone, and pads at
  the end of a row never reach a real token. Every forward is ``[R, L]`` with ``R`` fixed for the whole
  fit (the packing of the ``batch_size`` longest prompts; a random mini-batch that needs more rows takes a
  second forward of the same shape), so nothing recompiles after the first step. Packing also pads less
  than length buckets do. A probe checks once per fit that packed prompts really are isolated in this
  model; where they are not, each prompt gets a row of its own (right padding, still static).
* **Regional compilation.** Each decoder block up to the one holding the last site is compiled
  (``torch.compile(block.forward, dynamic=False)``); identical blocks share their compiled graphs
  (in practice two: the first block's input does not require grad). The site hooks are module-level
  functions that read the site's (ω, b) views from attributes of the site module and leave the steered
  value there, so they trace into the block's graph with the same guards in every layer. The forward
  stops after the block holding the last site (a hook on the block itself, outside its compiled forward).
* **Pooling outside.** The steered site values are pooled after the forward with precomputed flat
  indices (``index_select``), eagerly: their sizes change with random mini-batches.

Everything installed here (hooks, compiled ``forward`` attributes, per-site attributes) is removed on
exit; compiled code stays in torch's caches (and inductor's on-disk FX graph cache, which makes the
first step of a later fit much shorter).
"""

from __future__ import annotations

import functools
from contextlib import ExitStack
from dataclasses import dataclass

import torch
from torch import nn

from ..collect import StopForward, execution_order, model_device
from ..errors import SteeringError
from ..sites import Site, decoder_blocks

_SCALE, _SHIFT, _VALUE = "_lineas_scale", "_lineas_shift", "_lineas_value"
_MISSING = object()
ROW_MULTIPLE = 8  # row width L is the longest prompt rounded up to this


def compile_backend(compile) -> str | None:
    """The ``torch.compile`` backend that ``compile=`` asks for (None: eager training)."""
    if compile is None or compile is False:
        return None
    if compile is True:
        return "inductor"
    if isinstance(compile, str) and compile in torch._dynamo.list_backends(exclude_tags=()):
        return compile
    raise SteeringError(f"compile={compile!r}: expected a bool or a torch.compile backend name "
                        f"(e.g. 'inductor', 'aot_eager')")


# ------------------------------------------------------------------ hooks (module level: one function object
# for every site, so a compiled block's guards are the same in every layer)
def _steer(module: nn.Module, h: torch.Tensor) -> torch.Tensor:
    out = h.float() * getattr(module, _SCALE) + getattr(module, _SHIFT)
    setattr(module, _VALUE, out)
    return out.to(h.dtype)


def _steer_output(module, args, output):
    return _steer(module, output)


@functools.cache
def _steer_output_at(k: int):
    def hook(module, args, output):
        items = list(output)
        items[k] = _steer(module, output[k])
        return type(output)(items) if isinstance(output, tuple) else items
    return hook


def _steer_input(module, args):
    return (_steer(module, args[0]), *args[1:])


def _keep_output(module, args, output):
    """A fused norm site: the op already applied (ω, b); only keep its output."""
    setattr(module, _VALUE, output)


def _stop(module, args, output):
    raise StopForward


# ------------------------------------------------------------------ layout
def pack_rows(lengths: list[int], width: int) -> list[list[int]]:
    """First-fit decreasing: indices into ``lengths`` per row, each row's total at most ``width``."""
    rows: list[list[int]] = []
    free: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        k = next((r for r, f in enumerate(free) if f >= lengths[i]), None)
        if k is None:
            rows.append([])
            free.append(width)
            k = len(rows) - 1
        rows[k].append(i)
        free[k] -= lengths[i]
    return rows


@dataclass
class Layout:
    """One step's forwards (``[R, L]`` ids and position ids each) and where its tokens land in their
    concatenated flat rows: ``index`` (every token), ``segment`` (its prompt, for ``mean``) and ``last``."""

    chunks: list[tuple[torch.Tensor, torch.Tensor]]
    index: torch.Tensor
    segment: torch.Tensor
    counts: torch.Tensor
    last: torch.Tensor


class CompiledForward:
    """A training forward (:mod:`.trainer`): ``bind(ω, b)`` then ``self(prompt indices)`` → ``(z, owner)``.

    Args:
        tokens: token ids of every prompt the fit runs (as the eager path tokenizes them).
        fused: sites whose module is a fused norm already applying (ω, b) (see ``_TrainedNorms``).
        rows_for: how many prompts a step uses (fixes the number of rows of every forward).
    """

    def __init__(self, model, tokens: list[list[int]], sites: list[str], slices: dict, fused, *, pooling: str,
                 rows_for: int, pad_id: int, backend: str):
        if not tokens or min(len(t) for t in tokens) == 0:
            raise SteeringError("compile=True: every source prompt must have at least one token")
        self.model, self.tokens, self.sites, self.slices = model, tokens, sites, slices
        self.fused, self.pooling, self.backend, self.pad_id = set(fused), pooling, backend, pad_id
        self.device = model_device(model)
        self.width = -(-max(len(t) for t in tokens) // ROW_MULTIPLE) * ROW_MULTIPLE
        self.rows_for = rows_for
        self.packed = True
        self.rows = 0
        self._layouts: dict[tuple, Layout] = {}
        self._stack = None

    # ---------------------------------------------------------------- set-up / tear-down
    def __enter__(self):
        model = self.model
        self._stack = ExitStack()
        try:
            order = execution_order(model, self.sites)
            prefix, blocks = decoder_blocks(model)
            block_of = {s: _block_index(Site.parse(s).module, prefix) for s in self.sites}
            in_blocks = [block_of[s] for s in self.sites if block_of[s] is not None]
            last = order[-1]
            stop_at = (blocks[block_of[last]] if block_of[last] is not None
                       else model.get_submodule(Site.parse(last).module))
            self.packed = self._packing_isolates(stop_at)
            lengths = sorted(len(t) for t in self.tokens)[-self.rows_for:]
            self.rows = len(pack_rows(lengths, self.width)) if self.packed else len(lengths)

            # dynamo does not guard on module hooks by default: a graph traced for a block without site
            # hooks would silently be reused for one with them (and across fits with other sites)
            self._stack.enter_context(torch._dynamo.config.patch(
                skip_nnmodule_hook_guards=False, recompile_limit=max(64, torch._dynamo.config.recompile_limit)))
            for s in self.sites:
                site = Site.parse(s)
                module = model.get_submodule(site.module)
                if s in self.fused:
                    handle = module.register_forward_hook(_keep_output)
                elif site.is_input:
                    handle = module.register_forward_pre_hook(_steer_input)
                elif site.index is not None:
                    handle = module.register_forward_hook(_steer_output_at(site.index))
                else:
                    handle = module.register_forward_hook(_steer_output)
                self._stack.callback(handle.remove)
                self._stack.callback(_drop_attrs, module)
            handle = stop_at.register_forward_hook(_stop)  # after the site hooks on the same module
            self._stack.callback(handle.remove)
            for block in list(blocks)[:max(in_blocks) + 1] if in_blocks else []:
                saved = block.__dict__.get("forward", _MISSING)
                block.forward = torch.compile(block.forward, backend=self.backend, dynamic=False)
                self._stack.callback(_restore_forward, block, saved)
        except BaseException:
            self._stack.close()
            raise
        return self

    def __exit__(self, *exc):
        self._stack.close()

    @torch.no_grad()
    def _packing_isolates(self, stop_at: nn.Module) -> bool:
        """Whether two prompts packed in one row give the same activations as one of them alone (up to
        the module the training forward stops at)."""
        a, b = sorted(self.tokens, key=len)[:2]
        ids = torch.full((2, len(a) + len(b)), self.pad_id, dtype=torch.long)
        pos = torch.zeros_like(ids)
        ids[0] = torch.tensor(a + b)
        pos[0] = torch.cat([torch.arange(len(a)), torch.arange(len(b))])
        ids[1, :len(b)] = torch.tensor(b)
        pos[1] = torch.cat([torch.arange(len(b)), torch.arange(len(a))])
        seen = []

        def grab(module, args, output):
            seen.append(output[0] if isinstance(output, (tuple, list)) else output)
            raise StopForward

        handle = stop_at.register_forward_hook(grab)
        try:
            _forward(self.model, ids.to(self.device), pos.to(self.device))
        finally:
            handle.remove()
        if not seen or not torch.is_tensor(seen[0]) or seen[0].dim() != 3:
            return False
        packed, alone = seen[0][0, len(a):].float(), seen[0][1, :len(b)].float()
        tol = 1e-3 if seen[0].dtype == torch.float32 else 3e-2  # a leak changes attention outputs wholesale
        return bool(torch.isfinite(alone).all()) and torch.allclose(
            packed, alone, rtol=tol, atol=tol * float(alone.abs().max().clamp(min=1)))

    # ---------------------------------------------------------------- the step
    def bind(self, omega: torch.Tensor, shift: torch.Tensor) -> None:
        """Fresh views of the flat parameters on each (non-fused) site module: one graph per step."""
        for s in self.sites:
            if s not in self.fused:
                module = self.model.get_submodule(Site.parse(s).module)
                setattr(module, _SCALE, omega[self.slices[s]])
                setattr(module, _SHIFT, shift[self.slices[s]])

    def __call__(self, prompts: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(z, owner)``: steered pooled values and each row's prompt index (see :mod:`.trainer`)."""
        layout = self.layout(prompts)
        modules = [self.model.get_submodule(Site.parse(s).module) for s in self.sites]
        flats = []
        for ids, pos in layout.chunks:
            _forward(self.model, ids, pos)
            flats.append([getattr(m, _VALUE).float().reshape(ids.numel(), -1) for m in modules])
        per_site = [torch.cat(parts) for parts in zip(*flats)] if len(flats) > 1 else flats[0]
        owner = torch.tensor(prompts, device=self.device)
        if self.pooling == "tokens":
            z = torch.cat([v.index_select(0, layout.index) for v in per_site], dim=1)
            return z, owner[layout.segment]
        if self.pooling == "last":
            return torch.cat([v.index_select(0, layout.last) for v in per_site], dim=1), owner
        z = torch.cat([v.index_select(0, layout.index) for v in per_site], dim=1)
        sums = z.new_zeros(len(prompts), z.shape[1]).index_add(0, layout.segment, z)
        return sums / layout.counts[:, None], owner

    def layout(self, prompts: list[int]) -> Layout:
        key = tuple(prompts)
        if key in self._layouts:
            return self._layouts[key]
        L = self.width
        lengths = [len(self.tokens[p]) for p in prompts]
        rows = pack_rows(lengths, L) if self.packed else [[k] for k in range(len(prompts))]
        n_chunks = -(-len(rows) // self.rows)
        ids = torch.full((n_chunks * self.rows, L), self.pad_id, dtype=torch.long)
        pos = torch.arange(L).repeat(n_chunks * self.rows, 1)
        index, segment, last = [], [], [0] * len(prompts)
        for r, row in enumerate(rows):
            t = 0
            for k in row:
                n = lengths[k]
                ids[r, t:t + n] = torch.tensor(self.tokens[prompts[k]])
                pos[r, t:t + n] = torch.arange(n)
                index.extend(range(r * L + t, r * L + t + n))
                segment.extend([k] * n)
                last[k] = r * L + t + n - 1
                t += n
            pos[r, t:] = torch.arange(L - t)  # the pads: a segment of their own, after every real token
        dev = self.device
        chunks = [(ids[c * self.rows:(c + 1) * self.rows].to(dev), pos[c * self.rows:(c + 1) * self.rows].to(dev))
                  for c in range(n_chunks)]
        layout = Layout(chunks, torch.tensor(index, device=dev), torch.tensor(segment, device=dev),
                        torch.tensor(lengths, device=dev, dtype=torch.float32), torch.tensor(last, device=dev))
        if len(self._layouts) < 4:  # the full batch repeats every step; random batches rarely do
            self._layouts[key] = layout
        return layout


def _forward(model, ids: torch.Tensor, pos: torch.Tensor) -> None:
    try:
        model(input_ids=ids, position_ids=pos, use_cache=False)
    except StopForward:
        pass


def _block_index(module_name: str, prefix: str) -> int | None:
    if not module_name.startswith(prefix + "."):
        return None
    head = module_name[len(prefix) + 1:].split(".", 1)[0]
    return int(head) if head.isdigit() else None


def _drop_attrs(module: nn.Module) -> None:
    for name in (_SCALE, _SHIFT, _VALUE):
        module.__dict__.pop(name, None)


def _restore_forward(block: nn.Module, saved) -> None:
    if saved is _MISSING:
        block.__dict__.pop("forward", None)
    else:
        block.forward = saved
