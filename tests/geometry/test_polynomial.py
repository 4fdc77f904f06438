"""Product-only log / exp of rotations (geometry/polynomial.py) against scipy in float64, and the
``algorithm="matmul"`` paths of ``log_with_flag`` and ``geodesic`` (with their eigh fallback)."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from orthofuse_jax import geometry as geo

from .strategies import (
    expm64,
    logm64,
    orth_err,
    random_rotations,
    random_skew,
    rotation_stacks,
    scaled_settings,
)

T = lambda a: np.swapaxes(a, -1, -2)
LOG_TOL = {np.float32: 2e-6, np.float64: 5e-8}  # float64: the interpolation error (~1e-8)
EXP_TOL = {np.float32: 5e-6, np.float64: 1e-10}


@jax.jit
def _poly_kernel(u, s):
    lg, ok = geo.log_polynomial(u)
    return lg, ok, geo.expm_skew_taylor(s)


@given(case=rotation_stacks(max_angle=geo.LOG_POLYNOMIAL_MAX_ANGLE), scale=st.floats(0.0, 2.5))
def test_log_polynomial_and_expm_taylor_against_scipy(case, scale):
    s = scale * case.skew  # generators up to 6 rad for the exponential
    lg, ok, ex = (np.asarray(x) for x in _poly_kernel(case.cast(case.rot), case.cast(s)))
    assert lg.dtype == ex.dtype == case.dtype
    assert ok.all(), "every angle is within LOG_POLYNOMIAL_MAX_ANGLE"
    np.testing.assert_allclose(
        lg, case.skew, rtol=0, atol=LOG_TOL[case.dtype] * max(1.0, case.b / 4)
    )
    np.testing.assert_allclose(
        ex, expm64(s), rtol=0, atol=EXP_TOL[case.dtype] * max(1.0, case.b / 4)
    )


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("b", [2, 3, 40])
def test_log_polynomial_flags_large_angles_and_is_exact_where_it_does_not(dtype, b):
    # angles from 2.2 to 3.14 across the stack: blocks past ~2.45 rad must be flagged (NaN), and a
    # block that is not flagged must be accurate -- the T_16 check, not the fit, decides
    rng = np.random.default_rng(b)
    angles = np.linspace(2.2, np.pi - 1e-3, 40)
    s = np.stack([random_skew(rng, (), b, a) for a in angles])
    lg, ok, _ = (np.asarray(x) for x in _poly_kernel(expm64(s).astype(dtype), s.astype(dtype)))
    assert ok[angles <= geo.LOG_POLYNOMIAL_MAX_ANGLE].all()
    assert not ok[angles >= 2.5].any()
    assert np.isnan(lg[~ok]).all()
    np.testing.assert_allclose(lg[ok], s[ok], rtol=0, atol=LOG_TOL[dtype] * max(1.0, b / 4))


def test_log_polynomial_flags_non_finite_blocks():
    u = random_rotations(np.random.default_rng(0), (3,), 4, 1.0)
    u[1, 0, 0] = np.nan
    _, ok = geo.log_polynomial(u)
    np.testing.assert_array_equal(np.asarray(ok), [True, False, True])


@jax.jit
def _matmul_kernel(w, u1, u2, t):
    lg_m, bad_m = geo.log_with_flag(w, algorithm="matmul")
    y, bad_y = geo.geodesic_with_flag(u1, u2, t)
    return lg_m, bad_m, y, bad_y


@scaled_settings(15)
@given(case=rotation_stacks(max_angle=3.1), t=st.floats(-0.5, 1.5))
def test_matmul_algorithm_against_scipy_with_fallback(case, t):
    # angles up to 3.1: stacks with a block beyond ~2.4 rad take the eigh branch of the cond
    u1 = random_rotations(case.rng(1), (case.nb,), case.b, 2.0)
    u2 = u1 @ case.rot
    lg, bad, y, bad_y = (
        np.asarray(x)
        for x in _matmul_kernel(case.cast(case.rot), case.cast(u1), case.cast(u2), case.cast(t))
    )
    f64 = case.dtype == np.float64
    assert not bad.any() and not bad_y.any()
    np.testing.assert_allclose(lg, logm64(case.rot), rtol=0, atol=1e-7 if f64 else 5e-5)
    want = u1 @ expm64(t * case.skew)
    np.testing.assert_allclose(y, want, rtol=0, atol=1e-7 if f64 else 5e-5)
    assert orth_err(y) < (1e-12 if f64 else 2e-6)


def test_matmul_algorithm_flags_antipodal_blocks_like_eigh():
    u1 = np.eye(4)[None].repeat(5, 0)
    u2 = u1.copy()
    u2[1] = np.diag([-1.0, -1.0, 1.0, 1.0])
    for algorithm in ("eigh", "matmul"):
        lg, bad = jax.jit(lambda u: geo.log_with_flag(u, algorithm=algorithm))(u2)
        np.testing.assert_array_equal(np.asarray(bad), [False, True, False, False, False])
        assert np.isnan(np.asarray(lg)[1]).all()
    with pytest.raises(geo.NegativeEigenvalueError, match=r"block index \(1,\)"):
        geo.geodesic(u1, u2, 0.5, algorithm="matmul")
    with pytest.raises(ValueError, match="algorithm must be one of"):
        geo.log(u1, algorithm="qr")


@pytest.mark.parametrize("dtype, bound", [(np.float32, 1e-8), (np.float64, 3e-11)])
def test_the_power_interpolants_are_within_their_stated_error(dtype, bound):
    """The compiled kernel's direct power ``W^t = a_t(P) + K b_t(P)`` interpolates
    ``a_t(c) = cos(t phi)`` and ``b_t(c) = sin(t phi) / sin(phi)``, ``c = cos(phi)``, per tier
    (``polynomial.POWER_TIERS``): the Chebyshev interpolants' largest error on the tier's angles
    (an entry of ``W^t`` moves by ``|a - a_t| + sin(phi) |b - b_t|``), for t across
    ``POWER_T_RANGE``, against the closed forms."""
    from numpy.polynomial import chebyshev

    from orthofuse_jax.geometry import polynomial

    margin = polynomial._MARGIN
    for theta_max, degree in polynomial.POWER_TIERS[np.dtype(dtype)]:
        c_lo = np.cos(theta_max)
        c0, h0 = (c_lo + 1) / 2, (1 - c_lo) / 2
        phi = np.linspace(0.0, theta_max, 4001)
        x = ((np.cos(phi) - c0) / h0 + 1 + margin) * 2 / (
            2 + margin
        ) - 1  # c -> y -> the Chebyshev variable
        worst = 0.0
        for t in np.linspace(*polynomial.POWER_T_RANGE, 61):
            ca, cb = polynomial._power_coefficients(t, theta_max, degree)
            b_true = np.where(phi > 0, np.sin(t * phi) / np.where(phi > 0, np.sin(phi), 1.0), t)
            err = np.abs(chebyshev.chebval(x, ca) - np.cos(t * phi)) + np.sin(phi) * np.abs(
                chebyshev.chebval(x, cb) - b_true
            )
            worst = max(worst, float(err.max()))
        assert worst <= bound, (theta_max, degree, worst)
