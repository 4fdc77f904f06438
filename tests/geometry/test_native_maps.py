"""``cayley_map`` and ``geodesic_point``: the Cayley maps (with the fast merge and its restoration)
and the points of a decomposed geodesic (with their polar step and restoration), each one
compiled pass per block on the CPU.

``(B - c S)^{-1} (B + c S)``, ``S = c1 skew(X1) + c2 skew(X2)``, ``B = I - S^2`` or ``I``, checked
against that formula in float64 numpy (never against itself): in float32 and float64, block sizes
1-70 (the kernel's vectors hold 8 doubles, so most sizes leave a partial vector), batch sizes of
any kind, per-block coefficients, under ``jit`` and ``vmap``; derivatives against finite
differences. The kernel inverts without pivoting, which these matrices never need: their
symmetric part is ``I`` or ``I - S^2 = I + S^T S``. The geodesic points are checked against
``U1 (U1^T U2)^t`` from scipy's float64 ``fractional_matrix_power``, including a sweep's shape (one
decomposition, many t), which the kernel reads without broadcast copies.
"""

from __future__ import annotations

import platform

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg
from hypothesis import given
from hypothesis import strategies as st
from jax.test_util import check_grads
from lowering import cuda_text

from orthofuse_jax import _native
from orthofuse_jax.geometry import cayley, geodesic_path_cayley
from orthofuse_jax.geometry._linalg import NATIVE_MAX_BLOCK, cayley_map, geodesic_point

pytestmark = pytest.mark.usefixtures("kernel_build")  # both builds of the kernels (conftest.py)


def _skew64(x):
    x = np.asarray(x, np.float64)
    return 0.5 * (x - np.swapaxes(x, -1, -2))


def _reference(x1, x2, c1, c2, c, square):
    """The defining formula in float64 numpy (LAPACK with pivoting)."""
    batch = np.broadcast_shapes(
        np.shape(x1)[:-2], np.shape(x2)[:-2], np.shape(c1), np.shape(c2), np.shape(c)
    )
    col = lambda v: np.broadcast_to(np.asarray(v, np.float64), batch)[..., None, None]
    s = col(c1) * _skew64(x1) + col(c2) * _skew64(x2)
    eye = np.eye(s.shape[-1])
    base = eye - s @ s if square else np.broadcast_to(eye, s.shape)
    return np.linalg.solve(base - col(c) * s, base + col(c) * s)


def _uses_kernel(fn, *args) -> bool:
    return "orthofuse_cayley" in jax.jit(fn).lower(*args).as_text()


@given(
    n=st.integers(1, 70),
    batch=st.sampled_from([(), (1,), (17,), (3, 5)]),
    scale=st.sampled_from([0.05, 0.5, 3.0]),
    square=st.booleans(),
    per_block=st.booleans(),
    seed=st.integers(0, 2**16),
)
@pytest.mark.parametrize("dtype, tol", [(np.float32, 3e-7), (np.float64, 1e-13)])
def test_matches_float64_formula(dtype, tol, n, batch, scale, square, per_block, seed):
    rng = np.random.default_rng(seed)
    x1, x2 = (scale * rng.standard_normal((*batch, n, n)).astype(dtype) for _ in range(2))
    if per_block:  # one t (and restoration strength) per block
        t = rng.uniform(0.0, 1.0, batch).astype(dtype)
        c = rng.uniform(1.0, 2.0, batch).astype(dtype)
    else:
        t, c = dtype(0.3), dtype(1.84)
    got = np.asarray(
        jax.jit(lambda a, b, t, c: cayley_map(a, b, c1=1 - t, c2=t, c=c, square=square))(
            x1, x2, t, c
        )
    )
    want = _reference(x1, x2, 1 - t, t, c, square)
    assert got.dtype == dtype and got.shape == want.shape
    # float32: the kernel computes in double and rounds once (LAPACK's float32 solve: ~3e-7 more)
    np.testing.assert_allclose(got, want, atol=tol * max(1.0, np.abs(want).max()), rtol=0)
    # and the result is a rotation
    eye = np.eye(n)
    np.testing.assert_allclose(
        np.swapaxes(got, -1, -2).astype(np.float64) @ got,
        np.broadcast_to(eye, want.shape),
        atol=10 * tol,
    )


