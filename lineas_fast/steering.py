"""Steering: the artifact every method produces and every apply mode consumes.

For each site a scale ω ∈ R^d and a shift b ∈ R^d (float32, CPU), applied as ``h ← ω⊙h + b``, plus
``meta`` (method, model identity, widths, hyper-parameters, versions). Optionally a *support* per site
(Linear-AcT's ``q_0_100`` clamp): bounds ``lo < hi`` outside of which (``h ≤ lo`` or ``h ≥ hi``) the map
passes the value through unchanged. Saved as one safetensors file whose header carries the JSON
metadata: loading never unpickles anything.
"""

from __future__ import annotations

import json
import os

import torch

from ._version import __version__
from .errors import ArtifactError, SteeringError

FORMAT_VERSION = 2  # 2 added the optional support clamp; version-1 files load unchanged
REQUIRED_META = ("method", "model_type", "model_class", "name_or_path", "widths", "hyperparams",
                 "library_version", "format_version")


class Steering:
    """Per-site affine maps ``h ← scale⊙h + shift`` with metadata.

    Args:
        scale, shift: ``{site: float32 tensor [d]}`` with the same keys and shapes.
        meta: metadata dict (see :data:`REQUIRED_META`); missing keys are filled with defaults.
        support: optional ``{site: (lo, hi)}`` float32 ``[d]`` bounds: the map applies only where
            ``lo < h < hi`` (strictly), elsewhere ``h`` passes through. Bounds may be ±inf, never NaN.
    """

    def __init__(self, scale: dict, shift: dict, meta: dict | None = None, support: dict | None = None):
        if set(scale) != set(shift):
            raise SteeringError(f"scale and shift cover different sites: {sorted(set(scale) ^ set(shift))[:5]}")
        if not scale:
            raise SteeringError("a Steering needs at least one site")
        self.scale, self.shift = {}, {}
        for site in scale:
            w = torch.as_tensor(scale[site]).detach().to("cpu", torch.float32).contiguous()
            b = torch.as_tensor(shift[site]).detach().to("cpu", torch.float32).contiguous()
            if w.ndim != 1 or w.shape != b.shape:
                raise SteeringError(f"site {site!r}: scale {tuple(w.shape)} and shift {tuple(b.shape)} must be equal 1-D")
            if not (torch.isfinite(w).all() and torch.isfinite(b).all()):
                raise SteeringError(f"site {site!r}: scale/shift contain NaN or inf")
            self.scale[site], self.shift[site] = w, b
        self.support = {}
        for site, bounds in (support or {}).items():
            if site not in self.scale:
                raise SteeringError(f"support given for site {site!r}, which has no scale/shift")
            try:
                lo, hi = (torch.as_tensor(t).detach().to("cpu", torch.float32).contiguous() for t in bounds)
            except (TypeError, ValueError):
                raise SteeringError(f"site {site!r}: support must be a (lo, hi) pair of tensors") from None
            if lo.shape != self.scale[site].shape or hi.shape != lo.shape:
                raise SteeringError(f"site {site!r}: support bounds {tuple(lo.shape)}/{tuple(hi.shape)} must "
                                    f"match the width {tuple(self.scale[site].shape)}")
            if lo.isnan().any() or hi.isnan().any() or (lo > hi).any():
                raise SteeringError(f"site {site!r}: support bounds must be non-NaN with lo <= hi")
            self.support[site] = (lo, hi)
        meta = dict(meta or {})
        meta.setdefault("method", "custom")
        meta.setdefault("model_type", "")
        meta.setdefault("model_class", "")
        meta.setdefault("name_or_path", "")
        meta.setdefault("hyperparams", {})
        meta["widths"] = {s: int(self.scale[s].numel()) for s in self.scale}
        meta["library_version"] = meta.get("library_version", __version__)
        meta["format_version"] = FORMAT_VERSION
        self.meta = meta

    @property
    def sites(self) -> list[str]:
        return list(self.scale)

    def nnz(self, site: str | None = None) -> int:
        """Entries off identity: each ω_i ≠ 1 and each b_i ≠ 0 counts one (at most 2d per site)."""
        keys = [site] if site is not None else self.sites
        return int(sum(int((self.scale[s] != 1).sum() + (self.shift[s] != 0).sum()) for s in keys))

    @property
    def clamped(self) -> list[str]:
        """Sites whose map only applies inside a support (see the class docstring)."""
        return list(self.support)

    def active_sites(self) -> list[str]:
        """Sites whose map is not exactly the identity."""
        return [s for s in self.sites if self.nnz(s) > 0]

    def __repr__(self) -> str:
        return (f"Steering(method={self.meta['method']!r}, model_type={self.meta['model_type']!r}, "
                f"sites={len(self.sites)}, nnz={self.nnz()}"
                + (f", clamped={len(self.support)}" if self.support else "") + ")")

    # ---------------------------------------------------------------- persistence
    def save(self, path: str | os.PathLike) -> None:
        """Write ``path`` as safetensors: tensors ``scale/<site>``, ``shift/<site>``; meta JSON in the header."""
        from safetensors.torch import save_file

        tensors = {}
        for s in self.sites:
            tensors[f"scale/{s}"] = self.scale[s]
            tensors[f"shift/{s}"] = self.shift[s]
        for s, (lo, hi) in self.support.items():
            tensors[f"support_lo/{s}"], tensors[f"support_hi/{s}"] = lo, hi
        header = {"lineas_fast": json.dumps(self.meta), "sites": json.dumps(self.sites),
                  "support_sites": json.dumps(self.clamped)}
        save_file(tensors, os.fspath(path), metadata=header)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(path, 0o666 & ~umask)  # safetensors writes 0600; a steering file is a normal shareable file

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Steering":
        """Read a file written by :meth:`save`, strictly (format: :mod:`lineas_fast.artifact`).

        A missing, truncated, garbled or foreign file — or one whose tensors, dtypes, shapes or metadata
        disagree with the format — raises :class:`ArtifactError` naming the file and the problem.
        """
        from .artifact import read_artifact

        meta, sites, clamped, t = read_artifact(path, FORMAT_VERSION, REQUIRED_META)
        try:
            return cls({s: t[f"scale/{s}"] for s in sites}, {s: t[f"shift/{s}"] for s in sites}, meta,
                       {s: (t[f"support_lo/{s}"], t[f"support_hi/{s}"]) for s in clamped})
        except SteeringError as e:
            raise ArtifactError(f"steering file {os.fspath(path)!r}: {e}") from None

    # ---------------------------------------------------------------- checks against a model
    def check_model(self, model) -> None:
        """Raise :class:`SteeringError` unless this artifact fits ``model`` (type, sites, widths)."""
        from .sites import check_sites
        from .sites import site_widths

        mtype = getattr(model.config, "model_type", "")
        if self.meta["model_type"] and self.meta["model_type"] != mtype:
            raise SteeringError(
                f"steering was fitted on model_type {self.meta['model_type']!r}, this model is {mtype!r}")
        check_sites(model, self.sites)
        widths = site_widths(model, self.sites)
        bad = {s: (self.meta["widths"][s], widths[s]) for s in self.sites if widths[s] != self.meta["widths"][s]}
        if bad:
            s, (mine, theirs) = next(iter(bad.items()))
            raise SteeringError(f"width mismatch at site {s!r}: steering has {mine}, model has {theirs}"
                                + (f" (+{len(bad) - 1} more sites)" if len(bad) > 1 else ""))


