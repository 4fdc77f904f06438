"""Every matrix product in the traced manifold math asks for ``Precision.HIGHEST``.

JAX's default precision lets a GPU run float32 products in TF32 (about three decimal digits) and
a TPU in bfloat16 passes; on the CPU that CI has, both give the same numbers, so a forgotten
``precision=`` could not be seen numerically here. Instead the jaxprs are inspected: every
``dot_general`` (in any nested jaxpr: jit, vmap, while loops, custom rules) must carry
``(HIGHEST, HIGHEST)``. A plain ``a @ b`` added to one of these code paths makes this fail.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.extend import core as jcore

from orthofuse_jax import geometry as geo
from orthofuse_jax.fusion.adapter import from_layers
from orthofuse_jax.fusion.baselines import lora_merge
from orthofuse_jax.fusion.merge import merge, sweep

HIGHEST = (jax.lax.Precision.HIGHEST, jax.lax.Precision.HIGHEST)


def _dot_precisions(jaxpr, out: list) -> list:
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            out.append(eqn.params["precision"])
        for value in eqn.params.values():
            for sub in value if isinstance(value, (list, tuple)) else [value]:
                if isinstance(sub, jcore.ClosedJaxpr):
                    _dot_precisions(sub.jaxpr, out)
                elif isinstance(sub, jcore.Jaxpr):
                    _dot_precisions(sub, out)
    return out


def _assert_highest(fn, *args):
    precisions = _dot_precisions(jax.make_jaxpr(fn)(*args).jaxpr, [])
    assert precisions, "no matrix product traced: the check would be vacuous"
    bad = [p for p in precisions if p != HIGHEST]
    assert not bad, (
        f"{len(bad)} of {len(precisions)} dot_general(s) without HIGHEST precision: {bad[:3]}"
    )


def _rot(seed, shape=(3, 2, 4, 4)):
    rng = np.random.default_rng(seed)
    return geo.cayley(jnp.asarray(0.4 * rng.normal(size=shape), jnp.float32))


GEOMETRY = {
    "geodesic": lambda u1, u2: geo.geodesic(u1, u2, 0.3),
    "geodesic_path.at": lambda u1, u2: jax.vmap(geo.geodesic_path(u1, u2).at)(
        jnp.linspace(0.0, 1.0, 3)
    ),
    "geodesic_distance": lambda u1, u2: geo.geodesic_distance(u1, u2),
    "geodesic_speed": lambda u1, u2: geo.geodesic_speed(u1, u2, 0.4),
    "log": lambda u1, u2: geo.log(u1),
    "power": lambda u1, u2: geo.power(u1, 0.7),
    "spectral_map": lambda u1, u2: geo.spectral_map(u1, lambda th: 1.5 * th),
    "expm_skew": lambda u1, u2: geo.expm_skew(u1),
    "expm_skew_taylor": lambda u1, u2: geo.expm_skew_taylor(u1),
    "log matmul": lambda u1, u2: geo.log(u1, algorithm="matmul"),
    "geodesic matmul": lambda u1, u2: geo.geodesic(u1, u2, 0.3, algorithm="matmul"),
    "rotation_angles": lambda u1, u2: geo.rotation_angles(u1),
    "cayley": lambda u1, u2: geo.cayley(u1),
    "inverse_cayley": lambda u1, u2: geo.inverse_cayley(u1),
    "gs_dense": lambda u1, u2: geo.gs_dense(u1[0], u2[0]),
    "gs_apply": lambda u1, u2: geo.gs_apply(jnp.ones((2, 8)), u1[0], u2[0]),
    "gs_apply_transpose": lambda u1, u2: geo.gs_apply_transpose(jnp.ones((2, 8)), u1[0], u2[0]),
    "jvp of geodesic": lambda u1, u2: jax.jvp(lambda t: geo.geodesic(u1, u2, t), (0.3,), (1.0,)),
    "grad of geodesic_distance": lambda u1, u2: jax.grad(
        lambda a: geo.geodesic_distance(a, u2).sum()
    )(u1),
}


@pytest.mark.parametrize("name", sorted(GEOMETRY))
def test_geometry_products_are_highest_precision(name):
    _assert_highest(GEOMETRY[name], _rot(0), _rot(1))


def _adapter(seed):
    rng = np.random.default_rng(seed)
    layers = {
        f"l{i}": (0.3 * rng.normal(size=(2, 4, 4)), 0.3 * rng.normal(size=(2, 4, 4)))
        for i in range(2)
    }
    return from_layers(layers, {}, dtype=np.float32)


@pytest.mark.parametrize("method", ["geodesic", "cayley"])
@pytest.mark.parametrize("restore", ["none", "cayley", "exact"])
def test_merges_are_highest_precision(method, restore):
    a1, a2, a3 = _adapter(0), _adapter(1), _adapter(2)
    for algorithm in ("eigh", "matmul"):
        _assert_highest(
            lambda x, y, t: merge([x, y], t=t, method=method, restore=restore, algorithm=algorithm),
            a1,
            a2,
            0.4,
        )
        _assert_highest(
            lambda x, y, ts: sweep(x, y, ts, method=method, restore=restore, algorithm=algorithm),
            a1,
            a2,
            jnp.linspace(0, 1, 3),
        )
    # three adapters: Karcher mean (geodesic) or Cayley-space mean
    _assert_highest(
        lambda w: merge([a1, a2, a3], w, method=method, restore=restore),
        jnp.asarray([0.2, 0.3, 0.5]),
    )


def test_lora_merge_is_highest_precision():
    rng = np.random.default_rng(0)
    loras = [
        (
            jnp.asarray(rng.normal(size=(2, 6)), jnp.float32),
            jnp.asarray(rng.normal(size=(5, 2)), jnp.float32),
        )
        for _ in range(2)
    ]
    _assert_highest(
        lambda w: lora_merge(loras, w, rank=2, als_steps=2, key=jax.random.PRNGKey(0)).up,
        jnp.asarray([0.5, 0.5]),
    )
