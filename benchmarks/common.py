"""Shared benchmark machinery: workloads, timing, peak memory, machine description, JSON.

Timing protocol: every measured function is called once to warm up (jit compile,
allocator, caches), then ``reps >= 5`` times; we report the median wall time and, because this
machine is shared, the median process CPU time and the load average next to it. Compile time is
measured separately with ``jit(f).lower(...).compile()``. Peak resident memory is measured in a
fresh subprocess (``ru_maxrss`` of that process only), so earlier work in the parent does not
count.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import resource
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

import orthofuse_jax

orthofuse_jax.configure_cpu_threads()  # before any JAX backend starts (jaxlib < 0.11)

RESULTS_DIR = Path(__file__).resolve().parent / "results"

NB = 32
"""Blocks per GS layer in the SDXL adapters (docs/math.md §5)."""

SDXL_INVENTORY: dict[int, int] = {20: 60, 40: 360, 64: 140}
"""Block size b -> number of GS layers (each with an L and an R stack ``[32, b, b]``), docs/math.md §5."""

ANGLE_RANGE = (0.1, 1.0)
"""Rotation angles (radians) of the random adapter blocks, like trained adapters."""


# ---------------------------------------------------------------------------------------------
# Workload
# ---------------------------------------------------------------------------------------------


def random_skew_blocks(
    rng: np.random.Generator,
    shape: tuple[int, ...],
    b: int,
    *,
    angle_range: tuple[float, float] = ANGLE_RANGE,
    chunk: int = 2048,
) -> np.ndarray:
    """Skew ``S [*shape, b, b]`` (float32) whose Cayley blocks ``Cay(S)`` rotate by angles in ``angle_range``.

    ``S = V diag_2x2(sigma_k J) V^T`` with a Haar-random ``V`` (QR of a Gaussian), plane angles
    ``theta_k ~ U(angle_range)`` and ``sigma_k = tan(theta_k / 2)`` (``Cay`` doubles the half
    angle, docs/math.md §1.2). Built in float64 in chunks so the peak memory stays small.
    """
    total = int(np.prod(shape))
    out = np.empty((total, b, b), dtype=np.float32)
    half = b // 2
    for start in range(0, total, chunk):
        m = min(chunk, total - start)
        g = rng.standard_normal((m, b, b))
        q, r = np.linalg.qr(g)
        q = q * np.sign(np.diagonal(r, axis1=-2, axis2=-1))[:, None, :]
        theta = rng.uniform(*angle_range, size=(m, half))
        sigma = np.tan(theta / 2.0)
        core = np.zeros((m, b, b))
        idx = np.arange(half)
        core[:, 2 * idx, 2 * idx + 1] = sigma
        core[:, 2 * idx + 1, 2 * idx] = -sigma
        s = q @ core @ np.swapaxes(q, -1, -2)
        out[start : start + m] = 0.5 * (s - np.swapaxes(s, -1, -2))
    return out.reshape(*shape, b, b)


def layer_name(b: int, i: int) -> str:
    """Synthetic, sortable layer name for layer ``i`` of block size ``b``."""
    return f"b{b:03d}.layer{i:04d}.to_q_moft"


def make_stacks(
    inventory: Mapping[int, int] = SDXL_INVENTORY, *, nb: int = NB, seed: int = 0
) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """Raw Cayley parameters of one adapter: ``{b: (L, R)}`` with ``L, R [layers, nb, b, b]`` float32."""
    rng = np.random.default_rng(seed)
    return {
        b: (random_skew_blocks(rng, (n, nb), b), random_skew_blocks(rng, (n, nb), b))
        for b, n in sorted(inventory.items())
    }


def make_pair(inventory: Mapping[int, int] = SDXL_INVENTORY, *, nb: int = NB, seed: int = 0):
    """Concept and style stacks (seeds ``seed`` and ``seed + 1``)."""
    return make_stacks(inventory, nb=nb, seed=seed), make_stacks(inventory, nb=nb, seed=seed + 1)


def to_adapter(stacks: Mapping[int, tuple[np.ndarray, np.ndarray]]):
    """``GSAdapter`` (raw Cayley parameters) holding the same stacks, without a per-layer copy."""
    import jax.numpy as jnp

    from orthofuse_jax.fusion.adapter import GSAdapter, LayerStack, stack_key

    out = {}
    for b, (L, R) in stacks.items():
        names = tuple(layer_name(b, i) for i in range(L.shape[0]))
        out[stack_key(L.shape[1], b)] = LayerStack(L=jnp.asarray(L), R=jnp.asarray(R), names=names)
    return GSAdapter(stacks=out, scales={}, orthogonal=False)


def make_adapter_pair(inventory: Mapping[int, int] = SDXL_INVENTORY, *, nb: int = NB):
    """Two raw ``GSAdapter``s, built one stack at a time and handed to JAX at once (low peak memory)."""
    import gc

    from orthofuse_jax.fusion.adapter import GSAdapter

    inputs = []
    for seed in (0, 1):
        st = {}
        for b, n in inventory.items():
            part = make_stacks({b: n}, nb=nb, seed=seed * 1000 + b)
            st.update(to_adapter(part).stacks)
            del part
        inputs.append(GSAdapter(stacks=st, scales={}, orthogonal=False))
    gc.collect()
    return inputs


def adapter_stacks(adapter) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """``{b: (L, R)}`` numpy view of an adapter (leading axes kept)."""
    return {s.b: (np.asarray(s.L), np.asarray(s.R)) for s in adapter.stacks.values()}


def max_abs_diff(a: Mapping[int, tuple[Any, Any]], b: Mapping[int, tuple[Any, Any]]) -> float:
    """Largest ``|a - b|`` over all L and R blocks of two ``{b: (L, R)}`` mappings."""
    if sorted(a) != sorted(b):
        raise ValueError(f"block sizes differ: {sorted(a)} vs {sorted(b)}")
    worst = 0.0
    for k in a:
        for x, y in zip(a[k], b[k]):
            x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
            if x.shape != y.shape:
                raise ValueError(f"b={k}: shapes differ {x.shape} vs {y.shape}")
            worst = max(worst, float(np.max(np.abs(x - y))))
    return worst


# ---------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------


def block(x):
    """Wait for every array in a pytree (JAX async dispatch); returns ``x``."""
    import jax

    return jax.block_until_ready(x)


def time_fn(fn: Callable[[], Any], *, reps: int = 5, warmup: int = 1) -> dict[str, Any]:
    """Median wall and CPU time of ``fn()`` over ``reps`` calls after ``warmup`` calls.

    ``fn`` must block until its result is ready (wrap JAX calls with :func:`block`).
    Returns seconds: ``median``, ``min``, ``max``, ``cpu_median`` (process CPU time, all
    threads), ``sys_median`` (its system part: on a virtual machine, faulting in fresh output
    memory can cost as much as computing it), the raw ``times`` and the 1-minute load average
    before and after. The previous result stays alive while the next call runs.
    """
    if reps < 1:
        raise ValueError(f"reps must be >= 1, got {reps}")
    load0 = os.getloadavg()[0]
    result = None
    for _ in range(warmup):
        result = fn()
    wall, cpu, sys_ = [], [], []
    for _ in range(reps):
        c0, s0, t0 = time.process_time(), os.times().system, time.perf_counter()
        result = fn()
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
        sys_.append(os.times().system - s0)
    del result
    return {
        "median": float(np.median(wall)),
        "min": float(np.min(wall)),
        "max": float(np.max(wall)),
        "cpu_median": float(np.median(cpu)),
        "sys_median": float(np.median(sys_)),
        "reps": reps,
        "warmup": warmup,
        "times": [float(t) for t in wall],
        "load1_before": load0,
        "load1_after": os.getloadavg()[0],
    }


def reusing_sweep(sweep_fn: Callable[..., Any], *args: Any) -> Callable[[], Any]:
    """A call of ``sweep_fn(*args, reuse=previous)`` that writes into the memory of the previous
    call's result (``orthofuse_jax.fusion.sweep``'s ``reuse``, donated), as a loop over many sweeps
    would. The first result to reuse is made here, so that a warm-up call already compiles the
    donating kernel. For :func:`time_fn`."""
    last = [block(sweep_fn(*args))]

    def call():
        last.append(sweep_fn(*args, reuse=last.pop()))
        return block(last[-1])

    return call


def first_and_median(fn: Callable[[], Any], reps: int = 5) -> dict[str, float]:
    """Seconds of the first call of ``fn()`` (compile + run) and the median and minimum of ``reps``
    more; JAX results are waited for (a quick timing, without CPU time or load)."""
    import jax

    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    first = time.perf_counter() - t0
    wall = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        wall.append(time.perf_counter() - t0)
    return {"first": first, "median": float(np.median(wall)), "min": min(wall)}


def compile_time(
    jitted, *args, keep: dict | None = None, key: str | None = None, **kwargs
) -> dict[str, float]:
    """Seconds to trace+lower and to compile ``jitted(*args)`` (ahead of time, not cached).

    The compiled executable is not in ``jitted``'s cache; pass ``keep`` (a dict) and ``key`` to
    keep it there for timing calls, so that nothing is compiled twice (on a GPU the exact merge
    takes minutes to compile).
    """
    t0 = time.perf_counter()
    lowered = jitted.lower(*args, **kwargs)
    t1 = time.perf_counter()
    compiled = lowered.compile()
    t2 = time.perf_counter()
    if keep is not None:
        keep[key] = compiled
    return {"lower": t1 - t0, "compile": t2 - t1, "total": t2 - t0}


# ---------------------------------------------------------------------------------------------
# Memory
# ---------------------------------------------------------------------------------------------


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far (``ru_maxrss``, KiB on Linux)."""
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def rss_bytes() -> int:
    """Current resident set size of this process."""
    import psutil

    return int(psutil.Process().memory_info().rss)


