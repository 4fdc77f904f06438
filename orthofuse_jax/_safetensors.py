"""Safetensors files and the reference adapter format on the host, with numpy alone (no JAX).

The command line reads its input files with this module while JAX is still being imported; the
JAX side (:mod:`orthofuse_jax.fusion.io`) turns the arrays into adapters. Reading is strict:
every problem raises :class:`AdapterFileError` (a ``ValueError``) with a one-line message naming
the file and the key. The container (8-byte little-endian header length, JSON header, data) is
parsed here, so that any corruption maps to a clean error instead of a panic in a native extension.
"""

from __future__ import annotations

import json
import math
import os
import struct
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import NamedTuple

import numpy as np

__all__ = [
    "MONARCH",
    "SCALE_NAME",
    "SKEW_TOL",
    "AdapterFileError",
    "NonSkewWarning",
    "ReferenceArrays",
    "SafetensorsFile",
    "header_bytes",
    "is_lycoris_keys",
    "is_peft_keys",
    "read_adapter_file",
    "read_reference",
    "read_tensors",
    "scale_key",
]

SKEW_TOL = 1e-6
"""Relative asymmetry ``max|A + A^T| / max(1, max|A|)`` above which raw parameters are projected (with a warning)."""

# GS layer name suffix -> the scale vector that the reference processor applies after it.
SCALE_NAME = {
    "to_q_moft": "q_scale",
    "to_k_moft": "k_scale",
    "to_v_moft": "v_scale",
    "to_out_moft": "out_scale",
}

MONARCH = ".ort_monarch."
_SCALE_TO_LAYER = {v: k for k, v in SCALE_NAME.items()}
_DTYPES = {
    "F32": (np.float32, 4),
    "F64": (np.float64, 8),
    "F16": (np.float16, 2),
    "BF16": (np.uint16, 2),
}
_MAX_HEADER = 100 * 1024 * 1024


class AdapterFileError(ValueError):
    """An adapter file cannot be read or written; the message names the file (and key)."""


class NonSkewWarning(UserWarning):
    """Raw Cayley parameters were not skew-symmetric and have been projected to their skew part."""


# ----------------------------------------------------------------------------------------------
# safetensors container


