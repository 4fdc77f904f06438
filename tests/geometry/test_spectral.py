"""Real-arithmetic log / exp / power / spectral map of orthogonal blocks against scipy (float64)."""

from __future__ import annotations

import re

import jax
import numpy as np
import pytest
import scipy.linalg
from hypothesis import given
from hypothesis import strategies as st

from orthofuse_jax import geometry as geo
from orthofuse_jax.geometry import NegativeEigenvalueError

from .strategies import (
    DTYPES,
    expm64,
    logm64,
    orth_err,
    random_rotations,
    random_skew,
    rotation_stacks,
    tol,
)

T = lambda a: np.swapaxes(a, -1, -2)


def odd_map(theta):
    """A non-linear odd angle map (phi(0) = 0, phi'(0) = 0.7)."""
    return 0.7 * theta - 0.05 * theta**3


def _odd_map_reference(s: np.ndarray) -> np.ndarray:
    """``exp(i odd_map(theta))`` on the eigenvalues ``i theta`` of the generator S (normal):
    complex Schur form of S is diagonal, ``S = Z diag(i theta) Z^H``."""
    out = []
    for m in s:
        tri, z = scipy.linalg.schur(m, output="complex")
        theta = np.imag(np.diag(tri))
        out.append(np.real(z @ np.diag(np.exp(1j * odd_map(theta))) @ z.conj().T))
    return np.stack(out)


@jax.jit
def _spectral_kernel(u, s, t):
    # the *_with_flag variants: log / spectral_map under jit are the same computation (they only
    # add the eager check, tested below and in test_jit_vmap.py)
    lg, bad = geo.log_with_flag(u)
    smap, smap_bad = geo.spectral_map_with_flag(u, odd_map)
    return dict(
        log=lg,
        bad=bad,
        exp_log=geo.expm_skew(lg),
        expm=geo.expm_skew(s),
        power=geo.power(u, t),
        smap=smap,
        smap_bad=smap_bad,
        angles=geo.rotation_angles(u),
    )


@given(case=rotation_stacks(max_angle=3.0), t=st.floats(-1.5, 2.5))
def test_spectral_functions_against_scipy(case, t):
    u = case.cast(case.rot)
    s = 2.5 * case.skew  # expm_skew is exact for any angle: generators up to 7.5 rad
    out = {
        k: np.asarray(v)
        for k, v in _spectral_kernel(u, case.cast(s), np.asarray(t, case.dtype)).items()
    }
    for k, v in out.items():
        assert v.dtype == (np.bool_ if "bad" in k else case.dtype), k
    assert not out["bad"].any() and not out["smap_bad"].any()
    f64 = case.dtype == np.float64
    ud = u.astype(np.float64)
    orth = tol(case.dtype)  # 1e-5 float32, 1e-12 float64, rotations up to 3 rad

    # log vs scipy logm (float64 to 1e-10), skew, and the same through log_with_flag
    logm = logm64(ud)
    np.testing.assert_allclose(out["log"], logm, rtol=0, atol=1e-10 if f64 else 3e-5)
    np.testing.assert_allclose(out["log"], -T(out["log"]), rtol=0, atol=0)
    # exp(log U) = U
    np.testing.assert_allclose(out["exp_log"], ud, rtol=0, atol=orth)
    # expm_skew vs scipy expm
    sd = case.cast(s).astype(np.float64)
    sd = 0.5 * (sd - T(sd))
    np.testing.assert_allclose(out["expm"], expm64(sd), rtol=0, atol=1e-12 if f64 else 1e-5)
    # power(U, t) vs scipy expm(t logm U)
    np.testing.assert_allclose(out["power"], expm64(t * logm), rtol=0, atol=1e-11 if f64 else 2e-5)
    # spectral map with a custom odd angle map, vs a complex Schur reference
    np.testing.assert_allclose(
        out["smap"], _odd_map_reference(logm), rtol=0, atol=1e-11 if f64 else 2e-5
    )
    # orthogonality of every orthogonal-valued output
    for k in ("exp_log", "expm", "power", "smap"):
        assert orth_err(out[k]) <= orth, k
    # rotation angles: |arg| of the eigenvalues of U (each plane twice, zeros for odd b). Angles
    # come from sigma^2 = eig(-S^2), so a zero angle is only resolved to ~sqrt(eps) sigma_max:
    # compare squared angles, whose error is ~eps sigma_max^2
    ref_angles = np.sort(np.abs(np.angle(np.linalg.eigvals(ud))), axis=-1)
    np.testing.assert_allclose(
        np.sort(out["angles"], axis=-1) ** 2, ref_angles**2, rtol=0, atol=1e-12 if f64 else 3e-4
    )


