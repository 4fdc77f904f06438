"""JAX vs PyTorch on the primitives of the merges, at full SDXL stack sizes (L and R of all layers).

    python -m benchmarks.experiments.primitives [--reps 5] [--eig-sample 32]

Per block size (3840 x 20x20, 23040 x 40x40, 8960 x 64x64 blocks): batched matmul, Cayley solve,
explicit inverse, ``eigh`` of ``-S^2`` and a Cholesky-form Cayley in JAX; matmul and solve in torch;
torch's general ``eig`` (what the reference's full merge calls) extrapolated from ``--eig-sample``
blocks per call, the reference's call size. Lower bounds for each merge follow from these.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np

from .. import common


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--eig-sample", type=int, default=32)
    args = p.parse_args(argv)
    import jax
    import jax.numpy as jnp
    import jax.scipy.linalg as jsl
    import torch

    rng = np.random.default_rng(0)
    res = {"machine": common.machine(), "args": vars(args), "sizes": {}}
    rows = []
    for b, layers in common.SDXL_INVENTORY.items():
        n = 2 * layers * common.NB
        s_np = common.random_skew_blocks(rng, (n,), b)
        s = jnp.asarray(s_np)
        eye = jnp.eye(b, dtype=jnp.float32)
        jf = {
            "jax.matmul": jax.jit(lambda s: s @ s),
            "jax.solve": jax.jit(lambda s: jnp.linalg.solve(eye - s, jnp.broadcast_to(eye + s, s.shape))),
            "jax.inv": jax.jit(lambda s: jnp.linalg.inv(eye - s)),
            "jax.eigh": jax.jit(lambda s: jnp.linalg.eigh(jnp.swapaxes(s, -1, -2) @ s)),
            "jax.cholesky_cayley": jax.jit(lambda s: jsl.cho_solve(
                jsl.cho_factor(eye + jnp.swapaxes(s, -1, -2) @ s, lower=True), (eye + s) @ (eye + s))),
        }
        out = {}
        for k, f in jf.items():
            out[k] = common.time_fn(lambda: jax.block_until_ready(f(s)), reps=args.reps)
        st, it = torch.from_numpy(s_np), torch.eye(b)
        out["torch.matmul"] = common.time_fn(lambda: st @ st, reps=args.reps)
        out["torch.solve"] = common.time_fn(lambda: torch.linalg.solve(it - st, it + st, left=False), reps=args.reps)
        k = args.eig_sample
        e = common.time_fn(lambda: torch.linalg.eig(st[:k]), reps=args.reps)
        out["torch.eig(extrapolated)"] = {**e, "median": e["median"] * n / k, "cpu_median": e["cpu_median"] * n / k}
        res["sizes"][b] = {"blocks": n, **out}
        rows.append([f"b={b} ({n} blocks)"] + [common.fmt_s(out[k]["median"]) for k in out])
        print(rows[-1], flush=True)
    print(common.table(rows, ["stack"] + list(out)))
    common.write_json("experiments_primitives", res)
    return res


if __name__ == "__main__":
    main(sys.argv[1:])
