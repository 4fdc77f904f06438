"""The compiled CPU solve (``orthofuse_jax/_native/solve.cc``) vs jaxlib's and torch's, per stack.

    taskset -c 1 python -m benchmarks.experiments.c_solve [--reps 7]

Times ``solve_pd`` (the package's no-pivot kernel, an XLA FFI custom call, jitted) against
``jnp.linalg.solve`` (jaxlib's LAPACK: OpenBLAS ``getrf`` + ``trsm``) and ``torch.linalg.solve``
(MKL), one thread each, on the L stack of each SDXL block size (1920 x 20x20, 11520 x 40x40,
4480 x 64x64; the Cayley matrices ``I - S``, ``I + S`` of rotations of 0.1-1 rad), with the error
of each against float64 numpy. A first measurement used a ctypes prototype of the
same algorithm; git history has it.
"""

from __future__ import annotations

import argparse

import numpy as np

from .. import common

STACKS = [(1920, 20), (11520, 40), (4480, 64)]


def _median_ms(fn, reps: int) -> float:
    return 1e3 * common.time_fn(fn, reps=reps)["median"]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reps", type=int, default=7)
    args = p.parse_args(argv)
    import jax
    import jax.numpy as jnp
    import torch

    from orthofuse_jax import _native
    from orthofuse_jax.geometry._linalg import solve_pd

    if _native.solve_target(np.dtype("float32")) is None:
        raise SystemExit("the compiled kernel is not built (orthofuse_jax._native.library_path() is None)")
    torch.set_num_threads(1)
    res = {"machine": common.machine(), "args": vars(args), "stacks": {}}
    for blocks, b in STACKS:
        s = common.random_skew_blocks(np.random.default_rng(b), (blocks,), b)
        eye = np.eye(b, dtype=np.float32)
        a, r = np.ascontiguousarray(eye - s), np.ascontiguousarray(eye + s)
        exact = np.linalg.solve(a.astype(np.float64), r.astype(np.float64))
        aj, rj = jnp.asarray(a), jnp.asarray(r)
        fns = {"native": jax.jit(solve_pd), "jax": jax.jit(jnp.linalg.solve), "matmul": jax.jit(jnp.matmul)}
        at, rt = torch.from_numpy(a.copy()), torch.from_numpy(r.copy())
        row = {f"{k}_ms": _median_ms(lambda f=f: f(aj, rj).block_until_ready(), args.reps) for k, f in fns.items()}
        row["torch_ms"] = _median_ms(lambda: torch.linalg.solve(at, rt), args.reps)
        row["native_err"] = float(np.abs(np.asarray(fns["native"](aj, rj), np.float64) - exact).max())
        row["jax_err"] = float(np.abs(np.asarray(fns["jax"](aj, rj), np.float64) - exact).max())
        row["torch_err"] = float(np.abs(torch.linalg.solve(at, rt).numpy().astype(np.float64) - exact).max())
        res["stacks"][f"{blocks}x{b}"] = row
        print(f"{blocks:6d} x {b}x{b}: native {row['native_ms']:7.1f} ms (err {row['native_err']:.1e})  "
              f"jax solve {row['jax_ms']:7.1f} ms (err {row['jax_err']:.1e})  "
              f"torch solve {row['torch_ms']:7.1f} ms  jax matmul {row['matmul_ms']:6.1f} ms  "
              f"jax/native {row['jax_ms'] / row['native_ms']:.1f}x", flush=True)
    common.write_json("experiments_c_solve_native", res)
    return res


if __name__ == "__main__":
    main()
