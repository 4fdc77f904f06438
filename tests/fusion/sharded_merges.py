"""Sharded merges and sweeps on four forced CPU devices, against the same calls unsharded.

Run as a script by ``test_sharding.py`` (the device count is fixed when JAX starts, so it needs a
process of its own); prints one JSON object of findings.
"""

from __future__ import annotations

import json

import jax

jax.config.update("jax_num_cpu_devices", 4)

import numpy as np  # noqa: E402
from jax.sharding import AxisType, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from orthofuse_jax import configure_cpu_threads  # noqa: E402
from orthofuse_jax.fusion import merge, sweep  # noqa: E402
from orthofuse_jax.fusion.demo import demo_pair  # noqa: E402

configure_cpu_threads()


def place(adapter, mesh, spec):
    """Stacks laid out by ``spec`` (layers, blocks, ...), scales whole."""
    return jax.tree.map(
        lambda x: jax.device_put(x, NamedSharding(mesh, spec if x.ndim >= 4 else P())), adapter
    )


def padded(x) -> tuple:
    """``x``'s partition spec with one entry per axis."""
    spec = tuple(x.sharding.spec)
    return spec + (None,) * (x.ndim - len(spec))


def compare(out, ref) -> dict:
    """The largest difference from ``ref`` and the layout of each output stack."""
    diff = max(
        float(np.max(np.abs(np.asarray(getattr(out.stacks[k], w)) - np.asarray(getattr(s, w)))))
        for k, s in ref.stacks.items()
        for w in ("L", "R")
    )
    specs = sorted({str(padded(s.R)) for s in out.stacks.values()})
    return {"diff": diff, "specs": specs}


def main() -> None:
    concept, style = demo_pair()
    found = {"devices": jax.device_count()}
    grid = jax.make_mesh((2, 2), ("a", "b"), axis_types=(AxisType.Auto,) * 2)
    c, s = place(concept, grid, P("a", "b")), place(style, grid, P("a", "b"))
    for method, restore in (("geodesic", "none"), ("geodesic", "exact"), ("cayley", "cayley")):
        ref = merge([concept, style], t=0.6, method=method, restore=restore)
        out = merge([c, s], t=0.6, method=method, restore=restore)
        found[f"merge-{method}-{restore}"] = compare(out, ref)
    ts = np.linspace(0.0, 1.0, 4)
    ref = sweep(concept, style, ts)
    found["sweep"] = compare(sweep(c, s, ts), ref)
    c1, s1 = place(concept, grid, P("a")), place(style, grid, P("a"))
    t_split = jax.device_put(ts, NamedSharding(grid, P("b")))
    found["sweep-t-split"] = compare(sweep(c1, s1, t_split), ref)

    # Inside the caller's jit, under an explicit mesh: the layout is in the stacks' types.
    line = jax.make_mesh((4,), ("d",), axis_types=(AxisType.Explicit,))
    ref = merge([concept, style], t=0.6)
    with jax.set_mesh(line):
        c4, s4 = place(concept, line, P(None, "d")), place(style, line, P(None, "d"))
        fn = jax.jit(lambda a, b: merge([a, b], t=0.6))
        found["jit-explicit"] = compare(fn(c4, s4), ref)
        found["jit-explicit"]["hlo"] = fn.lower(c4, s4).compile().as_text()
    # Inside the caller's jit without a mesh (XLA chooses the layout): it must still run.
    c2, s2 = place(concept, grid, P("a")), place(style, grid, P("a"))
    fn = jax.jit(lambda a, b: merge([a, b], t=0.6, method="cayley"))
    found["jit-auto"] = compare(fn(c2, s2), merge([concept, style], t=0.6, method="cayley"))
    print(json.dumps(found))


if __name__ == "__main__":
    main()
