"""Precomputed geodesic paths: the t-independent half of a block geodesic, evaluated cheaply at any t.

The geodesic from ``U1`` (t = 0) to ``U2`` (t = 1) on SO(b) is (SPEC 3.2, paper eq. (4))

    gamma(t) = U1 (U1^T U2)^t = U1 W^t,        W = U1^T U2.

With ``S = invCay(W)`` (skew) and ``-S^2 = V diag(sigma^2) V^T`` (a real ``eigh``), every fractional
power is (``orthofuse_jax.geometry.spectral``, module docstring, formula (*))

    W^t = V diag(cos(t theta)) V^T + S V diag(sin(t theta) / sigma) V^T,     theta = 2 arctan(sigma).

The inverse Cayley solve and the ``eigh`` do not depend on t; :func:`geodesic_path` does them once
and :meth:`GeodesicPath.at` costs four matmuls per block and t. A sweep over T values of t is one
decomposition plus T cheap evaluations (``jax.vmap`` over ``at``).

Same numerics as :func:`orthofuse_jax.geometry.geodesic` (one Newton-Schulz polar step on ``W^t``),
so a path point equals the geometry package's geodesic to rounding. This file re-derives the
private helpers of ``geometry/spectral.py`` instead of importing them, so the geometry package
stays free to change its internals.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from ..geometry import DEFAULT_ANGLE_TOL, inverse_cayley
from ..geometry._types import Array, Block, Bool, Float

__all__ = ["GeodesicPath", "geodesic_path", "angle_threshold"]


def angle_threshold(angle_tol: float) -> float:
    """Largest admissible ``sigma``: ``theta = 2 arctan(sigma) > pi - tol  <=>  sigma > cot(tol / 2)``."""
    return float(1.0 / np.tan(angle_tol / 2.0))


def _polar_step(y: Block) -> Block:
    eye = jnp.eye(y.shape[-1], dtype=y.dtype)
    return 0.5 * y @ (3.0 * eye - jnp.swapaxes(y, -1, -2) @ y)


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class GeodesicPath:
    """The t-independent part of the block geodesics ``U1 -> U2`` (all fields ``[..., b, b]`` or ``[..., b]``).

    Attributes:
      start: ``U1``.
      s: ``invCay(U1^T U2)`` (skew).
      v: eigenvectors of ``-S^2``.
      sigma: ``sqrt`` of its eigenvalues (``>= 0``); ``theta = 2 arctan(sigma)`` are the angles.
      bad: ``[...]`` True where ``U1^T U2`` has an eigenvalue within ``angle_tol`` of -1 (or the
        input is not finite); :meth:`at` returns NaN blocks there.
    """

    start: Block
    s: Block
    v: Block
    sigma: Float[Array, "*batch b"]
    bad: Bool[Array, "*batch"]

    @property
    def theta(self) -> Float[Array, "*batch b"]:
        return 2.0 * jnp.arctan(self.sigma)

    def at(self, t) -> Block:
        """``gamma(t) = U1 W^t`` for a scalar ``t`` (or an array broadcasting against the batch shape)."""
        t = jnp.asarray(t, dtype=self.start.dtype)[..., None]
        sigma = self.sigma
        phi = t * self.theta
        safe = jnp.where(sigma > 0, sigma, 1.0)
        # sin(t theta) / sigma -> 2 t as sigma -> 0 (theta ~ 2 sigma).
        ratio = jnp.where(sigma > 0, jnp.sin(phi) / safe, 2.0 * t)
        v = self.v
        vt = jnp.swapaxes(v, -1, -2)
        w = (v * jnp.cos(phi)[..., None, :]) @ vt + self.s @ ((v * ratio[..., None, :]) @ vt)
        y = self.start @ _polar_step(w)
        return jnp.where(self.bad[..., None, None], jnp.nan, y)


def geodesic_path(u1: Block, u2: Block, *, angle_tol: float = DEFAULT_ANGLE_TOL) -> GeodesicPath:
    """Decompose ``W = U1^T U2`` once (inverse Cayley + real ``eigh``) for evaluation at many t.

    Args:
      u1, u2: orthogonal blocks ``[..., b, b]`` of equal shape and dtype.
      angle_tol: blocks whose relative rotation has an angle within this of pi are flagged.
    Returns:
      A :class:`GeodesicPath` (a pytree: ``jax.vmap`` / ``jax.jit`` friendly).
    """
    w = jnp.swapaxes(u1, -1, -2) @ u2
    s = inverse_cayley(w)
    m = jnp.swapaxes(s, -1, -2) @ s  # -S^2, symmetric PSD
    m = 0.5 * (m + jnp.swapaxes(m, -1, -2))
    lam, v = jnp.linalg.eigh(m)
    sigma = jnp.sqrt(jnp.maximum(lam, 0.0))
    finite = jnp.all(jnp.isfinite(s), axis=(-1, -2))
    bad = ~finite | (jnp.max(sigma, axis=-1) > angle_threshold(angle_tol))
    return GeodesicPath(start=u1, s=s, v=v, sigma=sigma, bad=bad)
