"""The 16-point sweep on a GPU: the spectral path (``algorithm="eigh"``) against the product-only
one (``"matmul"``: the exponential per t, vmapped), next to one exact merge.

    python3 -m benchmarks.experiments.gpu_sweep [--out DIR] [--reps 5]

Why: on the CPU a sweep now takes the product-only path (one compiled pass per block: the log
once, then the Taylor coefficients of the geodesic); on a GPU, where that kernel does not run, the
XLA composition for "matmul" evaluates an exponential per t (about 13 products) where "eigh" pays
one batched ``eigh`` per stack (1-3 us a block on an H100) and 3 products per t. This measures
which one ``sweep(algorithm="auto")`` should take there. Eager calls (each stack's kernel jitted),
full SDXL inventory, float32; first call (compile + run) and the median of ``--reps``; the largest
difference between the two sweeps. Writes ``experiments_gpu_sweep.json`` into ``--out``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import orthofuse_jax  # noqa: F401  (first: runtime flags before JAX starts)

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import common
from orthofuse_jax.fusion.merge import merge, sweep


def _timed(f, reps: int):
    r = common.first_and_median(f, reps)
    return {"first_s": round(r["first"], 3), "median_s": round(r["median"], 5)}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", default=str(common.RESULTS_DIR))
    p.add_argument("--reps", type=int, default=5)
    args = p.parse_args(argv)
    a1, a2 = common.make_adapter_pair()
    ts = np.linspace(0.0, 1.0, 16).astype(np.float32)
    res = {"device": str(jax.devices()[0]), "jax": jax.__version__}
    out = Path(args.out) / "experiments_gpu_sweep.json"

    def save():
        out.write_text(json.dumps(res, indent=2))
        print(json.dumps(res), flush=True)

    res["merge_exact"] = _timed(lambda: merge([a1, a2], t=0.6, restore="cayley"), args.reps)
    save()
    sweeps = {}
    for algorithm in ("matmul", "eigh"):
        res[f"sweep_{algorithm}"] = _timed(lambda: sweep(a1, a2, ts, restore="cayley", algorithm=algorithm), args.reps)
        sweeps[algorithm] = sweep(a1, a2, ts, restore="cayley", algorithm=algorithm)
        save()
    diff = 0.0
    for k in sweeps["eigh"].stacks:
        for w in ("L", "R"):
            d = jnp.max(jnp.abs(getattr(sweeps["eigh"].stacks[k], w) - getattr(sweeps["matmul"].stacks[k], w)))
            diff = max(diff, float(d))
    res["max_abs_diff_matmul_vs_eigh"] = diff
    for algorithm in ("matmul", "eigh"):
        res[f"ratio_{algorithm}"] = round(res[f"sweep_{algorithm}"]["median_s"] / res["merge_exact"]["median_s"], 2)
    save()
    return res


if __name__ == "__main__":
    main()
