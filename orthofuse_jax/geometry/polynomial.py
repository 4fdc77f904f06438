"""Logarithm and exponential of rotations with matrix products only (no ``eigh``, no solve).

On a GPU a batched ``eigh`` of many small blocks costs 1-3 us per block, ten times a product
(docs/performance.md, GPU), and it is most of the exact merge. For rotations whose angles are
not too close to pi both maps have short, well-conditioned polynomial forms:

* **log.** For orthogonal ``U`` the parts ``P = (U + U^T) / 2 = cos(Theta)`` and
  ``K = (U - U^T) / 2 = J sin(Theta)`` commute, and

      log U = K h(P),    h(c) = arccos(c) / sqrt(1 - c^2)  (= theta / sin theta, h(1) = 1),

  where ``h`` is analytic except at ``c = -1`` (a rotation by pi). On the angles
  ``theta <= LOG_POLYNOMIAL_MAX_ANGLE`` (2.4 rad, ``c >= cos 2.4``) a degree-23 interpolant of
  ``h`` in ``y = (c - c0) / h0`` (spectrum mapped to [-1, 1]) is exact to ~1e-8, and its monomial
  coefficients sum to about 10, so Paterson-Stockmeyer evaluation in float32 loses nothing.
  Whether every eigenvalue of ``Y`` lies in the fitted interval is *checked*, not assumed:
  ``||T_16(Y)||_F^2 <= b`` (Chebyshev, two more products) bounds every eigenvalue to within
  ~0.013 of [-1, 1], and the fit covers [-1.02, 1]. Blocks that fail are reported, never
  silently wrong; :func:`~orthofuse_jax.geometry.log_with_flag` with ``algorithm="matmul"``
  then falls back to ``eigh`` for the stack (``jax.lax.cond``).

* **exp of a skew matrix** by scaling and squaring: Taylor of degree 10 on ``X / 2^s`` with
  ``||X / 2^s|| <= 1/2`` per block, then ``s`` squarings (``s`` from the bound
  ``||X||_2 <= (||X^2||_F / sqrt 2)^(1/2)``; 3 for angles up to 4 rad).

About 11 products for the logarithm and 8 for the exponential; both are accurate to float32
round-off (tests/geometry/test_polynomial.py compares them with scipy in float64).

* **the power of a rotation, directly** (the compiled CPU kernel, ``_native/kernels.inc``,
  ``PowerBlock``; not the XLA path). With ``P`` and ``K`` as above,

      U^t = a_t(P) + K b_t(P),    a_t(c) = cos(t arccos c),  b_t(c) = sin(t arccos c) / sqrt(1 - c^2),

  both analytic except at ``c = -1`` like ``h``, so they are interpolated the same way, with
  coefficients for each t (computed in the kernel, about 2 us each and cached, from the tiers of
  :data:`POWER_TIERS`), and share the powers of ``Y``: degree 11 for angles up to 1.75 rad (the
  SDXL benchmark's relative rotations are 1.0-1.7 rad) costs 8 products against the log's and the
  exponential's 15-16, and is accurate to 6e-9 before rounding (float64 tiers: 1e-11, against the
  log interpolant's 1e-8). Its coefficients are not a fixed table, so XLA (whose t may be traced,
  and whose float32 cannot expand Chebyshev series into powers) keeps the log and the exponential.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from ._linalg import mm
from ._types import Array, Block, Bool

__all__ = ["LOG_POLYNOMIAL_MAX_ANGLE", "expm_skew_taylor", "log_polynomial"]

LOG_POLYNOMIAL_MAX_ANGLE = 2.4
"""Largest rotation angle (radians) that :func:`log_polynomial` accepts (a few 0.01 more pass)."""

_DEGREE = 23
_MARGIN = 0.02  # the fit covers y in [-1 - _MARGIN, 1]; the T_16 check admits at most ~0.013
_TAYLOR = 10
_TAYLOR_RADIUS = 0.5  # Taylor error (1/2)^11 / 11! ~ 1e-11 relative
_KERNEL_LOWER = -1.0 - 0.75 * _MARGIN
"""The compiled CPU kernel checks the smallest eigenvalue of ``Y`` directly (an LDL^T factorization
of ``Y - _KERNEL_LOWER I``), against ``-1.015``: within the fit's [-1.02, 1], like the T_16 bound."""


def _interval(theta_max: float) -> tuple[float, float]:
    """``(c0, h0)``: ``c = c0 + h0 y`` maps ``y`` in [-1, 1] onto the cosines [cos(theta_max), 1]."""
    c_lo = np.cos(theta_max)
    return (c_lo + 1.0) / 2.0, (1.0 - c_lo) / 2.0


