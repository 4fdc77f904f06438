"""The product-only exact sweep as one compiled pass per block (``kernels.inc``, ``SweepBlocks``).

``sweep(..., method="geodesic", algorithm="matmul")`` (what ``"auto"`` picks for float32 where the
kernel runs) computes per block, once, the Cayley maps and ``X = log(U1^T U2)``, then the Taylor
coefficients ``M_k = U1 X^k / k!`` of the geodesic in double, as many as the largest ``|t|`` needs,
and per t a Horner pass and the restoration (:func:`orthofuse_jax.fusion._dispatch._geodesic_sweep_matmul`).
Checked against scipy's float64 ``logm``/``expm`` (never against itself): block sizes 1-70, 1-9
points (t outside [0, 1] too, so the truncation bound is exercised up to ``|t| theta`` of about 4),
orthogonal or raw inputs, every restoration; declined blocks (the log's range, the series' length)
and their ``eigh`` redo; threads whose pieces start mid-stack; a vmap that gives every group its
own points; derivatives; that GPU lowerings never call it; and ``algorithm="auto"``.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from orthofuse_jax import _native
from orthofuse_jax.fusion import GSAdapter

from .geodesic_reference import cay, reference, rotations
from .native_setup import MARKS, check_derivatives, check_lowerings, dispatch, inputs, one_plane

_geodesic_sweep_matmul = dispatch._geodesic_sweep_matmul

pytestmark = MARKS


def _f(ts, alpha):
    ts = np.asarray(ts, np.float64)
    return 1.0 + 4.0 * (alpha - 1.0) * ts * (1.0 - ts)


def _sweep_reference(x1, x2, ts, alpha, restore, orthogonal):
    return np.stack(
        [reference(x1, x2, t, f, restore, orthogonal) for t, f in zip(ts, _f(ts, alpha))]
    )


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 70),
    batch=st.sampled_from([(), (1,), (5,), (2, 3)]),
    restore=st.sampled_from(["none", "cayley", "exact"]),
    orthogonal=st.sampled_from([(False, False), (True, False), (False, True), (True, True)]),
    points=st.integers(1, 9),
    seed=st.integers(0, 2**16),
)
@pytest.mark.parametrize("dtype, tol", [(np.float32, 2e-6), (np.float64, 5e-8)])
def test_matches_scipy_float64(dtype, tol, n, batch, restore, orthogonal, points, seed):
    rng = np.random.default_rng(seed)
    # each rotation up to 0.9 rad per plane: relative angles up to 1.8, inside the interpolant's 2.4
    # Drawn here, not by native_setup.inputs: hypothesis seeds its examples from this function's
    # code (comments aside), and the examples another body draws include float64 blocks that the
    # kernel declines and this test does not allow for (n = 2, a relative angle of 1.8 at
    # t = 1.99: 3.6 rad needs more than the sweep's 31 series terms in double).
    x1, x2 = (rotations(rng, batch, n, 0.9) for _ in range(2))
    x1 = cay(x1) if orthogonal[0] else x1
    x2 = cay(x2) if orthogonal[1] else x2
    ts = rng.uniform(-1.0, 2.0, points)
    alpha = rng.uniform(1.0, 2.5)
    if restore == "exact":  # keep f |angle| inside the interpolant's 2.4 rad
        ts, alpha = rng.uniform(-0.2, 1.2, points), 1.5
    y, bad, ok = _geodesic_sweep_matmul(
        jnp.asarray(x1, dtype),
        jnp.asarray(x2, dtype),
        jnp.asarray(ts, dtype),
        alpha,
        restore=restore,
        orthogonal=orthogonal,
    )
    assert (
        y.dtype == dtype
        and y.shape == (points, *batch, n, n)
        and bad.shape == ok.shape == (points, *batch)
    )
    assert np.all(np.asarray(ok)) and not np.any(np.asarray(bad))
    want = _sweep_reference(x1, x2, np.asarray(ts, dtype), alpha, restore, orthogonal)
    np.testing.assert_allclose(np.asarray(y), want, atol=tol, rtol=0)


def test_the_sweep_runs_the_kernel_where_built_and_gpus_never_do():
    rng = np.random.default_rng(1)
    x1, x2 = (x.astype(np.float32) for x in inputs(rng, (4,), 12, 0.5))
    ts = np.linspace(0, 1, 5, dtype=np.float32)
    fn = lambda a, b, t: _geodesic_sweep_matmul(
        a, b, t, 2.0, restore="cayley", orthogonal=(False, False)
    )
    check_lowerings(fn, "orthofuse_sweep", x1, x2, ts)


def test_declined_blocks_are_those_the_log_or_the_series_cannot_take(native_switch):
    """``ok`` is False at every t (and the block NaN) for a relative rotation angle above the
    interpolant's 2.4 rad and for non-finite input, in the kernel and the XLA composition; the
    kernel also declines a block whose series would need more than 30 terms (``|t| theta`` of 8
    here), where XLA's exponential still reaches. The sweep redoes declined blocks with ``eigh``
    (``native_switch``: the kernel, then the XLA composition; conftest.py)."""
    n = 6
    angles = np.array([0.3, 1.5, 2.35, 2.5, 2.9, 1.0])
    x2 = one_plane(angles, n)  # one plane at that angle
    x1 = np.zeros_like(x2)
    x1[-1, 0, 0] = np.nan
    ts = np.array([0.0, 0.4, 1.0])
    y, bad, ok = _geodesic_sweep_matmul(
        jnp.asarray(x1),
        jnp.asarray(x2),
        jnp.asarray(ts),
        2.0,
        restore="cayley",
        orthogonal=(False, False),
    )
    want = np.broadcast_to(np.array([True, True, True, False, False, False]), (3, 6))
    np.testing.assert_array_equal(np.asarray(ok), want)
    np.testing.assert_array_equal(np.asarray(bad), ~want)
    assert np.all(np.isnan(np.asarray(y)[~want]))
    good = np.flatnonzero(want[0])
    np.testing.assert_allclose(
        np.asarray(y)[:, good],
        _sweep_reference(x1[good], x2[good], ts, 2.0, "cayley", (False, False)),
        atol=1e-7,
    )
    one = one_plane([1.0], n)  # 1 rad
    far = jnp.asarray([0.5, 8.0])  # 8 rad: about 33 terms for double round-off / 16
    _, _, ok = _geodesic_sweep_matmul(
        jnp.zeros((1, n, n)), jnp.asarray(one), far, 1.0, restore="none", orthogonal=(False, False)
    )
    kernel = native_switch == "1" and _native.available()
    np.testing.assert_array_equal(np.asarray(ok), [[not kernel], [not kernel]])
    # and the sweep redoes it with eigh (under jit: inside the program, by jax.lax.cond)
    opts = dispatch.Options("geodesic", "none", "matmul", sweep=True)
    eigh = dataclasses.replace(opts, algorithm="eigh")

    def run(x1, x2, ts):
        first = dispatch._run(x1, x2, ts, 1.0, opts)
        return dispatch._redo_declined(*first, lambda: dispatch._run(x1, x2, ts, 1.0, eigh))

    y, bad = jax.jit(run)(jnp.zeros((1, n, n)), jnp.asarray(one), far)
    assert not np.any(np.asarray(bad))
    np.testing.assert_allclose(
        np.asarray(y),
        _sweep_reference(np.zeros((1, n, n)), one, np.asarray(far), 1.0, "none", (False, False)),
        atol=1e-6,
    )


@pytest.mark.usefixtures("kernel_threads")  # one thread, then three (conftest.py)
def test_threads_split_the_batch():
    rng = np.random.default_rng(5)
    x1, x2 = inputs(rng, (37,), 40, 0.8)
    ts = rng.uniform(0.0, 1.0, 6)
    y, _, ok = _geodesic_sweep_matmul(
        jnp.asarray(x1),
        jnp.asarray(x2),
        jnp.asarray(ts),
        1.7,
        restore="cayley",
        orthogonal=(False, False),
    )
    assert np.all(np.asarray(ok))
    np.testing.assert_allclose(
        np.asarray(y), _sweep_reference(x1, x2, ts, 1.7, "cayley", (False, False)), atol=5e-8
    )


def test_vmap_gives_every_group_its_own_points():
    """Under vmap the kernel sees x1, x2 [G, B, n, n] and the points [G, T, 2] (G groups, each with
    its own t), and writes [G, T, B, n, n]."""
    rng = np.random.default_rng(7)
    x1, x2 = inputs(rng, (3, 4), 9, 0.7)
    ts = rng.uniform(0.0, 1.0, (3, 5))
    fn = jax.vmap(
        lambda a, b, t: _geodesic_sweep_matmul(
            a, b, t, 2.0, restore="none", orthogonal=(False, False)
        )[0]
    )
    y = fn(jnp.asarray(x1), jnp.asarray(x2), jnp.asarray(ts))
    assert y.shape == (3, 5, 4, 9, 9)
    for g in range(3):
        np.testing.assert_allclose(
            np.asarray(y[g]),
            _sweep_reference(x1[g], x2[g], ts[g], 2.0, "none", (False, False)),
            atol=5e-8,
        )


def test_derivatives_are_the_xla_compositions():
    rng = np.random.default_rng(6)
    x1, x2 = inputs(rng, (3,), 5, 0.6)

    def fn(a, b, ts):
        return _geodesic_sweep_matmul(a, b, ts, 1.5, restore="cayley", orthogonal=(False, False))[0]

    check_derivatives(fn, jnp.asarray(x1), jnp.asarray(x2), jnp.asarray([0.2, 0.7]))


def test_auto_takes_the_kernel_on_the_cpu_for_float32_only():
    from orthofuse_jax.fusion.adapter import LayerStack

    def adapter(dtype):
        z = jnp.zeros((2, 1, 4, 4), dtype)
        return GSAdapter(
            stacks={"nb1_b4": LayerStack(names=("a", "b"), L=z, R=z)}, scales={}, orthogonal=False
        )

    resolve = dispatch.resolve_algorithm
    kernel = _native.available()
    assert resolve("auto", sweep=True, dtype=jnp.float32, adapter=adapter(jnp.float32)) == (
        "matmul" if kernel else "eigh"
    )
    assert resolve("auto", sweep=True, dtype=jnp.float64, adapter=adapter(jnp.float64)) == "eigh"
    assert resolve("eigh", sweep=True, dtype=jnp.float32, adapter=adapter(jnp.float32)) == "eigh"
    assert resolve("auto", sweep=False, dtype=jnp.float32) == "matmul"
