"""Reference checkpoint I/O: safetensors files of GS adapters (docs/math.md §5).

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
reference uses) with a warning naming the key and the asymmetry. The container and the reference layout are
read on the host by :mod:`orthofuse_jax._safetensors` (numpy alone, so the command line reads its
inputs while JAX is still being imported); this module makes adapters of them and writes files.
"""

from __future__ import annotations

import fnmatch
import functools
import math
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import BinaryIO

import jax
import jax.numpy as jnp
import numpy as np

from .._safetensors import (
    MONARCH,
    SKEW_TOL,
    AdapterFileError,
    NonSkewWarning,
    ReferenceArrays,
    SafetensorsFile,
    header_bytes,
    is_lycoris_keys,
    is_peft_keys,
    read_adapter_file,
    read_reference,
    read_tensors,
    scale_key,
)
from ..geometry import cpu_only, rotation_parameters, skew
from .adapter import GSAdapter, check_compatible, from_stacks, on_cpu, to_cayley_params
from .maps import orthogonality_error

__all__ = [
    "ADAPTER_FORMATS",
    "SKEW_TOL",
    "AdapterFileError",
    "NonSkewWarning",
    "adapter_format",
    "adapter_from_arrays",
    "adapter_from_tensors",
    "adapter_keys",
    "adapter_to_tensors",
    "atomic_folder",
    "atomic_write",
    "atomic_write_bytes",
    "check_output_folder",
    "check_output_path",
    "check_pair",
    "fsync_dir",
    "install_folder",
    "load_adapter",
    "read_tensors",
    "save_adapter",
    "save_merged",
    "save_tensors",
]

# ----------------------------------------------------------------------------------------------
# safetensors container


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], object]) -> None:
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


def fsync_dir(path: str | os.PathLike) -> None:
    """Flush a folder's entries to disk (best effort: not every file system can)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def install_folder(tmp: Path, out: Path, overwrite: bool) -> None:
    """Rename the finished folder ``tmp`` into place; an existing ``out`` (``overwrite``) is moved aside first."""
    if not (overwrite and out.exists()):
        os.rename(tmp, out)  # fails if out appeared meanwhile (a non-empty folder or a file)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=tmp.parent))
    os.rename(out, old / "x")
    try:
        os.rename(tmp, out)
    except BaseException:
        os.rename(old / "x", out)
        raise
    finally:
        shutil.rmtree(old, ignore_errors=True)


def atomic_folder(
    out: str | os.PathLike, write: Callable[[Path], object], *, overwrite: bool = False
) -> Path:
    """Write the folder ``out`` atomically: ``write(tmp)`` fills a temp folder next to it, then a rename.

    On any failure the temp folder is removed and ``out`` is left as it was; an existing ``out``
    is replaced only with ``overwrite`` (check it first: :func:`check_output_folder`).
    """
    out = Path(out)
    parent = out.parent if str(out.parent) else Path(".")
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=parent))
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp creates 0700; give the folder ordinary permissions
        write(tmp)
        fsync_dir(tmp)
        install_folder(tmp, out, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_dir(parent)
    return out


def save_tensors(
    path: str | os.PathLike,
    tensors: Mapping[str, np.ndarray],
    metadata: Mapping[str, str] | None = None,
) -> None:
    """Atomically write ``tensors`` as float32 safetensors (temp file in the same folder + ``os.replace``).

    The header is built first and each tensor is then written straight from its array, so no
    second copy of the file is held in memory.
    """
    # reshape: ascontiguousarray turns a 0-d array (a scalar such as LyCORIS's alpha) into [1]
    arrays = {
        k: np.ascontiguousarray(v, dtype="<f4").reshape(np.shape(v)) for k, v in tensors.items()
    }
    _write_float32(Path(path), {k: a.shape for k, a in arrays.items()}, arrays.values(), metadata)


def _write_float32(
    path: Path, shapes: Mapping[str, tuple[int, ...]], data: Iterable[np.ndarray], metadata
) -> None:
    """Write a float32 safetensors file atomically: its header from ``shapes`` (keys in file
    order), then ``data``, the tensors' float32 bytes in that order in any number of pieces."""
    head = header_bytes({k: ("F32", tuple(shape)) for k, shape in shapes.items()}, metadata)

    def write(f: BinaryIO) -> None:
        f.write(head)
        for piece in data:
            f.write(np.ascontiguousarray(piece, dtype="<f4").data.cast("B"))

    try:
        atomic_write(path, write)
    except OSError as e:
        raise AdapterFileError(f"{path}: cannot write file ({e.strerror or e})") from None


