"""Matmul-rich batched inverse without pivoting, versus LAPACK ``solve``, for the Cayley maps.

    python -m benchmarks.experiments.block_inverse [--b 40] [--blocks 2880] [--reps 5] [--base 5]

Every matrix the merges invert has a positive definite symmetric part: ``I - S`` (symmetric part
I), ``U + I`` for a rotation without eigenvalue -1 (``I + sym U`` has eigenvalues ``1 + cos theta``),
``I - eta K``. For such matrices Gaussian elimination needs no pivoting (every leading block and
every Schur complement again has a positive definite symmetric part), so the inverse can be
computed by recursive 2x2 block inversion -- batched matmuls on halves -- down to a small base
case solved by unrolled Gauss-Jordan elimination with elementwise ops. Small batched LAPACK
``getrf/getrs`` calls are overhead-bound on CPU; this replaces them with matmuls.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np

from .. import common


def gauss_jordan_inv(a):
    """Unrolled Gauss-Jordan inverse without pivoting, ``[..., n, n]`` (small n)."""
    import jax.numpy as jnp

    n = a.shape[-1]
    x = jnp.concatenate([a, jnp.broadcast_to(jnp.eye(n, dtype=a.dtype), a.shape)], axis=-1)
    for k in range(n):
        row = x[..., k, :] / x[..., k, k][..., None]
        x = x - x[..., :, k][..., :, None] * row[..., None, :]
        x = x.at[..., k, :].set(row)
    return x[..., :, n:]


def block_inv(a, base: int = 5):
    """Recursive 2x2 block inverse (Schur complement), no pivoting; see module docstring."""
    import jax.numpy as jnp

    n = a.shape[-1]
    if n <= base:
        return gauss_jordan_inv(a)
    h = n // 2
    a11, a12, a21, a22 = a[..., :h, :h], a[..., :h, h:], a[..., h:, :h], a[..., h:, h:]
    x11 = block_inv(a11, base)
    p = a21 @ x11  # A21 A11^-1
    q = x11 @ a12  # A11^-1 A12
    y = block_inv(a22 - a21 @ q, base)  # Schur complement inverse
    qy = q @ y
    top = jnp.concatenate([x11 + qy @ p, -qy], axis=-1)
    bot = jnp.concatenate([-(y @ p), y], axis=-1)
    return jnp.concatenate([top, bot], axis=-2)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--b", type=int, default=40)
    p.add_argument("--blocks", type=int, default=2880)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--base", type=int, default=5)
    args = p.parse_args(argv)
    import jax
    import jax.numpy as jnp

    b = args.b
    eye = jnp.eye(b, dtype=jnp.float32)
    rng = np.random.default_rng(0)
    s = jnp.asarray(common.random_skew_blocks(rng, (args.blocks,), b))
    fns = {
        "matmul": jax.jit(lambda s: s @ s),
        "cayley: solve (LAPACK)": jax.jit(lambda s: jnp.linalg.solve(eye - s, jnp.broadcast_to(eye + s, s.shape))),
        f"cayley: block_inv (base {args.base}) @ (I+S)": jax.jit(lambda s: block_inv(eye - s, args.base) @ (eye + s)),
    }
    ref = np.asarray(fns["cayley: solve (LAPACK)"](s), dtype=np.float64)
    s64 = np.asarray(s, dtype=np.float64)
    exact = np.linalg.solve(np.eye(b) - s64, np.eye(b) + s64)
    rows, res, unit = [], {"machine": common.machine(), "args": vars(args), "variants": {}}, None
    for name, f in fns.items():
        tm = common.time_fn(lambda: jax.block_until_ready(f(s)), reps=args.reps)
        unit = unit or tm["cpu_median"]
        y = np.asarray(f(s), dtype=np.float64)
        err = float(np.max(np.abs(y - exact))) if name != "matmul" else None
        res["variants"][name] = {**tm, "max_abs_err_vs_f64": err}
        rows.append([name, common.fmt_s(tm["median"]), common.fmt_s(tm["cpu_median"]),
                     f"{tm['cpu_median'] / unit:.1f}", "-" if err is None else f"{err:.1e}"])
        print(rows[-1], flush=True)
    res["lapack_err_vs_f64"] = float(np.max(np.abs(ref - exact)))
    print(common.table(rows, ["variant", "wall", "CPU", "CPU / matmul", "max abs err vs float64"]))
    common.write_json(f"experiments_block_inverse_b{b}", res)
    return res


if __name__ == "__main__":
    main(sys.argv[1:])
