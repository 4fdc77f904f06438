"""Sweep statistics (paper Figs. 2, 5, 6) against scipy references in float64, and the PNG plots."""

from __future__ import annotations

import json

import numpy as np
import pytest
import scipy.linalg as sla

from orthofuse_jax.fusion.adapter import from_layers, to_layers
from orthofuse_jax.fusion.stats import ANGLE_BINS, sweep_statistics

SHAPES = {"p.processor.to_q_moft": (2, 3), "p.processor.to_k_moft": (1, 4)}
TS = np.array([0.0, 0.3, 0.5, 1.0])


def _skew(rng, shape, scale):
    g = rng.standard_normal(shape) * scale
    return 0.5 * (g - np.swapaxes(g, -1, -2))


def _pair():
    rng = np.random.default_rng(7)
    mk = lambda: from_layers(
        {
            n: (_skew(rng, (nb, b, b), 0.4), _skew(rng, (nb, b, b), 0.4))
            for n, (nb, b) in SHAPES.items()
        },
        dtype=np.float64,
    )
    return mk(), mk()


def _cay(a):
    s = 0.5 * (a - a.T)
    i = np.eye(len(a))
    return np.linalg.solve(i - s, i + s)


def _blocks(adapter):
    """All (U1-raw) blocks in a fixed order: per layer, L blocks then R blocks."""
    out = []
    for name in sorted(SHAPES):
        L, R = to_layers(adapter)[name]
        out += [np.asarray(x) for x in np.asarray(L)] + [np.asarray(x) for x in np.asarray(R)]
    return out


def _ref_curve(a1, a2, t, restore):
    """scipy float64: geodesic U1 expm(t logm(U1^T U2)), then curve_over_id Cay(eta Y)."""
    ys = []
    for r1, r2 in zip(_blocks(a1), _blocks(a2)):
        u1, u2 = _cay(r1), _cay(r2)
        y = u1 @ np.real(sla.expm(t * sla.logm(u1.T @ u2)))
        if restore == "cayley":
            y = _cay((0.5 + 2 * t * (1 - t)) * y)
        ys.append(y)
    return ys


@pytest.fixture(scope="module")
def stats():
    a1, a2 = _pair()
    return a1, a2, sweep_statistics(a1, a2, TS, method="geodesic", restore="cayley")


def test_geodesic_speed_is_the_geodesic_distance(stats):
    a1, a2, st = stats
    d = np.sqrt(
        sum(
            np.sum(np.real(sla.logm(_cay(r1).T @ _cay(r2))) ** 2)
            for r1, r2 in zip(_blocks(a1), _blocks(a2))
        )
    )
    np.testing.assert_allclose(st["geodesic_distance"], d, rtol=1e-8)
    np.testing.assert_allclose(st["speed_before"], d, rtol=1e-6)  # measured: central differences
    assert st["speed_method"] == "central-difference"


def test_restored_speed_matches_finite_differences_of_scipy_curve(stats):
    a1, a2, st = stats
    h = 1e-5
    for i, t in enumerate(TS[1:-1], start=1):
        plus, minus = _ref_curve(a1, a2, t + h, "cayley"), _ref_curve(a1, a2, t - h, "cayley")
        fd = np.sqrt(sum(np.sum(((p - m) / (2 * h)) ** 2) for p, m in zip(plus, minus)))
        np.testing.assert_allclose(st["speed_after"][i], fd, rtol=1e-5)


def test_ambient_distance_and_orthogonality(stats):
    a1, a2, st = stats
    for i, t in enumerate(TS):
        for tag, restore in (("before", "none"), ("after", "cayley")):
            ys = _ref_curve(a1, a2, t, restore)
            ref = np.sqrt(
                sum(
                    np.sum((y - ((1 - t) * _cay(r1) + t * _cay(r2))) ** 2)
                    for y, r1, r2 in zip(ys, _blocks(a1), _blocks(a2))
                )
            )
            np.testing.assert_allclose(st[f"ambient_distance_{tag}"][i], ref, rtol=1e-6, atol=1e-9)
    assert st["ambient_distance_before"][0] < 1e-9 and st["ambient_distance_before"][-1] < 1e-9
    assert max(st["orthogonality_error_after"]) < 1e-12


