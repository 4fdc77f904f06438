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

import functools
import json
import math
import os
import struct
import tempfile
import warnings
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import BinaryIO

import jax
import jax.numpy as jnp
import numpy as np

from ..geometry import cpu_only, skew, solve_pd
from ..geometry._linalg import mm
from .adapter import SCALE_NAME, GSAdapter, check_compatible, from_stacks, on_cpu, to_cayley_params

__all__ = [
    "atomic_write",
    "atomic_write_bytes",
    "AdapterFileError",
    "NonSkewWarning",
    "load_adapter",
    "read_tensors",
    "adapter_from_tensors",
    "adapter_to_tensors",
    "save_adapter",
    "save_merged",
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


class _SafetensorsFile:
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
            raise AdapterFileError(f"{path}: not a safetensors file (only {size} bytes, truncated?)")
        (n,) = struct.unpack("<Q", first)
        if n > _MAX_HEADER or 8 + n > size:
            raise AdapterFileError(f"{path}: not a safetensors file or truncated (header length {n}, file {size} bytes)")
        try:
            header = json.loads(self._file.read(n).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise AdapterFileError(f"{path}: corrupt safetensors header ({type(e).__name__}: {e})") from None
        if not isinstance(header, dict):
            raise AdapterFileError(f"{path}: corrupt safetensors header (not a JSON object)")
        meta = header.pop("__metadata__", None) or {}
        if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
            raise AdapterFileError(f"{path}: corrupt safetensors header (__metadata__ must map strings to strings)")
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
            itemsize = _DTYPES[dt][1]
            count = math.prod(shape)
            if offs[1] - offs[0] != count * itemsize:
                raise AdapterFileError(
                    f"{where}: data_offsets {offs} hold {offs[1] - offs[0]} bytes, shape {shape} {dt} needs "
                    f"{count * itemsize}"
                )
            if offs[1] > available:
                raise AdapterFileError(f"{where}: data ends at byte {offs[1]} but the file has {available} (truncated)")
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
        view = memoryview(target).cast("B")
        done = 0
        try:
            while done < len(view):
                got = os.preadv(self._file.fileno(), [view[done:]], self._start + offset + done)
                if got == 0:
                    raise AdapterFileError(f"{self.path}: key {key!r}: file ended while reading (truncated?)")
                done += got
        except OSError as e:
            raise AdapterFileError(f"{self.path}: key {key!r}: cannot read ({e.strerror or e})") from None
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

    def __enter__(self) -> _SafetensorsFile:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_tensors(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Parse a safetensors file into ``({key: float array}, metadata)`` with strict checks.

    Floating dtypes F32/F64/F16/BF16 are accepted (BF16 and F16 are widened to float32); any
    other dtype, an inconsistent header, overlapping or out-of-range data offsets, or a truncated
    file raise :class:`AdapterFileError` naming the file and key.
    """
    with _SafetensorsFile(path) as f:
        return {key: f.read(key) for key in f.entries}, f.metadata


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], None]) -> None:
    """Write ``path`` atomically: ``write(f)`` into a temp file in the same folder, fsync, ``os.replace``.

    On any failure the temp file is removed and ``path`` is left as it was.
    """
    path = Path(path)
    directory = path.parent if str(path.parent) else Path(".")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the file ordinary permissions
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def atomic_write_bytes(path: str | os.PathLike, payload: bytes) -> None:
    """Write ``payload`` to ``path`` atomically (:func:`atomic_write`)."""
    atomic_write(path, lambda f: f.write(payload))


def save_tensors(path: str | os.PathLike, tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str] | None = None) -> None:
    """Atomically write ``tensors`` as float32 safetensors (temp file in the same folder + ``os.replace``).

    The header is built first and each tensor is then written straight from its array, so no
    second copy of the file is held in memory.
    """
    arrays = {k: np.ascontiguousarray(v, dtype="<f4") for k, v in tensors.items()}
    _write_float32(Path(path), {k: a.shape for k, a in arrays.items()}, arrays.values(), metadata)


def _write_float32(path: Path, shapes: Mapping[str, tuple[int, ...]], data: Iterable[np.ndarray], metadata) -> None:
    """Write a float32 safetensors file atomically: its header from ``shapes`` (keys in file
    order), then ``data``, the tensors' float32 bytes in that order in any number of pieces."""
    header: dict[str, object] = {"__metadata__": {"format": "pt", **dict(metadata or {})}}
    offset = 0
    for key, shape in shapes.items():
        size = 4 * math.prod(shape)
        header[key] = {"dtype": "F32", "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    head = json.dumps(header, separators=(",", ":")).encode("utf-8")
    head += b" " * (-len(head) % 8)  # the data starts 8-byte aligned, as safetensors writes it

    def write(f: BinaryIO) -> None:
        f.write(struct.pack("<Q", len(head)))
        f.write(head)
        for piece in data:
            f.write(memoryview(np.ascontiguousarray(piece, dtype="<f4")).cast("B"))

    try:
        atomic_write(path, write)
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
        sym[i : i + step] = np.abs(part + np.swapaxes(part, -1, -2)).max(axis=(1, 2, 3), initial=0.0)
        big[i : i + step] = np.abs(part).max(axis=(1, 2, 3), initial=0.0)  # NaN or inf where not finite
    if not np.isfinite(big).all():
        _first_non_finite(path, {keys[i]: stack[i] for i in np.flatnonzero(~np.isfinite(big))})
    bad = np.flatnonzero(sym / np.maximum(1.0, big) > tol)
    if bad.size == 0:
        return stack
    stack = np.array(stack)
    for i in bad:
        warnings.warn(
            f"{path}: key {keys[i]!r}: raw Cayley parameters are not skew-symmetric "
            f"(max |A + A^T| = {float(sym[i]):.3g}); projected to the skew part (A - A^T)/2",
            NonSkewWarning,
            stacklevel=3,
        )
        stack[i] = 0.5 * (stack[i] - np.swapaxes(stack[i], -1, -2))
    return stack


def adapter_from_tensors(
    tensors: Mapping[str, np.ndarray], *, source: str = "<tensors>", skew_tol: float = SKEW_TOL
) -> GSAdapter:
    """Build a raw-parameter :class:`GSAdapter` from reference-format ``{key: array}`` (checks as :func:`load_adapter`).

    Keys and shapes are checked key by key; the values are checked stack by stack, on the
    stacked arrays (finiteness, then skew symmetry), and a problem is reported for the first
    key in sorted order.
    """
    layout = {k: (np.shape(v), np.asarray(v).dtype) for k, v in tensors.items()}

    def fill(keys, out):
        np.stack([tensors[k] for k in keys], out=out, casting="same_kind")

    return _build_adapter(source, layout, fill, lambda k: np.asarray(tensors[k]), skew_tol)


def _aligned_empty(shape: tuple[int, ...], dtype, align: int = 64) -> np.ndarray:
    """``np.empty`` aligned to ``align`` bytes: JAX's CPU client adopts such memory without a copy."""
    dtype = np.dtype(dtype)
    size = math.prod(shape) * dtype.itemsize
    raw = np.empty(size + align, np.uint8)
    start = -raw.ctypes.data % align
    return raw[start : start + size].view(dtype).reshape(shape)


def _build_adapter(source, layout: Mapping[str, tuple], fill, get, skew_tol: float) -> GSAdapter:
    """The reference-format reader behind :func:`adapter_from_tensors` and :func:`load_adapter`.

    ``layout``: ``{key: (shape, dtype)}``; ``fill(keys, out)`` writes the tensors ``keys`` into the
    rows of ``out``; ``get(key)`` returns one tensor. Keys and shapes are checked from ``layout``
    before any value is read; then each stack is filled, checked and put on the device in turn,
    so one stack at a time is held twice.
    """
    halves: dict[str, dict[str, tuple]] = {}
    scale_keys: dict[str, str] = {}
    for key in sorted(layout):
        if _MONARCH in key:
            layer, _, side = key.rpartition(_MONARCH)
            if side not in ("L", "R") or not layer:
                raise AdapterFileError(f"{source}: key {key!r}: unexpected key (expected ...ort_monarch.L or .R)")
            halves.setdefault(layer, {})[side] = layout[key][0]
        elif _layer_of_scale_key(key) is not None:
            scale_keys[key] = _layer_of_scale_key(key)
        else:
            raise AdapterFileError(
                f"{source}: key {key!r}: unexpected key (expected <layer>.ort_monarch.L/R or <processor>.q_scale etc.)"
            )
    if not halves:
        raise AdapterFileError(f"{source}: no GS layers (no '...ort_monarch.L' keys) among {len(layout)} tensor(s)")
    for layer, lr in halves.items():
        for side in ("L", "R"):
            if side not in lr:
                other = "R" if side == "L" else "L"
                raise AdapterFileError(
                    f"{source}: key {layer + _MONARCH + side!r} is missing (its {other} is present)"
                )
        for side in ("L", "R"):
            shape = tuple(lr[side])
            if len(shape) != 3 or shape[1] != shape[2] or shape[0] < 1 or shape[1] < 1:
                raise AdapterFileError(f"{source}: key {layer + _MONARCH + side!r}: shape {list(shape)} is not [nb, b, b]")
        if tuple(lr["L"]) != tuple(lr["R"]):
            raise AdapterFileError(
                f"{source}: key {layer + _MONARCH + 'R'!r}: shape {list(lr['R'])} differs from L {list(lr['L'])}"
            )
    for key, layer in scale_keys.items():
        if layer not in halves:
            raise AdapterFileError(f"{source}: key {key!r}: scale vector without its layer {layer + _MONARCH + 'L'!r}")
        shape = tuple(layout[key][0])
        if len(shape) != 1 or shape[0] < 1:
            raise AdapterFileError(f"{source}: key {key!r}: shape {list(shape)} is not [h]")
    dtype = np.result_type(*[layout[k][1] for k in layout if k.endswith(_MONARCH + "L")])
    groups: dict[tuple[int, ...], list[str]] = {}
    for layer in sorted(halves):
        groups.setdefault(tuple(halves[layer]["L"]), []).append(layer)
    stacks = {}
    for shape, names in groups.items():
        pair = {}
        for side in ("L", "R"):
            keys = [n + _MONARCH + side for n in names]
            stack = _aligned_empty((len(names), *shape), dtype)
            fill(keys, stack)
            # On the CPU the device array takes over the (aligned) host memory instead of copying it.
            pair[side] = jax.device_put(_checked_stack(source, stack, keys, skew_tol))
            del stack
        stacks[tuple(names)] = pair
    scales = {k: get(k) for k in scale_keys}
    _first_non_finite(source, {k: v for k, v in scales.items() if not np.isfinite(v).all()})
    return from_stacks(stacks, {scale_keys[k]: v for k, v in scales.items()}, orthogonal=False, dtype=dtype)


def adapter_to_tensors(adapter: GSAdapter) -> dict[str, np.ndarray]:
    """Reference-format ``{key: float32 array}``; orthogonal adapters become ``invCay`` raw parameters.

    Each stack is copied to the host once; the per-layer arrays are views of those copies.
    """
    raw = to_cayley_params(adapter)
    out: dict[str, np.ndarray] = {}
    for stack in raw.stacks.values():
        L, R = (np.asarray(x, dtype=np.float32) for x in (stack.L, stack.R))
        for i, name in enumerate(stack.names):
            out[name + _MONARCH + "L"] = L[i]
            out[name + _MONARCH + "R"] = R[i]
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
    """Read an adapter file as raw Cayley parameters: the reference format, or PEFT OFT (detected from the keys).

    Args:
      path: a ``.safetensors`` file as written by the reference's ``save_attn_procs``, or a PEFT
        OFT ``adapter_model.safetensors`` or the folder holding it
        (:func:`~orthofuse_jax.fusion.peft.load_peft_oft`).
      skew_tol: relative asymmetry above which raw parameters are projected with a warning.
    Returns:
      ``GSAdapter(orthogonal=False)`` in the file's float dtype (float32 for reference files),
      layers named by the key prefix up to ``.ort_monarch``, scales keyed by layer name.
    Raises:
      AdapterFileError: naming the file and key: unreadable or truncated file, missing or
        extra keys, bad shapes, non-finite values.

    A reference file is read straight into one array per stack (no copy of the whole file is held).
    """
    path = Path(path)
    file = path / "adapter_model.safetensors" if path.is_dir() else path
    with _SafetensorsFile(file) as f:
        if any(k.endswith((".oft_R.weight", ".oft_r")) for k in f.entries):  # PEFT OFT
            from .peft import load_peft_oft

            return load_peft_oft(file, tensors={key: f.read(key) for key in f.entries})
        layout = {k: (f.entries[k][1], f.dtype(k)) for k in f.entries}

        def fill(keys, out):
            for i, key in enumerate(keys):
                f.read_into(key, out[i])

        return _build_adapter(str(file), layout, fill, f.read, skew_tol)


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

    Orthogonal (merged) adapters are stored as ``invCay`` of their blocks (module docstring),
    converted in chunks of about 4 MB as the file is written, so the converted adapter is never
    held whole. ``metadata`` entries are added to ``{"format": "pt"}``. Nothing is written when a
    value is non-finite or the path is refused.
    """
    path = check_output_path(path, inputs)
    _write_adapter(path, adapter, metadata, check=False)
    return path


def save_merged(
    path: str | os.PathLike,
    adapter: GSAdapter,
    *,
    metadata: Mapping[str, str] | None = None,
    inputs: Iterable[str | os.PathLike] = (),
    restore_eta=None,
) -> float:
    """:func:`save_adapter` for a merged (orthogonal) adapter that also checks it: returns the largest
    ``|U^T U - I|`` over its blocks (in their own precision), computed in the same chunked pass.

    ``restore_eta``: write ``Cay(eta U)`` instead of ``U`` -- the reference's ``curve_over_id``
    restoration, ``eta = f(t) / 2`` -- as its exact Cayley parameters ``eta skew(U)``, without
    forming the restored blocks or inverting them (the check is then of ``U``). Give ``U`` the
    merge without restoration (``restore="none"``).
    """
    if not adapter.orthogonal:
        raise ValueError("save_merged needs an adapter of orthogonal blocks (a merge's result)")
    path = check_output_path(path, inputs)
    return _write_adapter(path, adapter, metadata, check=True, eta=restore_eta)


_CHUNK_BYTES = 2**22


@functools.partial(jax.jit, static_argnames=("chunk", "check", "cpu"))
def _file_rows(x, start, eta, *, chunk: int, check: bool, cpu: bool):
    """Rows ``[start, start + chunk)`` of an orthogonal stack as float32 raw parameters: ``invCay(U)``,
    or for ``eta`` given those of ``Cay(eta U)``, ``eta skew(U)``; and (``check``) the largest
    ``|U^T U - I|`` of the rows."""
    u = jax.lax.dynamic_slice_in_dim(x, start, chunk)
    eye = jnp.eye(u.shape[-1], dtype=u.dtype)
    if eta is not None:
        params = (jnp.asarray(eta, u.dtype) * skew(u)).astype(jnp.float32)
    else:
        with cpu_only(cpu):
            params = skew(solve_pd(u + eye, u - eye)).astype(jnp.float32)
    err = jnp.max(jnp.abs(mm(jnp.swapaxes(u, -1, -2), u) - eye)) if check else jnp.zeros((), u.dtype)
    return params, err


def _write_adapter(path: Path, adapter: GSAdapter, metadata, *, check: bool, eta=None) -> float:
    """Keys stack by stack, side by side, then the scales; the rows converted chunk by chunk."""
    shapes: dict[str, tuple[int, ...]] = {}
    plan = []  # (stack, side, layers per chunk)
    for stack in adapter.stacks.values():
        row = math.prod(stack.L.shape[1:]) * 4
        for side in ("L", "R"):
            shapes.update({name + _MONARCH + side: tuple(stack.L.shape[1:]) for name in stack.names})
            plan.append((stack, side, max(1, min(len(stack.names), _CHUNK_BYTES // row))))
    scales = {_scale_key(n): np.ascontiguousarray(v, dtype="<f4") for n, v in adapter.scales.items()}
    shapes.update({k: v.shape for k, v in scales.items()})
    cpu = on_cpu(adapter)
    errors = []

    def rows():  # (keys, float32 rows) in file order; the next chunk is computed while one is written
        for stack, side, chunk in plan:
            x, n = getattr(stack, side), len(stack.names)
            keys = [name + _MONARCH + side for name in stack.names]
            if not adapter.orthogonal:
                yield keys, np.asarray(x, dtype=np.float32)
                continue
            starts = [min(i, n - chunk) for i in range(0, n, chunk)]
            pending = _file_rows(x, starts[0], eta, chunk=chunk, check=check, cpu=cpu)
            for i, start in enumerate(starts):
                params, err = pending
                if i + 1 < len(starts):
                    pending = _file_rows(x, starts[i + 1], eta, chunk=chunk, check=check, cpu=cpu)
                errors.append(err)
                done = i * chunk - start  # the last chunk may overlap the one before it
                yield keys[start + done : start + chunk], np.asarray(params)[done:]
        for key, arr in scales.items():
            yield [key], arr[None]

    def checked():
        for keys, data in rows():
            if not np.isfinite(data).all():
                bad = next(i for i in range(len(keys)) if not np.isfinite(data[i]).all())
                why = " (a block with an eigenvalue at -1 has no Cayley parameters)" if _MONARCH in keys[bad] else ""
                raise ValueError(f"key {keys[bad]!r}: {int((~np.isfinite(data[bad])).sum())} non-finite value(s) "
                                 f"to be written{why}; nothing written")
            yield data

    try:
        _write_float32(path, shapes, checked(), metadata)
    except ValueError as e:
        if isinstance(e, AdapterFileError):
            raise
        raise AdapterFileError(f"{path}: {e}") from None
    return float(max((float(e) for e in errors), default=0.0))


def check_pair(adapters: Iterable[GSAdapter], paths: Iterable[str | os.PathLike]) -> None:
    """:func:`adapter.check_compatible` with the files' names in the message, as :class:`AdapterFileError`."""
    try:
        check_compatible(list(adapters), [str(p) for p in paths])
    except ValueError as e:
        raise AdapterFileError(str(e)) from None
