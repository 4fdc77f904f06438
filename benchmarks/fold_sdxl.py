"""Fold a full SDXL-shaped GS adapter into SDXL-shaped attention kernels (random weights).

Measures, each mode in its own subprocess (so peak RSS is per mode):

* ``structured``: :func:`orthofuse_jax.models.patch_unet_params` over all 560 kernels
  (nb = 32; b = 20 / 40 / 64), first call (compile + run) and steady-state time, peak RSS
  increase over the inputs.
* ``dense``: the naive fold, per layer ``Q = gs_dense(L, R)`` (n x n) then ``(Q^T K) * s``
  (jitted per shape). Timed on a sample of layers per (n, out) class and extrapolated by the
  layer counts (``--dense-full`` runs all 560), with the structured fold timed on the same sample.

Kernels of one shape share one random buffer (the input size is not what is measured; the
output is 560 distinct kernels, ~3.8 GB in float32).

Usage: ``python benchmarks/fold_sdxl.py [--dense-sample 3] [--dense-full] [--repeats 2]``.
Writes ``benchmarks/results/fold_sdxl.json`` and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time

from orthofuse_jax.models.configs import SDXL_BASE_UNET as SDXL

NB = 32


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _setup(names=None):
    import jax
    import jax.numpy as jnp
    import numpy as np

    from orthofuse_jax.fusion.adapter import from_layers
    from orthofuse_jax.models import attention_layers

    table = attention_layers(SDXL)
    if names is not None:
        table = {n: table[n] for n in names}
    rng = np.random.default_rng(0)
    buffers, params, layers, scales = {}, {}, {}, {}
    for name, spec in table.items():
        shape = (spec.n_in, spec.n_out)
        if shape not in buffers:
            buffers[shape] = (
                jax.random.normal(jax.random.PRNGKey(len(buffers)), shape, jnp.float32) * 0.02
            )
        node = params
        for p in spec.path[:-1]:
            node = node.setdefault(p, {})
        node[spec.path[-1]] = buffers[shape]
        b = spec.n_in // NB
        A = rng.standard_normal((2, NB, b, b)).astype(np.float32) * 0.1
        layers[name] = (A[0] - A[0].swapaxes(-1, -2), A[1] - A[1].swapaxes(-1, -2))
        scales[name] = (1 + 0.1 * rng.standard_normal(spec.n_out)).astype(np.float32)
    adapter = from_layers(layers, scales, dtype=jnp.float32)
    return table, params, adapter


def worker_structured(repeats: int, names=None) -> dict:
    import jax

    from orthofuse_jax.fusion.adapter import to_orthogonal
    from orthofuse_jax.models import patch_unet_params

    table, params, adapter = _setup(names)
    adapter = to_orthogonal(adapter)
    jax.block_until_ready(adapter)
    rss0 = _rss_mb()
    t0 = time.perf_counter()
    out = patch_unet_params(params, adapter, table=table)
    jax.block_until_ready(out)
    first = time.perf_counter() - t0
    del out
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = patch_unet_params(params, adapter, table=table)
        jax.block_until_ready(out)
        times.append(time.perf_counter() - t0)
        del out
    return dict(
        layers=len(table),
        first_s=first,
        steady_s=min(times),
        peak_rss_increase_mb=_peak_mb() - rss0,
    )


def worker_dense(names) -> dict:
    import jax

    from orthofuse_jax.fusion.adapter import to_layers, to_orthogonal
    from orthofuse_jax.geometry import gs_dense

    table, params, adapter = _setup(names)
    adapter = to_orthogonal(adapter)
    blocks = to_layers(adapter)

    @jax.jit
    def fold(K, L, R, s):
        with jax.default_matmul_precision("highest"):
            Q = gs_dense(L, R)
            return (Q.T @ K) * s[None, :]

    def get(path):
        node = params
        for p in path:
            node = node[p]
        return node

    rss0 = _rss_mb()
    # compile once per shape, outside the timing
    seen = set()
    for name in table:
        spec = table[name]
        if (spec.n_in, spec.n_out) not in seen:
            seen.add((spec.n_in, spec.n_out))
            jax.block_until_ready(fold(get(spec.path), *blocks[name], adapter.scales[name]))
    per_class: dict[str, list[float]] = {}
    outs = []
    t_all = time.perf_counter()
    for name in table:
        spec = table[name]
        t0 = time.perf_counter()
        outs.append(
            jax.block_until_ready(fold(get(spec.path), *blocks[name], adapter.scales[name]))
        )
        per_class.setdefault(f"{spec.n_in}x{spec.n_out}", []).append(time.perf_counter() - t0)
    total = time.perf_counter() - t_all
    del outs
    return dict(
        layers=len(table),
        total_s=total,
        per_class_s=per_class,
        peak_rss_increase_mb=_peak_mb() - rss0,
    )


def _sample(per_class: int) -> list[str]:
    from orthofuse_jax.models import attention_layers

    table = attention_layers(SDXL)
    chosen, counts = [], {}
    for name, spec in table.items():
        key = (spec.n_in, spec.n_out)
        if counts.get(key, 0) < per_class:
            counts[key] = counts.get(key, 0) + 1
            chosen.append(name)
    return chosen


def _run_worker(mode: str, arg: str) -> dict:
    cmd = [sys.executable, __file__, "--worker", mode, "--worker-arg", arg]
    res = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument(
        "--dense-sample", type=int, default=3, help="layers per (n, out) class for the dense timing"
    )
    ap.add_argument(
        "--dense-full", action="store_true", help="time the dense fold on all 560 layers"
    )
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--worker-arg", default="", help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.worker:
        payload = json.loads(args.worker_arg) if args.worker_arg else {}
        if args.worker == "structured":
            out = worker_structured(payload.get("repeats", 2), payload.get("names"))
        else:
            out = worker_dense(payload.get("names"))
        print(json.dumps(out))
        return

    from orthofuse_jax.models import attention_layers

    table = attention_layers(SDXL)
    counts: dict[str, int] = {}
    for spec in table.values():
        key = f"{spec.n_in}x{spec.n_out}"
        counts[key] = counts.get(key, 0) + 1

    full = _run_worker("structured", json.dumps({"repeats": args.repeats}))
    names = None if args.dense_full else _sample(args.dense_sample)
    dense = _run_worker("dense", json.dumps({"names": names}))
    same = _run_worker("structured", json.dumps({"repeats": args.repeats, "names": names}))

    if args.dense_full:
        dense_total = dense["total_s"]
    else:
        dense_total = sum(counts[k] * (sum(v) / len(v)) for k, v in dense["per_class_s"].items())
    result = dict(
        machine=dict(
            platform=platform.platform(), cpus=os.cpu_count(), python=platform.python_version()
        ),
        layers=full["layers"],
        counts_by_kernel_shape=counts,
        structured_full=full,
        dense=dict(
            measured_layers=dense["layers"],
            extrapolated=not args.dense_full,
            total_s=dense_total,
            mean_per_layer_s={k: sum(v) / len(v) for k, v in dense["per_class_s"].items()},
            peak_rss_increase_mb=dense["peak_rss_increase_mb"],
        ),
        structured_on_dense_sample=same,
        ratio_dense_over_structured=dense_total / full["steady_s"],
        ratio_on_same_sample=(dense["total_s"] / same["steady_s"]),
    )
    os.makedirs(os.path.join(os.path.dirname(__file__), "results"), exist_ok=True)
    path = os.path.join(os.path.dirname(__file__), "results", "fold_sdxl.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=2)

    print(f"Fold a full SDXL GS adapter (560 kernels, nb={NB}) -- {os.cpu_count()} CPUs")
    print(f"{'method':<34}{'time (s)':>12}{'peak RSS +MB':>15}")
    print(f"{'structured, first call (+compile)':<34}{full['first_s']:>12.2f}{'':>15}")
    print(
        f"{'structured, steady':<34}{full['steady_s']:>12.2f}{full['peak_rss_increase_mb']:>15.0f}"
    )
    label = "dense per layer" + ("" if args.dense_full else " (extrapolated)")
    print(f"{label:<34}{dense_total:>12.2f}{dense['peak_rss_increase_mb']:>15.0f}")
    print(
        f"ratio dense / structured: {result['ratio_dense_over_structured']:.1f}x "
        f"(same {dense['layers']} layers measured: {result['ratio_on_same_sample']:.1f}x)"
    )
    print(
        "per-layer dense time by kernel shape (n x out):",
        {k: round(v, 4) for k, v in result["dense"]["mean_per_layer_s"].items()},
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
