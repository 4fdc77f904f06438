"""The GPU solve (``geometry/_pallas.py``): Gauss-Jordan without pivoting, one Pallas program per block.

Its arithmetic runs here in Pallas' interpreter and is checked against float64 numpy (LAPACK with
pivoting), never against itself, over block sizes 1-64 (padded to powers of two inside) and
right-hand sides of other widths; ``solve_pd``'s derivatives through it against finite
differences. Where it is used is checked on the programs lowered for CUDA: the Triton call is
there for float32 blocks up to 64 and nowhere else (float64, larger blocks, the switch, CPU
lowerings). Its speed and its agreement on an H100 are in benchmarks/RESULTS.md.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.test_util import check_grads
from lowering import cuda_text

from orthofuse_jax.geometry import _pallas, geodesic_path_cayley
from orthofuse_jax.geometry._linalg import _no_pivot_solve, cayley_map, gpu_solver, solve_pd

from .strategies import pd_system as _pd_system

TRITON = "__gpu$xla.gpu.triton"


def _interpret(a, b):
    return _pallas.gauss_jordan_solve(a, b, interpret=True)


@settings(max_examples=12, deadline=None)
@given(
    n=st.integers(1, 64),
    m=st.sampled_from([1, 3, None]),
    batch=st.sampled_from([(), (1,), (5,), (2, 3)]),
    scale=st.sampled_from([0.1, 1.0, 3.0]),
    seed=st.integers(0, 2**16),
)
def test_kernel_matches_float64_lapack(n, m, batch, scale, seed):
    rng = np.random.default_rng(seed)
    a, b = _pd_system(rng, batch, n, n if m is None else m, scale)
    exact = np.linalg.solve(a, b)
    got = np.asarray(
        _interpret(jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)), np.float64
    )
    assert got.shape == exact.shape
    cond = np.linalg.cond(a).max()
    np.testing.assert_allclose(got, exact, atol=2e-6 * cond * max(1.0, np.abs(exact).max()))
    got64 = np.asarray(_interpret(jnp.asarray(a), jnp.asarray(b)))
    np.testing.assert_allclose(got64, exact, atol=1e-12 * cond * max(1.0, np.abs(exact).max()))


def test_kernel_solves_the_cayley_systems_of_the_sdxl_block_sizes():
    """``(I - S)^{-1} (I + S)`` for rotations of 0.1-1 rad (trained adapters), b = 20, 40, 64."""
    rng = np.random.default_rng(1)
    for b in (20, 40, 64):
        x = rng.standard_normal((6, b, b))
        s = 0.4 * (x - np.swapaxes(x, -1, -2)) / np.sqrt(b)
        eye = np.eye(b)
        got = np.asarray(
            _interpret(jnp.asarray(eye - s, jnp.float32), jnp.asarray(eye + s, jnp.float32))
        )
        np.testing.assert_allclose(got, np.linalg.solve(eye - s, eye + s), atol=1e-6)


def test_empty_batch_and_shape_errors():
    assert _interpret(jnp.zeros((0, 4, 4)), jnp.zeros((0, 4, 2))).shape == (0, 4, 2)
    with pytest.raises(ValueError, match=r"a has shape \(2, 4, 3\)"):
        _interpret(jnp.zeros((2, 4, 3)), jnp.zeros((2, 4, 4)))


def test_derivatives_through_the_kernel_match_finite_differences():
    """``solve_pd`` wraps the kernel in ``custom_linear_solve``: forward and reverse, float64."""
    a, b = _pd_system(np.random.default_rng(2), (2,), 5, 3, 0.7)
    check_grads(
        _no_pivot_solve(_interpret),
        (jnp.asarray(a), jnp.asarray(b)),
        order=1,
        modes=("fwd", "rev"),
        atol=1e-6,
        rtol=1e-6,
    )
    vm = jax.vmap(_no_pivot_solve(_interpret))(
        jnp.asarray(a)[None].repeat(2, 0), jnp.asarray(b)[None].repeat(2, 0)
    )
    np.testing.assert_allclose(
        np.asarray(vm), np.broadcast_to(np.linalg.solve(a, b), vm.shape), atol=1e-12
    )


_cuda_text = cuda_text


def test_cuda_programs_call_the_kernel_for_float32_blocks_up_to_64():
    rng = np.random.default_rng(3)
    for n in (1, 20, 40, 64):
        a, b = (x.astype(np.float32) for x in _pd_system(rng, (3,), n, n, 0.5))
        assert TRITON in _cuda_text(solve_pd, a, b)
        assert TRITON in _cuda_text(jax.vmap(solve_pd), a[None], b[None])
        assert TRITON in _cuda_text(jax.grad(lambda a, b: jnp.sum(solve_pd(a, b))), a, b)
        assert (
            TRITON not in jax.jit(solve_pd).trace(a, b).lower(lowering_platforms=("cpu",)).as_text()
        )
    x = rng.standard_normal((3, 40, 40)).astype(np.float32)
    assert TRITON in _cuda_text(
        lambda x: cayley_map(x, 0.5 * x, c1=0.4, c2=0.6, c=1.8, square=True), x
    )  # fast merge
    assert TRITON in _cuda_text(
        lambda x: geodesic_path_cayley(x, 0.5 * x).at_restored(0.3, 0.9), x
    )  # exact merge


def test_cuda_programs_keep_cusolver_for_float64_large_blocks_and_the_switch(monkeypatch):
    rng = np.random.default_rng(4)
    a, b = _pd_system(rng, (2,), 65, 65, 0.5)
    assert gpu_solver(jnp.float32, 65) is None
    assert TRITON not in _cuda_text(solve_pd, a.astype(np.float32), b.astype(np.float32))
    assert gpu_solver(jnp.float64, 8) is None
    monkeypatch.setenv("ORTHOFUSE_JAX_NATIVE", "0")
    jax.clear_caches()  # the switch is read when a function is traced
    small = (x[:, :8, :8].astype(np.float32) for x in (a, b))
    assert TRITON not in _cuda_text(solve_pd, *small)
    monkeypatch.delenv("ORTHOFUSE_JAX_NATIVE")
    jax.clear_caches()
