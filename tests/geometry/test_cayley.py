"""Skew projection and the Cayley map ``Cay(A) = (I+S)(I-S)^{-1}`` (docs/math.md §1.2)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given

from orthofuse_jax import geometry as geo

from .strategies import orth_err, random_rotations, rotation_stacks, tol

T = lambda a: np.swapaxes(a, -1, -2)


@jax.jit
def _cayley_kernel(a, u):
    return dict(
        skew=geo.skew(a),
        cay=geo.cayley(a),
        cay_skew=geo.cayley(geo.skew(a)),
        inv=geo.inverse_cayley(u),
        roundtrip=geo.cayley(geo.inverse_cayley(u)),
        eye=jnp.broadcast_to(geo.eye_like(a), a.shape),
    )


def _closed_form(s: np.ndarray) -> np.ndarray:
    """``(I + S)(I - S)^{-1}`` per block in float64 numpy."""
    eye = np.eye(s.shape[-1])
    return np.stack([(eye + m) @ np.linalg.inv(eye - m) for m in s])


@given(case=rotation_stacks(max_angle=6.0))
def test_cayley_properties(case):
    # A: a random non-skew matrix whose skew part has spectral radius up to 6 (so Cayley angles
    # 2 arctan(6) ~ 2.8 rad); U: a rotation with angles up to 3 rad
    rng = case.rng(2)
    sym = rng.standard_normal(case.skew.shape)
    a = case.skew + 0.5 * (sym + T(sym))
    u = (
        case.rot
        if case.max_angle <= 3.0
        else random_rotations(case.rng(4), (case.nb,), case.b, 3.0)
    )
    out = {k: np.asarray(v) for k, v in _cayley_kernel(case.cast(a), case.cast(u)).items()}
    assert all(v.dtype == case.dtype for v in out.values())
    a_d = case.cast(a).astype(np.float64)  # what the library saw
    t = tol(case.dtype)
    s_ref = 0.5 * (a_d - T(a_d))
    np.testing.assert_allclose(
        out["skew"], s_ref, rtol=0, atol=tol(case.dtype, f32=1e-6, f64=1e-15)
    )
    np.testing.assert_array_equal(out["eye"], np.broadcast_to(np.eye(case.b), a.shape))
    # closed form (I + S)(I - S)^{-1} in float64
    np.testing.assert_allclose(
        out["cay"], _closed_form(s_ref), rtol=0, atol=tol(case.dtype, f32=2e-6, f64=1e-13)
    )
    # depends only on the skew part
    np.testing.assert_allclose(
        out["cay"], out["cay_skew"], rtol=0, atol=tol(case.dtype, f32=1e-6, f64=1e-14)
    )
    # orthogonal with det +1
    assert orth_err(out["cay"]) <= t
    if case.b > 0:
        np.testing.assert_allclose(np.linalg.det(out["cay"].astype(np.float64)), 1.0, atol=10 * t)
    # inverse Cayley of a rotation with angles <= 3 rad: skew, and Cay(invCay(U)) = U
    inv = out["inv"].astype(np.float64)
    np.testing.assert_allclose(inv, -T(inv), rtol=0, atol=0)
    u_d = case.cast(u).astype(np.float64)
    eye = np.eye(case.b)
    ref_inv = np.stack([(m - eye) @ np.linalg.inv(m + eye) for m in u_d])
    scale = 1.0 + np.abs(ref_inv).max()
    np.testing.assert_allclose(
        inv, ref_inv, rtol=0, atol=tol(case.dtype, f32=2e-6, f64=1e-13) * scale**2
    )
    np.testing.assert_allclose(out["roundtrip"], u_d, rtol=0, atol=t)


@pytest.mark.parametrize("b", [3, 20, 64])
def test_rotation_parameters_match_numpy_inverse_cayley(b):
    rng = np.random.default_rng(b)
    g = rng.standard_normal((6, b, b))
    s = 0.5 * (g - np.swapaxes(g, -1, -2))
    u = np.linalg.solve(np.eye(b) - s, np.eye(b) + s)  # rotations, angles below pi
    want = np.linalg.solve(u + np.eye(b), u - np.eye(b))  # numpy, float64, pivoted
    np.testing.assert_allclose(
        np.asarray(geo.rotation_parameters(jnp.asarray(u))), want, atol=1e-10
    )
    np.testing.assert_allclose(
        want, s, atol=1e-10
    )  # and it is the skew matrix the rotation came from
    got32 = np.asarray(geo.rotation_parameters(jnp.asarray(u, jnp.float32)))
    assert got32.dtype == np.float32
    np.testing.assert_allclose(got32, want, atol=2e-5 * max(1.0, np.abs(want).max()))
