"""A hand-written CPU kernel for the merges' small solves (``c_solve.c``) vs jaxlib's and torch's.

    taskset -c 1 python -m benchmarks.experiments.c_solve [--reps 7]

Needs gcc. Compiles ``c_solve.c`` into a temporary folder, loads it with ctypes and times it on
the L stack of each SDXL block size (1920 x 20x20, 11520 x 40x40, 4480 x 64x64; the Cayley
matrices ``I - S``, ``I + S`` of rotations of 0.1-1 rad) against ``jnp.linalg.solve`` (jaxlib's
LAPACK: OpenBLAS ``getrf`` + ``trsm``) and ``torch.linalg.solve`` (MKL), one thread each, with the
error of each against float64 numpy. The question it answers: how much of the CPU merges' time
is the LAPACK calls' own inefficiency (RESULTS.md). The kernel is not used by the library:
calling it from ``jit`` would take an XLA FFI custom call, a compiled extension in the package.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import subprocess
import tempfile
import time

import numpy as np

from .. import common

STACKS = [(1920, 20), (11520, 40), (4480, 64)]


def build(folder: str) -> ctypes.CDLL:
    src = os.path.join(os.path.dirname(__file__), "c_solve.c")
    lib = os.path.join(folder, "libc_solve.so")
    subprocess.run(["gcc", "-O3", "-shared", "-fPIC", "-o", lib, src], check=True)
    dll = ctypes.cdll.LoadLibrary(lib)
    ptr = ctypes.c_void_p
    dll.solve_f32.argtypes = [ptr, ptr, ptr, ctypes.c_long, ctypes.c_long, ctypes.c_long, ptr]
    return dll


def _median_ms(fn, reps: int) -> float:
    fn()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return 1e3 * float(np.median(ts))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reps", type=int, default=7)
    args = p.parse_args(argv)
    import jax
    import jax.numpy as jnp
    import torch

    torch.set_num_threads(1)
    res = {"machine": common.machine(), "args": vars(args), "stacks": {}}
    with tempfile.TemporaryDirectory() as folder:
        dll = build(folder)
        for blocks, b in STACKS:
            s = common.random_skew_blocks(np.random.default_rng(b), (blocks,), b)
            eye = np.eye(b, dtype=np.float32)
            a, r = np.ascontiguousarray(eye - s), np.ascontiguousarray(eye + s)
            exact = np.linalg.solve(a.astype(np.float64), r.astype(np.float64))
            x = np.empty_like(r)
            work = np.empty(b * 2 * b * 16, np.float32)

            def c_solve():
                dll.solve_f32(a.ctypes.data, r.ctypes.data, x.ctypes.data, blocks, b, b, work.ctypes.data)

            aj, rj = jnp.asarray(a), jnp.asarray(r)
            jsolve, jmm = jax.jit(jnp.linalg.solve), jax.jit(jnp.matmul)
            at, rt = torch.from_numpy(a.copy()), torch.from_numpy(r.copy())
            row = {
                "c_gauss_jordan_ms": _median_ms(c_solve, args.reps),
                "jax_solve_ms": _median_ms(lambda: jsolve(aj, rj).block_until_ready(), args.reps),
                "torch_solve_ms": _median_ms(lambda: torch.linalg.solve(at, rt), args.reps),
                "jax_matmul_ms": _median_ms(lambda: jmm(aj, rj).block_until_ready(), args.reps),
            }
            c_solve()
            row["c_err"] = float(np.abs(x - exact).max())
            row["jax_err"] = float(np.abs(np.asarray(jsolve(aj, rj), np.float64) - exact).max())
            row["torch_err"] = float(np.abs(torch.linalg.solve(at, rt).numpy().astype(np.float64) - exact).max())
            res["stacks"][f"{blocks}x{b}"] = row
            print(f"{blocks:6d} x {b}x{b}: C {row['c_gauss_jordan_ms']:7.1f} ms (err {row['c_err']:.1e})  "
                  f"jax solve {row['jax_solve_ms']:7.1f} ms (err {row['jax_err']:.1e})  "
                  f"torch solve {row['torch_solve_ms']:7.1f} ms  jax matmul {row['jax_matmul_ms']:6.1f} ms  "
                  f"jax/C {row['jax_solve_ms'] / row['c_gauss_jordan_ms']:.1f}x", flush=True)
    common.write_json("experiments_c_solve", res)
    return res


if __name__ == "__main__":
    main()
