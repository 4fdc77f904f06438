"""Backend dispatch of the merges: which kernel runs a stack, in how many calls, and the redo of
blocks the product-only path declined.

A stack (the L or R stack of one block shape) runs as one call of a jitted kernel, or, when it is
concrete and on the CPU, as a Python loop over chunks of blocks. Inside a kernel the compiled CPU
kernels (``orthofuse_jax/_native``) run where they are built and apply, XLA elsewhere
(:func:`~orthofuse_jax.geometry._linalg.with_native_kernel`). Every jitted kernel here takes one
static argument, :class:`Options`.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass, replace

import jax
import jax.numpy as jnp
import numpy as np

from ..geometry import (
    DEFAULT_ANGLE_TOL,
    cayley,
    cpu_only,
    geodesic_path,
    geodesic_path_cayley,
    inverse_cayley,
    is_concrete,
    relative_rotation,
    skew,
    spectral_map_with_flag,
)
from ..geometry._linalg import (
    cayley_map,
    mm,
    native_target,
    not_finite,
    polar_step,
    with_native_kernel,
)
from ..geometry._types import Array, Block, Bool
from ..geometry.polynomial import expm_skew_taylor_with_ok, kernel_attributes, log_polynomial
from .adapter import GSAdapter, on_cpu
from .karcher import cayley_mean_blocks, karcher_mean_blocks_with_flag
from .maps import cayley_restored, cayley_space_blocks, restoration_factor

__all__ = [
    "Options",
    "mean_stack",
    "merge_pair",
    "resolve_algorithm",
    "stack_inputs",
]


@dataclass(frozen=True)
class Options:
    """The static configuration of a stack's kernels; frozen and hashable, it is their jit cache key."""

    method: str  # "geodesic" or "cayley"
    restore: str  # "none", "cayley" or "exact"
    algorithm: str = "eigh"  # "eigh" or "matmul" (resolved, never "auto")
    angle_tol: float = DEFAULT_ANGLE_TOL
    orthogonal: tuple[bool, bool] = (False, False)  # whether each input holds orthogonal blocks
    sweep: bool = False  # every t of a 1-D ``t``, outputs with a leading t axis
    cpu: bool = False  # concrete CPU inputs: trace the CPU's kernels alone (cpu_only)
    chunk: int | None = None  # blocks per call of the chunk kernel
    karcher_tol: float = 1e-6  # the N-adapter Karcher iteration's stopping rule
    karcher_max_iter: int = 50


_MATMUL_SQUARINGS = 4
"""Squarings of the product-only exponential: exact for ``||X||_2 <= 8`` (t and f up to about 2.5
at the largest accepted angles); blocks beyond go to ``eigh``."""

_RESTORE_CODES = {"none": 0, "cayley": 1, "exact": 2}

_CPU_CHUNK_BYTES = 1 * 2**20
"""Target size of one chunk's outputs (all t) when ``sweep`` runs a CPU stack in chunks."""

_CPU_MERGE_CHUNK_BYTES = 2**19
"""The same for ``merge`` (0.5 MB: faster than 1 MB for the exact merges, equal for the fast one)."""

_CPU_MIN_CHUNK_BLOCKS = 16
"""A merge chunk holds at least this many blocks, so that the compiled solve's SIMD lanes (8 blocks
at a time) are filled. A sweep's chunks are filled along its t axis instead."""


# ------------------------------------------------------------------------------------------------
# Inputs and the choice of algorithm.


def resolve_algorithm(algorithm: str, *, sweep: bool, dtype, adapter=None) -> str:
    """``"auto"``: products only (``"matmul"``) for one t in float32, else the spectral path (``"eigh"``);
    a float32 sweep takes the products where the compiled CPU kernel runs it.

    One merge: the product-only log and exp replace the batched ``eigh`` that dominates the exact
    merge on GPUs, and are also faster on CPU. Their polynomial is exact to float32 round-off but
    only to ~1e-8, so float64 keeps ``eigh``. A sweep decomposes once and then pays per t. On the
    CPU the compiled sweep kernel (:func:`_geodesic_sweep_matmul`) then costs an n^2 pass per
    Taylor term and the restoration's inversion per t, several times less than ``eigh``. Elsewhere
    the products' XLA composition evaluates an exponential per t (about 13 products), and
    ``eigh``'s 3 products per t win. ``adapter`` (a sweep's first input) says where the arrays
    are; traced ones are taken to be on JAX's default backend.
    """
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


