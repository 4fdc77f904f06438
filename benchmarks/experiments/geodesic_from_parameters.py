"""Experiment (not built): the exact merge's geodesic from the raw Cayley parameters, checked in float64.

    python -m benchmarks.experiments.geodesic_from_parameters [--n 40] [--blocks 50]

With ``U_i = Cay(A_i) = (I - A_i)^-1 (I + A_i)`` (skew ``A_i``) the relative rotation is
``W = U1^T U2 = Cay(B)`` with ``B = (I + A1)^-1 B' (I + A1)``, ``B' = (A2 - A1)(I - A1 A2)^-1``
(``W -+ I = (I + A1)^-1 2 {A2 - A1, I - A1 A2} (I - A2)^-1``). Since ``Cay(B) = exp(2 artanh B)``,
``W^t = Cay(tanh(t artanh B))``, and the similarity folds into the outer factors:

    U1 W^t = [(I - C)(I - A1)]^-1 (I + C)(I + A1),    C = tanh(t artanh B').

Per block that is three solves with the restoration's (B', the point, curve_over_id) and about 12
products (A1 A2; B'^2, its powers and a degree-23 odd polynomial for ``C``; ``C A1``, which both
outer factors share), against the kernel's three inversions and about 19 products: about 25% less
work, not the factor 2.5 that exact <= 2x fast asks for (benchmarks/RESULTS.md). Not
built: ``B'`` is not normal, so the log interpolant's range check (an LDL^T of a symmetric matrix)
has no direct counterpart, and ``C``'s polynomial would depend on t.

This script only checks the identity: ``tanh(t artanh B')`` by an eigendecomposition of ``B'``
(float64, numpy), against scipy's ``expm``/``logm`` of ``U1^T U2``.
"""

from __future__ import annotations

import argparse

import numpy as np
import scipy.linalg

from .. import common


def from_parameters(a1: np.ndarray, a2: np.ndarray, t: float) -> np.ndarray:
    eye = np.eye(a1.shape[-1])
    bp = (a2 - a1) @ np.linalg.inv(eye - a1 @ a2)
    w, v = np.linalg.eig(bp)  # eigenvalues i tan(theta_k / 2)
    c = np.real(v @ np.diag(np.tanh(t * np.arctanh(w))) @ np.linalg.inv(v))
    return np.linalg.solve((eye - c) @ (eye - a1), (eye + c) @ (eye + a1))


def geodesic(a1: np.ndarray, a2: np.ndarray, t: float) -> np.ndarray:
    eye = np.eye(a1.shape[-1])
    u1, u2 = (np.linalg.solve(eye - a, eye + a) for a in (a1, a2))
    return u1 @ np.real(scipy.linalg.expm(t * np.real(scipy.linalg.logm(u1.T @ u2))))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=40)
    p.add_argument("--blocks", type=int, default=50)
    args = p.parse_args(argv)
    rng = np.random.default_rng(0)
    a1, a2 = (common.random_skew_blocks(rng, (args.blocks,), args.n).astype(np.float64) for _ in range(2))
    for t in (0.0, 0.3, 0.6, 1.0, 1.5):
        err = max(np.abs(from_parameters(x, y, t) - geodesic(x, y, t)).max() for x, y in zip(a1, a2))
        print(f"t = {t:.1f}: max |U(t) - U1 expm(t logm(U1^T U2))| = {err:.1e} over {args.blocks} blocks of {args.n}")


if __name__ == "__main__":
    main()
