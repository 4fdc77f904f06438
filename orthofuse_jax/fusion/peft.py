"""Read PEFT (huggingface/peft) OFT adapters as GS adapters with ``L = I``, and write them (docs/math.md §5, §9).

An OFT adapter rotates each adapted layer's input features by a block-diagonal orthogonal matrix
``BD(R)``; as a GS matrix ``Q = P^T BD(L) P BD(R)`` that is ``L = I`` (raw parameters 0) and R
holding the OFT blocks. Three on-disk formats exist (checked against PEFT's source):

============  ============================================  ==================================
PEFT version  keys per layer                                rotation of the layer's features
============  ============================================  ==================================
<= 0.13       ``<m>.oft_r`` ``[r, b, b]``                   ``Cay(skew(oft_r))`` on the layer's
              (LyCORIS-based; no ``oft_s``)                 OUTPUT features (``b = out / r``)
0.14 - 0.15   ``<m>.oft_r`` ``[r, b, b]`` and               ``Cay(skew(oft_r))`` on the input
              ``<m>.oft_s`` ``[out, 1]`` (output scale)     features; ``oft_s`` -> scale vector
>= 0.16       ``<m>.oft_R.weight`` ``[r, b(b-1)/2]``        exact mode: ``Cay(S)``;
              (packed strict upper triangle, row-major)     Cayley-Neumann mode: ~ ``Cay(-S)``
============  ============================================  ==================================

with ``Cay(S) = (I + S)(I - S)^{-1}`` as in this package and, for >= 0.16,
``S = M - M^T`` where ``M`` holds the packed vector in its strict upper triangle. PEFT's exact
Cayley is ``solve(I + S, I - S, left=False)`` applied as ``x @ R`` to row vectors, which is
``Cay(S)`` acting on column vectors. Its default Cayley-Neumann mode
(``use_cayley_neumann=True``, ``num_cayley_neumann_terms=5``) evaluates the truncated series
``I + 2S + 2S^2 + ... `` of ``Cay(S)`` but applies it the same way, i.e. approximates the
TRANSPOSE ``Cay(-S)``; such adapters are read as the exact rotation ``Cay(-S)`` they
approximate, and a warning reports the truncation error. The mode is taken from
``adapter_config.json`` next to the file when present.

Not supported (clear error): ``block_share=True`` adapters, embedding adapters
(``oft_embedding_R``). COFT adapters are read as stored (PEFT re-projects them at every forward).
Layer names are the module paths with a leading ``base_model.model.`` removed. A config whose
``r`` / ``oft_block_size`` disagree with the weights (after PEFT's own adjustment to a divisor of
the layer's features) is an error naming the file and key.

Writing (:func:`save_peft_oft`) uses the >= 0.16 format in exact Cayley mode: each R block ``Y``
as the packed ``invCay(Y)``. Only ``L = I`` adapters without output scales have this form; merges
of two ``L = I`` adapters keep ``L = I`` exactly for every method and restoration.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np

from ..geometry import skew
from .adapter import GSAdapter, from_layers, to_cayley_params
from .io import (
    AdapterFileError,
    atomic_folder,
    check_output_folder,
    read_tensors,
    save_tensors,
)

__all__ = [
    "BLOCK_DIAGONAL_TOL",
    "CONFIG_NAME",
    "WEIGHTS_NAME",
    "PeftOFTWarning",
    "check_block_diagonal",
    "check_unit_scales",
    "is_peft_oft",
    "load_peft_oft",
    "neumann_series",
    "peft_format",
    "peft_oft_config",
    "peft_oft_tensors",
    "save_peft_oft",
]

_PREFIX = "base_model.model."
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
BLOCK_DIAGONAL_TOL = 1e-6
"""Largest raw Cayley parameter of an L block that still counts as ``L = I`` (block-diagonal)."""


class PeftOFTWarning(UserWarning):
    """A PEFT OFT adapter was read with an approximation (Cayley-Neumann mode)."""


def _strip(name: str) -> str:
    return name[len(_PREFIX) :] if name.startswith(_PREFIX) else name


def is_peft_oft(tensors) -> bool:
    """Whether a ``{key: array}`` mapping looks like a PEFT OFT state dict."""
    return any(k.endswith((".oft_R.weight", ".oft_r")) for k in tensors)


def peft_format(tensors) -> str:
    """``"v0.16+"``, ``"v0.14-0.15"`` or ``"<=v0.13"`` from the keys (raises ``ValueError`` otherwise)."""
    if any(k.endswith(".oft_R.weight") for k in tensors):
        return "v0.16+"
    if any(k.endswith(".oft_r") for k in tensors):
        return "v0.14-0.15" if any(k.endswith(".oft_s") for k in tensors) else "<=v0.13"
    raise ValueError("no PEFT OFT keys (…oft_R.weight or …oft_r)")


def neumann_series(s: np.ndarray, terms: int) -> np.ndarray:
    """PEFT's Cayley-Neumann matrix for skew ``S`` (its ``_cayley_batch`` loop, transcribed)."""
    eye = np.broadcast_to(np.eye(s.shape[-1], dtype=s.dtype), s.shape)
    r = eye.copy()
    if terms > 1:
        r = r + 2.0 * s
        if terms > 2:
            sq = s @ s
            r = r + 2.0 * sq
            p = sq
            for _ in range(3, terms - 1):
                p = p @ s
                r = r + 2.0 * p
            p = p @ s
            r = r + p
    return r


