"""Skew projection and the Cayley map on stacks of blocks (docs/math.md §1.2).

Convention (the reference's ``method="cayley"``)::

    skew(A) = (A - A^T) / 2
    Cay(A)  = (I + S)(I - S)^{-1} = (I - S)^{-1}(I + S),    S = skew(A)

``I - S`` is always invertible (eigenvalues ``1 - i sigma``, condition number
``sqrt(1 + sigma_max^2)``), so the Cayley map is defined and well conditioned for every A.
Its image is ``SO(b)`` minus the matrices with an eigenvalue ``-1``; there the inverse

    invCay(U) = (U - I)(U + I)^{-1}

is skew-symmetric. A rotation by angle ``theta`` in a plane corresponds to the eigenvalue
pair ``+-i sigma`` of S with ``theta = 2 arctan(sigma)``.
"""

from __future__ import annotations

import jax.numpy as jnp

from ._linalg import cayley_map, mm, solve_pd
from ._types import Block

__all__ = ["cayley", "eye_like", "inverse_cayley", "relative_cayley", "rotation_parameters", "skew"]


def eye_like(a: Block) -> Block:
    """Identity of the trailing block shape and dtype of ``a``, broadcastable against it."""
    return jnp.eye(a.shape[-1], dtype=a.dtype)


def skew(a: Block) -> Block:
    """Skew-symmetric part ``(A - A^T) / 2`` of every block."""
    return 0.5 * (a - jnp.swapaxes(a, -1, -2))


def cayley(a: Block) -> Block:
    """``Cay(A) = (I - S)^{-1} (I + S)`` with ``S = skew(A)`` (docs/math.md §1.2), per block.

    Only the skew part of ``a`` matters, as in the reference: ``cayley(eta * U)`` for an
    orthogonal ``U`` is ``Cay(eta (U - U^T)/2)``, the form used by ``curve_over_id``.

    Args:
      a: blocks ``[..., b, b]`` (float32 or float64).
    Returns:
      Orthogonal blocks with determinant +1, same shape and dtype.
    """
    return cayley_map(a)  # (I - S)^{-1} (I + S); the symmetric part of I - S is I


def inverse_cayley(u: Block) -> Block:
    """``invCay(U) = (U + I)^{-1} (U - I)``, skew-symmetrised, per block.

    Defined for orthogonal blocks without an eigenvalue ``-1`` (rotation angles below pi);
    near ``-1`` the result grows like ``tan(theta / 2)``. For a non-orthogonal input this is
    the skew part of the same expression, i.e. the Cayley parameter of a nearby rotation.
    """
    eye = eye_like(u)
    return skew(jnp.linalg.solve(u + eye, u - eye))


def rotation_parameters(u: Block) -> Block:
    """:func:`inverse_cayley` of rotations, by a solve without pivoting (:func:`solve_pd`).

    ``U + I`` has the positive definite symmetric part ``I + sym(U)`` for every orthogonal ``U``
    whose rotation angles are below pi, so Gaussian elimination needs no pivoting (on the CPU, the
    compiled kernel in double). For blocks that are not orthogonal, use :func:`inverse_cayley`.
    """
    eye = eye_like(u)
    return skew(solve_pd(u + eye, u - eye))


def relative_cayley(a1: Block, a2: Block) -> Block:
    """``invCay(Cay(A1)^T Cay(A2))`` from raw Cayley parameters, with ONE solve instead of three.

    With ``S1 = skew(A1)``, ``S2 = skew(A2)``, ``Cay(A1)^T = Cay(-S1)`` and
    ``I + Cay(-S1) Cay(S2) = 2 (I + S1)^{-1} (I - S1 S2) (I - S2)^{-1}``, so

        invCay(Cay(A1)^T Cay(A2)) = I - 2 (I + U)^{-1} = I - (I - S2) (I - S1 S2)^{-1} (I + S1).

    ``I - S1 S2`` is singular exactly where ``Cay(A1)^T Cay(A2)`` has an eigenvalue -1, so this
    solve is conditioned like the inverse Cayley map of the product it replaces (and the two
    Cayley solves that formed the product are not needed). This is the skew parameter of the
    geodesic between two raw-parameter blocks (:func:`~orthofuse_jax.geometry.geodesic_path_cayley`).
    """
    s1, s2 = jnp.broadcast_arrays(skew(a1), skew(a2))
    eye = eye_like(s1)
    return skew(eye - mm(eye - s2, jnp.linalg.solve(eye - mm(s1, s2), eye + s1)))
