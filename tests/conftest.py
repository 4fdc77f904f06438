"""Shared test configuration.

* float64 is enabled for the whole suite; every test passes explicit dtypes, so float32 paths
  are exercised as float32.
* Hypothesis profiles: ``ci`` (default; derandomized, fixed examples, CI-sized) and
  ``thorough`` (many more examples), chosen with ``ORTHOFUSE_HYPOTHESIS_PROFILE``.
"""

from __future__ import annotations

import os

# Before any JAX computation: one XLA CPU thread avoids jaxlib 0.10.2's LAPACK pool deadlock
# (orthofuse_jax/_runtime.py); importing orthofuse_jax sets the same default.
os.environ.setdefault("PJRT_NPROC", "1")
os.environ.setdefault("ORTHOFUSE_JAX_COMPILE_CACHE", "off")  # in-process CLI tests must not write to ~/.cache; test_cli covers the cache

import jax  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

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
