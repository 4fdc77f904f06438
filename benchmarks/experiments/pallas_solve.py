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

Status: run on an H100 (RESULTS.md): 1.3-2.7x faster than ``jnp.linalg.solve``
with 2 warps, so ``solve_pd`` uses it on CUDA devices (``orthofuse_jax/geometry/_pallas.py``, where
the kernel now lives). On a GPU this also checks ``solve_pd``'s derivatives and ``vmap`` against
``jnp.linalg.solve``'s.
"""

from __future__ import annotations

import argparse
import functools
import time

import numpy as np


@functools.lru_cache(maxsize=None)
def _jitted():
    import jax

    from orthofuse_jax.geometry import _pallas

    return jax.jit(_pallas.gauss_jordan_solve, static_argnames=("interpret", "num_warps"))


def solve_no_pivot(a, r, *, interpret: bool = False, num_warps: int = 2):
    """The package's kernel (:func:`orthofuse_jax.geometry._pallas.gauss_jordan_solve`), jitted."""
    return _jitted()(a, r, interpret=interpret, num_warps=num_warps)


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


def check_solve_pd(seed: int = 2) -> dict:
    """``solve_pd`` (the kernel on a GPU) against ``jnp.linalg.solve``: values, ``vmap``, reverse and
    forward derivatives, on 64 blocks of 40x40 (relative differences)."""
    import jax
    import jax.numpy as jnp

    from orthofuse_jax.geometry._linalg import solve_pd

    a, r = (jnp.asarray(x) for x in _cayley_inputs(np.random.default_rng(seed), 64, 40))
    w = jnp.asarray(np.random.default_rng(seed + 1).normal(size=r.shape).astype(np.float32))

    def rel(x, y):
        return float(jnp.max(jnp.abs(x - y)) / jnp.max(jnp.abs(y)))

    out = {}
    with jax.default_matmul_precision("highest"):
        out["value"] = rel(jax.jit(solve_pd)(a, r), jnp.linalg.solve(a, r))
        out["vmap"] = rel(jax.vmap(solve_pd)(a.reshape(2, 32, 40, 40), r.reshape(2, 32, 40, 40)),
                          jnp.linalg.solve(a, r).reshape(2, 32, 40, 40))
        for name, f in (("grad", solve_pd), ("grad_ref", jnp.linalg.solve)):
            out[name] = jax.jit(jax.grad(lambda a, r, f=f: jnp.sum(w * f(a, r)), argnums=(0, 1)))(a, r)
        out["grad"] = max(rel(g, h) for g, h in zip(out["grad"], out.pop("grad_ref")))
        jvp = jax.jit(lambda a, r, f: jax.jvp(f, (a, r), (w, w))[1], static_argnums=2)
        out["jvp"] = rel(jvp(a, r, solve_pd), jvp(a, r, jnp.linalg.solve))
    print(f"  solve_pd vs jnp.linalg.solve (relative): {out}", flush=True)
    return out


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
    res["solve_pd_checks"] = check_solve_pd()
    rng = np.random.default_rng(1)
    for blocks, b in [(1920, 20), (11520, 40), (4480, 64)]:
        a, r = (jnp.asarray(x) for x in _cayley_inputs(rng, blocks, b))
        row = {}
        from orthofuse_jax.geometry._linalg import solve_pd

        fns = {"jnp.linalg.solve": jax.jit(jnp.linalg.solve), "matmul": jax.jit(lambda a, r: a @ r),
               "solve_pd (package)": jax.jit(solve_pd)}
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
