"""Reference checkpoint I/O: safetensors files of GS adapters (SPEC 5).

File format (what the reference's ``unet.save_attn_procs`` writes and loads)::

    <processor>.to_q_moft.ort_monarch.L      float32 [nb, b, b]   raw Cayley parameters
    <processor>.to_q_moft.ort_monarch.R      float32 [nb, b, b]
    <processor>.q_scale                      float32 [h]          (k/v/out likewise)
    metadata {"format": "pt"}

``<processor>`` is a diffusers attention-processor name ending in ``.processor``. A layer's name
here is the key up to ``.ort_monarch`` (``<processor>.to_q_moft``); its scale vector is stored
under ``adapter.scales[layer name]``. Layers whose last name component is not one of
``to_{q,k,v,out}_moft`` keep their scale under ``<layer>.scale`` (a generic extension; such
layers never occur in reference files).

Merged adapters hold orthogonal blocks ``Y``; they are written as raw parameters
``invCay(Y)`` so that the reference's ``method="cayley"`` (``Cay(A) = (I+S)(I-S)^{-1}``)
reproduces ``Y`` (up to float32 rounding; blocks need rotation angles below pi, which every
principal-log merge guarantees).

Reading is strict: every problem raises :class:`AdapterFileError` (a ``ValueError``) with a
one-line message naming the file and the key. The only repaired problem is raw parameters
that are not skew-symmetric: they are projected to their skew part (the only part the
reference uses) with a warning naming the key and the asymmetry. The safetensors container
is parsed here (8-byte little-endian header length, JSON header, data) so that any
corruption maps to a clean error instead of a panic in a native extension.
"""

from __future__ import annotations

import json
import math
import os
import struct
import tempfile
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np

from .adapter import SCALE_NAME, GSAdapter, check_compatible, from_layers, to_cayley_params, to_layers

__all__ = [
    "atomic_write_bytes",
    "AdapterFileError",
    "NonSkewWarning",
    "load_adapter",
    "read_tensors",
    "adapter_from_tensors",
    "adapter_to_tensors",
    "save_adapter",
    "save_tensors",
    "check_output_path",
    "check_pair",
    "SKEW_TOL",
]

SKEW_TOL = 1e-6
"""Relative asymmetry ``max|A + A^T| / max(1, max|A|)`` above which raw parameters are projected (with a warning)."""

_MONARCH = ".ort_monarch."
_SCALE_TO_LAYER = {v: k for k, v in SCALE_NAME.items()}
_DTYPES = {"F32": (np.float32, 4), "F64": (np.float64, 8), "F16": (np.float16, 2), "BF16": (np.uint16, 2)}
_MAX_HEADER = 100 * 1024 * 1024


class AdapterFileError(ValueError):
    """An adapter file cannot be read or written; the message names the file (and key)."""


class NonSkewWarning(UserWarning):
    """Raw Cayley parameters were not skew-symmetric and have been projected to their skew part."""


# ----------------------------------------------------------------------------------------------
# safetensors container


