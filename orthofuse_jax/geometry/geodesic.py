"""Geodesics on SO(b) (and on the product of blocks) with the Frobenius metric.

    gamma(t) = U1 (U1^T U2)^t = U1 exp(t log(U1^T U2))          (SPEC 3.2, paper eq. (4))

``gamma(0) = U1``, ``gamma(1) = U2``; its speed is constant and equal to the geodesic
distance ``d(U1, U2) = ||log(U1^T U2)||_F``. The fractional power is computed by the real
spectral formula of :mod:`orthofuse_jax.geometry.spectral` (no ``eig``, GPU-safe). Block
stacks are independent: the product-manifold distance is the 2-norm of the per-block ones.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from ._types import Array, Block, Float
from .spectral import DEFAULT_ANGLE_TOL, power, rotation_angles

__all__ = ["geodesic", "geodesic_distance", "curve_speed", "geodesic_speed", "relative_rotation"]


def relative_rotation(u1: Block, u2: Block) -> Block:
    """``W = U1^T U2``, the rotation that carries ``U1`` to ``U2`` (``U2 = U1 W``)."""
    return jnp.swapaxes(u1, -1, -2) @ u2


def geodesic(u1: Block, u2: Block, t, *, angle_tol: float = DEFAULT_ANGLE_TOL) -> Block:
    """Point ``gamma(t) = U1 (U1^T U2)^t`` of the geodesic from ``U1`` (t=0) to ``U2`` (t=1).

    Args:
      u1, u2: orthogonal blocks ``[..., b, b]``; their relative rotation must have no
        eigenvalue -1 (raises on concrete input, NaN blocks under ``jit``).
      t: scalar or array broadcasting against ``u1.shape[:-2]``; values outside [0, 1]
        extrapolate along the same geodesic.
    """
    return u1 @ power(relative_rotation(u1, u2), t, angle_tol=angle_tol)


def geodesic_distance(u1: Block, u2: Block) -> Float[Array, "*batch"]:
    """Per-block geodesic distance ``||log(U1^T U2)||_F = sqrt(sum_i theta_i^2)``.

    Defined (and accurate) up to rotation angles just below pi; a relative rotation with an
    exact eigenvalue -1 may give NaN (see :func:`~orthofuse_jax.geometry.rotation_angles`).
    """
    theta = rotation_angles(relative_rotation(u1, u2))
    return jnp.sqrt(jnp.sum(theta**2, axis=-1))


def curve_speed(curve: Callable[[Array], Block], t) -> Float[Array, "*batch"]:
    """Speed ``||d curve / dt||_F`` per block at ``t``, by forward-mode differentiation."""
    t = jnp.asarray(t)
    _, dc = jax.jvp(curve, (t,), (jnp.ones_like(t),))
    return jnp.sqrt(jnp.sum(dc**2, axis=(-1, -2)))


def geodesic_speed(u1: Block, u2: Block, t) -> Float[Array, "*batch"]:
    """Measured speed of :func:`geodesic` at ``t`` (differentiated, not the closed form)."""
    t = jnp.asarray(t, dtype=u1.dtype)
    return curve_speed(lambda s: geodesic(u1, u2, s), t)


