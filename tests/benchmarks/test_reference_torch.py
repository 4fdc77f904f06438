"""The benchmark baseline (benchmarks/reference_torch.py) reproduces the reference code's outputs.

The golden file holds float64 outputs of the authors' PyTorch code (docs/math.md §1.4, golden README); the
transcription must match them, otherwise the speed-ups in benchmarks/RESULTS.md would be measured
against the wrong algorithm.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import reference_torch as ref  # noqa: E402

GOLDEN = ROOT / "tests" / "data" / "reference_merges.npz"


@pytest.fixture(scope="module")
def golden():
    if not GOLDEN.exists():
        pytest.fail(f"golden file missing: {GOLDEN}")
    with np.load(GOLDEN) as d:
        return {k: d[k] for k in d.files}


def _case(g, k, dtype):
    tt = lambda key: torch.from_numpy(g[f"c{k}_{key}"]).to(dtype)
    return tt("c_L"), tt("c_R"), tt("s_L"), tt("s_R")


def _tol(dtype):
    return 1e-9 if dtype == torch.float64 else 2e-5


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_full_preset_matches_golden(golden, dtype):
    for k in range(int(golden["cases"])):
        cL, cR, sL, sR = _case(golden, k, dtype)
        for i, t in enumerate(golden["t"]):
            t = float(t)
            L, R = ref.blocked_geodesic_combination(cL, cR, sL, sR, t)
            np.testing.assert_allclose(
                L.numpy(), golden[f"c{k}_geo_L_{i}"], atol=_tol(dtype), rtol=0
            )
            np.testing.assert_allclose(
                R.numpy(), golden[f"c{k}_geo_R_{i}"], atol=_tol(dtype), rtol=0
            )
            # The preset: a loop over layers (here one), geodesic + curve_over_id(p = t).
            [(L, R)] = ref.moft_merge([(cL, cR)], [(sL, sR)], t)
            np.testing.assert_allclose(
                L.numpy(), golden[f"c{k}_georst_L_{i}"], atol=_tol(dtype), rtol=0
            )
            np.testing.assert_allclose(
                R.numpy(), golden[f"c{k}_georst_R_{i}"], atol=_tol(dtype), rtol=0
            )


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_fast_preset_matches_golden(golden, dtype):
    for k in range(int(golden["cases"])):
        cL, cR, sL, sR = _case(golden, k, dtype)
        nb = int(golden[f"c{k}_nb"])
        b = cL.shape[-1]
        for i, t in enumerate(golden["t"]):
            t = float(t)
            # Cayley-space merge alone, concept weight 1 - t (docs/math.md §3.2 / golden README).
            ts = torch.tensor([1 - t, t], dtype=dtype)
            L, R = ref.merge_inside_cayley_space_batch(cL, cR, sL, sR, ts)
            np.testing.assert_allclose(
                L.numpy(), golden[f"c{k}_fast_L_{i}"], atol=_tol(dtype), rtol=0
            )
            np.testing.assert_allclose(
                R.numpy(), golden[f"c{k}_fast_R_{i}"], atol=_tol(dtype), rtol=0
            )
            # The stacked preset on a stack of two identical layers [2, nb, b, b].
            st = lambda x: torch.stack([x, x])
            out = ref.moft_merge_fast({b: (st(cL), st(cR))}, {b: (st(sL), st(sR))}, t)
            L, R = out[b]
            assert L.shape == (2, nb, b, b)
            for j in range(2):
                np.testing.assert_allclose(
                    L[j].numpy(), golden[f"c{k}_fastrst_L_{i}"], atol=_tol(dtype), rtol=0
                )
                np.testing.assert_allclose(
                    R[j].numpy(), golden[f"c{k}_fastrst_R_{i}"], atol=_tol(dtype), rtol=0
                )


def test_endpoints_of_the_geodesic_are_the_adapters(golden):
    cL, cR, sL, sR = _case(golden, 2, torch.float64)
    L0, _ = ref.blocked_geodesic_combination(cL, cR, sL, sR, 0.0)
    L1, _ = ref.blocked_geodesic_combination(cL, cR, sL, sR, 1.0)
    np.testing.assert_allclose(L0.numpy(), ref.cayley(cL).numpy(), atol=1e-10)
    np.testing.assert_allclose(L1.numpy(), ref.cayley(sL).numpy(), atol=1e-10)