# ----------------------------------------------------------------------------------------------
# tensors <-> adapters


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

    return adapter_from_arrays(
        read_reference(source, layout, fill, lambda k: np.asarray(tensors[k]), skew_tol)
    )


def adapter_from_arrays(arrays: ReferenceArrays) -> GSAdapter:
    """The raw-parameter adapter of checked host arrays (:func:`orthofuse_jax._safetensors.read_reference`);
    on the CPU every stack's device array takes over its (aligned) host memory instead of copying it."""
    stacks = {
        names: {side: jax.device_put(x) for side, x in lr.items()}
        for names, lr in arrays.stacks.items()
    }
    return from_stacks(stacks, arrays.scales, orthogonal=False, dtype=arrays.dtype)


def adapter_to_tensors(adapter: GSAdapter) -> dict[str, np.ndarray]:
    """Reference-format ``{key: float32 array}``; orthogonal adapters become ``invCay`` raw parameters.

    Each stack is copied to the host once; the per-layer arrays are views of those copies.
    """
    _check_input_side(adapter)
    raw = to_cayley_params(adapter)
    out: dict[str, np.ndarray] = {}
    for stack in raw.stacks.values():
        L, R = (np.asarray(x, dtype=np.float32) for x in (stack.L, stack.R))
        for i, name in enumerate(stack.names):
            out[name + MONARCH + "L"] = L[i]
            out[name + MONARCH + "R"] = R[i]
    for name, s in adapter.scales.items():
        out[scale_key(name)] = np.asarray(s, dtype=np.float32)
    for key, arr in out.items():
        bad = ~np.isfinite(arr)
        if bad.any():
            raise ValueError(
                f"key {key!r}: {int(bad.sum())} non-finite value(s) to be written (a block with an eigenvalue "
                "at -1 has no Cayley parameters); nothing written"
            )
    return out


