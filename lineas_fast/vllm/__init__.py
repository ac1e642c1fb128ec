"""Serving steering in vLLM through its own plugin points (SPEC §8; ``docs/serving.md``).

Two entry points, registered in ``pyproject.toml`` and enabled by ``VLLM_PLUGINS=lineas_fast``:

* ``vllm.general_plugins`` → :func:`lineas_fast.vllm.worker.register`: in each worker, wraps the steered
  modules of the loaded model so they read a :class:`~lineas_fast.vllm.table.SlotTable` (persistent
  per-site (ω−1, b) tables of every loaded steering, and per-token slot + strength buffers filled once
  per step from the requests' ``extra_args``), and adds the worker methods the HTTP side calls.
* ``vllm.endpoint_plugins`` → :class:`lineas_fast.vllm.endpoints.SteeringEndpoints`: validates the
  ``vllm_xargs`` steering fields of generation requests (HTTP 400 before the engine sees them), salts
  the prefix cache per steering, and serves ``GET/POST /v1/steerings`` and ``DELETE /v1/steerings/{name}``.

The modules that import vLLM (``worker``, ``endpoints``) are only imported by vLLM itself; ``table``
and ``fields`` are plain torch/Python and tested without vLLM.
"""

# vLLM has no stable internal API: the worker hooks are tested against this range only.
VLLM_TESTED = ("0.32.0", "0.33.0")  # [lowest, first untested)

__all__ = ["VLLM_TESTED"]
