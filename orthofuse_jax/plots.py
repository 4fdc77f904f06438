"""PNG plots of sweep statistics (matplotlib, Agg backend; no display needed).

Input is the dict of :func:`orthofuse_jax.fusion.stats.sweep_statistics` (or the ``sweep.json``
the CLI writes). Figures follow the paper: eigen-angle histograms before/after spectra
restoration (Fig. 2), speed along t (Fig. 5), distance to the straight ambient path (Fig. 6).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

__all__ = [
    "plot_ambient_distance",
    "plot_angle_histograms",
    "plot_speed",
    "plot_summary",
    "write_sweep_plots",
]


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _pick_ts(ts, k=3):
    idx = np.unique(np.round(np.linspace(0, len(ts) - 1, min(k, len(ts)))).astype(int))
    return idx


def _title(stats):
    return f"method={stats['method']}, restore={stats['restore']}" + (
        f", alpha={stats['alpha']:g}" if stats["restore"] == "exact" else ""
    )


def plot_angle_histograms(stats: dict, ax=None):
    """Eigen-angle histograms of the merged blocks at a few t, before (dashed) and after restoration."""
    plt = _plt()
    fig = None
    if ax is None:
        fig, ax = plt.subplots(figsize=(6.4, 4.0))
    edges = np.asarray(stats["angle_bins"])
    centers = 0.5 * (edges[1:] + edges[:-1])
    ts = stats["ts"]
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for j, i in enumerate(_pick_ts(ts, 4 if len(ts) > 3 else len(ts))):
        c = colors[j % len(colors)]
        hb = np.asarray(stats["angle_hist_before"][i], dtype=float)
        ha = np.asarray(stats["angle_hist_after"][i], dtype=float)
        ax.plot(
            centers, hb / max(hb.sum(), 1), "--", color=c, lw=1.2, label=f"t={ts[i]:.2f} before"
        )
        ax.plot(centers, ha / max(ha.sum(), 1), "-", color=c, lw=1.8, label=f"t={ts[i]:.2f} after")
    ax.set_xlabel("eigen-angle |arg λ| of merged blocks (rad)")
    ax.set_ylabel("fraction of eigenvalues")
    ax.set_title("Eigen-angle spectra (Fig. 2)", fontsize=10)
    ax.legend(fontsize=7, ncol=2)
    return fig


def _plot_before_after(stats: dict, key: str, ylabel: str, title: str, ax):
    """``stats[key + "_before"]`` (dashed) and, when restored, ``stats[key + "_after"]`` along t."""
    plt = _plt()
    fig = None
    if ax is None:
        fig, ax = plt.subplots(figsize=(6.4, 4.0))
    ts = stats["ts"]
    ax.plot(ts, stats[f"{key}_before"], "o--", label="before restoration")
    if stats["restore"] != "none":
        ax.plot(ts, stats[f"{key}_after"], "o-", label=f"after restore={stats['restore']}")
    ax.set_xlabel("t  (0 = concept, 1 = style)")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    return fig, ax


def plot_speed(stats: dict, ax=None):
    """Speed ``||dY/dt||_F`` along t, with the geodesic distance (constant geodesic speed) for reference."""
    fig, ax = _plot_before_after(
        stats, "speed", "speed ||dY/dt||_F", "Speed along the merge path (Fig. 5)", ax
    )
    ax.axhline(
        stats["geodesic_distance"], color="gray", lw=0.8, label="geodesic distance d(U1, U2)"
    )
    ax.legend(fontsize=7)
    return fig


def plot_ambient_distance(stats: dict, ax=None):
    """``||Y(t) - ((1-t) U1 + t U2)||_F`` along t."""
    fig, ax = _plot_before_after(
        stats,
        "ambient_distance",
        "||Y(t) - ((1-t)U1 + tU2)||_F",
        "Distance to the straight ambient path (Fig. 6)",
        ax,
    )
    ax.legend(fontsize=7)
    return fig


def plot_summary(stats: dict):
    """2x2 figure: histograms, speed, ambient distance, orthogonality error."""
    plt = _plt()
    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5))
    plot_angle_histograms(stats, axes[0, 0])
    plot_speed(stats, axes[0, 1])
    plot_ambient_distance(stats, axes[1, 0])
    ax = axes[1, 1]
    ts = stats["ts"]
    ax.semilogy(
        ts, np.maximum(stats["orthogonality_error_after"], 1e-18), "o-", label="max |Y^T Y - I|"
    )
    ax.set_xlabel("t  (0 = concept, 1 = style)")
    ax.set_ylabel("orthogonality error")
    ax.set_title("Orthogonality of merged blocks", fontsize=10)
    ax.legend(fontsize=7)
    fig.suptitle(f"OrthoFuse sweep: {stats['layers']} layers, {_title(stats)}", fontsize=11)
    fig.tight_layout()
    return fig


def _save(fig, path: Path) -> Path:
    import io

    from .fusion.io import atomic_write_bytes

    plt = _plt()
    try:
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=110)
        atomic_write_bytes(path, buf.getvalue())
    finally:
        plt.close(fig)
    return path


def write_sweep_plots(stats: dict, directory: str | os.PathLike) -> list[Path]:
    """Write ``angles.png``, ``speed.png``, ``ambient_distance.png`` and ``summary.png`` into ``directory``."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    return [
        _save(plot_angle_histograms(stats), d / "angles.png"),
        _save(plot_speed(stats), d / "speed.png"),
        _save(plot_ambient_distance(stats), d / "ambient_distance.png"),
        _save(plot_summary(stats), d / "summary.png"),
    ]
