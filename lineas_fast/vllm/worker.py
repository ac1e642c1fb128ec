"""The ``vllm.general_plugins`` entry: steering inside vLLM's workers.

:func:`register` runs in every vLLM process (any number of times; it patches once). It wraps two
methods of vLLM's model runner and adds three worker methods:

* ``load_model`` — after the model is built, and only if the engine was started with
  ``additional_config={"lineas_fast": {...}}`` (:data:`CONFIG_KEY`; ``lineas-fast serve`` sets it):
  resolve the sites to patch (``sites``: presets or site strings, plus the preloaded steerings'), build
  the :class:`SlotTable` (``capacity`` slots, ``max_num_batched_tokens`` tokens), wrap the site
  modules (:mod:`.patch`) and load ``steerings`` (``{name: path}``). All before vLLM compiles or
  captures the model. The plugin's configuration lives in ``additional_config`` on purpose: vLLM hashes
  it into its compile-cache key, so a graph traced with one set of patched sites (or none) is never
  reused for another; without the key the plugin leaves the model alone.
* ``_prepare_inputs`` — once per step, after vLLM has laid out the persistent batch: each request's
  ``(slot, strength)`` (from its ``SamplingParams.extra_args``, parsed once and kept on the request's
  state) is repeated over its scheduled tokens into the table's per-token buffers.
* ``lineas_load(name, path)``, ``lineas_unload(name)``, ``lineas_list()`` — called by the HTTP side
  through ``collective_rpc``; they run between steps, on every rank.
"""

from __future__ import annotations

import logging

from ..errors import SteeringError
from .fields import FieldError

log = logging.getLogger("lineas_fast.vllm")

CONFIG_KEY = "lineas_fast"  # additional_config[CONFIG_KEY] = {"steerings": {name: path}, "sites": [...], "capacity": 8}
DEFAULT_CAPACITY = 8

_patched = False


def register() -> None:
    """Patch vLLM's model runner and worker classes (idempotent; safe in every process)."""
    global _patched
    if _patched:
        return
    _patched = True
    from vllm.v1.worker import gpu_model_runner
    from vllm.v1.worker.worker_base import WorkerBase

    runner = gpu_model_runner.GPUModelRunner
    _wrap_load_model(runner)
    try:  # the CPU runner overrides load_model; importing it is harmless where there is no CPU build
        from vllm.v1.worker.cpu_model_runner import CPUModelRunner
        _wrap_load_model(CPUModelRunner)
    except ImportError:  # pragma: no cover - GPU-only builds
        pass
    original_prepare = runner._prepare_inputs

    def _prepare_inputs(self, scheduler_output, num_scheduled_tokens, *args, **kwargs):
        out = original_prepare(self, scheduler_output, num_scheduled_tokens, *args, **kwargs)
        table = getattr(self, "_lineas_table", None)
        if table is not None:
            _fill(self, table, num_scheduled_tokens)
        return out

    runner._prepare_inputs = _prepare_inputs
    WorkerBase.lineas_load = _worker_load
    WorkerBase.lineas_unload = _worker_unload
    WorkerBase.lineas_list = _worker_list


def _wrap_load_model(cls) -> None:
    original = cls.__dict__.get("load_model")
    if original is None or getattr(original, "_lineas", False):
        return

    def load_model(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        attach(self)
        return out

    load_model._lineas = True
    cls.load_model = load_model


def attach(runner) -> None:
    """Build the table for ``runner.model``, wrap its sites and preload the start-up steerings."""
    from ..steering import Steering
    from .patch import install, site_geometry
    from .table import SlotTable

    options = (getattr(runner.vllm_config, "additional_config", None) or {}).get(CONFIG_KEY)
    if options is None:
        return
    if not isinstance(options, dict) or set(options) - {"steerings", "sites", "capacity"}:
        raise SteeringError(f"additional_config[{CONFIG_KEY!r}] must be an object with keys steerings, sites, "
                            f"capacity; got {options!r}")
    model = runner.model
    config = runner.model_config.hf_config
    steerings = {name: Steering.load(path) for name, path in (options.get("steerings") or {}).items()}
    sites = _sites_to_patch(model, steerings, options.get("sites") or [])
    geometry = {s: site_geometry(model, s, config.hidden_size) for s in sites}
    capacity = int(options.get("capacity", DEFAULT_CAPACITY))
    table = SlotTable({s: g[0] for s, g in geometry.items()}, capacity=capacity,
                      max_tokens=runner.scheduler_config.max_num_batched_tokens,
                      shards={s: g[1] for s, g in geometry.items() if g[1] is not None},
                      model_type=getattr(config, "model_type", ""), device=runner.device)
    install(model, table)
    for name, st in steerings.items():
        table.load(name, st)
    runner._lineas_table = table
    log.info("lineas_fast: %d sites patched, steerings loaded: %s", len(sites), sorted(steerings) or "none")


def _sites_to_patch(model, steerings: dict, wanted) -> list[str]:
    """The preloaded steerings' sites, plus ``wanted`` (presets, expanded from the family data, or site
    strings); nothing is probed: vLLM's modules only run inside its forward context. Each site's module
    is looked up when its geometry is read (:func:`~lineas_fast.vllm.patch.site_geometry`)."""
    from ..defaults import LINEAS
    from ..sites import is_preset, preset_sites

    sites = [s for st in steerings.values() for s in st.sites]
    wanted = [wanted] if isinstance(wanted, str) else list(wanted)
    if not sites and not wanted:
        wanted = [LINEAS["sites"]]  # nothing preloaded: patch the default fit's sites for hot loads
    for spec in wanted:
        sites += preset_sites(model, spec) if is_preset(spec) else [spec]
    return list(dict.fromkeys(sites))


def _fill(runner, table, num_scheduled_tokens) -> None:
    batch = runner.input_batch
    n = batch.num_reqs
    slots, strengths = [0] * n, [0.0] * n
    for i, req_id in enumerate(batch.req_ids[:n]):
        state = runner.requests[req_id]
        route = getattr(state, "_lineas_route", None)
        if route is None:
            params = state.sampling_params
            try:
                route = table.route(params.extra_args if params is not None else None)
            except FieldError as e:  # the HTTP side validates; offline callers get a warning
                log.warning("lineas_fast: request %s runs unsteered: %s", req_id, e)
                route = (0, 0.0)
            state._lineas_route = route
        slots[i], strengths[i] = route
    table.fill(slots, strengths, num_scheduled_tokens[:n])


def _table(worker):
    table = getattr(worker.model_runner, "_lineas_table", None)
    if table is None:
        raise SteeringError("lineas_fast: the served model has no steering table (plugin not attached)")
    return table


def _worker_load(self, name: str, path: str) -> dict:
    from ..steering import Steering

    table = _table(self)
    entry = table.load(name, Steering.load(path))
    return next(d for d in table.describe() if d["name"] == entry.name)


def _worker_unload(self, name: str) -> None:
    _table(self).unload(name)


def _worker_list(self) -> dict:
    table = _table(self)
    return {"steerings": table.describe(), "capacity": table.capacity, "sites": list(table.widths),
            "model_type": table.model_type}


__all__ = ["CONFIG_KEY", "DEFAULT_CAPACITY", "attach", "register"]