def test_one_argument_is_the_cayley_map_and_the_kernel_runs_where_built():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((6, 20, 20))
    np.testing.assert_allclose(
        np.asarray(cayley_map(a)), _reference(a, a, 1.0, 0.0, 1.0, False), atol=1e-13
    )
    np.testing.assert_allclose(
        np.asarray(cayley_map(a, c1=0.7)), _reference(a, a, 0.7, 0.0, 1.0, False), atol=1e-13
    )
    assert _uses_kernel(cayley_map, a) == _native.available()


def test_vmap_over_t_and_over_blocks():
    rng = np.random.default_rng(1)
    x1, x2 = rng.standard_normal((2, 5, 12, 12)) * 0.4
    ts = np.linspace(0.0, 1.0, 7)
    sweep = jax.vmap(
        lambda t: cayley_map(x1, x2, c1=1 - t, c2=t, c=1 + 4 * t * (1 - t), square=True)
    )(ts)
    want = np.stack([_reference(x1, x2, 1 - t, t, 1 + 4 * t * (1 - t), True) for t in ts])
    np.testing.assert_allclose(np.asarray(sweep), want, atol=1e-13)
    per_block = jax.vmap(lambda a, b: cayley_map(a, b, c1=0.5, c2=0.5))(x1, x2)
    np.testing.assert_allclose(
        np.asarray(per_block), _reference(x1, x2, 0.5, 0.5, 1.0, False), atol=1e-13
    )
    assert cayley_map(x1[:0], x2[:0]).shape == (0, 12, 12)


@pytest.mark.parametrize("square", [False, True])
def test_derivatives_match_finite_differences(square):
    rng = np.random.default_rng(2)
    x1, x2 = (jnp.asarray(0.3 * rng.standard_normal((3, 6, 6))) for _ in range(2))

    def f(x1, x2, t):
        return cayley_map(x1, x2, c1=1 - t, c2=t, c=1.5, square=square)

    check_grads(f, (x1, x2, jnp.float64(0.4)), order=2, modes=("fwd", "rev"), atol=1e-6, rtol=1e-6)


def _cpu_flags() -> set:
    return set(open("/proc/cpuinfo").read().split())


def test_the_build_matches_the_cpu(monkeypatch):
    """The kernels are built for AVX-512 and for AVX2 with FMA; each call runs the one the CPU has
    (an AVX-512 CPU runs the AVX2 build when asked, for tests and benchmarks)."""
    if _native.library_path() is None:
        pytest.skip("needs the built kernels")  # CI asserts they are built (test_solve_pd.py)
    monkeypatch.delenv("ORTHOFUSE_JAX_ISA", raising=False)
    if platform.machine() not in ("x86_64", "AMD64"):
        assert _native.isa() == "portable" and not _native.vectors_native()
        return
    flags = _cpu_flags()
    avx2 = {"avx2", "fma"} <= flags
    assert _native.isa() == ("avx512" if "avx512f" in flags else "avx2" if avx2 else None)
    assert _native.vectors_native() == ("avx512f" in flags or avx2)
    monkeypatch.setenv("ORTHOFUSE_JAX_ISA", "avx2")
    assert _native.isa() == ("avx2" if avx2 else None)


