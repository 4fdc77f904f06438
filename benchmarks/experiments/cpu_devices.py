"""Can the XLA part of a CPU merge use a second core? Two merges at once, in threads, on one or two CPU devices.

    python -m benchmarks.experiments.cpu_devices [--layers 90] [--method geodesic]

Why. Importing orthofuse_jax keeps XLA's CPU pool at one thread (``PJRT_NPROC=1``: jaxlib
0.10.2's batched LAPACK kernels deadlock a larger pool, orthofuse_jax/_runtime.py). The compiled
kernels split their blocks over the cores themselves, but the exact merge is mostly XLA's batched
products (benchmarks/RESULTS.md), which then run on one core. This measures what a second core
could give them: one merge, then two merges started together from two Python threads, on the
same CPU device and on two (``--xla_force_host_platform_device_count=2``, set here in a fresh
process before JAX starts). Two merges in the time of one would be 2x.

Writes ``benchmarks/results/experiments_cpu_devices.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time

import numpy as np


def _worker(devices: int, layers: int, method: str, reps: int) -> dict:
    import orthofuse_jax

    orthofuse_jax.configure_cpu_threads()  # before JAX starts (jaxlib < 0.11)
    import jax

    from .. import common
    from orthofuse_jax.fusion import merge

    a1, a2 = common.make_adapter_pair({40: layers})
    devs = jax.devices("cpu")[:devices]
    pairs = [jax.device_put((a1, a2), d) for d in devs]

    def run(i: int) -> None:
        b1, b2 = pairs[i % len(devs)]
        with jax.default_device(devs[i % len(devs)]):
            common.block(merge([b1, b2], t=0.6, method=method, restore="cayley"))

    for i in range(2):
        run(i)  # compile on every device
    one, two = [], []
    for _ in range(reps):
        t0 = time.perf_counter()
        run(0)
        one.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        two.append(time.perf_counter() - t0)
    return {"devices": len(devs), "one_merge_s": float(np.median(one)), "two_merges_in_threads_s": float(np.median(two)),
            "throughput_gain": 2 * float(np.median(one)) / float(np.median(two))}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=90, help="40x40 layers (nb 32) per adapter")
    p.add_argument("--method", default="geodesic", choices=["geodesic", "cayley"])
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker is not None:
        print(json.dumps(_worker(args.worker, args.layers, args.method, args.reps)))
        return None
    from .. import common

    res = {"machine": common.machine(), "args": vars(args), "runs": []}
    for devices in (1, 2):
        env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
        out = subprocess.run([sys.executable, "-m", "benchmarks.experiments.cpu_devices", "--worker", str(devices),
                              "--layers", str(args.layers), "--method", args.method, "--reps", str(args.reps)],
                             env=env, check=True, capture_output=True, text=True).stdout
        row = json.loads(out.strip().splitlines()[-1])
        print(f"{devices} CPU device(s): one merge {row['one_merge_s']:.3f} s, two at once "
              f"{row['two_merges_in_threads_s']:.3f} s: {row['throughput_gain']:.2f}x the throughput", flush=True)
        res["runs"].append(row)
    common.write_json("experiments_cpu_devices", res)
    return res


if __name__ == "__main__":
    main()
