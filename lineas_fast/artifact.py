"""The steering file format, read strictly (``Steering.load`` is the only caller).

A steering file is plain safetensors: an 8-byte little-endian header length N, N bytes of JSON, then
the tensor data. The JSON maps each tensor name to ``{"dtype", "shape", "data_offsets"}`` and carries
``__metadata__`` (strings only) with three entries:

* ``lineas_fast``   — the :attr:`Steering.meta` JSON object: ``method``, ``model_type``, ``model_class``,
  ``name_or_path``, ``library_version`` (strings), ``hyperparams`` (object), ``widths``
  (``{site: int >= 0}``, one per site), ``format_version`` (integer 1..FORMAT_VERSION). Other fields are
  allowed and kept (``meta`` holds *at least* these).
* ``sites``         — JSON list of the site names, non-empty, no duplicates, in artifact order.
* ``support_sites`` — JSON list of the support-clamped sites, a subset of ``sites`` (optional: format-1
  files have none).

Tensors are exactly ``scale/<site>`` and ``shift/<site>`` for every site plus ``support_lo/<site>`` and
``support_hi/<site>`` for every clamped site, all F32 of shape ``[widths[site]]``; scale/shift finite,
support bounds non-NaN with ``lo <= hi``. The data regions tile the data section exactly (no holes,
overlaps or trailing bytes).

Everything is checked from the header alone — the declared offsets against the file size included —
before any tensor byte is read, so a garbled or hostile header (a claimed 100 GB tensor, a 2**62-byte
header) costs nothing. Any violation raises :class:`ArtifactError` naming the file and the problem.
Nothing is ever unpickled.
"""

from __future__ import annotations

import json
import math
import os

import numpy as np
import torch

from .errors import ArtifactError

MAX_HEADER_BYTES = 100 * 2**20   # safetensors' own limit
DTYPE_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2, "U16": 2, "F16": 2,
               "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}
HEADER_FIELDS = ("lineas_fast", "sites", "support_sites")   # support_sites: optional
META_TYPES = {"method": str, "model_type": str, "model_class": str, "name_or_path": str,
              "library_version": str, "hyperparams": dict, "widths": dict}
TENSOR_FIELDS = {"dtype", "shape", "data_offsets"}


def _no_duplicates(pairs):
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys):
        dup = next(k for k in keys if keys.count(k) > 1)
        raise ValueError(f"duplicate key {dup!r}")
    return dict(pairs)


def _refuse_constant(name):
    raise ValueError(f"{name} is not valid in a safetensors header")


def _json(text, what: str, strict: bool = False):
    try:
        return json.loads(text, object_pairs_hook=_no_duplicates,
                          **({"parse_constant": _refuse_constant} if strict else {}))
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise _Bad(f"{what} is not valid JSON ({str(e)[:120]})") from None


class _Bad(Exception):
    """Internal: what is wrong; read_artifact adds the file name."""


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _str_list(value, field: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(s, str) for s in value):
        raise _Bad(f"metadata {field!r} must be a JSON list of site names, got {str(value)[:80]}")
    if len(set(value)) != len(value):
        raise _Bad(f"metadata {field!r} names a site twice: {next(s for s in value if value.count(s) > 1)!r}")
    return value