def run_worker(module: str, args: list[str], *, timeout: float = 1800) -> dict[str, Any]:
    """Run ``python -m module *args`` in a fresh process; its last stdout line is a JSON object."""
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run(
        [sys.executable, "-m", module, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=root,
    )
    if proc.returncode != 0:
        raise RuntimeError(
            f"worker {module} {args} failed ({proc.returncode}):\n{proc.stderr[-4000:]}"
        )
    lines = [ln for ln in proc.stdout.strip().splitlines() if ln.startswith("{")]
    return json.loads(lines[-1])


# ---------------------------------------------------------------------------------------------
# Machine description and output
# ---------------------------------------------------------------------------------------------


def _cpu_model() -> str:
    """``model name`` with the family and model numbers and whether AVX-512 is there: virtual
    machines often report only "AMD EPYC" or "Intel Xeon Processor", which hides the generation
    (two different CPUs have run these benchmarks under similar names)."""
    try:
        info = {}
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() in ("model name", "cpu family", "model", "flags"):
                info.setdefault(key.strip(), value.strip())
        if "model name" in info:
            extra = (
                [f"family {info['cpu family']} model {info['model']}"]
                if "cpu family" in info
                else []
            )
            extra += ["AVX-512"] if "avx512f" in info.get("flags", "").split() else []
            return info["model name"] + (f" ({', '.join(extra)})" if extra else "")
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine() -> dict[str, Any]:
    """Cores, CPU model, memory, library versions, XLA flags, which build of the compiled kernels
    runs (``_native.isa()``: avx512, avx2, or none), date and load."""
    import jax
    import jaxlib

    from orthofuse_jax import _native

    info: dict[str, Any] = {
        "date_utc": _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC"),
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "jax": jax.__version__,
        "jaxlib": jaxlib.__version__,
        "jax_backend": jax.default_backend(),
        "jax_devices": [str(d) for d in jax.devices()],
        "XLA_FLAGS": os.environ.get("XLA_FLAGS", ""),
        "kernels": (_native.isa() if _native.available() and _native.enabled() else None),
        "load1": os.getloadavg()[0],
    }
    try:
        import psutil

        info["memory_total_gb"] = round(psutil.virtual_memory().total / 2**30, 1)
    except ImportError:
        pass
    try:
        import torch

        info["torch"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
    except ImportError:
        info["torch"] = None
    return info


def write_json(name: str, payload: Mapping[str, Any]) -> Path:
    """Write ``benchmarks/results/<name>.json`` (atomically) and return its path."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{name}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=False, default=_json_default) + "\n")
    tmp.replace(path)
    return path


def _json_default(x):
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    raise TypeError(f"not JSON serialisable: {type(x)}")


def fmt_s(x: float | None) -> str:
    """Seconds as a short human string."""
    if x is None:
        return "-"
    return f"{x * 1e3:.1f} ms" if x < 1.0 else f"{x:.2f} s"


def table(rows: list[list[str]], header: list[str]) -> str:
    """A GitHub-markdown table."""
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = lambda r: "| " + " | ".join(str(c).ljust(w) for c, w in zip(r, widths)) + " |"
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(header), sep, *(line(r) for r in rows)])


def parse_inventory(text: str) -> dict[int, int]:
    """``"20:6,40:36"`` -> ``{20: 6, 40: 36}`` (block size -> layers)."""
    out = {}
    for part in text.split(","):
        b, n = part.split(":")
        out[int(b)] = int(n)
    return out


def pin_to_core(core: int, *, torch_threads: bool = True) -> None:
    """Restrict this process (and its children) to one CPU core and torch to one thread.

    On a machine shared with other jobs, multi-threaded XLA and MKL runtimes lose most of their
    time to descheduled worker threads; pinned single-core runs give stable, fair ratios.
    ``torch_threads=False`` leaves torch alone: a process that measures only our merges should not
    import it (importing torch adds about 0.2 GB of resident memory).
    """
    os.sched_setaffinity(0, {core})
    if not torch_threads:
        return
    try:
        import torch

        torch.set_num_threads(1)
    except ImportError:
        pass
