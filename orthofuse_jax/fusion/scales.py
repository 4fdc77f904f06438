"""Per-channel scale vectors of merged adapters (docs/math.md §3.5).

The reference merges only L/R and keeps the CONCEPT (first) adapter's ``q/k/v/out`` scale vectors
verbatim, silently dropping the style adapter's (docs/math.md §3.5). Three documented rules:

* ``"concept"`` (default, reference parity): ``s = s_1``.
* ``"geometric"``: per-channel weighted geometric mean ``s = exp(sum_i w_i log s_i)``. Defined only
  for positive scales (they multiply the layer output, init 1, and stay positive in practice); a
  non-positive entry is an error naming the layer (on concrete input; NaN under ``jit``).
* ``"linear"``: per-channel weighted arithmetic mean ``s = sum_i w_i s_i``.

A layer missing from an adapter's ``scales`` dict has unit scales (``GSAdapter`` contract). Weights
may carry leading axes (``[..., k]``, e.g. ``[T, 2]`` for a sweep); the result is ``[..., h]``.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ..geometry._types import Array
from .adapter import GSAdapter

__all__ = ["SCALE_RULES", "combine_scales"]

SCALE_RULES = ("concept", "geometric", "linear")


def _concrete(x) -> bool:
    return not isinstance(x, jax.core.Tracer)


def combine_scales(
    adapters: Sequence[GSAdapter],
    weights: Array,
    rule: str = "concept",
    *,
    dtype=None,
) -> dict[str, Array]:
    """Combine the scale vectors of ``adapters`` with ``weights`` (``[..., k]``) by ``rule``.

    Raises:
      ValueError: unknown ``rule``; scale vectors of one layer with different lengths; for
        ``"geometric"``, a non-positive scale (the message names the layer and adapter).
    """
    if rule not in SCALE_RULES:
        raise ValueError(f"scales must be one of {SCALE_RULES}, got {rule!r}")
    dtype = dtype or adapters[0].dtype
    w = jnp.asarray(weights, dtype=dtype)
    lead = w.shape[:-1]
    names: list[str] = []
    for a in adapters:
        names += [n for n in a.scales if n not in names]
    out = {}
    for name in names:
        if rule == "concept":
            if name not in adapters[0].scales:
                continue  # unit scales, as in the first adapter
            s = jnp.asarray(adapters[0].scales[name], dtype=dtype)
            out[name] = jnp.broadcast_to(s, lead + s.shape)
            continue
        h = next(np.shape(a.scales[name]) for a in adapters if name in a.scales)
        vecs = []
        for i, a in enumerate(adapters):
            s = jnp.asarray(a.scales[name], dtype=dtype) if name in a.scales else jnp.ones(h, dtype)
            if s.shape != h:
                raise ValueError(
                    f"layer {name!r}: scale vector of adapter {i} has shape {s.shape}, expected {h}"
                )
            if rule == "geometric" and _concrete(s) and bool(jnp.any(s <= 0)):
                j = int(jnp.argmax(s <= 0))
                raise ValueError(
                    f"layer {name!r}: adapter {i} has a non-positive scale {float(s[j])} at channel {j}; "
                    "the geometric mean of scales needs positive values (use scales='linear' or 'concept')"
                )
            vecs.append(s)
        stacked = jnp.stack(vecs, axis=-2)  # [k, h]
        if rule == "linear":
            out[name] = jnp.einsum("...k,kh->...h", w, stacked)
        else:
            out[name] = jnp.exp(jnp.einsum("...k,kh->...h", w, jnp.log(stacked)))
    return out
