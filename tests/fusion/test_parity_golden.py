"""Parity with the reference PyTorch OrthoFuse merges (tests/data/reference_merges.npz, float64).

Mapping of the golden file's conventions to ours (its README, docs/math.md §3.4): ``t`` is the user-facing t
(0 = concept) everywhere; ``fast`` is the Cayley-space merge with concept weight ``1 - t`` = our
``cayley_space`` at t; ``*rst`` adds ``curve_over_id`` with ``p = t`` (geodesic) or ``p = 1 - t``
(fast), which is our ``restore="cayley"`` because eta is symmetric in p.
"""

from __future__ import annotations

from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from orthofuse_jax.fusion import from_layers, merge, sweep
from orthofuse_jax.geometry import gs_apply

DATA = np.load(Path(__file__).parents[1] / "data" / "reference_merges.npz")
TS = [float(t) for t in DATA["t"]]
CASES = range(int(DATA["cases"]))
TAGS = {
    "geo": ("geodesic", "none"),
    "georst": ("geodesic", "cayley"),
    "fast": ("cayley", "none"),
    "fastrst": ("cayley", "cayley"),
}
TOL = {np.float64: 1e-6, np.float32: 2e-5}


def _adapters(case: int, dtype):
    p = f"c{case}_"
    concept = from_layers({"layer": (DATA[p + "c_L"], DATA[p + "c_R"])}, dtype=dtype)
    style = from_layers({"layer": (DATA[p + "s_L"], DATA[p + "s_R"])}, dtype=dtype)
    return concept, style


def _only(adapter):
    (s,) = adapter.stacks.values()
    return s


@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("tag", list(TAGS))
@pytest.mark.parametrize("case", CASES)
def test_merge_matches_reference(case, tag, dtype):
    concept, style = _adapters(case, dtype)
    method, restore = TAGS[tag]
    x = jnp.asarray(DATA[f"c{case}_x"], dtype)
    tol = TOL[dtype]
    for i, t in enumerate(TS):
        s = _only(merge([concept, style], t=t, method=method, restore=restore))
        assert s.L.dtype == dtype
        ref_L, ref_R = DATA[f"c{case}_{tag}_L_{i}"], DATA[f"c{case}_{tag}_R_{i}"]
        np.testing.assert_allclose(np.asarray(s.L[0]), ref_L, rtol=0, atol=tol, err_msg=f"L, t={t}")
        np.testing.assert_allclose(np.asarray(s.R[0]), ref_R, rtol=0, atol=tol, err_msg=f"R, t={t}")
        y = gs_apply(x, s.L[0], s.R[0])
        np.testing.assert_allclose(
            np.asarray(y), DATA[f"c{case}_{tag}_y_{i}"], rtol=0, atol=tol, err_msg=f"y, t={t}"
        )


@pytest.mark.parametrize("algorithm", ["eigh", "matmul"])
@pytest.mark.parametrize("tag", ["geo", "georst"])
def test_geodesic_merge_algorithms_match_reference(tag, algorithm):
    """Both ways of taking the geodesic (merge() uses "matmul" by default) against the golden file."""
    method, restore = TAGS[tag]
    for case in CASES:
        for dtype in (np.float64, np.float32):
            concept, style = _adapters(case, dtype)
            for i, t in enumerate(TS):
                s = _only(
                    merge(
                        [concept, style], t=t, method=method, restore=restore, algorithm=algorithm
                    )
                )
                np.testing.assert_allclose(
                    np.asarray(s.L[0]),
                    DATA[f"c{case}_{tag}_L_{i}"],
                    rtol=0,
                    atol=TOL[dtype],
                    err_msg=f"case {case}, {dtype.__name__}, t={t}",
                )
                np.testing.assert_allclose(
                    np.asarray(s.R[0]),
                    DATA[f"c{case}_{tag}_R_{i}"],
                    rtol=0,
                    atol=TOL[dtype],
                    err_msg=f"case {case}, {dtype.__name__}, t={t}",
                )