def _as_method_input(x: Block, orthogonal: bool, method: str) -> Block:
    """``Cay(x)`` / ``invCay(x)`` when ``method`` needs the other form."""
    if orthogonal == (method == "geodesic"):
        return x
    return cayley(x) if method == "geodesic" else inverse_cayley(x)


def stack_inputs(
    adapters: Sequence[GSAdapter], key: str, which: str, method: str, dtype, *, convert: bool = True
) -> list[Array]:
    """One stack (``key``, L or R) of every adapter, cast to ``dtype`` and in the form ``method`` needs.

    ``geodesic`` takes orthogonal blocks (``Cay`` of raw parameters), ``cayley`` raw parameters
    (``invCay`` of orthogonal blocks), as :func:`~orthofuse_jax.fusion.adapter.to_orthogonal` and
    :func:`~orthofuse_jax.fusion.adapter.to_cayley_params` do for a whole adapter. Converting one
    stack at a time keeps one stack's converted copy alive instead of whole converted adapters.
    With ``convert=False`` only the cast is done: the two-adapter kernels convert inside, chunk by
    chunk.
    """
    out = []
    for a in adapters:
        x = getattr(a.stacks[key], which)
        x = x.astype(dtype) if x.dtype != dtype else x
        out.append(_as_method_input(x, a.orthogonal, method) if convert else x)
    return out


# ------------------------------------------------------------------------------------------------
# Block kernels of two stacks (traced inside the jitted kernels below).


def _log_declined_as_zero(u: Block):
    """:func:`log_polynomial` with zero, not NaN, in the blocks it declines. Those blocks' results
    become NaN only at the end (:func:`_declined_as_nan`) and eigh redoes them; computing them from
    a finite stand-in keeps every derivative finite (NaN times a zero cotangent is NaN)."""
    x, ok = log_polynomial(u)
    return jnp.where(ok[..., None, None], x, 0.0), ok


def _declined_as_nan(y: Block, ok) -> Block:
    return jnp.where(ok[..., None, None], y, jnp.nan)


def _restore_with_flag(y: Block, f, opts: Options):
    """``(Y', bad, ok)``: the restoration of ``Y``; ``ok`` False where the product-only path
    (``algorithm="matmul"``, restore ``exact``) declined a block and ``eigh`` must redo it."""
    ok = jnp.ones(y.shape[:-2], bool)
    if opts.restore == "none":
        return y, not_finite(y), ok
    if opts.restore == "cayley":
        y, bad = cayley_map(y, c1=0.5 * jnp.asarray(f, y.dtype), with_flag=True)
        return y, bad, ok
    if opts.algorithm == "matmul":  # exp(f log Y) with products only
        x, ok = _log_declined_as_zero(y)
        e, ok_e = expm_skew_taylor_with_ok(
            jnp.asarray(f, y.dtype)[..., None, None] * x, _MATMUL_SQUARINGS
        )
        ok = ok & ok_e
        y = _declined_as_nan(polar_step(e), ok)
        return y, not_finite(y) & ok, ok
    y, bad = spectral_map_with_flag(y, lambda th: f * th, angle_tol=opts.angle_tol)
    return y, bad | not_finite(y), ok


@dataclass(frozen=True)
class _MatmulPath:
    """``gamma(t) = U1 expm(t X)``, ``X = log(U1^T U2)`` by :func:`log_polynomial`; ``ok`` where it applies."""

    start: Block
    log: Block
    ok: Bool[Array, "*batch"]

    def at(self, t):
        t = jnp.asarray(t, dtype=self.log.dtype)[..., None, None]
        e, ok = expm_skew_taylor_with_ok(t * self.log, _MATMUL_SQUARINGS)
        ok = self.ok & ok
        return _declined_as_nan(polar_step(mm(self.start, e)), ok), ok