def test_cpus_without_a_build_take_xla(monkeypatch):
    """Where no build runs (an x86-64 CPU without AVX2) the kernels are not registered, even when
    forced, and the merges run XLA's formulas with the same numbers; the portable build of other
    architectures is registered only when forced."""
    if _native.library_path() is None:
        pytest.skip("needs the built kernels")  # CI asserts they are built (test_solve_pd.py)
    rng = np.random.default_rng(4)
    a = rng.standard_normal((2, 9, 9)).astype(np.float32)
    for forced in (False, True):
        monkeypatch.setattr(_native, "_state", {})  # registration is tried once per process
        monkeypatch.setattr(_native, "isa", lambda: None)
        if forced:
            monkeypatch.setenv("ORTHOFUSE_JAX_NATIVE", "force")
        jax.clear_caches()  # targets are looked up when a function is traced
        assert not _native.available() and _native.target("cayley", np.dtype("float32")) is None
        assert not _uses_kernel(cayley_map, a)
        np.testing.assert_allclose(
            np.asarray(cayley_map(a)), _reference(a, a, 1.0, 0.0, 1.0, False), atol=1e-6
        )
    monkeypatch.setattr(_native, "_state", {})
    monkeypatch.setattr(_native, "isa", lambda: "portable")
    monkeypatch.delenv("ORTHOFUSE_JAX_NATIVE")
    assert not _native.available()
    monkeypatch.setenv("ORTHOFUSE_JAX_NATIVE", "force")
    jax.clear_caches()
    assert (
        _native.available()
        and _native.target("cayley", np.dtype("float32")) == "orthofuse_cayley_f32"
    )
    assert _uses_kernel(cayley_map, a)
    np.testing.assert_allclose(
        np.asarray(cayley_map(a)), _reference(a, a, 1.0, 0.0, 1.0, False), atol=3e-7
    )
    monkeypatch.undo()
    jax.clear_caches()


def test_switch_off_and_large_blocks_take_xla(monkeypatch):
    rng = np.random.default_rng(3)
    a = rng.standard_normal((2, 9, 9)).astype(np.float32)
    monkeypatch.setenv("ORTHOFUSE_JAX_NATIVE", "0")
    jax.clear_caches()  # the switch is read when a function is traced
    assert not _uses_kernel(cayley_map, a)
    np.testing.assert_allclose(
        np.asarray(cayley_map(a)), _reference(a, a, 1.0, 0.0, 1.0, False), atol=1e-6
    )
    monkeypatch.delenv("ORTHOFUSE_JAX_NATIVE")
    jax.clear_caches()
    big = rng.standard_normal((1, NATIVE_MAX_BLOCK + 1, NATIVE_MAX_BLOCK + 1)) * 0.05
    assert not _uses_kernel(cayley_map, big)
    np.testing.assert_allclose(
        np.asarray(cayley_map(big)), _reference(big, big, 1.0, 0.0, 1.0, False), atol=1e-12
    )


def test_gpu_lowering_never_calls_the_cpu_kernel():
    x = np.random.default_rng(4).standard_normal((3, 8, 8)).astype(np.float32)
    fn = lambda a: cayley_map(a, a, c1=0.4, c2=0.6, c=1.9, square=True)
    traced = jax.jit(fn).trace(x)
    assert "orthofuse_cayley" not in cuda_text(fn, x)
    if _native.available():
        assert "orthofuse_cayley_f32" in traced.lower(lowering_platforms=("cpu",)).as_text()


def _geodesic64(a1, a2, ts):
    """``U1 (U1^T U2)^t`` per block in float64 (scipy), for every t: ``[T, ..., b, b]``."""
    u1 = np.asarray(cayley(jnp.asarray(a1, jnp.float64)))
    u2 = np.asarray(cayley(jnp.asarray(a2, jnp.float64)))
    w = np.swapaxes(u1, -1, -2) @ u2
    flat = w.reshape(-1, *w.shape[-2:])
    out = [
        u1
        @ np.stack([np.real(scipy.linalg.fractional_matrix_power(x, t)) for x in flat]).reshape(
            w.shape
        )
        for t in ts
    ]
    return np.stack(out)


def _curve_over_id64(y, eta):
    k = np.asarray(eta)[..., None, None] * _skew64(y)
    eye = np.eye(y.shape[-1])
    return np.linalg.solve(eye - k, eye + k)


