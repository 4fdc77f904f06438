"""Matrix products at full float32 precision on every backend.

JAX's default precision lets XLA run float32 matrix products in TF32 on NVIDIA GPUs (and
bfloat16 passes on TPUs), which costs about three decimal digits. The geometry is checked to
float32 round-off against float64 references, so every product in the package's manifold
math asks for ``Precision.HIGHEST``: the same float32 results on CPU, GPU and TPU. For the
small batched blocks of a GS adapter the products are memory-bound, so on an H100 this costs
about 10% of a product's time (benchmarks/RESULTS.md).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

HIGHEST = jax.lax.Precision.HIGHEST

mm = functools.partial(jnp.matmul, precision=HIGHEST)
"""``a @ b`` (batched) at full precision."""

einsum = functools.partial(jnp.einsum, precision=HIGHEST)
"""``jnp.einsum`` at full precision."""