def _inputs_and_path(x1, x2, opts: Options):
    """The two stacks in the form ``opts.method`` needs, and for ``geodesic`` the t-independent path.

    ``algorithm="matmul"``: ``U1 expm(t log(U1^T U2))`` with the product-only log and exp
    (:class:`_MatmulPath`). ``"eigh"``: the spectral :class:`GeodesicPath`; two raw-parameter
    stacks take :func:`geodesic_path_cayley` (its inverse Cayley map needs no pivoting), and the
    converted ``x2`` is then unused.
    """
    method, orthogonal = opts.method, opts.orthogonal
    if method == "geodesic" and opts.algorithm == "matmul":
        x1, x2 = (
            _as_method_input(x1, orthogonal[0], method),
            _as_method_input(x2, orthogonal[1], method),
        )
        x, ok = _log_declined_as_zero(relative_rotation(x1, x2))
        return x1, x2, _MatmulPath(start=x1, log=x, ok=ok)
    if method == "geodesic" and not any(orthogonal):
        return x1, x2, geodesic_path_cayley(x1, x2, angle_tol=opts.angle_tol)
    x1, x2 = (
        _as_method_input(x1, orthogonal[0], method),
        _as_method_input(x2, orthogonal[1], method),
    )
    path = geodesic_path(x1, x2, angle_tol=opts.angle_tol) if method == "geodesic" else None
    return x1, x2, path


def _pair_point(x1, x2, t, path, f, opts: Options):
    """``(Y, bad, ok)`` at one t, ``f`` the restoration factor there; ``ok`` (product-only path
    applies) is all True for ``eigh``."""
    method, restore = opts.method, opts.restore
    if method == "cayley" and restore == "cayley":
        # Cay(eta Cay(S)), S = (1 - t) skew(A1) + t skew(A2), in one pass (cayley_restored)
        t = jnp.asarray(t, x1.dtype)
        y, bad = cayley_map(x1, x2, c1=1.0 - t, c2=t, c=f, square=True, with_flag=True)
        return y, bad, jnp.ones(y.shape[:-2], bool)
    if method == "geodesic" and opts.algorithm == "matmul":
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
    y, bad2, ok2 = _restore_with_flag(y, f, opts)
    return y, bad | bad2, ok & ok2


def _geodesic_matmul(x1, x2, t, f, *, restore, orthogonal):
    """``(Y, bad, ok)`` of the product-only exact merge at ``t`` with restoration factor ``f``:
    ``U1 expm(t log(U1^T U2))`` (:class:`_MatmulPath`), then ``restore``.

    On the CPU with the compiled kernels this is one pass per block
    (``orthofuse_jax/_native/kernels.inc``, ``GeodesicBlocks``: the Cayley maps inverted in double,
    ``W^t`` by the direct power ``a_t(P) + K b_t(P)`` where ``t`` is in ``POWER_T_RANGE`` and
    the angles within 2.4 rad (``polynomial.POWER_TIERS``; else the log interpolant and the
    exponential with only the squarings a block needs), the polar step and the restoration, with
    products in the input's precision), its blocks split over the process's CPUs; elsewhere, and
    for derivatives, the XLA composition (:func:`_pair_point`). Both decline (``ok`` False) the
    blocks outside the interpolant's range or the squarings' reach; their range checks differ
    only at its edge (an eigenvalue of ``Y`` between -1 and -1.015, inside the fit's [-1.02, 1]
    either way).
    """
    opts = Options("geodesic", restore, "matmul", orthogonal=orthogonal)
    dtype = x1.dtype
    batch = jnp.broadcast_shapes(x1.shape[:-2], x2.shape[:-2], jnp.shape(t), jnp.shape(f))
    x1 = jnp.broadcast_to(x1, batch + x1.shape[-2:])
    x2 = jnp.broadcast_to(x2, batch + x2.shape[-2:])
    flags = (_RESTORE_CODES[restore], float(orthogonal[0]), float(orthogonal[1]))
    coef = jnp.stack(
        [jnp.broadcast_to(jnp.asarray(v, dtype), batch) for v in (t, f, *flags)], axis=-1
    )

    def xla(x1, x2, coef):
        x1, x2, path = _inputs_and_path(x1, x2, opts)
        return _pair_point(x1, x2, coef[..., 0], path, coef[..., 1], opts)

    out = (
        jax.ShapeDtypeStruct(x1.shape, dtype),
        jax.ShapeDtypeStruct(batch, jnp.bool_),
        jax.ShapeDtypeStruct(batch, jnp.bool_),
    )
    return with_native_kernel(
        "geodesic", xla, x1, x2, coef, out=out, attrs=kernel_attributes(_MATMUL_SQUARINGS, dtype)
    )


