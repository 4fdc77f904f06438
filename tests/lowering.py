"""Programs lowered for NVIDIA GPUs on a machine without one."""

from __future__ import annotations

import contextlib

import jax

# Where JAX's Pallas (Triton) lowering asks which GPU it compiles for, an H100 is the target.
_TARGET = dict(device_kind="NVIDIA H100", num_cores=132, platform="gpu")


@contextlib.contextmanager
def _gpu_target():
    if jax.devices()[0].platform == "gpu":
        yield
        return
    device = jax.sharding.AbstractDevice(**_TARGET)
    with jax.sharding.use_abstract_mesh(
        jax.sharding.AbstractMesh((1,), ("gpu",), abstract_device=device)
    ):
        yield


def cuda_text(fn, *args) -> str:
    """The StableHLO text of ``jax.jit(fn)`` at ``args``, lowered for CUDA (traced and lowered in
    the GPU target's context: the trace records it)."""
    with _gpu_target():
        return jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
