"""Where a block's time goes in the compiled merges, step by step, on one core.

    python -m benchmarks.experiments.stages [--sizes 20,40,64] [--blocks 320] [--reps 10]

Builds ``stages.cc`` (a C++ harness including ``orthofuse_jax/_native/solve.cc``) with g++ and the
vendored XLA FFI headers, and runs the AVX-512 build's fast merge (``CayleyBlocks``) and exact
merge (``GeodesicBlocks``: float32, the direct power, curve_over_id, t = 0.6) with a clock read
between their steps, on the same blocks as ``isa_clones`` (``common.random_skew_blocks``), plus one
inversion in double, one float product and the range check alone as units. Prints microseconds
per block (the minimum over repetitions of each step's total) and writes
``results/experiments_stages.json``. The harness repeats the kernels' steps rather than calling
them: keep it in step with ``kernels.inc``.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

from .. import common
from .isa_clones import _inputs, build_harness, harness_parser


def main(argv=None) -> None:
    args = harness_parser(__doc__).parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]
    res = {"machine": common.machine(), "blocks": args.blocks, "reps": args.reps, "sizes": []}
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        _inputs(d, sizes, args.blocks)
        exe = d / "stages"
        build_harness(Path(__file__).with_suffix(".cc"), exe)
        for n in sizes:
            out = subprocess.run(["taskset", "-c", str(args.core), str(exe), str(d), str(n), str(args.reps),
                                  str(args.blocks)], check=True, capture_output=True, text=True).stdout
            res["sizes"].append(json.loads(out))
    names = list(res["sizes"][0]["us"])
    print(f"{'us per block, one core':55s}" + "".join(f"{'b = ' + str(r['n']):>10s}" for r in res["sizes"]))
    for name in names:
        print(f"{name:55s}" + "".join(f"{r['us'][name]:10.2f}" for r in res["sizes"]))
    for label, prefix in (("fast merge, sum of its steps", "fast:"), ("exact merge, sum of its steps", "exact:")):
        print(f"{label:55s}" + "".join(
            f"{sum(v for k, v in r['us'].items() if k.startswith(prefix)):10.2f}" for r in res["sizes"]))
    path = common.write_json("experiments_stages", res)
    print(f"written {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
