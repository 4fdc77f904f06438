"""Geodesics on SO(b) (and on the product of blocks) with the Frobenius metric.

    gamma(t) = U1 (U1^T U2)^t = U1 exp(t log(U1^T U2))          (docs/math.md §3.1, paper eq. (4))

``gamma(0) = U1``, ``gamma(1) = U2``; its speed is constant and equal to the geodesic
distance ``d(U1, U2) = ||log(U1^T U2)||_F``. The fractional power is computed by the real
spectral formula of :mod:`orthofuse_jax.geometry.spectral` (no ``eig``, GPU-safe). Block
stacks are independent: the product-manifold distance is the 2-norm of the per-block ones.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import jax
import jax.numpy as jnp

from ._linalg import geodesic_point, mm, native_target, solve_pd, tracing_cpu_only
from ._types import Array, Block, Bool, Float
from .cayley import cayley, relative_cayley, skew
from .polynomial import expm_skew_taylor
from .spectral import (
    DEFAULT_ANGLE_TOL,
    decompose_rotation,
    decompose_skew,
    is_concrete,
    log_with_flag,
    polar_step,
    raise_if_negative_eigenvalue,
    rotation_angles,
    sinc_ratio,
)

__all__ = [
    "GeodesicPath",
    "curve_speed",
    "geodesic",
    "geodesic_distance",
    "geodesic_path",
    "geodesic_path_cayley",
    "geodesic_speed",
    "geodesic_with_flag",
    "relative_rotation",
]


def relative_rotation(u1: Block, u2: Block) -> Block:
    """``W = U1^T U2``, the rotation that carries ``U1`` to ``U2`` (``U2 = U1 W``)."""
    return mm(jnp.swapaxes(u1, -1, -2), u2)


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class GeodesicPath:
    """The t-independent half of the block geodesics ``U1 -> U2``, evaluated cheaply at any t.

    With ``W = U1^T U2``, ``S = invCay(W)`` and ``-S^2 = V diag(sigma^2) V^T`` (one solve and one
    real ``eigh``, done by :func:`geodesic_path`), every point is

        gamma(t) = U1 [V diag(cos(t theta)) V^T + S V diag(sin(t theta)/sigma) V^T],  theta = 2 arctan(sigma)
                 = [A diag(cos(t theta)) + B diag(sin(t theta)/sigma)] V^T,  A = U1 V,  B = U1 S V

    (``spectral.py``, formula (*)). ``A`` and ``B`` are formed once, so a point costs one matmul
    plus the two of a Newton-Schulz polar step: a sweep over T values of t costs one decomposition
    plus T cheap evaluations (``jax.vmap`` over :meth:`at`).

    Attributes:
      a: ``U1 V``; b: ``U1 S V`` with ``S = invCay(U1^T U2)``; v, sigma: eigenvectors and ``sqrt``
      eigenvalues of ``-S^2``; bad: ``[...]`` True where ``U1^T U2`` has an eigenvalue within
      ``angle_tol`` of -1 (or non-finite input); :meth:`at` returns NaN blocks there.
    """

    a: Block
    b: Block
    v: Block
    sigma: Float[Array, "*batch b"]
    bad: Bool[Array, "*batch"]

    @property
    def theta(self) -> Float[Array, "*batch b"]:
        return 2.0 * jnp.arctan(self.sigma)

    @property
    def start(self) -> Block:
        """``U1 = A V^T``."""
        return mm(self.a, jnp.swapaxes(self.v, -1, -2))

    def at(self, t) -> Block:
        """``gamma(t)`` for a scalar ``t`` (or an array broadcasting against the batch shape)."""
        return self.at_restored(t, None)

    def at_restored(self, t, eta) -> Block:
        """``Cay(eta gamma(t))`` (the reference's ``curve_over_id`` restoration), or ``gamma(t)`` for
        ``eta=None``; on the CPU one compiled pass per block (:func:`~orthofuse_jax.geometry._linalg.geodesic_point`)."""
        t = jnp.asarray(t, dtype=self.a.dtype)[..., None]
        phi = t * self.theta
        r = sinc_ratio(phi, self.sigma, 2.0 * t)
        # polar(U1 X) = U1 polar(X) for orthogonal U1: the polar step also absorbs U1's rounding.
        y = geodesic_point(self.a, self.b, self.v, jnp.cos(phi), r, eta)
        return jnp.where(self.bad[..., None, None], jnp.nan, y)


def geodesic_path(u1: Block, u2: Block, *, angle_tol: float = DEFAULT_ANGLE_TOL) -> GeodesicPath:
    """Decompose ``W = U1^T U2`` once (inverse Cayley + real ``eigh``) for evaluation at many t."""
    s, v, sigma, _, bad = decompose_rotation(relative_rotation(u1, u2), angle_tol)
    return _path(u1, s, v, sigma, bad)


def geodesic_path_cayley(
    a1: Block, a2: Block, *, angle_tol: float = DEFAULT_ANGLE_TOL
) -> GeodesicPath:
    """:func:`geodesic_path` from ``Cay(A1)`` to ``Cay(A2)``, given the raw Cayley parameters.

    Equal to ``geodesic_path(cayley(a1), cayley(a2))`` in exact arithmetic, without its pivoted
    inverse Cayley solve. On GPUs and TPUs (and without the compiled CPU kernels) the relative
    Cayley parameter is :func:`~orthofuse_jax.geometry.relative_cayley`: one pivoted solve, and
    ``Cay(A2)`` is never formed. On the CPU with the compiled kernels it is ``invCay(W)``,
    ``W = Cay(A1)^T Cay(A2)``, solved without pivoting (``W + I`` has the positive definite
    symmetric part ``I + sym(W)`` wherever the path is defined: every rotation angle below pi,
    the others are flagged ``bad``): there these three compiled passes cost less than LAPACK's
    one pivoted solve (1.32 s against 1.69 s for the path of 11520 40x40 blocks, one core).
    """
    u1 = cayley(a1)

    def via_rotations(a1, a2):
        w = relative_rotation(u1, cayley(a2))
        eye = jnp.eye(w.shape[-1], dtype=w.dtype)
        return skew(solve_pd(w + eye, w - eye))

    if native_target("cayley", a1.dtype, a1.shape[-1]) is None:
        s = relative_cayley(a1, a2)
    elif tracing_cpu_only():
        s = via_rotations(a1, a2)
    else:
        s = jax.lax.platform_dependent(a1, a2, cpu=via_rotations, default=relative_cayley)
    s, v, sigma, _, bad = decompose_skew(s, angle_tol)
    return _path(u1, s, v, sigma, bad)


def _path(u1: Block, s: Block, v: Block, sigma, bad) -> GeodesicPath:
    return GeodesicPath(a=mm(u1, v), b=mm(mm(u1, s), v), v=v, sigma=sigma, bad=bad)


def geodesic(
    u1: Block, u2: Block, t, *, angle_tol: float = DEFAULT_ANGLE_TOL, algorithm: str = "eigh"
) -> Block:
    """Point ``gamma(t) = U1 (U1^T U2)^t`` of the geodesic from ``U1`` (t=0) to ``U2`` (t=1).

    Args:
      u1, u2: orthogonal blocks ``[..., b, b]``; their relative rotation must have no
        eigenvalue -1 (raises on concrete input, NaN blocks under ``jit``).
      t: scalar or array broadcasting against ``u1.shape[:-2]``; values outside [0, 1]
        extrapolate along the same geodesic.
      algorithm: ``"eigh"`` (:func:`geodesic_path`, the spectral formula) or ``"matmul"``:
        ``U1 expm(t log(U1^T U2))`` with products only (:func:`geodesic_with_flag`), faster on
        GPUs. Equal to float32 round-off.
    """
    t = jnp.asarray(t, dtype=u1.dtype)
    if algorithm == "eigh":
        path = geodesic_path(u1, u2, angle_tol=angle_tol)
        y, bad = path.at(t), path.bad
    else:
        y, bad = geodesic_with_flag(u1, u2, t, angle_tol=angle_tol, algorithm=algorithm)
    if is_concrete(u1, u2, t):
        raise_if_negative_eigenvalue(bad, "geodesic")
    return y


def geodesic_with_flag(
    u1: Block, u2: Block, t, *, angle_tol: float = DEFAULT_ANGLE_TOL, algorithm: str = "matmul"
) -> tuple[Block, Bool[Array, "*batch"]]:
    """``(gamma(t), bad)`` as ``U1 expm(t log(U1^T U2))``; ``bad`` as in :class:`GeodesicPath`.

    The logarithm is :func:`~orthofuse_jax.geometry.log_with_flag` (``algorithm``), the
    exponential :func:`~orthofuse_jax.geometry.expm_skew_taylor`, then one Newton-Schulz polar
    step. With ``algorithm="matmul"`` this uses products only whenever every relative rotation
    angle is below about 2.4 rad (else ``eigh`` for the log, by ``jax.lax.cond``); the
    exponential is exact for ``|t| theta <= 128`` (its 8 squarings). For many t of one pair,
    :func:`geodesic_path` is cheaper per point.
    """
    x, bad = log_with_flag(relative_rotation(u1, u2), angle_tol=angle_tol, algorithm=algorithm)
    t = jnp.asarray(t, dtype=u1.dtype)[..., None, None]
    y = polar_step(mm(u1, expm_skew_taylor(t * x)))
    return jnp.where(bad[..., None, None], jnp.nan, y), bad


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
