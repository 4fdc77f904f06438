"""Full SDXL merge: ours (orthofuse_jax) vs the reference algorithm (PyTorch baseline), side by side.

    python -m benchmarks.merge_sdxl [--reps 5] [--baseline-reps 5] [--t 0.6] [--sweep-points 16]

Workload: two adapters with the full SDXL inventory -- 560 GS layers, nb = 32,
b = 20 / 40 / 64 for 60 / 360 / 140 layers, L and R each -- raw Cayley parameters whose block
rotations are 0.1 to 1 rad, float32 (about 0.3 GB per adapter).

Rows (medians of ``--reps`` runs after one warm-up run; compile time separately):

* ``fast``   ours ``merge(method="cayley", restore="cayley")``  vs baseline preset ``moft_merge_fast``
* ``exact``  ours ``merge(method="geodesic", restore="cayley")`` vs baseline preset ``moft_merge``
  (per-layer ``torch.linalg.eig`` loop, 560 sequential calls)
* ``exact (restore=exact)`` ours with the exact spectral restoration ``exp(f log Y)``
* ``exact, algorithm="eigh"`` ours with the spectral (``eigh``) geodesic instead of the default
  product-only log/exp (``merge(..., algorithm="matmul")`` is what ``auto`` picks for float32);
  on ``--device cuda`` only with ``--eigh-row``
* ``sweep``  ours ``sweep(..., 16 points, method="geodesic", restore="cayley")`` (vmapped over t);
  each call's result is new memory (the previous one stays alive while it runs, as in
  ``common.time_fn``)
* ``sweep, reuse=``  the same sweep, each call writing into the previous call's result
  (``sweep(..., reuse=last)``, donated), as a loop over many sweeps would; CPU only

Before anything is timed the outputs of ours and the baseline are compared (max abs difference over
every block); the run fails if it exceeds 1e-4. Peak resident memory of our exact merge is measured
in a fresh subprocess. Writes ``benchmarks/results/merge_sdxl.json`` and prints a markdown table.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time

import numpy as np

from . import common

PARITY_TOL = 1e-4
F32_SANITY_TOL = 1e-3

TARGETS = {
    "fast_speedup_min": 5.0,
    "exact_speedup_min": 10.0,
    "exact_over_fast_max": 2.0,
    "sweep16_over_single_max": 4.0,
    "exact_peak_rss_gb_max": 2.5,
}
GPU_TARGETS = {"exact_max_s": 0.050, "fast_max_s": 0.010}
"""The absolute GPU targets (full SDXL inventory)."""


def _ours(method: str, restore: str, algorithm: str = "auto"):
    from orthofuse_jax.fusion.merge import merge

    def run(a1, a2, t):
        return merge([a1, a2], t=t, method=method, restore=restore, algorithm=algorithm)

    return run


def _ours_jit(method: str, restore: str):
    import jax

    from orthofuse_jax.fusion.merge import merge

    return jax.jit(lambda a1, a2, t: merge([a1, a2], t=t, method=method, restore=restore))


def _ours_sweep(method: str, restore: str):
    from orthofuse_jax.fusion.merge import sweep

    def run(a1, a2, ts, reuse=None):
        return sweep(a1, a2, ts, method=method, restore=restore, reuse=reuse)

    return run


def _torch_inputs(stacks, device: str = "cpu"):
    import torch

    per_b = {
        b: (torch.from_numpy(L).to(device), torch.from_numpy(R).to(device))
        for b, (L, R) in stacks.items()
    }
    layers = [(L[i], R[i]) for b, (L, R) in per_b.items() for i in range(L.shape[0])]
    return per_b, layers


def _restack(layers, stacks):
    """Per-layer baseline outputs back to ``{b: (L, R)}`` in the workload's order."""
    out, i = {}, 0
    for b, (L, _) in stacks.items():
        n = L.shape[0]
        out[b] = (
            np.stack([layers[i + j][0].cpu().numpy() for j in range(n)]),
            np.stack([layers[i + j][1].cpu().numpy() for j in range(n)]),
        )
        i += n
    return out


