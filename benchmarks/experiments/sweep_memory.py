"""How much of the 16-point sweep's time is the operating system handing over fresh memory.

    python -m benchmarks.experiments.sweep_memory [--reps 5] [--warmup 3] [--inventory 20:60,...]

A sweep of the SDXL adapters returns 4.8 GB (16 points x L and R x 150 MB), 16 times a merge's
output. Where freed memory goes back to the system (glibc returns allocations above 32 MB with
``munmap``) and, on a virtual machine, from the guest to the host (free page reporting), every
call faults its output in afresh: system time, counted in the sweep's wall time but not in its
arithmetic. This runs the exact merge and the sweep with ``merge_sdxl``'s protocol (``common.time_fn``:
the previous result is alive during the next call) in two fresh processes, side by side:

* ``default``: the process as a user runs it.
* ``retain``: glibc told to keep freed memory in the process (``MALLOC_MMAP_MAX_=0``: no
  allocation of its own ``mmap``, ``MALLOC_TRIM_THRESHOLD_`` 64 GiB: the heap never shrinks), so
  that once the heap holds two results (the warm-up calls) the next calls reuse pages that are
  already faulted in. A knob of the C library for the whole process, not something orthofuse-jax
  sets: the process keeps its high-water mark of memory. (``MALLOC_MMAP_THRESHOLD_`` cannot do
  this: glibc ignores values above 32 MB, and one SDXL stack's sweep output is 100-900 MB.)

In both, a third row times the same sweep writing into the previous call's result
(``sweep(..., reuse=previous)``: its memory donated, no glibc knob needed).

Each prints wall, user and system time (medians) and the sweep / merge ratio (target: at most 4).
Writes ``results/experiments_sweep_memory.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

from .. import common

RETAIN = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(64 * 2**30)}


def worker(reps: int, warmup: int, inventory) -> dict:
    from orthofuse_jax.fusion.merge import merge, sweep

    a1, a2 = common.make_adapter_pair(inventory)
    ts = np.linspace(0.0, 1.0, 16).astype(np.float32)
    out = {}
    def swept(a1, a2, ts, reuse=None):
        return sweep(a1, a2, ts, method="geodesic", restore="cayley", reuse=reuse)

    for name, fn in (("merge", lambda: common.block(merge([a1, a2], t=0.6, method="geodesic", restore="cayley"))),
                     ("sweep", lambda: common.block(swept(a1, a2, ts))),
                     ("sweep_reuse", None)):
        fn = fn or common.reusing_sweep(swept, a1, a2, ts)  # made after the plain sweeps' results are gone
        out[name] = common.time_fn(fn, reps=reps, warmup=warmup)  # the first compiles
        out[name]["user"] = out[name]["cpu_median"] - out[name]["sys_median"]
    out["sweep_over_merge"] = out["sweep"]["median"] / out["merge"]["median"]
    out["sweep_reuse_over_merge"] = out["sweep_reuse"]["median"] / out["merge"]["median"]
    out["user_ratio"] = out["sweep"]["user"] / out["merge"]["user"]
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=3, help="untimed calls first, in both processes")
    p.add_argument("--inventory", default=None, help="b:layers,... (default: full SDXL)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    inventory = common.parse_inventory(args.inventory) if args.inventory else common.SDXL_INVENTORY
    if args.worker:
        print(json.dumps(worker(args.reps, args.warmup, inventory)))
        return
    res = {"machine": common.machine(), "reps": args.reps, "warmup": args.warmup, "inventory": inventory,
           "environment": RETAIN, "runs": {}}
    extra = ["--reps", str(args.reps), "--warmup", str(args.warmup)]
    extra += ["--inventory", args.inventory] if args.inventory else []
    for name, env in (("default", {}), ("retain", RETAIN)):
        saved = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        try:
            r = common.run_worker("benchmarks.experiments.sweep_memory", ["--worker", *extra])
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
        res["runs"][name] = r
        m, s, u = r["merge"], r["sweep"], r["sweep_reuse"]
        part = lambda x: (f"{common.fmt_s(x['median'])} (user {common.fmt_s(x['user'])}, "  # noqa: E731
                          f"sys {common.fmt_s(x['sys_median'])})")
        print(f"{name:8s} merge {part(m)}  sweep {part(s)}  sweep/merge {r['sweep_over_merge']:.2f} "
              f"(user time {r['user_ratio']:.2f})  sweep(reuse=) {part(u)}  / merge "
              f"{r['sweep_reuse_over_merge']:.2f}", flush=True)
    path = common.write_json("experiments_sweep_memory", res)
    print(f"written {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