@pytest.mark.parametrize("dtype", DTYPES)
def test_orthogonality_and_exp_log_at_three_radians(dtype):
    # the accuracy targets at the edge of the range: every block has angle exactly 3
    # (shape [1, 4, 4]: the compiled kernel of the property test above is reused)
    t = tol(dtype)
    for seed in range(16):
        s = random_skew(np.random.default_rng(seed), (1,), 4, 3.0)
        u = np.asarray(expm64(s), dtype)
        out = {
            k: np.asarray(v)
            for k, v in _spectral_kernel(u, np.asarray(s, dtype), np.asarray(0.4, dtype)).items()
        }
        for k in ("exp_log", "expm", "power", "smap"):
            assert orth_err(out[k]) <= t, (k, seed)
        np.testing.assert_allclose(out["exp_log"], u.astype(np.float64), rtol=0, atol=t)
        if dtype == np.float64:
            np.testing.assert_allclose(out["log"], logm64(u), rtol=0, atol=1e-10)


# --- eigenvalue -1 -------------------------------------------------------------------------


def _stack_with_pi_rotations(
    dtype, bad_idx=(1, 3), nb=5, b=4, angle=np.pi
):  # shape as test_jit_vmap
    """Rotations with max angle 2 rad, except blocks ``bad_idx`` that get one plane rotated by
    ``angle`` (a -1 eigenvalue pair for angle = pi)."""
    rng = np.random.default_rng(42)
    s = random_skew(rng, (nb,), b, 2.0)
    for j in bad_idx:
        q, _ = np.linalg.qr(rng.standard_normal((b, b)))
        plane = np.zeros((b, b))
        plane[0, 1], plane[1, 0] = -angle, angle
        s[j] = q @ plane @ q.T
    u = expm64(s)
    return np.asarray(u, dtype), s


def test_negative_eigenvalue_raises_outside_jit():
    # eager (op-by-op) float64 only: eager float32 would compile every primitive again; the
    # check itself is dtype-independent and float32 flagging is tested under jit below
    dtype = np.float64
    u, _ = _stack_with_pi_rotations(dtype)
    for fn in (geo.log, lambda x: geo.power(x, 0.5), lambda x: geo.spectral_map(x, odd_map)):
        with pytest.raises(NegativeEigenvalueError, match=re.escape("block index (1,)")) as info:
            fn(u)
        assert "2 block(s)" in str(info.value)
    # leading batch axes: the index names every axis
    u2 = u.reshape(1, *u.shape)
    with pytest.raises(NegativeEigenvalueError, match=re.escape("block index (0, 1)")):
        geo.log(u2)
    # a single (unbatched) block raises too
    with pytest.raises(NegativeEigenvalueError, match="eigenvalue at -1"):
        geo.log(np.asarray(np.diag([-1.0, -1.0, 1.0, 1.0]), dtype))
    # NegativeEigenvalueError is a ValueError, so generic handlers catch it
    assert issubclass(NegativeEigenvalueError, ValueError)


def test_is_concrete_looks_at_every_leaf():
    """Arrays, scalars and pytrees of them are concrete; a tracer anywhere (an argument, or a leaf
    of a pytree argument) is not. Flags are read on the host (and raised) only when concrete."""
    x = np.eye(3)
    assert geo.is_concrete()
    assert geo.is_concrete(x, 0.5, None, {"a": (x, jax.numpy.asarray(x))})
    seen = []

    def probe(y):
        seen.append((geo.is_concrete(y), geo.is_concrete(x, {"b": [x, y]})))
        return y

    jax.jit(probe)(x)
    assert seen == [(False, False)]


