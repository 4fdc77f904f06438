"""Every public array function of ``orthofuse_jax.geometry``: ``jit(f)(x) == f(x)`` and
``vmap(f)`` over a new leading axis equals a Python loop.

Functions of integers only (``stabilizer_*``, ``group_dimension``, ``orbit_dimension``,
``perfect_shuffle_indices``, ``perfect_shuffle_matrix``) build host-side numbers or constants from
static shapes; they are not traced and are skipped here (see SKIPPED).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from orthofuse_jax import geometry as geo

from .strategies import random_rotations, random_skew, tol

NB, B = 5, 4  # the shape of test_spectral.py's eager tests: eager compilations are shared
N = NB * B
N_BATCH = 3

SKIPPED = {
    # ints in, host numbers / constants out
    "group_dimension",
    "orbit_dimension",
    "stabilizer_dimension",
    "stabilizer_dimension_formula",
    "stabilizer_is_discrete",
    "perfect_shuffle_indices",
    "perfect_shuffle_matrix",
    # whether its arguments are traced: a question for the host (test_spectral.py)
    "is_concrete",
    # not functions (GeodesicPath is covered through geodesic_path)
    "DEFAULT_ANGLE_TOL",
    "cpu_only",  # a context manager for tracing
    "LOG_ALGORITHMS",
    "LOG_POLYNOMIAL_MAX_ANGLE",
    "GeodesicPath",
    "NegativeEigenvalueError",
}


def odd_map(theta):
    return 0.6 * theta + 0.02 * theta**3


def _rot(rng, ang=2.0):
    return random_rotations(rng, (NB,), B, ang)


def _skew(rng, ang=2.0):
    return random_skew(rng, (NB,), B, ang)


def _signs(rng):
    return rng.choice([-1.0, 1.0], size=(NB, B))


# name -> (function of arrays only, builder of one example's arguments from an rng)
TABLE = {
    "act": (geo.act, lambda r: (_rot(r), _rot(r), random_rotations(r, (), N, 2.0))),
    "block_diag": (geo.block_diag, lambda r: (r.standard_normal((NB, B, B)),)),
    "cayley": (geo.cayley, lambda r: (r.standard_normal((NB, B, B)),)),
    "curve_speed": (
        lambda u1, u2, t: geo.curve_speed(lambda s: geo.geodesic(u1, u2, s), t),
        lambda r: (_rot(r), _rot(r), np.asarray(r.uniform(0, 1))),
    ),
    "expm_skew": (geo.expm_skew, lambda r: (_skew(r, 5.0),)),
    "expm_skew_taylor": (geo.expm_skew_taylor, lambda r: (_skew(r, 5.0),)),
    "eye_like": (lambda a: geo.eye_like(a) + 0.0 * a, lambda r: (r.standard_normal((NB, B, B)),)),
    "geodesic": (geo.geodesic, lambda r: (_rot(r), _rot(r), np.asarray(r.uniform(-0.5, 1.5)))),
    "geodesic_path": (
        lambda u1, u2, t: geo.geodesic_path(u1, u2).at(t),
        lambda r: (_rot(r), _rot(r), np.asarray(r.uniform(-0.5, 1.5))),
    ),
    "geodesic_path_cayley": (
        lambda a1, a2, t: geo.geodesic_path_cayley(a1, a2).at(t),
        lambda r: (
            r.standard_normal((NB, B, B)),
            r.standard_normal((NB, B, B)),
            np.asarray(r.uniform(-0.5, 1.5)),
        ),
    ),
    "geodesic_with_flag": (
        geo.geodesic_with_flag,
        lambda r: (_rot(r, 1.0), _rot(r, 1.0), np.asarray(r.uniform(-0.5, 1.5))),
    ),
    # relative angles below 2 rad: near pi the float32 distance is ill-conditioned (tan(theta/2))
    "geodesic_distance": (geo.geodesic_distance, lambda r: (_rot(r, 1.0), _rot(r, 1.0))),
    "geodesic_speed": (
        geo.geodesic_speed,
        lambda r: (_rot(r), _rot(r), np.asarray(r.uniform(0, 1))),
    ),
    "gs_apply": (geo.gs_apply, lambda r: (r.standard_normal((2, N)), _rot(r), _rot(r))),
    "gs_apply_transpose": (
        geo.gs_apply_transpose,
        lambda r: (r.standard_normal((2, N)), _rot(r), _rot(r)),
    ),
    "gs_dense": (geo.gs_dense, lambda r: (_rot(r), _rot(r))),
    # static shapes: under vmap it must see one example's shape
    "gs_shape": (
        lambda L, R: jnp.asarray(geo.gs_shape(L, R)) + 0 * L.sum().astype(int),
        lambda r: (_rot(r), _rot(r)),
    ),
    "inverse_cayley": (geo.inverse_cayley, lambda r: (_rot(r),)),
    "log": (geo.log, lambda r: (_rot(r, 3.0),)),
    "log_with_flag": (geo.log_with_flag, lambda r: (_rot(r, 3.0),)),
    "log_polynomial": (geo.log_polynomial, lambda r: (_rot(r, 2.0),)),
    "orbit_map": (geo.orbit_map, lambda r: (_rot(r), _rot(r))),
    "perfect_shuffle": (
        lambda z: geo.perfect_shuffle(z, NB),
        lambda r: (r.standard_normal((2, N)),),
    ),
    "perfect_unshuffle": (
        lambda z: geo.perfect_unshuffle(z, NB),
        lambda r: (r.standard_normal((2, N)),),
    ),
    "power": (geo.power, lambda r: (_rot(r, 3.0), np.asarray(r.uniform(-1, 2)))),
    # a matrix with a positive definite symmetric part (I + skew + small symmetric), any right-hand side
    "solve_pd": (
        lambda s, b: geo.solve_pd(
            jnp.eye(B, dtype=s.dtype)
            + s
            - jnp.swapaxes(s, -1, -2)
            + 0.1 * (s + jnp.swapaxes(s, -1, -2)),
            b,
        ),
        lambda r: (0.5 * r.standard_normal((NB, B, B)), r.standard_normal((NB, B, B))),
    ),
    "rotation_parameters": (geo.rotation_parameters, lambda r: (_rot(r, 2.0),)),
    "relative_cayley": (
        geo.relative_cayley,
        lambda r: (r.standard_normal((NB, B, B)), 0.5 * r.standard_normal((NB, B, B))),
    ),
    "relative_rotation": (geo.relative_rotation, lambda r: (_rot(r), _rot(r))),
    "rotation_angles": (geo.rotation_angles, lambda r: (_rot(r),)),
    "sign_stabilizer_element": (geo.sign_stabilizer_element, lambda r: (_signs(r),)),
    "skew": (geo.skew, lambda r: (r.standard_normal((NB, B, B)),)),
    "spectral_map": (lambda u: geo.spectral_map(u, odd_map), lambda r: (_rot(r, 3.0),)),
    "spectral_map_with_flag": (
        lambda u: geo.spectral_map_with_flag(u, odd_map),
        lambda r: (_rot(r, 3.0),),
    ),
}


def test_table_covers_public_api():
    assert set(TABLE) | SKIPPED == set(geo.__all__)
    assert not set(TABLE) & SKIPPED


def _close(a, b, dtype):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        x, y = np.asarray(x), np.asarray(y)
        assert x.shape == y.shape and x.dtype == y.dtype
        if x.dtype.kind == "f":
            np.testing.assert_allclose(
                x, y, rtol=0, atol=tol(dtype, f32=1e-5, f64=1e-12) * max(1.0, np.abs(y).max())
            )
        else:
            np.testing.assert_array_equal(x, y)


def _args(name, dtype, k):
    build = TABLE[name][1]
    rng = np.random.default_rng([sorted(TABLE).index(name), k])
    return tuple(
        np.asarray(a, dtype) if np.asarray(a).dtype.kind == "f" else np.asarray(a)
        for a in build(rng)
    )


@pytest.mark.parametrize("name", sorted(TABLE))
def test_jit_and_vmap_match_eager(name):
    """float64: jit(f) == f (eager) and jit(vmap(f)) == a Python loop of eager f."""
    dtype = np.float64
    f = TABLE[name][0]
    examples = [_args(name, dtype, k) for k in range(N_BATCH)]
    eager = [f(*ex) for ex in examples]  # the Python loop
    _check_dtype(eager, dtype)
    _close(jax.jit(f)(*examples[0]), eager[0], dtype)
    # vmap over a new leading axis (jitted, as merges call it; eager vmap would recompile every
    # primitive for the batched shapes) against the Python loop
    stacked = tuple(np.stack(a) for a in zip(*examples, strict=True))
    looped = jax.tree.map(lambda *xs: np.stack(xs), *eager)
    _close(jax.jit(jax.vmap(f))(*stacked), looped, dtype)


@pytest.mark.parametrize("name", sorted(TABLE))
def test_jit_float32_keeps_dtype(name):
    """float32 under jit: the dtype is kept and the result matches the float64 one (the
    eager/jit/vmap identities are checked in float64 above; repeating them in float32 would
    double the compilations)."""
    f = TABLE[name][0]
    out32 = jax.jit(f)(*_args(name, np.float32, 0))
    _check_dtype([out32], np.float32)
    out64 = jax.jit(f)(*_args(name, np.float64, 0))
    for x, y in zip(jax.tree.leaves(out32), jax.tree.leaves(out64), strict=True):
        x, y = np.asarray(x), np.asarray(y)
        if x.dtype.kind == "f":
            np.testing.assert_allclose(x, y, rtol=0, atol=3e-4 * max(1.0, np.abs(y).max()))
        else:
            np.testing.assert_array_equal(x, y)


def _check_dtype(outs, dtype):
    for out in outs:
        for leaf in jax.tree.leaves(out):
            if np.asarray(leaf).dtype.kind == "f":
                assert np.asarray(leaf).dtype == dtype  # dtype preserved
