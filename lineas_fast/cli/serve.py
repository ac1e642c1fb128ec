"""``lineas-fast serve``: vLLM's own OpenAI-compatible server with the steering plugin enabled.

It resolves the model (an embedded name is materialised once as a local HF folder), checks every
``--steering NAME=PATH`` against the model's config before the slow engine start, then replaces itself
with ``python -m vllm.entrypoints.launchers.api_server.entry --model FOLDER ...`` (vLLM's OpenAI server) in the interpreter that has vLLM (this
one, ``$LINEAS_FAST_VLLM_PYTHON``, or the project's ``.venv-vllm``), with ``VLLM_PLUGINS`` naming the
plugin and ``--additional-config {"lineas_fast": ...}`` carrying the steerings, the patched sites and the
slot count (see :mod:`lineas_fast.vllm.worker`). Every option it does not know goes to ``vllm serve``.
No HTTP server, batching or scheduler of our own: vLLM's are the product.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from ..errors import SteeringError
from .common import say

PLUGIN = "lineas_fast"


def add_parser(sub, common, fmt) -> None:
    s = sub.add_parser(
        "serve", parents=[common], formatter_class=fmt,
        help="serve the model with vLLM's OpenAI server, steerable per request",
        description="Start vLLM's OpenAI-compatible server with the lineas_fast plugin: requests choose a "
                    "steering with extra_body={'vllm_xargs': {'steering': NAME, 'strength': 0.8}}; "
                    "GET/POST /v1/steerings and DELETE /v1/steerings/NAME list, load and unload steerings. "
                    "Options this command does not know are passed to 'vllm serve' (e.g. --port, --dtype, "
                    "--max-model-len, --enforce-eager). See docs/serving.md.")
    s.add_argument("model", metavar="MODEL", help="embedded model name (smollm2-135m) or local HF folder")
    s.add_argument("--steering", action="append", default=[], metavar="NAME=PATH",
                   help="preload a steering file under NAME (repeatable)")
    s.add_argument("--steer-sites", default=None, metavar="SITES",
                   help="extra presets/sites to patch at start-up so that steerings using them can be loaded "
                        "later over HTTP (comma separated; default: the preloaded steerings' sites, or the "
                        "LinEAS default preset when none is preloaded)")
    s.add_argument("--max-steerings", type=int, default=8, metavar="K",
                   help="steering slots in the served tables (hot loads beyond K are refused)")
    s.add_argument("--dry-run", action="store_true", help="check everything, print the vLLM command, do not start")
    s.set_defaults(func=run, passthrough=True)


def run(args) -> int:
    from ..models import local_folder

    if args.max_steerings < 1:
        raise SteeringError(f"--max-steerings must be >= 1, got {args.max_steerings}")
    steerings = _parse_steerings(args.steering)
    folder = local_folder(args.model)
    sites = _check_steerings(folder, steerings)
    extra = [p.strip() for p in (args.steer_sites or "").split(",") if p.strip()]
    options = {"steerings": {n: str(p) for n, p in steerings.items()}, "sites": sites + extra,
               "capacity": args.max_steerings}
    vllm_args = list(args.vllm_args)
    vllm_args = _merge_additional_config(vllm_args, options)
    if not any(a == "--served-model-name" or a.startswith("--served-model-name=") for a in vllm_args):
        vllm_args += ["--served-model-name", args.model]
    from ..vllm.launch import VLLM_SERVER, find_vllm_python

    python = find_vllm_python()
    argv = [python, "-m", VLLM_SERVER, "--model", str(folder), *vllm_args]
    env = dict(os.environ)
    allowed = [p for p in env.get("VLLM_PLUGINS", "").split(",") if p]
    env["VLLM_PLUGINS"] = ",".join(dict.fromkeys(allowed + [PLUGIN]))
    if args.dry_run:
        print(f"VLLM_PLUGINS={env['VLLM_PLUGINS']} " + " ".join(_quote(a) for a in argv))
        return 0
    say(f"starting vLLM ({python}) on {folder} with {len(steerings)} steering(s): {', '.join(steerings) or 'none'}")
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(python, argv, env)
    return 0  # pragma: no cover - execve does not return


def _parse_steerings(items: list[str]) -> dict[str, Path]:
    out = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise SteeringError(f"--steering {item!r}: expected NAME=PATH")
        if name in out:
            raise SteeringError(f"--steering: the name {name!r} is given twice")
        if not Path(path).is_file():
            raise SteeringError(f"--steering {name}={path}: no such file")
        out[name] = Path(path).resolve()
    return out


def _check_steerings(folder: Path, steerings: dict[str, Path]) -> list[str]:
    """Load each steering strictly and check it against the model's architecture (built on the meta
    device: no weights read, nothing run): model type, every site's module and width, as the workers
    will; returns the union of their sites."""
    if not steerings:
        return []
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from ..steering import Steering

    config = AutoConfig.from_pretrained(folder, local_files_only=True)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    from ..vllm.patch import site_geometry

    sites = []
    for name, path in steerings.items():
        st = Steering.load(path)
        try:  # what the workers will check, read off the skeleton's modules (a meta model cannot run)
            mtype = st.meta.get("model_type", "")
            if mtype and mtype != config.model_type:
                raise SteeringError(f"steering was fitted on model_type {mtype!r}, this model is {config.model_type!r}")
            for site in st.sites:
                width = site_geometry(skeleton, site, config.hidden_size)[0]
                if width != st.scale[site].numel():
                    raise SteeringError(f"width mismatch at site {site!r}: steering has {st.scale[site].numel()}, "
                                        f"model has {width}")
        except SteeringError as e:
            raise SteeringError(f"--steering {name}={path}: {e}") from None
        if st.support:
            raise SteeringError(f"--steering {name}={path}: support-clamped maps cannot be served by the plugin "
                                "(bake them, or fit without a support)")
        sites += st.sites
    return list(dict.fromkeys(sites))


def _merge_additional_config(vllm_args: list[str], options: dict) -> list[str]:
    out, merged = [], {}
    i = 0
    while i < len(vllm_args):
        a = vllm_args[i]
        if a == "--additional-config" or a.startswith("--additional-config="):
            raw = a.split("=", 1)[1] if "=" in a else (vllm_args[i + 1] if i + 1 < len(vllm_args) else "")
            i += 1 if "=" in a else 2
            try:
                merged.update(json.loads(raw))
            except ValueError:
                raise SteeringError(f"--additional-config {raw!r}: not JSON") from None
            continue
        out.append(a)
        i += 1
    if PLUGIN in merged:
        raise SteeringError(f"--additional-config must not set {PLUGIN!r}: use --steering/--steer-sites")
    merged[PLUGIN] = options
    return out + ["--additional-config", json.dumps(merged)]


def _quote(a: str) -> str:
    import shlex

    return shlex.quote(a)


__all__ = ["add_parser", "run"]
