"""Scaling of the merges: block size at a fixed parameter count, and number of layers.

    python -m benchmarks.scaling [--reps 5] [--baseline-reps 5] [--part blocks|layers|both] [--pin-core 0]

* ``blocks``: b in {8, 16, 32, 64, 128} with nb = 32 and a fixed number of parameters per stack
  (``layers * nb * b^2 = 2^22`` floats, i.e. 2048 / 512 / 128 / 32 / 8 layers).
* ``layers``: 1 to 560 layers drawn proportionally from the SDXL inventory (b = 20 / 40 / 64).

Each point times ours (``merge`` fast and exact, as in :mod:`benchmarks.merge_sdxl`) and the PyTorch
baseline presets side by side, after checking that their outputs agree to 1e-4. Writes
``benchmarks/results/scaling.json`` and prints tables.
"""

from __future__ import annotations

import argparse
import gc
import sys

from . import common
from .merge_sdxl import PARITY_TOL, _ours, _restack, _torch_inputs

BLOCK_SIZES = (8, 16, 32, 64, 128)
FIXED_FLOATS = 2**22
LAYER_COUNTS = (1, 8, 56, 140, 280, 560)


def layers_inventory(k: int) -> dict[int, int]:
    """``k`` layers split like the SDXL inventory (60/360/140 of b = 20/40/64), at least one layer."""
    total = sum(common.SDXL_INVENTORY.values())
    inv = {b: round(n * k / total) for b, n in common.SDXL_INVENTORY.items()}
    inv[40] += k - sum(inv.values())
    return {b: n for b, n in inv.items() if n > 0}


def measure(
    inventory: dict[int, int], *, t: float, reps: int, baseline_reps: int, full: bool
) -> dict:
    from . import reference_torch as ref

    c_np, s_np = common.make_pair(inventory, seed=0)
    a1, a2 = common.to_adapter(c_np), common.to_adapter(s_np)
    c_pt, c_layers = _torch_inputs(c_np)
    s_pt, s_layers = _torch_inputs(s_np)
    fast, exact = _ours("cayley", "cayley"), _ours("geodesic", "cayley")
    # Parity against the baseline algorithm in float64 (its float32 eig is off by ~1e-4 itself).
    dbl = lambda d: {b: (L.double(), R.double()) for b, (L, R) in d.items()}
    par = {
        "fast": common.max_abs_diff(
            common.adapter_stacks(fast(a1, a2, t)),
            {
                b: (L.numpy(), R.numpy())
                for b, (L, R) in ref.moft_merge_fast(dbl(c_pt), dbl(s_pt), t).items()
            },
        )
    }
    if full:
        base64 = ref.moft_merge(
            [(L.double(), R.double()) for L, R in c_layers],
            [(L.double(), R.double()) for L, R in s_layers],
            t,
        )
        par["exact"] = common.max_abs_diff(
            common.adapter_stacks(exact(a1, a2, t)), _restack(base64, c_np)
        )
    bad = {k: v for k, v in par.items() if not v <= PARITY_TOL}
    if bad:
        raise SystemExit(f"PARITY FAILURE (> {PARITY_TOL}) at {inventory}: {bad}")
    tm = {
        "ours.fast": common.time_fn(lambda: common.block(fast(a1, a2, t)), reps=reps),
        "ours.exact": common.time_fn(lambda: common.block(exact(a1, a2, t)), reps=reps),
        "baseline.fast": common.time_fn(
            lambda: ref.moft_merge_fast(c_pt, s_pt, t), reps=baseline_reps
        ),
    }
    if full:
        tm["baseline.full"] = common.time_fn(
            lambda: ref.moft_merge(c_layers, s_layers, t), reps=baseline_reps
        )
    gc.collect()
    return {"inventory": inventory, "parity": par, "timings": tm}


def _row(label, pt):
    tm = pt["timings"]
    g = lambda k: tm[k]["median"] if k in tm else None
    ratio = lambda a, b: f"{g(a) / g(b):.1f}x" if g(a) and g(b) else "-"
    return [
        label,
        common.fmt_s(g("ours.fast")),
        common.fmt_s(g("ours.exact")),
        common.fmt_s(g("baseline.fast")),
        common.fmt_s(g("baseline.full")),
        ratio("baseline.fast", "ours.fast"),
        ratio("baseline.full", "ours.exact"),
        ratio("ours.exact", "ours.fast"),
    ]


HEADER = [
    "",
    "ours fast",
    "ours exact",
    "baseline fast",
    "baseline full",
    "fast speed-up",
    "exact speed-up",
    "ours exact/fast",
]


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--baseline-reps", type=int, default=5)
    p.add_argument("--t", type=float, default=0.6)
    p.add_argument("--part", choices=["blocks", "layers", "both"], default="both")
    p.add_argument("--block-sizes", default=",".join(map(str, BLOCK_SIZES)))
    p.add_argument("--layer-counts", default=",".join(map(str, LAYER_COUNTS)))
    p.add_argument(
        "--fixed-floats",
        type=int,
        default=FIXED_FLOATS,
        help="floats per L (or R) stack in 'blocks'",
    )
    p.add_argument(
        "--no-baseline-full", action="store_true", help="skip the per-layer eig baseline"
    )
    p.add_argument("--out", default="scaling")
    p.add_argument(
        "--pin-core",
        type=int,
        default=None,
        help="run ours and the baseline on this one CPU core with 1 torch thread (as merge_sdxl)",
    )
    args = p.parse_args(argv)
    if args.pin_core is not None:
        common.pin_to_core(args.pin_core)
    res = {"machine": common.machine(), "args": vars(args), "blocks": {}, "layers": {}}
    full = not args.no_baseline_full
    if args.part in ("blocks", "both"):
        rows = []
        for b in map(int, args.block_sizes.split(",")):
            layers = max(1, args.fixed_floats // (common.NB * b * b))
            pt = measure(
                {b: layers}, t=args.t, reps=args.reps, baseline_reps=args.baseline_reps, full=full
            )
            res["blocks"][b] = pt
            rows.append(_row(f"b={b} ({layers} layers)", pt))
            print(rows[-1], flush=True)
            common.write_json(args.out, res)
        print(common.table(rows, HEADER))
    if args.part in ("layers", "both"):
        rows = []
        for k in map(int, args.layer_counts.split(",")):
            pt = measure(
                layers_inventory(k),
                t=args.t,
                reps=args.reps,
                baseline_reps=args.baseline_reps,
                full=full,
            )
            res["layers"][k] = pt
            rows.append(_row(f"{k} layers", pt))
            print(rows[-1], flush=True)
            common.write_json(args.out, res)
        print(common.table(rows, HEADER))
    path = common.write_json(args.out, res)
    print(f"written {path}")
    return res


if __name__ == "__main__":
    main(sys.argv[1:])
