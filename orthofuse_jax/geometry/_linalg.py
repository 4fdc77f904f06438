"""Matrix products at full float32 precision on every backend.

JAX's default precision lets XLA run float32 matrix products in TF32 on NVIDIA GPUs (and
bfloat16 passes on TPUs), which costs about three decimal digits. The geometry is checked to
float32 round-off against float64 references, so every product in the package's manifold
math asks for ``Precision.HIGHEST``: the same float32 results on CPU, GPU and TPU. For the
small batched blocks of a GS adapter the products are memory-bound, so on an H100 this costs
about 10% of a product's time (benchmarks/RESULTS.md).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

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
    package's compiled kernel (``orthofuse_jax/_native/solve.cc``: 2-3x faster than jaxlib's
    LAPACK ``getrf`` + ``trsm`` at the merges' block sizes and, eliminating in double, 10x more
    accurate in float32; benchmarks/RESULTS.md) when it was built. It is ``jnp.linalg.solve`` on
    other backends, for other dtypes, for blocks larger than :data:`NATIVE_MAX_BLOCK`, without the
    kernel, or with ``ORTHOFUSE_JAX_NATIVE=0``.
    Differentiable (forward and reverse) through ``lax.custom_linear_solve``, and safe under
    ``jit`` and ``vmap``.
    """
    from .. import _native

    target = _native.solve_target(a.dtype)
    if target is None or b.dtype != a.dtype or b.ndim != a.ndim or a.shape[-1] > NATIVE_MAX_BLOCK:
        return jnp.linalg.solve(a, b)
    batch = jnp.broadcast_shapes(a.shape[:-2], b.shape[:-2])
    a = jnp.broadcast_to(a, batch + a.shape[-2:])
    b = jnp.broadcast_to(b, batch + b.shape[-2:])

    def native(a, b):
        call = jax.ffi.ffi_call(target, jax.ShapeDtypeStruct(b.shape, b.dtype), vmap_method="broadcast_all")
        fixed = jax.lax.stop_gradient(a)
        return jax.lax.custom_linear_solve(
            lambda x: mm(a, x), b,
            solve=lambda _, x: call(fixed, x),
            transpose_solve=lambda _, x: call(jnp.swapaxes(fixed, -1, -2), x))

    return jax.lax.platform_dependent(a, b, cpu=native, default=jnp.linalg.solve)
