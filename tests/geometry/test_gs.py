"""GS matrices ``Q = P^T BD(L) P BD(R)`` against dense numpy references (docs/math.md §1.3, 1.4)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given

from orthofuse_jax import geometry as geo
from orthofuse_jax.geometry import gs_shape

from .strategies import (
    DTYPES,
    J,
    block_diag64,
    gs_dense64,
    gs_shapes,
    orth_err,
    random_rotations,
    rotation_stacks,
    scaled_settings,
    seeds,
    shape_dtypes,
    tol,
)

SHAPES = gs_shapes(max_nb=5, max_b=5)


def _pair(case):
    """(L, R) in float64 from a drawn case: L is the drawn stack, R an independent one."""
    L = case.rot
    R = random_rotations(case.rng(7), (case.nb,), case.b, case.max_angle)
    return L, R


def _element_form(L: np.ndarray, R: np.ndarray) -> np.ndarray:
    """docs/math.md §1.3 element form ``Q[c*nb+v, j*b+i] = sum_{u: (u*nb+v)//b == j} L[v,c,u] R[j,(u*nb+v)%b,i]``."""
    nb, b = L.shape[0], L.shape[-1]
    q = np.zeros((nb * b, nb * b))
    for c in range(b):
        for v in range(nb):
            for j in range(nb):
                for i in range(b):
                    q[c * nb + v, j * b + i] = sum(
                        L[v, c, u] * R[j, (u * nb + v) % b, i]
                        for u in range(b)
                        if (u * nb + v) // b == j
                    )
    return q


@jax.jit
def _products(x, L, R):
    return geo.gs_apply(x, L, R), geo.gs_apply_transpose(x, L, R), geo.gs_dense(L, R)


@given(case=rotation_stacks(kind="gs"), seed=seeds())
def test_gs_apply_and_dense_match_numpy(case, seed):
    L, R = _pair(case)
    q = gs_dense64(L, R)
    n = q.shape[0]
    x = np.random.default_rng(seed).standard_normal((3, n))
    t = tol(case.dtype, f32=2e-6 * max(1, n), f64=1e-13 * max(1, n))
    y, yt, qd = _products(*(jnp.asarray(a, case.dtype) for a in (x, L, R)))
    assert y.dtype == yt.dtype == qd.dtype == case.dtype
    assert y.shape == yt.shape == x.shape and qd.shape == (n, n)
    np.testing.assert_allclose(np.asarray(y, np.float64), x @ q.T, rtol=0, atol=t)  # y = x Q^T
    np.testing.assert_allclose(np.asarray(yt, np.float64), x @ q, rtol=0, atol=t)  # y = x Q
    np.testing.assert_allclose(np.asarray(qd, np.float64), q, rtol=0, atol=t)


@given(case=rotation_stacks(shapes=SHAPES, dtype=np.float64))
def test_dense_reference_matches_spec_element_form(case):
    # cross-check of the two independent references (matrix product vs the element form of docs/math.md §1.3),
    # then of the library against the element form
    L, R = _pair(case)
    q = _element_form(L, R)
    np.testing.assert_allclose(gs_dense64(L, R), q, rtol=0, atol=1e-13)
    np.testing.assert_allclose(
        np.asarray(J.gs_dense(jnp.asarray(L), jnp.asarray(R))), q, rtol=0, atol=1e-13
    )


@jax.jit
def _orth_and_roundtrip(x, L, R):
    return geo.gs_dense(L, R), geo.gs_apply_transpose(geo.gs_apply(x, L, R), L, R)


@given(case=rotation_stacks(kind="gs"))
def test_gs_matrices_are_orthogonal(case):
    L, R = _pair(case)
    n = case.nb * case.b
    x = np.random.default_rng(case.seed).standard_normal((2, n)).astype(case.dtype)
    qd, back = _orth_and_roundtrip(*(jnp.asarray(a, case.dtype) for a in (x, L, R)))
    assert orth_err(qd) <= tol(case.dtype)
    # Q^T (Q x) = x through the structured products
    np.testing.assert_allclose(
        np.asarray(back), x, rtol=0, atol=tol(case.dtype, f32=1e-5 * max(1, n) ** 0.5)
    )


@jax.jit
def _identity_outputs(x, eye, z):
    cz = geo.cayley(z)
    return (
        geo.gs_dense(eye, eye),
        geo.gs_apply(x, eye, eye),
        geo.gs_apply_transpose(x, eye, eye),
        geo.gs_dense(cz, cz),
    )


@given(sd=shape_dtypes("gs"), seed=seeds())
def test_identity_parameters_give_identity(sd, seed):
    (nb, b), dtype = sd
    n = nb * b
    eye = np.broadcast_to(np.eye(b, dtype=dtype), (nb, b, b))
    x = np.random.default_rng(seed).standard_normal((2, n)).astype(dtype)
    # zero Cayley parameters (the reference initialisation) are the identity too
    q, y, yt, qz = _identity_outputs(x, eye, np.zeros((nb, b, b), dtype))
    np.testing.assert_array_equal(np.asarray(q), np.eye(n))
    np.testing.assert_array_equal(np.asarray(y), x)
    np.testing.assert_array_equal(np.asarray(yt), x)
    np.testing.assert_array_equal(np.asarray(qz), np.eye(n))


@scaled_settings(10)
@given(sd=shape_dtypes("gs"), seed=seeds())
def test_block_diag_matches_scipy(sd, seed):
    (nb, b), dtype = sd
    blocks = np.random.default_rng(seed).standard_normal((2, nb, b, b))
    out = np.asarray(J.block_diag(jnp.asarray(blocks, dtype)))
    assert out.dtype == dtype
    for k in range(2):
        np.testing.assert_array_equal(out[k], block_diag64(blocks[k].astype(dtype)))


def test_gs_dense_leading_batch_axes():
    rng = np.random.default_rng(3)
    L = random_rotations(rng, (2, 3), 4, 1.0)
    R = random_rotations(rng, (2, 3), 4, 1.0)
    q = np.asarray(J.gs_dense(jnp.asarray(L), jnp.asarray(R)))
    assert q.shape == (2, 12, 12)
    for k in range(2):
        np.testing.assert_allclose(q[k], gs_dense64(L[k], R[k]), rtol=0, atol=1e-13)


def test_gs_sdxl_shape_orthogonal_and_matches_numpy():
    rng = np.random.default_rng(11)
    L = random_rotations(rng, (32,), 20, 0.5)
    R = random_rotations(rng, (32,), 20, 0.5)
    q = gs_dense64(L, R)
    x = rng.standard_normal((2, 640))
    np.testing.assert_allclose(
        np.asarray(J.gs_apply(jnp.asarray(x), jnp.asarray(L), jnp.asarray(R))), x @ q.T, atol=1e-12
    )
    qf = J.gs_dense(jnp.asarray(L, np.float32), jnp.asarray(R, np.float32))
    assert orth_err(qf) <= 1e-5


# --- docs/math.md §1.4 golden values (reference code, float64, method "cayley") ---------------------

_J, _R, _C = np.meshgrid(np.arange(4), np.arange(3), np.arange(3), indexing="ij")
_X = np.sin(np.arange(12) + 1.0)
GOLDEN = {
    "concept": (
        0.05 * (_J + 1) * (_R - _C) + 0.02 * np.cos(1 + _J + 2 * _R + 3 * _C),
        0.03 * (_R - _C) * (2 - _J) + 0.02 * np.sin(1 + 3 * _J + _R + 2 * _C),
        [
            0.64652885,
            1.22856797,
            0.64459772,
            -0.67251404,
            -0.95667043,
            -0.12164621,
            0.98564964,
            0.91272737,
            0.43261781,
            -0.27006271,
            -0.41096245,
            -0.57496664,
        ],
    ),
    "style": (
        0.06 * (_R - _C) + 0.01 * (_J + 1) * np.cos(3 + _J * _R + _C),
        0.04 * (_R - _C) * (_J - 1.5) + 0.03 * np.sin(2 + _J + _R * _C),
        [
            0.92000366,
            0.85743137,
            -0.02395133,
            -0.83803178,
            -0.88978334,
            -0.05780399,
            0.65486790,
            0.91617922,
            0.61165378,
            -0.08627555,
            -0.93937793,
            -0.82314553,
        ],
    ),
}


@pytest.mark.parametrize("which", sorted(GOLDEN))
@pytest.mark.parametrize("dtype", DTYPES)
def test_spec_golden_values(which, dtype):
    a_l, a_r, expected = GOLDEN[which]
    L = J.cayley(jnp.asarray(a_l, dtype))
    R = J.cayley(jnp.asarray(a_r, dtype))
    y = J.gs_apply(jnp.asarray(_X, dtype), L, R)
    assert y.dtype == dtype
    np.testing.assert_allclose(
        np.asarray(y, np.float64), expected, rtol=0, atol=1e-7 if dtype == np.float64 else 1e-6
    )
    # Q x through the dense matrix too
    q = np.asarray(J.gs_dense(L, R), np.float64)
    np.testing.assert_allclose(q @ _X, expected, rtol=0, atol=1e-7 if dtype == np.float64 else 1e-6)


def test_gs_shape_and_errors():
    L = jnp.zeros((4, 3, 3))
    assert gs_shape(L, L) == (4, 3, 12)
    with pytest.raises(ValueError, match="differ"):
        gs_shape(L, jnp.zeros((4, 2, 2)))
    with pytest.raises(ValueError, match="nb, b, b"):
        gs_shape(jnp.zeros((4, 3, 2)), jnp.zeros((4, 3, 2)))
    with pytest.raises(ValueError, match="n=12"):
        J.gs_apply(jnp.zeros((2, 10)), L, L)
