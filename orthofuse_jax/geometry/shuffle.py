"""The perfect shuffle permutation P of the GS construction (docs/math.md §1.3).

For ``n = nb * b`` the shuffle is the permutation

    (P z)[v*b + u] = z[u*nb + v]        v in [0, nb), u in [0, b)

i.e. ``P z = reshape(z, (b, nb)).T.flatten()`` (the paper's ``P_(b, n)``) and
``P^T w = reshape(w, (nb, b)).T.flatten()``. For ``b != nb`` P is not symmetric, so the
direction matters: ``Q = P^T BD(L) P BD(R)``.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from ._types import Array, Float

__all__ = [
    "perfect_shuffle",
    "perfect_shuffle_indices",
    "perfect_shuffle_matrix",
    "perfect_unshuffle",
]


def _check(n: int, nb: int) -> int:
    if nb < 1 or n % nb != 0:
        raise ValueError(f"perfect shuffle: n={n} is not divisible by nb={nb}")
    return n // nb


def perfect_shuffle_indices(nb: int, b: int) -> np.ndarray:
    """Index vector ``idx`` with ``(P z) = z[idx]``: ``idx[v*b + u] = u*nb + v``."""
    v, u = np.meshgrid(np.arange(nb), np.arange(b), indexing="ij")
    return (u * nb + v).reshape(-1)


def perfect_shuffle_matrix(nb: int, b: int, dtype=jnp.float32) -> Float[Array, "n n"]:
    """Dense permutation matrix P (tests and small n only)."""
    n = nb * b
    idx = perfect_shuffle_indices(nb, b)
    p = np.zeros((n, n))
    p[np.arange(n), idx] = 1.0
    return jnp.asarray(p, dtype=dtype)


def perfect_shuffle(z: Float[Array, "*batch n"], nb: int) -> Float[Array, "*batch n"]:
    """``P z`` along the last axis (a reshape and a transpose, no gather)."""
    n = z.shape[-1]
    b = _check(n, nb)
    lead = z.shape[:-1]
    return jnp.swapaxes(z.reshape(*lead, b, nb), -1, -2).reshape(*lead, n)


def perfect_unshuffle(w: Float[Array, "*batch n"], nb: int) -> Float[Array, "*batch n"]:
    """``P^T w`` along the last axis; the inverse of :func:`perfect_shuffle`."""
    n = w.shape[-1]
    b = _check(n, nb)
    lead = w.shape[:-1]
    return jnp.swapaxes(w.reshape(*lead, nb, b), -1, -2).reshape(*lead, n)