def test_angle_histograms(stats):
    a1, a2, st = stats
    n_eig = sum(2 * nb * b for nb, b in SHAPES.values())  # L and R: nb blocks of b eigenvalues
    hb, ha = np.asarray(st["angle_hist_before"]), np.asarray(st["angle_hist_after"])
    assert hb.shape == ha.shape == (len(TS), ANGLE_BINS)
    assert (hb.sum(axis=1) == n_eig).all() and (ha.sum(axis=1) == n_eig).all()
    edges = np.asarray(st["angle_bins"])
    for i, t in enumerate(TS):
        ang = np.concatenate(
            [np.abs(np.angle(np.linalg.eigvals(y))) for y in _ref_curve(a1, a2, t, "cayley")]
        )
        np.testing.assert_array_equal(ha[i], np.histogram(ang, bins=edges)[0])
        np.testing.assert_allclose(st["max_angle_after"][i], ang.max(), atol=1e-7)


def test_exact_restore_speed_and_angles():
    a1, a2 = _pair()
    st = sweep_statistics(a1, a2, [0.5], method="geodesic", restore="exact", alpha=2.0)
    edges = np.asarray(st["angle_bins"])
    ys = [np.real(sla.expm(2.0 * sla.logm(g))) for g in _ref_curve(a1, a2, 0.5, "none")]
    ang = np.concatenate([np.abs(np.angle(np.linalg.eigvals(y))) for y in ys])
    np.testing.assert_array_equal(st["angle_hist_after"][0], np.histogram(ang, bins=edges)[0])

    def y(t):  # scipy: exp(f(t) log gamma(t)), f = 1 + 4 t (1 - t)
        return [
            np.real(sla.expm((1 + 4 * t * (1 - t)) * sla.logm(g)))
            for g in _ref_curve(a1, a2, t, "none")
        ]

    h = 1e-5
    fd = np.sqrt(sum(np.sum(((p - m) / (2 * h)) ** 2) for p, m in zip(y(0.5 + h), y(0.5 - h))))
    np.testing.assert_allclose(st["speed_after"][0], fd, rtol=1e-4)
    json.dumps(st)


def test_plots_are_written(tmp_path, stats):
    from orthofuse_jax.plots import write_sweep_plots

    paths = write_sweep_plots(stats[2], tmp_path / "plots")
    assert sorted(p.name for p in paths) == [
        "ambient_distance.png",
        "angles.png",
        "speed.png",
        "summary.png",
    ]
    for p in paths:
        data = p.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == sorted(
        p.name for p in paths
    )  # no temp files


def test_cayley_method_statistics_against_scipy():
    a1, a2 = _pair()
    ts = [0.25, 0.5]
    st = sweep_statistics(a1, a2, ts, method="cayley", restore="cayley")

    def curve(t, restore):  # float64: Cay((1 - t) A1 + t A2), then curve_over_id
        ys = [_cay((1 - t) * r1 + t * r2) for r1, r2 in zip(_blocks(a1), _blocks(a2))]
        return [_cay((0.5 + 2 * t * (1 - t)) * y) for y in ys] if restore == "cayley" else ys

    h = 1e-5
    edges = np.asarray(st["angle_bins"])
    for i, t in enumerate(ts):
        for tag, restore in (("before", "none"), ("after", "cayley")):
            fd = np.sqrt(
                sum(
                    np.sum(((p - m) / (2 * h)) ** 2)
                    for p, m in zip(curve(t + h, restore), curve(t - h, restore))
                )
            )
            np.testing.assert_allclose(st[f"speed_{tag}"][i], fd, rtol=1e-6)
            ang = np.concatenate(
                [np.abs(np.angle(np.linalg.eigvals(y))) for y in curve(t, restore)]
            )
            np.testing.assert_array_equal(
                st[f"angle_hist_{tag}"][i], np.histogram(ang, bins=edges)[0]
            )
            np.testing.assert_allclose(st[f"max_angle_{tag}"][i], ang.max(), atol=1e-7)
