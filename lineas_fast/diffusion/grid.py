"""Loading a local pipeline and rendering a steering-strength grid (what ``lineas-fast generate
--pipeline`` writes): one row per prompt, one column per strength, every column from the same noise."""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import SteeringError


def load_pipeline(path: str, device: str | None = None, dtype: str | None = None):
    """``DiffusionPipeline.from_pretrained(path)`` from a local folder only (never the hub)."""
    folder = Path(path)
    if not (folder / "model_index.json").is_file():
        raise SteeringError(f"--pipeline {path!r}: not a local diffusers folder (no model_index.json); "
                            f"download it elsewhere and pass the folder")
    from diffusers import DiffusionPipeline

    kw = {"torch_dtype": getattr(torch, dtype)} if dtype else {}
    pipe = DiffusionPipeline.from_pretrained(str(folder), local_files_only=True, **kw)
    if device:
        pipe.to(device)
    return pipe


def strength_grid(pipe, steering, prompts: list[str], strengths: list[float], *, num_inference_steps: int | None = None,
                  guidance_scale: float | None = None, seed: int = 0, size=None, mode: str | None = None,
                  pipe_kwargs: dict | None = None) -> list[list[torch.Tensor]]:
    """Images ``[prompt][strength]`` as float ``[3, H, W]`` tensors in [0, 1]."""
    from ..patching import steered
    from .run import _size_kwargs

    kw = dict(output_type="pt", **_size_kwargs(pipe, size), **(pipe_kwargs or {}))
    if num_inference_steps is not None:
        kw["num_inference_steps"] = int(num_inference_steps)
    if guidance_scale is not None:
        kw["guidance_scale"] = float(guidance_scale)
    columns = []
    for s in strengths:
        with steered(pipe, steering, strength=s, mode=mode):
            out = pipe(list(prompts), generator=torch.Generator().manual_seed(seed), **kw)
        columns.append(out.images.float().cpu())
    return [[col[i] for col in columns] for i in range(len(prompts))]


def save_grid(images: list[list[torch.Tensor]], prompts: list[str], strengths: list[float], path) -> Path:
    """A labelled PNG grid (rows prompts, columns strengths)."""
    from PIL import Image, ImageDraw

    h, w = images[0][0].shape[-2:]
    label_w, label_h = 160, 18
    grid = Image.new("RGB", (label_w + w * len(strengths), label_h + h * len(prompts)), "white")
    draw = ImageDraw.Draw(grid)
    for j, s in enumerate(strengths):
        draw.text((label_w + j * w + 4, 3), f"strength {s:g}", fill="black")
    for i, (prompt, row) in enumerate(zip(prompts, images)):
        draw.text((4, label_h + i * h + 4), prompt[:24], fill="black")
        for j, img in enumerate(row):
            arr = (img.clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype("uint8")
            grid.paste(Image.fromarray(arr), (label_w + j * w, label_h + i * h))
    path = Path(path)
    grid.save(path)
    return path
