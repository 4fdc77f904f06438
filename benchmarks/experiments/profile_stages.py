"""Where the time of our merges goes: each stage jitted and timed separately on one stack.

    python -m benchmarks.experiments.profile_stages [--b 40] [--blocks 11520] [--reps 5]

Stages follow ``orthofuse_jax.fusion.merge`` for two adapters (``_pair_kernel``) and the input
conversion ``to_orthogonal``. Reported: median wall and process CPU time, and CPU time in units of
one batched matmul of the same stack.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np

from .. import common


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--b", type=int, default=40)
    p.add_argument("--blocks", type=int, default=11520)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--t", type=float, default=0.6)
    args = p.parse_args(argv)
    import jax
    import jax.numpy as jnp

    from orthofuse_jax.geometry import geodesic_path
    from orthofuse_jax.fusion.merge import cayley_space_blocks, curve_over_id, restore_exact
    from orthofuse_jax.geometry import cayley, inverse_cayley

    rng = np.random.default_rng(0)
    a1 = jnp.asarray(common.random_skew_blocks(rng, (args.blocks,), args.b))
    a2 = jnp.asarray(common.random_skew_blocks(rng, (args.blocks,), args.b))
    t = jnp.float32(args.t)
    u1, u2 = cayley(a1), cayley(a2)
    path = jax.jit(geodesic_path)(u1, u2)
    y = jax.jit(lambda p, t: p.at(t))(path, t)
    w = jnp.swapaxes(u1, -1, -2) @ u2
    s = inverse_cayley(w)

    def eigh_only(s):
        m = jnp.swapaxes(s, -1, -2) @ s
        return jnp.linalg.eigh(0.5 * (m + jnp.swapaxes(m, -1, -2)))

    stages = {
        "matmul (unit)": (lambda x: x @ x, (u1,)),
        "fast: cayley_space_blocks": (cayley_space_blocks, (a1, a2, t)),
        "fast+exact: curve_over_id": (curve_over_id, (y, t)),
        "exact: to_orthogonal (x2 Cayley)": (lambda a, b: (cayley(a), cayley(b)), (a1, a2)),
        "exact: W = U1^T U2": (lambda a, b: jnp.swapaxes(a, -1, -2) @ b, (u1, u2)),
        "exact: invCay(W)": (inverse_cayley, (w,)),
        "exact: eigh(-S^2)": (eigh_only, (s,)),
        "exact: path.at(t) (rotate+polar+U1@)": (lambda p, t: p.at(t), (path, t)),
        "restore=exact: exp(f log Y)": (restore_exact, (y, t)),
    }
    rows, res, unit = [], {"machine": common.machine(), "args": vars(args), "stages": {}}, None
    for name, (f, fargs) in stages.items():
        jf = jax.jit(f)
        tm = common.time_fn(lambda: jax.block_until_ready(jf(*fargs)), reps=args.reps)
        unit = unit or tm["cpu_median"]
        res["stages"][name] = tm
        rows.append([name, common.fmt_s(tm["median"]), common.fmt_s(tm["cpu_median"]), f"{tm['cpu_median'] / unit:.1f}"])
        print(rows[-1], flush=True)
    print(common.table(rows, ["stage", "wall", "CPU", "CPU / matmul"]))
    common.write_json(f"experiments_profile_b{args.b}", res)
    return res


if __name__ == "__main__":
    main(sys.argv[1:])
