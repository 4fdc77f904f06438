"""What test_native_geodesic.py and test_native_sweep.py share besides their float64 references
(geodesic_reference.py) and fixtures (conftest.py): the modules' marks, their inputs, and the
checks of where a kernel is lowered and of its derivatives."""

from __future__ import annotations

import importlib

import jax
import numpy as np
import pytest
from jax.test_util import check_grads
from lowering import cuda_text

from orthofuse_jax import _native

from .geodesic_reference import cay, rotations

dispatch = importlib.import_module("orthofuse_jax.fusion._dispatch")

MARKS = [
    pytest.mark.skipif(jax.default_backend() != "cpu", reason="a CPU kernel"),
    pytest.mark.usefixtures("kernel_build"),  # both builds of the kernels (tests/conftest.py)
]


def inputs(rng, batch, n, angle, orthogonal=(False, False)):
    """``x1, x2 [*batch, n, n]``: raw Cayley parameters of rotations by up to about ``angle`` per
    plane (:func:`rotations`), or for a side ``orthogonal`` marks the rotation itself."""
    x1, x2 = (rotations(rng, batch, n, angle) for _ in range(2))
    return (cay(x1) if orthogonal[0] else x1, cay(x2) if orthogonal[1] else x2)


def one_plane(angles, n):
    """Raw Cayley parameters ``[len(angles), n, n]``: block k turns the plane of axes 1 and 2 by
    ``angles[k]``, and nothing else."""
    x = np.zeros((len(angles), n, n))
    x[:, 1, 2], x[:, 2, 1] = -np.tan(np.asarray(angles) / 2), np.tan(np.asarray(angles) / 2)
    return x


def check_lowerings(fn, target, *args):
    """``fn`` at ``args`` lowered for GPUs never calls the kernel ``target`` (e.g.
    ``"orthofuse_sweep"``); lowered for the CPU it calls its float32 handler where the kernels run."""
    traced = jax.jit(fn).trace(*args)
    assert target not in cuda_text(fn, *args)
    if _native.available():
        assert f"{target}_f32" in traced.lower(lowering_platforms=("cpu",)).as_text()


def check_derivatives(fn, *args):
    """First derivatives of ``fn``, forward and reverse, against finite differences: under
    ``jax.custom_jvp`` they are the XLA compositions'."""
    check_grads(fn, args, order=1, modes=("fwd", "rev"), atol=1e-5, rtol=1e-5)
