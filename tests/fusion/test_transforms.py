"""``merge`` under the transformations users apply to it: ``vmap`` over t, ``grad`` in t and in the
adapters' parameters, all inside ``jit``. References: scipy's float64 ``expm``/``logm`` and the
closed-form derivative of the geodesic."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg as sl

from orthofuse_jax.fusion import from_layers, merge

TS = np.array([0.0, 0.3, 0.6, 1.0])


def _pair(seed: int, dtype):
    """Two adapters; the last layer's blocks turn by up to about 3 rad relative to each other."""
    rng = np.random.default_rng(seed)
    shapes = {
        "down.attn1.to_q": (2, 4, 0.3),
        "down.attn1.to_k": (2, 4, 0.3),
        "mid.attn2.to_out": (3, 6, 0.6),
    }
    scales = {name: np.ones(nb * b) for name, (nb, b, _) in shapes.items()}
    return tuple(
        from_layers(
            {
                name: tuple(size * rng.standard_normal((nb, b, b)) for _ in "LR")
                for name, (nb, b, size) in shapes.items()
            },
            scales,
            dtype=dtype,
        )
        for _ in range(2)
    )


def _cay(a):
    s = 0.5 * (a - a.T)
    eye = np.eye(len(a))
    return np.linalg.solve(eye - s, eye + s)


def _geodesic_ref(a1, a2, t):
    """``U1 expm(t logm(U1^T U2))`` of the raw parameters' Cayley maps, in float64."""
    u1, u2 = _cay(a1), _cay(a2)
    x = np.real(sl.logm(u1.T @ u2))
    return u1 @ sl.expm(t * x), u1, x


def _reference(a, b, t, method):
    """Every block of every stack of the merge of raw adapters ``a, b`` at ``t``, float64."""
    out = {}
    for key, sa in a.stacks.items():
        sb = b.stacks[key]
        for side in ("L", "R"):
            xa, xb = (
                np.asarray(getattr(sa, side), np.float64),
                np.asarray(getattr(sb, side), np.float64),
            )
            if method == "geodesic":
                ref = [
                    _geodesic_ref(p, q, t)[0]
                    for p, q in zip(xa.reshape(-1, *xa.shape[-2:]), xb.reshape(-1, *xb.shape[-2:]))
                ]
            else:
                ref = [
                    _cay((1 - t) * p + t * q)
                    for p, q in zip(xa.reshape(-1, *xa.shape[-2:]), xb.reshape(-1, *xb.shape[-2:]))
                ]
            out[key, side] = np.reshape(ref, xa.shape)
    return out


@pytest.mark.parametrize("dtype,tol", [(jnp.float64, 1e-10), (jnp.float32, 2e-5)])
@pytest.mark.parametrize("method", ["geodesic", "cayley"])
def test_vmap_over_t_matches_scipy(method, dtype, tol):
    a, b = _pair(1, dtype)
    merged = jax.jit(jax.vmap(lambda t: merge([a, b], t=t, method=method, restore="none")))(
        jnp.asarray(TS, dtype)
    )
    for i, t in enumerate(TS):
        for (key, side), ref in _reference(a, b, float(t), method).items():
            got = np.asarray(getattr(merged.stacks[key], side)[i], np.float64)
            np.testing.assert_allclose(got, ref, atol=tol, err_msg=f"{key} {side} t={t}")