def _geodesic_sweep_matmul(x1, x2, ts, alpha, *, restore, orthogonal):
    """``(Y, bad, ok)`` ``[T, ...]``: :func:`_geodesic_matmul` at every t of ``ts`` (1-D), the
    t-independent half (the Cayley maps and the log) done once per block.

    On the CPU with the compiled kernels this is one pass per block
    (``kernels.inc``, ``SweepBlocks``): after the log, the Taylor coefficients ``M_k = U1 X^k / k!``
    of the geodesic ``U1 expm(t X) = sum_k t^k M_k`` in double, as many as the largest ``|t|`` needs for the
    output's round-off (a bound from the ``M_k`` themselves), then per t a Horner pass and the
    restoration (``curve_over_id``: one inversion). Elsewhere, and for derivatives, the XLA
    composition: :class:`_MatmulPath` vmapped over t (an exponential per t).
    """
    opts = Options("geodesic", restore, "matmul", orthogonal=orthogonal)
    dtype = x1.dtype
    batch = jnp.broadcast_shapes(x1.shape[:-2], x2.shape[:-2])
    x1 = jnp.broadcast_to(x1, batch + x1.shape[-2:])
    x2 = jnp.broadcast_to(x2, batch + x2.shape[-2:])
    ts = jnp.asarray(ts, dtype)
    pts = jnp.stack([ts, restoration_factor(ts, jnp.asarray(alpha, dtype))], axis=-1)

    def xla(x1, x2, pts):
        x1, x2, path = _inputs_and_path(x1, x2, opts)
        y, bad, ok = jax.vmap(lambda p: _pair_point(x1, x2, p[0], path, p[1], opts))(pts)
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
    return with_native_kernel(
        "sweep",
        xla,
        x1,
        x2,
        pts,
        out=out,
        attrs={**kernel_attributes(_MATMUL_SQUARINGS, dtype), "flags": flags},
    )


def _pair_blocks(x1, x2, t, alpha, opts: Options):
    """``(Y, bad, ok)`` of one merge at ``t``."""
    f = restoration_factor(jnp.asarray(t, x1.dtype), alpha)
    if opts.method == "geodesic" and opts.algorithm == "matmul":
        return _geodesic_matmul(x1, x2, t, f, restore=opts.restore, orthogonal=opts.orthogonal)
    x1, x2, path = _inputs_and_path(x1, x2, opts)
    return _pair_point(x1, x2, t, path, f, opts)


def _sweep_blocks(x1, x2, ts, alpha, opts: Options):
    """``(Y, bad, ok)`` ``[T, ...]`` at every t of ``ts``, the t-independent work done once."""
    if opts.method == "geodesic" and opts.algorithm == "matmul":
        return _geodesic_sweep_matmul(
            x1, x2, ts, alpha, restore=opts.restore, orthogonal=opts.orthogonal
        )
    x1, x2, path = _inputs_and_path(x1, x2, opts)
    if (
        opts.method == "geodesic"
        and opts.algorithm == "eigh"
        and opts.restore in ("none", "cayley")
    ):
        # every t at once: the compiled point kernel reads the path once per block, not per t
        tb = ts.reshape(ts.shape + (1,) * (x1.ndim - 2))
        y = path.at_restored(
            tb, 0.5 * restoration_factor(tb, alpha) if opts.restore == "cayley" else None
        )
        bad = path.bad | not_finite(y)
        return y, bad, jnp.ones_like(bad)
    if opts.method == "cayley":
        x1, x2 = skew(x1), skew(x2)
    y, bad, ok = jax.vmap(
        lambda t: _pair_point(x1, x2, t, path, restoration_factor(t, alpha), opts)
    )(ts)
    return y, bad, jnp.broadcast_to(ok, bad.shape)


# ------------------------------------------------------------------------------------------------
# Jitted kernels (one static argument: Options).


def _blocks(x1, x2, t, alpha, opts: Options):
    # cpu: the inputs are concrete arrays on the CPU, so only the CPU's kernels are traced.
    with cpu_only(opts.cpu):
        return (_sweep_blocks if opts.sweep else _pair_blocks)(x1, x2, t, alpha, opts)


# x1, x2 are the adapters' own stacks, converted inside: no converted copy outlives the kernel.
_kernel = jax.jit(_blocks, static_argnames="opts")


