"""Read PEFT (huggingface/peft) OFT adapters as GS adapters with ``L = I`` (docs/math.md §9).

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
Layer names are the module paths with a leading ``base_model.model.`` removed.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import numpy as np

from .adapter import GSAdapter, from_layers
from .io import AdapterFileError, read_tensors

__all__ = ["PeftOFTWarning", "is_peft_oft", "load_peft_oft", "neumann_series", "peft_format"]

_PREFIX = "base_model.model."


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


def _read_config(path: Path) -> dict:
    cfg = path.parent / "adapter_config.json" if path.is_file() else path / "adapter_config.json"
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