class SafetensorsFile:
    """An open safetensors file whose header is parsed and checked; tensors are read on demand.

    Every problem raises :class:`AdapterFileError` naming the file (and key): an unreadable or
    truncated file, a corrupt header, a dtype other than F32/F64/F16/BF16, data offsets that
    disagree with the shape, run past the end of the file or overlap another key's data.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = path = Path(path)
        try:
            self._file = open(path, "rb")
        except OSError as e:
            raise AdapterFileError(f"{path}: cannot read file ({e.strerror or e})") from None
        try:
            self._parse()
        except BaseException:
            self._file.close()
            raise

    def _parse(self) -> None:
        path = self.path
        try:
            size = os.fstat(self._file.fileno()).st_size
            first = self._file.read(8)
        except OSError as e:
            raise AdapterFileError(f"{path}: cannot read file ({e.strerror or e})") from None
        if len(first) < 8:
            raise AdapterFileError(
                f"{path}: not a safetensors file (only {size} bytes, truncated?)"
            )
        (n,) = struct.unpack("<Q", first)
        if n > _MAX_HEADER or 8 + n > size:
            raise AdapterFileError(
                f"{path}: not a safetensors file or truncated (header length {n}, file {size} bytes)"
            )
        try:
            header = json.loads(self._file.read(n).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise AdapterFileError(
                f"{path}: corrupt safetensors header ({type(e).__name__}: {e})"
            ) from None
        if not isinstance(header, dict):
            raise AdapterFileError(f"{path}: corrupt safetensors header (not a JSON object)")
        meta = header.pop("__metadata__", None) or {}
        if not isinstance(meta, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in meta.items()
        ):
            raise AdapterFileError(
                f"{path}: corrupt safetensors header (__metadata__ must map strings to strings)"
            )
        self.metadata: dict[str, str] = dict(meta)
        self._start, available = 8 + n, size - 8 - n
        self.entries: dict[str, tuple[str, tuple[int, ...], int]] = {}
        spans = []
        for key, info in header.items():
            where = f"{path}: key {key!r}"
            if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
                raise AdapterFileError(f"{where}: corrupt header entry {str(info)[:80]}")
            dt, shape, offs = info["dtype"], info["shape"], info["data_offsets"]
            if not isinstance(dt, str) or dt not in _DTYPES:
                raise AdapterFileError(
                    f"{where}: unsupported dtype {str(dt)[:20]!r} (expected a float type, e.g. F32)"
                )
            if not isinstance(shape, list) or not all(
                isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape
            ):
                raise AdapterFileError(f"{where}: corrupt shape {shape!r}")
            if (
                not isinstance(offs, list)
                or len(offs) != 2
                or not all(isinstance(o, int) and not isinstance(o, bool) for o in offs)
                or not 0 <= offs[0] <= offs[1]
            ):
                raise AdapterFileError(f"{where}: corrupt data_offsets {offs!r}")
            itemsize = _DTYPES[dt][1]
            count = math.prod(shape)
            if offs[1] - offs[0] != count * itemsize:
                raise AdapterFileError(
                    f"{where}: data_offsets {offs} hold {offs[1] - offs[0]} bytes, shape {shape} {dt} needs "
                    f"{count * itemsize}"
                )
            if offs[1] > available:
                raise AdapterFileError(
                    f"{where}: data ends at byte {offs[1]} but the file has {available} (truncated)"
                )
            spans.append((offs[0], offs[1], key))
            self.entries[key] = (dt, tuple(shape), offs[0])
        spans.sort()
        for (a0, a1, ka), (b0, b1, kb) in zip(spans, spans[1:]):
            if b0 < a1 and b1 > b0 and a1 > a0:
                raise AdapterFileError(f"{path}: key {kb!r}: data overlaps key {ka!r}")

    def dtype(self, key: str) -> np.dtype:
        """The dtype ``read`` returns for ``key`` (F16 and BF16 widen to float32)."""
        dt = self.entries[key][0]
        return np.dtype(np.float32 if dt in ("F16", "BF16") else _DTYPES[dt][0])

    def read_into(self, key: str, out: np.ndarray) -> None:
        """Read ``key`` into the C-contiguous array ``out`` (its shape; converted to its dtype)."""
        dt, shape, offset = self.entries[key]
        raw_dtype = np.dtype(_DTYPES[dt][0]).newbyteorder("<")
        if out.dtype == raw_dtype and out.flags.c_contiguous:
            target = out  # straight from the file, no copy
        else:
            target = np.empty(shape, raw_dtype)
        view = target.data.cast("B")
        done = 0
        try:
            while done < len(view):
                got = os.preadv(self._file.fileno(), [view[done:]], self._start + offset + done)
                if got == 0:
                    raise AdapterFileError(
                        f"{self.path}: key {key!r}: file ended while reading (truncated?)"
                    )
                done += got
        except OSError as e:
            raise AdapterFileError(
                f"{self.path}: key {key!r}: cannot read ({e.strerror or e})"
            ) from None
        if target is out:
            return
        if dt == "BF16":
            target = (target.astype(np.uint32) << 16).view(np.float32)
        out[...] = target

    def read(self, key: str) -> np.ndarray:
        out = np.empty(self.entries[key][1], self.dtype(key))
        self.read_into(key, out)
        return out

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> SafetensorsFile:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def header_bytes(
    layout: Mapping[str, tuple[str, tuple[int, ...]]], metadata: Mapping[str, str] | None = None
) -> bytes:
    """The 8-byte length and the JSON header of a safetensors file whose tensors follow in the
    order of ``layout`` (``{key: (dtype, shape)}``, dtype one of F32/F64/F16/BF16), each stored
    contiguously after the one before. ``metadata`` entries join ``{"format": "pt"}``; the header is
    padded with spaces so that the data starts 8-byte aligned, as safetensors writes it."""
    header: dict[str, object] = {"__metadata__": {"format": "pt", **dict(metadata or {})}}
    offset = 0
    for key, (dtype, shape) in layout.items():
        size = _DTYPES[dtype][1] * math.prod(shape)
        header[key] = {
            "dtype": dtype,
            "shape": list(shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    head = json.dumps(header, separators=(",", ":")).encode("utf-8")
    head += b" " * (-(8 + len(head)) % 8)
    return struct.pack("<Q", len(head)) + head


def read_tensors(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Parse a safetensors file into ``({key: float array}, metadata)`` with strict checks.

    Floating dtypes F32/F64/F16/BF16 are accepted (BF16 and F16 are widened to float32); any
    other dtype, an inconsistent header, overlapping or out-of-range data offsets, or a truncated
    file raise :class:`AdapterFileError` naming the file and key.
    """
    with SafetensorsFile(path) as f:
        return {key: f.read(key) for key in f.entries}, f.metadata


