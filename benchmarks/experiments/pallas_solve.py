"""A GPU kernel (Pallas, Triton backend) for the merges' small solves, versus ``jnp.linalg.solve``.

    python -m benchmarks.experiments.pallas_solve              # on a GPU: time and check at the SDXL stack shapes
    python -m benchmarks.experiments.pallas_solve --interpret  # anywhere: check the kernel's arithmetic (slow)

Why. On an H100, ``jnp.linalg.solve`` (cuBLAS batched getrf + two batched trsm) took 2.0 ms for
the 11,520 blocks of 40x40 of one SDXL stack and 0.28 ms for 1,920 blocks of 20x20: 8x the flops
for 1.2x the time, so it is bound by its per-column steps over the whole batch, not by arithmetic
(RESULTS.md, GPU run 1). The fast merge is one such solve per block and 1 matmul (10.0 ms for the
full inventory as ``jit(merge)``, target < 10 ms); the exact merge has three.

How. Every matrix the Cayley maps solve against has a positive definite symmetric part
(``I - S``, ``I - S^2 - 2 eta S``, ``I - eta K``), so elimination needs no pivoting. One program
of the kernel holds one block, padded to a power of two (20 -> 32, 40 and 64 -> 64; the padding is
the identity), and its right-hand side in registers, and runs Gauss-Jordan on them: ``n`` steps of
two masked reductions (the pivot row and column) and one rank-one update. Memory traffic is one
read of each input and one write of the result.

Status: written and checked in interpret mode on the CPU (session 5); not yet run on a GPU.
"""

from __future__ import annotations

import argparse
import functools
import time

import numpy as np


def _next_pow2(n: int) -> int:
    return 1 << max(n - 1, 1).bit_length()


def _gauss_jordan_kernel(a_ref, r_ref, x_ref, *, n: int):
    import jax
    import jax.numpy as jnp

    a = a_ref[...]
    r = r_ref[...]
    big = a.shape[0]
    rows_a = jax.lax.broadcasted_iota(jnp.int32, a.shape, 0)
    cols_a = jax.lax.broadcasted_iota(jnp.int32, a.shape, 1)
    rows_r = jax.lax.broadcasted_iota(jnp.int32, r.shape, 0)
    idx = jax.lax.broadcasted_iota(jnp.int32, (big,), 0)

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


@functools.partial(__import__("jax").jit, static_argnames=("interpret", "num_warps"))
def solve_no_pivot(a, r, *, interpret: bool = False, num_warps: int = 4):
    """``a^{-1} r`` for ``a`` ``[B, n, n]`` whose symmetric part is positive definite, ``r`` ``[B, n, m]``."""
    import jax
    import jax.numpy as jnp
    from jax.experimental import pallas as pl

    batch, n, m = r.shape
    big, wide = _next_pow2(n), _next_pow2(m)
    if big != n:  # pad with the identity: the padded rows and columns stay decoupled
        eye_pad = jnp.broadcast_to(jnp.eye(big, dtype=a.dtype)[n:, n:], (batch, big - n, big - n))
        a = jnp.concatenate([jnp.pad(a, ((0, 0), (0, 0), (0, big - n))),
                             jnp.pad(eye_pad, ((0, 0), (0, 0), (n, 0)))], axis=1)
    r = jnp.pad(r, ((0, 0), (0, big - n), (0, wide - m)))
    kwargs = {}
    if not interpret:
        from jax.experimental.pallas import triton as plt

        kwargs["compiler_params"] = plt.CompilerParams(num_warps=num_warps, num_stages=1)
    x = pl.pallas_call(
        functools.partial(_gauss_jordan_kernel, n=n),
        out_shape=jax.ShapeDtypeStruct((batch, big, wide), r.dtype),
        grid=(batch,),
        in_specs=[pl.BlockSpec((None, big, big), lambda i: (i, 0, 0)),
                  pl.BlockSpec((None, big, wide), lambda i: (i, 0, 0))],
        out_specs=pl.BlockSpec((None, big, wide), lambda i: (i, 0, 0)),
        interpret=interpret,
        **kwargs,
    )(a, r)
    return x[:, :n, :m]


def _cayley_inputs(rng, blocks: int, b: int, angle=(0.1, 1.0)):
    from .. import common

    s = common.random_skew_blocks(rng, (blocks,), b, angle_range=angle)
    eye = np.eye(b, dtype=np.float32)
    return eye - s, eye + s


def check(interpret: bool, shapes, seed: int = 0) -> float:
    """Max abs error against float64 numpy over ``shapes`` (list of (blocks, b))."""
    worst = 0.0
    rng = np.random.default_rng(seed)
    for blocks, b in shapes:
        a, r = _cayley_inputs(rng, blocks, b)
        x = np.asarray(solve_no_pivot(a, r, interpret=interpret), np.float64)
        exact = np.linalg.solve(a.astype(np.float64), r.astype(np.float64))
        err = float(np.abs(x - exact).max())
        print(f"  {blocks} x {b}x{b}: max abs err {err:.1e}", flush=True)
        worst = max(worst, err)
    return worst


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--interpret", action="store_true", help="run the kernel in Pallas' interpreter (any backend)")
    p.add_argument("--reps", type=int, default=10)
    args = p.parse_args(argv)
    import jax
    import jax.numpy as jnp

    if args.interpret:
        worst = check(True, [(3, 20), (2, 40), (2, 64), (2, 5)])
        print(f"interpret mode: worst error {worst:.1e}")
        return {"interpret_max_abs_err": worst}
    from .. import common

    res = {"machine": common.machine(), "device": jax.devices()[0].device_kind, "stacks": {}}
    res["max_abs_err"] = check(False, [(64, 20), (64, 40), (64, 64)])
    rng = np.random.default_rng(1)
    for blocks, b in [(1920, 20), (11520, 40), (4480, 64)]:
        a, r = (jnp.asarray(x) for x in _cayley_inputs(rng, blocks, b))
        row = {}
        fns = {"jnp.linalg.solve": jax.jit(jnp.linalg.solve), "matmul": jax.jit(lambda a, r: a @ r)}
        for w in (1, 2, 4, 8):
            fns[f"pallas gauss-jordan, {w} warps"] = functools.partial(solve_no_pivot, num_warps=w)
        for name, f in fns.items():
            try:
                t0 = time.perf_counter()
                jax.block_until_ready(f(a, r))
                first = time.perf_counter() - t0
                ts = []
                for _ in range(args.reps):
                    t0 = time.perf_counter()
                    jax.block_until_ready(f(a, r))
                    ts.append(time.perf_counter() - t0)
                row[name] = {"median_ms": 1e3 * float(np.median(ts)), "first_call_s": first}
                print(f"{blocks:6d} x {b}x{b}  {name:32s} {1e3 * np.median(ts):8.3f} ms  (first call {first:.1f} s)",
                      flush=True)
            except Exception as e:  # a kernel that does not lower is a result too
                row[name] = {"error": f"{type(e).__name__}: {e}"[:500]}
                print(f"{blocks:6d} x {b}x{b}  {name:32s} FAILED {type(e).__name__}: {str(e)[:200]}", flush=True)
        res["stacks"][f"{blocks}x{b}"] = row
    common.write_json("experiments_pallas_solve", res)
    return res


if __name__ == "__main__":
    main()