def compose(*steerings: Steering) -> Steering:
    """One Steering equal to applying ``steerings`` in order (each at strength 1).

    Per site, ``st1`` then ``st2`` is ``h ← ω2⊙(ω1⊙h + b1) + b2``: one table entry with ``ω = ω2⊙ω1``,
    ``b = ω2⊙b1 + b2``; a site only one of them steers keeps that map. At strength λ the result
    interpolates the *composed* map (not each map at λ). Support-clamped maps do not compose into one
    affine map and are refused, as are steerings for different models or widths.
    """
    if len(steerings) < 1 or not all(isinstance(st, Steering) for st in steerings):
        raise SteeringError("compose() takes one or more Steering objects")
    first = steerings[0]
    for k, st in enumerate(steerings):
        if st.clamped:
            raise SteeringError(f"compose(): steering {k} has support-clamped sites {st.clamped[:3]}: not affine")
        if st.meta["model_type"] != first.meta["model_type"]:
            raise SteeringError(f"compose(): steering {k} is for model_type {st.meta['model_type']!r}, "
                                f"steering 0 for {first.meta['model_type']!r}")
    scale: dict = {}
    shift: dict = {}
    for k, st in enumerate(steerings):
        for site in st.sites:
            w, b = st.scale[site], st.shift[site]
            if site in scale:
                if scale[site].shape != w.shape:
                    raise SteeringError(f"compose(): site {site!r} has width {w.numel()} in steering {k}, "
                                        f"{scale[site].numel()} before")
                scale[site], shift[site] = w * scale[site], w * shift[site] + b
            else:
                scale[site], shift[site] = w.clone(), b.clone()
    meta = {"method": "composed", "model_type": first.meta["model_type"], "model_class": first.meta["model_class"],
            "name_or_path": first.meta["name_or_path"],
            "hyperparams": {"parts": [{"method": st.meta["method"], "hyperparams": st.meta["hyperparams"]}
                                      for st in steerings]}}
    return Steering(scale, shift, meta)
