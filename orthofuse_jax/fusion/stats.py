"""Per-t statistics of a merge sweep between two adapters (paper Figs. 2, 5, 6), streamed.

For a sweep ``t -> Y(t)`` of merged blocks (before and after spectra restoration):

* eigen-angle histograms: ``|arg lambda|`` of every eigenvalue of every merged block (each
  rotation plane contributes its angle twice), on fixed bins over ``[0, pi]`` (Fig. 2). The
  angles before restoration come from the eigenvalues ``cos theta`` of the blocks' symmetric
  parts (one real values-only ``eigvalsh`` per block and t, the sweep's largest cost);
  restoration maps each angle by a known function (``curve_over_id``:
  ``theta -> 2 arctan(eta sin theta)``; ``exact``: ``theta -> f theta``, wrapped to ``[0, pi]``),
  which gives the angles after it;
* speed ``||dY/dt||_F`` on the product of all blocks (Fig. 5), by central differences of the
  sweep's own points at ``t +- h`` (``h = 1e-3`` in float32, ``1e-5`` in float64); a plain
  geodesic has constant speed equal to the geodesic distance;
* distance to the straight ambient path ``||Y(t) - ((1-t) U1 + t U2)||_F`` (Fig. 6);
* the largest orthogonality error ``max |Y^T Y - I|`` and the largest rotation angle;

The points before restoration come from :func:`orthofuse_jax.fusion.merge.sweep`, layer chunk
by layer chunk; the points after it are the restoration applied to them, and each chunk's
statistics are one compiled program. Only per-t sums and maxima are kept: memory does not grow
with the number of layers or of t beyond one chunk's points and the statistics themselves.
"""

from __future__ import annotations

import functools
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ..geometry import cayley, cpu_only, log_with_flag, power, relative_rotation
from .adapter import GSAdapter, on_cpu
from .maps import orthogonality_error
from .merge import sweep

__all__ = ["ANGLE_BINS", "sweep_statistics"]

ANGLE_BINS = 36
"""Number of histogram bins over [0, pi]."""

_CHUNK_BYTES = 2**25
"""Target size of one layer chunk's sweep points (all t, before and after, t +- h included)."""

_STEP = {np.dtype(np.float32): 1e-3, np.dtype(np.float64): 1e-5}
"""Central-difference step of the speed: truncation ~h^2, round-off ~eps/h, each ~1e-6 / 1e-10."""


