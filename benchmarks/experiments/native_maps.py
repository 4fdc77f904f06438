"""The compiled Cayley maps and geodesic points vs the same formulas in XLA, per SDXL stack.

    taskset -c 1 python -m benchmarks.experiments.native_maps [--reps 5]

On the L stack of each SDXL block size (1920 x 20x20, 11520 x 40x40, 4480 x 64x64; rotations of
0.1-1 rad), jitted, one core:

* ``cayley``: ``Cay(A)`` (``cayley_map(A)``: one in-place inversion per block) against the XLA
  formula ``solve_pd(I - S, I + S)`` (whose solve is itself the compiled no-pivot solve);
* ``fast``: the fast merge with its restoration, ``Cay(eta Cay((1-t) S1 + t S2))``
  (``cayley_map(..., square=True)``: two inversions) against ``S^2`` and one solve in XLA;
* ``point``: a geodesic point with its polar step and ``curve_over_id``
  (``GeodesicPath.at_restored``: three products and an inversion) against the same in XLA;
* ``sweep point``: the same for 16 t at once (the kernel reads the decomposition once per block).

Each with its error against float64 numpy of the same formula. Writes
``benchmarks/results/experiments_native_maps.json``.
"""

from __future__ import annotations

import argparse
import functools

import numpy as np

from .. import common

STACKS = [(1920, 20), (11520, 40), (4480, 64)]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reps", type=int, default=5)
    args = p.parse_args(argv)
    import jax
    import jax.numpy as jnp

    jax.config.update("jax_enable_x64", True)  # for the float64 references; the timed inputs are float32
    from orthofuse_jax import _native
    from orthofuse_jax.geometry import geodesic_path_cayley
    from orthofuse_jax.geometry._linalg import _cayley_map_xla, _geodesic_point_xla, cayley_map

    if _native.target("cayley", np.dtype("float32")) is None:
        raise SystemExit("the compiled kernels are not built (orthofuse_jax._native.library_path() is None)")
    t, eta = 0.6, 0.5 + 2 * 0.6 * 0.4
    ts = np.linspace(0.0, 1.0, 16, dtype=np.float32)
    res = {"machine": common.machine(), "args": vars(args), "stacks": {}}
    for blocks, b in STACKS:
        rng = np.random.default_rng(b)
        a1, a2 = (common.random_skew_blocks(rng, (blocks,), b) for _ in range(2))
        j1, j2 = jnp.asarray(a1), jnp.asarray(a2)
        path = jax.jit(geodesic_path_cayley)(j1, j2)
        cos_phi = jnp.cos(t * path.theta)
        r = jnp.where(path.sigma > 0, jnp.sin(t * path.theta) / jnp.where(path.sigma > 0, path.sigma, 1), 2 * t)
        coef = lambda *c: jnp.broadcast_to(jnp.asarray(c, jnp.float32), (blocks, len(c)))  # noqa: E731
        cs = jnp.stack([cos_phi, r], axis=-2)
        tb = jnp.asarray(ts)[:, None, None]
        cases = {
            "cayley": (jax.jit(cayley_map), jax.jit(functools.partial(_cayley_map_xla, square=False)),
                       (j1,), (j1, j1, coef(1.0, 0.0, 0.0, 1.0))),
            "fast": (jax.jit(lambda x, y: cayley_map(x, y, c1=1 - t, c2=t, c=2 * eta, square=True)),
                     jax.jit(functools.partial(_cayley_map_xla, square=True)),
                     (j1, j2), (j1, j2, coef(1 - t, t, 1.0, 2 * eta))),
            "point": (jax.jit(lambda p: p.at_restored(t, eta)),
                      jax.jit(functools.partial(_geodesic_point_xla, restore=True)),
                      (path,), (path.a, path.b, path.v, cs, coef(eta, 1.0))),
        }
        row = {}
        for name, (ours, xla, args_ours, args_xla) in cases.items():
            want = np.asarray(jax.jit(xla)(*(jnp.asarray(x, jnp.float64) for x in args_xla)))
            row[f"{name}_native_ms"] = 1e3 * common.time_fn(lambda: ours(*args_ours).block_until_ready(),
                                                            reps=args.reps)["median"]
            row[f"{name}_xla_ms"] = 1e3 * common.time_fn(lambda: xla(*args_xla).block_until_ready(),
                                                         reps=args.reps)["median"]
            row[f"{name}_native_err"] = float(np.abs(np.asarray(ours(*args_ours), np.float64) - want).max())
            row[f"{name}_xla_err"] = float(np.abs(np.asarray(xla(*args_xla), np.float64) - want).max())
        sweep = jax.jit(lambda p: p.at_restored(tb, 0.5 + 2 * tb * (1 - tb)))
        row["sweep16_point_ms"] = 1e3 * common.time_fn(lambda: sweep(path).block_until_ready(), reps=args.reps)["median"]
        res["stacks"][f"{blocks}x{b}"] = row
        print(f"{blocks:6d} x {b}x{b}: " + "  ".join(
            f"{k} {row[f'{k}_native_ms']:.1f} vs XLA {row[f'{k}_xla_ms']:.1f} ms "
            f"({row[f'{k}_xla_ms'] / row[f'{k}_native_ms']:.1f}x; err {row[f'{k}_native_err']:.1e} vs "
            f"{row[f'{k}_xla_err']:.1e})" for k in cases) + f"  16 points at once {row['sweep16_point_ms']:.1f} ms",
            flush=True)
    common.write_json("experiments_native_maps", res)


if __name__ == "__main__":
    main()
