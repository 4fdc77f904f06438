"""Functions of rotation angles of orthogonal blocks, in real arithmetic (docs/math.md §3.1, §8).

Every ``U`` in ``SO(b)`` without an eigenvalue ``-1`` is ``Cay(S)`` for a skew ``S``. On each
eigenspace of ``-S^2 = V diag(sigma^2) V^T`` (symmetric positive semidefinite, so a real
``eigh``), ``J = S / sigma`` is a complex structure and ``U = cos(theta) I + sin(theta) J`` with
``theta = 2 arctan(sigma)``. Any odd angle map ``theta -> phi(theta)`` therefore acts as

    U  ->  V diag(cos phi) V^T  +  S V diag(sin(phi) / sigma) V^T                        (*)

which gives, with no complex numbers and no ``eig``:

* ``log U   = S V diag(theta / sigma) V^T``           (principal logarithm)
* ``U^t     = (*) with phi = t theta``                 (fractional power, any real t)
* ``exp(f log U) = (*) with phi = f theta``            (the exact spectral map, paper eq. (6))
* ``exp(S)  = V diag(cos sigma) V^T + S V diag(sin(sigma)/sigma) V^T`` for skew S.

Only functions of ``sigma^2`` enter, so repeated eigenvalues (always present: they come in
pairs) and the null space of S are harmless; ``eigh``, ``solve`` and matmuls run natively on
GPU/TPU under ``jit``.

Domain: the principal logarithm does not exist as a real matrix when U has an eigenvalue
``-1`` (a rotation by pi). Blocks whose largest rotation angle is within ``angle_tol``
(default 1e-4) of pi are *flagged*: :func:`log_with_flag` and :func:`spectral_map_with_flag`
return NaN for those blocks and a boolean ``bad`` array of shape ``U.shape[:-2]``;
:func:`log`, :func:`power` and :func:`spectral_map` raise :class:`NegativeEigenvalueError`
when called on concrete arrays (outside ``jit``), and inside ``jit`` return the NaN blocks,
which the caller can detect with ``jnp.isnan`` (or by using the ``*_with_flag`` variants).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from ._linalg import mm, polar_step
from ._types import Array, Block, Bool, Float
from .cayley import inverse_cayley
from .polynomial import LOG_POLYNOMIAL_MAX_ANGLE, log_polynomial

__all__ = [
    "DEFAULT_ANGLE_TOL",
    "LOG_ALGORITHMS",
    "NegativeEigenvalueError",
    "expm_skew",
    "log",
    "log_with_flag",
    "power",
    "rotation_angles",
    "spectral_map",
    "spectral_map_with_flag",
]

DEFAULT_ANGLE_TOL = 1e-4


class NegativeEigenvalueError(ValueError):
    """An orthogonal block has an eigenvalue at (or within tolerance of) -1."""


@jax.custom_jvp
def _eigh_paired(m: Block) -> tuple[Array, Array]:
    """``jnp.linalg.eigh`` of ``M = -S^2``, whose eigenvalues come in equal pairs, with a
    derivative that stays finite there.

    The eigenvector derivative ``dV = V (F * V^T dM V)``, ``F_ij = 1 / (lam_j - lam_i)``, divides
    by zero within a pair. Every ``dM`` here comes from a skew ``dS``, which keeps the pairs paired,
    so ``V^T dM V`` vanishes between the two vectors of a pair (in any basis of it): those terms
    of ``F`` are set to zero, and functions of ``M`` get their exact derivative.
    """
    lam, v = jnp.linalg.eigh(m)
    return lam, v


@_eigh_paired.defjvp
def _eigh_paired_jvp(primals, tangents):
    (m,), (dm,) = primals, tangents
    lam, v = _eigh_paired(m)
    p = mm(jnp.swapaxes(v, -1, -2), mm(dm, v))
    gap = lam[..., None, :] - lam[..., :, None]
    scale = jnp.max(jnp.abs(lam), axis=-1, keepdims=True)[..., None]
    apart = jnp.abs(gap) > 64 * jnp.finfo(lam.dtype).eps * jnp.maximum(scale, 1.0)
    f = jnp.where(apart, 1.0 / jnp.where(apart, gap, 1.0), 0.0)
    return (lam, v), (jnp.diagonal(p, axis1=-2, axis2=-1), mm(v, f * p))


def _eigh_sq(s: Block) -> tuple[Array, Array]:
    """``lam, V`` with ``-S^2 = V diag(lam) V^T`` and ``lam >= 0`` (clamped)."""
    m = mm(jnp.swapaxes(s, -1, -2), s)  # = -S^2 for skew S, symmetric PSD
    m = 0.5 * (m + jnp.swapaxes(m, -1, -2))
    lam, v = _eigh_paired(m)
    return jnp.maximum(lam, 0.0), v


def sinc_ratio(phi: Array, sigma: Array, limit: Array) -> Array:
    """``sin(phi) / sigma`` with the value ``limit`` where ``sigma == 0``."""
    safe = jnp.where(sigma > 0, sigma, 1.0)
    return jnp.where(sigma > 0, jnp.sin(phi) / safe, limit)


def _rotate(s: Block, v: Array, cos_phi: Array, sin_over_sigma: Array) -> Block:
    """Evaluate (*): ``V diag(c) V^T + S V diag(r) V^T``."""
    vt = jnp.swapaxes(v, -1, -2)
    return mm(v * cos_phi[..., None, :], vt) + mm(s, mm(v * sin_over_sigma[..., None, :], vt))


def _finite_blocks(x: Array) -> Array:
    return jnp.all(jnp.isfinite(x), axis=(-1, -2))


def _angle_threshold(angle_tol: float) -> float:
    # theta = 2 arctan(sigma) > pi - tol  <=>  sigma > tan((pi - tol) / 2) = cot(tol / 2)
    return float(1.0 / np.tan(angle_tol / 2.0))


def decompose_rotation(u: Block, angle_tol: float):
    return decompose_skew(inverse_cayley(u), angle_tol)


def decompose_skew(s: Block, angle_tol: float):
    """``S, V, sigma, theta, bad`` for the rotation ``Cay(S)`` with skew Cayley parameter ``S``."""
    lam, v = _eigh_sq(s)
    sigma = jnp.sqrt(lam)
    theta = 2.0 * jnp.arctan(sigma)
    bad = ~_finite_blocks(s) | (jnp.max(sigma, axis=-1) > _angle_threshold(angle_tol))
    return s, v, sigma, theta, bad


def is_concrete(*trees) -> bool:
    """Whether no leaf of ``trees`` (arrays, or pytrees of them) is a tracer: the values can be
    read on the host (to raise on flagged blocks, or to run a stack as a loop over chunks)."""
    leaves = jax.tree_util.tree_leaves(trees)
    return not any(isinstance(x, jax.core.Tracer) for x in leaves)


def raise_if_negative_eigenvalue(bad: Array, what: str) -> None:
    flags = np.asarray(bad)
    if flags.any():
        where = np.argwhere(flags)
        first = tuple(int(i) for i in where[0])
        raise NegativeEigenvalueError(
            f"{what}: {int(flags.sum())} block(s) have an eigenvalue at -1 (a rotation within the "
            f"angle tolerance of pi), first at block index {first}; the real principal logarithm "
            "is not defined there"
        )


def rotation_angles(u: Block) -> Float[Array, "*batch b"]:
    """Rotation angles ``theta in [0, pi)`` of each block (each plane's angle appears twice).

    Computed as ``2 arctan(sigma)`` from the inverse Cayley parameter; a block with an
    eigenvalue -1 gives ``pi`` (or NaN).

    .. note:: ``sigma^2`` comes from ``eigh(-S^2)``, so a zero angle (a null direction of S,
       always present for odd b) is resolved only to about ``sqrt(eps) * max sigma``; squared
       angles (hence :func:`~orthofuse_jax.geometry.geodesic_distance`) are accurate to about
       ``eps * max sigma^2``. Functions of U built from (*) are not affected.
    """
    _, _, _, theta, _ = decompose_rotation(u, DEFAULT_ANGLE_TOL)
    return theta


def expm_skew(a: Block) -> Block:
    """``expm(skew(A))`` for every block, via a real ``eigh`` (exact for all angles)."""
    s = 0.5 * (a - jnp.swapaxes(a, -1, -2))
    lam, v = _eigh_sq(s)
    sigma = jnp.sqrt(lam)
    return _rotate(s, v, jnp.cos(sigma), sinc_ratio(sigma, sigma, jnp.ones_like(sigma)))


LOG_ALGORITHMS = ("eigh", "matmul")


def log_with_flag(
    u: Block, *, angle_tol: float = DEFAULT_ANGLE_TOL, algorithm: str = "eigh"
) -> tuple[Block, Bool[Array, "*batch"]]:
    """Principal logarithm of orthogonal blocks and a per-block flag of where it is undefined.

    ``algorithm="eigh"``: ``log U = S V diag(theta / sigma) V^T`` with ``S = invCay(U)`` (module
    docstring). ``algorithm="matmul"``: the product-only polynomial of
    :func:`~orthofuse_jax.geometry.log_polynomial` when every block's angles are below about
    2.4 rad, else the ``eigh`` form for the blocks beyond (computed for the stack only when one
    is, by ``jax.lax.cond``). Same results to
    float32 round-off; ``matmul`` is several times faster on GPUs, where a batched ``eigh`` is
    slow. Under ``jax.vmap`` over a batched stack the ``cond`` evaluates both branches.

    Returns:
      ``(X, bad)``: skew blocks ``X`` with ``expm(X) = U``; ``bad[...]`` is True for blocks
      with a rotation angle within ``angle_tol`` of pi (or non-finite input), and those
      blocks of ``X`` are NaN.
    """
    if algorithm not in LOG_ALGORITHMS:
        raise ValueError(f"algorithm must be one of {LOG_ALGORITHMS}, got {algorithm!r}")
    if algorithm == "matmul":
        if angle_tol >= np.pi - LOG_POLYNOMIAL_MAX_ANGLE - 0.1:  # then ok would not imply "not bad"
            return log_with_flag(u, angle_tol=angle_tol)
        x, ok = log_polynomial(u)  # ok: angles <= ~2.45 < pi - angle_tol, so not bad

        def fallback():
            # per block, so a block's result does not depend on the others in its stack (chunks)
            xe, bad = log_with_flag(u, angle_tol=angle_tol)
            return jnp.where(ok[..., None, None], x, xe), bad & ~ok

        return jax.lax.cond(jnp.all(ok), lambda: (x, ~ok), fallback)
    s, v, sigma, theta, bad = decompose_rotation(u, angle_tol)
    ratio = jnp.where(sigma > 0, theta / jnp.where(sigma > 0, sigma, 1.0), 2.0)
    x = mm(s, mm(v * ratio[..., None, :], jnp.swapaxes(v, -1, -2)))
    x = 0.5 * (x - jnp.swapaxes(x, -1, -2))
    return jnp.where(bad[..., None, None], jnp.nan, x), bad


def log(u: Block, *, angle_tol: float = DEFAULT_ANGLE_TOL, algorithm: str = "eigh") -> Block:
    """Principal logarithm of orthogonal blocks (skew result).

    Raises :class:`NegativeEigenvalueError` on concrete input with an eigenvalue at -1;
    under ``jit`` such blocks come back as NaN (see :func:`log_with_flag`, also for ``algorithm``).
    """
    x, bad = log_with_flag(u, angle_tol=angle_tol, algorithm=algorithm)
    if is_concrete(u):
        raise_if_negative_eigenvalue(bad, "log")
    return x


def spectral_map_with_flag(
    u: Block,
    angle_map: Callable[[Array], Array],
    *,
    angle_tol: float = DEFAULT_ANGLE_TOL,
) -> tuple[Block, Bool[Array, "*batch"]]:
    """Apply an odd map of rotation angles ``theta -> angle_map(theta)`` to every block.

    The result is ``V diag(cos phi) V^T + S V diag(sin(phi)/sigma) V^T`` (module docstring),
    exact for any output angle (no wrap-around problem). ``angle_map`` must be odd with
    ``angle_map(0) = 0`` (it is evaluated on ``theta >= 0``) and may close over arrays that
    broadcast against the angles ``[..., b]``.

    Returns:
      ``(Y, bad)`` as in :func:`log_with_flag`.
    """
    s, v, sigma, theta, bad = decompose_rotation(u, angle_tol)
    phi = angle_map(theta)
    # As sigma -> 0: sin(phi)/sigma -> phi'(0) * dtheta/dsigma(0) = 2 phi'(0).
    _, slope0 = jax.jvp(angle_map, (jnp.zeros_like(theta),), (jnp.ones_like(theta),))
    y = polar_step(_rotate(s, v, jnp.cos(phi), sinc_ratio(phi, sigma, 2.0 * slope0)))
    return jnp.where(bad[..., None, None], jnp.nan, y), bad


def spectral_map(
    u: Block, angle_map: Callable[[Array], Array], *, angle_tol: float = DEFAULT_ANGLE_TOL
) -> Block:
    """:func:`spectral_map_with_flag` that raises on concrete input with an eigenvalue at -1."""
    y, bad = spectral_map_with_flag(u, angle_map, angle_tol=angle_tol)
    if is_concrete(u):
        raise_if_negative_eigenvalue(bad, "spectral_map")
    return y


def power(u: Block, t, *, angle_tol: float = DEFAULT_ANGLE_TOL) -> Block:
    """Fractional power ``U^t = exp(t log U)`` of orthogonal blocks, for any real ``t``.

    ``t`` is a scalar or an array broadcasting against the block batch shape ``u.shape[:-2]``.
    The exact spectral map ``Y -> exp(f log Y)`` of the paper (eq. (6)) is ``power(Y, f)``.
    """
    t = jnp.asarray(t, dtype=u.dtype)[..., None]
    y, bad = spectral_map_with_flag(u, lambda th: t * th, angle_tol=angle_tol)
    if is_concrete(u, t):
        raise_if_negative_eigenvalue(bad, "power")
    return y