# ---------------------------------------------------------------------------------------------
# Subprocess worker: peak RSS of one of our merges on a freshly built workload.


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _vm_hwm() -> int | None:
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def worker_rss(which: str, t: float, sweep_points: int, inventory) -> dict:
    import jax

    # ru_maxrss survives fork+exec on Linux (it starts at the parent's RSS), so the peak is read from
    # VmHWM after resetting it here.
    hwm_ok = _reset_peak()
    peak = lambda: _vm_hwm() if hwm_ok else common.peak_rss_bytes()
    # Build each stack and hand it to JAX immediately, so generation never holds two copies.
    inputs = common.make_adapter_pair(inventory)
    rss_inputs = common.rss_bytes()
    peak_build = peak()
    if which == "sweep":
        fn = _ours_sweep("geodesic", "cayley")
        arg = np.linspace(0.0, 1.0, sweep_points).astype(np.float32)
    else:
        method, restore = {
            "exact": ("geodesic", "cayley"),
            "exact_restore": ("geodesic", "exact"),
            "fast": ("cayley", "cayley"),
        }[which]
        fn = _ours(method, restore)
        arg = t
    # The peak of building the inputs (float64 chunks of the random generator) is not the merge's.
    hwm_ok = hwm_ok and _reset_peak()
    out = jax.block_until_ready(fn(inputs[0], inputs[1], arg))  # first call: includes compilation
    peak_first = peak()
    del out
    gc.collect()
    reset = _reset_peak()
    out = jax.block_until_ready(fn(inputs[0], inputs[1], arg))
    peak_second = _vm_hwm() if reset else None
    out_bytes = sum(s.L.nbytes + s.R.nbytes for s in out.stacks.values())
    return {
        "which": which,
        "rss_after_inputs": rss_inputs,
        "peak_while_building_inputs": peak_build,
        "peak_first_call": peak_first,
        "peak_second_call": peak_second,
        "output_bytes": out_bytes,
        "input_bytes": sum(s.L.nbytes + s.R.nbytes for a in inputs for s in a.stacks.values()),
    }


