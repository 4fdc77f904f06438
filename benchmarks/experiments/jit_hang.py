"""Minimal case: ``jax.jit`` of the WHOLE merge (all stacks, L and R, in one XLA program) stalls on CPU.

    python -m benchmarks.experiments.jit_hang [--inventory 20:2,40:4,64:2] [--mode jit|eager] [--timeout 240]
    taskset -c 1 python -m benchmarks.experiments.jit_hang        # pinned to one core: runs

Observed on the 2-core benchmark machine (jax 0.10.2, loaded by other jobs): ``merge()`` (eager
wrapper, one jitted kernel per stack and side) takes 0.23 s for 8 layers; the same merge inside
one ``jax.jit`` was still in ``block_until_ready`` after 240 s -- but ran in 0.14 s when the process
was pinned to a single core. Compilation finishes (about 14 s); it is the execution that stalls.
docs/math.md §9 reports the same symptom for Cayley solve -> eigh -> Cayley solve in one jit.
The script dumps the Python stack and exits when the timeout expires.
"""

from __future__ import annotations

import argparse
import faulthandler
import sys
import time

import numpy as np

from .. import common


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--inventory", default="20:2,40:4,64:2")
    p.add_argument("--mode", choices=["jit", "eager"], default="jit")
    p.add_argument("--method", choices=["exact", "fast"], default="exact")
    p.add_argument("--timeout", type=int, default=240)
    args = p.parse_args(argv)
    faulthandler.dump_traceback_later(args.timeout, exit=True)
    import jax

    from ..merge_sdxl import _ours, _ours_jit

    c, s = common.make_pair(common.parse_inventory(args.inventory))
    a1, a2 = common.to_adapter(c), common.to_adapter(s)
    mr = {"exact": ("geodesic", "cayley"), "fast": ("cayley", "cayley")}[args.method]
    f = _ours_jit(*mr) if args.mode == "jit" else _ours(*mr)
    for i in range(3):
        t0 = time.perf_counter()
        jax.block_until_ready(f(a1, a2, np.float32(0.6)))
        print(f"{args.method} {args.mode} call {i}: {time.perf_counter() - t0:.3f} s", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
