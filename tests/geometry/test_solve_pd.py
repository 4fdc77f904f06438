"""``solve_pd``: the compiled no-pivot CPU solve (``_native/kernels.inc``) behind the Cayley maps.

Checked against float64 numpy (never against itself), in float32 and float64, over block sizes
1-70 and batch sizes that are not multiples of the kernel's 8 lanes, under
``jit`` and ``vmap``, with forward and reverse derivatives equal to ``jnp.linalg.solve``'s. The
kernel must have been built in CI (a C++ compiler is part of the CI image).
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from lowering import cuda_text

from orthofuse_jax import _native
from orthofuse_jax.geometry._linalg import solve_pd

from .strategies import pd_system as _pd_system

pytestmark = pytest.mark.usefixtures("kernel_build")  # both builds of the kernels (conftest.py)


def test_the_kernel_is_built_where_ci_runs():
    if os.environ.get("CI") or _native.library_path() is not None:
        assert _native.library_path() is not None, "orthofuse_jax/_native/ffi.cc was not compiled"
        assert _native.solve_target(np.dtype("float32")) == "orthofuse_solve_f32"
        assert _native.solve_target(np.dtype("float64")) == "orthofuse_solve_f64"
        assert _native.target("cayley", np.dtype("float32")) == "orthofuse_cayley_f32"
    assert _native.solve_target(np.dtype("int32")) is None


@given(
    n=st.integers(1, 70),
    m=st.integers(1, 9),
    batch=st.sampled_from([(), (1,), (17,), (3, 5), (9,)]),
    scale=st.sampled_from([0.1, 1.0, 5.0]),
    seed=st.integers(0, 2**16),
)
@pytest.mark.parametrize("dtype, tol", [(np.float32, 3e-6), (np.float64, 1e-12)])
def test_matches_float64_numpy(dtype, tol, n, m, batch, scale, seed):
    a, b = _pd_system(np.random.default_rng(seed), batch, n, m, scale)
    got = np.asarray(jax.jit(solve_pd)(a.astype(dtype), b.astype(dtype)))
    assert got.dtype == dtype and got.shape == b.shape
    want = np.linalg.solve(a.astype(dtype).astype(np.float64), b.astype(dtype).astype(np.float64))
    np.testing.assert_allclose(got, want, atol=tol * max(1.0, np.abs(want).max()), rtol=0)


def test_broadcast_batch_vmap_and_empty_batch():
    rng = np.random.default_rng(0)
    a, b = _pd_system(rng, (4,), 12, 12, 1.0)
    want = np.linalg.solve(a, b)
    # b broadcast over a's batch, as cayley() passes it
    np.testing.assert_allclose(
        np.asarray(solve_pd(a, b[:1])),
        np.linalg.solve(a, np.broadcast_to(b[:1], b.shape)),
        atol=1e-12,
    )
    np.testing.assert_allclose(np.asarray(jax.vmap(solve_pd)(a, b)), want, atol=1e-12)
    np.testing.assert_allclose(
        np.asarray(jax.vmap(solve_pd, in_axes=(None, 0))(a[0], b)),
        np.linalg.solve(a[0], b),
        atol=1e-12,
    )
    assert solve_pd(a[:0], b[:0]).shape == (0, 12, 12)


@pytest.mark.parametrize("dtype, tol", [(np.float32, 2e-4), (np.float64, 1e-10)])
def test_derivatives_equal_lapack_solves(dtype, tol):
    a, b = _pd_system(np.random.default_rng(1), (19,), 9, 4, 1.0)
    a, b = jnp.asarray(a, dtype), jnp.asarray(b, dtype)

    def loss(solve):
        return lambda a, b: jnp.sum(jnp.sin(solve(a, b)) * jnp.arange(4, dtype=dtype))

    ours, ref = (
        jax.grad(loss(solve_pd), (0, 1))(a, b),
        jax.grad(loss(jnp.linalg.solve), (0, 1))(a, b),
    )
    for g, h in zip(ours, ref):
        np.testing.assert_allclose(np.asarray(g), np.asarray(h), atol=tol * float(jnp.abs(h).max()))
    da, db = 0.1 * jnp.flip(a, -1), jnp.cos(b)
    jv = jax.jvp(solve_pd, (a, b), (da, db))[1]
    jw = jax.jvp(jnp.linalg.solve, (a, b), (da, db))[1]
    np.testing.assert_allclose(np.asarray(jv), np.asarray(jw), atol=tol * float(jnp.abs(jw).max()))


def test_switch_off_falls_back_to_lapack(monkeypatch):
    a, b = _pd_system(np.random.default_rng(2), (5,), 8, 8, 1.0)
    monkeypatch.setenv("ORTHOFUSE_JAX_NATIVE", "0")
    assert _native.solve_target(np.dtype("float32")) is None
    jax.clear_caches()  # the switch is read when a function is traced
    text = jax.jit(solve_pd).lower(a.astype(np.float32), b.astype(np.float32)).as_text()
    assert "orthofuse_solve" not in text
    monkeypatch.delenv("ORTHOFUSE_JAX_NATIVE")
    jax.clear_caches()
    if _native.available():
        text = jax.jit(solve_pd).lower(a.astype(np.float32), b.astype(np.float32)).as_text()
        assert "orthofuse_solve_f32" in text
    np.testing.assert_allclose(np.asarray(solve_pd(a, b)), np.linalg.solve(a, b), atol=1e-12)


def test_large_blocks_take_lapack():
    from orthofuse_jax.geometry._linalg import NATIVE_MAX_BLOCK

    for n, native in ((NATIVE_MAX_BLOCK, True), (NATIVE_MAX_BLOCK + 1, False)):
        a, b = _pd_system(np.random.default_rng(n), (2,), n, 3, 1.0)
        text = jax.jit(solve_pd).lower(a, b).as_text()
        assert ("orthofuse_solve_f64" in text) == (native and _native.available())
        np.testing.assert_allclose(np.asarray(solve_pd(a, b)), np.linalg.solve(a, b), atol=1e-11)


def test_gpu_lowering_never_calls_the_cpu_kernel():
    """Lowered for CUDA (no GPU needed): the Pallas solve for float32 (tests/geometry/test_pallas.py),
    jnp.linalg.solve's cuSOLVER path for float64, never the CPU kernel."""
    a, b = _pd_system(np.random.default_rng(3), (3,), 8, 8, 1.0)
    traced = jax.jit(solve_pd).trace(a.astype(np.float32), b.astype(np.float32))
    cuda = cuda_text(solve_pd, a.astype(np.float32), b.astype(np.float32))
    assert "orthofuse_solve" not in cuda and "__gpu$xla.gpu.triton" in cuda
    cuda64 = cuda_text(solve_pd, a, b)
    assert "orthofuse_solve" not in cuda64 and ("cusolver" in cuda64 or "cublas" in cuda64)
    if _native.available():
        assert "orthofuse_solve_f32" in traced.lower(lowering_platforms=("cpu",)).as_text()