def _parse_header(raw: bytes, size: int) -> tuple[dict, dict, int]:
    """(tensor entries, __metadata__, data section start) — structure and offsets checked against ``size``."""
    header = _json(raw, "the safetensors header", strict=True)
    if not isinstance(header, dict):
        raise _Bad(f"the safetensors header must be a JSON object, got {type(header).__name__}")
    metadata = header.pop("__metadata__", None)
    if metadata is None:
        raise _Bad("no lineas_fast metadata (not a steering file: its safetensors header has no __metadata__)")
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise _Bad("the safetensors __metadata__ must map names to strings")
    data_len = size - 8 - len(raw)
    spans = []
    for name, info in header.items():
        if not isinstance(info, dict) or set(info) != TENSOR_FIELDS:
            raise _Bad(f"tensor {name!r}: header entry must have exactly {sorted(TENSOR_FIELDS)}")
        dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if not isinstance(dtype, str) or dtype not in DTYPE_BYTES:
            raise _Bad(f"tensor {name!r}: unknown dtype {str(dtype)[:20]!r}")
        if not isinstance(shape, list) or len(shape) > 8 or not all(_is_int(d) and d >= 0 for d in shape):
            raise _Bad(f"tensor {name!r}: shape must be a list of non-negative integers, got {str(shape)[:60]}")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) for o in offsets)
                and 0 <= offsets[0] <= offsets[1]):
            raise _Bad(f"tensor {name!r}: data_offsets must be [begin, end] with 0 <= begin <= end, "
                       f"got {str(offsets)[:60]}")
        if offsets[1] - offsets[0] != math.prod(shape) * DTYPE_BYTES[dtype]:
            raise _Bad(f"tensor {name!r}: {dtype} {shape} needs {math.prod(shape) * DTYPE_BYTES[dtype]} bytes, "
                       f"its data_offsets span {offsets[1] - offsets[0]}")
        spans.append((offsets[0], offsets[1], name))
    end = max((e for _, e, _ in spans), default=0)
    if end > data_len:
        raise _Bad(f"truncated: the header declares {end} bytes of tensor data, the file holds {max(data_len, 0)}")
    pos = 0
    for begin, stop, name in sorted(spans):
        if begin != pos:
            raise _Bad(f"tensor {name!r}: data_offsets {'overlap' if begin < pos else 'leave a hole'} at byte {pos}")
        pos = stop
    if pos != data_len:
        raise _Bad(f"{data_len - pos} unexpected bytes after the last tensor")
    return header, metadata, 8 + len(raw)


def _check_meta(metadata: dict, format_version: int, required: tuple) -> tuple[dict, list, list]:
    unknown = sorted(set(metadata) - set(HEADER_FIELDS))
    if unknown:
        raise _Bad(f"unknown metadata entries {unknown[:5]} (expected {list(HEADER_FIELDS)})")
    if "lineas_fast" not in metadata or "sites" not in metadata:
        raise _Bad("no lineas_fast metadata (needs the 'lineas_fast' and 'sites' entries)")
    meta = _json(metadata["lineas_fast"], "metadata 'lineas_fast'")
    if not isinstance(meta, dict):
        raise _Bad(f"metadata 'lineas_fast' must be a JSON object, got {json.dumps(meta)[:40]}")
    missing = [k for k in required if k not in meta]
    if missing:
        raise _Bad(f"metadata lacks {missing}")
    version = meta["format_version"]
    if not _is_int(version):
        raise _Bad(f"metadata format_version must be an integer, got {json.dumps(version)[:40]}")
    if version > format_version:
        raise _Bad(f"format {version} is newer than this library's {format_version}: upgrade lineas_fast")
    if version < 1:
        raise _Bad(f"metadata format_version {version} is not a known format (1..{format_version})")
    for key, kind in META_TYPES.items():
        if not isinstance(meta[key], kind):
            raise _Bad(f"metadata {key!r} must be a JSON {'string' if kind is str else 'object'}, "
                       f"got {json.dumps(meta[key])[:40]}")
    sites = _str_list(_json(metadata["sites"], "metadata 'sites'"), "sites")
    if not sites:
        raise _Bad("metadata 'sites' is empty")
    clamped = _str_list(_json(metadata.get("support_sites", "[]"), "metadata 'support_sites'"), "support_sites")
    stray = [s for s in clamped if s not in sites]
    if stray:
        raise _Bad(f"metadata 'support_sites' names {stray[:3]}, which are not among its sites")
    widths = meta["widths"]
    if set(widths) != set(sites):
        odd = sorted(set(widths) ^ set(sites))
        raise _Bad(f"metadata widths cover other sites than its site list (differ on {odd[:3]})")
    bad = [s for s, w in widths.items() if not (_is_int(w) and w >= 0)]
    if bad:
        raise _Bad(f"metadata widths[{bad[0]!r}] must be a non-negative integer, got {json.dumps(widths[bad[0]])[:40]}")
    return meta, sites, clamped


