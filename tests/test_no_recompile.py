"""A second merge with the same shapes compiles nothing.

Compilations are counted with jax's own instrumentation, not with a timer: every XLA backend
compilation records the monitoring event ``/jax/core/compile/backend_compile_duration``
(``jax._src.dispatch.BACKEND_COMPILE_EVENT``), and jitted functions expose their cache size.
"""

from __future__ import annotations

import contextlib
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from orthofuse_jax.fusion.adapter import GSAdapter, LayerStack, stack_key
from orthofuse_jax.fusion.merge import merge, sweep

COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


@contextlib.contextmanager
def count_compiles():
    """Yield a list that collects the names of the XLA compilations made inside the block."""
    seen: list[str] = []

    def listener(event, duration, **kwargs):
        if event == COMPILE_EVENT:
            seen.append(str(kwargs.get("fun_name", "?")))

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        yield seen
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)


def _adapter(seed, inventory=((3, 4), (5, 2)), nb=4, dtype=np.float32, angle=0.5):
    rng = np.random.default_rng(seed)
    stacks = {}
    for b, n in inventory:
        mk = lambda: rng.standard_normal((n, nb, b, b))
        L, R = mk(), mk()
        L, R = angle * (L - np.swapaxes(L, -1, -2)) / 4, angle * (R - np.swapaxes(R, -1, -2)) / 4
        names = tuple(f"b{b}.layer{i}" for i in range(n))
        stacks[stack_key(nb, b)] = LayerStack(
            L=jnp.asarray(L, dtype), R=jnp.asarray(R, dtype), names=names
        )
    return GSAdapter(stacks=stacks, scales={}, orthogonal=False)


def test_listener_sees_compilations():
    # Guard against the event being renamed: a fresh jitted function must be counted.
    f = jax.jit(lambda x: jnp.sin(x) * 3.0 + 1.25)
    with count_compiles() as seen:
        jax.block_until_ready(f(jnp.ones(7, jnp.float32)))
    assert len(seen) >= 1


@pytest.mark.parametrize(
    "method,restore",
    [("geodesic", "cayley"), ("cayley", "cayley"), ("geodesic", "exact"), ("geodesic", "none")],
)
def test_second_merge_with_same_shapes_does_not_recompile(method, restore):
    a1, a2, b1, b2 = (_adapter(s) for s in range(4))
    with count_compiles() as first:
        jax.block_until_ready(merge([a1, a2], t=0.6, method=method, restore=restore))
    assert first, "the first call should compile (else this test measures nothing)"
    # Same shapes, different values (adapters and t): nothing may compile.
    with count_compiles() as second:
        jax.block_until_ready(merge([b1, b2], t=0.25, method=method, restore=restore))
    assert second == [], f"recompiled on the second call: {second}"


def test_declined_blocks_compile_their_eigh_kernel_once():
    """algorithm="matmul" (the float32 default) hands blocks beyond 2.4 rad to an eigh kernel; the
    first call that meets one compiles it, and later calls with the same shapes compile nothing."""
    from orthofuse_jax.geometry import cayley, log_polynomial

    def declined(x, y):
        return [
            int(
                (
                    ~log_polynomial(
                        jnp.swapaxes(cayley(getattr(x.stacks[k], w)), -1, -2)
                        @ cayley(getattr(y.stacks[k], w))
                    )[1]
                ).sum()
            )
            for k in x.stacks
            for w in "LR"
        ]

    a1, a2, b1, b2 = (_adapter(s, angle=1.0) for s in (0, 1, 4, 5))
    assert all(
        sum(d[i : i + 2]) for d in [declined(a1, a2)] for i in (0, 2)
    )  # every stack shape declines
    assert sum(declined(b1, b2)) > 0
    with count_compiles() as first:
        jax.block_until_ready(merge([a1, a2], t=0.6, restore="cayley"))
    assert first
    with count_compiles() as second:
        jax.block_until_ready(merge([b1, b2], t=0.3, restore="cayley"))
    assert second == [], f"recompiled on the second call: {second}"


def test_sweep_second_call_does_not_recompile():
    a1, a2, b1, b2 = (_adapter(s) for s in range(4))
    ts = np.linspace(0, 1, 5, dtype=np.float32)
    with count_compiles() as first:
        jax.block_until_ready(sweep(a1, a2, ts, method="geodesic", restore="cayley"))
    assert first
    with count_compiles() as second:
        jax.block_until_ready(sweep(b1, b2, ts[::-1].copy(), method="geodesic", restore="cayley"))
    assert second == [], f"recompiled on the second call: {second}"


def test_jitted_merge_cache_holds_one_entry():
    a1, a2, b1, b2 = (_adapter(s) for s in range(4))
    f = jax.jit(functools.partial(merge, method="geodesic", restore="cayley"))
    run = lambda x, y, t: jax.block_until_ready(f([x, y], t=t))
    run(a1, a2, jnp.float32(0.6))
    assert f._cache_size() == 1
    with count_compiles() as second:
        run(b1, b2, jnp.float32(0.3))
    assert second == []
    assert f._cache_size() == 1
    # A different shape is a new entry (the counter does see real recompilations).
    c1, c2 = _adapter(5, inventory=((3, 6), (5, 2))), _adapter(6, inventory=((3, 6), (5, 2)))
    with count_compiles() as third:
        run(c1, c2, jnp.float32(0.3))
    assert third and f._cache_size() == 2