def load_adapter(path: str | os.PathLike, *, skew_tol: float = SKEW_TOL) -> GSAdapter:
    """Read an adapter file as raw Cayley parameters: the reference format, PEFT OFT, or LyCORIS
    ``diag-oft`` / kohya OFT (:func:`~orthofuse_jax.fusion.lycoris.load_lycoris_oft`; output-side),
    detected from the keys.

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
    arrays = read_adapter_file(path, skew_tol)
    if arrays is None:  # PEFT OFT, or LyCORIS/kohya OFT
        from .lycoris import is_lycoris_oft, load_lycoris_oft
        from .peft import load_peft_oft

        file = Path(path) / "adapter_model.safetensors" if Path(path).is_dir() else Path(path)
        tensors, _ = read_tensors(file)
        if is_lycoris_oft(tensors):
            return load_lycoris_oft(file, tensors=tensors)
        return load_peft_oft(path, tensors=tensors)
    return adapter_from_arrays(arrays)


def _adapter_file(path: Path) -> Path:
    return path / "adapter_model.safetensors" if path.is_dir() else path


def adapter_keys(path: str | os.PathLike) -> list[str]:
    """The tensor keys of an adapter file (or of a folder's ``adapter_model.safetensors``); header only."""
    with SafetensorsFile(_adapter_file(Path(path))) as f:
        return list(f.entries)


def _is_reference_keys(keys: Iterable[str]) -> bool:
    return any(MONARCH in k for k in keys)


# (format, test on the tensor keys), tried in order: a new format is one more entry.
ADAPTER_FORMATS: tuple[tuple[str, Callable[[list[str]], bool]], ...] = (
    ("peft", is_peft_keys),
    ("lycoris", is_lycoris_keys),
    ("reference", _is_reference_keys),
)


def adapter_format(path: str | os.PathLike) -> str:
    """The format of an adapter file or folder, from its tensor keys: a name of :data:`ADAPTER_FORMATS`.

    ``"reference"``: the reference's GS file (``....ort_monarch.L/R``); ``"peft"``: PEFT OFT (any
    version: :func:`orthofuse_jax.fusion.peft.peft_format` tells which); ``"lycoris"``: LyCORIS
    ``diag-oft`` or kohya OFT (:func:`orthofuse_jax.fusion.lycoris.lycoris_format` tells which).
    Reads the header only.
    """
    keys = adapter_keys(path)
    for name, test in ADAPTER_FORMATS:
        if test(keys):
            return name
    raise AdapterFileError(
        f"{_adapter_file(Path(path))}: no adapter keys of a known format "
        f"({', '.join(name for name, _ in ADAPTER_FORMATS)})"
    )


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
            raise AdapterFileError(
                f"{out}: output path is the input file {inp}; refusing to overwrite an input"
            )
    if out.is_dir():
        raise AdapterFileError(f"{out}: output path is a directory")
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        raise AdapterFileError(f"{out}: output directory {parent} does not exist")
    return out


def check_output_folder(
    out: str | os.PathLike,
    inputs: Iterable[str | os.PathLike] = (),
    *,
    overwrite: bool = False,
    replaceable: Iterable[str] = (),
) -> Path:
    """Refuse an output folder that is, or holds, one of ``inputs``, or that exists (unless ``overwrite``).

    With ``overwrite`` an existing folder is replaced only when it holds nothing but files whose
    names match ``replaceable`` (names or ``fnmatch`` patterns: a folder of the same kind), so a
    mistyped path never deletes unrelated files.
    """
    out = Path(out)
    real = Path(os.path.realpath(out))
    for inp in inputs:
        inp_real = Path(os.path.realpath(inp))
        if inp_real == real or real in inp_real.parents:
            raise AdapterFileError(
                f"{out}: output folder is or holds the input {inp}; refusing to overwrite an input"
            )
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        raise AdapterFileError(f"{out}: output directory {parent} does not exist")
    if not out.exists() and not out.is_symlink():
        return out
    if not overwrite:
        raise AdapterFileError(f"{out}: output folder exists (pass --overwrite to replace it)")
    if not out.is_dir() or out.is_symlink():
        raise AdapterFileError(f"{out}: output path exists and is not a folder; not replacing it")
    allowed = tuple(replaceable)
    foreign = sorted(
        p.name
        for p in out.iterdir()
        if not p.is_file() or not any(fnmatch.fnmatchcase(p.name, a) for a in allowed)
    )
    if foreign:
        raise AdapterFileError(
            f"{out}: output folder holds {foreign[0]!r}, which this output does not; not replacing it"
        )
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
    if eta is not None:
        params = jnp.asarray(eta, u.dtype) * skew(u)
    else:
        with cpu_only(cpu):
            params = rotation_parameters(u)
    err = jnp.max(orthogonality_error(u)) if check else jnp.zeros((), u.dtype)
    return params.astype(jnp.float32), err


def _check_input_side(adapter: GSAdapter, path: Path | None = None) -> None:
    """The reference format holds input-side rotations only; refuse output-side ones."""
    if adapter.side != "input":
        where = f"{path}: " if path is not None else ""
        raise AdapterFileError(
            f"{where}the adapter rotates the layers' {adapter.side} features, which the reference "
            "format cannot express (write it as a LyCORIS file: fusion.lycoris.save_lycoris_oft)"
        )


def _write_adapter(path: Path, adapter: GSAdapter, metadata, *, check: bool, eta=None) -> float:
    """Keys stack by stack, side by side, then the scales; the rows converted chunk by chunk."""
    _check_input_side(adapter, path)
    shapes: dict[str, tuple[int, ...]] = {}
    plan = []  # (stack, side, layers per chunk)
    for stack in adapter.stacks.values():
        row = math.prod(stack.L.shape[1:]) * 4
        for side in ("L", "R"):
            shapes.update({name + MONARCH + side: tuple(stack.L.shape[1:]) for name in stack.names})
            plan.append((stack, side, max(1, min(len(stack.names), _CHUNK_BYTES // row))))
    scales = {scale_key(n): np.ascontiguousarray(v, dtype="<f4") for n, v in adapter.scales.items()}
    shapes.update({k: v.shape for k, v in scales.items()})
    cpu = on_cpu(adapter)
    errors = []

    def rows():  # (keys, float32 rows) in file order; the next chunk is computed while one is written
        for stack, side, chunk in plan:
            x, n = getattr(stack, side), len(stack.names)
            keys = [name + MONARCH + side for name in stack.names]
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
                why = (
                    " (a block with an eigenvalue at -1 has no Cayley parameters)"
                    if MONARCH in keys[bad]
                    else ""
                )
                raise ValueError(
                    f"key {keys[bad]!r}: {int((~np.isfinite(data[bad])).sum())} non-finite value(s) "
                    f"to be written{why}; nothing written"
                )
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
