"""A GPU kernel (Pallas on Triton) for the Cayley maps' small solves, without pivoting.

On an H100, ``jnp.linalg.solve`` (cuBLAS batched ``getrf`` and two batched ``trsm``) is bound by
its per-column steps over the whole batch, not by arithmetic: 2.04 ms for the 11,520 40x40 blocks
of one SDXL stack, 9x a matrix product of the same stack (0.22 ms) for about 1.3x its flops. Every matrix the
Cayley maps solve against has a positive definite symmetric part (``I - S``, ``I - S^2 - c S``),
so Gauss-Jordan elimination needs no pivoting, and one program of this kernel holds one block,
padded to a power of two (the padding is the identity), and its right-hand side in registers:
``n`` steps of two masked reductions and a rank-one update, one read of each input and one write.
Measured on an H100 (docs/performance.md): 1.32 ms for the 40x40 stack, 0.86 ms
(against 2.06 ms) for 4,480 64x64 blocks and 0.13 ms (0.24 ms) for the 20x20 one, with 2 warps:
1.5-2.4x faster.

:func:`orthofuse_jax.geometry._linalg.solve_pd` calls it on CUDA devices for float32 blocks up to
:data:`MAX_BLOCK`; on the CPU (and in the tests) it runs in Pallas' interpreter.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp

MAX_BLOCK = 64
"""Largest block the kernel takes: a padded block and its right-hand side stay in registers (64x64
float32 is 16 KB each, 64 threads at 2 warps); beyond, spills make cuBLAS the better choice."""

NUM_WARPS = 2
"""Warps per program: fastest at every SDXL block size on an H100 (1, 2, 4, 8 measured)."""


def available() -> bool:
    """Whether this jax has Pallas with its Triton backend (imported lazily: it is optional)."""
    try:
        from jax.experimental import pallas  # noqa: F401
        from jax.experimental.pallas import triton  # noqa: F401
    except ImportError:  # pragma: no cover - older or trimmed jax
        return False
    return True


def _next_pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def _gauss_jordan_kernel(a_ref, r_ref, x_ref, *, n: int):
    a = a_ref[...]
    r = r_ref[...]
    rows_a = jax.lax.broadcasted_iota(jnp.int32, a.shape, 0)
    cols_a = jax.lax.broadcasted_iota(jnp.int32, a.shape, 1)
    rows_r = jax.lax.broadcasted_iota(jnp.int32, r.shape, 0)
    idx = jax.lax.broadcasted_iota(jnp.int32, (a.shape[0],), 0)

    def step(k, carry):
        a, r = carry
        col = jnp.sum(jnp.where(cols_a == k, a, 0.0), axis=1)  # column k
        piv = jnp.sum(jnp.where(idx == k, col, 0.0))
        row_a = jnp.sum(jnp.where(rows_a == k, a, 0.0), axis=0) / piv
        row_r = jnp.sum(jnp.where(rows_r == k, r, 0.0), axis=0) / piv
        coef = col - jnp.where(idx == k, 1.0, 0.0).astype(a.dtype)  # row k becomes row k / piv
        return a - coef[:, None] * row_a[None, :], r - coef[:, None] * row_r[None, :]

    _, r = jax.lax.fori_loop(0, n, step, (a, r))
    x_ref[...] = r


def gauss_jordan_solve(a, r, *, interpret: bool = False, num_warps: int = NUM_WARPS):
    """``a^{-1} r`` by Gauss-Jordan elimination without pivoting, one Pallas program per block.

    Args:
      a: ``[..., n, n]`` whose symmetric part is positive definite (else a zero pivot gives
        ``inf``/``nan``: no pivoting is done), ``n <= MAX_BLOCK`` on a GPU.
      r: ``[..., n, m]``, same batch shape and dtype.
      interpret: run in Pallas' interpreter (any backend; for tests).
      num_warps: Triton warps per program.
    Returns:
      ``[..., n, m]``, the dtype of ``r``.
    """
    from jax.experimental import pallas as pl

    *batch, n, m = r.shape
    if a.shape != (*batch, n, n):
        raise ValueError(
            f"gauss_jordan_solve: a has shape {a.shape}, expected {(*batch, n, n)} for r {r.shape}"
        )
    count = math.prod(batch)
    if count == 0:
        return jnp.zeros(r.shape, r.dtype)
    a = a.reshape(count, n, n)
    r = r.reshape(count, n, m)
    big, wide = _next_pow2(n), _next_pow2(m)
    if big != n:  # pad with the identity: the padded rows and columns stay decoupled
        eye = jnp.broadcast_to(jnp.eye(big, dtype=a.dtype)[n:], (count, big - n, big))
        a = jnp.concatenate([jnp.pad(a, ((0, 0), (0, 0), (0, big - n))), eye], axis=1)
    if (big, wide) != (n, m):
        r = jnp.pad(r, ((0, 0), (0, big - n), (0, wide - m)))
    kwargs: dict[str, Any] = {}
    if not interpret:
        from jax.experimental.pallas import triton as plt

        kwargs["compiler_params"] = plt.CompilerParams(num_warps=num_warps, num_stages=1)
    x = pl.pallas_call(
        functools.partial(_gauss_jordan_kernel, n=n),
        out_shape=jax.ShapeDtypeStruct((count, big, wide), r.dtype),
        grid=(count,),
        in_specs=[
            pl.BlockSpec((None, big, big), lambda i: (i, 0, 0)),
            pl.BlockSpec((None, big, wide), lambda i: (i, 0, 0)),
        ],
        out_specs=pl.BlockSpec((None, big, wide), lambda i: (i, 0, 0)),
        interpret=interpret,
        **kwargs,
    )(a, r)
    return x[:, :n, :m].reshape(*batch, n, m)
