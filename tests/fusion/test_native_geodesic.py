"""The product-only exact merge as one compiled pass per block (``GeodesicBlocks``, kernels.inc).

``merge(..., method="geodesic", algorithm="matmul")`` (what ``"auto"`` picks for float32) runs,
on the CPU, the Cayley maps, ``W^t`` for ``W = U1^T U2`` (by the direct power, or for t outside
its range ``exp(t log W)``), ``U1 W^t`` and the restoration in one kernel call per stack
(:func:`orthofuse_jax.fusion._dispatch._geodesic_matmul`).
Checked against scipy's float64 ``logm``/``expm`` and LAPACK solves (never against itself): block
sizes 1-70 (partial SIMD vectors of 8 doubles and 16 floats, and the 8 x 8 transposes at
multiples of 8), per-block t, orthogonal or raw inputs, all three restorations; which blocks it
declines (then redone with ``eigh`` by the merge), against the rotation angles and the
exponential's squarings; threads; derivatives; and that GPU lowerings never call it.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from .geodesic_reference import reference, rotations
from .native_setup import MARKS, check_derivatives, check_lowerings, dispatch, inputs, one_plane

_geodesic_matmul = dispatch._geodesic_matmul

pytestmark = MARKS


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 70),
    batch=st.sampled_from([(), (1,), (5,), (2, 3)]),
    restore=st.sampled_from(["none", "cayley", "exact"]),
    orthogonal=st.sampled_from([(False, False), (True, False), (False, True), (True, True)]),
    per_block=st.booleans(),
    seed=st.integers(0, 2**16),
)
@pytest.mark.parametrize("dtype, tol", [(np.float32, 2e-6), (np.float64, 5e-8)])
def test_matches_scipy_float64(dtype, tol, n, batch, restore, orthogonal, per_block, seed):
    rng = np.random.default_rng(seed)
    # each rotation up to 0.9 rad per plane: relative angles up to 1.8, inside the interpolant's 2.4
    x1, x2 = inputs(rng, batch, n, 0.9, orthogonal)
    if per_block:
        t = rng.uniform(-0.3, 1.3, batch)
        f = rng.uniform(1.0, 2.0, batch)
    else:
        t, f = 0.35, 1.91
    y, bad, ok = _geodesic_matmul(
        jnp.asarray(x1, dtype),
        jnp.asarray(x2, dtype),
        jnp.asarray(t, dtype),
        jnp.asarray(f, dtype),
        restore=restore,
        orthogonal=orthogonal,
    )
    assert y.dtype == dtype and bad.shape == ok.shape == batch
    assert np.all(np.asarray(ok)) and not np.any(np.asarray(bad))
    np.testing.assert_allclose(
        np.asarray(y), reference(x1, x2, t, f, restore, orthogonal), atol=tol, rtol=0
    )


def test_the_merge_runs_the_kernel_where_built_and_gpus_never_do():
    rng = np.random.default_rng(1)
    x1, x2 = (x.astype(np.float32) for x in inputs(rng, (4,), 12, 0.5))
    fn = lambda a, b: _geodesic_matmul(a, b, 0.3, 1.4, restore="cayley", orthogonal=(False, False))
    check_lowerings(fn, "orthofuse_geodesic", x1, x2)


@pytest.mark.usefixtures("native_switch")  # the kernel, then the XLA composition (conftest.py)
@pytest.mark.parametrize("n, dtype", [(6, np.float64), (40, np.float32), (64, np.float32)])
def test_declined_blocks_are_those_the_interpolant_or_the_squarings_cannot_take(n, dtype):
    """``ok`` is False (and the block NaN) for a relative rotation angle above the interpolant's
    2.4 rad, for ``|t| theta`` beyond the exponential's 4 squarings, and for non-finite input;
    True otherwise. The same for the kernel and the XLA composition, and at the SDXL block sizes
    in float32 (where the kernel's range check eliminates in panels of vectors)."""
    angles = np.array([0.3, 1.5, 2.2, 2.35, 2.5, 2.9, 1.0, 1.0])
    ts = np.array([0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 6.5, 0.5])
    x2 = one_plane(angles, n)  # one plane at that angle
    # in a random basis (Cay(Q S Q^T) = Q Cay(S) Q^T), so that sym(W) is not diagonal and the
    # kernel's range check must eliminate
    q = np.linalg.qr(np.random.default_rng(n).standard_normal((n, n)))[0]
    x2 = q @ x2 @ q.T
    x1 = np.zeros_like(x2)
    x1[-1, 0, 0] = np.nan
    y, bad, ok = _geodesic_matmul(
        jnp.asarray(x1, dtype),
        jnp.asarray(x2, dtype),
        jnp.asarray(ts, dtype),
        1.0,
        restore="none",
        orthogonal=(False, False),
    )
    # t theta = 6.5 rad needs ceil(log2(6.5 / 0.5)) = 4 squarings (accepted); the NaN block is declined
    want = np.array([True, True, True, True, False, False, True, False])
    np.testing.assert_array_equal(np.asarray(ok), want)
    np.testing.assert_array_equal(np.asarray(bad), ~want)
    assert np.all(np.isnan(np.asarray(y)[~want]))
    good = np.flatnonzero(want)
    np.testing.assert_allclose(
        np.asarray(y)[good],
        reference(x1[good], x2[good], ts[good], 1.0, "none", (False, False)),
        atol=1e-7 if dtype == np.float64 else 2e-6,
        rtol=0,
    )
    far = one_plane([1.0], n)  # 1 rad, t = 20: 20 rad needs 6 squarings
    _, _, ok = _geodesic_matmul(
        jnp.zeros((1, n, n)),
        jnp.asarray(far),
        20.0,
        1.0,
        restore="cayley",
        orthogonal=(False, False),
    )
    assert not bool(ok[0])


@pytest.mark.parametrize("restore", ["none", "cayley", "exact"])
def test_the_direct_power_is_exact_to_float64_round_off_where_it_applies(restore):
    """For t (and f) in ``POWER_T_RANGE`` and rotations up to 2.4 rad the kernel takes ``W^t`` by
    its direct power (``PowerBlock``: interpolation error ~1e-11 in float64, both tiers), where
    the log and the exponential were ~1e-8 from scipy; outside that t range it takes them still."""
    rng = np.random.default_rng(11)
    n = 24
    angles = np.array(
        [0.3, 1.0, 1.7, 2.0, 2.3, 2.39]
    )  # the first tier (<= 1.75 rad), then the second
    x2 = rotations(rng, (len(angles),), n, 0.05) + one_plane(angles, n)
    x1 = rotations(rng, (len(angles),), n, 0.02)
    for t, f, tol in [
        (-1.0, 1.0, 1e-10),
        (-0.3, 1.2, 1e-10),
        (0.35, 1.91, 1e-10),
        (0.9, 1.4, 1e-10),
        (2.0, 1.0, 1e-10),
        (2.6, 1.0, 2e-7),
    ]:
        if (
            restore == "exact" and t > 1
        ):  # Y's angles then reach past what the restoration's log takes
            continue
        y, bad, ok = _geodesic_matmul(
            jnp.asarray(x1),
            jnp.asarray(x2),
            jnp.asarray(t),
            jnp.asarray(f),
            restore=restore,
            orthogonal=(False, False),
        )
        assert np.all(np.asarray(ok)) and not np.any(np.asarray(bad)), t
        want = reference(x1, x2, t, f, restore, (False, False))
        np.testing.assert_allclose(np.asarray(y), want, atol=tol, rtol=0, err_msg=f"t = {t}")


@pytest.mark.usefixtures("kernel_threads")  # one thread, then three (conftest.py)
def test_threads_split_the_batch():
    rng = np.random.default_rng(5)
    x1, x2 = inputs(rng, (37,), 40, 0.8)
    t = rng.uniform(0.0, 1.0, 37)
    y, _, ok = _geodesic_matmul(
        jnp.asarray(x1),
        jnp.asarray(x2),
        jnp.asarray(t),
        1.7,
        restore="cayley",
        orthogonal=(False, False),
    )
    assert np.all(np.asarray(ok))
    np.testing.assert_allclose(
        np.asarray(y), reference(x1, x2, t, 1.7, "cayley", (False, False)), atol=5e-8, rtol=0
    )


def test_derivatives_are_the_xla_compositions():
    rng = np.random.default_rng(6)
    x1, x2 = inputs(rng, (3,), 5, 0.6)

    def fn(a, b, t):
        return _geodesic_matmul(a, b, t, 1.5, restore="cayley", orthogonal=(False, False))[0]

    check_derivatives(fn, jnp.asarray(x1), jnp.asarray(x2), jnp.asarray(0.4))
