"""Per-t statistics of a merge sweep between two adapters (paper Figs. 2, 5, 6).

For a sweep ``t -> Y(t)`` of merged blocks (before and after spectra restoration):

* eigen-angle histograms: ``|arg lambda|`` of every eigenvalue of every merged block (each
  rotation plane contributes its angle twice), on fixed bins over ``[0, pi]`` (Fig. 2);
* speed ``||dY/dt||_F`` on the product of all blocks (Fig. 5), measured by forward-mode
  differentiation (``jax.jvp``, as :func:`geometry.curve_speed`) of the curve the merge method traces
  (SPEC 3.2, 3.3, 3.7); a plain geodesic has constant speed equal to the geodesic distance;
* distance to the straight ambient path ``||Y(t) - ((1-t) U1 + t U2)||_F`` (Fig. 6);
* the largest orthogonality error ``max |Y^T Y - I|`` and the largest rotation angle.

The merged points come from :func:`orthofuse_jax.fusion.merge.sweep`; the curve used for the
speed is rebuilt here from the geometry primitives, and ``curve_mismatch`` reports how far it is
from the sweep's points (a cross-check of both).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ..geometry import cayley, geodesic, geodesic_distance, power, rotation_angles
from ..geometry._linalg import mm
from .adapter import GSAdapter, to_orthogonal

__all__ = ["sweep_statistics", "merge_curve", "ANGLE_BINS"]

ANGLE_BINS = 36
"""Number of histogram bins over [0, pi]."""


def merge_curve(a1: Any, a2: Any, u1: Any, u2: Any, *, method: str, restore: str, alpha: float):
    """``t -> Y(t)`` for one block stack: raw params ``a1, a2`` and blocks ``u1 = Cay(a1)``, ``u2 = Cay(a2)``.

    ``geodesic``: ``U1 (U1^T U2)^t``; ``cayley``: ``Cay((1-t) A1 + t A2)``; then restoration
    ``cayley``: ``Cay(eta Y)``, ``eta = 1/2 + 2t(1-t)`` (SPEC 3.7); ``exact``: ``exp(f log Y)``,
    ``f = 1 + 4(alpha-1) t(1-t)``; ``none``: ``Y``.
    """

    def curve(t):
        if method == "geodesic":
            y = geodesic(u1, u2, t)
        elif method == "cayley":
            y = cayley((1 - t) * a1 + t * a2)
        else:
            raise ValueError(f"method must be 'geodesic' or 'cayley', got {method!r}")
        if restore == "cayley":
            y = cayley((0.5 + 2 * t * (1 - t)) * y)
        elif restore == "exact":
            y = power(y, 1 + 4 * (alpha - 1) * t * (1 - t))
        elif restore != "none":
            raise ValueError(f"restore must be 'none', 'cayley' or 'exact', got {restore!r}")
        return y

    return curve


@jax.jit
def _angles(y):
    return jnp.nan_to_num(rotation_angles(y), nan=jnp.pi)


@jax.jit
def _distances(x1, x2, y, ref, ts):
    mismatch = jnp.max(jnp.abs(ref - y))
    tcol = ts.reshape(-1, 1, 1, 1, 1)
    amb = jnp.sum((y - ((1 - tcol) * x1[None] + tcol * x2[None])) ** 2, axis=(1, 2, 3, 4))
    eye = jnp.eye(y.shape[-1], dtype=y.dtype)
    orth = jnp.max(jnp.abs(mm(jnp.swapaxes(y, -1, -2), y) - eye), axis=(1, 2, 3, 4))
    return mismatch, amb, orth


_geodesic_distance = jax.jit(geodesic_distance)


def _stack_side_stats(r1, r2, x1, x2, y, ts, alpha, *, method, restore):
    """Per-t sums/maxima for one block stack (one side, L or R) of a sweep ``y`` ``[T, layers, nb, b, b]``.

    The curve and its derivative are evaluated op by op (not under one ``jit``): on a CPU backend a
    single XLA program chaining Cayley solves, ``eigh`` and their tangents was seen to stall (SPEC 11).
    """
    curve = merge_curve(r1, r2, x1, x2, method=method, restore=restore, alpha=alpha)
    if restore == "exact":
        # eigh's derivative is undefined for the (always repeated) eigenvalues of -S^2 when the
        # decomposed matrix itself moves with t: use central differences instead of jvp.
        h = 1e-3 if ts.dtype == jnp.float32 else 1e-5
        ref = jax.vmap(curve)(ts)
        d = (jax.vmap(curve)(ts + h) - jax.vmap(curve)(ts - h)) / (2 * h)
        sq = jnp.sum(d**2, axis=tuple(range(1, d.ndim)))
    else:

        def point(t):
            y_t, dy = jax.jvp(curve, (t,), (jnp.ones_like(t),))  # = geometry.curve_speed, keeping the point
            return y_t, jnp.sum(dy**2)

        ref, sq = jax.vmap(point)(ts)
    mismatch, amb, orth = _distances(x1, x2, y, ref, ts)
    theta = _angles(y)
    dist_sq = jnp.sum(_geodesic_distance(x1, x2) ** 2)
    return sq, mismatch, amb, orth, theta, dist_sq


def _hist(theta: np.ndarray, edges: np.ndarray) -> np.ndarray:
    return np.stack([np.histogram(th.ravel(), bins=edges)[0] for th in theta])


def sweep_statistics(
    a1: GSAdapter,
    a2: GSAdapter,
    ts,
    *,
    method: str = "geodesic",
    restore: str = "cayley",
    alpha: float = 2.0,
    scales: str = "concept",
    before: GSAdapter | None = None,
    after: GSAdapter | None = None,
) -> dict:
    """Statistics per ``t`` of the sweep from ``a1`` (t=0) to ``a2`` (t=1); a JSON-ready dict.

    Args:
      a1, a2: compatible adapters (raw parameters or orthogonal blocks).
      ts: 1-D sequence of t values.
      method, restore, alpha, scales: as in :func:`orthofuse_jax.fusion.merge.merge`.
      before, after: the sweeps without and with restoration (``stacks [T, layers, nb, b, b]``)
        if already computed; otherwise computed with :func:`merge.sweep`.
    Returns:
      dict with ``ts``, ``speed_before/after`` (product-manifold speed), ``geodesic_distance``,
      ``ambient_distance_before/after``, ``orthogonality_error_before/after``,
      ``max_angle_before/after``, ``angle_bins`` (edges) and ``angle_hist_before/after``
      (counts, one row per t), ``curve_mismatch`` and ``speed_method``.
    """
    from .merge import sweep

    ts = np.asarray(ts, dtype=np.float64).reshape(-1)
    kw = dict(method=method, alpha=alpha, scales=scales)
    if before is None:
        before = sweep(a1, a2, ts, restore="none", **kw)
    if after is None:
        after = before if restore == "none" else sweep(a1, a2, ts, restore=restore, **kw)
    u1, u2 = to_orthogonal(a1), to_orthogonal(a2)
    dtype = u1.dtype
    edges = np.linspace(0.0, np.pi, ANGLE_BINS + 1)
    T = len(ts)
    acc = {k: np.zeros(T) for k in ("sq_speed_before", "sq_speed_after", "amb_before", "amb_after")}
    acc.update({k: np.zeros(T) for k in ("orth_before", "orth_after", "maxang_before", "maxang_after")})
    hists = {"before": np.zeros((T, ANGLE_BINS), dtype=np.int64), "after": np.zeros((T, ANGLE_BINS), dtype=np.int64)}
    dist_sq = 0.0
    mismatch = 0.0
    speed_method = "jvp"
    raw1, raw2 = to_raw(a1), to_raw(a2)
    tj = jnp.asarray(ts, dtype=dtype)
    for key, s1 in u1.stacks.items():
        for side in ("L", "R"):
            x1 = getattr(s1, side)
            x2 = getattr(u2.stacks[key], side)
            r1 = getattr(raw1.stacks[key], side)
            r2 = getattr(raw2.stacks[key], side)
            tags = [("before", before, "none")] + ([("after", after, restore)] if restore != "none" else [])
            for tag, sw, rs in tags:
                y = getattr(sw.stacks[key], side).astype(dtype)
                sq, mis, amb, orth, theta, dsq = jax.device_get(
                    _stack_side_stats(r1, r2, x1, x2, y, tj, jnp.asarray(alpha, dtype), method=method, restore=rs)
                )
                if tag == "before":
                    dist_sq += float(dsq)
                if rs == "exact":
                    speed_method = "central-difference"
                acc[f"sq_speed_{tag}"] += sq
                acc[f"amb_{tag}"] += amb
                acc[f"orth_{tag}"] = np.maximum(acc[f"orth_{tag}"], orth)
                acc[f"maxang_{tag}"] = np.maximum(acc[f"maxang_{tag}"], theta.max(axis=(1, 2, 3)))
                hists[tag] += _hist(theta, edges)
                mismatch = max(mismatch, float(mis))
    if restore == "none":
        for k in ("sq_speed", "amb", "orth", "maxang"):
            acc[f"{k}_after"] = acc[f"{k}_before"]
        hists["after"] = hists["before"]
    hist_b, hist_a = hists["before"], hists["after"]
    return {
        "ts": ts.tolist(),
        "method": method,
        "restore": restore,
        "alpha": float(alpha),
        "layers": a1.num_layers,
        "blocks": int(sum(2 * s.L.shape[0] * s.L.shape[1] for s in u1.stacks.values())),
        "geodesic_distance": float(np.sqrt(dist_sq)),
        "speed_before": np.sqrt(acc["sq_speed_before"]).tolist(),
        "speed_after": np.sqrt(acc["sq_speed_after"]).tolist(),
        "speed_method": speed_method,
        "ambient_distance_before": np.sqrt(acc["amb_before"]).tolist(),
        "ambient_distance_after": np.sqrt(acc["amb_after"]).tolist(),
        "orthogonality_error_before": acc["orth_before"].tolist(),
        "orthogonality_error_after": acc["orth_after"].tolist(),
        "max_angle_before": acc["maxang_before"].tolist(),
        "max_angle_after": acc["maxang_after"].tolist(),
        "angle_bins": edges.tolist(),
        "angle_hist_before": hist_b.tolist(),
        "angle_hist_after": hist_a.tolist(),
        "curve_mismatch": mismatch,
    }


def to_raw(adapter: GSAdapter) -> GSAdapter:
    """Raw Cayley parameters of an adapter (``invCay`` of orthogonal blocks)."""
    from .adapter import to_cayley_params

    return to_cayley_params(adapter)
