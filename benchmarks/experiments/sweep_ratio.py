"""16-point sweep vs one merge (geodesic + Cayley restoration) on a stack of b=40 layers.

Usage: ``taskset -c 1 python -m benchmarks.experiments.sweep_ratio [LAYERS]`` (default 10).
Prints (first call, median wall, median CPU) for both and the sweep / merge ratio (target:
at most 4). Pin to one core: unpinned runs on a busy machine are unreliable (RESULTS.md).
"""

from __future__ import annotations

import statistics
import sys
import time

import orthofuse_jax

orthofuse_jax.configure_cpu_threads()  # before jax starts (jaxlib < 0.11)

import jax
import numpy as np

from benchmarks.common import make_pair, to_adapter
from orthofuse_jax.fusion.merge import merge, sweep


def _timed(f, reps: int = 5):
    t0 = time.perf_counter()
    jax.block_until_ready(f())
    first = time.perf_counter() - t0
    wall, cpu = [], []
    for _ in range(reps):
        t0, c0 = time.perf_counter(), time.process_time()
        jax.block_until_ready(f())
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return round(first, 3), round(statistics.median(wall), 3), round(statistics.median(cpu), 3)


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    layers = int(argv[0]) if argv else 10
    c, s = make_pair({40: layers})
    a1, a2 = to_adapter(c), to_adapter(s)
    ts = np.linspace(0.0, 1.0, 16)
    m = _timed(lambda: merge([a1, a2], t=0.6, method="geodesic", restore="cayley").stacks)
    sw = _timed(lambda: sweep(a1, a2, ts, method="geodesic", restore="cayley").stacks)
    print(f"{layers} layers b=40: merge (first, wall, cpu) {m}  sweep16 {sw}  ratio {sw[1] / m[1]:.2f}")


if __name__ == "__main__":
    main()
