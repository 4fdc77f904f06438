"""LoRA fixed-rank ALS merge (docs/math.md §7) against numpy's truncated SVD."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from orthofuse_jax.fusion import lora_merge


def make_loras(rng, n_in, n_out, r, k=2):
    return [(rng.normal(size=(r, n_in)) / r, rng.normal(size=(n_out, r))) for _ in range(k)]


def truncated_svd(m, r):
    u, s, vt = np.linalg.svd(m)
    return (u[:, :r] * s[:r]) @ vt[:r]


@pytest.mark.parametrize("weights", [[0.6, 0.4], [0.2, 0.8]])
def test_als_converges_to_truncated_svd(weights):
    rng = np.random.default_rng(0)
    loras = make_loras(rng, n_in=24, n_out=16, r=4)
    m = sum(c * (up @ down) for c, (down, up) in zip(weights, loras))
    out = lora_merge(loras, jnp.asarray(weights), rank=4, als_steps=200, key=jax.random.PRNGKey(0))
    down, up = np.asarray(out.down), np.asarray(out.up)
    assert down.shape == (4, 24) and up.shape == (16, 4)
    np.testing.assert_allclose(down @ down.T, np.eye(4), atol=1e-12)  # orthonormal rows
    np.testing.assert_allclose(up @ down, truncated_svd(m, 4), atol=1e-8)
    assert float(out.error) < 1e-8


def test_full_rank_target_is_exact():
    """With rank >= rank(sum) the merge reproduces the weighted sum exactly."""
    rng = np.random.default_rng(1)
    loras = make_loras(rng, n_in=10, n_out=12, r=2)
    m = 0.3 * loras[0][1] @ loras[0][0] + 0.7 * loras[1][1] @ loras[1][0]
    out = lora_merge(
        loras, jnp.asarray([0.3, 0.7]), rank=4, als_steps=10, key=jax.random.PRNGKey(1)
    )
    np.testing.assert_allclose(np.asarray(out.up @ out.down), m, atol=1e-10)


def test_seeded_and_rank_clipped():
    rng = np.random.default_rng(2)
    loras = make_loras(rng, n_in=6, n_out=5, r=3)
    w = jnp.asarray([0.5, 0.5])
    a = lora_merge(loras, w, rank=3, key=jax.random.PRNGKey(7))
    b = lora_merge(loras, w, rank=3, key=jax.random.PRNGKey(7))
    np.testing.assert_array_equal(np.asarray(a.up), np.asarray(b.up))
    big = lora_merge(loras, w, rank=50, key=jax.random.PRNGKey(7))
    assert big.down.shape == (5, 6)
    with pytest.raises(ValueError, match="down"):
        lora_merge(
            [loras[0], (loras[1][0][:, :5], loras[1][1])], w, rank=3, key=jax.random.PRNGKey(0)
        )