@pytest.mark.parametrize(
    "algorithm,dtype,tol",
    [
        ("eigh", jnp.float64, 1e-9),
        ("matmul", jnp.float64, 5e-7),  # the product-only log's interpolation error, ~1e-8
        ("eigh", jnp.float32, 2e-3),
        ("matmul", jnp.float32, 2e-3),
    ],
)
def test_grad_in_t_is_the_geodesic_velocity(dtype, tol, algorithm):
    """d/dt sum(W * U1 exp(t X)) = sum(W * U1 exp(t X) X), X = log(U1^T U2). The blocks have
    rotation angles up to about 3 rad, beyond the product-only log's 2.4: those blocks are redone
    with eigh, and the derivative must stay finite through that choice."""
    a, b = _pair(2, dtype)
    rng = np.random.default_rng(3)
    weights = {key: rng.standard_normal(s.L.shape) for key, s in a.stacks.items()}

    def loss(t):
        y = merge([a, b], t=t, method="geodesic", restore="none", algorithm=algorithm)
        return sum(jnp.sum(jnp.asarray(w, dtype) * y.stacks[key].L) for key, w in weights.items())

    angles = [
        np.abs(np.angle(np.linalg.eigvals(_cay(p).T @ _cay(q)))).max()
        for key, s in a.stacks.items()
        for p, q in zip(
            np.asarray(s.L, np.float64).reshape(-1, *s.L.shape[-2:]),
            np.asarray(b.stacks[key].L, np.float64).reshape(-1, *s.L.shape[-2:]),
        )
    ]
    assert min(angles) < 2.3 < 2.6 < max(angles)  # both sides of the product-only log's range

    grad = jax.jit(jax.grad(loss))
    for t in (0.25, 0.6):
        want = 0.0
        for key, s in a.stacks.items():
            xa = np.asarray(s.L, np.float64).reshape(-1, *s.L.shape[-2:])
            xb = np.asarray(b.stacks[key].L, np.float64).reshape(-1, *s.L.shape[-2:])
            w = weights[key].reshape(xa.shape)
            for p, q, wi in zip(xa, xb, w):
                point, _, x = _geodesic_ref(p, q, t)
                want += np.sum(wi * (point @ x))
        got = float(grad(jnp.asarray(t, dtype)))
        assert abs(got - want) <= tol * max(1.0, abs(want)), (t, got, want)


@pytest.mark.parametrize("restore", ["none", "cayley", "exact"])
@pytest.mark.parametrize("method", ["geodesic", "cayley"])
def test_grad_in_the_parameters_matches_finite_differences(method, restore):
    """Reverse-mode gradient against a float64 central difference along a random direction."""
    a, b = _pair(4, jnp.float64)
    rng = np.random.default_rng(5)
    direction = jax.tree.map(lambda x: jnp.asarray(rng.standard_normal(x.shape)), a)
    weights = {key: jnp.asarray(rng.standard_normal(s.L.shape)) for key, s in a.stacks.items()}

    def loss(first):
        y = merge([first, b], t=0.6, method=method, restore=restore)
        return sum(jnp.sum(w * (y.stacks[key].L + y.stacks[key].R)) for key, w in weights.items())

    grad = jax.jit(jax.grad(loss))(a)
    along = sum(jnp.vdot(g, d) for g, d in zip(jax.tree.leaves(grad), jax.tree.leaves(direction)))
    h = 1e-6
    shifted = [jax.tree.map(lambda x, d, s=s: x + s * h * d, a, direction) for s in (1, -1)]
    fd = (loss(shifted[0]) - loss(shifted[1])) / (2 * h)
    assert abs(float(along) - float(fd)) <= 1e-6 * max(1.0, abs(float(fd))), (
        float(along),
        float(fd),
    )


@pytest.mark.parametrize("method", ["geodesic", "cayley"])
def test_float32_parameter_gradient_matches_finite_differences(method):
    """The float32 path (product-only log, compiled kernels' forward, blocks beyond its range
    redone with eigh) against a float64 central difference of the float64 merge."""
    a32, b32 = _pair(6, jnp.float32)
    a64, b64 = (jax.tree.map(lambda x: jnp.asarray(x, jnp.float64), x) for x in (a32, b32))
    rng = np.random.default_rng(7)
    direction = jax.tree.map(lambda x: rng.standard_normal(x.shape), a64)
    weights = {key: rng.standard_normal(s.L.shape) for key, s in a64.stacks.items()}

    def loss(first, second):
        y = merge([first, second], t=0.6, method=method, restore="cayley")
        return sum(
            jnp.sum(jnp.asarray(w, y.dtype) * (y.stacks[key].L + y.stacks[key].R))
            for key, w in weights.items()
        )

    grad = jax.jit(jax.grad(loss))(a32, b32)
    along = sum(
        float(jnp.vdot(g.astype(jnp.float64), d))
        for g, d in zip(jax.tree.leaves(grad), jax.tree.leaves(direction))
    )
    h = 1e-6
    shifted = [jax.tree.map(lambda x, d, s=s: x + s * h * d, a64, direction) for s in (1, -1)]
    fd = float((loss(shifted[0], b64) - loss(shifted[1], b64)) / (2 * h))
    assert abs(along - fd) <= 1e-3 * max(1.0, abs(fd)), (along, fd)