@pytest.mark.parametrize("dtype, tol", [(np.float32, 4e-7), (np.float64, 1e-12)])
@pytest.mark.parametrize("n", [1, 5, 20, 33])
def test_geodesic_points_match_scipy(dtype, tol, n):
    rng = np.random.default_rng(n)
    a1, a2 = (0.6 * rng.standard_normal((2, 3, n, n)) / np.sqrt(n) for _ in range(2))
    a1, a2 = a1.astype(dtype), a2.astype(dtype)
    ts = np.array([0.0, 0.3, 0.6, 1.0])
    want = _geodesic64(a1, a2, ts)
    eta = 0.5 + 2 * ts * (1 - ts)
    path = geodesic_path_cayley(jnp.asarray(a1), jnp.asarray(a2))
    tb = jnp.asarray(ts, dtype)[:, None, None]  # a sweep: every t against one decomposition
    got = np.asarray(path.at(tb))
    restored = np.asarray(path.at_restored(tb, jnp.asarray(eta, dtype)[:, None, None]))
    assert got.shape == restored.shape == want.shape and got.dtype == dtype
    np.testing.assert_allclose(got, want, atol=tol, rtol=0)
    np.testing.assert_allclose(
        restored, _curve_over_id64(want, eta[:, None, None]), atol=tol, rtol=0
    )
    one = np.asarray(
        jax.jit(lambda p, t: p.at_restored(t, 0.5 + 2 * t * (1 - t)))(path, dtype(0.3))
    )
    np.testing.assert_allclose(one, restored[1], atol=tol, rtol=0)


def test_geodesic_point_vmap_derivatives_and_lowering():
    rng = np.random.default_rng(5)
    a, b, v = (jnp.asarray(0.5 * rng.standard_normal((4, 6, 6))) for _ in range(3))
    c, r = (jnp.asarray(rng.uniform(-1, 1, (4, 6))) for _ in range(2))
    # vmap over t (only c, r and eta batched) equals the explicit sweep shape
    swept = jax.vmap(lambda c, r, e: geodesic_point(a, b, v, c, r, e))(
        jnp.stack([c, r]), jnp.stack([r, c]), jnp.array([0.7, 0.9])
    )
    direct = geodesic_point(
        a, b, v, jnp.stack([c, r]), jnp.stack([r, c]), jnp.array([0.7, 0.9])[:, None]
    )
    np.testing.assert_allclose(np.asarray(swept), np.asarray(direct), atol=1e-13)
    check_grads(
        lambda a, c, e: geodesic_point(a, b, v, c, r, e),
        (a, c, jnp.float64(0.8)),
        order=1,
        modes=("fwd", "rev"),
        atol=1e-6,
        rtol=1e-6,
    )
    x = np.asarray(a, np.float32)
    fn = lambda a: geodesic_point(a, a, a, x[..., 0], x[..., 1], 0.9)
    traced = jax.jit(fn).trace(x)
    assert "orthofuse_point" not in cuda_text(fn, x)
    if _native.available():
        assert "orthofuse_point_f32" in traced.lower(lowering_platforms=("cpu",)).as_text()


def test_a_geodesic_path_lowered_for_gpus_has_no_cpu_kernel():
    """The whole path (Cayley maps, relative parameter, points with restoration), lowered for CUDA:
    XLA, cuSOLVER and the Pallas solve only, the pivoted relative_cayley there; on the CPU, the compiled kernels."""
    x = np.random.default_rng(6).standard_normal((3, 8, 8)).astype(np.float32)

    def fn(a1, a2):
        path = geodesic_path_cayley(a1, a2)
        return path.at_restored(jnp.linspace(0.0, 1.0, 4)[:, None], 0.9)

    traced = jax.jit(fn).trace(x, 0.5 * x)
    cuda = cuda_text(fn, x, 0.5 * x)
    assert not any(
        f"orthofuse_{k}_f" in cuda for k in ("cayley", "solve", "point")
    )  # (file names of the GPU kernel may appear)
    if _native.available():
        cpu = traced.lower(lowering_platforms=("cpu",)).as_text()
        assert all(f"orthofuse_{k}_f32" in cpu for k in ("cayley", "solve", "point"))