# ---------------------------------------------------------------------------------------------


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--reps", type=int, default=5, help="timed repetitions of our merges (>= 5)")
    p.add_argument(
        "--baseline-reps", type=int, default=5, help="timed repetitions of the baseline (>= 5)"
    )
    p.add_argument("--t", type=float, default=0.6)
    p.add_argument("--sweep-points", type=int, default=16)
    p.add_argument("--skip-rss", action="store_true")
    p.add_argument(
        "--skip-sweep",
        action="store_true",
        help="no sweep row (its first call compiles for minutes on a GPU)",
    )
    p.add_argument(
        "--no-jit",
        action="store_true",
        help="with --device cuda: no jit(merge) rows (minutes of compiling)",
    )
    p.add_argument(
        "--eigh-row",
        action="store_true",
        help="also time the exact merge with algorithm='eigh' (always on for --device cpu)",
    )
    p.add_argument(
        "--with-jit",
        action="store_true",
        help="also time jax.jit(merge) as one program, using the executables whose compile time is "
        "always reported (on with --device cuda)",
    )
    p.add_argument(
        "--skip-baseline-full", action="store_true", help="debug only: no per-layer eig baseline"
    )
    p.add_argument("--worker", choices=["rss"], help=argparse.SUPPRESS)
    p.add_argument("--which", default="exact", help=argparse.SUPPRESS)
    p.add_argument(
        "--inventory",
        default=None,
        help="debug: 'b:layers,...' instead of the SDXL inventory, e.g. 20:6,40:36,64:14",
    )
    p.add_argument(
        "--pin-core",
        type=int,
        default=None,
        help="run everything (ours, baseline, RSS workers) on this one CPU core with 1 torch thread: "
        "robust, apples-to-apples numbers on a machine shared with other jobs",
    )
    p.add_argument("--out", default="merge_sdxl")
    p.add_argument(
        "--results-dir",
        default=None,
        help="write the JSON and markdown here instead of benchmarks/results",
    )
    p.add_argument(
        "--device",
        choices=["cpu", "cuda"],
        default="cpu",
        help="cuda: ours on JAX's GPU, the baseline on torch's; adds jit(merge) rows and the GPU targets, "
        "reports GPU memory instead of RSS",
    )
    p.add_argument(
        "--baseline-full-reps",
        type=int,
        default=None,
        help="timed repetitions of the per-layer eig baseline (default --baseline-reps); its parity "
        "call doubles as the warm-up; 0: report the parity call itself as the one measurement",
    )
    p.add_argument(
        "--parity-layers",
        type=int,
        default=None,
        help="check the exact merge against the float64 baseline (run on the CPU) on only the first "
        "K layers of each block size; the float32 baseline is still compared on all",
    )
    p.add_argument(
        "--triton-gemm",
        action="store_true",
        help="with --device cuda: keep XLA's default autotuned Triton products instead of cuBLAS (what "
        "the command line picks, orthofuse_jax._runtime.prefer_cublas_gemm): minutes more compiling",
    )
    args = p.parse_args(argv)
    if args.device == "cuda" and not args.triton_gemm:
        from orthofuse_jax._runtime import prefer_cublas_gemm

        prefer_cublas_gemm()
    if args.results_dir:
        common.RESULTS_DIR = __import__("pathlib").Path(args.results_dir)
    cuda = args.device == "cuda"
    if cuda:
        args.with_jit, args.skip_rss = not args.no_jit, True
    inventory = (
        common.SDXL_INVENTORY if not args.inventory else common.parse_inventory(args.inventory)
    )
    if args.pin_core is not None:
        # The RSS worker runs only our merge: importing torch there would add its 0.2 GB to the peak.
        common.pin_to_core(args.pin_core, torch_threads=args.worker is None)

    if args.worker == "rss":
        res = worker_rss(args.which, args.t, args.sweep_points, inventory)
        print(json.dumps(res))
        return res

    import jax
    import torch

    from . import reference_torch as ref

    t = args.t
    info = common.machine()
    info["device"] = args.device
    info["xla_flags"] = os.environ.get("XLA_FLAGS", "")
    info["device_kind"] = jax.devices()[0].device_kind
    if cuda:
        if jax.default_backend() != "gpu" or not torch.cuda.is_available():
            raise SystemExit(
                f"--device cuda needs JAX and torch on a GPU (jax backend {jax.default_backend()}, "
                f"torch.cuda.is_available() {torch.cuda.is_available()})"
            )
        info["torch_device"] = torch.cuda.get_device_name(0)
    print(
        f"# merge_sdxl on {info['cpu_model']} x{info['cpu_count']}, {args.device} {info['device_kind']}, "
        f"kernels {info['kernels']}, jax {info['jax']}, torch {info['torch']}, load {info['load1']:.2f}",
        flush=True,
    )
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    c_np, s_np = common.make_pair(inventory, seed=0)
    a1, a2 = common.to_adapter(c_np), common.to_adapter(s_np)
    c_pt, c_layers = _torch_inputs(c_np, args.device)
    s_pt, s_layers = _torch_inputs(s_np, args.device)
    n_layers = sum(L.shape[0] for L, _ in c_np.values())
    print(
        f"# workload: {n_layers} layers, inventory {inventory}, nb {common.NB}, "
        f"{sum(L.nbytes + R.nbytes for L, R in c_np.values()) / 2**20:.0f} MiB per adapter",
        flush=True,
    )

    ours = {
        "fast": _ours("cayley", "cayley"),
        "exact": _ours("geodesic", "cayley"),
        "exact_restore": _ours("geodesic", "exact"),
    }
    if args.device == "cpu" or args.eigh_row:
        ours["exact_eigh"] = _ours("geodesic", "cayley", "eigh")
    ours_jit = {
        k: _ours_jit(*mr)
        for k, mr in {
            "fast": ("cayley", "cayley"),
            "exact": ("geodesic", "cayley"),
            "exact_restore": ("geodesic", "exact"),
        }.items()
    }
    sweep_fn = _ours_sweep("geodesic", "cayley")
    ts = np.linspace(0.0, 1.0, args.sweep_points).astype(np.float32)
    results: dict = {
        "machine": info,
        "args": vars(args),
        "targets": TARGETS,
        "workload": {
            "layers": n_layers,
            "inventory": inventory,
            "nb": common.NB,
            "angle_range": common.ANGLE_RANGE,
            "dtype": "float32",
            "t": t,
        },
    }

    # ---- compile times (ahead of time; the jitted whole-merge wrappers). On a GPU this takes minutes,
    # so it runs after our eager rows there: a time limit then still leaves those.
    comp, compiled = {}, {}

    def compile_jit():
        for k, f in ours_jit.items():
            comp[k] = common.compile_time(f, a1, a2, np.float32(t), keep=compiled, key=k)
            print(f"# compile jit({k}): {common.fmt_s(comp[k]['total'])}", flush=True)
            common.write_json(args.out, results)

    if not cuda:
        compile_jit()
    # merge() itself runs per-stack jitted kernels; its first call = compile + run.
    first = {}
    for k, f in ours.items():
        t0 = time.perf_counter()
        common.block(f(a1, a2, t))
        first[k] = time.perf_counter() - t0
        print(f"# first call of merge() {k}: {common.fmt_s(first[k])}", flush=True)
    if not args.skip_sweep:
        t0 = time.perf_counter()
        common.block(sweep_fn(a1, a2, ts))
        first["sweep"] = time.perf_counter() - t0
    results["compile"] = {"jit_whole_merge": comp, "first_call_of_merge": first}
    common.write_json(args.out, results)  # partial results survive a time limit
    if comp:
        print(
            "# compile (jit whole merge, lower+compile): "
            + ", ".join(f"{k} {common.fmt_s(v['total'])}" for k, v in comp.items()),
            flush=True,
        )

    # ---- parity before timing. The baseline's float32 complex eig is itself off by up to ~1e-4 (its
    # float32 vs float64 outputs differ by 6e-5 on a 14-layer workload), so ours (float32) is checked
    # against the same baseline algorithm run in float64 on the same inputs; the float32-vs-float32
    # difference is reported too, with a looser sanity bound.
    dbl = lambda d: {b: (L.double(), R.double()) for b, (L, R) in d.items()}
    np_of = lambda d: {b: (L.cpu().numpy(), R.cpu().numpy()) for b, (L, R) in d.items()}
    t0 = time.perf_counter()
    base_fast = ref.moft_merge_fast(c_pt, s_pt, t)
    sync()
    base_fast_first = time.perf_counter() - t0
    ours_fast = common.adapter_stacks(ours["fast"](a1, a2, t))
    parity = {
        "fast": common.max_abs_diff(ours_fast, np_of(ref.moft_merge_fast(dbl(c_pt), dbl(s_pt), t))),
        "fast_vs_f32_baseline": common.max_abs_diff(ours_fast, np_of(base_fast)),
    }
    print(
        f"# parity fast  (ours cayley+cayley vs moft_merge_fast): max abs diff {parity['fast']:.3g} "
        f"(vs float32 baseline {parity['fast_vs_f32_baseline']:.3g})",
        flush=True,
    )

    def check(parity):
        bad = {
            k: v
            for k, v in parity.items()
            if k != "exact_layers_checked_per_size"
            and not v <= (F32_SANITY_TOL if k.endswith("_f32_baseline") else PARITY_TOL)
        }
        if bad:
            common.write_json(args.out, results)
            raise SystemExit(f"PARITY FAILURE (> {PARITY_TOL}): {bad}; stopped")

    def baseline_full_first_call():
        """The per-layer eig baseline (float32, on the device) once: its first call, and parity vs ours."""
        t0 = time.perf_counter()
        base_full = ref.moft_merge(c_layers, s_layers, t)
        sync()
        first = time.perf_counter() - t0
        print(f"# baseline full, first call: {common.fmt_s(first)}", flush=True)
        ours_exact = common.adapter_stacks(ours["exact"](a1, a2, t))
        parity["exact_vs_f32_baseline"] = common.max_abs_diff(ours_exact, _restack(base_full, c_np))
        print(
            f"# parity exact vs float32 baseline: max abs diff {parity['exact_vs_f32_baseline']:.3g}",
            flush=True,
        )
        return first

    base_full_first = None
    if args.parity_layers:
        # The float64 check runs on the CPU on K layers per size, before anything is timed; the
        # device's float32 baseline (minutes on a GPU) runs after our timings, so a time limit
        # that stops it still leaves our rows.
        k = args.parity_layers
        ours_exact = common.adapter_stacks(ours["exact"](a1, a2, t))
        sub = {b: (L[:k], R[:k]) for b, (L, R) in c_np.items()}
        cpu64 = lambda st: _torch_inputs(
            {b: (L[:k].astype(np.float64), R[:k].astype(np.float64)) for b, (L, R) in st.items()}
        )[1]
        base64 = _restack(ref.moft_merge(cpu64(c_np), cpu64(s_np), t), sub)
        parity["exact"] = common.max_abs_diff(
            {b: (L[:k], R[:k]) for b, (L, R) in ours_exact.items()}, base64
        )
        parity["exact_layers_checked_per_size"] = k
        print(
            f"# parity exact (ours geodesic+cayley vs moft_merge, float64, {k} layers per size): "
            f"max abs diff {parity['exact']:.3g}",
            flush=True,
        )
        del base64, ours_exact
    elif not args.skip_baseline_full:
        base_full_first = baseline_full_first_call()
        ours_exact = common.adapter_stacks(ours["exact"](a1, a2, t))
        base64 = ref.moft_merge(
            [(L.double(), R.double()) for L, R in c_layers],
            [(L.double(), R.double()) for L, R in s_layers],
            t,
        )
        parity["exact"] = common.max_abs_diff(ours_exact, _restack(base64, c_np))
        print(
            f"# parity exact (ours geodesic+cayley vs moft_merge): max abs diff {parity['exact']:.3g} "
            f"(vs float32 baseline {parity['exact_vs_f32_baseline']:.3g})",
            flush=True,
        )
        del base64, ours_exact
    # ours jit == ours eager (on a GPU after the compile, further down)
    if args.with_jit and not cuda:
        parity["jit_vs_eager_exact"] = common.max_abs_diff(
            common.adapter_stacks(compiled["exact"](a1, a2, np.float32(t))),
            common.adapter_stacks(ours["exact"](a1, a2, t)),
        )
    if (
        not cuda and not args.skip_sweep
    ):  # (on a GPU one more sweep shape would cost another compile of minutes)
        sw = sweep_fn(a1, a2, np.asarray([t], np.float32))
        parity["sweep_vs_merge_exact"] = common.max_abs_diff(
            {s.b: (np.asarray(s.L[0]), np.asarray(s.R[0])) for s in sw.stacks.values()},
            common.adapter_stacks(ours["exact"](a1, a2, t)),
        )
        del sw
    del base_fast, ours_fast
    if "exact_eigh" in ours:  # the two geodesic algorithms agree (both were checked in the tests)
        parity["exact_eigh_vs_exact"] = common.max_abs_diff(
            common.adapter_stacks(ours["exact_eigh"](a1, a2, t)),
            common.adapter_stacks(ours["exact"](a1, a2, t)),
        )
    results["parity"] = parity
    results["parity_tol"] = PARITY_TOL
    check(parity)
    gc.collect()
    common.write_json(args.out, results)

    # ---- timings
    tm = {}

    results["timings"] = tm

    def run(name, fn, reps):
        tm[name] = common.time_fn(fn, reps=reps)
        print(
            f"  {name:32s} median {common.fmt_s(tm[name]['median'])}  (cpu {common.fmt_s(tm[name]['cpu_median'])}, "
            f"sys {common.fmt_s(tm[name]['sys_median'])}, load {tm[name]['load1_before']:.1f})",
            flush=True,
        )
        common.write_json(args.out, results)

    run("ours.fast", lambda: common.block(ours["fast"](a1, a2, t)), args.reps)
    run("ours.exact", lambda: common.block(ours["exact"](a1, a2, t)), args.reps)
    run("ours.exact_restore", lambda: common.block(ours["exact_restore"](a1, a2, t)), args.reps)
    if "exact_eigh" in ours:
        run("ours.exact_eigh", lambda: common.block(ours["exact_eigh"](a1, a2, t)), args.reps)
    tf = np.float32(t)
    if not args.skip_sweep:
        run("ours.sweep", lambda: common.block(sweep_fn(a1, a2, ts)), args.reps)
        if not cuda:
            run("ours.sweep_reuse", common.reusing_sweep(sweep_fn, a1, a2, ts), args.reps)
    if cuda and args.with_jit:
        compile_jit()
        parity["jit_vs_eager_exact"] = common.max_abs_diff(
            common.adapter_stacks(compiled["exact"](a1, a2, np.float32(t))),
            common.adapter_stacks(ours["exact"](a1, a2, t)),
        )
        check(parity)
    if args.with_jit:
        # the ahead-of-time executables of the compile step: nothing is compiled twice
        run("ours.jit.fast", lambda: common.block(compiled["fast"](a1, a2, tf)), args.reps)
        run("ours.jit.exact", lambda: common.block(compiled["exact"](a1, a2, tf)), args.reps)
        run(
            "ours.jit.exact_restore",
            lambda: common.block(compiled["exact_restore"](a1, a2, tf)),
            args.reps,
        )
    gc.collect()

    def baseline(fn):
        def call():
            out = fn()
            sync()
            return out

        return call

    run("baseline.fast", baseline(lambda: ref.moft_merge_fast(c_pt, s_pt, t)), args.baseline_reps)
    if not args.skip_baseline_full:
        if base_full_first is None:  # --parity-layers: its first call and float32 parity come now
            base_full_first = baseline_full_first_call()
            check(parity)
        # The parity call was its warm-up (it runs 560 eig calls: minutes on some machines).
        if args.baseline_full_reps == 0:
            tm["baseline.full"] = {
                "median": base_full_first,
                "min": base_full_first,
                "max": base_full_first,
                "cpu_median": None,
                "reps": 1,
                "warmup": 0,
                "times": [base_full_first],
                "note": "the parity call (the first call) is the one measurement",
            }
        else:
            tm["baseline.full"] = common.time_fn(
                baseline(lambda: ref.moft_merge(c_layers, s_layers, t)),
                reps=args.baseline_full_reps or args.baseline_reps,
                warmup=0,
            )
        print(
            f"  {'baseline.full':32s} median {common.fmt_s(tm['baseline.full']['median'])}",
            flush=True,
        )
    results["timings"] = tm
    if cuda:
        stats = jax.devices()[0].memory_stats() or {}
        results["gpu_memory"] = {
            "jax_peak_bytes_in_use": stats.get("peak_bytes_in_use"),
            "torch_max_memory_allocated": torch.cuda.max_memory_allocated(),
        }
    results["baseline_first_call"] = {
        "fast": base_fast_first,
        "full": None if args.skip_baseline_full else base_full_first,
    }
    a1 = a2 = None  # free the stacks before the reference runs
    gc.collect()

    # ---- peak RSS in fresh processes
    rss = {}
    if not args.skip_rss:
        for which in ("exact", "fast"):
            rss[which] = common.run_worker(
                "benchmarks.merge_sdxl",
                ["--worker", "rss", "--which", which, "--t", str(t)]
                + ([] if args.pin_core is None else ["--pin-core", str(args.pin_core)])
                + (["--inventory", args.inventory] if args.inventory else []),
            )
            print(
                f"  peak RSS {which}: {rss[which]['peak_second_call'] / 2**30:.2f} GiB (first call "
                f"{rss[which]['peak_first_call'] / 2**30:.2f} GiB, inputs resident "
                f"{rss[which]['rss_after_inputs'] / 2**30:.2f} GiB)",
                flush=True,
            )
    results["rss"] = rss

    # ---- ratios and targets
    med = lambda k: tm[k]["median"] if k in tm else None
    r = {
        "fast_speedup": med("baseline.fast") / med("ours.fast"),
        "exact_speedup": (med("baseline.full") / med("ours.exact"))
        if "baseline.full" in tm
        else None,
        "exact_over_fast": med("ours.exact") / med("ours.fast"),
        "exact_eigh_over_exact": (med("ours.exact_eigh") / med("ours.exact"))
        if "ours.exact_eigh" in tm
        else None,
        "exact_restore_over_fast": med("ours.exact_restore") / med("ours.fast"),
        "sweep_over_single": (med("ours.sweep") / med("ours.exact"))
        if "ours.sweep" in tm
        else None,
        "sweep_reuse_over_single": (med("ours.sweep_reuse") / med("ours.exact"))
        if "ours.sweep_reuse" in tm
        else None,
        "exact_peak_rss_gb": (
            max(rss["exact"]["peak_first_call"], rss["exact"]["peak_second_call"] or 0) / 1e9
        )
        if rss
        else None,
    }
    results["ratios"] = r
    met = {
        "fast_speedup>=5": r["fast_speedup"] >= TARGETS["fast_speedup_min"],
        "exact_speedup>=10": None
        if r["exact_speedup"] is None
        else r["exact_speedup"] >= TARGETS["exact_speedup_min"],
        "exact<=2x_fast": r["exact_over_fast"] <= TARGETS["exact_over_fast_max"],
        "sweep16<=4x_single": None
        if r["sweep_over_single"] is None
        else r["sweep_over_single"] <= TARGETS["sweep16_over_single_max"],
        "exact_peak_rss<=2.5GB": None
        if r["exact_peak_rss_gb"] is None
        else r["exact_peak_rss_gb"] <= TARGETS["exact_peak_rss_gb_max"],
    }
    if cuda:
        jit_or = lambda k: med(f"ours.jit.{k}") or med(f"ours.{k}")
        r["gpu_exact_s"], r["gpu_fast_s"] = jit_or("exact"), jit_or("fast")
        met["gpu_exact<50ms"] = r["gpu_exact_s"] < GPU_TARGETS["exact_max_s"]
        met["gpu_fast<10ms"] = r["gpu_fast_s"] < GPU_TARGETS["fast_max_s"]
        for k in ("exact_peak_rss<=2.5GB",):
            met.pop(k)
    results["targets_met"] = met
    path = common.write_json(args.out, results)
    text = render_table(results)
    m = results["machine"]
    head = (
        f"`python -m benchmarks.merge_sdxl` -- {m['date_utc']}, {m['cpu_model']} x{m['cpu_count']} "
        f"({m['memory_total_gb']} GB), compiled kernels {m.get('kernels')}, jax {m['jax']}, "
        f"torch {m['torch']} ({m['torch_threads']} threads), "
        f"load average at start {m['load1']:.2f}"
    )
    (common.RESULTS_DIR / f"{args.out}.md").write_text(head + "\n\n" + text + "\n")
    print()
    print(text)
    print(f"\nwritten {path} and {args.out}.md")
    return results


