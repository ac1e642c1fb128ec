"""The ``vllm.endpoint_plugins`` entry: steering on vLLM's OpenAI-compatible HTTP server.

:class:`SteeringEndpoints` adds, to the server vLLM builds:

* a middleware on the generation routes (``/v1/completions``, ``/v1/chat/completions``,
  ``/v1/responses``) that reads ``vllm_xargs.steering`` / ``vllm_xargs.strength`` before vLLM parses the
  request: an unknown steering or a strength that is not a finite number answers **400** naming the
  loaded steerings, and the request never reaches the engine. A valid steered request gets a prefix
  cache salt from (steering, strength) (:func:`~lineas_fast.vllm.fields.cache_salt`), so KV blocks
  computed under one steering are never reused by another; it is counted in flight until its response
  (streamed or not) has been sent;
* ``GET /v1/steerings`` (name, sites, nnz, method, the model it was fitted on, requests in flight),
  ``POST /v1/steerings`` ``{"name", "path"}`` (load an artifact: validated against the served model by
  the workers; a bad file or another model's artifact → 400, a taken name or no free slot → 409) and
  ``DELETE /v1/steerings/{name}`` (404 if unknown, 409 while requests use it).

Loading and unloading go to the workers through ``collective_rpc`` to the methods that
:mod:`lineas_fast.vllm.worker` adds; this process keeps a mirror of the loaded names for validation.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections import Counter

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from .fields import FieldError, cache_salt, parse_fields

GENERATE_PATHS = frozenset({"/v1/completions", "/v1/chat/completions", "/v1/responses"})


def _error(status: int, message: str, kind: str | None = None) -> JSONResponse:
    kind = kind or {400: "BadRequestError", 404: "NotFoundError", 409: "ConflictError"}.get(status, "Error")
    return JSONResponse({"error": {"message": message, "type": kind, "param": None, "code": status}},
                        status_code=status)


class SteeringEndpoints:
    """vLLM endpoint plugin (see the module docstring); one instance per API server process."""

    name = "lineas_fast"
    required_tasks = ("generate",)

    def __init__(self):
        self.engine = None
        self.loaded: dict[str, dict] = {}
        self.capacity = 0
        self.model = ""
        self.in_flight: Counter = Counter()
        self.enabled = False
        self._lock = asyncio.Lock()
        self._refreshed = float("-inf")  # monotonic time of the last listing from the engine

    # ------------------------------------------------------------------ vLLM hooks
    def attach_router(self, app) -> None:
        router = APIRouter()

        @router.get("/v1/steerings")
        async def list_steerings():
            if not self.enabled:
                return _error(503, "steering is not enabled on this server (start it with lineas-fast serve)")
            await self.refresh()
            return {"object": "list", "model": self.model, "capacity": self.capacity,
                    "data": [dict(e, in_flight=self.in_flight[e["name"]]) for e in self.loaded.values()]}

        @router.post("/v1/steerings")
        async def load_steering(raw: Request):
            if not self.enabled:
                return _error(503, "steering is not enabled on this server (start it with lineas-fast serve)")
            try:
                body = json.loads(await raw.body())
            except (ValueError, UnicodeDecodeError):
                return _error(400, "body must be JSON: {\"name\": ..., \"path\": ...}")
            if not isinstance(body, dict) or set(body) != {"name", "path"} or not all(
                    isinstance(body[k], str) and body[k] for k in ("name", "path")):
                return _error(400, "body must be exactly {\"name\": <non-empty string>, \"path\": <non-empty string>}")
            return await self.load(body["name"], body["path"])

        @router.delete("/v1/steerings/{name}")
        async def unload_steering(name: str):
            if not self.enabled:
                return _error(503, "steering is not enabled on this server (start it with lineas-fast serve)")
            return await self.unload(name)

        app.include_router(router)
        app.add_middleware(_SteeringMiddleware, plugin=self)

    async def init_state(self, engine_client, state, args) -> None:
        self.engine = engine_client
        names = getattr(args, "served_model_name", None) or [getattr(args, "model", "")]
        self.model = names[0] if isinstance(names, (list, tuple)) else str(names)
        if engine_client is None:
            return
        try:
            await self.refresh()
            self.enabled = True
        except Exception:  # the engine was started without additional_config["lineas_fast"]
            self.enabled = False

    # ------------------------------------------------------------------ engine calls
    async def refresh(self) -> None:
        self._refreshed = time.monotonic()
        listing = (await self.engine.collective_rpc("lineas_list"))[0]
        self.loaded = {e["name"]: e for e in listing["steerings"]}
        self.capacity = listing["capacity"]

    async def known(self, name) -> dict:
        """The loaded names; refreshed from the engine when ``name`` is not among them (another API process
        may have loaded it), at most once a second, so a flood of unknown names costs no engine round trips."""
        if (isinstance(name, str) and name not in self.loaded and self.enabled
                and time.monotonic() - self._refreshed > 1.0):
            await self.refresh()
        return self.loaded

    async def load(self, name: str, path: str):
        async with self._lock:
            await self.refresh()
            if name in self.loaded:
                return _error(409, f"a steering named {name!r} is already loaded; DELETE it first")
            if len(self.loaded) >= self.capacity:
                return _error(409, f"all {self.capacity} steering slots are in use ({', '.join(sorted(self.loaded))})")
            try:
                entry = (await self.engine.collective_rpc("lineas_load", args=(name, path)))[0]
            except Exception as e:  # the workers' SteeringError / ArtifactError, as text
                return _error(400, _reason(e))
            self.loaded[name] = entry
            return dict(entry, in_flight=0)

    async def unload(self, name: str):
        async with self._lock:
            await self.refresh()
            if name not in self.loaded:
                return _error(404, f"no steering named {name!r}; loaded: {', '.join(sorted(self.loaded)) or 'none'}")
            if self.in_flight[name]:
                return _error(409, f"steering {name!r} is used by {self.in_flight[name]} request(s) in flight; "
                                   "retry when they have finished")
            await self.engine.collective_rpc("lineas_unload", args=(name,))
            self.loaded.pop(name, None)
            return {"name": name, "deleted": True}


def _reason(exc: BaseException) -> str:
    """The worker's own message out of vLLM's wrapping of a failed ``collective_rpc``."""
    text = str(exc).strip() or type(exc).__name__
    match = re.search(r"Worker failed with error '(.*)', please check", text, re.S)
    if match:
        text = match.group(1)
    for marker in ("SteeringError: ", "ArtifactError: ", "SiteError: "):
        if marker in text:
            text = text.split(marker, 1)[1]
    return text.splitlines()[0] if text else type(exc).__name__


class _SteeringMiddleware:
    """ASGI middleware: validate + salt steered generation requests, count them in flight."""

    def __init__(self, app, plugin: SteeringEndpoints):
        self.app, self.plugin = app, plugin

    async def __call__(self, scope, receive, send):
        if (scope["type"] != "http" or scope.get("method") != "POST" or scope.get("path") not in GENERATE_PATHS
                or not self.plugin.enabled):
            return await self.app(scope, receive, send)
        chunks, more = [], True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            more = message.get("more_body", False)
        body = b"".join(chunks)
        name = None
        try:
            data = json.loads(body)
        except (ValueError, UnicodeDecodeError):
            data = None  # not ours to judge: vLLM answers it
        if isinstance(data, dict) and "vllm_xargs" in data:
            xargs = data["vllm_xargs"]
            try:
                name, strength = parse_fields(xargs, await self.plugin.known(
                    xargs.get("steering") if isinstance(xargs, dict) else None))
            except FieldError as e:
                return await _error(400, str(e))(scope, receive, send)
            if name is not None:
                data["cache_salt"] = cache_salt(name, strength, data.get("cache_salt"))
                xargs["strength"] = strength
                body = json.dumps(data).encode()
                headers = [(k, v) for k, v in scope["headers"] if k.lower() != b"content-length"]
                scope = dict(scope, headers=headers + [(b"content-length", str(len(body)).encode())])
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        if name is None:
            return await self.app(scope, replay, send)
        self.plugin.in_flight[name] += 1
        try:
            return await self.app(scope, replay, send)
        finally:
            self.plugin.in_flight[name] -= 1


__all__ = ["GENERATE_PATHS", "SteeringEndpoints"]