class ReferenceArrays(NamedTuple):
    """A reference-format adapter on the host: ``stacks[(names...)] = {"L": [layers, nb, b, b], "R": ...}``
    (names sorted), ``scales[layer name] = [h]``, and the stacks' dtype."""

    stacks: dict[tuple[str, ...], dict[str, np.ndarray]]
    scales: dict[str, np.ndarray]
    dtype: np.dtype


def scale_key(layer: str) -> str:
    """The key of ``layer``'s scale vector (``<processor>.q_scale`` for ``<processor>.to_q_moft``)."""
    head, _, last = layer.rpartition(".")
    if last in SCALE_NAME and head:
        return f"{head}.{SCALE_NAME[last]}"
    return f"{layer}.scale"


def _layer_of_scale_key(key: str) -> str | None:
    head, _, last = key.rpartition(".")
    if last in _SCALE_TO_LAYER and head:
        return f"{head}.{_SCALE_TO_LAYER[last]}"
    if last == "scale" and head:
        return head
    return None


def _first_non_finite(path, keyed: Mapping[str, np.ndarray]) -> None:
    """Raise naming the first key (sorted) of ``keyed`` whose array holds a non-finite value."""
    for key in sorted(keyed):
        arr = keyed[key]
        bad = ~np.isfinite(arr)
        if bad.any():
            idx = tuple(int(i) for i in np.argwhere(bad)[0])
            raise AdapterFileError(
                f"{path}: key {key!r}: {int(bad.sum())} non-finite value(s), first {arr[idx]!r} at index {idx}"
            )


