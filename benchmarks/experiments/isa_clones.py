"""How the compiled kernels run when built for each instruction set.

    python -m benchmarks.experiments.isa_clones [--sizes 20,40,64] [--blocks 320] [--reps 10]

``solve.cc`` compiles ``kernels.inc`` twice: for AVX-512 (namespace ``wide``, 8 doubles per
vector, tiles for 32 registers) and for AVX2 with FMA (``narrow``, 4 doubles, tiles for 16), and
every call runs the one the CPU has. An AVX-512 CPU runs AVX2 code as well, so this measures
both on one machine, and a third build: the AVX-512 code compiled for AVX2 (a copy of
``solve.cc`` with the wide build's target pragma changed), which is what one code compiled with
``target_clones("avx512f", "avx2", "default")`` would run on AVX2 CPUs. It builds
``isa_clones.cc`` (a C++ harness calling the fast merge ``CayleyF32`` and the exact merge
``GeodesicF32`` on one core, FTZ/DAZ as in XLA) with g++ and the vendored XLA FFI headers and
prints microseconds per block, with the same blocks (``common.random_skew_blocks``, t = 0.6,
curve_over_id) for every build; then, on the same core, the package's ``merge()`` per block with
XLA alone, with the kernels, and with the AVX2 build (``ORTHOFUSE_JAX_ISA=avx2``). The AVX-512 code
compiled for AVX2 was 7x (fast) and 22x (exact) slower than AVX-512 at b = 40, slower than XLA.
The two builds' exact merge is also timed with the log and the exponential in place of its direct
power (the harness's ``log_exp`` mode: no power tiers).
Writes ``results/experiments_isa_clones.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from .. import common

SOLVE = Path(__file__).resolve().parents[2] / "orthofuse_jax" / "_native" / "solve.cc"
INCLUDE = SOLVE.parent / "include"
WIDE_TARGET = '#pragma GCC target("avx512f")'
# name: (the wide build's target pragma, or None for solve.cc as it is; the build the harness calls)
BUILDS = {"avx512": (None, "wide"), "avx2": (None, "narrow"),
          "avx512 code for avx2": ('#pragma GCC target("avx2")', "wide")}


def _inputs(d: Path, sizes, blocks: int) -> None:
    from orthofuse_jax.geometry.polynomial import kernel_attributes

    from orthofuse_jax.fusion.merge import _MATMUL_SQUARINGS

    attrs = kernel_attributes(_MATMUL_SQUARINGS)
    with open(d / "attrs.txt", "w") as f:
        for key in ("log_coef", "exp_coef", "params", "power"):
            v = np.asarray(attrs[key], np.float64)
            f.write(f"{len(v)} " + " ".join(repr(float(x)) for x in v) + "\n")
    rng = np.random.default_rng(0)
    for n in sizes:
        for name in ("x1", "x2"):
            common.random_skew_blocks(rng, (blocks,), n).astype(np.float32).tofile(d / f"{name}_{n}.bin")


def xla_worker(sizes, blocks: int, reps: int) -> dict:
    """Microseconds per block of ``merge()`` in this process (the caller sets ``ORTHOFUSE_JAX_NATIVE``
    and the core): the same two merges through the public API, on ``blocks`` blocks per size."""
    from orthofuse_jax.fusion import merge

    out = {}
    for n in sizes:
        layers = max(1, blocks // (2 * common.NB))  # L and R stacks of nb blocks each
        a1, a2 = common.make_adapter_pair({n: layers})
        row = {"n": n}
        for name, kw in (("fast", dict(method="cayley")), ("exact", dict(method="geodesic"))):
            m = common.time_fn(lambda: common.block(merge([a1, a2], t=0.6, restore="cayley", **kw)), reps=reps)
            row[f"{name}_us"] = m["median"] / (2 * common.NB * layers) * 1e6
        out[n] = row
    return out


def harness_parser(doc: str) -> argparse.ArgumentParser:
    """The options of the C++ harnesses' drivers (this one and ``stages``)."""
    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    p.add_argument("--sizes", default="20,40,64")
    p.add_argument("--blocks", type=int, default=320)
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--core", type=int, default=0, help="taskset core")
    return p


