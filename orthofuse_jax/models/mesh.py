"""A one-axis ``data`` mesh over this process's devices, for data-parallel generation.

``generate`` replicates the UNet and VAE parameters on every device of the mesh and splits the
batch of images over its ``data`` axis, so each device denoises its own images with no
communication (docs/design.md, "Several devices").
"""

from __future__ import annotations

import jax
from jax.sharding import AxisType, Mesh

__all__ = ["DATA_AXIS", "MeshSpecError", "data_mesh", "parse_mesh"]

DATA_AXIS = "data"


class MeshSpecError(ValueError):
    """A mesh request that names an unknown axis or a device count this process cannot give."""


def parse_mesh(spec: str | int | None, available: int) -> int:
    """The device count ``D`` asked for by ``spec``: ``"data=D"``, ``D`` or ``None`` (all ``available``).

    Raises :class:`MeshSpecError` naming the value when ``D`` is not a whole number in
    ``[1, available]`` or the axis is not ``data``.
    """
    if spec is None:
        return available
    if isinstance(spec, str):
        name, sep, value = spec.partition("=")
        if not sep or name.strip() != DATA_AXIS:
            raise MeshSpecError(
                f"mesh {spec!r}: expected '{DATA_AXIS}=D' (one axis, '{DATA_AXIS}')"
            )
        try:
            count = int(value)
        except ValueError:
            raise MeshSpecError(f"mesh {spec!r}: D must be a whole number, got {value!r}") from None
    elif isinstance(spec, int) and not isinstance(spec, bool):
        count = spec
    else:
        raise MeshSpecError(f"mesh {spec!r}: expected '{DATA_AXIS}=D' or a device count")
    if not 1 <= count <= available:
        raise MeshSpecError(
            f"mesh {spec!r}: {DATA_AXIS}={count} devices asked for, this process has {available} "
            f"local device(s) (1 <= D <= {available})"
        )
    return count


def data_mesh(spec: str | int | None = None) -> Mesh:
    """A mesh ``(D,)`` named ``data`` over the first ``D`` local devices (``spec`` as :func:`parse_mesh`).

    Axis type ``Auto``: jit propagates the batch sharding through the Flax modules, which carry
    no sharding annotations of their own.
    """
    devices = jax.local_devices()
    count = parse_mesh(spec, len(devices))
    return jax.make_mesh(
        (count,), (DATA_AXIS,), axis_types=(AxisType.Auto,), devices=devices[:count]
    )