@pytest.mark.parametrize("tag", list(TAGS))
def test_sweep_matches_reference(tag):
    case = len(CASES) - 1  # the SDXL-like (640, 32) case
    concept, style = _adapters(case, np.float64)
    method, restore = TAGS[tag]
    s = _only(sweep(concept, style, jnp.asarray(TS), method=method, restore=restore))
    assert s.L.shape[:2] == (len(TS), 1)
    for i, t in enumerate(TS):
        np.testing.assert_allclose(
            np.asarray(s.L[i, 0]), DATA[f"c{case}_{tag}_L_{i}"], rtol=0, atol=1e-6
        )
        np.testing.assert_allclose(
            np.asarray(s.R[i, 0]), DATA[f"c{case}_{tag}_R_{i}"], rtol=0, atol=1e-6
        )


def test_endpoint_inputs_reproduce_reference_layers():
    """t = 0 / t = 1 geodesic merges give the reference's concept / style layer outputs."""
    for case in CASES:
        concept, style = _adapters(case, np.float64)
        x = jnp.asarray(DATA[f"c{case}_x"], jnp.float64)
        for t, key in ((0.0, "qc_y"), (1.0, "qs_y")):
            s = _only(merge([concept, style], t=t, method="geodesic", restore="exact"))
            y = gs_apply(x, s.L[0], s.R[0])
            np.testing.assert_allclose(np.asarray(y), DATA[f"c{case}_{key}"], rtol=0, atol=1e-12)


# docs/math.md §1.4: golden values written in the spec itself (independent of the npz file).
def _spec14_params():
    j = np.arange(4)[:, None, None]
    r = np.arange(3)[None, :, None]
    c = np.arange(3)[None, None, :]
    cL = 0.05 * (j + 1) * (r - c) + 0.02 * np.cos(1 + j + 2 * r + 3 * c)
    cR = 0.03 * (r - c) * (2 - j) + 0.02 * np.sin(1 + 3 * j + r + 2 * c)
    sL = 0.06 * (r - c) + 0.01 * (j + 1) * np.cos(3 + j * r + c)
    sR = 0.04 * (r - c) * (j - 1.5) + 0.03 * np.sin(2 + j + r * c)
    return cL, cR, sL, sR


WRITTEN_GOLDEN = {
    ("geodesic", "none"): [0.85425147, 1.02243718, 0.30031656, -0.72939588, -0.91862124, -0.08990343,
                           0.79028991, 0.93799697, 0.54669473, -0.18011806, -0.79992836, -0.75129401],
    ("geodesic", "cayley"): [0.82603881, 0.98002044, 0.35349507, -0.62873828, -0.90123955, 0.01082373,
                             0.86418848, 0.95726459, 0.67026003, 0.15475299, -0.61924303, -0.89111433],
    ("cayley", "none"): [0.85434663, 1.02227543, 0.30224626, -0.72384083, -0.91860601, -0.08974707,
                         0.79264948, 0.94001816, 0.54675837, -0.17850162, -0.79676066, -0.75472778],
    ("cayley", "cayley"): [0.82617704, 0.97878867, 0.35473912, -0.61830453, -0.90120890, 0.01046034,
                           0.86717500, 0.96376139, 0.67040663, 0.15743212, -0.61392363, -0.89237766],
}  # fmt: skip


@pytest.mark.parametrize("method,restore", list(WRITTEN_GOLDEN))
def test_spec_1_4_golden_values(method, restore):
    cL, cR, sL, sR = _spec14_params()
    concept = from_layers({"l": (cL, cR)}, dtype=np.float64)
    style = from_layers({"l": (sL, sR)}, dtype=np.float64)
    x = jnp.sin(jnp.arange(1, 13, dtype=jnp.float64))
    s = _only(merge([concept, style], t=0.6, method=method, restore=restore))
    y = gs_apply(x, s.L[0], s.R[0])
    np.testing.assert_allclose(np.asarray(y), WRITTEN_GOLDEN[(method, restore)], rtol=0, atol=2e-8)
    if method == "geodesic":
        want = {
            "none": [0.97213475, -0.11720346, -0.20302062, 0.09369551, 0.98812310, -0.12179445, 0.21488410,
                     0.09937850, 0.97157024],
            "cayley": [0.90113957, -0.23588479, -0.36373870, 0.15248320, 0.95786310, -0.24340740, 0.40582798,
                       0.16388000, 0.89913681],
        }[restore]  # fmt: skip
        np.testing.assert_allclose(np.asarray(s.L[0, 0]).ravel(), want, rtol=0, atol=2e-8)