def _nodes(n: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``n`` Chebyshev points of the first kind ``x`` in [-1, 1] and the same points ``y`` on the
    fit's [-1 - _MARGIN, 1]."""
    x = np.cos(np.pi * (np.arange(n) + 0.5) / n)
    return x, -1.0 - _MARGIN + (2.0 + _MARGIN) * (x + 1.0) / 2.0


def _log_coefficients() -> tuple[tuple[float, ...], float, float]:
    """Monomial coefficients in y of the interpolant of arccos(c)/sin(arccos(c)), ``c = c0 + h0 y``.

    Computed once in float64 at import (Chebyshev points of the first kind on [-1.02, 1]).
    """
    c0, h0 = _interval(LOG_POLYNOMIAL_MAX_ANGLE)
    n = _DEGREE + 1
    _, y = _nodes(n)
    phi = np.arccos(c0 + h0 * y)
    a = np.linalg.solve(np.vander(y, n, increasing=True), phi / np.sin(phi))
    return tuple(float(v) for v in a), float(c0), float(h0)


_LOG_A, _C0, _H0 = _log_coefficients()
_EXP_A = tuple(float(1.0 / f) for f in np.cumprod([1.0, *range(1, _TAYLOR + 1)]))  # 1 / k!


POWER_TIERS = {
    np.dtype(np.float32): ((1.75, 11), (LOG_POLYNOMIAL_MAX_ANGLE, 23)),
    np.dtype(np.float64): ((1.75, 15), (LOG_POLYNOMIAL_MAX_ANGLE, 31)),
}
"""The compiled CPU kernel's direct power ``W^t = a_t(P) + K b_t(P)`` (``kernels.inc``,
``PowerBlock``): per input dtype, ``(largest rotation angle, degree)`` of its interpolants, the
first tier whose range holds a block's spectrum being used. The degrees bound the interpolation
error (on ``t`` in :data:`POWER_T_RANGE`) to 6e-9 / 9e-9 for float32 and 1e-11 / 2e-11 for
float64 (``_power_coefficients``); a block beyond the last tier takes the log and the
exponential, which decline it the same way."""

POWER_T_RANGE = (-1.0, 2.0)
"""The t (and exact-restoration f) for which the power's interpolants are fitted; others take
the log and the exponential (whose squarings reach further)."""


def _power_coefficients(t: float, theta_max: float, degree: int) -> tuple[np.ndarray, np.ndarray]:
    """Chebyshev coefficients in ``x`` of ``a_t(c) = cos(t phi)`` and ``b_t(c) = sin(t phi) / sin(phi)``,
    ``phi = arccos c``, ``c = c0 + h0 y``, ``y = -1 - margin + (2 + margin)(x + 1) / 2``, interpolated
    at the ``degree + 1`` Chebyshev points of the first kind (float64; what the kernel's
    ``PowerCoefficients`` computes too, then expands in powers of ``y`` in long double)."""
    c0, h0 = _interval(theta_max)
    n = degree + 1
    k = np.arange(n)
    _, y = _nodes(n)
    phi = np.arccos(c0 + h0 * y)
    dct = (2.0 / n) * np.cos(np.outer(k, np.pi * (k + 0.5) / n))
    dct[0] *= 0.5
    return dct @ np.cos(t * phi), dct @ (np.sin(t * phi) / np.sin(phi))


def kernel_attributes(max_squarings: int, dtype=np.float32) -> dict[str, np.ndarray]:
    """The log interpolant, the exponential's Taylor series and the power's tiers (for ``dtype``)
    as the compiled CPU kernel's attributes (``orthofuse_jax/_native/ffi.cc``, ``PolyParams``):
    the polynomials are defined here only."""
    params = [_C0, _H0, _TAYLOR_RADIUS, _KERNEL_LOWER, float(max_squarings)]
    tiers = POWER_TIERS[np.dtype(dtype)]
    power = [*POWER_T_RANGE, _MARGIN, _KERNEL_LOWER, float(len(tiers))]
    for theta_max, degree in tiers:
        power += [*_interval(theta_max), float(degree + 1)]
    return {
        "log_coef": np.asarray(_LOG_A, np.float64),
        "exp_coef": np.asarray(_EXP_A, np.float64),
        "params": np.asarray(params, np.float64),
        "power": np.asarray(power, np.float64),
    }


def _paterson_stockmeyer(coef, baby: list[Array], giant: Array) -> Array:
    """``sum_k coef[k] y^k`` from ``baby = [I, y, ..., y^(m-1)]`` and ``giant = y^m`` (Horner in y^m)."""
    m, d = len(baby), len(coef) - 1
    out = None
    for j in reversed(range(d // m + 1)):
        part = sum(coef[j * m + i] * baby[i] for i in range(m) if j * m + i <= d)
        out = part if out is None else mm(out, giant) + part
    assert out is not None
    return out


def log_polynomial(u: Block) -> tuple[Block, Bool[Array, "*batch"]]:
    """Principal logarithm of orthogonal blocks by products only, and where it is valid.

    Args:
      u: orthogonal blocks ``[..., b, b]`` (float32 or float64).
    Returns:
      ``(X, ok)``: skew blocks ``X`` with ``expm(X) = U`` wherever ``ok``; ``ok[...]`` is False
      for blocks with a rotation angle above about :data:`LOG_POLYNOMIAL_MAX_ANGLE` (or
      non-finite input), and those blocks of ``X`` are NaN. Accuracy where ``ok``: float32
      round-off (about 3e-7 at b = 40), ~1e-8 in float64 (the interpolation error).
    """
    b = u.shape[-1]
    eye = jnp.eye(b, dtype=u.dtype)
    ut = jnp.swapaxes(u, -1, -2)
    k = 0.5 * (u - ut)
    y = (0.5 * (u + ut) - _C0 * eye) / _H0
    y2 = mm(y, y)
    y3 = mm(y2, y)
    y4 = mm(y2, y2)
    h = _paterson_stockmeyer(_LOG_A, [jnp.broadcast_to(eye, y.shape), y, y2, y3], y4)
    # Every eigenvalue of Y in [-1 - 0.013, 1] iff (up to that margin) ||T_16(Y)||_F^2 <= b:
    # |T_16| <= 1 on [-1, 1] and grows like cosh(16 acosh|y|) outside.
    t4 = 8.0 * y4 - 8.0 * y2 + eye
    t8 = 2.0 * mm(t4, t4) - eye
    t16 = 2.0 * mm(t8, t8) - eye
    ok = jnp.sum(t16 * t16, axis=(-1, -2)) <= b * (1.0 + 1e-3)
    ok &= jnp.all(jnp.isfinite(u), axis=(-1, -2))
    x = mm(k, h)
    x = 0.5 * (x - jnp.swapaxes(x, -1, -2))
    return jnp.where(ok[..., None, None], x, jnp.nan), ok


def expm_skew_taylor(a: Block, *, max_squarings: int = 8) -> Block:
    """``expm(skew(A))`` by Taylor series and squaring, products only (per-block scaling).

    Accurate to float32 round-off times the number of squarings (3 for rotation angles up to 4
    rad: about 3e-7 at b = 40) for ``||skew(A)||_2 <= 2^max_squarings / 2`` (128 rad by default;
    the loop is unrolled, so no host round trip on a GPU). Use
    :func:`~orthofuse_jax.geometry.expm_skew` (``eigh``) beyond.
    """
    return expm_skew_taylor_with_ok(a, max_squarings)[0]


def expm_skew_taylor_with_ok(a: Block, max_squarings: int) -> tuple[Block, Bool[Array, "*batch"]]:
    """:func:`expm_skew_taylor` and, per block, whether its norm bound is within reach of the squarings."""
    x = 0.5 * (a - jnp.swapaxes(a, -1, -2))
    eye = jnp.broadcast_to(jnp.eye(x.shape[-1], dtype=x.dtype), x.shape)
    x2 = mm(x, x)
    # ||X||_2^2 = ||X^2||_2 <= ||X^2||_F / sqrt(2) (X^2 is symmetric with paired eigenvalues)
    bound = jnp.sqrt(jnp.sqrt(jnp.sum(x2 * x2, axis=(-1, -2)) / 2.0))
    need = jnp.maximum(jnp.ceil(jnp.log2(bound / _TAYLOR_RADIUS)), 0.0)
    ok = need <= max_squarings  # False for NaN too
    s = jnp.where(ok, need, float(max_squarings))
    scale = jnp.exp2(-s)[..., None, None]  # a power of two: the scaling itself is exact
    x, x2 = x * scale, x2 * (scale * scale)
    x3 = mm(x2, x)
    e = _paterson_stockmeyer(_EXP_A, [eye, x, x2], x3)
    for i in range(
        max_squarings
    ):  # unrolled: a data-dependent loop would sync with the host on a GPU
        e = jnp.where((i < s)[..., None, None], mm(e, e), e)
    return e, ok