def read_artifact(path, format_version: int, required: tuple) -> tuple[dict, list, list, dict]:
    """Validate and read a steering file: ``(meta, sites, support_sites, {tensor name: float32 tensor})``.

    Raises :class:`ArtifactError` (file name + problem) on anything but a well-formed artifact.
    """
    if not isinstance(path, (str, os.PathLike)):
        raise ArtifactError(f"a steering file path must be a str or os.PathLike, got {type(path).__name__}")
    path = os.fspath(path)
    if not os.path.exists(path):
        raise ArtifactError(f"steering file {path!r} does not exist")
    if not os.path.isfile(path):
        raise ArtifactError(f"steering file {path!r} is not a regular file")
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            prefix = f.read(8)
            if len(prefix) < 8:
                raise _Bad(f"truncated or not safetensors: {size} bytes, shorter than the 8-byte header length")
            n = int.from_bytes(prefix, "little")
            if n > min(size - 8, MAX_HEADER_BYTES) or n < 2:
                raise _Bad(f"corrupt or not safetensors: header length {n} does not fit a {size}-byte file")
            header, metadata, start = _parse_header(f.read(n), size)
            meta, sites, clamped = _check_meta(metadata, format_version, required)
            want = [f"{k}/{s}" for s in sites for k in ("scale", "shift")]
            want += [f"{k}/{s}" for s in clamped for k in ("support_lo", "support_hi")]
            missing = [t for t in want if t not in header]
            if missing:
                more = f" (+{len(missing) - 4} more)" if len(missing) > 4 else ""
                raise _Bad(f"tensor(s) {missing[:4]} missing{more}")
            extra = sorted(set(header) - set(want))
            if extra:
                raise _Bad(f"unknown tensor(s) {extra[:4]}: not named by its metadata")
            for name in want:
                site = name.split("/", 1)[1]
                dtype, shape = header[name]["dtype"], header[name]["shape"]
                if dtype != "F32":
                    raise _Bad(f"tensor {name!r} has dtype {dtype}; steering tensors are F32 (float32)")
                if shape != [meta["widths"][site]]:
                    raise _Bad(f"tensor {name!r} has shape {shape}, its metadata widths say [{meta['widths'][site]}]")
            f.seek(start)
            data = f.read(size - start)
            if len(data) != size - start:
                raise _Bad("truncated while reading (the file changed size)")
    except OSError as e:
        raise ArtifactError(f"steering file {path!r} cannot be read: {e}") from None
    except _Bad as e:
        raise ArtifactError(f"steering file {path!r}: {e}") from None
    tensors = {}
    for name in want:
        begin, end = header[name]["data_offsets"]
        n = (end - begin) // 4
        t = torch.from_numpy(np.frombuffer(data, dtype="<f4", count=n, offset=begin).astype(np.float32)) \
            if n else torch.empty(0)
        if name.split("/")[0] in ("scale", "shift") and not bool(torch.isfinite(t).all()):
            i = int((~torch.isfinite(t)).nonzero()[0])
            raise ArtifactError(f"steering file {path!r}: tensor {name!r} holds NaN or inf (first at index {i})")
        if name.startswith("support") and bool(t.isnan().any()):
            raise ArtifactError(f"steering file {path!r}: tensor {name!r} holds NaN")
        tensors[name] = t
    for s in clamped:
        if bool((tensors[f"support_lo/{s}"] > tensors[f"support_hi/{s}"]).any()):
            raise ArtifactError(f"steering file {path!r}: support bounds of site {s!r} have lo > hi")
    return meta, sites, clamped, tensors
