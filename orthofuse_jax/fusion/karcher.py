"""Weighted means of N orthogonal blocks: the Karcher (Frechet) mean and the Cayley-space mean.

Karcher mean (the N-adapter merge; paper's barycentric extension of the geodesic merge):
the minimiser of ``sum_i w_i d(M, U_i)^2`` on SO(b) with ``d(A, B) = ||log(A^T B)||_F``, found by
the classical fixed-point (Riemannian gradient) iteration

    G_k     = sum_i w_i log(M_k^T U_i)          (tangent vector at M_k, skew; minus the gradient)
    M_{k+1} = M_k exp(G_k)

(Karcher 1977; Buss & Fillmore 2001; Moakher, *SIAM J. Matrix Anal. Appl.* 24(1), 2002, eq. (3.12)).
It stops when ``max |G_k| <= tol`` or after ``max_iter`` steps and returns that residual, as
optax's ``matrix_inverse_pth_root`` returns its error. Start: the input with the largest weight.

Cayley-space mean (docs/math.md §3.2, paper eq. (38), for N adapters): ``Cay(sum_i w_i skew(A_i))`` on raw
Cayley parameters ``A_i``.

.. note::
   The fixed point converges (linearly, typically in a handful of steps) when all blocks lie in a
   geodesic ball of radius below pi/2 around the mean, the situation of adapters near the
   identity (paper Lemma 3). For widely spread blocks it can stall; check the residual. The log
   is undefined where ``M_k^T U_i`` has an eigenvalue -1: those blocks are flagged and become NaN.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ..geometry import DEFAULT_ANGLE_TOL, cayley, expm_skew, log_with_flag, skew
from ..geometry._linalg import mm
from ..geometry._types import Array, Block, Bool, Float

__all__ = ["cayley_mean_blocks", "karcher_mean_blocks", "karcher_mean_blocks_with_flag"]


def _weights(weights, k: int, dtype) -> Array:
    w = jnp.asarray(weights, dtype=dtype)
    if w.shape != (k,):
        raise ValueError(
            f"weights must have shape ({k},) to match the {k} stacked inputs, got {w.shape}"
        )
    return w


def karcher_mean_blocks_with_flag(
    u: Float[Array, "k *batch b b"],
    weights: Float[Array, " k"],
    *,
    tol: float = 1e-6,
    max_iter: int = 50,
    angle_tol: float = DEFAULT_ANGLE_TOL,
) -> tuple[Block, Float[Array, ""], Array, Bool[Array, "*batch"]]:
    """:func:`karcher_mean_blocks` plus a per-block flag ``bad`` (eigenvalue -1 met; those blocks are NaN)."""
    k = u.shape[0]
    w = _weights(weights, k, u.dtype)
    wb = w.reshape((k,) + (1,) * (u.ndim - 1))

    def tangent(m):
        x, bad = log_with_flag(mm(jnp.swapaxes(m, -1, -2)[None], u), angle_tol=angle_tol)
        bad = jnp.any(bad, axis=0)
        g = jnp.sum(wb * jnp.where(bad[None, ..., None, None], 0.0, x), axis=0)
        res = jnp.max(jnp.abs(g)) if g.size else jnp.zeros((), u.dtype)
        return g, res, bad

    m0 = jnp.take(u, jnp.argmax(w), axis=0)
    g0, r0, bad0 = tangent(m0)

    def cond(state):
        _, _, res, it, _ = state
        return (res > tol) & (it < max_iter)

    def body(state):
        m, g, _, it, bad = state
        m = mm(m, expm_skew(g))
        g, res, bad_new = tangent(m)
        return m, g, res, it + 1, bad | bad_new

    m, _, res, it, bad = jax.lax.while_loop(
        cond, body, (m0, g0, r0, jnp.zeros((), jnp.int32), bad0)
    )
    m = jnp.where(bad[..., None, None], jnp.nan, m)
    return m, res, it, bad


def karcher_mean_blocks(
    u: Float[Array, "k *batch b b"],
    weights: Float[Array, " k"],
    *,
    tol: float = 1e-6,
    max_iter: int = 50,
    angle_tol: float = DEFAULT_ANGLE_TOL,
) -> tuple[Block, Float[Array, ""], Array]:
    """Weighted Karcher mean of ``k`` stacks of orthogonal blocks, block by block.

    Fixed point ``M <- M exp(sum_i w_i log(M^T U_i))`` (module docstring), in a ``lax.while_loop``.

    Args:
      u: ``[k, ..., b, b]``: ``k`` inputs, each a stack of orthogonal blocks (same batch shape).
      weights: ``[k]``, a probability vector (not checked here: this function is jit-pure; the
        adapter-level :func:`orthofuse_jax.fusion.merge` checks it).
      tol: stop when the largest entry of the tangent step ``G`` over all blocks is ``<= tol``.
        In float32 the log's rounding floor is ~1e-7 per entry, so 1e-6 is reachable for
        blocks near the identity; a larger floor shows up as ``iterations == max_iter``.
      max_iter: iteration cap.
      angle_tol: eigenvalue -1 tolerance of the log (see :mod:`orthofuse_jax.geometry.spectral`).

    Returns:
      ``(mean, residual, iterations)``: the mean ``[..., b, b]`` (NaN for blocks where a log was
      undefined), ``max |G|`` at the returned mean (the Riemannian gradient norm, entrywise) and
      the number of steps taken.

    Examples:
      >>> import jax.numpy as jnp
      >>> from orthofuse_jax.geometry import cayley
      >>> u = cayley(jnp.array([[[0.0, 0.3], [-0.3, 0.0]]] * 2)) # two copies of one block
      >>> mean, res, it = karcher_mean_blocks(u, jnp.array([0.5, 0.5]))
      >>> bool(jnp.allclose(mean, u[0], atol=1e-6)), int(it)
      (True, 0)
    """
    m, res, it, _ = karcher_mean_blocks_with_flag(
        u, weights, tol=tol, max_iter=max_iter, angle_tol=angle_tol
    )
    return m, res, it


def cayley_mean_blocks(a: Float[Array, "k *batch b b"], weights: Float[Array, " k"]) -> Block:
    """Weighted Cayley-space mean ``Cay(sum_i w_i skew(A_i))`` of raw Cayley parameters (docs/math.md §3.2, eq. (38)).

    The reference (``merge_inside_cayley_space``) asserts ``sum(ts) == 1`` with an exact float
    comparison (docs/math.md §8); here the weights are used as given and
    :func:`orthofuse_jax.fusion.merge` checks them with a tolerance.

    Args:
      a: ``[k, ..., b, b]`` raw parameters (only their skew part matters).
      weights: ``[k]``.
    Returns:
      Orthogonal blocks ``[..., b, b]`` (always defined: ``Cay`` has no singularity).
    """
    k = a.shape[0]
    w = _weights(weights, k, a.dtype).reshape((k,) + (1,) * (a.ndim - 1))
    return cayley(jnp.sum(w * skew(a), axis=0))
