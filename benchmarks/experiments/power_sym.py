"""Fractional power of a rotation without the inverse-Cayley solve: ``eigh`` of its symmetric part.

    python -m benchmarks.experiments.power_sym [--b 40] [--blocks 2880] [--t 0.6]

For orthogonal ``W`` (no eigenvalue -1): ``sym(W) = (W + W^T)/2 = V diag(cos theta) V^T`` and
``K = (W - W^T)/2`` acts on each eigenspace as ``sin(theta) J``. Hence

    W^t = V diag(cos(t theta)) V^T + K V diag(sin(t theta) / sin(theta)) V^T,    theta = arccos(c)

-- the same real formula as ``geometry.spectral`` but decomposing ``sym(W)`` instead of
``-S^2, S = invCay(W)``: one LAPACK solve less per power. ``theta`` from ``arccos`` is inaccurate
near 0 (~eps / theta), but both coefficient functions are smooth in ``cos theta``, so the matrix
error stays O(eps). Compared here against the current ``geometry.power`` and float64 scipy.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np

from .. import common


def power_sym(w, t):
    import jax.numpy as jnp

    sym = 0.5 * (w + jnp.swapaxes(w, -1, -2))
    k = 0.5 * (w - jnp.swapaxes(w, -1, -2))
    c, v = jnp.linalg.eigh(sym)
    c = jnp.clip(c, -1.0, 1.0)
    theta = jnp.arccos(c)
    sin = jnp.sin(theta)
    small = sin < 1e-6
    ratio = jnp.where(small, t, jnp.sin(t * theta) / jnp.where(small, 1.0, sin))
    vt = jnp.swapaxes(v, -1, -2)
    y = (v * jnp.cos(t * theta)[..., None, :]) @ vt + k @ ((v * ratio[..., None, :]) @ vt)
    eye = jnp.eye(w.shape[-1], dtype=w.dtype)
    return 0.5 * y @ (3.0 * eye - jnp.swapaxes(y, -1, -2) @ y)  # one polar step, as geometry.power


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--b", type=int, default=40)
    p.add_argument("--blocks", type=int, default=2880)
    p.add_argument("--t", type=float, default=0.6)
    p.add_argument("--reps", type=int, default=5)
    args = p.parse_args(argv)
    import jax
    import jax.numpy as jnp
    import scipy.linalg as sl

    from orthofuse_jax.geometry import cayley, power

    rng = np.random.default_rng(0)
    a1 = jnp.asarray(common.random_skew_blocks(rng, (args.blocks,), args.b))
    a2 = jnp.asarray(common.random_skew_blocks(rng, (args.blocks,), args.b))
    w = jnp.swapaxes(cayley(a1), -1, -2) @ cayley(a2)  # relative rotations, angles up to ~2 rad
    t = jnp.float32(args.t)
    fns = {"geometry.power (invCay solve + eigh(-S^2))": jax.jit(power), "power_sym (eigh(sym W))": jax.jit(power_sym)}
    w64 = np.asarray(w, dtype=np.float64)
    idx = np.arange(0, args.blocks, max(1, args.blocks // 64))
    exact = np.stack([np.real(sl.expm(args.t * sl.logm(w64[i]))) for i in idx])
    rows, res = [], {"machine": common.machine(), "args": vars(args), "variants": {}}
    for name, f in fns.items():
        tm = common.time_fn(lambda: jax.block_until_ready(f(w, t)), reps=args.reps)
        y = np.asarray(f(w, t), dtype=np.float64)
        err = float(np.max(np.abs(y[idx] - exact)))
        orth = float(np.max(np.abs(np.swapaxes(y, -1, -2) @ y - np.eye(args.b))))
        res["variants"][name] = {**tm, "max_abs_err_vs_scipy_f64": err, "orth_err": orth}
        rows.append([name, common.fmt_s(tm["median"]), common.fmt_s(tm["cpu_median"]), f"{err:.1e}", f"{orth:.1e}"])
        print(rows[-1], flush=True)
    print(common.table(rows, ["variant", "wall", "CPU", "max abs err vs scipy f64 (64 blocks)", "orth err"]))
    common.write_json(f"experiments_power_sym_b{args.b}", res)


if __name__ == "__main__":
    main(sys.argv[1:])
