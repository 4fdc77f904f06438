"""Matrix products at full float32 precision on every backend.

JAX's default precision lets XLA run float32 matrix products in TF32 on NVIDIA GPUs (and
bfloat16 passes on TPUs), which costs about three decimal digits. The geometry is checked to
float32 round-off against float64 references, so every product in the package's manifold
math asks for ``Precision.HIGHEST``: the same float32 results on CPU, GPU and TPU. For the
small batched blocks of a GS adapter the products are memory-bound, so the extra passes cost
little.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools

import jax
import jax.numpy as jnp

from ._types import Block

HIGHEST = jax.lax.Precision.HIGHEST

mm = functools.partial(jnp.matmul, precision=HIGHEST)
"""``a @ b`` (batched) at full precision."""

einsum = functools.partial(jnp.einsum, precision=HIGHEST)
"""``jnp.einsum`` at full precision."""


NATIVE_MAX_BLOCK = 160
"""Largest block size ``solve_pd`` gives the compiled kernel. Above it LAPACK's blocked solve wins
(one core: native 9.3 vs 16.7 ms at b = 128, equal at 192, 91 vs 30 ms at 384)."""


def solve_pd(a, b):
    """``a^{-1} b`` for ``a [..., n, n]`` whose symmetric part is positive definite, ``b [..., n, m]``.

    Every matrix the Cayley maps solve against is of this kind (``I - S`` has symmetric part
    ``I``), and for them Gaussian elimination needs no pivoting. On the CPU this uses the
    package's compiled kernel (``orthofuse_jax/_native/kernels.inc``: 2-3x faster than jaxlib's
    LAPACK ``getrf`` + ``trsm`` at the merges' block sizes and, eliminating in double, 10x more
    accurate in float32; docs/performance.md) when it was built, for blocks up to
    :data:`NATIVE_MAX_BLOCK`. On CUDA GPUs it is a Pallas (Triton) Gauss-Jordan kernel for float32
    blocks up to 64 (``geometry/_pallas.py``: 1.5-2.4x faster than cuBLAS' batched LU on an H100).
    Elsewhere, for other dtypes or sizes, or with ``ORTHOFUSE_JAX_NATIVE=0``, it is
    ``jnp.linalg.solve``. Differentiable (forward and reverse) through ``lax.custom_linear_solve``,
    and safe under ``jit`` and ``vmap``.
    """
    branches = {}
    if b.dtype == a.dtype and b.ndim == a.ndim:
        target = native_target("solve", a.dtype, a.shape[-1])
        if target is not None:

            def native(a, x):
                return jax.ffi.ffi_call(
                    target, jax.ShapeDtypeStruct(x.shape, x.dtype), vmap_method="broadcast_all"
                )(a, x)

            branches["cpu"] = _no_pivot_solve(native)
        gpu = None if _CPU_ONLY.get() else gpu_solver(a.dtype, a.shape[-1])
        if gpu is not None:
            branches["cuda"] = _no_pivot_solve(gpu)
    if not branches:
        return jnp.linalg.solve(a, b)
    batch = jnp.broadcast_shapes(a.shape[:-2], b.shape[:-2])
    a = jnp.broadcast_to(a, batch + a.shape[-2:])
    b = jnp.broadcast_to(b, batch + b.shape[-2:])
    if _CPU_ONLY.get() and "cpu" in branches:
        return branches["cpu"](a, b)
    return jax.lax.platform_dependent(a, b, **branches, default=jnp.linalg.solve)


def _no_pivot_solve(solver):
    """``solver(a, b)`` (``a^{-1} b`` for same-batch ``a``, ``b``) made differentiable: derivatives
    by ``lax.custom_linear_solve``, with ``solver(a^T, .)`` for the transpose (``a^T`` has the same
    positive definite symmetric part)."""

    def solve(a, b):
        fixed = jax.lax.stop_gradient(a)
        return jax.lax.custom_linear_solve(
            lambda x: mm(a, x),
            b,
            solve=lambda _, x: solver(fixed, x),
            transpose_solve=lambda _, x: solver(jnp.swapaxes(fixed, -1, -2), x),
        )

    return solve


def gpu_solver(dtype, n: int):
    """The GPU kernel for ``n x n`` blocks of ``dtype`` (:func:`._pallas.gauss_jordan_solve`), or None
    (float64, ``n`` above :data:`._pallas.MAX_BLOCK`, no Pallas, or ``ORTHOFUSE_JAX_NATIVE=0``)."""
    from .. import _native
    from . import _pallas

    if (
        not _native.enabled()
        or jnp.dtype(dtype) != jnp.float32
        or n > _pallas.MAX_BLOCK
        or not _gpu_in_reach()
        or not _pallas.available()
    ):
        return None
    return _pallas.gauss_jordan_solve


def _gpu_in_reach() -> bool:
    """Whether the program being traced can run on a GPU: JAX's default backend is one, or the trace
    targets one (an abstract mesh of GPU devices, as when lowering for a GPU elsewhere). Elsewhere no
    GPU branch is traced: a Pallas call in a program over several CPU devices would not trace."""
    device = getattr(jax.sharding.get_abstract_mesh(), "abstract_device", None)
    return getattr(device, "platform", None) == "gpu" or jax.default_backend() == "gpu"


def cayley_map(
    x1, x2=None, *, c1=1.0, c2=0.0, c=1.0, square: bool = False, with_flag: bool = False
):
    """``(B - c S)^{-1} (B + c S)`` per block, ``S = c1 skew(X1) + c2 skew(X2)``, ``B = I - S^2`` if
    ``square`` else ``I``.

    The Cayley maps of the package in one place: ``Cay(A)`` is ``cayley_map(A)``, the reference's
    ``curve_over_id`` restoration ``Cay(eta U)`` is ``cayley_map(U, c1=eta)``, and the fast merge
    with that restoration, ``Cay(eta Cay(S))`` (``merge.cayley_restored``), is
    ``cayley_map(A1, A2, c1=1 - t, c2=t, c=2 eta, square=True)``. The matrix solved against has a
    positive definite symmetric part (``I`` or ``I - S^2``), so :func:`solve_pd` applies.

    On the CPU, with the compiled kernel built, the whole map is one pass per block in double
    (the skew part and one in-place inversion, two for ``square``: ``Cay(eta Cay(S))``;
    ``orthofuse_jax/_native/kernels.inc``): XLA's transposes, small fusions and temporaries around
    a solve cost as much as the solve itself. Its derivatives are those of the XLA formula
    (``jax.custom_jvp``), which is what runs elsewhere.

    Args:
      x1, x2: blocks ``[..., b, b]``; only their skew parts matter. ``x2`` may be omitted.
      c1, c2, c: scalars or arrays broadcasting against the batch shape ``x1.shape[:-2]``.
      square: include ``-S^2`` in ``B`` (static).
      with_flag: also return, per block, whether the result holds an inf or a NaN (the merges'
        "bad block" flag; the compiled kernel reads it from its cache instead of a second pass
        over the output).
    """
    if x2 is None:
        x2, c2 = x1, 0.0
    dtype = x1.dtype
    batch = jnp.broadcast_shapes(x1.shape[:-2], x2.shape[:-2], *(jnp.shape(v) for v in (c1, c2, c)))
    x1 = jnp.broadcast_to(x1, batch + x1.shape[-2:])
    x2 = jnp.broadcast_to(x2, batch + x2.shape[-2:])
    q = 1.0 if square else 0.0
    coef = jnp.stack(
        [jnp.broadcast_to(jnp.asarray(v, dtype), batch) for v in (c1, c2, q, c)], axis=-1
    )

    def xla(*args):
        y = _cayley_map_xla(*args, square=square)
        return y, not_finite(y)

    out = (jax.ShapeDtypeStruct(x1.shape, dtype), jax.ShapeDtypeStruct(batch, jnp.bool_))
    y, bad = with_native_kernel("cayley", xla, x1, x2, coef, out=out)
    return (y, bad) if with_flag else y


def geodesic_point(a, b, v, cos_phi, r, eta=None):
    """``P = polar(X V^T)``, ``X = A diag(cos_phi) + B diag(r)``, and ``Cay(eta P)`` if ``eta`` is given.

    A point of a decomposed geodesic (:meth:`orthofuse_jax.geometry.GeodesicPath.at`) with its
    Newton-Schulz polar step ``P = Y (3I - Y^T Y) / 2``, and optionally the ``curve_over_id``
    restoration (``eta`` broadcasting against the batch shape). On the CPU with the compiled
    kernel: one pass per block in double (three products and an inversion); else XLA.
    """
    dtype = a.dtype
    blocks = jnp.broadcast_shapes(a.shape[:-2], b.shape[:-2], v.shape[:-2])
    batch = jnp.broadcast_shapes(
        blocks, cos_phi.shape[:-1], r.shape[:-1], jnp.shape(eta) if eta is not None else ()
    )
    if batch[len(batch) - len(blocks) :] != blocks:
        blocks = batch
    # A, B, V stay at their own batch shape where the points' batch only adds leading axes (many
    # t for one pair): the kernel reuses them instead of reading broadcast copies.
    a, b, v = (jnp.broadcast_to(x, blocks + x.shape[-2:]) for x in (a, b, v))
    cs = jnp.stack([jnp.broadcast_to(x, batch + x.shape[-1:]) for x in (cos_phi, r)], axis=-2)
    restore = eta is not None
    coef = jnp.stack(
        [
            jnp.broadcast_to(jnp.asarray(eta if restore else 0.0, dtype), batch),
            jnp.full(batch, 1.0 if restore else 0.0, dtype),
        ],
        axis=-1,
    )
    out = jax.ShapeDtypeStruct(batch + a.shape[-2:], dtype)
    return with_native_kernel(
        "point", functools.partial(_geodesic_point_xla, restore=restore), a, b, v, cs, coef, out=out
    )


def not_finite(y) -> jax.Array:
    """Per block ``[..., b, b] -> [...]``: whether it holds an inf or a NaN (the merges' "bad" flag)."""
    return ~jnp.all(jnp.isfinite(y), axis=(-1, -2))


def with_native_kernel(kernel: str, xla, *args, out=None, attrs=None):
    """``xla(*args)``, or on the CPU the compiled ``kernel`` (same arguments and the FFI attributes
    ``attrs``, outputs ``out``, by default one shaped like ``args[0]``) when it is built, every
    argument has one dtype and blocks are at most :data:`NATIVE_MAX_BLOCK`. Derivatives are
    ``xla``'s (``jax.custom_jvp``; a boolean output has none), and where the kernel has flag outputs
    the differentiated value is ``xla``'s too; ``vmap`` broadcasts the arguments to one batch shape."""
    dtype = args[0].dtype
    target = native_target(kernel, dtype, args[0].shape[-1])
    if target is None or any(x.dtype != dtype for x in args):
        return xla(*args)
    out = out if out is not None else jax.ShapeDtypeStruct(args[0].shape, dtype)
    call = jax.ffi.ffi_call(target, out, vmap_method="broadcast_all")

    @jax.custom_jvp
    def native(*args):
        res = call(*args, **(attrs or {}))
        return tuple(res) if isinstance(out, tuple) else res

    flagged = isinstance(out, tuple) and any(o.dtype == jnp.bool_ for o in out)

    @native.defjvp
    def _(primals, tangents):
        if flagged:  # the kernel's flags may accept a block that xla's formula declines, and a
            return jax.jvp(xla, primals, tangents)  # tangent must belong to its value's path
        return native(*primals), jax.jvp(xla, primals, tangents)[1]

    if _CPU_ONLY.get():
        return native(*args)
    return jax.lax.platform_dependent(*args, cpu=native, default=xla)


_CPU_ONLY = contextvars.ContextVar("orthofuse_jax_cpu_only", default=False)


def tracing_cpu_only() -> bool:
    """Whether the current trace is for the CPU alone (:func:`cpu_only`)."""
    return _CPU_ONLY.get()


@contextlib.contextmanager
def cpu_only(enabled: bool = True):
    """Trace the compiled CPU kernels alone, without ``jax.lax.platform_dependent``'s XLA twin.

    ``platform_dependent`` traces every branch, and the XLA twin of the exact merge is most of a
    merge's tracing time. The merges enter this context inside jitted functions whose static
    arguments say that their (concrete) inputs live on the CPU, so the choice is part of the jit
    cache key; a program traced here can only be lowered for the CPU.
    """
    token = _CPU_ONLY.set(enabled)
    try:
        yield
    finally:
        _CPU_ONLY.reset(token)


def native_target(kernel: str, dtype, n: int) -> str | None:
    """The compiled CPU ``kernel``'s FFI target for ``n x n`` blocks of ``dtype``, or None (not
    built, switched off, another dtype, or ``n`` above :data:`NATIVE_MAX_BLOCK`)."""
    from .. import _native

    return _native.target(kernel, dtype) if n <= NATIVE_MAX_BLOCK else None


def _cayley_map_xla(x1, x2, coef, *, square: bool):
    """:func:`cayley_map` in XLA operations (``coef[..., :4] = (c1, c2, q, c)``)."""
    c1, c2, q, c = (coef[..., i, None, None] for i in range(4))
    s = 0.5 * (c1 * (x1 - jnp.swapaxes(x1, -1, -2)) + c2 * (x2 - jnp.swapaxes(x2, -1, -2)))
    eye = jnp.eye(s.shape[-1], dtype=s.dtype)
    base = eye - q * mm(s, s) if square else eye
    return solve_pd(base - c * s, base + c * s)


def polar_step(y: Block) -> Block:
    """One Newton-Schulz step towards the polar factor: ``Y (3I - Y^T Y) / 2``.

    The spectral formula is exact in exact arithmetic; in float32 its orthogonality error grows
    with ``tan(theta / 2)`` through the inverse Cayley solve. One step squares that error
    (2 matmuls) without moving an orthogonal Y.
    """
    eye = jnp.eye(y.shape[-1], dtype=y.dtype)
    return 0.5 * mm(y, 3.0 * eye - mm(jnp.swapaxes(y, -1, -2), y))


def _geodesic_point_xla(a, b, v, cs, coef, *, restore: bool):
    """:func:`geodesic_point` in XLA operations (``cs[..., :2, :] = (cos_phi, r)``, ``coef[..., 0] = eta``)."""
    y = mm(
        a * cs[..., 0, None, :] + b * cs[..., 1, None, :], jnp.swapaxes(v, -1, -2)
    )  # broadcasts a, b, v
    y = polar_step(y)
    if not restore:
        return y
    zero = jnp.zeros_like(coef[..., :1])
    return _cayley_map_xla(
        y, y, jnp.concatenate([coef[..., :1], zero, zero, jnp.ones_like(zero)], -1), square=False
    )
