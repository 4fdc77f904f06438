"""Experiment (now the library's ``algorithm="matmul"``): the geodesic point ``U1 W^t`` with matmuls only.

    python -m benchmarks.experiments.poly_power [--n 2880] [--b 40] [--reps 5]

On a GPU the batched ``eigh`` is most of the exact merge (RESULTS.md, GPU). For an orthogonal
``W`` with ``P = sym(W) = cos(Theta)`` and ``K = skew(W)``, both commute. Two product-only forms
were tried (one core, 2880 blocks of b = 40, angles of each input 0.1-1 rad, t = 0.6):

1. ``W^t = F(P) + K G(P)``, ``F(c) = cos(t arccos c)``, ``G(c) = sin(t arccos c)/sin(arccos c)``:
   the polynomial coefficients depend on t, so they are computed at run time, in float32, from
   an ill-conditioned monomial basis (inverse Vandermonde entries up to 1e6): error 7.5e-4.
   Rejected.
2. ``log W = K h(P)``, ``h(c) = arccos(c)/sin(arccos c)``, which does not depend on t: its
   degree-23 monomial coefficients are fixed in float64 (they sum to about 10), then
   ``exp(t log W)`` by Taylor and squaring: error 2.2e-7 vs the eigh path's 2.7e-7, 13% less CPU
   time. Adopted as ``geometry/polynomial.py`` (``merge(..., algorithm="matmul")``).

This file measures accuracy against float64 (scipy) and CPU time against the library's eigh path.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

import orthofuse_jax  # noqa: F401
import jax
import jax.numpy as jnp
import scipy.linalg

from orthofuse_jax.geometry import cayley, expm_skew_taylor, geodesic_path_cayley, log_polynomial
from orthofuse_jax.geometry._linalg import mm
from orthofuse_jax.geometry.spectral import _polar_step

from ..common import random_skew_blocks


def power_poly(w, t):
    """``(W^t, ok)`` with the library's product-only log and exp (``geometry/polynomial.py``)."""
    lg, ok = log_polynomial(w)
    return expm_skew_taylor(jnp.asarray(t, w.dtype) * lg, max_squarings=4), ok


@jax.jit
def geodesic_poly(a1, a2, t):
    u1, u2 = cayley(a1), cayley(a2)
    w = mm(jnp.swapaxes(u1, -1, -2), u2)
    wt, ok = power_poly(w, t)
    return _polar_step(mm(u1, wt)), ok


@jax.jit
def geodesic_eigh(a1, a2, t):
    return geodesic_path_cayley(a1, a2).at(t)


def _cay64(a):
    s = 0.5 * (a - np.swapaxes(a, -1, -2))
    eye = np.eye(a.shape[-1])
    return np.linalg.solve(eye - s, eye + s)


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=2880)
    ap.add_argument("--b", type=int, default=40)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--t", type=float, default=0.6)
    args = ap.parse_args(argv)
    rng = np.random.default_rng(0)
    a1 = random_skew_blocks(rng, (args.n,), args.b)
    a2 = random_skew_blocks(rng, (args.n,), args.b)
    u1, u2 = _cay64(a1.astype(np.float64)), _cay64(a2.astype(np.float64))
    w = np.swapaxes(u1, -1, -2) @ u2
    ang = np.abs(np.angle(np.linalg.eigvals(w)))
    print(f"relative angles: max {ang.max():.3f}, 99.9% {np.quantile(ang.max(-1), 0.999):.3f}")
    sub = slice(0, 200)
    ref = np.stack([u1[i] @ np.real(scipy.linalg.fractional_matrix_power(w[i], args.t)) for i in range(200)])
    for name, fn in [("eigh", geodesic_eigh), ("poly", geodesic_poly)]:
        out = fn(a1, a2, np.float32(args.t))
        y, ok = out if isinstance(out, tuple) else (out, None)
        y = np.asarray(y)
        err = np.abs(y[sub].astype(np.float64) - ref).max()
        orth = np.abs(np.swapaxes(y, -1, -2) @ y - np.eye(args.b)).max()
        extra = "" if ok is None else f", ok {int(np.asarray(ok).sum())}/{args.n}"
        ts = []
        for _ in range(args.reps):
            t0 = time.perf_counter()
            jax.block_until_ready(fn(a1, a2, np.float32(args.t)))
            ts.append(time.perf_counter() - t0)
        print(f"{name}: err vs f64 {err:.2e}, orth {orth:.2e}{extra}, median {1e3 * np.median(ts):.1f} ms")


if __name__ == "__main__":
    main()