@functools.partial(jax.jit, static_argnames="opts", donate_argnames="into", keep_unused=True)
def _kernel_into(x1, x2, t, alpha, into, opts: Options):
    """:func:`_kernel` with the memory of ``into`` (donated; the result's shape and dtype) for its
    result: XLA aliases the output to the donated parameter, so the kernel writes into pages the
    process already has (``keep_unused``: the parameter is never read, and jit would drop it)."""
    del into
    return _blocks(x1, x2, t, alpha, opts)


@functools.partial(jax.jit, static_argnames="opts", donate_argnums=(0, 1, 2))
def _chunk_kernel(y, bad, ok, x1, x2, start, t, alpha, opts: Options):
    """Blocks ``[start, start + opts.chunk)`` of the flattened stacks, written into ``y, bad, ok`` in place.

    With ``opts.sweep`` the outputs have a leading t axis. ``y``, ``bad`` and ``ok`` are buffers
    that :func:`_run_chunked` created and donates, never the caller's.
    """
    b, lead, chunk = x1.shape[-1], y.shape[: int(opts.sweep)], opts.chunk
    assert chunk is not None
    part = lambda x: jax.lax.dynamic_slice_in_dim(x.reshape(-1, b, b), start, chunk)
    yc, bc, oc = _blocks(part(x1), part(x2), t, alpha, opts)
    axis = len(lead)
    y = jax.lax.dynamic_update_slice_in_dim(y.reshape(*lead, -1, b, b), yc, start, axis).reshape(
        y.shape
    )
    flat = lambda f, fc: jax.lax.dynamic_update_slice_in_dim(
        f.reshape(*lead, -1), fc, start, axis
    ).reshape(f.shape)
    return y, flat(bad, bc), flat(ok, oc)


@functools.partial(jax.jit, static_argnames="opts")
def _mean_kernel(xs, w, alpha, opts: Options):
    f = 1.0 + 2.0 * (alpha - 1.0) * (1.0 - jnp.sum(w**2))
    no_iterations = jnp.zeros((), xs.dtype), jnp.zeros((), jnp.int32)
    if opts.method == "cayley" and opts.restore == "cayley":
        wb = w.reshape((-1,) + (1,) * (xs.ndim - 1))
        y = cayley_restored(jnp.sum(wb * skew(xs), axis=0), 0.5 * f)
        return (y, not_finite(y), *no_iterations)
    if opts.method == "geodesic":
        y, res, it, bad = karcher_mean_blocks_with_flag(
            xs, w, tol=opts.karcher_tol, max_iter=opts.karcher_max_iter, angle_tol=opts.angle_tol
        )
    else:
        y = cayley_mean_blocks(xs, w)
        bad = not_finite(y)
        res, it = no_iterations
    y, bad2, _ = _restore_with_flag(y, f, opts)
    return y, bad | bad2, res, it


def mean_stack(xs, w, alpha, opts: Options):
    """``(Y, bad, residual, iterations)``: the weighted mean of stacks ``xs`` ``[N, ...]`` (the
    Karcher mean for ``geodesic``, the Cayley-space mean for ``cayley``), then ``opts.restore``
    with ``f = 1 + 2 (alpha - 1)(1 - sum w_i^2)``; always by ``eigh`` (every block accepted)."""
    return _mean_kernel(xs, w, alpha, replace(opts, algorithm="eigh"))


# ------------------------------------------------------------------------------------------------
# Running a stack: one call or a chunk loop; the redo of declined blocks.


