"""Group-and-Shuffle (GS) orthogonal matrices ``Q = P^T BD(L) P BD(R)`` (docs/math.md §1.3).

``L`` and ``R`` are stacks of ``nb`` orthogonal ``b x b`` blocks; R acts first on the input,
then the perfect shuffle, then L, then the inverse shuffle. The layer maps a batch of row
vectors ``x`` (shape ``(..., n)``) to ``y = x @ Q^T`` (each row left-multiplied by Q), the
convention of the reference ``BlockdiagButterflyMultiply``. Nothing here densifies Q except
:func:`gs_dense`, which exists for tests and small ``n``.
"""

from __future__ import annotations

import jax.numpy as jnp

from ._linalg import einsum, mm
from ._types import Array, Blocks, Float
from .shuffle import perfect_shuffle, perfect_unshuffle

__all__ = ["block_diag", "gs_apply", "gs_apply_transpose", "gs_dense", "gs_shape"]


def gs_shape(L: Blocks, R: Blocks) -> tuple[int, int, int]:
    """Return ``(nb, b, n)`` of a GS pair, checking that L and R agree."""
    if L.ndim < 3 or L.shape[-1] != L.shape[-2]:
        raise ValueError(f"L must have shape [..., nb, b, b], got {L.shape}")
    if R.shape[-3:] != L.shape[-3:]:
        raise ValueError(f"L and R block shapes differ: L {L.shape}, R {R.shape}")
    nb, b = L.shape[-3], L.shape[-1]
    return nb, b, nb * b


def apply_blocks(blocks: Blocks, x: Float[Array, "*batch n"], transpose: bool) -> Array:
    nb, b = blocks.shape[-3], blocks.shape[-1]
    xb = x.reshape(*x.shape[:-1], nb, b)
    spec = "...ji,jai->...ja" if not transpose else "...ji,jia->...ja"
    return einsum(spec, xb, blocks).reshape(x.shape)


def gs_apply(x: Float[Array, "*batch n"], L: Blocks, R: Blocks) -> Float[Array, "*batch n"]:
    """Apply ``Q`` to every row: ``y = x @ Q^T`` in ``O(n b)`` per row (docs/math.md §1.3).

    Args:
      x: row vectors, shape ``(..., n)``.
      L, R: orthogonal blocks ``[nb, b, b]`` (one layer; use ``jax.vmap`` for stacks).
    Returns:
      ``y`` with ``y[i] = Q x[i]``, same shape as ``x``.
    """
    nb, _, n = gs_shape(L, R)
    if x.shape[-1] != n:
        raise ValueError(f"x has last axis {x.shape[-1]}, the GS layer has n={n}")
    z = apply_blocks(R, x, transpose=False)  # BD(R) x
    w = perfect_shuffle(z, nb)  # P .
    y = apply_blocks(L, w, transpose=False)  # BD(L) .
    return perfect_unshuffle(y, nb)  # P^T .


def gs_apply_transpose(
    x: Float[Array, "*batch n"], L: Blocks, R: Blocks
) -> Float[Array, "*batch n"]:
    """Apply ``Q^T = BD(R)^T P^T BD(L)^T P`` to every row: ``y = x @ Q``."""
    nb, _, n = gs_shape(L, R)
    if x.shape[-1] != n:
        raise ValueError(f"x has last axis {x.shape[-1]}, the GS layer has n={n}")
    w = perfect_shuffle(x, nb)
    w = apply_blocks(L, w, transpose=True)
    z = perfect_unshuffle(w, nb)
    return apply_blocks(R, z, transpose=True)


def block_diag(blocks: Blocks) -> Float[Array, "*batch n n"]:
    """Dense block-diagonal ``BD(B)`` of a stack ``[..., nb, b, b]`` (tests, small n)."""
    nb, b = blocks.shape[-3], blocks.shape[-1]
    eye = jnp.eye(nb, dtype=blocks.dtype)
    full = einsum("...jrc,jk->...jrkc", blocks, eye)
    return full.reshape(*blocks.shape[:-3], nb * b, nb * b)


def gs_dense(L: Blocks, R: Blocks) -> Float[Array, "*batch n n"]:
    """Dense ``Q = P^T BD(L) P BD(R)``; supports leading batch axes. Tests and small n only."""
    nb, _, _ = gs_shape(L, R)
    bl = block_diag(L)
    # P^T BD(L) P: unshuffle the rows (columns of the transpose), then right-multiply by P.
    m = jnp.swapaxes(perfect_unshuffle(jnp.swapaxes(bl, -1, -2), nb), -1, -2)
    m = perfect_unshuffle(m, nb)
    return mm(m, block_diag(R))
