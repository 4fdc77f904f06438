"""float64 references for the product-only exact merge and sweep (scipy ``logm``/``expm``, LAPACK
solves), shared by test_native_geodesic.py and test_native_sweep.py."""

from __future__ import annotations

import numpy as np
import scipy.linalg


def skew(x):
    return 0.5 * (x - np.swapaxes(x, -1, -2))


def cay(a):
    s = skew(np.asarray(a, np.float64))
    eye = np.eye(s.shape[-1])
    return np.linalg.solve(eye - s, eye + s)


def logm_real(u):
    x = np.real(scipy.linalg.logm(u))
    return skew(x)


def reference(x1, x2, t, f, restore, orthogonal):
    """float64: ``U1 expm(t logm(U1^T U2))``, then Cay(f/2 Y), expm(f logm(Y)) or nothing."""
    batch = np.broadcast_shapes(x1.shape[:-2], np.shape(t), np.shape(f))
    n = x1.shape[-1]
    u1 = np.broadcast_to(
        np.asarray(x1, np.float64) if orthogonal[0] else cay(x1), batch + (n, n)
    ).reshape(-1, n, n)
    u2 = np.broadcast_to(
        np.asarray(x2, np.float64) if orthogonal[1] else cay(x2), batch + (n, n)
    ).reshape(-1, n, n)
    tb = np.broadcast_to(np.asarray(t, np.float64), batch).reshape(-1)
    fb = np.broadcast_to(np.asarray(f, np.float64), batch).reshape(-1)
    out = []
    for a, b, tt, ff in zip(u1, u2, tb, fb):
        y = a @ scipy.linalg.expm(tt * logm_real(a.T @ b))
        if restore == "cayley":
            k = 0.5 * ff * skew(y)
            y = np.linalg.solve(np.eye(n) - k, np.eye(n) + k)
        elif restore == "exact":
            y = scipy.linalg.expm(ff * logm_real(y))
        out.append(y)
    return np.stack(out).reshape(batch + (n, n))


def rotations(rng, shape, n, angle):
    """Raw Cayley parameters whose rotations turn by at most about ``angle`` per plane."""
    a = rng.standard_normal((*shape, n, n))
    s = skew(a)
    norm = np.linalg.norm(s, ord=2, axis=(-2, -1))[..., None, None] if n > 1 else 1.0
    return s / np.maximum(norm, 1e-12) * np.tan(angle / 2)
