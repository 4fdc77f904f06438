"""Group action ``(A, B) . X = P^T BD(A) P X BD(B)^T`` and its stabilizer (paper App. A/B)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from orthofuse_jax import geometry as geo
from orthofuse_jax.geometry import (
    group_dimension,
    orbit_dimension,
    stabilizer_dimension,
    stabilizer_dimension_formula,
    stabilizer_is_discrete,
)

from .strategies import (
    block_diag64,
    gs_dense64,
    orth_err,
    random_rotations,
    rotation_stacks,
    scaled_settings,
    shuffle_matrix64,
    tol,
)

T = lambda a: np.swapaxes(a, -1, -2)


def _act64(A, B, X):
    """Dense float64 reference of the action."""
    nb, b = A.shape[0], A.shape[-1]
    p = shuffle_matrix64(nb, b)
    return p.T @ block_diag64(A) @ p @ X @ block_diag64(B).T


def _four(case):
    """Four independent rotation stacks (float64) of the drawn shape: A, B (group), L, R (GS)."""
    rng = case.rng(3)
    others = [random_rotations(rng, (case.nb,), case.b, case.max_angle) for _ in range(3)]
    return [case.rot, *others]


@jax.jit
def _group_kernel(A, B, A2, B2, L, R, X):
    eye = jnp.broadcast_to(jnp.eye(A.shape[-1], dtype=A.dtype), A.shape)
    gh = geo.act(A @ A2, B @ B2, X)  # (g h) . X, product componentwise
    g_h = geo.act(A, B, geo.act(A2, B2, X))  # g . (h . X)
    return dict(
        identity=geo.act(eye, eye, X),
        gx=geo.act(A, B, X),
        gh=gh,
        g_h=g_h,
        orbit=geo.orbit_map(L, jnp.swapaxes(R, -1, -2)),
        q=geo.gs_dense(L, R),
        closure=geo.act(A, B, geo.gs_dense(L, R)),
        closure_ref=geo.gs_dense(A @ L, R @ jnp.swapaxes(B, -1, -2)),
    )


@given(case=rotation_stacks(kind="gs"))
def test_action_laws_orbit_and_closure(case):
    A, B, L, R = _four(case)
    rng = case.rng(5)
    A2, B2 = (random_rotations(rng, (case.nb,), case.b, case.max_angle) for _ in range(2))
    n = case.nb * case.b
    # X: an orthogonal n x n matrix (a random GS matrix times a random dense rotation)
    X = gs_dense64(L, R) @ random_rotations(rng, (), n, 2.0) if n > 1 else np.ones((1, 1))
    out = {
        k: np.asarray(v, np.float64)
        for k, v in _group_kernel(
            *(jnp.asarray(a, case.dtype) for a in (A, B, A2, B2, L, R, X))
        ).items()
    }
    t = tol(case.dtype, f32=1e-5, f64=1e-12)
    Xd = np.asarray(X, case.dtype).astype(np.float64)
    np.testing.assert_allclose(out["identity"], Xd, rtol=0, atol=0)  # identity law (exact)
    np.testing.assert_allclose(out["gx"], _act64(A, B, X), rtol=0, atol=t)  # vs dense reference
    np.testing.assert_allclose(out["gh"], out["g_h"], rtol=0, atol=t)  # compatibility
    np.testing.assert_allclose(out["g_h"], _act64(A @ A2, B @ B2, X), rtol=0, atol=t)
    np.testing.assert_allclose(
        out["orbit"], gs_dense64(L, R), rtol=0, atol=t
    )  # (L, R^T) . I = Q(L, R)
    np.testing.assert_allclose(
        out["closure"], gs_dense64(A @ L, R @ T(B)), rtol=0, atol=t
    )  # stays GS
    np.testing.assert_allclose(out["closure"], out["closure_ref"], rtol=0, atol=t)
    assert orth_err(out["gx"]) <= t  # the action preserves orthogonality
    assert orth_err(out["closure"]) <= t


# --- stabilizer ------------------------------------------------------------------------------


@pytest.mark.parametrize("nb,b", [(4, 3), (32, 20), (32, 32)])
def test_stabilizer_discrete_for_b_le_nb(nb, b):
    assert stabilizer_dimension(nb, b) == 0
    assert stabilizer_is_discrete(nb, b)
    assert orbit_dimension(nb, b) == nb * b * (b - 1)
    assert group_dimension(nb, b) == nb * b * (b - 1)


def test_stabilizer_b_gt_nb_hand_derived():
    # group.py docstring: nb=2, b=4 -> pairs {0,2},{1,3},{4,6},{5,7}: dim Stab = 4, orbit 24 - 4 = 20
    assert stabilizer_dimension(2, 4) == 4
    assert not stabilizer_is_discrete(2, 4)
    assert orbit_dimension(2, 4) == 20


def _stab_dim_dense(nb: int, b: int) -> int:
    """Independent measurement: rank of the dense Jacobian of (a, b) -> P^T BD(a) P - BD(b)."""
    p = shuffle_matrix64(nb, b)
    cols = []
    for side in (0, 1):
        for j in range(nb):
            for r in range(b):
                for c in range(r + 1, b):
                    e = np.zeros((nb, b, b))
                    e[j, r, c], e[j, c, r] = 1.0, -1.0
                    m = p.T @ block_diag64(e) @ p if side == 0 else -block_diag64(e)
                    cols.append(m.reshape(-1))
    if not cols:
        return 0
    jac = np.stack(cols, axis=1)
    return jac.shape[1] - np.linalg.matrix_rank(jac)


@pytest.mark.parametrize("nb", range(1, 5))
@pytest.mark.parametrize("b", range(1, 6))
def test_stabilizer_formula_matches_measurement(nb, b):
    measured = stabilizer_dimension(nb, b)
    assert measured == stabilizer_dimension_formula(nb, b)
    assert measured == _stab_dim_dense(nb, b)
    assert orbit_dimension(nb, b) == nb * b * (b - 1) - measured
    assert stabilizer_is_discrete(nb, b) == (measured == 0)
    if b <= nb:
        assert measured == 0  # paper Lemma 2


@jax.jit
def _sign_kernel(signs, L, R):
    A, B = geo.sign_stabilizer_element(signs)
    n = L.shape[-3] * L.shape[-1]
    return (
        A,
        B,
        geo.gs_dense(L @ A, B @ R),
        geo.gs_dense(L, R),
        geo.act(A, B, jnp.eye(n, dtype=L.dtype)),
    )


@scaled_settings(15)
@given(case=rotation_stacks(kind="gs"), data=st.data())
def test_sign_stabilizer_elements(case, data):
    nb, b = case.nb, case.b
    signs = np.asarray(
        data.draw(st.lists(st.sampled_from([-1.0, 1.0]), min_size=nb * b, max_size=nb * b))
    )
    signs = signs.reshape(nb, b).astype(case.dtype)
    L = case.rot
    R = random_rotations(case.rng(9), (nb,), b, case.max_angle)
    A, B, q_signed, q, fixed = (
        np.asarray(o, np.float64)
        for o in _sign_kernel(signs, *(np.asarray(a, case.dtype) for a in (L, R)))
    )
    # A = diag(signs) in blocks; B = P^T A P, again diagonal (checked with the dense P)
    np.testing.assert_array_equal(block_diag64(A), np.diag(signs.reshape(-1)))
    p = shuffle_matrix64(nb, b)
    np.testing.assert_array_equal(block_diag64(B), p.T @ np.diag(signs.reshape(-1)) @ p)
    t = tol(case.dtype)
    np.testing.assert_allclose(q_signed, q, rtol=0, atol=t)  # Q(L A, B R) == Q(L, R)
    np.testing.assert_allclose(q, gs_dense64(L, R), rtol=0, atol=t)
    np.testing.assert_array_equal(fixed, np.eye(nb * b))  # fixes I under act
