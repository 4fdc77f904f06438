"""Karcher (Frechet) mean and Cayley-space mean of orthogonal blocks."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg

from orthofuse_jax.fusion import (
    cayley_mean_blocks,
    from_layers,
    karcher_mean_blocks,
    merge,
    to_layers,
    to_orthogonal,
)


def np_cayley(a):
    s = 0.5 * (a - np.swapaxes(a, -1, -2))
    eye = np.eye(a.shape[-1])
    return np.linalg.solve(eye - s, eye + s)


def raw(rng, shape, b, scale):
    a = rng.normal(size=(*shape, b, b)) * scale
    return a - np.swapaxes(a, -1, -2)


def np_geodesic(u1, u2, t):
    out = np.empty_like(u1)
    for idx in np.ndindex(u1.shape[:-2]):
        out[idx] = u1[idx] @ np.real(scipy.linalg.expm(t * scipy.linalg.logm(u1[idx].T @ u2[idx])))
    return out


def rot2(theta):
    c, s = np.cos(theta), np.sin(theta)
    return np.array([[c, -s], [s, c]])


@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["f64", "f32"])
def test_mean_of_copies_is_the_block(dtype):
    u = np_cayley(raw(np.random.default_rng(0), (2, 3), 4, 0.4))
    stack = jnp.asarray(np.stack([u] * 4), dtype)
    mean, res, it = karcher_mean_blocks(stack, jnp.asarray([0.1, 0.2, 0.3, 0.4], dtype))
    np.testing.assert_allclose(
        np.asarray(mean), u, rtol=0, atol=1e-12 if dtype == np.float64 else 2e-6
    )
    assert float(res) <= 1e-6


def test_merge_of_copies_is_the_adapter():
    rng = np.random.default_rng(1)
    layers = {f"l{i}": (raw(rng, (2,), 3, 0.3), raw(rng, (2,), 3, 0.3)) for i in range(3)}
    a = from_layers(layers, dtype=np.float64)
    w = np.array([0.5, 0.25, 0.25])
    m = merge([a, a, a], w, method="geodesic")
    want = to_layers(to_orthogonal(a))
    for name, (L, R) in to_layers(m).items():
        np.testing.assert_allclose(np.asarray(L), np.asarray(want[name][0]), atol=1e-12)
        np.testing.assert_allclose(np.asarray(R), np.asarray(want[name][1]), atol=1e-12)
    # restore="exact" then applies exp(f log U) with f = 1 + 2 (alpha - 1)(1 - sum w^2).
    f = 1 + 2 * (2.0 - 1) * (1 - np.sum(w**2))
    m = merge([a, a, a], w, method="geodesic", restore="exact")
    for name, (L, _) in to_layers(m).items():
        u = np.asarray(want[name][0])
        ref = np.stack([np.real(scipy.linalg.expm(f * scipy.linalg.logm(b))) for b in u])
        np.testing.assert_allclose(np.asarray(L), ref, atol=1e-11)


@pytest.mark.parametrize("t", [0.0, 0.3, 0.5, 0.8, 1.0])
def test_two_point_mean_is_geodesic_point(t):
    rng = np.random.default_rng(2)
    u1, u2 = np_cayley(raw(rng, (3,), 5, 0.5)), np_cayley(raw(rng, (3,), 5, 0.5))
    mean, res, _ = karcher_mean_blocks(jnp.asarray(np.stack([u1, u2])), jnp.asarray([1 - t, t]))
    np.testing.assert_allclose(np.asarray(mean), np_geodesic(u1, u2, t), atol=1e-10)
    assert float(res) <= 1e-6


def test_commuting_rotations_mean_is_weighted_angle():
    """Rotations in one plane commute: the Karcher mean rotates by the weighted mean angle."""
    thetas = np.array([0.2, -0.7, 1.1])
    w = np.array([0.5, 0.2, 0.3])
    u = jnp.asarray(np.stack([rot2(th)[None] for th in thetas]))
    mean, res, _ = karcher_mean_blocks(u, jnp.asarray(w))
    np.testing.assert_allclose(np.asarray(mean[0]), rot2(w @ thetas), atol=1e-10)


def test_mean_satisfies_first_order_condition():
    """sum_i w_i logm(M^T U_i) = 0 at the mean, checked with scipy's logm."""
    rng = np.random.default_rng(3)
    u = np.stack([np_cayley(raw(rng, (2,), 4, 0.5)) for _ in range(4)])
    w = np.array([0.1, 0.4, 0.3, 0.2])
    mean, res, it = karcher_mean_blocks(jnp.asarray(u), jnp.asarray(w), tol=1e-12, max_iter=100)
    mean = np.asarray(mean)
    assert 0 < int(it) < 100 and float(res) <= 1e-12
    for j in range(2):
        np.testing.assert_allclose(mean[j].T @ mean[j], np.eye(4), atol=1e-12)
        g = sum(wi * np.real(scipy.linalg.logm(mean[j].T @ u[i, j])) for i, wi in enumerate(w))
        np.testing.assert_allclose(g, 0.0, atol=1e-10)


def test_iteration_cap_and_residual_are_reported():
    rng = np.random.default_rng(4)
    u = jnp.asarray(np.stack([np_cayley(raw(rng, (2,), 4, 0.5)) for _ in range(3)]))
    w = jnp.asarray([0.2, 0.3, 0.5])
    mean0, res0, it0 = karcher_mean_blocks(u, w, max_iter=0)
    assert int(it0) == 0 and float(res0) > 1e-3
    np.testing.assert_array_equal(np.asarray(mean0), np.asarray(u[2]))  # start: largest weight
    _, res1, it1 = karcher_mean_blocks(u, w, max_iter=1)
    assert int(it1) == 1 and float(res1) < float(res0)


def test_karcher_not_converged_warns():
    rng = np.random.default_rng(5)
    ads = [from_layers({"l": (raw(rng, (2,), 3, 0.5), raw(rng, (2,), 3, 0.5))}) for _ in range(3)]
    with pytest.warns(RuntimeWarning, match="Karcher mean"):
        merge(ads, [0.2, 0.3, 0.5], karcher_max_iter=1)


def test_cayley_mean_closed_form():
    rng = np.random.default_rng(6)
    a = rng.normal(size=(3, 2, 4, 4))  # raw, not skew
    w = np.array([0.2, 0.3, 0.5])
    s = 0.5 * (a - np.swapaxes(a, -1, -2))
    want = np_cayley(np.tensordot(w, s, axes=1))
    np.testing.assert_allclose(
        np.asarray(cayley_mean_blocks(jnp.asarray(a), jnp.asarray(w))), want, atol=1e-13
    )
    with pytest.raises(ValueError, match="shape"):
        cayley_mean_blocks(jnp.asarray(a), jnp.asarray([0.5, 0.5]))