@pytest.mark.parametrize("threads", ["1", "3", "7"])
def test_threads_split_large_batches(monkeypatch, threads):
    """A call of more than about 4M multiply-adds splits its blocks over threads
    (``ORTHOFUSE_JAX_THREADS``, read per call); every piece is checked against float64 references,
    including a sweep whose pieces start inside a t (point g uses block g % blocks)."""
    monkeypatch.setenv("ORTHOFUSE_JAX_THREADS", threads)
    rng = np.random.default_rng(8)
    x1, x2 = (0.4 * rng.standard_normal((301, 40, 40)) for _ in range(2))
    t = rng.uniform(0.0, 1.0, 301)
    c = rng.uniform(1.0, 2.0, 301)
    got = np.asarray(cayley_map(x1, x2, c1=1 - t, c2=t, c=c, square=True))
    np.testing.assert_allclose(got, _reference(x1, x2, 1 - t, t, c, True), atol=1e-12, rtol=0)

    a1, a2 = (0.6 * rng.standard_normal((97, 24, 24)) / np.sqrt(24) for _ in range(2))
    ts = np.array([0.0, 0.25, 0.5, 0.8, 1.0])
    path = geodesic_path_cayley(jnp.asarray(a1), jnp.asarray(a2))
    swept = np.asarray(path.at_restored(jnp.asarray(ts)[:, None], 0.9))
    np.testing.assert_allclose(
        swept, _curve_over_id64(_geodesic64(a1, a2, ts), 0.9), atol=1e-12, rtol=0
    )

    from orthofuse_jax.geometry._linalg import solve_pd

    eye = np.eye(40)
    s = _skew64(x1)
    np.testing.assert_allclose(
        np.asarray(solve_pd(eye - s, x2)), np.linalg.solve(eye - s, x2), atol=1e-12, rtol=0
    )


@pytest.mark.parametrize("native", ["1", "0"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("n", [13, 16])
def test_flag_marks_exactly_the_blocks_with_inf_or_nan(monkeypatch, native, dtype, n):
    """``with_flag=True`` (the merges' "bad block" flag): the kernel's, computed in its output pass,
    and the XLA formula's agree with numpy's ``isfinite`` on the float64 reference, block by block
    (n = 16: the kernel's vector output pass; 13: its scalar one)."""
    monkeypatch.setenv("ORTHOFUSE_JAX_NATIVE", native)
    jax.clear_caches()
    rng = np.random.default_rng(9)
    x1, x2 = (0.5 * rng.standard_normal((40, n, n)).astype(dtype) for _ in range(2))
    x1[3, 2, 5] = np.nan
    x2[7, 0, 0] = np.inf  # the diagonal: skew(X2) is inf - inf = nan there
    x1[11, 12, 1] = -np.inf
    x2[11, 1, 12] = np.finfo(dtype).max  # huge but finite: (max - inf) / 2 is still -inf
    for square in (False, True):
        y, bad = cayley_map(x1, x2, c1=0.3, c2=0.7, c=1.4, square=square, with_flag=True)
        with np.errstate(all="ignore"):  # numpy meets the same infs and nans
            ref = _reference(x1, x2, 0.3, 0.7, 1.4, square)
        want = ~np.isfinite(ref).all(axis=(-1, -2))
        assert bad.dtype == jnp.bool_ and bad.shape == (40,)
        np.testing.assert_array_equal(np.asarray(bad), want)
        assert set(np.flatnonzero(want)) == {3, 7, 11}
        ok = ~want
        np.testing.assert_allclose(
            np.asarray(y)[ok], ref[ok], atol=1e-6 if dtype == np.float32 else 1e-12, rtol=0
        )
    # a flag output changes neither vmap nor derivatives of the blocks
    f = lambda a: cayley_map(a, with_flag=True)[0]
    a = jnp.asarray(x1[:2].astype(np.float64))
    check_grads(f, (a,), order=1, modes=("fwd", "rev"), atol=1e-6, rtol=1e-6)
    vm = jax.vmap(lambda a: cayley_map(a, with_flag=True))(jnp.asarray(x1).reshape(4, 10, n, n))
    np.testing.assert_array_equal(
        np.asarray(vm[1]).reshape(40), np.asarray(cayley_map(x1, with_flag=True)[1])
    )
    monkeypatch.delenv("ORTHOFUSE_JAX_NATIVE")
    jax.clear_caches()
