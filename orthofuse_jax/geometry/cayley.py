"""Skew projection and the Cayley map on stacks of blocks (SPEC 1.2).

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

from ._types import Block

__all__ = ["skew", "cayley", "inverse_cayley", "eye_like"]


def eye_like(a: Block) -> Block:
    """Identity of the trailing block shape and dtype of ``a``, broadcastable against it."""
    return jnp.eye(a.shape[-1], dtype=a.dtype)


def skew(a: Block) -> Block:
    """Skew-symmetric part ``(A - A^T) / 2`` of every block."""
    return 0.5 * (a - jnp.swapaxes(a, -1, -2))


def cayley(a: Block) -> Block:
    """``Cay(A) = (I - S)^{-1} (I + S)`` with ``S = skew(A)`` (SPEC 1.2), per block.

    Only the skew part of ``a`` matters, as in the reference: ``cayley(eta * U)`` for an
    orthogonal ``U`` is ``Cay(eta (U - U^T)/2)``, the form used by ``curve_over_id``.

    Args:
      a: blocks ``[..., b, b]`` (float32 or float64).
    Returns:
      Orthogonal blocks with determinant +1, same shape and dtype.
    """
    s = skew(a)
    eye = eye_like(s)
    return jnp.linalg.solve(eye - s, jnp.broadcast_to(eye + s, s.shape))


def inverse_cayley(u: Block) -> Block:
    """``invCay(U) = (U + I)^{-1} (U - I)``, skew-symmetrised, per block.

    Defined for orthogonal blocks without an eigenvalue ``-1`` (rotation angles below pi);
    near ``-1`` the result grows like ``tan(theta / 2)``. For a non-orthogonal input this is
    the skew part of the same expression, i.e. the Cayley parameter of a nearby rotation.
    """
    eye = eye_like(u)
    return skew(jnp.linalg.solve(u + eye, u - eye))
