"""Device meshes for data-parallel work: ``--mesh data=D`` parsed, built and used to place arrays.

A mesh spec is ``AXIS=SIZE[,AXIS=SIZE...]`` (``data=4``). :func:`make_mesh` builds a
:class:`jax.sharding.Mesh` of that shape over the first devices (all processes' devices in a
multi-host run); :func:`replicate` puts a tree whole on every device and :func:`shard_batch` splits
the leading (batch) axis of every leaf over the ``data`` axis. Both build global arrays from host
values with :func:`jax.make_array_from_callback`, so every process passing the same host values is
how a multi-host run feeds them.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

__all__ = ["DATA_AXIS", "data_size", "make_mesh", "parse_mesh", "replicate", "shard_batch"]

# The mesh axis a batch is split over.
DATA_AXIS = "data"

_ENTRY = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_]*)\s*=\s*([0-9]+)\s*$")


def parse_mesh(text: str) -> dict[str, int]:
    """``"data=4"`` -> ``{"data": 4}``; ``ValueError`` naming the bad entry (one line)."""
    axes: dict[str, int] = {}
    for entry in str(text).split(","):
        m = _ENTRY.match(entry)
        if m is None:
            raise ValueError(
                f"mesh {text!r}: entry {entry.strip()!r} is not AXIS=SIZE (e.g. data=4)"
            )
        name, size = m.group(1), int(m.group(2))
        if size < 1:
            raise ValueError(f"mesh {text!r}: axis {name!r} has size {size}; sizes must be >= 1")
        if name in axes:
            raise ValueError(f"mesh {text!r}: axis {name!r} is given twice")
        axes[name] = size
    return axes


def make_mesh(axes: Mapping[str, int], devices=None) -> Mesh:
    """A mesh of shape ``axes`` over ``devices`` (default: the first of ``jax.devices()``).

    Axes are ``Auto`` (XLA propagates layouts inside ``jit``). Raises ``ValueError`` when the
    mesh needs more devices than there are.
    """
    from jax.sharding import AxisType

    devs = list(jax.devices() if devices is None else devices)
    need = math.prod(axes.values())
    if not axes or need > len(devs):
        shape = ",".join(f"{k}={v}" for k, v in axes.items()) or "(empty)"
        raise ValueError(f"mesh {shape} needs {need} devices, {len(devs)} available")
    grid = np.asarray(devs[:need], dtype=object).reshape(tuple(axes.values()))
    return Mesh(grid, tuple(axes), axis_types=(AxisType.Auto,) * len(axes))


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