def _chunk_layers(n: int, layer_bytes: int) -> int:
    """Layers per chunk: the largest divisor of ``n`` (so every chunk has one shape, one program)
    whose points fit in :data:`_CHUNK_BYTES`."""
    target = max(1, _CHUNK_BYTES // max(1, layer_bytes))
    return max(d for d in range(1, min(n, target) + 1) if n % d == 0)


def _angle_stats(
    sym: np.ndarray, ts: np.ndarray, alpha: float, restore: str
) -> dict[str, np.ndarray]:
    """Histograms and maxima per t of the rotation angles, before and after restoration.

    ``sym`` ``[T, ..., b, b]``: the symmetric parts of the points before restoration; their
    eigenvalues are ``cos theta`` (each rotation plane twice). LAPACK's values-only ``eigvalsh``
    (numpy's; jaxlib's ``eigh`` also forms the eigenvectors, 1.5-2x slower), run beside the next
    chunk's compiled statistics. Restoration maps each plane's angle: ``curve_over_id`` to
    ``2 arctan(eta sin theta)``, ``exact`` to ``f theta`` (wrapped to ``[0, pi]``).
    """
    before = np.arccos(np.clip(np.linalg.eigvalsh(sym), -1.0, 1.0)).reshape(len(ts), -1)
    f = (1.0 + 4.0 * (alpha - 1.0) * ts * (1.0 - ts))[:, None]
    if restore == "cayley":  # Cay(eta skew(Y)): skew(Y) has eigenvalues +-i sin(theta)
        after = 2.0 * np.arctan(0.5 * f * np.sin(before))
    elif restore == "exact":  # the principal angle of e^(i f theta)
        after = np.abs(np.remainder(f * before + np.pi, 2.0 * np.pi) - np.pi)
    else:
        after = before
    edges = np.linspace(0.0, np.pi, ANGLE_BINS + 1)
    out = {}
    for tag, th in (("before", before), ("after", after)):
        out[f"hist_{tag}"] = np.stack([np.histogram(row, bins=edges)[0] for row in th])
        out[f"maxang_{tag}"] = th.max(axis=1)
    return out


@functools.partial(
    jax.jit, static_argnames=("restore", "orthogonal", "log_algorithm", "n_t", "cpu")
)
def _chunk_stats(
    x1,
    x2,
    yb,
    ts,
    h,
    alpha,
    *,
    restore: str,
    orthogonal: tuple[bool, bool],
    log_algorithm: str,
    n_t: int,
    cpu: bool,
):
    """Per-t sums and maxima over one chunk of blocks (one side of one stack), in one program.

    ``x1, x2`` ``[..., b, b]``: the inputs' blocks (raw parameters, or orthogonal where
    ``orthogonal`` says so); ``yb`` ``[3T, ..., b, b]``: the sweep's points before restoration at
    ``ts``, ``ts - h`` and ``ts + h``. The points after restoration are the restoration of ``yb``.
    ``cpu``: the inputs are concrete CPU arrays (only the CPU's kernels are traced).
    """
    with cpu_only(cpu):
        return _stats(
            x1,
            x2,
            yb,
            ts,
            h,
            alpha,
            restore=restore,
            orthogonal=orthogonal,
            log_algorithm=log_algorithm,
            n_t=n_t,
        )


def _stats(x1, x2, yb, ts, h, alpha, *, restore, orthogonal, log_algorithm, n_t):
    u1, u2 = (x if orth else cayley(x) for x, orth in ((x1, orthogonal[0]), (x2, orthogonal[1])))
    t3 = jnp.concatenate([ts, ts - h, ts + h])
    f = (1.0 + 4.0 * (alpha - 1.0) * t3 * (1.0 - t3)).reshape((-1,) + (1,) * (yb.ndim - 1))
    if restore == "cayley":  # curve_over_id: Cay(eta Y), eta = f / 2
        ya = cayley(0.5 * f * yb)
    elif restore == "exact":  # exp(f log Y)
        ya = power(yb, f[..., 0, 0])
    else:
        ya = yb
    tcol = ts.reshape((-1,) + (1,) * u1.ndim)
    line = (1.0 - tcol) * u1 + tcol * u2
    out = {}
    for tag, y in (("before", yb), ("after", ya)):
        mid, minus, plus = y[:n_t], y[n_t : 2 * n_t], y[2 * n_t :]
        axes = tuple(range(1, mid.ndim))
        out[f"sq_speed_{tag}"] = jnp.sum(((plus - minus) / (2.0 * h)) ** 2, axis=axes)
        out[f"amb_{tag}"] = jnp.sum((mid - line) ** 2, axis=axes)
        out[f"orth_{tag}"] = jnp.max(orthogonality_error(mid), axis=axes[:-2])
    # the angles come from the symmetric parts' eigenvalues cos(theta), on the host (_angle_stats)
    out["sym"] = 0.5 * (yb[:n_t] + jnp.swapaxes(yb[:n_t], -1, -2))
    log, _ = log_with_flag(relative_rotation(u1, u2), algorithm=log_algorithm)
    out["dist_sq"] = jnp.sum(log**2)
    return out


@functools.partial(jax.jit, static_argnames="size")
def _rows(x, start, *, size: int):
    return jax.lax.dynamic_slice_in_dim(
        x, start, size
    )  # one program for every start (a static slice compiles per start)


def _layer_slice(adapter: GSAdapter, key: str, start: int, stop: int) -> GSAdapter:
    st = adapter.stacks[key]
    if (start, stop) == (0, len(st.names)):
        return replace(adapter, stacks={key: st}, scales={})
    size = stop - start
    part = replace(
        st,
        L=_rows(st.L, start, size=size),
        R=_rows(st.R, start, size=size),
        names=st.names[start:stop],
    )
    return replace(adapter, stacks={key: part}, scales={})


def sweep_statistics(
    a1: GSAdapter,
    a2: GSAdapter,
    ts,
    *,
    method: str = "geodesic",
    restore: str = "cayley",
    alpha: float = 2.0,
    scales: str = "concept",
    algorithm: str = "auto",
    extrapolate: bool = False,
) -> dict:
    """Statistics per ``t`` of the sweep from ``a1`` (t=0) to ``a2`` (t=1); a JSON-ready dict.

    The sweep is computed and reduced one chunk of layers at a time (module docstring).

    Args:
      a1, a2: compatible adapters (raw parameters or orthogonal blocks).
      ts: 1-D sequence of t values (checked by :func:`~orthofuse_jax.fusion.merge.sweep`; the
        points at ``t +- h`` may lie just outside [0, 1]).
      method, restore, alpha, scales, algorithm, extrapolate: as in
        :func:`orthofuse_jax.fusion.merge.merge`.
    Returns:
      dict with ``ts``, ``speed_before/after`` (product-manifold speed), ``geodesic_distance``,
      ``ambient_distance_before/after``, ``orthogonality_error_before/after``,
      ``max_angle_before/after``, ``angle_bins`` (edges) and ``angle_hist_before/after``
      (counts, one row per t) and ``speed_method``.
    Raises:
      As :func:`~orthofuse_jax.fusion.merge.sweep`.
    """
    ts = np.asarray(ts, dtype=np.float64).reshape(-1)
    if not np.all(np.isfinite(ts)):
        raise ValueError(f"ts must be finite, got {ts.tolist()}")
    if not extrapolate and (np.any(ts < 0.0) or np.any(ts > 1.0)):
        bad = ts[(ts < 0.0) | (ts > 1.0)][0]
        raise ValueError(
            f"ts = {float(bad)} is outside [0, 1]; pass extrapolate=True to extrapolate along the path"
        )
    dtype = np.dtype(a1.dtype)
    n_t = len(ts)
    h = _STEP.get(dtype, 1e-3)
    ts3 = np.concatenate([ts, ts - h, ts + h])
    kw: dict[str, Any] = dict(
        method=method, alpha=alpha, scales=scales, algorithm=algorithm, extrapolate=True
    )
    log_algorithm = "eigh" if dtype.itemsize > 4 else "matmul"
    acc = {
        k: np.zeros(n_t) for k in ("sq_speed_before", "sq_speed_after", "amb_before", "amb_after")
    }
    acc.update(
        {k: np.zeros(n_t) for k in ("orth_before", "orth_after", "maxang_before", "maxang_after")}
    )
    acc.update(
        {f"hist_{tag}": np.zeros((n_t, ANGLE_BINS), dtype=np.int64) for tag in ("before", "after")}
    )
    dist_sq = 0.0
    orthogonal = (a1.orthogonal, a2.orthogonal)
    tj, hj, alpha_j = jnp.asarray(ts, dtype), jnp.asarray(h, dtype), jnp.asarray(alpha, dtype)
    pending: list = []

    def collect(keep: int) -> None:  # fold finished angle statistics in, leaving ``keep`` pending
        while len(pending) > keep:
            part = pending.pop(0).result()
            for tag in ("before", "after"):
                acc[f"hist_{tag}"] += part[f"hist_{tag}"]
                acc[f"maxang_{tag}"] = np.maximum(acc[f"maxang_{tag}"], part[f"maxang_{tag}"])

    with ThreadPoolExecutor(1) as angles:  # the eigenvalues on the other core
        for key, stack in a1.stacks.items():
            n = len(stack.names)
            layer_bytes = (
                2 * 2 * len(ts3) * stack.nb * stack.b**2 * dtype.itemsize
            )  # L and R, before and after
            chunk = _chunk_layers(n, layer_bytes)
            for start in range(0, n, chunk):
                c1, c2 = (
                    _layer_slice(a1, key, start, start + chunk),
                    _layer_slice(a2, key, start, start + chunk),
                )
                before = sweep(c1, c2, ts3, restore="none", **kw)
                for side in ("L", "R"):
                    x1, x2 = getattr(c1.stacks[key], side), getattr(c2.stacks[key], side)
                    yb = getattr(before.stacks[key], side)
                    part = jax.device_get(
                        _chunk_stats(
                            x1,
                            x2,
                            yb,
                            tj,
                            hj,
                            alpha_j,
                            restore=restore,
                            n_t=n_t,
                            orthogonal=orthogonal,
                            log_algorithm=log_algorithm,
                            cpu=on_cpu((x1, x2, yb)),
                        )
                    )
                    pending.append(angles.submit(_angle_stats, part.pop("sym"), ts, alpha, restore))
                    for name in ("sq_speed_before", "sq_speed_after", "amb_before", "amb_after"):
                        acc[name] += part[name]
                    for name in ("orth_before", "orth_after"):
                        acc[name] = np.maximum(acc[name], part[name])
                    dist_sq += float(part["dist_sq"])
                    collect(keep=2)
                del before
        collect(keep=0)
    return {
        "ts": ts.tolist(),
        "method": method,
        "restore": restore,
        "alpha": float(alpha),
        "layers": a1.num_layers,
        "blocks": int(sum(2 * s.L.shape[0] * s.L.shape[1] for s in a1.stacks.values())),
        "geodesic_distance": float(np.sqrt(dist_sq)),
        "speed_before": np.sqrt(acc["sq_speed_before"]).tolist(),
        "speed_after": np.sqrt(acc["sq_speed_after"]).tolist(),
        "speed_method": "central-difference",
        "speed_step": h,
        "ambient_distance_before": np.sqrt(acc["amb_before"]).tolist(),
        "ambient_distance_after": np.sqrt(acc["amb_after"]).tolist(),
        "orthogonality_error_before": acc["orth_before"].tolist(),
        "orthogonality_error_after": acc["orth_after"].tolist(),
        "max_angle_before": acc["maxang_before"].tolist(),
        "max_angle_after": acc["maxang_after"].tolist(),
        "angle_bins": np.linspace(0.0, np.pi, ANGLE_BINS + 1).tolist(),
        "angle_hist_before": acc["hist_before"].tolist(),
        "angle_hist_after": acc["hist_after"].tolist(),
    }