def _checked_stack(path, stack: np.ndarray, keys: list[str], tol: float) -> np.ndarray:
    """``stack [layers, nb, b, b]`` checked layer by layer (``keys[i]`` names layer ``i``): a
    non-finite value raises, and a layer whose asymmetry exceeds ``tol`` is projected to its skew
    part with a warning. The checks run on chunks of about 1 MB, so their temporaries stay in cache."""
    n = stack.shape[0]
    sym, big = np.empty(n), np.empty(n)
    step = max(1, 2**20 // max(1, stack[0].nbytes))
    for i in range(0, n, step):
        part = stack[i : i + step]
        sym[i : i + step] = np.abs(part + np.swapaxes(part, -1, -2)).max(
            axis=(1, 2, 3), initial=0.0
        )
        big[i : i + step] = np.abs(part).max(
            axis=(1, 2, 3), initial=0.0
        )  # NaN or inf where not finite
    if not np.isfinite(big).all():
        _first_non_finite(path, {keys[i]: stack[i] for i in np.flatnonzero(~np.isfinite(big))})
    bad = np.flatnonzero(sym / np.maximum(1.0, big) > tol)
    if bad.size == 0:
        return stack
    stack = np.array(stack)
    for j in bad:
        warnings.warn(
            f"{path}: key {keys[j]!r}: raw Cayley parameters are not skew-symmetric "
            f"(max |A + A^T| = {float(sym[j]):.3g}); projected to the skew part (A - A^T)/2",
            NonSkewWarning,
            stacklevel=3,
        )
        stack[j] = 0.5 * (stack[j] - np.swapaxes(stack[j], -1, -2))
    return stack


def _aligned_empty(shape: tuple[int, ...], dtype, align: int = 64) -> np.ndarray:
    """``np.empty`` aligned to ``align`` bytes: JAX's CPU client adopts such memory without a copy."""
    dtype = np.dtype(dtype)
    size = math.prod(shape) * dtype.itemsize
    raw = np.empty(size + align, np.uint8)
    start = -raw.ctypes.data % align
    return raw[start : start + size].view(dtype).reshape(shape)


def read_reference(
    source, layout: Mapping[str, tuple], fill, get, skew_tol: float = SKEW_TOL
) -> ReferenceArrays:
    """A reference-format adapter as checked host arrays, one per stack and side.

    ``layout``: ``{key: (shape, dtype)}``; ``fill(keys, out)`` writes the tensors ``keys`` into the
    rows of ``out``; ``get(key)`` returns one tensor. Keys and shapes are checked from ``layout``
    before any value is read; then each stack is filled (64-byte aligned, which JAX's CPU client
    adopts without a copy) and checked. Every problem raises :class:`AdapterFileError` naming
    ``source`` and the first bad key in sorted order.
    """
    halves: dict[str, dict[str, tuple]] = {}
    scale_keys: dict[str, str] = {}
    for key in sorted(layout):
        if MONARCH in key:
            layer, _, side = key.rpartition(MONARCH)
            if side not in ("L", "R") or not layer:
                raise AdapterFileError(
                    f"{source}: key {key!r}: unexpected key (expected ...ort_monarch.L or .R)"
                )
            halves.setdefault(layer, {})[side] = layout[key][0]
        elif (scaled := _layer_of_scale_key(key)) is not None:
            scale_keys[key] = scaled
        else:
            raise AdapterFileError(
                f"{source}: key {key!r}: unexpected key (expected <layer>.ort_monarch.L/R or <processor>.q_scale etc.)"
            )
    if not halves:
        raise AdapterFileError(
            f"{source}: no GS layers (no '...ort_monarch.L' keys) among {len(layout)} tensor(s)"
        )
    for layer, lr in halves.items():
        for side in ("L", "R"):
            if side not in lr:
                other = "R" if side == "L" else "L"
                raise AdapterFileError(
                    f"{source}: key {layer + MONARCH + side!r} is missing (its {other} is present)"
                )
        for side in ("L", "R"):
            shape = tuple(lr[side])
            if len(shape) != 3 or shape[1] != shape[2] or shape[0] < 1 or shape[1] < 1:
                raise AdapterFileError(
                    f"{source}: key {layer + MONARCH + side!r}: shape {list(shape)} is not [nb, b, b]"
                )
        if tuple(lr["L"]) != tuple(lr["R"]):
            raise AdapterFileError(
                f"{source}: key {layer + MONARCH + 'R'!r}: shape {list(lr['R'])} differs from L {list(lr['L'])}"
            )
    for key, layer in scale_keys.items():
        if layer not in halves:
            raise AdapterFileError(
                f"{source}: key {key!r}: scale vector without its layer {layer + MONARCH + 'L'!r}"
            )
        shape = tuple(layout[key][0])
        if len(shape) != 1 or shape[0] < 1:
            raise AdapterFileError(f"{source}: key {key!r}: shape {list(shape)} is not [h]")
    dtype = np.result_type(*[layout[k][1] for k in layout if k.endswith(MONARCH + "L")])
    groups: dict[tuple[int, ...], list[str]] = {}
    for layer in sorted(halves):
        groups.setdefault(tuple(halves[layer]["L"]), []).append(layer)
    stacks = {}
    for shape, names in groups.items():
        pair = {}
        for side in ("L", "R"):
            keys = [n + MONARCH + side for n in names]
            stack = _aligned_empty((len(names), *shape), dtype)
            fill(keys, stack)
            pair[side] = _checked_stack(source, stack, keys, skew_tol)
        stacks[tuple(names)] = pair
    scales = {k: get(k) for k in scale_keys}
    _first_non_finite(source, {k: v for k, v in scales.items() if not np.isfinite(v).all()})
    return ReferenceArrays(stacks, {scale_keys[k]: v for k, v in scales.items()}, dtype)


def is_lycoris_keys(keys) -> bool:
    """Whether tensor keys are those of a LyCORIS ``diag-oft`` or kohya OFT file (``...oft_blocks``)."""
    return any(k.endswith(".oft_blocks") for k in keys)


def is_peft_keys(keys) -> bool:
    """Whether tensor keys are those of a PEFT OFT adapter (``...oft_R.weight`` or ``...oft_r``)."""
    return any(k.endswith((".oft_R.weight", ".oft_r")) for k in keys)


def read_adapter_file(
    path: str | os.PathLike, skew_tol: float = SKEW_TOL
) -> ReferenceArrays | None:
    """A reference-format file (or ``adapter_model.safetensors`` of a folder) read straight into one
    array per stack; ``None`` for a PEFT OFT or LyCORIS/kohya OFT file, which
    :func:`orthofuse_jax.fusion.load_adapter` reads."""
    path = Path(path)
    file = path / "adapter_model.safetensors" if path.is_dir() else path
    with SafetensorsFile(file) as f:
        if is_peft_keys(f.entries) or any(k.endswith(".oft_blocks") for k in f.entries):
            return None  # PEFT OFT or LyCORIS/kohya OFT
        layout = {k: (f.entries[k][1], f.dtype(k)) for k in f.entries}

        def fill(keys, out):
            for i, key in enumerate(keys):
                f.read_into(key, out[i])

        return read_reference(str(file), layout, fill, f.read, skew_tol)
