"""Geodesics ``gamma(t) = U1 (U1^T U2)^t`` on SO(b): endpoints, constant speed, consistency,
length = distance, against scipy in float64."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from orthofuse_jax import geometry as geo
from orthofuse_jax.geometry import NegativeEigenvalueError

from .strategies import (
    DTYPES,
    expm64,
    logm64,
    random_rotations,
    rotation_stacks,
    scaled_settings,
    tol,
)

T = lambda a: np.swapaxes(a, -1, -2)
N_SPEED = 33
N_FINE = 257


@jax.jit
def _geodesic_kernel(u1, u2, t, s):
    dt = u1.dtype

    def gamma(tt):
        return geo.geodesic(u1, u2, tt)

    gt = gamma(t)
    ts = jnp.linspace(0.0, 1.0, N_SPEED, dtype=dt)
    return dict(
        g0=gamma(jnp.zeros((), dt)),
        g1=gamma(jnp.ones((), dt)),
        gt=gt,
        gst=gamma(s * t),
        nested=geo.geodesic(u1, gt, s),  # geodesic from U1 to gamma(t), evaluated at s
        speeds=jax.vmap(lambda tt: geo.geodesic_speed(u1, u2, tt))(ts),  # [33, nb]
        pts=jax.vmap(gamma)(jnp.linspace(0.0, 1.0, N_FINE, dtype=dt)),  # [257, nb, b, b]
        dist=geo.geodesic_distance(u1, u2),
        rel=geo.relative_rotation(u1, u2),
    )


def _case_pair(case):
    """U1 random (angles up to 3), U2 = U1 expm(X) with X the drawn generator (angles <= 3)."""
    u1 = random_rotations(case.rng(1), (case.nb,), case.b, 3.0)
    return u1, u1 @ case.rot


@given(
    case=rotation_stacks(max_angle=3.0, min_angle=0.05, dtype=np.float64),
    t=st.floats(0.0, 1.0),
    s=st.floats(0.0, 1.0),
)
def test_geodesic_properties(case, t, s):
    _check_geodesic(case, t, s)


@scaled_settings(5)
@given(
    case=rotation_stacks(max_angle=3.0, min_angle=0.05, dtype=np.float32, shapes=st.just((2, 4))),
    t=st.floats(0.0, 1.0),
    s=st.floats(0.0, 1.0),
)
def test_geodesic_properties_float32(case, t, s):
    # float32 (looser tolerances) on one shape; the float64 test covers the shape pool
    _check_geodesic(case, t, s)


def _check_geodesic(case, t, s):
    u1, u2 = _case_pair(case)
    u1c, u2c = case.cast(u1), case.cast(u2)
    out = {
        k: np.asarray(v, np.float64)
        for k, v in _geodesic_kernel(u1c, u2c, case.cast(t), case.cast(s)).items()
    }
    assert (
        np.asarray(_geodesic_kernel(u1c, u2c, case.cast(t), case.cast(s))["gt"]).dtype == case.dtype
    )
    f64 = case.dtype == np.float64
    u1d, u2d = u1c.astype(np.float64), u2c.astype(np.float64)
    atol = 1e-12 if f64 else 2e-5

    # endpoints
    np.testing.assert_allclose(out["g0"], u1d, rtol=0, atol=atol)
    np.testing.assert_allclose(out["g1"], u2d, rtol=0, atol=atol)
    np.testing.assert_allclose(out["rel"], T(u1d) @ u2d, rtol=0, atol=1e-15 if f64 else 1e-6)
    # gamma(t) vs scipy: U1 expm(t logm(U1^T U2))
    logw = logm64(T(u1d) @ u2d)
    np.testing.assert_allclose(
        out["gt"], u1d @ expm64(t * logw), rtol=0, atol=1e-11 if f64 else 2e-5
    )
    # gamma(s t) consistency
    np.testing.assert_allclose(out["nested"], out["gst"], rtol=0, atol=1e-11 if f64 else 2e-5)
    # distance vs ||logm(U1^T U2)||_F (scipy)
    ref_dist = np.sqrt(np.sum(logw**2, axis=(-1, -2)))
    np.testing.assert_allclose(out["dist"], ref_dist, rtol=0, atol=1e-10 if f64 else 1e-4)

    speeds = out["speeds"]  # [33, nb]
    # constant speed (relative variation < 1e-5 in float64) equal to the distance
    if case.b > 1:
        rel_var = (speeds.max(axis=0) - speeds.min(axis=0)) / speeds.mean(axis=0)
        assert np.all(rel_var < (1e-5 if f64 else 1e-2)), rel_var
        np.testing.assert_allclose(speeds.mean(axis=0), ref_dist, rtol=1e-9 if f64 else 1e-2)
    else:
        np.testing.assert_array_equal(speeds, 0.0)
    # length: trapezoid integral of the measured speed, and the sum of chords over a fine grid
    length = np.trapezoid(speeds, dx=1.0 / (N_SPEED - 1), axis=0)
    np.testing.assert_allclose(length, ref_dist, rtol=1e-9 if f64 else 1e-2, atol=1e-12)
    pts = out["pts"]
    chords = np.sqrt(np.sum(np.diff(pts, axis=0) ** 2, axis=(-1, -2))).sum(axis=0)
    # chord vs arc: relative error <= (theta_max h)^2 / 24 ~ 6e-6 at theta_max = 3, h = 1/256
    np.testing.assert_allclose(
        chords, ref_dist, rtol=2e-5 if f64 else 2e-3, atol=1e-12 if f64 else 1e-3
    )


@pytest.mark.parametrize("dtype", DTYPES)
def test_geodesic_same_point_and_extrapolation(dtype):
    rng = np.random.default_rng(8)
    u = random_rotations(rng, (5,), 4, 2.0)
    x = 0.4 * (lambda a: a - a.transpose(0, 2, 1))(rng.standard_normal((5, 4, 4)))
    g = jax.jit(geo.geodesic)
    uc = u.astype(dtype)
    np.testing.assert_allclose(np.asarray(g(uc, uc, 0.7)), uc, rtol=0, atol=tol(dtype))
    np.testing.assert_allclose(
        np.asarray(jax.jit(geo.geodesic_distance)(uc, uc)), 0.0, atol=tol(dtype, f32=1e-3, f64=1e-7)
    )
    # t outside [0, 1] extrapolates along the same geodesic: U1 expm(t X)
    w = expm64(0.5 * x)
    ts = [-0.5, 1.5, 2.0, 0.3, 3.0]
    y = np.asarray(g(uc, (u @ w).astype(dtype), np.asarray(ts, dtype)))
    for k, t in enumerate(ts):
        np.testing.assert_allclose(
            y[k], u[k] @ expm64(t * 0.5 * x[k]), rtol=0, atol=tol(dtype, f32=2e-5, f64=1e-12)
        )


def test_geodesic_raises_on_antipodal_blocks():
    # relative rotation with a pi plane: no unique geodesic; eager raises, jit gives NaN
    # shape [5, 4, 4] as in test_jit_vmap.py, so the eager compilations are shared
    u1 = np.eye(4)[None].repeat(5, 0)
    u2 = u1.copy()
    u2[1] = np.diag([-1.0, -1.0, 1.0, 1.0])
    with pytest.raises(NegativeEigenvalueError, match=r"block index \(1,\)"):
        geo.geodesic(u1, u2, 0.5)
    y = np.asarray(jax.jit(geo.geodesic)(u1, u2, 0.5))
    good = np.arange(5) != 1
    assert np.isnan(y[1]).all() and np.allclose(y[good], np.eye(4))
    # just inside the tolerance-free domain the distance is the plane angle times sqrt(2)
    ang = np.pi - 1e-3
    u2[1, :2, :2] = [[np.cos(ang), -np.sin(ang)], [np.sin(ang), np.cos(ang)]]
    expected = np.where(good, 0.0, ang * np.sqrt(2))
    np.testing.assert_allclose(
        np.asarray(geo.geodesic_distance(u1, u2)), expected, rtol=1e-9, atol=1e-12
    )


def _cay64(a: np.ndarray) -> np.ndarray:
    """``(I - S)^{-1} (I + S)``, ``S = skew(A)``, in float64 numpy."""
    s = 0.5 * (a - T(a))
    eye = np.eye(a.shape[-1])
    return np.linalg.solve(eye - s, eye + s)


@jax.jit
def _path_cayley_kernel(a1, a2, t):
    path = geo.geodesic_path_cayley(a1, a2)
    return geo.relative_cayley(a1, a2), path.at(t), path.bad


@given(
    case=rotation_stacks(max_angle=2.8, dtype=np.float64),
    scale=st.floats(0.0, 1.5),
    t=st.floats(-0.5, 1.5),
    f32=st.booleans(),
)
def test_geodesic_path_cayley_matches_scipy(case, scale, t, f32):
    # Raw parameters: A1 a random non-skew matrix (only its skew part counts), A2 = invCay of a
    # rotation with angles up to 2.8. Reference: float64 Cayley maps, then U1 expm(t logm(U1^T U2)).
    rng = case.rng(3)
    a1 = scale * rng.standard_normal((case.nb, case.b, case.b))
    u2 = _cay64(a1) @ case.rot  # relative rotation = the drawn one, angles <= 2.8
    eye = np.eye(case.b)
    a2 = np.linalg.solve(u2 + eye, u2 - eye)
    sym = rng.standard_normal(a2.shape)
    a2 = a2 + scale * (sym + T(sym))  # a symmetric part, which Cay ignores
    u1 = _cay64(a1)
    rel_ref = np.linalg.solve(T(u1) @ u2 + eye, T(u1) @ u2 - eye)
    want = u1 @ expm64(t * logm64(T(u1) @ u2))
    dt = np.float32 if f32 else np.float64
    rel, got, bad = (
        np.asarray(x) for x in _path_cayley_kernel(a1.astype(dt), a2.astype(dt), dt(t))
    )
    assert got.dtype == dt and not bad.any()
    # the relative parameter grows like tan(theta / 2) <= 6.3; its error like its square
    np.testing.assert_allclose(rel, rel_ref, rtol=0, atol=2e-4 if f32 else 1e-11)
    np.testing.assert_allclose(got, want, rtol=0, atol=5e-5 if f32 else 1e-11)
