"""Gauss-Jordan elimination with the batch as the minor (vector) axis, versus LAPACK ``solve``.

    taskset -c 1 python -m benchmarks.experiments.batch_minor [--b 40] [--blocks 2880] [--chunks 16,32,64]

The merges' solves are many small ``getrf/getrs`` calls (one per block), which LAPACK runs at a
fraction of the machine's speed. Every matrix the Cayley maps invert has a positive definite
symmetric part (``I - S``, ``I - S^2 - 2 eta S``, ``I - eta K``), so elimination needs no pivoting,
and one elimination step is the same rank-one update for every block. With the blocks as the last
axis (``[b, b + m, chunk]``, a chunk of blocks that fits in cache) each step is one elementwise
XLA fusion that can use full SIMD width across blocks. Two forms of a step: ``select`` writes
the pivot row with ``.at[k].set``; ``mask`` folds it into the update (``col - e_k``).
Result: see benchmarks/RESULTS.md ("batch-minor Gauss-Jordan"); not used by the library.
"""

from __future__ import annotations

import argparse

import numpy as np

from .. import common


def gauss_jordan_minor(a, r, form: str = "select"):
    """Solve ``a x = r`` for ``a`` ``[n, n, C]``, ``r`` ``[n, m, C]`` (blocks last); no pivoting."""
    import jax.numpy as jnp

    n = a.shape[0]
    x = jnp.concatenate([a, r], axis=1)  # column 0 of x is always the current pivot column
    for k in range(n):
        row = x[k, 1:] / x[k, 0]
        if form == "select":
            x = (x[:, 1:] - x[:, 0][:, None, :] * row[None]).at[k].set(row)
        else:
            col = x[:, 0] - (jnp.arange(n) == k).astype(x.dtype)[:, None]
            x = x[:, 1:] - col[:, None, :] * row[None]
    return x


def cayley_batch_minor(s, chunk: int, form: str = "select"):
    """``(I - S)^{-1} (I + S)`` for ``s`` ``[B, b, b]``, B a multiple of ``chunk``."""
    import jax.numpy as jnp
    from jax import lax

    n_blocks, b = s.shape[0], s.shape[-1]
    eye = jnp.eye(b, dtype=s.dtype)[:, :, None]
    chunks = jnp.transpose(s.reshape(n_blocks // chunk, chunk, b, b), (0, 2, 3, 1))
    out = lax.map(lambda sc: gauss_jordan_minor(eye - sc, eye + sc, form), chunks)
    return jnp.transpose(out, (0, 3, 1, 2)).reshape(n_blocks, b, b)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--b", type=int, default=40)
    p.add_argument("--blocks", type=int, default=2880)
    p.add_argument("--chunks", default="16,32,64")
    p.add_argument("--reps", type=int, default=7)
    args = p.parse_args(argv)
    import jax
    import jax.numpy as jnp

    b = args.b
    eye = jnp.eye(b, dtype=jnp.float32)
    s = jnp.asarray(common.random_skew_blocks(np.random.default_rng(0), (args.blocks,), b))
    s64 = np.asarray(s, dtype=np.float64)
    exact = np.linalg.solve(np.eye(b) - s64, np.eye(b) + s64)
    fns = {"matmul": jax.jit(lambda s: s @ s),
           "cayley: solve (LAPACK)": jax.jit(lambda s: jnp.linalg.solve(eye - s, eye + s))}
    for form in ("select", "mask"):
        for c in (int(c) for c in args.chunks.split(",")):
            if args.blocks % c == 0:
                fns[f"cayley: batch-minor Gauss-Jordan, {form}, chunk {c}"] = jax.jit(
                    lambda s, c=c, form=form: cayley_batch_minor(s, c, form))
    res = {"machine": common.machine(), "args": vars(args), "variants": {}}
    unit = None
    for name, f in fns.items():
        tm = common.time_fn(lambda: jax.block_until_ready(f(s)), reps=args.reps)
        unit = unit or tm["median"]
        err = None if name == "matmul" else float(np.abs(np.asarray(f(s), np.float64) - exact).max())
        res["variants"][name] = {"median_s": tm["median"], "in_matmuls": tm["median"] / unit, "max_abs_err": err}
        print(f"{name:52s} {tm['median'] * 1e3:8.1f} ms  {tm['median'] / unit:5.1f} matmuls  err {err}", flush=True)
    common.write_json(f"experiments_batch_minor_b{b}", res)
    return res


if __name__ == "__main__":
    main()