def build_harness(cc: Path, exe: Path, src: Path = SOLVE, build: str = "wide") -> None:
    """Compiles the harness ``cc`` (which includes ``src``, a ``solve.cc``, and ``harness.h``) into ``exe``."""
    subprocess.run(["g++", "-std=c++17", "-O3", "-pthread", "-Wno-psabi", "-isystem", str(INCLUDE),
                    "-I", str(SOLVE.parent), f'-DSRC="{src}"', f"-DBUILD={build}", "-o", str(exe), str(cc)],
                   check=True)


def main(argv=None) -> None:
    p = harness_parser(__doc__)
    p.add_argument("--worker", choices=["0", "1"], help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]
    if args.worker:
        print(json.dumps(xla_worker(sizes, args.blocks, max(5, args.reps // 2))))
        return
    source = SOLVE.read_text()
    if source.count(WIDE_TARGET) != 1:
        raise SystemExit(f"{SOLVE}: the pragma {WIDE_TARGET} was not found; update this experiment")
    res = {"machine": common.machine(), "blocks": args.blocks, "reps": args.reps, "builds": {}}
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        _inputs(d, sizes, args.blocks)
        for name, (pragma, build) in BUILDS.items():
            stem = re.sub(r"[^a-z0-9]", "_", name)
            src = SOLVE
            if pragma is not None:  # a copy; -I finds the kernels.inc it includes
                src = d / f"solve_{stem}.cc"
                src.write_text(source.replace(WIDE_TARGET, pragma))
            exe = d / f"harness_{stem}"
            build_harness(Path(__file__).with_suffix(".cc"), exe, src, build)
            # the exact merge as it is (the direct power) and, for the two builds, with the log and
            # the exponential instead (the exact merge's older form)
            for mode in ("power", "log_exp") if pragma is None else ("power",):
                label = name if mode == "power" else f"{name}, log and exp"
                res["builds"][label] = []
                for n in sizes:
                    out = subprocess.run(["taskset", "-c", str(args.core), str(exe), str(d), str(n), str(args.reps),
                                          str(args.blocks), mode], check=True, capture_output=True, text=True).stdout
                    row = json.loads(out)
                    res["builds"][label].append(row)
                    print(f"{label:20s} b = {n:3d}: fast merge {row['fast_us']:8.2f} us/block, exact merge "
                          f"{row['exact_us']:8.2f} us/block ({row['declined']} declined)", flush=True)
    # the package's merge() on the same core: XLA alone (ORTHOFUSE_JAX_NATIVE=0) and with the kernels
    for native, isa, name in (("0", "", "merge(), XLA"), ("1", "", "merge(), kernels"),
                              ("1", "avx2", "merge(), avx2 build")):
        env = {**os.environ, "ORTHOFUSE_JAX_NATIVE": native, "ORTHOFUSE_JAX_THREADS": "1", "ORTHOFUSE_JAX_ISA": isa}
        cmd = ["taskset", "-c", str(args.core), sys.executable, "-m", "benchmarks.experiments.isa_clones"]
        out = subprocess.run([*cmd, "--worker", native, "--sizes", args.sizes, "--blocks", str(args.blocks),
                              "--reps", str(args.reps)], check=True, capture_output=True, text=True, env=env,
                             cwd=Path(__file__).resolve().parents[2]).stdout
        res["builds"][name] = list(json.loads(out.strip().splitlines()[-1]).values())
        for row in res["builds"][name]:
            print(f"{name:20s} b = {row['n']:3d}: fast merge {row['fast_us']:8.2f} us/block, exact merge "
                  f"{row['exact_us']:8.2f} us/block", flush=True)
    path = common.write_json("experiments_isa_clones", res)
    print(f"written {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