def _cayley_np(s: np.ndarray) -> np.ndarray:
    eye = np.eye(s.shape[-1])
    return np.linalg.solve(eye - s, eye + s)


def _unpack(vec: np.ndarray, source: str, key: str) -> np.ndarray:
    r, m = vec.shape
    b = round((1 + np.sqrt(1 + 8 * m)) / 2)
    if b * (b - 1) // 2 != m or b < 2:
        raise AdapterFileError(
            f"{source}: key {key!r}: length {m} is not b(b-1)/2 for an integer block size b"
        )
    rows, cols = np.triu_indices(b, 1)
    M = np.zeros((r, b, b), dtype=np.float64)
    M[:, rows, cols] = vec
    return M - np.swapaxes(M, -1, -2)


def _config_path(path: Path) -> Path:
    return path.parent / CONFIG_NAME if path.is_file() else path / CONFIG_NAME


def _read_config(path: Path) -> dict:
    cfg = _config_path(path)
    if cfg.is_file():
        try:
            return json.loads(cfg.read_text())
        except (OSError, ValueError) as e:
            raise AdapterFileError(f"{cfg}: cannot read adapter config ({e})") from None
    return {}


def load_peft_oft(
    path: str | os.PathLike,
    *,
    cayley_neumann: bool | None = None,
    num_neumann_terms: int | None = None,
    tensors=None,
) -> GSAdapter:
    """Read a PEFT OFT adapter (``adapter_model.safetensors`` or its directory) as a GS adapter.

    Args:
      path: the safetensors file, or the directory holding ``adapter_model.safetensors``.
      cayley_neumann: for the >= 0.16 format, whether it was trained in Cayley-Neumann mode;
        ``None`` reads ``use_cayley_neumann`` from ``adapter_config.json`` (PEFT's default True
        when absent, with a warning).
      num_neumann_terms: Neumann terms (default: config, else 5); only for the warning's error.
    Returns:
      ``GSAdapter(orthogonal=False)`` float32: ``L = 0`` (identity blocks), ``R`` the raw
      Cayley parameters of the OFT rotation; ``oft_s`` (0.14-0.15) as the layer's scale vector.
    """
    path = Path(path)
    file = path / "adapter_model.safetensors" if path.is_dir() else path
    source = str(file)
    if tensors is None:
        tensors, _ = read_tensors(file)
    cfg = _read_config(file)
    if cfg.get("block_share"):
        raise AdapterFileError(
            f"{source}: block_share=True OFT adapters are not supported (one block shared per layer)"
        )
    try:
        fmt = peft_format(tensors)
    except ValueError as e:
        raise AdapterFileError(f"{source}: {e}") from None
    if fmt == "v0.16+":
        if cayley_neumann is None:
            if "use_cayley_neumann" in cfg:
                cayley_neumann = bool(cfg["use_cayley_neumann"])
            else:
                cayley_neumann = True
                warnings.warn(
                    f"{source}: no adapter_config.json with use_cayley_neumann; assuming PEFT's default "
                    "Cayley-Neumann mode (pass cayley_neumann=False for exact-Cayley adapters)",
                    PeftOFTWarning,
                    stacklevel=2,
                )
        terms = int(num_neumann_terms or cfg.get("num_cayley_neumann_terms", 5))
    layers, scales = {}, {}
    worst = (0.0, "")
    for key in sorted(tensors):
        arr = np.asarray(tensors[key], dtype=np.float64)
        if not np.all(np.isfinite(arr)):
            raise AdapterFileError(f"{source}: key {key!r}: non-finite values")
        if fmt == "v0.16+" and key.endswith(".oft_R.weight"):
            if arr.ndim != 2:
                raise AdapterFileError(
                    f"{source}: key {key!r}: shape {list(arr.shape)} is not [r, b(b-1)/2]"
                )
            s = _unpack(arr, source, key)
            _check_shape_config(cfg, s.shape[0], s.shape[-1], file, key)
            if cayley_neumann:
                err = float(np.max(np.abs(neumann_series(s, terms) - _cayley_np(s))))
                if err > worst[0]:
                    worst = (err, key)
                s = -s
            name = _strip(key[: -len(".oft_R.weight")])
        elif fmt != "v0.16+" and key.endswith(".oft_r"):
            if arr.ndim != 3 or arr.shape[1] != arr.shape[2]:
                raise AdapterFileError(
                    f"{source}: key {key!r}: shape {list(arr.shape)} is not [r, b, b]"
                )
            s = 0.5 * (arr - np.swapaxes(arr, -1, -2))
            name = _strip(key[: -len(".oft_r")])
        elif fmt == "v0.14-0.15" and key.endswith(".oft_s"):
            if arr.ndim != 2 or arr.shape[1] != 1:
                raise AdapterFileError(
                    f"{source}: key {key!r}: shape {list(arr.shape)} is not [out, 1]"
                )
            scales[_strip(key[: -len(".oft_s")])] = arr[:, 0].astype(np.float32)
            continue
        else:
            raise AdapterFileError(
                f"{source}: key {key!r}: unexpected key for a PEFT OFT {fmt} adapter"
            )
        layers[name] = (np.zeros_like(s, dtype=np.float32), s.astype(np.float32))
    if not layers:
        raise AdapterFileError(f"{source}: no OFT layers")
    for name in scales:
        if name not in layers:
            raise AdapterFileError(
                f"{source}: key {name + '.oft_s'!r}: scale without its {name + '.oft_r'!r}"
            )
    if worst[0] > 1e-3:
        warnings.warn(
            f"{source}: key {worst[1]!r}: read as the exact rotation its Cayley-Neumann series approximates; "
            f"the truncated series differs from it by up to {worst[0]:.3g}",
            PeftOFTWarning,
            stacklevel=2,
        )
    return from_layers(layers, scales, dtype=np.float32)


