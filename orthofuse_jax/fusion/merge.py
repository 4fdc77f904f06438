"""OrthoFuse merges of GS adapters: block-level maps and the adapter-level :func:`merge` / :func:`sweep`.

One convention everywhere: ``t = 0`` is the first (concept) adapter, ``t = 1`` the second (style);
N adapters take a probability vector of weights in adapter order. Every merge acts block by block,
independently on the L stack and the R stack; the perfect shuffle is untouched (docs/math.md §3).

Methods (``method=``):

* ``"geodesic"`` -- the full OrthoFuse merge (docs/math.md §3.1, paper eq. (4)): ``Y(t) = U1 (U1^T U2)^t``,
  exact in real arithmetic (inverse Cayley + ``eigh``; :mod:`orthofuse_jax.geometry.spectral`).
  N adapters: the weighted Karcher mean (:mod:`orthofuse_jax.fusion.karcher`).
* ``"cayley"`` -- the fast merge (docs/math.md §3.2, paper eq. (38)): ``Y(t) = Cay((1-t) skew(A1) + t skew(A2))``
  on RAW Cayley parameters. N adapters: ``Cay(sum_i w_i skew(A_i))``.

Spectra restoration (``restore=``), with the phase multiplier (paper eqs. (6)-(8), docs/math.md §3.3)

    f(t) = 1 + 4 (alpha - 1) t (1 - t)            (two adapters; f(0) = f(1) = 1, f(1/2) = alpha)
    f(w) = 1 + 2 (alpha - 1) (1 - sum_i w_i^2)    (N adapters; equals f(t) for w = (1 - t, t):
                                                   1 - (1-t)^2 - t^2 = 2 t (1 - t))

* ``"none"``: ``Y``.
* ``"cayley"``: ``Cay(eta Y)``, ``eta = f / 2``; with ``alpha = 2`` this is exactly the reference's
  ``curve_over_id`` (``eta = 0.5 + 2 p (1 - p)``, docs/math.md §3.3) used by both presets (``p = t`` for
  ``moft_merge``, ``p = 1 - t`` for ``moft_merge_fast``; eta is symmetric so both equal ``p = t``).
  Like the reference it does not restore the endpoints exactly (``theta -> theta - theta^3/4`` at
  t = 0, 1) and caps rotations at pi/2.
* ``"exact"``: ``exp(f log Y)`` (paper eq. (6)), computed as a real spectral map of the rotation
  angles; ``f = 1`` at the endpoints, so t = 0 and t = 1 return the inputs.

Reference bugs we do not reproduce (docs/math.md §8): the eig-based log with ``V^H`` for ``V^{-1}`` (9.1) and
the branch cut at -1 (9.2) -- we use the real principal log, and a block with an eigenvalue at -1
(no real log) raises :class:`MergeError` naming the layer (NaN under ``jit``) instead of silently
returning a non-orthogonal block; the opposite t conventions (9.10) -- one convention here; the
exact-float ``sum(ts) == 1`` assertion (9.4) -- a tolerance here; in-place mutation (9.7) -- all
functions are pure. The style scales are dropped only under ``scales="concept"`` (9.11, docs/math.md §3.5).
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, replace

import jax
import jax.numpy as jnp
import numpy as np

from .._runtime import warn_cpu_threads
from ..geometry import (
    DEFAULT_ANGLE_TOL,
    cayley,
    cpu_only,
    geodesic,
    geodesic_path,
    geodesic_path_cayley,
    inverse_cayley,
    power,
    relative_rotation,
    skew,
    spectral_map_with_flag,
)
from ..geometry._linalg import _with_kernel, cayley_map, mm, native_target, not_finite
from ..geometry._types import Array, Block, Bool, Float
from ..geometry.polynomial import _expm_taylor_with_ok, kernel_attributes, log_polynomial
from ..geometry.spectral import _polar_step
from .adapter import GSAdapter, LayerStack, check_compatible, on_cpu, to_orthogonal
from .karcher import cayley_mean_blocks, karcher_mean_blocks_with_flag
from .scales import SCALE_RULES, combine_scales

__all__ = [
    "ALGORITHMS",
    "METHODS",
    "RESTORES",
    "MergeError",
    "MergeReport",
    "cayley_restored",
    "cayley_space_blocks",
    "curve_over_id",
    "geodesic_blocks",
    "merge",
    "merge_report",
    "orthogonality_error",
    "restoration_factor",
    "restore_exact",
    "sweep",
]

METHODS = ("geodesic", "cayley")
RESTORES = ("none", "cayley", "exact")
ALGORITHMS = ("auto", "eigh", "matmul")


class MergeError(ValueError):
    """A merge is undefined for some layer (e.g. a block with an eigenvalue at -1); names the layer."""


# ------------------------------------------------------------------------------------------------
# Block level: pure, jit/vmap-safe, ``[..., b, b]``, dtype-generic.


def _t_blocks(t, dtype) -> Array:
    return jnp.asarray(t, dtype=dtype)[..., None, None]


def geodesic_blocks(u1: Block, u2: Block, t, *, angle_tol: float = DEFAULT_ANGLE_TOL) -> Block:
    """Exact SO(b) geodesic ``U1 (U1^T U2)^t`` (docs/math.md §3.1, paper eq. (4)); ``t = 0 -> U1``, ``t = 1 -> U2``.

    The reference computes ``U1 Re(expm(-t V diag(i Arg lambda) V^H))`` from a complex ``eig`` of
    ``U2^T U1``, which is wrong for repeated eigenvalues and at -1 (docs/math.md §8); this is the real
    principal-log form (:func:`orthofuse_jax.geometry.geodesic`). Raises
    :class:`~orthofuse_jax.geometry.NegativeEigenvalueError` on concrete input whose relative
    rotation has an eigenvalue -1; NaN blocks under ``jit``.

    Args:
      u1, u2: orthogonal blocks ``[..., b, b]``.
      t: scalar or array broadcasting against ``u1.shape[:-2]``.
    """
    return geodesic(u1, u2, t, angle_tol=angle_tol)


def cayley_space_blocks(a1: Block, a2: Block, t) -> Block:
    """Fast merge ``Cay((1 - t) skew(A1) + t skew(A2))`` on RAW Cayley parameters (docs/math.md §3.2, eq. (38)).

    Our convention: ``t = 0 -> Cay(A1)``, ``t = 1 -> Cay(A2)``. The reference's
    ``merge_inside_cayley_space([A1, A2], [t', 1 - t'])`` is this function at ``t = 1 - t'``
    (docs/math.md §3.4).
    """
    t = jnp.asarray(t, dtype=a1.dtype)
    return cayley_map(a1, a2, c1=1.0 - t, c2=t)


def curve_over_id(u: Block, p) -> Block:
    """The reference's spectra restoration ``Cay(eta U)``, ``eta = 0.5 + 2 p (1 - p)`` (docs/math.md §3.3).

    ``U`` is an orthogonal block; ``Cay`` takes its skew part, so this is ``Cay(eta (U - U^T)/2)``
    and maps each rotation angle ``theta`` to ``2 arctan(eta sin theta)``. The reference asserts
    ``0 <= p <= 1``; this pure function does not check (``merge`` checks t).
    """
    p = jnp.asarray(p, dtype=u.dtype)
    return cayley_map(u, c1=0.5 + 2.0 * p * (1.0 - p))


def cayley_restored(s: Block, eta) -> Block:
    """``Cay(eta Cay(S))`` -- Cayley-space merge followed by ``curve_over_id`` -- in one pass.

    ``skew(Cay(S)) = 2 S (I - S^2)^{-1}``, and every factor is a rational function of the same
    skew ``S``, so they commute and

        Cay(eta Cay(S)) = (I - S^2 + 2 eta S) (I - S^2 - 2 eta S)^{-1}.

    The matrix solved against has symmetric part ``I - S^2 = I + S^T S >= I``: it is never
    singular and its inverse has norm at most 1, so this one solve (XLA; GPUs and TPUs) is as
    well conditioned as the reference's two (docs/math.md §3.2 + 3.7, preset ``moft_merge_fast``). On the
    CPU the compiled kernel instead inverts ``I - S`` and ``I - eta skew(Cay(S))`` in place, in
    double (:func:`~orthofuse_jax.geometry._linalg.cayley_map`).

    Args:
      s: skew blocks ``[..., b, b]`` (e.g. ``(1 - t) skew(A1) + t skew(A2)``).
      eta: scalar or array broadcasting against ``s.shape[:-2]`` (``0.5 + 2p(1-p)`` in docs/math.md §3.3).
    """
    return cayley_map(s, c=2.0 * jnp.asarray(eta, dtype=s.dtype), square=True)


def restoration_factor(t, alpha=2.0):
    """Phase multiplier ``f(t) = 1 + 4 (alpha - 1) t (1 - t)`` (paper eq. (8), docs/math.md §3.3)."""
    return 1.0 + 4.0 * (alpha - 1.0) * t * (1.0 - t)


def restore_exact(u: Block, t, alpha=2.0, *, angle_tol: float = DEFAULT_ANGLE_TOL) -> Block:
    """Exact restoration ``exp(f(t) log U)``, ``f(t) = 1 + 4 (alpha - 1) t (1 - t)`` (paper eqs. (6), (8)).

    ``f(0) = f(1) = 1`` (endpoints unchanged), ``f(1/2) = alpha``; ``alpha = 1`` is the identity
    map, ``alpha = 0`` collapses the midpoint to the identity matrix. Computed as
    :func:`orthofuse_jax.geometry.power` ``(U, f)``; raises on concrete blocks with an eigenvalue -1.
    """
    return power(u, restoration_factor(jnp.asarray(t, dtype=u.dtype), alpha), angle_tol=angle_tol)


# ------------------------------------------------------------------------------------------------
# Kernels on one stack (jitted; options static).


def _restore_with_flag(y: Block, f, restore: str, angle_tol: float, algorithm: str = "eigh"):
    """``(Y', bad, ok)``: the restoration of ``Y``; ``ok`` False where the product-only path
    (``algorithm="matmul"``, restore ``exact``) declined a block and ``eigh`` must redo it."""
    ok = jnp.ones(y.shape[:-2], bool)
    if restore == "none":
        return y, not_finite(y), ok
    if restore == "cayley":
        y, bad = cayley_map(y, c1=0.5 * jnp.asarray(f, y.dtype), with_flag=True)
        return y, bad, ok
    if algorithm == "matmul":  # exp(f log Y) with products only
        x, ok = log_polynomial(y)
        e, ok_e = _expm_taylor_with_ok(
            jnp.asarray(f, y.dtype)[..., None, None] * x, _MATMUL_SQUARINGS
        )
        y, ok = _polar_step(e), ok & ok_e
        return y, not_finite(y) & ok, ok
    y, bad = spectral_map_with_flag(y, lambda th: f * th, angle_tol=angle_tol)
    return y, bad | not_finite(y), ok


_MATMUL_SQUARINGS = 4
"""Squarings of the product-only exponential: exact for ``||X||_2 <= 8`` (t and f up to about 2.5
at the largest accepted angles); blocks beyond go to ``eigh``."""


@dataclass(frozen=True)
class _MatmulPath:
    """``gamma(t) = U1 expm(t X)``, ``X = log(U1^T U2)`` by :func:`log_polynomial`; ``ok`` where it applies."""

    start: Block
    log: Block
    ok: Bool[Array, "*batch"]

    def at(self, t):
        e, ok = _expm_taylor_with_ok(_t_blocks(t, self.log.dtype) * self.log, _MATMUL_SQUARINGS)
        return _polar_step(mm(self.start, e)), self.ok & ok


def _pair_point(x1, x2, t, path, *, f, method, restore, angle_tol, algorithm):
    """``(Y, bad, ok)`` at one t, ``f`` the restoration factor there; ``ok`` (product-only path
    applies) is all True for ``eigh``."""
    if method == "cayley" and restore == "cayley":
        # Cay(eta Cay(S)), S = (1 - t) skew(A1) + t skew(A2), in one pass (cayley_restored)
        t = jnp.asarray(t, x1.dtype)
        y, bad = cayley_map(x1, x2, c1=1.0 - t, c2=t, c=f, square=True, with_flag=True)
        return y, bad, jnp.ones(y.shape[:-2], bool)
    if method == "geodesic" and algorithm == "matmul":
        y, ok = path.at(t)
        bad = not_finite(y) & ok
    elif method == "geodesic" and restore == "cayley":  # the point and curve_over_id in one pass
        y = path.at_restored(t, 0.5 * jnp.asarray(f, x1.dtype))
        return y, path.bad | not_finite(y), jnp.ones(y.shape[:-2], bool)
    elif method == "geodesic":
        y, bad, ok = path.at(t), path.bad, True
    else:
        y, ok = cayley_space_blocks(x1, x2, t), True
        bad = not_finite(y)
    y, bad2, ok2 = _restore_with_flag(y, f, restore, angle_tol, algorithm)
    return y, bad | bad2, ok & ok2


_RESTORE_CODES = {"none": 0, "cayley": 1, "exact": 2}


def _geodesic_matmul(x1, x2, t, f, *, restore, orthogonal):
    """``(Y, bad, ok)`` of the product-only exact merge at ``t`` with restoration factor ``f``:
    ``U1 expm(t log(U1^T U2))`` (:class:`_MatmulPath`), then ``restore``.

    On the CPU with the compiled kernels this is one pass per block
    (``orthofuse_jax/_native/solve.cc``, ``GeodesicBlocks``: the Cayley maps inverted in double,
    ``W^t`` by the direct power ``a_t(P) + K b_t(P)`` where ``t`` is in ``POWER_T_RANGE`` and
    the angles within 2.4 rad (``polynomial.POWER_TIERS``; else the log interpolant and the
    exponential with only the squarings a block needs), the polar step and the restoration, with
    products in the input's precision), its blocks split
    over the process's CPUs; elsewhere, and for derivatives, the XLA composition
    (:func:`_pair_point`). Both decline (``ok`` False) the blocks outside the interpolant's range
    or the squarings' reach; their range checks differ only at its edge (an eigenvalue of
    ``Y`` between -1 and -1.015, inside the fit's [-1.02, 1] either way).
    """
    dtype = x1.dtype
    batch = jnp.broadcast_shapes(x1.shape[:-2], x2.shape[:-2], jnp.shape(t), jnp.shape(f))
    x1 = jnp.broadcast_to(x1, batch + x1.shape[-2:])
    x2 = jnp.broadcast_to(x2, batch + x2.shape[-2:])
    flags = (_RESTORE_CODES[restore], float(orthogonal[0]), float(orthogonal[1]))
    coef = jnp.stack(
        [jnp.broadcast_to(jnp.asarray(v, dtype), batch) for v in (t, f, *flags)], axis=-1
    )

    def xla(x1, x2, coef):
        x1, x2, path = _inputs_and_path(
            x1,
            x2,
            method="geodesic",
            angle_tol=DEFAULT_ANGLE_TOL,
            orthogonal=orthogonal,
            algorithm="matmul",
        )
        return _pair_point(
            x1,
            x2,
            coef[..., 0],
            path,
            f=coef[..., 1],
            method="geodesic",
            restore=restore,
            angle_tol=DEFAULT_ANGLE_TOL,
            algorithm="matmul",
        )

    out = (
        jax.ShapeDtypeStruct(x1.shape, dtype),
        jax.ShapeDtypeStruct(batch, jnp.bool_),
        jax.ShapeDtypeStruct(batch, jnp.bool_),
    )
    return _with_kernel(
        "geodesic", xla, x1, x2, coef, out=out, attrs=kernel_attributes(_MATMUL_SQUARINGS, dtype)
    )


def _geodesic_sweep_matmul(x1, x2, ts, alpha, *, restore, orthogonal):
    """``(Y, bad, ok)`` ``[T, ...]``: :func:`_geodesic_matmul` at every t of ``ts`` (1-D), the
    t-independent half (the Cayley maps and the log) done once per block.

    On the CPU with the compiled kernels this is one pass per block (``solve.cc``, ``SweepBlocks``):
    after the log, the Taylor coefficients ``M_k = U1 X^k / k!`` of the geodesic
    ``U1 expm(t X) = sum_k t^k M_k`` in double, as many as the largest ``|t|`` needs for the
    output's round-off (a bound from the ``M_k`` themselves), then per t a Horner pass and the
    restoration (``curve_over_id``: one inversion). Elsewhere, and for derivatives, the XLA
    composition: :class:`_MatmulPath` vmapped over t (an exponential per t).
    """
    dtype = x1.dtype
    batch = jnp.broadcast_shapes(x1.shape[:-2], x2.shape[:-2])
    x1 = jnp.broadcast_to(x1, batch + x1.shape[-2:])
    x2 = jnp.broadcast_to(x2, batch + x2.shape[-2:])
    ts = jnp.asarray(ts, dtype)
    pts = jnp.stack([ts, restoration_factor(ts, jnp.asarray(alpha, dtype))], axis=-1)

    def xla(x1, x2, pts):
        x1, x2, path = _inputs_and_path(
            x1,
            x2,
            method="geodesic",
            angle_tol=DEFAULT_ANGLE_TOL,
            orthogonal=orthogonal,
            algorithm="matmul",
        )
        point = functools.partial(
            _pair_point,
            method="geodesic",
            restore=restore,
            angle_tol=DEFAULT_ANGLE_TOL,
            algorithm="matmul",
        )
        y, bad, ok = jax.vmap(lambda p: point(x1, x2, p[0], path, f=p[1]))(pts)
        return y, bad, jnp.broadcast_to(ok, bad.shape)

    lead = ts.shape
    out = (
        jax.ShapeDtypeStruct(lead + x1.shape, dtype),
        jax.ShapeDtypeStruct(lead + batch, jnp.bool_),
        jax.ShapeDtypeStruct(lead + batch, jnp.bool_),
    )
    flags = np.asarray(
        [_RESTORE_CODES[restore], float(orthogonal[0]), float(orthogonal[1])], np.float64
    )
    return _with_kernel(
        "sweep",
        xla,
        x1,
        x2,
        pts,
        out=out,
        attrs={**kernel_attributes(_MATMUL_SQUARINGS, dtype), "flags": flags},
    )


_CPU_CHUNK_BYTES = 1 * 2**20
"""Target size of one chunk's outputs (all t) when ``sweep`` runs a CPU stack in chunks."""

_CPU_MERGE_CHUNK_BYTES = 2**19
"""The same for ``merge``. With the compiled solve, 0.5 MB was 8-9% faster than 1 MB for the exact
merges and equal for the fast one (140 SDXL layers, one core; 0.25 MB: fast 10% slower)."""

_CPU_MIN_CHUNK_BLOCKS = 16
"""A merge chunk holds at least this many blocks, so that the compiled solve's SIMD lanes (8 blocks
at a time) are filled: 0.5 MB of 128x128 blocks is only 8, and with the kernel's first version
(16 lanes) that wasted half its work. A sweep's chunks are filled along its t axis instead."""


def _as_method_input(x: Block, orthogonal: bool, method: str) -> Block:
    """``Cay(x)`` / ``invCay(x)`` when ``method`` needs the other form (``_stack_inputs``)."""
    if orthogonal == (method == "geodesic"):
        return x
    return cayley(x) if method == "geodesic" else inverse_cayley(x)


def _inputs_and_path(x1, x2, *, method, angle_tol, orthogonal, algorithm):
    """The two stacks in the form ``method`` needs, and for ``geodesic`` the t-independent path.

    ``algorithm="matmul"``: ``U1 expm(t log(U1^T U2))`` with the product-only log and exp
    (:class:`_MatmulPath`). ``"eigh"``: the spectral :class:`GeodesicPath`; two raw-parameter
    stacks take :func:`geodesic_path_cayley` (its inverse Cayley map needs no pivoting), and the
    converted ``x2`` is then unused.
    """
    if method == "geodesic" and algorithm == "matmul":
        x1, x2 = (
            _as_method_input(x1, orthogonal[0], method),
            _as_method_input(x2, orthogonal[1], method),
        )
        x, ok = log_polynomial(relative_rotation(x1, x2))
        return x1, x2, _MatmulPath(start=x1, log=x, ok=ok)
    if method == "geodesic" and not any(orthogonal):
        return x1, x2, geodesic_path_cayley(x1, x2, angle_tol=angle_tol)
    x1, x2 = (
        _as_method_input(x1, orthogonal[0], method),
        _as_method_input(x2, orthogonal[1], method),
    )
    path = geodesic_path(x1, x2, angle_tol=angle_tol) if method == "geodesic" else None
    return x1, x2, path


def _pair_blocks(x1, x2, t, alpha, *, method, restore, angle_tol, orthogonal, algorithm):
    f = restoration_factor(jnp.asarray(t, x1.dtype), alpha)
    if method == "geodesic" and algorithm == "matmul":
        return _geodesic_matmul(x1, x2, t, f, restore=restore, orthogonal=orthogonal)
    x1, x2, path = _inputs_and_path(
        x1, x2, method=method, angle_tol=angle_tol, orthogonal=orthogonal, algorithm=algorithm
    )
    return _pair_point(
        x1,
        x2,
        t,
        path,
        f=f,
        method=method,
        restore=restore,
        angle_tol=angle_tol,
        algorithm=algorithm,
    )


def _sweep_blocks(x1, x2, ts, alpha, *, method, restore, angle_tol, orthogonal, algorithm):
    if method == "geodesic" and algorithm == "matmul":
        return _geodesic_sweep_matmul(x1, x2, ts, alpha, restore=restore, orthogonal=orthogonal)
    # The t-independent decomposition (inverse Cayley of U1^T U2 and its eigh) is done once here.
    x1, x2, path = _inputs_and_path(
        x1, x2, method=method, angle_tol=angle_tol, orthogonal=orthogonal, algorithm=algorithm
    )
    if method == "geodesic" and algorithm == "eigh" and restore in ("none", "cayley"):
        # every t at once: the compiled point kernel reads the path once per block, not per t
        tb = ts.reshape(ts.shape + (1,) * (x1.ndim - 2))
        y = path.at_restored(
            tb, 0.5 * restoration_factor(tb, alpha) if restore == "cayley" else None
        )
        bad = path.bad | not_finite(y)
        return y, bad, jnp.ones_like(bad)
    if method == "cayley":
        x1, x2 = skew(x1), skew(x2)
    point = functools.partial(
        _pair_point, method=method, restore=restore, angle_tol=angle_tol, algorithm=algorithm
    )
    y, bad, ok = jax.vmap(lambda t: point(x1, x2, t, path, f=restoration_factor(t, alpha)))(ts)
    return y, bad, jnp.broadcast_to(ok, bad.shape)


def _blocks_with_fallback(x1, x2, t, alpha, *, sweep, fallback, **options):
    """``(Y, bad, ok)`` of :func:`_pair_blocks` / :func:`_sweep_blocks`.

    With ``algorithm="matmul"`` some blocks may be declined (``ok`` False: a rotation angle above
    2.4 rad, or a t / restoration factor too large for the squarings). ``fallback="cond"`` redoes
    them here with ``eigh`` (``jax.lax.cond``: only when there are any; on a GPU the branch costs a
    host round trip). ``fallback="host"`` returns them for :func:`_fill_declined` (eager merges:
    no round trip per stack).
    """
    blocks = _sweep_blocks if sweep else _pair_blocks
    y, bad, ok = blocks(x1, x2, t, alpha, **options)
    if options["algorithm"] != "matmul" or fallback == "host":
        return y, bad, ok

    def redo():
        ye, be, _ = blocks(x1, x2, t, alpha, **{**options, "algorithm": "eigh"})
        return jnp.where(ok[..., None, None], y, ye), jnp.where(ok, bad, be)

    y, bad = jax.lax.cond(jnp.all(ok), lambda: (y, bad), redo)
    return y, bad, jnp.ones_like(ok)


_STATIC = ("method", "restore", "angle_tol", "orthogonal", "algorithm", "fallback", "cpu")


@functools.partial(jax.jit, static_argnames=_STATIC)
def _pair_kernel(
    x1,
    x2,
    t,
    alpha,
    *,
    method,
    restore,
    angle_tol,
    orthogonal=(False, False),
    algorithm="eigh",
    fallback="cond",
    cpu=False,
):
    # x1, x2 are the adapters' own stacks, converted here: no converted copy outlives the kernel.
    # cpu: the inputs are concrete arrays on the CPU, so only the CPU's kernels are traced.
    with cpu_only(cpu):
        return _blocks_with_fallback(
            x1,
            x2,
            t,
            alpha,
            sweep=False,
            method=method,
            restore=restore,
            angle_tol=angle_tol,
            orthogonal=orthogonal,
            algorithm=algorithm,
            fallback=fallback,
        )


@functools.partial(jax.jit, static_argnames=_STATIC)
def _sweep_kernel(
    x1,
    x2,
    ts,
    alpha,
    *,
    method,
    restore,
    angle_tol,
    orthogonal=(False, False),
    algorithm="eigh",
    fallback="cond",
    cpu=False,
):
    with cpu_only(cpu):
        return _blocks_with_fallback(
            x1,
            x2,
            ts,
            alpha,
            sweep=True,
            method=method,
            restore=restore,
            angle_tol=angle_tol,
            orthogonal=orthogonal,
            algorithm=algorithm,
            fallback=fallback,
        )


@functools.partial(jax.jit, static_argnames=_STATIC, donate_argnames=("into",), keep_unused=True)
def _sweep_kernel_into(x1, x2, ts, alpha, into, **options):
    """:func:`_sweep_kernel` with the memory of ``into`` (donated; the result's shape and dtype) for
    its result: XLA aliases the output to the donated parameter, so the kernel writes into pages the
    process already has (``keep_unused``: the parameter is never read, and jit would drop it)."""
    del into
    return _sweep_kernel(x1, x2, ts, alpha, **options)


def _chunk_size(x: Array, target_bytes: int, min_blocks: int = 1) -> int | None:
    """Blocks per chunk for merging stack ``x`` in chunks, or None to merge it in one call.

    The merge kernel holds several block-sized temporaries per input block (the Cayley and
    inverse-Cayley solves, ``eigh``, the rotation): about 7 stacks' worth for a whole stack, 0.5 GB
    for the 64x64 SDXL stack. In chunks of 0.5-1 MB they are negligible, and they stay
    in cache: on CPU the batched LAPACK calls loop over the blocks anyway, so the merge even gets
    faster. Only concrete CPU stacks are chunked, by a Python loop over one compiled chunk kernel:
    an XLA while loop (``lax.map``) would cost a thread hand-off per operation per chunk, which on
    a loaded CPU made it several times slower. Traced stacks and accelerators keep one call per
    stack. A divisor of the block count is preferred, so no chunk overlaps the one before it.
    A chunk holds at least ``min_blocks`` blocks.
    """
    if (
        not isinstance(x, jax.Array)
        or isinstance(x, jax.core.Tracer)
        or {d.platform for d in x.devices()} != {"cpu"}
    ):
        return None
    n, b = int(np.prod(x.shape[:-2], dtype=np.int64)), x.shape[-1]
    target = max(min_blocks, target_bytes // (b * b * x.dtype.itemsize))
    if n <= target:
        return None
    divisor = max(d for d in range(1, target + 1) if n % d == 0)
    return divisor if 4 * divisor >= target else target


@functools.partial(jax.jit, static_argnames=("chunk", "sweep", *_STATIC), donate_argnums=(0, 1, 2))
def _chunk_kernel(y, bad, ok, x1, x2, start, t, alpha, *, chunk, sweep, cpu=False, **options):
    """Blocks ``[start, start + chunk)`` of the flattened stacks, written into ``y, bad, ok`` in place.

    ``sweep=False``: one merge at ``t`` (:func:`_pair_blocks`); ``sweep=True``: every t of ``t``
    (:func:`_sweep_blocks`), outputs with a leading t axis. ``y``, ``bad`` and ``ok`` are buffers
    that :func:`_run_chunked` created and donates, never the caller's.
    """
    b, lead = x1.shape[-1], y.shape[: int(sweep)]
    part = lambda x: jax.lax.dynamic_slice_in_dim(x.reshape(-1, b, b), start, chunk)
    with cpu_only(cpu):
        yc, bc, oc = _blocks_with_fallback(part(x1), part(x2), t, alpha, sweep=sweep, **options)
    axis = len(lead)
    y = jax.lax.dynamic_update_slice_in_dim(y.reshape(*lead, -1, b, b), yc, start, axis).reshape(
        y.shape
    )
    flat = lambda f, fc: jax.lax.dynamic_update_slice_in_dim(
        f.reshape(*lead, -1), fc, start, axis
    ).reshape(f.shape)
    return y, flat(bad, bc), flat(ok, oc)


def _run_chunked(x1, x2, t, alpha, chunk: int, *, sweep: bool = False, into=None, **options):
    """:func:`_pair_kernel` (or :func:`_sweep_kernel`) on concrete stacks, ``chunk`` blocks per call,
    into one output buffer (``into``, donated, when given).

    The last chunk starts at ``n - chunk`` and may overlap the one before it; the overlapping blocks
    are recomputed from the same inputs, with the same values (each block's result depends only
    on that block).
    """
    n = int(np.prod(x1.shape[:-2], dtype=np.int64))
    lead = (t.shape[0],) if sweep else ()
    y = into if into is not None else jnp.zeros((*lead, *x1.shape), x1.dtype)
    bad = jnp.zeros((*lead, *x1.shape[:-2]), bool)
    ok = jnp.zeros((*lead, *x1.shape[:-2]), bool)
    for i in range(-(-n // chunk)):
        start = min(i * chunk, n - chunk)
        y, bad, ok = _chunk_kernel(
            y, bad, ok, x1, x2, start, t, alpha, chunk=chunk, sweep=sweep, **options
        )
    return y, bad, ok


def _pair_or_sweep(x1, x2, t, alpha, *, sweep: bool, into=None, **options):
    """``(Y, bad, ok)``: merge two stacks at ``t`` (``sweep=False``) or at every t of ``t``: one
    kernel call, or on concrete CPU stacks a chunked loop (:func:`_chunk_size`) sized so that a
    chunk's outputs for all t stay near ``_CPU_CHUNK_BYTES`` (a merge's: ``_CPU_MERGE_CHUNK_BYTES``).

    The fast merge of two raw-parameter stacks with its restoration, and the product-only exact
    merge (:func:`_geodesic_matmul`), are one pass of a compiled kernel per block, with no
    temporaries to keep in cache: they run on the whole stack (a 0.5 MB chunk loop cost 20-25% more,
    in dispatch and slicing).

    Concrete stacks leave blocks the product-only path declined to the caller
    (:func:`_fill_declined`); traced ones redo them inside the kernel (``jax.lax.cond``).
    ``into`` (a sweep of concrete stacks only): a donated buffer shaped like the result, which
    the result then occupies (:func:`sweep`'s ``reuse``).
    """
    concrete = _is_concrete(x1, x2, t, alpha)
    options = {
        **options,
        "fallback": "host" if concrete else "cond",
        "cpu": concrete and on_cpu((x1, x2)),
    }
    n_t = t.shape[0] if sweep else 1
    budget = _CPU_CHUNK_BYTES // n_t if sweep and n_t else _CPU_MERGE_CHUNK_BYTES
    min_blocks = 1 if sweep else _CPU_MIN_CHUNK_BLOCKS
    fast = (options["method"], options["restore"]) == ("cayley", "cayley") and not any(
        options["orthogonal"]
    )
    exact = (options["method"], options["algorithm"]) == ("geodesic", "matmul")
    kernel = (
        ("sweep" if sweep else "geodesic") if exact else "cayley" if fast and not sweep else None
    )
    one_pass = kernel is not None and native_target(kernel, x1.dtype, x1.shape[-1]) is not None
    chunk = (
        _chunk_size(x1, max(1, budget), min_blocks) if n_t and concrete and not one_pass else None
    )
    into = into if sweep and concrete else None
    if chunk is not None:
        return _run_chunked(x1, x2, t, alpha, chunk, sweep=sweep, into=into, **options)
    if into is not None:
        return _sweep_kernel_into(x1, x2, t, alpha, into, **options)
    return (_sweep_kernel if sweep else _pair_kernel)(x1, x2, t, alpha, **options)


def _fill_declined(y, bad, ok, redo):
    """Blocks the product-only path declined (``ok`` False, concrete) from ``redo()``, the same
    merge with ``algorithm="eigh"``; called after every stack was dispatched, so on a GPU the one
    host round trip per stack does not stall the queue."""
    if isinstance(ok, jax.core.Tracer) or bool(
        np.all(np.asarray(ok))
    ):  # traced: redone in the kernel
        return y, bad
    ye, be, _ = redo()
    keep = jnp.asarray(ok)
    return jnp.where(keep[..., None, None], y, ye), jnp.where(keep, bad, be)


@functools.partial(jax.jit, static_argnames=("method", "restore", "angle_tol", "tol", "max_iter"))
def _mean_kernel(xs, w, alpha, *, method, restore, angle_tol, tol, max_iter):
    f = 1.0 + 2.0 * (alpha - 1.0) * (1.0 - jnp.sum(w**2))
    no_iterations = jnp.zeros((), xs.dtype), jnp.zeros((), jnp.int32)
    if method == "cayley" and restore == "cayley":
        wb = w.reshape((-1,) + (1,) * (xs.ndim - 1))
        y = cayley_restored(jnp.sum(wb * skew(xs), axis=0), 0.5 * f)
        return (y, not_finite(y), *no_iterations)
    if method == "geodesic":
        y, res, it, bad = karcher_mean_blocks_with_flag(
            xs, w, tol=tol, max_iter=max_iter, angle_tol=angle_tol
        )
    else:
        y = cayley_mean_blocks(xs, w)
        bad = not_finite(y)
        res, it = no_iterations
    y, bad2, _ = _restore_with_flag(y, f, restore, angle_tol)  # eigh: every block ok
    return y, bad | bad2, res, it


# ------------------------------------------------------------------------------------------------
# Adapter level.


def _is_concrete(*trees) -> bool:
    leaves = jax.tree_util.tree_leaves(trees)
    return not any(isinstance(x, jax.core.Tracer) for x in leaves)


def _resolve_algorithm(algorithm: str, *, sweep: bool, dtype, adapter=None) -> str:
    """``"auto"``: products only (``"matmul"``) for one t in float32, else the spectral path (``"eigh"``);
    a float32 sweep takes the products where the compiled CPU kernel runs it.

    One merge: the product-only log and exp replace the batched ``eigh`` that dominates the exact
    merge on GPUs, and are also faster on CPU (benchmarks/RESULTS.md). Their polynomial is exact
    to float32 round-off but only to ~1e-8, so float64 keeps ``eigh``. A sweep decomposes once
    and then pays per t. On the CPU the compiled sweep kernel (:func:`_geodesic_sweep_matmul`)
    then costs an n^2 pass per Taylor term and the restoration's inversion per t: 16 points of the
    SDXL adapters in 2.9-3.1 merges of arithmetic on two cores (3.9-5.2 merges of wall time on
    the benchmark's virtual machine, which faults the 4.8 GB output in afresh on every call),
    against 15.3 with ``eigh`` (LAPACK's ``eigh`` on one core).
    Elsewhere the products' XLA composition evaluates an exponential per t (about 13 products),
    and ``eigh``'s 3 products per t win (an H100: 158 against 222 ms for the SDXL adapters,
    benchmarks/results/experiments_gpu_sweep_h100.json). ``adapter`` (a sweep's first input)
    says where the arrays are; traced ones are taken to be on JAX's default backend.
    """
    if algorithm not in ALGORITHMS:
        raise ValueError(f"algorithm must be one of {ALGORITHMS}, got {algorithm!r}")
    if algorithm != "auto":
        return algorithm
    if jnp.finfo(dtype).bits > 32:
        return "eigh"
    if not sweep:
        return "matmul"
    return "matmul" if _native_sweep(adapter, dtype) else "eigh"


def _native_sweep(adapter, dtype) -> bool:
    """Whether a sweep of ``adapter`` runs on the CPU with the compiled sweep kernel for every stack."""
    if adapter is None or not adapter.stacks:
        return False
    arrays = [x for x in jax.tree_util.tree_leaves(adapter) if isinstance(x, jax.Array)]
    concrete = [x for x in arrays if not isinstance(x, jax.core.Tracer)]
    platforms = (
        {d.platform for x in concrete for d in x.devices()} if concrete else {jax.default_backend()}
    )
    blocks = {s.L.shape[-1] for s in adapter.stacks.values()}
    return platforms == {"cpu"} and all(
        native_target("sweep", jnp.dtype(dtype), b) is not None for b in blocks
    )


def _check_options(method, restore, scales) -> None:
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if restore not in RESTORES:
        raise ValueError(f"restore must be one of {RESTORES}, got {restore!r}")
    if scales not in SCALE_RULES:
        raise ValueError(f"scales must be one of {SCALE_RULES}, got {scales!r}")


def _check_t(t, extrapolate: bool, what: str = "t") -> None:
    if isinstance(t, jax.core.Tracer):
        return
    arr = np.asarray(t, dtype=np.float64)
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{what} must be finite, got {arr.tolist()}")
    if not extrapolate and (np.any(arr < 0.0) or np.any(arr > 1.0)):
        bad = arr[(arr < 0.0) | (arr > 1.0)].ravel()[0]
        raise ValueError(
            f"{what} = {float(bad)} is outside [0, 1]; pass extrapolate=True to extrapolate along the path"
        )


def _check_reuse(reuse, adapter: GSAdapter, n_t: int, dtype) -> None:
    """Raise (naming the stack) unless every stack of ``reuse`` can hold a sweep of ``adapter``
    at ``n_t`` points: ``[n_t, *stack shape]`` of ``dtype``, distinct arrays, none deleted."""
    if not isinstance(reuse, GSAdapter):
        raise TypeError(
            f"reuse must be the GSAdapter an earlier sweep() returned, got {type(reuse).__name__}"
        )
    if set(reuse.stacks) != set(adapter.stacks):
        raise ValueError(
            f"reuse: its stacks {sorted(reuse.stacks)} are not the adapters' {sorted(adapter.stacks)}"
        )
    seen = set()
    for key, st in adapter.stacks.items():
        for which in ("L", "R"):
            x = getattr(reuse.stacks[key], which)
            if isinstance(x, jax.core.Tracer):
                continue
            where = f"reuse: stack {key} {which}"
            if not isinstance(x, jax.Array):
                raise TypeError(
                    f"{where} is a {type(x).__name__}, not a jax.Array (an earlier sweep's result)"
                )
            if x.is_deleted():
                raise ValueError(
                    f"{where} was already deleted: an earlier call consumed it (a sweep's result "
                    "can be reused once; pass the latest one)"
                )
            want = (n_t, *getattr(st, which).shape)
            if x.shape != want or x.dtype != dtype:
                raise ValueError(
                    f"{where} is {x.dtype}{list(x.shape)}; this sweep's result is "
                    f"{jnp.dtype(dtype)}{list(want)} (the same adapters' shapes and number of t)"
                )
            if id(x) in seen:
                raise ValueError(
                    f"{where} is the same array as another of its stacks; each must be its own"
                )
            seen.add(id(x))


def _check_weights(w, k: int, extrapolate: bool, tol: float) -> None:
    if np.shape(w) != (k,):
        raise ValueError(f"weights must have shape ({k},) for {k} adapters, got {np.shape(w)}")
    if isinstance(w, jax.core.Tracer):
        return
    arr = np.asarray(w, dtype=np.float64)
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"weights must be finite, got {arr.tolist()}")
    if not extrapolate and np.any(arr < 0):
        i = int(np.argmax(arr < 0))
        raise ValueError(
            f"weights[{i}] = {arr[i]} is negative; weights must be a probability vector"
        )
    if abs(arr.sum() - 1.0) > tol:
        raise ValueError(
            f"weights must sum to 1 (tolerance {tol}), got sum {arr.sum()!r} for {arr.tolist()}"
        )


def _stack_inputs(
    adapters: Sequence[GSAdapter], key: str, which: str, method: str, dtype, *, convert: bool = True
) -> list[Array]:
    """One stack (``key``, L or R) of every adapter, cast to ``dtype`` and in the form ``method`` needs.

    ``geodesic`` takes orthogonal blocks (``Cay`` of raw parameters), ``cayley`` raw parameters
    (``invCay`` of orthogonal blocks), as :func:`~orthofuse_jax.fusion.adapter.to_orthogonal` and
    :func:`~orthofuse_jax.fusion.adapter.to_cayley_params` do for a whole adapter. Converting one
    stack at a time keeps one stack's converted copy alive instead of whole converted adapters
    (0.6 GB for two float32 SDXL adapters). With ``convert=False`` only the cast is done:
    the two-adapter kernels convert inside, chunk by chunk.
    """
    out = []
    for a in adapters:
        x = getattr(a.stacks[key], which)
        x = x.astype(dtype) if x.dtype != dtype else x
        out.append(_as_method_input(x, a.orthogonal, method) if convert else x)
    return out


def _merge_two(
    adapters, t, alpha, *, sweep: bool, dtype, method: str, reuse=None, **options
) -> dict:
    """``{(stack key, "L"/"R"): (Y, bad)}`` of a two-adapter merge (or sweep), stack by stack.

    Every stack is dispatched first; then blocks the product-only path declined are redone with
    ``eigh`` (:func:`_fill_declined`), so an eager merge on a GPU waits for the device once per
    stack at the end instead of stalling between stacks. ``reuse``: an earlier sweep's adapter
    whose stacks are donated as the first pass's output buffers (checked by :func:`_check_reuse`).
    """
    orthogonal = tuple(a.orthogonal for a in adapters)

    def run(key, which, **extra):
        x1, x2 = _stack_inputs(adapters, key, which, method, dtype, convert=False)
        return _pair_or_sweep(
            x1,
            x2,
            t,
            alpha,
            sweep=sweep,
            method=method,
            orthogonal=orthogonal,
            **{**options, **extra},
        )

    def into(key, which):
        return {} if reuse is None else {"into": getattr(reuse.stacks[key], which)}

    out = {
        (key, which): run(key, which, **into(key, which))
        for key in adapters[0].stacks
        for which in ("L", "R")
    }
    return {
        kw: _fill_declined(*res, functools.partial(run, *kw, algorithm="eigh"))
        for kw, res in out.items()
    }


_WHY = {
    "geodesic": "the relative rotation U1^T U2 (or, for N adapters, M^T U_i in the Karcher iteration) "
    "has an eigenvalue at -1, where the real principal logarithm is undefined",
    "cayley": "an input orthogonal block has an eigenvalue at -1 (no Cayley parameter) or is not finite",
}


def _raise_if_bad(
    flags: dict, stacks: dict[str, LayerStack], method: str, restore: str, ts=None
) -> None:
    for key, per in flags.items():
        for which in ("L", "R"):
            bad = np.asarray(per[which])
            if not bad.any():
                continue
            idx = np.argwhere(bad)[0]
            layer, block = stacks[key].names[int(idx[-2])], int(idx[-1])
            at = f" at t = {float(np.asarray(ts)[int(idx[0])])}" if ts is not None else ""
            why = _WHY[method]
            if restore == "exact":
                why += ", or the merged block has an eigenvalue at -1 (restore='exact' needs its logarithm)"
            raise MergeError(
                f"layer {layer!r}: merged {which} block {block}{at} is undefined ({int(bad.sum())} bad block(s) "
                f"in stack {key}): {why}"
            )


def merge(
    adapters: Sequence[GSAdapter],
    weights=None,
    *,
    t=None,
    method: str = "geodesic",
    restore: str = "none",
    alpha=2.0,
    scales: str = "concept",
    extrapolate: bool = False,
    angle_tol: float = DEFAULT_ANGLE_TOL,
    algorithm: str = "auto",
    weight_tol: float = 1e-6,
    karcher_tol: float = 1e-6,
    karcher_max_iter: int = 50,
) -> GSAdapter:
    """Merge GS adapters block by block into one adapter of orthogonal blocks (module docstring).

    Two adapters: give ``t`` (0 = first/concept, 1 = second/style). Reference presets:
    ``moft_merge --t T`` is ``merge([c, s], t=T, method="geodesic", restore="cayley")`` and
    ``moft_merge_fast --t T`` is ``merge([c, s], t=T, method="cayley", restore="cayley")``.
    N adapters: give ``weights`` (a probability vector, checked to ``weight_tol``); ``geodesic``
    is then the weighted Karcher mean (for two adapters it equals the geodesic point at
    ``t = weights[1]``), ``cayley`` the weighted Cayley-space mean, and restoration uses
    ``f = 1 + 2 (alpha - 1)(1 - sum w_i^2)``.

    Inputs may hold raw Cayley parameters or orthogonal blocks: ``geodesic`` maps raw ones through
    ``Cay``; ``cayley`` needs raw parameters and recovers them from orthogonal blocks with
    ``invCay`` (:func:`~orthofuse_jax.fusion.adapter.to_cayley_params`). All adapters are cast to
    the first one's dtype.

    Usable under ``jax.jit``: bind the options (``functools.partial(merge, method=..., restore=...)``)
    and pass adapters, ``t`` or ``weights`` as arguments. On concrete arrays the t range, the
    weights and the result are checked; under ``jit`` these checks are skipped and undefined
    blocks come back as NaN.

    Args:
      adapters: sequence of compatible :class:`GSAdapter` (same layers and block shapes).
      weights: ``[N]`` probability vector (exclusive with ``t``).
      t: interpolation parameter for exactly two adapters.
      method: ``"geodesic"`` or ``"cayley"``.
      restore: ``"none"``, ``"cayley"`` (reference ``curve_over_id`` for alpha = 2) or ``"exact"``.
      alpha: restoration strength, ``f(1/2) = alpha`` (paper eq. (8)).
      scales: ``"concept"``, ``"geometric"`` or ``"linear"`` (:mod:`orthofuse_jax.fusion.scales`).
      extrapolate: allow t outside [0, 1] (and negative weights).
      angle_tol: how close to pi a rotation angle may come before the log counts as undefined.
      algorithm: how the two-adapter geodesic and the exact restoration take logs and
        exponentials: ``"matmul"`` (products only; ``eigh`` only for a stack with a rotation
        angle above 2.4 rad), ``"eigh"`` (the spectral formula) or ``"auto"`` (``"matmul"`` for
        float32, ``"eigh"`` for float64: the polynomial is exact to float32 round-off, ~1e-8).
        ``"matmul"`` is faster, most of all on GPUs (no batched ``eigh``, no host round trip in
        an eager merge); on the CPU, with the compiled kernels built, the two-adapter merge is
        one pass per block (``_geodesic_matmul``: float32 products for float32 input, its blocks
        split over the process's CPUs). Declined blocks are redone with ``eigh`` after every
        stack was dispatched (under ``jit``: inside the program, by ``jax.lax.cond``); the first
        call that meets one compiles that ``eigh`` kernel for the stack's shape, once.
      weight_tol: tolerance of the ``sum(weights) == 1`` check.
      karcher_tol, karcher_max_iter: stopping rule of the Karcher iteration (N >= 3 geodesic);
        a warning is issued on concrete input when it stops without reaching the tolerance.

    Returns:
      A :class:`GSAdapter` with ``orthogonal=True`` and the combined scales.

    Raises:
      ValueError: bad option, t, weights or incompatible adapters (message names the value/layer).
      MergeError: a merged or intermediate block has an eigenvalue at -1 (message names the layer).
    """
    _check_options(method, restore, scales)
    warn_cpu_threads()
    adapters = list(adapters)
    algorithm = _resolve_algorithm(
        algorithm, sweep=False, dtype=adapters[0].dtype if adapters else jnp.float32
    )
    k = len(adapters)
    if k == 0:
        raise ValueError("merge needs at least one adapter")
    check_compatible(adapters)
    if t is not None and weights is not None:
        raise ValueError("give either t (two adapters) or weights (N adapters), not both")
    dtype = adapters[0].dtype
    if t is not None:
        if k != 2:
            raise ValueError(
                f"t is for merging exactly two adapters, got {k}; pass weights instead"
            )
        _check_t(t, extrapolate)
        xp = (
            jnp if isinstance(t, jax.core.Tracer) else np
        )  # concrete: no device programs for two numbers
        t = xp.asarray(t, dtype=dtype)
        if t.ndim:
            raise ValueError(
                f"t must be a scalar, got shape {t.shape}; use sweep() for several values"
            )
        w = xp.stack([1.0 - t, t])
    elif weights is None:
        if k == 1:
            w = jnp.ones((1,), dtype)
        else:
            raise ValueError(f"merging {k} adapters needs t (two adapters) or weights")
    else:
        _check_weights(weights, k, extrapolate, weight_tol)
        w = jnp.asarray(weights, dtype=dtype)
        if k == 2:
            t = w[1]  # the two-adapter Karcher mean / Cayley mean is the path point at t = w[1]
    stacks, flags = {}, {}
    info = []
    if k == 2:
        two = _merge_two(
            adapters,
            t,
            alpha,
            sweep=False,
            dtype=dtype,
            method=method,
            restore=restore,
            angle_tol=angle_tol,
            algorithm=algorithm,
        )
    for key in adapters[0].stacks:
        out, per = {}, {}
        for which in ("L", "R"):
            if k == 2:
                y, bad = two.pop((key, which))
            else:
                blocks = _stack_inputs(adapters, key, which, method, dtype)
                y, bad, res, it = _mean_kernel(
                    jnp.stack(blocks),
                    w,
                    alpha,
                    method=method,
                    restore=restore,
                    angle_tol=angle_tol,
                    tol=karcher_tol,
                    max_iter=karcher_max_iter,
                )
                if method == "geodesic":
                    info.append((key, which, res, it))
                del blocks  # before the next stack is converted
            out[which], per[which] = y, bad
        stacks[key] = replace(adapters[0].stacks[key], L=out["L"], R=out["R"])
        flags[key] = per
    if _is_concrete(adapters, t, w):
        _raise_if_bad(flags, stacks, method, restore)
        for key, which, res, it in info:
            if not float(res) <= karcher_tol:
                warnings.warn(
                    f"Karcher mean of stack {key} ({which}) stopped after {int(it)} iterations with residual "
                    f"{float(res):.3g} > karcher_tol = {karcher_tol}",
                    RuntimeWarning,
                    stacklevel=2,
                )
    sc = combine_scales(adapters, w, scales, dtype=dtype)
    return GSAdapter(stacks=stacks, scales=sc, orthogonal=True)


def sweep(
    adapter1: GSAdapter,
    adapter2: GSAdapter,
    ts,
    *,
    method: str = "geodesic",
    restore: str = "none",
    alpha=2.0,
    scales: str = "concept",
    extrapolate: bool = False,
    angle_tol: float = DEFAULT_ANGLE_TOL,
    algorithm: str = "auto",
    reuse: GSAdapter | None = None,
) -> GSAdapter:
    """Merge two adapters at every ``t`` in ``ts`` in one vmapped call per stack.

    Equals ``[merge([adapter1, adapter2], t=t, ...) for t in ts]`` stacked on a new leading axis,
    but the t-independent work is done once per sweep:

    * ``algorithm="matmul"``: the relative rotation's log by products; on the CPU, with the
      compiled kernels, one pass per block then also builds the Taylor coefficients of the whole
      geodesic ``U1 expm(t X) = sum_k t^k M_k`` (in double, as many as the largest ``|t|`` needs),
      and each t costs an n^2 pass per term plus its restoration (``"cayley"``: one inversion).
      Elsewhere each t takes its own exponential (about 13 products).
    * ``algorithm="eigh"``: the inverse Cayley of ``U1^T U2`` and its ``eigh``
      (:func:`orthofuse_jax.geometry.geodesic_path`); each t then costs 3 products.

    ``restore="exact"`` adds, per t, the log and exponential of the merged block. ``algorithm`` as
    in :func:`merge`, but for float32 ``"auto"`` is ``"matmul"`` only where the compiled CPU
    kernel runs it (16 SDXL points: about 3 merges of arithmetic, against 15.3 with ``eigh``),
    and ``"eigh"`` elsewhere (an H100: 158 against 222 ms; :func:`_resolve_algorithm`).

    ``reuse``: the result of an earlier ``sweep`` of the same shapes (the adapters' stacks, the
    number of t, the dtype), whose memory this sweep's result takes over; it is consumed (its
    stacks are donated, as with ``jax.jit(..., donate_argnums=...)``, and deleted). A sweep writes
    16 times a merge's output (4.8 GB for two SDXL adapters); without ``reuse`` every call faults
    in that much fresh memory, and on virtual machines whose host takes freed pages back that
    cost as much as the arithmetic (benchmarks/RESULTS.md). Inside a ``jax.jit`` trace it is
    ignored: donate through your own ``jit`` there.

    Returns:
      A :class:`GSAdapter` (``orthogonal=True``) whose stacks are ``[T, layers, nb, b, b]`` and
      whose scales are ``[T, h]``.
    Raises:
      As :func:`merge`; the :class:`MergeError` message also gives the offending t. ``ValueError``
      naming the stack when ``reuse`` does not fit this sweep or was already consumed (nothing
      is donated then); a :class:`MergeError` is raised after the kernels ran, so ``reuse`` is
      consumed by then.
    """
    _check_options(method, restore, scales)
    warn_cpu_threads()
    algorithm = _resolve_algorithm(algorithm, sweep=True, dtype=adapter1.dtype, adapter=adapter1)
    check_compatible([adapter1, adapter2])
    _check_t(ts, extrapolate, "ts")
    dtype = adapter1.dtype
    ts = (jnp if isinstance(ts, jax.core.Tracer) else np).asarray(ts, dtype=dtype)
    if ts.ndim != 1:
        raise ValueError(f"ts must be a 1-D array of t values, got shape {ts.shape}")
    if reuse is not None:
        _check_reuse(reuse, adapter1, ts.shape[0], dtype)
    stacks, flags = {}, {}
    two = _merge_two(
        [adapter1, adapter2],
        ts,
        alpha,
        sweep=True,
        dtype=dtype,
        method=method,
        restore=restore,
        angle_tol=angle_tol,
        algorithm=algorithm,
        reuse=reuse,
    )
    for key in adapter1.stacks:
        out, per = {}, {}
        for which in ("L", "R"):
            out[which], per[which] = two.pop((key, which))
        stacks[key] = replace(adapter1.stacks[key], L=out["L"], R=out["R"])
        flags[key] = per
    if _is_concrete(adapter1, adapter2, ts):
        _raise_if_bad(flags, stacks, method, restore, ts=ts)
    w = (jnp if isinstance(ts, jax.core.Tracer) else np).stack([1.0 - ts, ts], axis=-1)
    sc = combine_scales([adapter1, adapter2], w, scales, dtype=dtype)
    return GSAdapter(stacks=stacks, scales=sc, orthogonal=True)


# ------------------------------------------------------------------------------------------------
# Reports.


def orthogonality_error(u: Block) -> Float[Array, "*batch"]:
    """Per-block ``||U^T U - I||_max``."""
    eye = jnp.eye(u.shape[-1], dtype=u.dtype)
    return jnp.max(jnp.abs(mm(jnp.swapaxes(u, -1, -2), u) - eye), axis=(-1, -2))


@dataclass(frozen=True)
class MergeReport:
    """Orthogonality of a merged adapter: ``per_layer[name] = max ||U^T U - I||_max`` over its L and R blocks."""

    per_layer: dict[str, float]
    max_error: float
    worst_layer: str | None
    nonfinite_layers: tuple[str, ...]


def merge_report(adapter: GSAdapter) -> MergeReport:
    """Per-layer maximum orthogonality error of an adapter's blocks (raw adapters are mapped through Cay).

    Works for :func:`sweep` results too (the maximum is also taken over the t axis). A layer with
    non-finite blocks is listed in ``nonfinite_layers`` and reported with error ``inf``.
    """
    adapter = to_orthogonal(adapter)
    per: dict[str, float] = {}
    nonfinite = []
    for s in adapter.stacks.values():
        e = jnp.maximum(orthogonality_error(s.L), orthogonality_error(s.R))  # [..., layers, nb]
        e = np.asarray(e).reshape(-1, len(s.names), s.nb)
        e = np.where(np.isfinite(e), e, np.inf).max(axis=(0, 2))
        for name, v in zip(s.names, e):
            per[name] = float(v)
            if not np.isfinite(v):
                nonfinite.append(name)
    worst = max(per, key=per.get) if per else None
    return MergeReport(
        per_layer=per,
        max_error=per[worst] if worst is not None else 0.0,
        worst_layer=worst,
        nonfinite_layers=tuple(nonfinite),
    )
