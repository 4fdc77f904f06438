"""Device meshes for data-parallel work: ``--mesh data=D`` parsed, built, and used to place arrays.

A mesh spec is ``AXIS=SIZE[,AXIS=SIZE...]`` (``data=4``). :func:`make_mesh` builds a
:class:`jax.sharding.Mesh` of that shape over the first devices (all processes' devices in a
multi-host run), :func:`data_mesh` the one-axis ``data`` mesh over this process's devices that
generation splits its images over. :func:`replicate` puts a tree whole on every device and
:func:`shard_batch` splits the leading (batch) axis of every leaf over ``data``; both build global
arrays from host values with :func:`jax.make_array_from_callback`, so every process passing the
same host values is how a multi-host run feeds them (docs/design.md, "Several devices").
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

__all__ = [
    "DATA_AXIS",
    "MeshSpecError",
    "data_devices",
    "data_mesh",
    "data_size",
    "make_mesh",
    "parse_mesh",
    "replicate",
    "shard_batch",
]

# The mesh axis a batch is split over.
DATA_AXIS = "data"


class MeshSpecError(ValueError):
    """A mesh request that is malformed, names an axis the work has no use for, or asks for more
    devices than there are."""


_ENTRY = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_]*)\s*=\s*([0-9]+)\s*$")


def parse_mesh(text: str) -> dict[str, int]:
    """``"data=4"`` -> ``{"data": 4}``; :class:`MeshSpecError` naming the bad entry (one line)."""
    axes: dict[str, int] = {}
    for entry in str(text).split(","):
        m = _ENTRY.match(entry)
        if m is None:
            raise MeshSpecError(
                f"mesh {text!r}: entry {entry.strip()!r} is not AXIS=SIZE (e.g. data=4)"
            )
        name, size = m.group(1), int(m.group(2))
        if size < 1:
            raise MeshSpecError(f"mesh {text!r}: axis {name!r} has size {size}; sizes must be >= 1")
        if name in axes:
            raise MeshSpecError(f"mesh {text!r}: axis {name!r} is given twice")
        axes[name] = size
    return axes


def make_mesh(axes: Mapping[str, int], devices=None) -> Mesh:
    """A mesh of shape ``axes`` over ``devices`` (default: the first of ``jax.devices()``).

    Axes are ``Auto`` (XLA propagates layouts inside ``jit``). Raises :class:`MeshSpecError` when
    the mesh needs more devices than there are.
    """
    from jax.sharding import AxisType

    devs = list(jax.devices() if devices is None else devices)
    need = math.prod(axes.values())
    if not axes or need > len(devs):
        shape = ",".join(f"{k}={v}" for k, v in axes.items()) or "(empty)"
        raise MeshSpecError(f"mesh {shape} needs {need} devices, {len(devs)} available")
    grid = np.asarray(devs[:need], dtype=object).reshape(tuple(axes.values()))
    return Mesh(grid, tuple(axes), axis_types=(AxisType.Auto,) * len(axes))


def data_devices(spec: str | int | None, available: int) -> int:
    """The device count ``D`` asked for by ``spec``: ``"data=D"``, ``D`` or ``None`` (all ``available``).

    Raises :class:`MeshSpecError` naming the value when the spec is malformed, names an axis other
    than ``data``, or ``D`` is not in ``[1, available]``.
    """
    if spec is None:
        return available
    if isinstance(spec, str):
        axes = parse_mesh(spec)
        if set(axes) != {DATA_AXIS}:
            raise MeshSpecError(
                f"mesh {spec!r}: expected '{DATA_AXIS}=D' (one axis, '{DATA_AXIS}')"
            )
        count = axes[DATA_AXIS]
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
    """A mesh ``(D,)`` named ``data`` over the first ``D`` local devices (``spec`` as
    :func:`data_devices`).

    Axis type ``Auto``: jit propagates the batch sharding through the Flax modules, which carry
    no sharding annotations of their own.
    """
    devices = jax.local_devices()
    return make_mesh({DATA_AXIS: data_devices(spec, len(devices))}, devices)


def data_size(mesh: Mesh | None) -> int:
    """How many ways ``mesh`` splits a batch: its ``data`` axis size (1 without a mesh or axis)."""
    if mesh is None:
        return 1
    return int(dict(mesh.shape).get(DATA_AXIS, 1))


def _global(x, sharding: NamedSharding):
    a = np.asarray(x)
    return jax.make_array_from_callback(a.shape, sharding, lambda idx: a[idx])


def replicate(tree, mesh: Mesh):
    """Every leaf of ``tree`` whole on every device of ``mesh`` (``NamedSharding(mesh, P())``)."""
    rep = NamedSharding(mesh, P())
    return jax.tree_util.tree_map(lambda x: _global(x, rep), tree)


def shard_batch(batch, mesh: Mesh):
    """Every leaf of ``batch`` split along its leading axis over ``data`` (``P("data")``).

    Raises ``ValueError`` naming the leaf whose leading axis the ``data`` size does not divide.
    """
    d = data_size(mesh)
    split = NamedSharding(mesh, P(DATA_AXIS)) if DATA_AXIS in mesh.axis_names else None

    def put(path, x):
        a = np.asarray(x)
        if split is None:
            return _global(a, NamedSharding(mesh, P()))
        if a.ndim == 0 or a.shape[0] % d:
            name = jax.tree_util.keystr(path, simple=True, separator="/")
            raise ValueError(
                f"batch entry {name!r} of shape {list(a.shape)}: its leading axis is not "
                f"divisible by the mesh's data size {d}"
            )
        return _global(a, split)

    return jax.tree_util.tree_map_with_path(put, batch)