# ----------------------------------------------------------------------------------------------
# configuration and weights agree


def _adjust(features: int, param: int) -> int:
    """PEFT's ``adjust_oft_parameters``: the divisor of ``features`` nearest ``param`` (ties: lower)."""
    if param >= features:
        return features
    higher = param
    while higher <= features and features % higher:
        higher += 1
    lower = param
    while lower > 1 and features % lower:
        lower -= 1
    return lower if param - lower <= higher - param else higher


def _check_shape_config(cfg: Mapping, r: int, b: int, file: Path, key: str) -> None:
    """``r`` blocks of size ``b`` must be what PEFT builds from the config's ``r`` / ``oft_block_size``."""
    if "r" not in cfg and "oft_block_size" not in cfg:
        return
    try:
        cr, cb = int(cfg.get("r") or 0), int(cfg.get("oft_block_size") or 0)
    except (TypeError, ValueError):
        raise AdapterFileError(
            f"{_config_path(file)}: r={cfg.get('r')!r}, oft_block_size={cfg.get('oft_block_size')!r} "
            "are not integers"
        ) from None
    n = r * b
    if cr == 0 and cb > 0:
        eb = cb if n % cb == 0 and cb <= n else _adjust(n, cb)
        want = (n // eb, eb)
    elif cr > 0 and cb == 0:
        er = cr if n % cr == 0 and cr <= n else _adjust(n, cr)
        want = (er, n // er)
    else:
        raise AdapterFileError(
            f"{_config_path(file)}: r={cr}, oft_block_size={cb}: PEFT needs exactly one of them non-zero"
        )
    if (r, b) != want:
        raise AdapterFileError(
            f"{file}: key {key!r}: {r} blocks of size {b}, but {_config_path(file)} "
            f"(r={cr}, oft_block_size={cb}) makes {want[0]} blocks of size {want[1]} of its {n} features"
        )


# ----------------------------------------------------------------------------------------------
# writing PEFT >= 0.16 OFT adapters


def _suggest() -> str:
    return "write the reference format (fuse --to reference) or fold it into the model (orthofuse-jax bake)"


def check_block_diagonal(
    adapter: GSAdapter, source: str, *, tol: float = BLOCK_DIAGONAL_TOL
) -> None:
    """Raise :class:`AdapterFileError` naming ``source`` and the first layer whose L blocks are not ``I``.

    Only ``Q = BD(R)`` (``L = I``) is a PEFT OFT rotation; a GS adapter with ``L != I`` (every
    reference adapter) mixes features across blocks and has no PEFT OFT form.
    """
    for stack in adapter.stacks.values():
        L = np.asarray(stack.L, dtype=np.float64)
        if adapter.orthogonal:
            dev = np.abs(L - np.eye(L.shape[-1])).max(axis=(1, 2, 3))
        else:
            dev = np.abs(L - np.swapaxes(L, -1, -2)).max(axis=(1, 2, 3)) / 2
        bad = np.flatnonzero(~(dev <= tol))
        if bad.size:
            i = int(bad[0])
            raise AdapterFileError(
                f"{source}: layer {stack.names[i]!r}: its L blocks are not the identity "
                f"(max deviation {dev[i]:.3g}), so the GS matrix is not block-diagonal and has no "
                f"PEFT OFT form; {_suggest()}"
            )


def check_unit_scales(adapter: GSAdapter, source: str, *, tol: float = 1e-6) -> None:
    """Raise :class:`AdapterFileError` for a scale vector other than ones (PEFT >= 0.16 OFT has none)."""
    for name in sorted(adapter.scales):
        dev = float(np.max(np.abs(np.asarray(adapter.scales[name], np.float64) - 1.0), initial=0.0))
        if not dev <= tol:
            raise AdapterFileError(
                f"{source}: layer {name!r}: output scales other than 1 (max |s - 1| = {dev:.3g}); "
                f"PEFT >= 0.16 OFT has no output scale; {_suggest()}"
            )


def peft_oft_tensors(
    adapter: GSAdapter, source: str = "<adapter>", *, restore_eta=None
) -> dict[str, np.ndarray]:
    """The PEFT >= 0.16 state dict ``{base_model.model.<layer>.oft_R.weight: [r, b(b-1)/2]}`` of an
    adapter with ``L = I`` and unit scales (else :class:`AdapterFileError` naming ``source``).

    Each R block ``Y`` is stored as the strict upper triangle of ``S = invCay(Y)``, which PEFT's exact
    Cayley mode turns back into ``Y`` (module docstring); ``restore_eta`` stores ``Cay(eta Y)``
    instead, as ``eta skew(Y)`` (as :func:`~orthofuse_jax.fusion.io.save_merged`).
    """
    check_unit_scales(adapter, source)
    if adapter.orthogonal and restore_eta is not None:
        eta = float(restore_eta)
        raw = adapter.map_stacks(lambda u: eta * skew(u), orthogonal=False)
    else:
        raw = to_cayley_params(adapter)
    check_block_diagonal(raw, source)
    out = {}
    for stack in raw.stacks.values():
        R = np.asarray(stack.R, dtype=np.float64)
        rows, cols = np.triu_indices(R.shape[-1], 1)
        vec = (0.5 * (R - np.swapaxes(R, -1, -2)))[..., rows, cols].astype(np.float32)
        for name, v in zip(stack.names, vec):
            if not np.isfinite(v).all():
                raise AdapterFileError(
                    f"{source}: layer {name!r}: non-finite Cayley parameters (a block with an "
                    "eigenvalue at -1 has none); nothing written"
                )
            out[_PREFIX + name + ".oft_R.weight"] = v
    return out


def peft_oft_config(
    shapes: Mapping[str, tuple[int, int]], base: Mapping | None = None, source: str = "<adapter>"
) -> dict:
    """``adapter_config.json`` for layers ``{name: (r, b)}``: ``base``'s fields (model name, task, ...)
    with those that must match the weights set: one ``r`` or one ``oft_block_size`` (the base's
    choice when both fit), the layers as ``target_modules``, exact Cayley, no COFT / sharing / bias.
    """
    base = dict(base or {})
    rs, bs = {r for r, _ in shapes.values()}, {b for _, b in shapes.values()}
    by_r = bool(base.get("r")) and not base.get("oft_block_size")
    if len(bs) == 1 and not (by_r and len(rs) == 1):
        r, block = 0, bs.pop()
    elif len(rs) == 1:
        r, block = rs.pop(), 0
    else:
        raise AdapterFileError(
            f"{source}: layers have block sizes {sorted(bs)} and block counts {sorted(rs)}; a PEFT OFT "
            "config holds one r or one oft_block_size for all layers"
        )
    defaults = {
        "base_model_name_or_path": None,
        "revision": None,
        "task_type": None,
        "fan_in_fan_out": False,
        "module_dropout": 0.0,
        "eps": 6e-5,
        "num_cayley_neumann_terms": 5,
    }
    fixed = {
        "peft_type": "OFT",
        "r": r,
        "oft_block_size": block,
        "target_modules": sorted(shapes),
        "exclude_modules": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "modules_to_save": None,
        "bias": "none",
        "coft": False,
        "block_share": False,
        "use_cayley_neumann": False,
        "init_weights": True,  # a module matched beyond the listed layers starts as the identity
        "inference_mode": True,
    }
    return {**defaults, **base, **fixed}


def save_peft_oft(
    out_dir: str | os.PathLike,
    adapter: GSAdapter,
    *,
    base_config: Mapping | str | os.PathLike | None = None,
    inputs: Iterable[str | os.PathLike] = (),
    overwrite: bool = False,
    restore_eta=None,
    metadata: Mapping[str, str] | None = None,
) -> Path:
    """Write a block-diagonal (``L = I``) adapter as a PEFT >= 0.16 OFT folder, atomically.

    The folder holds ``adapter_config.json`` (:func:`peft_oft_config`, exact Cayley mode) and
    ``adapter_model.safetensors`` (:func:`peft_oft_tensors`); ``PeftModel.from_pretrained(model,
    out_dir)`` then applies the adapter's rotations. Layer names are kept as read (the
    ``base_model.model.`` prefix restored), so adapters of any torch model round-trip.

    Args:
      out_dir: the folder to create; never one of ``inputs`` or a folder holding one.
      adapter: raw-parameter or orthogonal (merged) adapter with ``L = I`` and unit scales.
      base_config: a config mapping, or an adapter file / folder whose ``adapter_config.json``
        gives the fields not fixed by the weights (base model name, task type, ...).
      overwrite: replace an existing PEFT adapter folder (one holding only its files).
      restore_eta: store ``Cay(eta Y)`` for each block ``Y`` (the ``curve_over_id`` restoration).
      metadata: extra safetensors metadata entries.
    Raises:
      AdapterFileError: ``L != I``, non-unit scales, layers with neither one r nor one block
        size, or a refused output path; nothing is written then.
    """
    out = check_output_folder(
        out_dir, inputs, overwrite=overwrite, replaceable=(CONFIG_NAME, WEIGHTS_NAME, "README.md")
    )
    tensors = peft_oft_tensors(adapter, str(out), restore_eta=restore_eta)
    if base_config is not None and not isinstance(base_config, Mapping):
        base_config = _read_config(Path(base_config))
    shapes = {}
    for stack in adapter.stacks.values():
        shapes.update({name: (stack.nb, stack.b) for name in stack.names})
    config = peft_oft_config(shapes, base_config, str(out))

    def write(tmp: Path) -> None:
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        save_tensors(tmp / WEIGHTS_NAME, tensors, metadata)

    try:
        return atomic_folder(out, write, overwrite=overwrite)
    except OSError as e:
        raise AdapterFileError(f"{out}: cannot write folder ({e.strerror or e})") from None
