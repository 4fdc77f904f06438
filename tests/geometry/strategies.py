"""Hypothesis strategies and independent numpy/scipy references for the geometry tests.

Random data is built in float64 with numpy/scipy from a hypothesis-drawn seed (so hypothesis
shrinks the seed, the shape and the rotation size, not thousands of floats), then cast to the
dtype under test. Rotations come from ``scipy.linalg.expm`` of a random skew generator scaled so
that its spectral radius -- the largest rotation angle of ``expm`` -- is exactly ``max_angle``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import scipy.linalg
from hypothesis import strategies as st

DTYPES = (np.float32, np.float64)

# Shapes always in the pool: b = 1, nb = 1, b > nb, b < nb, b = nb. Every new shape costs XLA
# compilations of each op, so the ``ci`` profile draws only from this pool; ``thorough`` also
# draws free shapes up to the given bounds.
SPECIAL_SHAPES = ((1, 4), (3, 1), (2, 3), (3, 2))
THOROUGH = os.environ.get("ORTHOFUSE_HYPOTHESIS_PROFILE", "ci") == "thorough"


def tol(dtype, *, f32: float = 1e-5, f64: float = 1e-12) -> float:
    """Per-dtype absolute tolerance (the project's accuracy targets by default)."""
    return f32 if np.dtype(dtype) == np.float32 else f64


def dtypes() -> st.SearchStrategy:
    return st.sampled_from(DTYPES)


def seeds() -> st.SearchStrategy[int]:
    return st.integers(min_value=0, max_value=2**32 - 1)


def gs_shapes(max_nb: int = 5, max_b: int = 5) -> st.SearchStrategy[tuple[int, int]]:
    """``(nb, b)`` pairs covering b=1, nb=1, b>nb and b<nb (free shapes only when thorough)."""
    special = [s for s in SPECIAL_SHAPES if s[0] <= max_nb and s[1] <= max_b]
    if not THOROUGH:
        return st.sampled_from(special)
    free = st.tuples(st.integers(1, max_nb), st.integers(1, max_b))
    return st.one_of(st.sampled_from(special), free)


def block_shapes(max_nb: int = 4, max_b: int = 5) -> st.SearchStrategy[tuple[int, int]]:
    """``(nb, b)`` for per-block functions (nb is only a batch axis): b = 1, 3 (a plane and a
    null direction) and 4 (two planes) under ``ci``; free shapes too under ``thorough``."""
    pool = [(3, 1), (2, 3), (1, 4)]
    if not THOROUGH:
        return st.sampled_from(pool)
    return st.one_of(
        st.sampled_from(pool), st.tuples(st.integers(1, max_nb), st.integers(1, max_b))
    )


# Under ``ci`` each (shape, dtype) pair costs a compilation per kernel, so the shape pools are
# paired with dtypes so that every shape class and both dtypes occur, without the full product.
_CI_PAIRS = {
    "gs": [((1, 4), np.float64), ((3, 1), np.float32), ((2, 3), np.float32), ((3, 2), np.float64)],
    "block": [
        ((3, 1), np.float32),
        ((2, 3), np.float64),
        ((1, 4), np.float32),
        ((1, 4), np.float64),
    ],
}


def shape_dtypes(kind: str = "block") -> st.SearchStrategy[tuple[tuple[int, int], type]]:
    """``((nb, b), dtype)``: paired pools under ``ci``, the full product (and free shapes) under
    ``thorough``."""
    if not THOROUGH:
        return st.sampled_from(_CI_PAIRS[kind])
    shapes = gs_shapes(max_nb=5, max_b=5) if kind == "gs" else block_shapes()
    return st.tuples(shapes, dtypes())


def angles(max_angle: float = 3.0, min_angle: float = 0.0) -> st.SearchStrategy[float]:
    return st.floats(min_value=min_angle, max_value=max_angle, allow_nan=False)


# --- float64 numpy constructions -----------------------------------------------------------


def random_skew(
    rng: np.random.Generator, shape: tuple[int, ...], b: int, max_angle: float
) -> np.ndarray:
    """Skew blocks ``[*shape, b, b]`` whose spectral radius is exactly ``max_angle`` per block.

    For a skew (normal) matrix the spectral radius is the spectral norm, and it is the largest
    rotation angle of ``expm``. ``b = 1`` gives zeros (SO(1) is trivial).
    """
    a = rng.standard_normal((*shape, b, b))
    s = 0.5 * (a - np.swapaxes(a, -1, -2))
    rho = np.linalg.norm(s, 2, axis=(-2, -1)) if b > 1 else np.zeros(shape)
    scale = np.where(rho > 0, max_angle / np.where(rho > 0, rho, 1.0), 0.0)
    return s * scale[..., None, None]


def expm64(s: np.ndarray) -> np.ndarray:
    """``scipy.linalg.expm`` over any leading axes, float64."""
    s = np.asarray(s, dtype=np.float64)
    flat = s.reshape(-1, *s.shape[-2:])
    return np.stack([scipy.linalg.expm(m) for m in flat]).reshape(s.shape)


def logm64(u: np.ndarray) -> np.ndarray:
    """Real principal ``scipy.linalg.logm`` over any leading axes, float64."""
    u = np.asarray(u, dtype=np.float64)
    flat = u.reshape(-1, *u.shape[-2:])
    out = []
    for m in flat:
        lg = scipy.linalg.logm(m)
        assert np.abs(np.imag(lg)).max() < 1e-12
        out.append(np.real(lg))
    return np.stack(out).reshape(u.shape)


def random_rotations(
    rng: np.random.Generator, shape: tuple[int, ...], b: int, max_angle: float
) -> np.ndarray:
    return expm64(random_skew(rng, shape, b, max_angle))


def shuffle_index(nb: int, b: int) -> np.ndarray:
    """``idx`` with ``(P z)[v*b + u] = z[u*nb + v]`` written out by loops (docs/math.md §1.3)."""
    idx = np.empty(nb * b, dtype=np.int64)
    for v in range(nb):
        for u in range(b):
            idx[v * b + u] = u * nb + v
    return idx


def shuffle_matrix64(nb: int, b: int) -> np.ndarray:
    """Dense ``P`` from the index formula: ``P[v*b+u, u*nb+v] = 1``."""
    n = nb * b
    p = np.zeros((n, n))
    idx = shuffle_index(nb, b)
    for row in range(n):
        p[row, idx[row]] = 1.0
    return p


def block_diag64(blocks: np.ndarray) -> np.ndarray:
    return scipy.linalg.block_diag(*[np.asarray(m, np.float64) for m in blocks])


def gs_dense64(L: np.ndarray, R: np.ndarray) -> np.ndarray:
    """Independent dense ``Q = P^T BD(L) P BD(R)`` for one layer ``[nb, b, b]``."""
    nb, b = L.shape[0], L.shape[-1]
    p = shuffle_matrix64(nb, b)
    return p.T @ block_diag64(L) @ p @ block_diag64(R)


# --- composite strategies -----------------------------------------------------------------


@dataclass(frozen=True)
class RotationCase:
    """A drawn stack: generators ``S`` (float64), rotations ``U = expm(S)`` (float64), dtype."""

    nb: int
    b: int
    dtype: type
    max_angle: float
    skew: np.ndarray
    rot: np.ndarray
    seed: int

    def rng(self, salt: int = 1) -> np.random.Generator:
        return np.random.default_rng([self.seed, salt])

    def cast(self, x: np.ndarray) -> np.ndarray:
        return np.asarray(x, dtype=self.dtype)


@st.composite
def rotation_stacks(
    draw,
    *,
    shapes: st.SearchStrategy | None = None,
    max_angle: float = 3.0,
    min_angle: float = 0.0,
    dtype=None,
    kind: str = "block",
) -> RotationCase:
    """A ``[nb, b, b]`` stack of rotations with largest angle drawn in ``[min_angle, max_angle]``.

    Shape and dtype come from :func:`shape_dtypes` (``kind``) unless given."""
    if shapes is None and dtype is None:
        (nb, b), dt = draw(shape_dtypes(kind))
    else:
        nb, b = draw(shapes if shapes is not None else block_shapes())
        dt = dtype if dtype is not None else draw(dtypes())
    ang = draw(angles(max_angle, min_angle))
    seed = draw(seeds())
    s = random_skew(np.random.default_rng(seed), (nb,), b, ang)
    return RotationCase(nb=nb, b=b, dtype=dt, max_angle=ang, skew=s, rot=expm64(s), seed=seed)


def orth_err(q: np.ndarray) -> float:
    """``max |Q^T Q - I|`` in float64."""
    q = np.asarray(q, dtype=np.float64)
    eye = np.eye(q.shape[-1])
    return float(np.abs(np.swapaxes(q, -1, -2) @ q - eye).max()) if q.size else 0.0


def scaled_settings(k: int, **kwargs):
    """``settings`` with ``k`` examples under the ``ci`` profile (25 examples) and proportionally
    more under ``thorough``; keeps the expensive properties inside the CI time budget."""
    from hypothesis import settings

    return settings(max_examples=max(1, settings.default.max_examples * k // 25), **kwargs)


# --- jitted library functions ---------------------------------------------------------------
# Eager JAX compiles every primitive separately for each new shape (about 25 small compilations
# for one GS product); the property tests call the jitted functions (one compilation per shape)
# and test_jit_vmap.py checks that jit(f) == f for every public function.

_STATIC = {
    "perfect_shuffle": ("nb",),
    "perfect_unshuffle": ("nb",),
    "log": ("angle_tol",),
    "log_with_flag": ("angle_tol",),
    "power": ("angle_tol",),
    "geodesic": ("angle_tol",),
    "spectral_map": ("angle_map", "angle_tol"),
    "spectral_map_with_flag": ("angle_map", "angle_tol"),
    "curve_speed": ("curve",),
}


class _Jitted:
    """``J.name`` is ``jax.jit(orthofuse_jax.geometry.name)`` with its static arguments marked."""

    def __init__(self):
        self._cache = {}

    def __getattr__(self, name: str):
        if name.startswith("_"):
            raise AttributeError(name)
        if name not in self._cache:
            import jax

            from orthofuse_jax import geometry

            self._cache[name] = jax.jit(
                getattr(geometry, name), static_argnames=_STATIC.get(name, ())
            )
        return self._cache[name]


J = _Jitted()


def pd_system(rng, batch, n, m, scale):
    """``(A, B)``: ``A = I - S + P`` with S skew of size ``scale`` and P small and PSD, so that A's
    symmetric part is positive definite (the systems the Cayley maps solve, without pivoting),
    and a right-hand side ``B [*batch, n, m]``; float64."""
    x = rng.standard_normal((*batch, n, n))
    s = scale * (x - np.swapaxes(x, -1, -2)) / np.sqrt(max(n, 1))
    y = 0.3 * rng.standard_normal((*batch, n, n)) / np.sqrt(max(n, 1))
    a = np.eye(n) - s + y @ np.swapaxes(y, -1, -2)
    return a, rng.standard_normal((*batch, n, m))
