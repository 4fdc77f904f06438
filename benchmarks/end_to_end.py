"""The commands as a user runs them: whole processes, cold and warm compilation cache, side by side
with the reference's own process.

    python -m benchmarks.end_to_end [--reps 5] [--sweep-reps 3] [--out DIR]

Every measurement is a separate process started the way a user starts it (the ``orthofuse-jax``
script beside this Python, or ``python -c`` for imports); its wall time and peak resident memory
(``wait4``'s ``ru_maxrss`` of that process alone) are recorded, and the table gives medians.
Inputs: the full SDXL demo pair (560 GS layers, two 303 MB files, the adapters of
``orthofuse-jax demo --full-sdxl``). The reference process is ``python -m benchmarks.reference_torch``: torch
loads both files, merges them with the reference's algorithm and saves the result. Ours and the
reference alternate, rep by rep, so that both see the same machine state.

"Cold" is a fresh compilation cache folder per run (a new machine, or right after
``pip install``); "warm" shares one folder filled by an untimed first run. The number of compiled
programs a cold run writes to the cache is counted (one file per program). Floors, for targets a
command misses: ``import jax`` alone, and the 16-point sweep's eigenvalues alone (one t of
``eigvalsh`` over every SDXL block, times 16). Output: a table on stdout and
``benchmarks/results/end_to_end.json``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .common import machine, table, write_json

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = str(Path(sys.executable).with_name("orthofuse-jax"))

TARGETS = {
    "fuse_warm": "<= 4 s and >= 6x the reference process",
    "fuse_cold": "<= 12 s",
    "fuse_cayley_warm": "<= 3 s",
    "sweep16_warm": "<= 4x fuse_warm, peak RSS <= 3 GB",
    "demo_warm": "<= 10 s",
    "demo_cold": "<= 20 s",
    "fuse_peak_rss": "<= 1.3 GB",
    "import": "<= 0.5 s beyond import jax",
    "help": "< 1 s",
}


def run(cmd: list[str], env: dict[str, str], cwd: str | None = None) -> dict:
    """Run ``cmd`` to completion: its wall time, peak RSS (``wait4``: this child alone) and output;
    a non-zero exit fails the benchmark."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=out, stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read().decode(), err.read().decode()
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited with {proc.returncode}:\n{stderr[-3000:]}")
    return {
        "wall_s": wall,
        "peak_rss_gb": usage.ru_maxrss * 1024 / 1e9,
        "stdout": stdout,
        "stderr": stderr,
    }


def summary(runs: list[dict]) -> dict:
    walls = [r["wall_s"] for r in runs]
    return {
        "median_s": statistics.median(walls),
        "min_s": min(walls),
        "max_s": max(walls),
        "runs_s": walls,
        "peak_rss_gb": max(r["peak_rss_gb"] for r in runs),
        "n": len(runs),
    }


def eigvalsh_floor(n_t: int = 16, reps: int = 3) -> dict:
    """The sweep's floor: one t's values-only ``eigvalsh`` of every SDXL block (numpy's LAPACK, as
    the sweep runs it, one thread), times ``n_t``. Random symmetric blocks of the SDXL sizes."""
    import numpy as np

    from .common import NB, SDXL_INVENTORY

    rng = np.random.default_rng(0)
    blocks = {
        b: rng.standard_normal((2 * layers * NB, b, b)).astype(np.float32)
        for b, layers in SDXL_INVENTORY.items()
    }
    blocks = {b: x + np.swapaxes(x, -1, -2) for b, x in blocks.items()}
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for x in blocks.values():
            np.linalg.eigvalsh(x)
        times.append(time.perf_counter() - t0)
    one = statistics.median(times)
    return {
        "one_t_s": one,
        "n_t": n_t,
        "floor_s": one * n_t,
        "blocks_per_t": sum(len(x) for x in blocks.values()),
    }


