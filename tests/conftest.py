"""Shared test configuration.

* float64 is enabled for the whole suite; every test passes explicit dtypes, so float32 paths
  are exercised as float32.
* Hypothesis profiles: ``ci`` (default; derandomized, fixed examples, CI-sized) and
  ``thorough`` (many more examples), chosen with ``ORTHOFUSE_HYPOTHESIS_PROFILE``.
"""

from __future__ import annotations

import os

import jax
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