@pytest.mark.parametrize("dtype", DTYPES)
def test_negative_eigenvalue_under_jit_flags_exactly_bad_blocks(dtype):
    bad_idx = (1, 3)
    u, s = _stack_with_pi_rotations(dtype, bad_idx)
    x, bad = jax.jit(geo.log_with_flag)(u)
    x, bad = np.asarray(x), np.asarray(bad)
    expected = np.zeros(u.shape[0], bool)
    expected[list(bad_idx)] = True
    np.testing.assert_array_equal(bad, expected)
    assert np.isnan(x[expected]).all()
    good = ~expected
    np.testing.assert_allclose(
        x[good], s[good], rtol=0, atol=1e-10 if dtype == np.float64 else 3e-5
    )
    # log / power / spectral_map under jit: NaN blocks instead of an exception, good blocks correct
    for fn in (geo.log, lambda v: geo.power(v, 0.5), lambda v: geo.spectral_map(v, odd_map)):
        y = np.asarray(jax.jit(fn)(u))
        assert np.isnan(y[expected]).all() and np.isfinite(y[good]).all()
    y, badp = jax.jit(geo.spectral_map_with_flag, static_argnums=1)(u, odd_map)
    np.testing.assert_array_equal(np.asarray(badp), expected)
    np.testing.assert_allclose(
        np.asarray(y)[good],
        _odd_map_reference(s[good]),
        rtol=0,
        atol=1e-11 if dtype == np.float64 else 2e-5,
    )


def test_angle_tolerance_boundary_float64():
    # within 1e-4 of pi: flagged; 1e-3 away: a valid log that scipy agrees with
    u_in, _ = _stack_with_pi_rotations(np.float64, (2,), angle=np.pi - 5e-5)
    _, bad = jax.jit(geo.log_with_flag)(u_in)
    np.testing.assert_array_equal(np.asarray(bad), [False, False, True, False, False])
    u_out, s_out = _stack_with_pi_rotations(np.float64, (2,), angle=np.pi - 1e-3)
    x, bad = jax.jit(geo.log_with_flag)(u_out)
    assert not np.asarray(bad).any()
    np.testing.assert_allclose(np.asarray(x), s_out, rtol=0, atol=1e-9)
    # a looser tolerance flags it
    _, bad = geo.log_with_flag(u_out, angle_tol=1e-2)
    np.testing.assert_array_equal(np.asarray(bad), [False, False, True, False, False])


def test_nonfinite_input_is_flagged():
    u = np.stack([np.eye(3), np.full((3, 3), np.nan)])
    x, bad = jax.jit(geo.log_with_flag)(u)
    np.testing.assert_array_equal(np.asarray(bad), [False, True])
    np.testing.assert_array_equal(np.asarray(x)[0], np.zeros((3, 3)))


@pytest.mark.parametrize("dtype", DTYPES)
def test_power_integer_and_inverse(dtype):
    # U^2 = U U, U^-1 = U^T, U^0 = I (closed forms), angles up to 1.5 so that U^2 stays principal
    u = np.asarray(random_rotations(np.random.default_rng(5), (5,), 4, 1.5), dtype)
    p = jax.jit(geo.power)
    t = tol(dtype)
    c = lambda v: np.asarray(v, dtype)
    np.testing.assert_allclose(
        np.asarray(p(u, c(2.0))), u.astype(np.float64) @ u, rtol=0, atol=10 * t
    )
    np.testing.assert_allclose(np.asarray(p(u, c(-1.0))), T(u), rtol=0, atol=t)
    np.testing.assert_allclose(
        np.asarray(p(u, c(0.0))), np.broadcast_to(np.eye(4), u.shape), rtol=0, atol=t
    )
    # per-block t broadcasting against the batch shape
    ts = np.asarray([0.0, 1.0, -1.0, 0.5, 2.0], dtype)
    y = np.asarray(p(u, ts))
    np.testing.assert_allclose(y[1], u[1], rtol=0, atol=t)
    np.testing.assert_allclose(y[2], u[2].T, rtol=0, atol=t)
    np.testing.assert_allclose(y[3] @ y[3], u[3], rtol=0, atol=10 * t)
    np.testing.assert_allclose(y[4], u[4] @ u[4], rtol=0, atol=10 * t)
