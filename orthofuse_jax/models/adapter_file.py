"""Read a GS adapter saved in the reference checkpoint format (SPEC 5) for generation.

Keys ``<processor>.<to_q|to_k|to_v|to_out>_moft.ort_monarch.{L,R}`` and
``<processor>.<q|k|v|out>_scale``; L/R are raw Cayley parameters unless ``orthogonal=True``
(merges can be stored either way). Scales are keyed by their GS layer name
(``<processor>.to_q_moft``), as :class:`~orthofuse_jax.fusion.adapter.GSAdapter` expects.
"""

from __future__ import annotations

import os

import numpy as np

from ..fusion.adapter import SCALE_NAME, GSAdapter, from_layers

__all__ = ["read_adapter"]

_SCALE_TO_LAYER = {v: k for k, v in SCALE_NAME.items()}


def read_adapter(path: str | os.PathLike, *, orthogonal: bool | None = None) -> GSAdapter:
    """Load ``path`` (.safetensors) into a :class:`GSAdapter` (float32).

    ``orthogonal=None`` reads the ``orthogonal`` metadata entry ("true"/"false"; default false).
    """
    from safetensors import safe_open

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"adapter file {path!r} does not exist")
    L, R, scales = {}, {}, {}
    with safe_open(path, framework="numpy") as f:
        meta = f.metadata() or {}
        for key in f.keys():
            if key.endswith(".ort_monarch.L") or key.endswith(".ort_monarch.R"):
                layer = key[: -len(".ort_monarch.L")]
                (L if key.endswith("L") else R)[layer] = f.get_tensor(key)
            else:
                proc, _, last = key.rpartition(".")
                if last not in _SCALE_TO_LAYER:
                    raise ValueError(f"{path}: unexpected key {key!r} (not a GS block or scale)")
                scales[f"{proc}.{_SCALE_TO_LAYER[last]}"] = f.get_tensor(key)
    for layer in sorted(set(L) ^ set(R)):
        raise ValueError(f"{path}: layer {layer!r} has only one of L/R")
    if not L:
        raise ValueError(f"{path}: no GS layers (keys '*.ort_monarch.L/R') found")
    if orthogonal is None:
        orthogonal = str(meta.get("orthogonal", "false")).lower() == "true"
    layers = {k: (np.asarray(L[k], np.float32), np.asarray(R[k], np.float32)) for k in L}
    return from_layers(layers, {k: np.asarray(v, np.float32) for k, v in scales.items()}, orthogonal=orthogonal)
