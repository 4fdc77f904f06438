"""Shared test configuration.

* float64 is enabled for the whole suite; every test passes explicit dtypes, so float32 paths
  are exercised as float32.
* ``kernel_build``: a module that uses it runs its tests twice, with the compiled kernels' build
  for this CPU and with their AVX2 build (``ORTHOFUSE_JAX_ISA=avx2``); on a CPU without
  AVX-512 both are the AVX2 build.
* Hypothesis profiles: ``ci`` (default; derandomized, fixed examples, CI-sized) and
  ``thorough`` (many more examples), chosen with ``ORTHOFUSE_HYPOTHESIS_PROFILE``.
"""

from __future__ import annotations

import os

# Before any JAX computation: one XLA CPU thread avoids jaxlib 0.10.2's LAPACK pool deadlock
# (orthofuse_jax/_runtime.py); importing orthofuse_jax sets the same default.
os.environ.setdefault("PJRT_NPROC", "1")
os.environ.setdefault(
    "ORTHOFUSE_JAX_COMPILE_CACHE", "off"
)  # in-process CLI tests must not write to ~/.cache; test_cli covers the cache

import jax
import pytest
from hypothesis import HealthCheck, settings

jax.config.update("jax_enable_x64", True)

settings.register_profile(
    "ci",
    max_examples=25,
    derandomize=True,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "thorough",
    max_examples=500,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile(os.environ.get("ORTHOFUSE_HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(scope="module", params=["native", "avx2"])
def kernel_build(request):
    """The compiled kernels' build a module's tests run: the one for this CPU, then the AVX2 one.
    Module-scoped (and so setting the variable itself): hypothesis tests take no function-scoped
    fixtures. The variable is read at every kernel call."""
    from orthofuse_jax import _native

    old = os.environ.pop("ORTHOFUSE_JAX_ISA", None)
    if request.param == "avx2":
        os.environ["ORTHOFUSE_JAX_ISA"] = "avx2"
        if _native.vectors_native():  # every CPU with a tuned build has AVX2
            assert _native.isa() == "avx2"
    yield request.param
    os.environ.pop("ORTHOFUSE_JAX_ISA", None)
    if old is not None:
        os.environ["ORTHOFUSE_JAX_ISA"] = old