def read_tensors(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Parse a safetensors file into ``({key: float array}, metadata)`` with strict checks.

    Floating dtypes F32/F64/F16/BF16 are accepted (BF16 and F16 are widened to float32);
    any other dtype, an inconsistent header, overlapping or out-of-range data offsets, or a
    truncated file raise :class:`AdapterFileError` naming the file and key.
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise AdapterFileError(f"{path}: cannot read file ({e.strerror or e})") from None
    if len(raw) < 8:
        raise AdapterFileError(f"{path}: not a safetensors file (only {len(raw)} bytes, truncated?)")
    (n,) = struct.unpack("<Q", raw[:8])
    if n > _MAX_HEADER or 8 + n > len(raw):
        raise AdapterFileError(f"{path}: not a safetensors file or truncated (header length {n}, file {len(raw)} bytes)")
    try:
        header = json.loads(raw[8 : 8 + n].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise AdapterFileError(f"{path}: corrupt safetensors header ({type(e).__name__}: {e})") from None
    if not isinstance(header, dict):
        raise AdapterFileError(f"{path}: corrupt safetensors header (not a JSON object)")
    meta = header.pop("__metadata__", None) or {}
    if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise AdapterFileError(f"{path}: corrupt safetensors header (__metadata__ must map strings to strings)")
    data = memoryview(raw)[8 + n :]
    tensors: dict[str, np.ndarray] = {}
    spans = []
    for key, info in header.items():
        where = f"{path}: key {key!r}"
        if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
            raise AdapterFileError(f"{where}: corrupt header entry {str(info)[:80]}")
        dt, shape, offs = info["dtype"], info["shape"], info["data_offsets"]
        if not isinstance(dt, str) or dt not in _DTYPES:
            raise AdapterFileError(f"{where}: unsupported dtype {str(dt)[:20]!r} (expected a float type, e.g. F32)")
        if not isinstance(shape, list) or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape):
            raise AdapterFileError(f"{where}: corrupt shape {shape!r}")
        if (
            not isinstance(offs, list)
            or len(offs) != 2
            or not all(isinstance(o, int) and not isinstance(o, bool) for o in offs)
            or not 0 <= offs[0] <= offs[1]
        ):
            raise AdapterFileError(f"{where}: corrupt data_offsets {offs!r}")
        np_dt, size = _DTYPES[dt]
        count = math.prod(shape)
        if offs[1] - offs[0] != count * size:
            raise AdapterFileError(
                f"{where}: data_offsets {offs} hold {offs[1] - offs[0]} bytes, shape {shape} {dt} needs {count * size}"
            )
        if offs[1] > len(data):
            raise AdapterFileError(f"{where}: data ends at byte {offs[1]} but the file has {len(data)} (truncated)")
        spans.append((offs[0], offs[1], key))
        arr = np.frombuffer(data[offs[0] : offs[1]], dtype=np.dtype(np_dt).newbyteorder("<")).reshape(shape)
        if dt == "BF16":
            arr = (arr.astype(np.uint32) << 16).view(np.float32)
        elif dt == "F16":
            arr = arr.astype(np.float32)
        tensors[key] = np.array(arr, dtype=arr.dtype.newbyteorder("="))
    spans.sort()
    for (a0, a1, ka), (b0, b1, kb) in zip(spans, spans[1:]):
        if b0 < a1 and b1 > b0 and a1 > a0:
            raise AdapterFileError(f"{path}: key {kb!r}: data overlaps key {ka!r}")
    return tensors, dict(meta)


def atomic_write_bytes(path: str | os.PathLike, payload: bytes) -> None:
    """Write ``payload`` to ``path`` atomically: temp file in the same directory, fsync, ``os.replace``."""
    path = Path(path)
    directory = path.parent if str(path.parent) else Path(".")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the file ordinary permissions
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def save_tensors(path: str | os.PathLike, tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str] | None = None) -> None:
    """Atomically write float32 ``tensors`` as safetensors (temp file in the same directory + ``os.replace``)."""
    from safetensors.numpy import save

    path = Path(path)
    meta = {"format": "pt", **dict(metadata or {})}
    payload = save({k: np.ascontiguousarray(v, dtype=np.float32) for k, v in tensors.items()}, metadata=meta)
    try:
        atomic_write_bytes(path, payload)
    except OSError as e:
        raise AdapterFileError(f"{path}: cannot write file ({e.strerror or e})") from None


# ----------------------------------------------------------------------------------------------
# tensors <-> adapters


def _scale_key(layer: str) -> str:
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


def _check_finite(path, key, arr) -> None:
    bad = ~np.isfinite(arr)
    if bad.any():
        idx = tuple(int(i) for i in np.argwhere(bad)[0])
        raise AdapterFileError(
            f"{path}: key {key!r}: {int(bad.sum())} non-finite value(s), first {arr[idx]!r} at index {idx}"
        )


def _skew_or_warn(path, key, arr: np.ndarray, tol: float) -> np.ndarray:
    sym = arr + np.swapaxes(arr, -1, -2)
    asym = float(np.max(np.abs(sym))) if sym.size else 0.0
    rel = asym / max(1.0, float(np.max(np.abs(arr))) if arr.size else 1.0)
    if rel > tol:
        warnings.warn(
            f"{path}: key {key!r}: raw Cayley parameters are not skew-symmetric "
            f"(max |A + A^T| = {asym:.3g}); projected to the skew part (A - A^T)/2",
            NonSkewWarning,
            stacklevel=3,
        )
        return 0.5 * (arr - np.swapaxes(arr, -1, -2))
    return arr


def adapter_from_tensors(
    tensors: Mapping[str, np.ndarray], *, source: str = "<tensors>", skew_tol: float = SKEW_TOL
) -> GSAdapter:
    """Build a raw-parameter :class:`GSAdapter` from reference-format ``{key: array}`` (checks as :func:`load_adapter`)."""
    halves: dict[str, dict[str, np.ndarray]] = {}
    scales: dict[str, np.ndarray] = {}
    for key in sorted(tensors):
        arr = tensors[key]
        if _MONARCH in key:
            layer, _, side = key.rpartition(_MONARCH)
            if side not in ("L", "R") or not layer:
                raise AdapterFileError(f"{source}: key {key!r}: unexpected key (expected ...ort_monarch.L or .R)")
            halves.setdefault(layer, {})[side] = arr
        elif _layer_of_scale_key(key) is not None:
            scales[key] = arr
        else:
            raise AdapterFileError(
                f"{source}: key {key!r}: unexpected key (expected <layer>.ort_monarch.L/R or <processor>.q_scale etc.)"
            )
    if not halves:
        raise AdapterFileError(f"{source}: no GS layers (no '...ort_monarch.L' keys) among {len(tensors)} tensor(s)")
    layers = {}
    for layer, lr in halves.items():
        for side in ("L", "R"):
            if side not in lr:
                other = "R" if side == "L" else "L"
                raise AdapterFileError(
                    f"{source}: key {layer + _MONARCH + side!r} is missing (its {other} is present)"
                )
        for side in ("L", "R"):
            key = layer + _MONARCH + side
            a = lr[side]
            if a.ndim != 3 or a.shape[1] != a.shape[2] or a.shape[0] < 1 or a.shape[1] < 1:
                raise AdapterFileError(f"{source}: key {key!r}: shape {list(a.shape)} is not [nb, b, b]")
        if lr["L"].shape != lr["R"].shape:
            raise AdapterFileError(
                f"{source}: key {layer + _MONARCH + 'R'!r}: shape {list(lr['R'].shape)} differs from L "
                f"{list(lr['L'].shape)}"
            )
        pair = []
        for side in ("L", "R"):
            key = layer + _MONARCH + side
            _check_finite(source, key, lr[side])
            pair.append(_skew_or_warn(source, key, lr[side], skew_tol))
        layers[layer] = tuple(pair)
    scale_vecs = {}
    for key, arr in scales.items():
        layer = _layer_of_scale_key(key)
        if layer not in layers:
            raise AdapterFileError(f"{source}: key {key!r}: scale vector without its layer {layer + _MONARCH + 'L'!r}")
        if arr.ndim != 1 or arr.shape[0] < 1:
            raise AdapterFileError(f"{source}: key {key!r}: shape {list(arr.shape)} is not [h]")
        _check_finite(source, key, arr)
        scale_vecs[layer] = arr
    dtype = np.result_type(*[p[0].dtype for p in layers.values()])
    return from_layers(layers, scale_vecs, orthogonal=False, dtype=dtype)