def render_table(res: dict) -> str:
    tm, r, comp = res["timings"], res["ratios"], res["compile"]["jit_whole_merge"]
    g = lambda k: common.fmt_s(tm[k]["median"]) if k in tm else "-"

    def cpu(k):  # process CPU time, and its system part (faulting in fresh memory) where recorded
        if k not in tm or tm[k].get("cpu_median") is None:
            return "-"
        sys_ = tm[k].get("sys_median")
        return common.fmt_s(tm[k]["cpu_median"]) + (
            f" (sys {common.fmt_s(sys_)})" if sys_ is not None else ""
        )

    ct = lambda k: common.fmt_s(comp[k]["total"]) if k in comp else "-"
    rows = [
        [
            "fast: Cayley space + curve_over_id",
            g("ours.fast"),
            cpu("ours.fast"),
            g("ours.jit.fast"),
            ct("fast"),
            g("baseline.fast"),
            f"{r['fast_speedup']:.2f}x",
        ],
        [
            "exact: geodesic + curve_over_id",
            g("ours.exact"),
            cpu("ours.exact"),
            g("ours.jit.exact"),
            ct("exact"),
            g("baseline.full"),
            f"{r['exact_speedup']:.2f}x" if r["exact_speedup"] else "-",
        ],
        [
            'exact, algorithm="eigh"',
            g("ours.exact_eigh"),
            cpu("ours.exact_eigh"),
            "-",
            "-",
            g("baseline.full"),
            f"{tm['baseline.full']['median'] / tm['ours.exact_eigh']['median']:.2f}x"
            if "ours.exact_eigh" in tm and "baseline.full" in tm
            else "-",
        ],
        [
            "exact: geodesic + exact restoration",
            g("ours.exact_restore"),
            cpu("ours.exact_restore"),
            g("ours.jit.exact_restore"),
            ct("exact_restore"),
            "-",
            "-",
        ],
        [
            f"sweep: {res['args']['sweep_points']} t, geodesic + curve_over_id",
            g("ours.sweep"),
            cpu("ours.sweep"),
            "-",
            "-",
            "-",
            "-",
        ],
    ]
    if "ours.sweep_reuse" in tm:
        rows.append(
            [
                "the same sweep, into the previous result (reuse=)",
                g("ours.sweep_reuse"),
                cpu("ours.sweep_reuse"),
                "-",
                "-",
                "-",
                "-",
            ]
        )
    wl = res["workload"]
    label = f"merge ({wl['layers']} layers{', full SDXL' if wl['layers'] == 560 else ''}, f32)"
    out = [
        common.table(
            rows,
            [
                label,
                "ours merge()",
                "ours CPU time",
                "ours jit(merge)",
                "compile",
                "baseline (torch)",
                "speed-up",
            ],
        )
    ]
    met = res["targets_met"]
    rss = r["exact_peak_rss_gb"]
    trows = [
        ["fast: baseline / ours >= 5", f"{r['fast_speedup']:.2f}", met["fast_speedup>=5"]],
        [
            "exact: baseline / ours >= 10",
            f"{r['exact_speedup']:.2f}" if r["exact_speedup"] else "-",
            met["exact_speedup>=10"],
        ],
        ["exact / fast (ours) <= 2", f"{r['exact_over_fast']:.2f}", met["exact<=2x_fast"]],
        [
            "sweep 16 t / single t <= 4",
            f"{r['sweep_over_single']:.2f}" if r["sweep_over_single"] else "-",
            met["sweep16<=4x_single"],
        ],
    ]
    if r.get("sweep_reuse_over_single"):
        trows.append(
            ["(sweep with reuse= / single t)", f"{r['sweep_reuse_over_single']:.2f}", None]
        )
    if "exact_peak_rss<=2.5GB" in met:
        trows.append(
            [
                "peak RSS exact merge <= 2.5 GB",
                f"{rss:.2f} GB" if rss else "-",
                met["exact_peak_rss<=2.5GB"],
            ]
        )
    if "gpu_exact<50ms" in met:
        trows += [
            ["GPU: exact merge < 50 ms", common.fmt_s(r["gpu_exact_s"]), met["gpu_exact<50ms"]],
            ["GPU: fast merge < 10 ms", common.fmt_s(r["gpu_fast_s"]), met["gpu_fast<10ms"]],
        ]
    out.append(
        common.table(
            [[a, b, {True: "met", False: "MISSED", None: "-"}[c]] for a, b, c in trows],
            ["target", "measured", ""],
        )
    )
    out.append(
        "parity (max abs diff, ours vs baseline): "
        + ", ".join(f"{k} {v:.2g}" for k, v in res["parity"].items())
    )
    return "\n\n".join(out)


if __name__ == "__main__":
    main(sys.argv[1:])