def count_programs(cache: Path) -> int:
    return sum(
        1 for p in cache.rglob("*") if p.is_file() and not p.name.endswith(("-atime", ".lock"))
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--reps", type=int, default=5, help="runs per measurement (median; default 5)"
    )
    parser.add_argument(
        "--sweep-reps", type=int, default=3, help="runs of the 16-point sweep (default 3)"
    )
    parser.add_argument(
        "--out", default=None, help="work folder (default: a temporary one, removed after)"
    )
    parser.add_argument(
        "--skip", default="", help="comma list of measurements to skip (e.g. sweep16_warm)"
    )
    args = parser.parse_args(argv)
    skip = set(filter(None, args.skip.split(",")))
    work = Path(args.out or tempfile.mkdtemp(prefix="orthofuse-e2e-"))
    work.mkdir(parents=True, exist_ok=True)
    base_env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("ORTHOFUSE_JAX_COMPILE_CACHE", "JAX_COMPILATION"))
    }
    base_env["PYTHONPATH"] = str(ROOT) + os.pathsep + base_env.get("PYTHONPATH", "")
    warm_cache = work / "cache-warm"

    def env(cache: Path) -> dict[str, str]:
        return {**base_env, "ORTHOFUSE_JAX_COMPILE_CACHE": str(cache)}

    cold_count = [0]

    def cold_env() -> tuple[dict[str, str], Path]:
        cold_count[0] += 1
        cache = work / f"cache-cold-{cold_count[0]}"
        shutil.rmtree(cache, ignore_errors=True)
        return env(cache), cache

    pair = work / "pair"
    if not (pair / "style.safetensors").exists():
        code = f"from orthofuse_jax.fusion.demo import write_demo_pair; write_demo_pair({str(pair)!r}, full_sdxl=True)"
        run([sys.executable, "-c", code], base_env)
    c, s = str(pair / "concept.safetensors"), str(pair / "style.safetensors")
    fuse = [SCRIPT, "fuse", c, s, "-o", str(work / "fused.safetensors"), "--t", "0.6"]
    reference = [
        sys.executable,
        "-m",
        "benchmarks.reference_torch",
        c,
        s,
        str(work / "fused_ref.safetensors"),
        "--t",
        "0.6",
    ]
    results: dict[str, dict] = {}
    out: dict[str, list[dict]] = {
        k: []
        for k in (
            "fuse_warm",
            "reference_exact",
            "fuse_cold",
            "fuse_cayley_warm",
            "reference_fast",
            "demo_warm",
            "demo_cold",
            "sweep16_warm",
            "import_jax",
            "import_orthofuse_jax",
            "import_fusion",
            "help",
        )
    }
    programs: dict[str, list[int]] = {"fuse_cold": [], "demo_cold": []}

    run(fuse, env(warm_cache))  # fills the warm cache
    run(fuse + ["--method", "cayley"], env(warm_cache))
    for rep in range(args.reps):
        print(f"rep {rep + 1}/{args.reps}", file=sys.stderr, flush=True)
        out["fuse_warm"].append(run(fuse, env(warm_cache)))
        out["reference_exact"].append(run(reference, base_env, cwd=str(ROOT)))
        out["fuse_cayley_warm"].append(run(fuse + ["--method", "cayley"], env(warm_cache)))
        out["reference_fast"].append(run(reference + ["--fast"], base_env, cwd=str(ROOT)))
        e, cache = cold_env()
        out["fuse_cold"].append(run(fuse, e))
        programs["fuse_cold"].append(count_programs(cache))
        e, cache = cold_env()
        out["demo_cold"].append(run([SCRIPT, "demo", "--out", str(work / "demo")], e))
        programs["demo_cold"].append(count_programs(cache))
        out["demo_warm"].append(run([SCRIPT, "demo", "--out", str(work / "demo")], env(warm_cache)))
        py = [sys.executable, "-c"]
        out["import_jax"].append(run(py + ["import jax"], base_env))
        out["import_orthofuse_jax"].append(run(py + ["import jax, orthofuse_jax"], base_env))
        out["import_fusion"].append(run(py + ["import jax, orthofuse_jax.fusion"], base_env))
        out["help"].append(run([SCRIPT, "--help"], base_env))
    if "sweep16_warm" not in skip:
        sweep = [SCRIPT, "sweep", c, s, "--ts", "0:1:16", "--plot", str(work / "sweep")]
        run(sweep, env(warm_cache))
        for _ in range(args.sweep_reps):
            out["sweep16_warm"].append(run(sweep, env(warm_cache)))
    for name, runs in out.items():
        if runs:
            results[name] = summary(runs)
    for name, counts in programs.items():
        results[name]["programs_compiled"] = counts
    med = {k: v["median_s"] for k, v in results.items()}
    ratios = {
        "reference_exact / fuse_warm": med["reference_exact"] / med["fuse_warm"],
        "reference_fast / fuse_cayley_warm": med["reference_fast"] / med["fuse_cayley_warm"],
        "import orthofuse_jax - import jax (s)": med["import_orthofuse_jax"] - med["import_jax"],
        "import orthofuse_jax.fusion - import jax (s)": med["import_fusion"] - med["import_jax"],
    }
    floors = {"fuse: import jax (s)": med["import_jax"]}
    if "sweep16_warm" in med:
        ratios["sweep16_warm / fuse_warm"] = med["sweep16_warm"] / med["fuse_warm"]
        floor = eigvalsh_floor()
        floors["sweep16: eigvalsh of every block at 16 t, one core (s)"] = floor["floor_s"]
        results["eigvalsh_floor"] = floor
    rows = [
        [
            k,
            f"{v['median_s']:.2f}",
            f"{v['min_s']:.2f}-{v['max_s']:.2f}",
            f"{v['peak_rss_gb']:.2f}",
            str(v.get("programs_compiled", "")),
            TARGETS.get(k, ""),
        ]
        for k, v in results.items()
    ]
    print(table(rows, ["measurement", "median s", "range s", "peak RSS GB", "programs", "target"]))
    for k, v in {**ratios, **floors}.items():
        print(f"{k}: {v:.2f}")
    payload = {
        "machine": machine(),
        "command": "python -m benchmarks.end_to_end " + " ".join(argv or sys.argv[1:]),
        "targets": TARGETS,
        "ratios": ratios,
        "floors": floors,
        "results": results,
        "fuse_stdout": out["fuse_warm"][0]["stdout"].strip() if out["fuse_warm"] else "",
    }
    print(f"wrote {write_json('end_to_end', payload)}")
    if args.out is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