def _chunk_size(x: Array, target_bytes: int, min_blocks: int = 1) -> int | None:
    """Blocks per chunk for merging stack ``x`` in chunks, or None to merge it in one call.

    The merge kernel holds several block-sized temporaries per input block (the Cayley and
    inverse-Cayley solves, ``eigh``, the rotation): about 7 stacks' worth for a whole stack. In
    chunks of 0.5-1 MB they are negligible, and they stay in cache: on CPU the batched LAPACK
    calls loop over the blocks anyway, so the merge even gets faster. Only concrete CPU stacks are
    chunked, by a Python loop over one compiled chunk kernel: an XLA while loop (``lax.map``)
    would cost a thread hand-off per operation per chunk. Traced stacks and accelerators keep one
    call per stack. A divisor of the block count is preferred, so no chunk overlaps the one before
    it. A chunk holds at least ``min_blocks`` blocks.
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


def _run_chunked(x1, x2, t, alpha, opts: Options, into=None):
    """:func:`_kernel` on concrete stacks, ``opts.chunk`` blocks per call, into one output buffer
    (``into``, donated, when given).

    The last chunk starts at ``n - chunk`` and may overlap the one before it; the overlapping blocks
    are recomputed from the same inputs, with the same values (each block's result depends only
    on that block).
    """
    n, chunk = int(np.prod(x1.shape[:-2], dtype=np.int64)), opts.chunk
    assert chunk is not None
    lead = (t.shape[0],) if opts.sweep else ()
    y = into if into is not None else jnp.zeros((*lead, *x1.shape), x1.dtype)
    bad = jnp.zeros((*lead, *x1.shape[:-2]), bool)
    ok = jnp.zeros((*lead, *x1.shape[:-2]), bool)
    for i in range(-(-n // chunk)):
        start = min(i * chunk, n - chunk)
        y, bad, ok = _chunk_kernel(y, bad, ok, x1, x2, start, t, alpha, opts=opts)
    return y, bad, ok


def _layout(x1, t):
    """``(mesh, spec, t_spec)`` when stack ``x1`` is laid out over several devices by a named
    sharding whose block axes (the last two) are whole, else None.

    Concrete arrays carry their sharding; traced ones carry it in their type under an explicit mesh
    (``jax.set_mesh`` with ``AxisType.Explicit`` axes). Without one, a traced stack's layout is
    XLA's to choose, and the compiled kernels (custom calls) make it gather them.
    """
    if isinstance(x1, jax.core.Tracer):
        sharding = getattr(jax.typeof(x1), "sharding", None)
        mesh = getattr(sharding, "mesh", None)
        if mesh is None or mesh.empty or not isinstance(mesh, jax.sharding.AbstractMesh):
            return None
    else:
        sharding = getattr(x1, "sharding", None)
        if not isinstance(sharding, jax.sharding.NamedSharding) or len(sharding.device_set) < 2:
            return None
        mesh = sharding.mesh
    spec = tuple(sharding.spec) + (None,) * (x1.ndim - len(sharding.spec))
    if spec[-2:] != (None, None):
        return None
    t_spec: tuple = ()
    t_sharding = getattr(jax.typeof(t) if isinstance(t, jax.core.Tracer) else t, "sharding", None)
    if isinstance(t_sharding, jax.sharding.NamedSharding) and t_sharding.mesh == mesh:
        t_spec = tuple(t_sharding.spec)
        used = {a for e in spec if e is not None for a in (e if isinstance(e, tuple) else (e,))}
        if any(e is not None and set(e if isinstance(e, tuple) else (e,)) & used for e in t_spec):
            t_spec = ()  # the t axis cannot reuse a mesh axis the blocks are split over
    return mesh, spec, t_spec


@functools.lru_cache(maxsize=64)
def _per_shard(opts: Options, mesh, spec: tuple, t_spec: tuple):
    """The kernel run shard by shard (``jax.shard_map``): every block is merged on the device that
    holds it, so the result keeps the input's layout and no device gathers another's blocks."""
    P = jax.sharding.PartitionSpec
    lead = (t_spec[0] if t_spec else None,) if opts.sweep else ()
    y_spec, flag_spec = P(*lead, *spec), P(*lead, *spec[:-2])
    fn = jax.shard_map(
        functools.partial(_blocks, opts=opts),
        mesh=mesh,
        in_specs=(P(*spec), P(*spec), P(*t_spec), P()),
        out_specs=(y_spec, flag_spec, flag_spec),
        check_vma=False,
    )
    return jax.jit(fn)


def _run(x1, x2, t, alpha, opts: Options, into=None):
    """``(Y, bad, ok)`` of two stacks: one kernel call, or on concrete CPU stacks a chunk loop
    (:func:`_chunk_size`) sized so that a chunk's outputs for all t stay near ``_CPU_CHUNK_BYTES``
    (a merge's: ``_CPU_MERGE_CHUNK_BYTES``).

    The fast merge of two raw-parameter stacks with its restoration, and the product-only exact
    merge (:func:`_geodesic_matmul`), are one pass of a compiled kernel per block, with no
    temporaries to keep in cache: they run on the whole stack. ``into`` (a sweep of concrete
    stacks only): a donated buffer shaped like the result, which the result then occupies.
    """
    concrete = is_concrete(x1, x2, t, alpha)
    opts = replace(opts, cpu=concrete and on_cpu((x1, x2)))
    layout = _layout(x1, t)
    if layout is not None:
        mesh, spec, t_spec = layout
        if concrete and x2.sharding != x1.sharding:
            x2 = jax.device_put(x2, x1.sharding)
        if concrete:  # t and alpha onto the stacks' devices (t split as given, else whole)
            whole = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
            t = t if t_spec else jax.device_put(t, whole)
            alpha = jax.device_put(alpha, whole)
        return _per_shard(opts, mesh, spec, t_spec)(x1, x2, t, alpha)
    n_t = t.shape[0] if opts.sweep else 1
    budget = _CPU_CHUNK_BYTES // n_t if opts.sweep and n_t else _CPU_MERGE_CHUNK_BYTES
    min_blocks = 1 if opts.sweep else _CPU_MIN_CHUNK_BLOCKS
    fast = (opts.method, opts.restore) == ("cayley", "cayley") and not any(opts.orthogonal)
    exact = (opts.method, opts.algorithm) == ("geodesic", "matmul")
    kernel = (
        ("sweep" if opts.sweep else "geodesic")
        if exact
        else "cayley"
        if fast and not opts.sweep
        else None
    )
    one_pass = kernel is not None and native_target(kernel, x1.dtype, x1.shape[-1]) is not None
    chunk = (
        _chunk_size(x1, max(1, budget), min_blocks) if n_t and concrete and not one_pass else None
    )
    into = into if opts.sweep and concrete else None
    if chunk is not None:
        return _run_chunked(x1, x2, t, alpha, replace(opts, chunk=chunk), into)
    if into is not None:
        return _kernel_into(x1, x2, t, alpha, into, opts)
    return _kernel(x1, x2, t, alpha, opts)


def _redo_declined(y, bad, ok, redo):
    """``(Y, bad)`` with the blocks the product-only path declined (``ok`` False) taken from
    ``redo()``, the same merge with ``algorithm="eigh"``.

    The one fallback: a redo after dispatch, of the stacks that declined a block. Concrete flags
    are read on the host after every stack was dispatched (one wait per stack, at the end), so the
    eigh program is compiled only when a stack needs it; a ``jax.lax.cond`` inside every kernel
    would compile the eigh branch into every eager merge (several times the product-only
    program's compilation) and stall a GPU once per stack. Traced flags (a merge inside the
    caller's ``jit``) cannot be read, so there the same test is a ``jax.lax.cond`` in the
    caller's program.
    """

    def merged():
        ye, be, _ = redo()
        return jnp.where(ok[..., None, None], y, ye), jnp.where(ok, bad, be)

    if isinstance(ok, jax.core.Tracer):
        return jax.lax.cond(jnp.all(ok), lambda: (y, bad), merged)
    if bool(np.all(np.asarray(ok))):
        return y, bad
    return merged()


def merge_pair(adapters: Sequence[GSAdapter], t, alpha, opts: Options, reuse=None) -> dict:
    """``{(stack key, "L"/"R"): (Y, bad)}`` of a two-adapter merge (or, with ``opts.sweep``, sweep).

    Every stack is dispatched first; then blocks the product-only path declined are redone with
    ``eigh`` (:func:`_redo_declined`), so an eager merge on a GPU waits for the device once per
    stack at the end instead of stalling between stacks. ``reuse``: an earlier sweep's adapter
    whose stacks are donated as the first pass's output buffers.
    """
    dtype = adapters[0].dtype
    out = {}
    for key in adapters[0].stacks:
        for which in ("L", "R"):
            x1, x2 = stack_inputs(adapters, key, which, opts.method, dtype, convert=False)
            into = None if reuse is None else getattr(reuse.stacks[key], which)
            out[key, which] = _run(x1, x2, t, alpha, opts, into)
    if opts.algorithm != "matmul":  # eigh declines nothing
        return {kw: (y, bad) for kw, (y, bad, _) in out.items()}
    eigh = replace(opts, algorithm="eigh")

    def redo(key, which):
        x1, x2 = stack_inputs(adapters, key, which, opts.method, dtype, convert=False)
        return _run(x1, x2, t, alpha, eigh)

    return {
        kw: _redo_declined(y, bad, ok, functools.partial(redo, *kw))
        for kw, (y, bad, ok) in out.items()
    }