def adapter_to_tensors(adapter: GSAdapter) -> dict[str, np.ndarray]:
    """Reference-format ``{key: float32 array}``; orthogonal adapters become ``invCay`` raw parameters."""
    raw = to_cayley_params(adapter)
    out: dict[str, np.ndarray] = {}
    for name, (L, R) in to_layers(raw).items():
        out[name + _MONARCH + "L"] = np.asarray(L, dtype=np.float32)
        out[name + _MONARCH + "R"] = np.asarray(R, dtype=np.float32)
    for name, s in adapter.scales.items():
        out[_scale_key(name)] = np.asarray(s, dtype=np.float32)
    for key, arr in out.items():
        bad = ~np.isfinite(arr)
        if bad.any():
            raise ValueError(
                f"key {key!r}: {int(bad.sum())} non-finite value(s) to be written (a block with an eigenvalue "
                "at -1 has no Cayley parameters); nothing written"
            )
    return out


def load_adapter(path: str | os.PathLike, *, skew_tol: float = SKEW_TOL) -> GSAdapter:
    """Read a reference-format adapter file (SPEC 5) as raw Cayley parameters.

    Args:
      path: a ``.safetensors`` file as written by the reference's ``save_attn_procs``.
      skew_tol: relative asymmetry above which raw parameters are projected with a warning.
    Returns:
      ``GSAdapter(orthogonal=False)`` in the file's float dtype (float32 for reference files),
      layers named by the key prefix up to ``.ort_monarch``, scales keyed by layer name.
    Raises:
      AdapterFileError: naming the file and key: unreadable or truncated file, missing or
        extra keys, bad shapes, non-finite values.
    """
    tensors, _ = read_tensors(path)
    return adapter_from_tensors(tensors, source=str(path), skew_tol=skew_tol)


def check_output_path(out: str | os.PathLike, inputs: Iterable[str | os.PathLike] = ()) -> Path:
    """Refuse an output path equal to an input (also through symlinks / hard links) or a directory."""
    out = Path(out)
    for inp in inputs:
        inp = Path(inp)
        same = os.path.abspath(out) == os.path.abspath(inp)
        if not same and out.exists() and inp.exists():
            try:
                same = os.path.samefile(out, inp)
            except OSError:
                same = False
        if not same and os.path.realpath(out) == os.path.realpath(inp):
            same = True
        if same:
            raise AdapterFileError(f"{out}: output path is the input file {inp}; refusing to overwrite an input")
    if out.is_dir():
        raise AdapterFileError(f"{out}: output path is a directory")
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        raise AdapterFileError(f"{out}: output directory {parent} does not exist")
    return out


def save_adapter(
    path: str | os.PathLike,
    adapter: GSAdapter,
    *,
    metadata: Mapping[str, str] | None = None,
    inputs: Iterable[str | os.PathLike] = (),
) -> Path:
    """Write ``adapter`` in the reference format, atomically, never over one of ``inputs``.

    Orthogonal (merged) adapters are stored as ``invCay`` of their blocks (module docstring).
    ``metadata`` entries are added to ``{"format": "pt"}``. Nothing is written when a value
    is non-finite or the path is refused.
    """
    path = check_output_path(path, inputs)
    try:
        tensors = adapter_to_tensors(adapter)
    except ValueError as e:
        raise AdapterFileError(f"{path}: {e}") from None
    save_tensors(path, tensors, metadata)
    return path


def check_pair(adapters: Iterable[GSAdapter], paths: Iterable[str | os.PathLike]) -> None:
    """:func:`adapter.check_compatible` with the files' names in the message, as :class:`AdapterFileError`."""
    try:
        check_compatible(list(adapters), [str(p) for p in paths])
    except ValueError as e:
        raise AdapterFileError(str(e)) from None
