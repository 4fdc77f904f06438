"""Fixtures of the compiled kernels' tests here (test_native_*.py); tests/conftest.py has
``kernel_build``, and native_setup.py what is not a fixture."""

from __future__ import annotations

import jax
import pytest


@pytest.fixture(params=["1", "0"])
def native_switch(request, monkeypatch):
    """``ORTHOFUSE_JAX_NATIVE``: the compiled kernels, then (``"0"``) the XLA compositions. It is
    read when a function is traced, so the caches are cleared."""
    monkeypatch.setenv("ORTHOFUSE_JAX_NATIVE", request.param)
    jax.clear_caches()
    return request.param


@pytest.fixture(params=["1", "3"])
def kernel_threads(request, monkeypatch):
    """``ORTHOFUSE_JAX_THREADS`` (read at every kernel call): one thread, then three."""
    monkeypatch.setenv("ORTHOFUSE_JAX_THREADS", request.param)
    return request.param
