"""The GPU solve kernel of ``benchmarks/experiments/pallas_solve.py``, run by Pallas' interpreter.

The kernel is an experiment for the next GPU session; this checks its arithmetic (Gauss-Jordan
without pivoting, identity padding to a power of two) against float64 numpy on the CPU, so a GPU
run only has to answer how fast it is.
"""

from __future__ import annotations

import numpy as np
import pytest

from benchmarks.experiments.pallas_solve import solve_no_pivot


@pytest.mark.parametrize("b", [5, 20, 40, 64])
def test_solve_no_pivot_matches_float64(b):
    rng = np.random.default_rng(b)
    x = rng.standard_normal((3, b, b))
    s = 0.5 * (x - np.swapaxes(x, -1, -2)) / np.sqrt(b)  # skew: I - S has symmetric part I
    eye = np.eye(b)
    rhs = rng.standard_normal((3, b, b + 3))  # a right-hand side of another width is padded too
    got = np.asarray(solve_no_pivot((eye - s).astype(np.float32), rhs.astype(np.float32), interpret=True))
    want = np.linalg.solve(eye - s, rhs)
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, atol=2e-6 * np.abs(want).max())
