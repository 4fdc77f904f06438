"""Block-level merge maps: pure, jit/vmap-safe, ``[..., b, b]``, dtype-generic.

One convention everywhere: ``t = 0`` is the first (concept) block, ``t = 1`` the second (style).

* :func:`geodesic_blocks` -- the exact SO(b) geodesic ``U1 (U1^T U2)^t`` (docs/math.md §3.1,
  paper eq. (4)).
* :func:`cayley_space_blocks` -- the fast merge ``Cay((1-t) skew(A1) + t skew(A2))`` on RAW Cayley
  parameters (docs/math.md §3.2, paper eq. (38)).

Spectra restoration, with the phase multiplier (paper eqs. (6)-(8), docs/math.md §3.3)

    f(t) = 1 + 4 (alpha - 1) t (1 - t)            (two adapters; f(0) = f(1) = 1, f(1/2) = alpha)
    f(w) = 1 + 2 (alpha - 1) (1 - sum_i w_i^2)    (N adapters; equals f(t) for w = (1 - t, t):
                                                   1 - (1-t)^2 - t^2 = 2 t (1 - t))

* :func:`curve_over_id` / :func:`cayley_restored`: ``Cay(eta Y)``, ``eta = f / 2``; with
  ``alpha = 2`` this is exactly the reference's ``curve_over_id`` (``eta = 0.5 + 2 p (1 - p)``).
  Like the reference it does not restore the endpoints exactly (``theta -> theta - theta^3/4`` at
  t = 0, 1) and caps rotations at pi/2.
* :func:`restore_exact`: ``exp(f log Y)`` (paper eq. (6)), a real spectral map of the rotation
  angles; ``f = 1`` at the endpoints, so t = 0 and t = 1 return the inputs.
"""

from __future__ import annotations

import jax.numpy as jnp

from ..geometry import DEFAULT_ANGLE_TOL, geodesic, power
from ..geometry._linalg import cayley_map, mm
from ..geometry._types import Array, Block, Float

__all__ = [
    "cayley_restored",
    "cayley_space_blocks",
    "curve_over_id",
    "geodesic_blocks",
    "orthogonality_error",
    "restoration_factor",
    "restore_exact",
]


def geodesic_blocks(u1: Block, u2: Block, t, *, angle_tol: float = DEFAULT_ANGLE_TOL) -> Block:
    """Exact SO(b) geodesic ``U1 (U1^T U2)^t`` (docs/math.md §3.1, paper eq. (4)); ``t = 0 -> U1``, ``t = 1 -> U2``.

    The reference computes ``U1 Re(expm(-t V diag(i Arg lambda) V^H))`` from a complex ``eig`` of
    ``U2^T U1``, which is wrong for repeated eigenvalues and at -1 (docs/math.md §8); this is the real
    principal-log form (:func:`orthofuse_jax.geometry.geodesic`). Raises
    :class:`~orthofuse_jax.geometry.NegativeEigenvalueError` on concrete input whose relative
    rotation has an eigenvalue -1; NaN blocks under ``jit``.

    Args:
      u1, u2: orthogonal blocks ``[..., b, b]``.
      t: scalar or array broadcasting against ``u1.shape[:-2]``.
    """
    return geodesic(u1, u2, t, angle_tol=angle_tol)


def cayley_space_blocks(a1: Block, a2: Block, t) -> Block:
    """Fast merge ``Cay((1 - t) skew(A1) + t skew(A2))`` on RAW Cayley parameters (docs/math.md §3.2, eq. (38)).

    Our convention: ``t = 0 -> Cay(A1)``, ``t = 1 -> Cay(A2)``. The reference's
    ``merge_inside_cayley_space([A1, A2], [t', 1 - t'])`` is this function at ``t = 1 - t'``
    (docs/math.md §3.4).
    """
    t = jnp.asarray(t, dtype=a1.dtype)
    return cayley_map(a1, a2, c1=1.0 - t, c2=t)


def curve_over_id(u: Block, p) -> Block:
    """The reference's spectra restoration ``Cay(eta U)``, ``eta = 0.5 + 2 p (1 - p)`` (docs/math.md §3.3).

    ``U`` is an orthogonal block; ``Cay`` takes its skew part, so this is ``Cay(eta (U - U^T)/2)``
    and maps each rotation angle ``theta`` to ``2 arctan(eta sin theta)``. The reference asserts
    ``0 <= p <= 1``; this pure function does not check (``merge`` checks t).
    """
    p = jnp.asarray(p, dtype=u.dtype)
    return cayley_map(u, c1=0.5 + 2.0 * p * (1.0 - p))


def cayley_restored(s: Block, eta) -> Block:
    """``Cay(eta Cay(S))`` -- Cayley-space merge followed by ``curve_over_id`` -- in one pass.

    ``skew(Cay(S)) = 2 S (I - S^2)^{-1}``, and every factor is a rational function of the same
    skew ``S``, so they commute and

        Cay(eta Cay(S)) = (I - S^2 + 2 eta S) (I - S^2 - 2 eta S)^{-1}.

    The matrix solved against has symmetric part ``I - S^2 = I + S^T S >= I``: it is never
    singular and its inverse has norm at most 1, so this one solve (XLA; GPUs and TPUs) is as
    well conditioned as the reference's two (docs/math.md §3.2 + 3.7, preset ``moft_merge_fast``). On the
    CPU the compiled kernel instead inverts ``I - S`` and ``I - eta skew(Cay(S))`` in place, in
    double (:func:`~orthofuse_jax.geometry._linalg.cayley_map`).

    Args:
      s: skew blocks ``[..., b, b]`` (e.g. ``(1 - t) skew(A1) + t skew(A2)``).
      eta: scalar or array broadcasting against ``s.shape[:-2]`` (``0.5 + 2p(1-p)`` in docs/math.md §3.3).
    """
    return cayley_map(s, c=2.0 * jnp.asarray(eta, dtype=s.dtype), square=True)


def restoration_factor(t, alpha=2.0):
    """Phase multiplier ``f(t) = 1 + 4 (alpha - 1) t (1 - t)`` (paper eq. (8), docs/math.md §3.3)."""
    return 1.0 + 4.0 * (alpha - 1.0) * t * (1.0 - t)


def restore_exact(u: Block, t, alpha=2.0, *, angle_tol: float = DEFAULT_ANGLE_TOL) -> Block:
    """Exact restoration ``exp(f(t) log U)``, ``f(t) = 1 + 4 (alpha - 1) t (1 - t)`` (paper eqs. (6), (8)).

    ``f(0) = f(1) = 1`` (endpoints unchanged), ``f(1/2) = alpha``; ``alpha = 1`` is the identity
    map, ``alpha = 0`` collapses the midpoint to the identity matrix. Computed as
    :func:`orthofuse_jax.geometry.power` ``(U, f)``; raises on concrete blocks with an eigenvalue -1.
    """
    return power(u, restoration_factor(jnp.asarray(t, dtype=u.dtype), alpha), angle_tol=angle_tol)


def orthogonality_error(u: Block) -> Float[Array, "*batch"]:
    """Per-block ``||U^T U - I||_max``."""
    eye = jnp.eye(u.shape[-1], dtype=u.dtype)
    return jnp.max(jnp.abs(mm(jnp.swapaxes(u, -1, -2), u) - eye), axis=(-1, -2))
