"""Experiment: the geodesic point ``U1 W^t`` (``W = U1^T U2``) with matmuls only, no ``eigh``.

    python -m benchmarks.experiments.poly_power [--n 2880] [--b 40] [--reps 5]

On a GPU the batched ``eigh`` is most of the exact merge (RESULTS.md, GPU). For an orthogonal
``W`` with ``P = sym(W) = cos(Theta)`` and ``K = skew(W)``, both commute and

    W^t = F(P) + K G(P),    F(c) = cos(t arccos c),  G(c) = sin(t arccos c) / sin(arccos c),

where F and G are analytic in c except at c = -1 (a rotation by pi). On ``c in [cos theta*, 1]`` they
are polynomials to float32 accuracy; the degree-d fit is evaluated in ``y = (P - c0) / h`` (spectrum
in [-1, 1]) by Paterson-Stockmeyer. Whether every eigenvalue lies in the fitted interval is checked
with Chebyshev: ``||T_16(Y)||_F^2 <= b`` implies every eigenvalue of Y is within ~0.0125 of [-1, 1],
and the fit covers that margin. Blocks beyond theta* fall back to the eigh path.

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

from orthofuse_jax.geometry import cayley, geodesic_path_cayley
from orthofuse_jax.geometry._linalg import mm
from orthofuse_jax.geometry.spectral import _polar_step

from ..common import random_skew_blocks

DEGREE = 23
THETA_MAX = 2.4
MARGIN = 0.02  # in y units: the fit covers y in [-1 - MARGIN, 1]; T_16 bounds the excess by ~0.0125
SQUARINGS = 3  # exp(tL): ||tL / 2^3|| <= 0.3 for |t| <= 1
TAYLOR = 10


def _log_coefficients(degree: int, theta_max: float, margin: float):
    """``(a, c0, h)``: monomial coefficients in ``y = (c - c0) / h`` of the interpolant of
    ``arccos(c) / sin(arccos(c))`` on ``y in [-1 - margin, 1]`` (float64, t-independent)."""
    c_lo = np.cos(theta_max)
    c0, h = (c_lo + 1.0) / 2, (1.0 - c_lo) / 2
    n = degree + 1
    x = np.cos(np.pi * (np.arange(n) + 0.5) / n)
    y = -1.0 - margin + (2.0 + margin) * (x + 1) / 2
    phi = np.arccos(c0 + h * y)
    a = np.linalg.solve(np.vander(y, n, increasing=True), phi / np.sin(phi))
    return a, c0, h


_A, _C0, _H = _log_coefficients(DEGREE, THETA_MAX, MARGIN)


def _ps(coef, ys, z):
    """sum_k coef[k] y^k with baby steps ys = [I, y, .., y^(m-1)] and z = y^m (Horner in z)."""
    m, d = len(ys), len(coef) - 1
    out = None
    for j in reversed(range(d // m + 1)):
        blk = sum(coef[j * m + i] * ys[i] for i in range(m) if j * m + i <= d)
        out = blk if out is None else mm(out, z) + blk
    return out


def log_poly(w):
    """``(log W, ok)`` for orthogonal W with every rotation angle <= THETA_MAX (ok says so)."""
    dtype, b = w.dtype, w.shape[-1]
    eye = jnp.eye(b, dtype=dtype)
    p = 0.5 * (w + jnp.swapaxes(w, -1, -2))
    k = 0.5 * (w - jnp.swapaxes(w, -1, -2))
    y = (p - _C0 * eye) / _H
    y2 = mm(y, y)
    y3 = mm(y2, y)
    y4 = mm(y2, y2)
    ys = [jnp.broadcast_to(eye, y.shape), y, y2, y3]
    hm = _ps([float(c) for c in _A], ys, y4)
    t4 = 8.0 * y4 - 8.0 * y2 + eye
    t8 = 2.0 * mm(t4, t4) - eye
    t16 = 2.0 * mm(t8, t8) - eye
    ok = jnp.sum(t16 * t16, axis=(-1, -2)) <= b * 1.001
    return mm(k, hm), ok


def expm_taylor(x):
    """exp(X) for ||X|| <= 2.4 by Taylor (degree TAYLOR) and SQUARINGS squarings."""
    x = x / 2.0**SQUARINGS
    eye = jnp.broadcast_to(jnp.eye(x.shape[-1], dtype=x.dtype), x.shape)
    x2 = mm(x, x)
    x3 = mm(x2, x)
    fact = np.cumprod([1.0] + list(range(1, TAYLOR + 1)))
    e = _ps([1.0 / f for f in fact], [eye, x, x2], x3)
    for _ in range(SQUARINGS):
        e = mm(e, e)
    return e


def power_poly(w, t):
    lg, ok = log_poly(w)
    t = jnp.asarray(t, w.dtype)
    return expm_taylor(t * lg), ok & (jnp.abs(t) <= 1.0)


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
    print("sum |coef|:", np.abs(_A).sum())


if __name__ == "__main__":
    main()
