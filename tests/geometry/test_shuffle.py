"""Perfect shuffle P against the docs/math.md §1.3 index formula ``(P z)[v*b+u] = z[u*nb+v]``."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from orthofuse_jax.geometry import perfect_shuffle_indices, perfect_shuffle_matrix

from .strategies import J, dtypes, gs_shapes, seeds, shuffle_index, shuffle_matrix64


@given(
    shape=gs_shapes(max_nb=7, max_b=7),
    dtype=dtypes(),
    seed=seeds(),
    lead=st.sampled_from([(), (3,), (2, 1)]),
)
def test_shuffle_matches_index_formula(shape, dtype, seed, lead):
    nb, b = shape
    n = nb * b
    z = np.random.default_rng(seed).standard_normal((*lead, n)).astype(dtype)
    pz = np.asarray(J.perfect_shuffle(jnp.asarray(z), nb))
    assert pz.dtype == dtype
    for v in range(nb):
        for u in range(b):
            np.testing.assert_array_equal(pz[..., v * b + u], z[..., u * nb + v])
    # P^T: the inverse permutation written independently from the same formula
    w = z
    ptw = np.asarray(J.perfect_unshuffle(jnp.asarray(w), nb))
    for v in range(nb):
        for u in range(b):
            np.testing.assert_array_equal(ptw[..., u * nb + v], w[..., v * b + u])


@given(shape=gs_shapes(max_nb=7, max_b=7), dtype=dtypes(), seed=seeds())
def test_shuffle_and_unshuffle_are_inverse(shape, dtype, seed):
    nb, b = shape
    z = jnp.asarray(np.random.default_rng(seed).standard_normal((2, nb * b)).astype(dtype))
    np.testing.assert_array_equal(J.perfect_unshuffle(J.perfect_shuffle(z, nb), nb), z)
    np.testing.assert_array_equal(J.perfect_shuffle(J.perfect_unshuffle(z, nb), nb), z)


@given(shape=gs_shapes(max_nb=7, max_b=7), dtype=dtypes(), seed=seeds())
def test_dense_matrix_and_indices_consistent(shape, dtype, seed):
    nb, b = shape
    n = nb * b
    np.testing.assert_array_equal(perfect_shuffle_indices(nb, b), shuffle_index(nb, b))
    p = np.asarray(perfect_shuffle_matrix(nb, b, dtype=dtype))
    assert p.dtype == dtype
    np.testing.assert_array_equal(p, shuffle_matrix64(nb, b))
    np.testing.assert_array_equal(p.T @ p, np.eye(n))  # a permutation: P^T P = I
    z = np.random.default_rng(seed).standard_normal((3, n)).astype(dtype)
    # rows are vectors: P z for each row is z @ P^T; P^T w is w @ P
    np.testing.assert_array_equal(np.asarray(J.perfect_shuffle(jnp.asarray(z), nb)), z @ p.T)
    np.testing.assert_array_equal(np.asarray(J.perfect_unshuffle(jnp.asarray(z), nb)), z @ p)


def test_shuffle_not_symmetric_for_sdxl_shape():
    # docs/math.md §1.3: for b != nb P is not symmetric, the direction matters
    p = np.asarray(perfect_shuffle_matrix(32, 20, dtype=np.float64))
    np.testing.assert_array_equal(p, shuffle_matrix64(32, 20))
    assert np.abs(p - p.T).max() == 1.0


def test_small_explicit_example():
    # nb=2, b=3: z = [z0..z5], (P z)[v*3+u] = z[u*2+v] -> [z0, z2, z4, z1, z3, z5]
    z = jnp.arange(6.0, dtype=jnp.float64)
    np.testing.assert_array_equal(J.perfect_shuffle(z, 2), [0, 2, 4, 1, 3, 5])
    np.testing.assert_array_equal(
        J.perfect_unshuffle(jnp.asarray([0.0, 2, 4, 1, 3, 5]), 2), np.arange(6.0)
    )


def test_bad_length_raises():
    with pytest.raises(ValueError, match="not divisible"):
        J.perfect_shuffle(jnp.zeros(7), 2)
