"""Peak resident memory and CPU time of one merge on the full SDXL inventory, in a fresh process.

    python -m benchmarks.experiments.rss_merge [--which exact] [--calls 4] [--stages] [--inventory 20:60,...]

The parent starts a worker (``--worker``) that builds the two raw-parameter adapters stack by stack
(as ``merge_sdxl --worker rss`` does), then calls the merge ``--calls`` times. For each call it
reports the peak RSS (``VmHWM``, reset before the call through ``/proc/self/clear_refs``; the
number the memory target bounds) and the process CPU time (``time.process_time``). The first call includes
compilation. ``--preconvert`` reproduces the old whole-adapter conversion for an A/B comparison.
With ``--stages`` every per-stack kernel call is blocked on and followed by a line
with the current and peak RSS, so the peak can be attributed to a stack (diagnostic only: the
blocking changes the timing).
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time

import numpy as np

from .. import common
from ..merge_sdxl import _reset_peak, _vm_hwm

OPTIONS = {
    "exact": ("geodesic", "cayley"),
    "exact_restore": ("geodesic", "exact"),
    "fast": ("cayley", "cayley"),
}


def _trace_kernels(log):
    """Wrap merge's per-stack kernels so each call is finished and followed by an RSS line."""
    import importlib

    import jax

    m = importlib.import_module("orthofuse_jax.fusion.merge")  # the package re-exports merge() under that name

    for name in ("_stack_inputs", "_pair_kernel", "_run_chunked"):
        kernel = getattr(m, name)

        def traced(*args, _kernel=kernel, _name=name, **kwargs):
            out = jax.block_until_ready(_kernel(*args, **kwargs))
            shape = tuple(out[0].shape)
            log.append({"kernel": _name, "shape": shape, "rss": common.rss_bytes(), "peak": _vm_hwm()})
            return out

        setattr(m, name, traced)


def worker(args) -> dict:
    import jax

    from orthofuse_jax.fusion.adapter import to_orthogonal
    from orthofuse_jax.fusion.merge import merge

    inventory = common.SDXL_INVENTORY if not args.inventory else common.parse_inventory(args.inventory)
    _reset_peak()
    base = common.rss_bytes()
    inputs = common.make_adapter_pair(inventory)
    rss_inputs = common.rss_bytes()
    peak_build = _vm_hwm()
    method, restore = OPTIONS[args.which]
    log: list = []
    if args.stages:
        _trace_kernels(log)
    calls = []
    for i in range(args.calls):
        gc.collect()
        _reset_peak()
        before = common.rss_bytes()
        c0, w0 = time.process_time(), time.perf_counter()
        xs = [to_orthogonal(a) for a in inputs] if args.preconvert else inputs
        out = jax.block_until_ready(merge(xs, t=args.t, method=method, restore=restore))
        del xs
        cpu, wall = time.process_time() - c0, time.perf_counter() - w0
        calls.append({"peak": _vm_hwm(), "rss_before": before, "rss_after": common.rss_bytes(), "cpu": cpu,
                      "wall": wall, "stages": log[:]})
        log.clear()
        del out
    return {
        "which": args.which,
        "rss_at_start": base,
        "rss_after_inputs": rss_inputs,
        "peak_while_building_inputs": peak_build,
        "input_bytes": sum(s.L.nbytes + s.R.nbytes for a in inputs for s in a.stacks.values()),
        "calls": calls,
    }


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--which", choices=sorted(OPTIONS), default="exact")
    p.add_argument("--calls", type=int, default=4)
    p.add_argument("--t", type=float, default=0.6)
    p.add_argument("--stages", action="store_true")
    p.add_argument("--preconvert", action="store_true",
                   help="map both whole adapters through Cay before merge() (what merge() did before it "
                        "converted one stack at a time): the A/B comparison for the exact merge")
    p.add_argument("--inventory", default=None)
    p.add_argument("--pin-core", type=int, default=None)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.pin_core is not None:
        common.pin_to_core(args.pin_core, torch_threads=False)
    if args.worker:
        res = worker(args)
        print(json.dumps(res))
        return res
    fwd = [a for a in (argv if argv is not None else sys.argv[1:])]
    res = common.run_worker("benchmarks.experiments.rss_merge", ["--worker", *fwd])
    gib = lambda x: f"{x / 1e9:.2f} GB"  # noqa: E731
    print(f"# {res['which']}: inputs {gib(res['input_bytes'])}, RSS at start {gib(res['rss_at_start'])}, "
          f"after building inputs {gib(res['rss_after_inputs'])} (peak {gib(res['peak_while_building_inputs'])})")
    for i, c in enumerate(res["calls"]):
        print(f"  call {i}: peak {gib(c['peak'])}, RSS before {gib(c['rss_before'])} after {gib(c['rss_after'])}, "
              f"cpu {c['cpu']:.2f} s, wall {c['wall']:.2f} s")
        for s in c["stages"]:
            print(f"    {s['kernel']} {s['shape']}: rss {gib(s['rss'])} peak {gib(s['peak'])}")
    cpus = [c["cpu"] for c in res["calls"][1:]]
    if cpus:
        print(f"  peak over calls {gib(max(c['peak'] for c in res['calls']))}; "
              f"median cpu of calls 2.. {np.median(cpus):.2f} s ({', '.join(f'{x:.2f}' for x in cpus)})")
    return res


if __name__ == "__main__":
    main(sys.argv[1:])
