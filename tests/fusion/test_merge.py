"""Block- and adapter-level merges against closed forms and float64 scipy references."""

from __future__ import annotations

import functools
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg
from hypothesis import given
from hypothesis import strategies as st

from orthofuse_jax.fusion import (
    GSAdapter,
    MergeError,
    cayley_space_blocks,
    curve_over_id,
    from_layers,
    geodesic_blocks,
    geodesic_path,
    merge,
    merge_report,
    multiply,
    restore_exact,
    stack_key,
    sweep,
    to_layers,
    to_orthogonal,
)
from orthofuse_jax.geometry import NegativeEigenvalueError, gs_dense, log_polynomial

# -- float64 numpy/scipy references ---------------------------------------------------------


def np_skew(a):
    return 0.5 * (a - np.swapaxes(a, -1, -2))


def np_cayley(a):
    s = np_skew(a)
    eye = np.eye(a.shape[-1])
    return np.linalg.solve(eye - s, eye + s)


def np_geodesic(u1, u2, t):
    out = np.empty_like(u1)
    for idx in np.ndindex(u1.shape[:-2]):
        w = u1[idx].T @ u2[idx]
        out[idx] = u1[idx] @ np.real(scipy.linalg.expm(t * scipy.linalg.logm(w)))
    return out


def np_fpow(u, f):
    """exp(f logm(U)) per block."""
    out = np.empty_like(u)
    for idx in np.ndindex(u.shape[:-2]):
        out[idx] = np.real(scipy.linalg.expm(f * np.real(scipy.linalg.logm(u[idx]))))
    return out


def rot2(theta):
    c, s = np.cos(theta), np.sin(theta)
    return np.array([[c, -s], [s, c]])


def raw_params(rng, shape, b, scale):
    a = rng.normal(size=(*shape, b, b)) * scale
    return a - np.swapaxes(a, -1, -2)


SHAPES = {"q": (2, 3, 4), "k": (1, 2, 5)}  # layers, nb, b: two stacks


def make_adapter(seed, scale=0.15, dtype=np.float64, with_scales=True):
    rng = np.random.default_rng(seed)
    layers, scales = {}, {}
    for prefix, (n_layers, nb, b) in SHAPES.items():
        for i in range(n_layers):
            name = f"blk{i}.{prefix}"
            layers[name] = (raw_params(rng, (nb,), b, scale), raw_params(rng, (nb,), b, scale))
            if with_scales:
                scales[name] = rng.uniform(0.5, 1.5, size=nb * b)
    return from_layers(layers, scales, dtype=dtype)


def blocks(adapter):
    """{name: (L, R)} as float64 numpy."""
    return {
        n: (np.asarray(L, np.float64), np.asarray(R, np.float64))
        for n, (L, R) in to_layers(adapter).items()
    }


TOL = {np.float64: 1e-10, np.float32: 2e-5}

# -- block level ------------------------------------------------------------------------------


@given(
    seed=st.integers(0, 2**31 - 1),
    t=st.floats(-0.5, 1.5),
    dtype=st.sampled_from([np.float32, np.float64]),
)
def test_geodesic_blocks_matches_scipy(seed, t, dtype):
    rng = np.random.default_rng(seed)
    u1, u2 = np_cayley(raw_params(rng, (3,), 4, 0.3)), np_cayley(raw_params(rng, (3,), 4, 0.3))
    got = geodesic_blocks(jnp.asarray(u1, dtype), jnp.asarray(u2, dtype), t)
    assert got.dtype == dtype
    np.testing.assert_allclose(np.asarray(got), np_geodesic(u1, u2, t), rtol=0, atol=TOL[dtype])


def test_geodesic_path_equals_geodesic_blocks():
    rng = np.random.default_rng(0)
    u1, u2 = np_cayley(raw_params(rng, (2, 3), 4, 0.5)), np_cayley(raw_params(rng, (2, 3), 4, 0.5))
    path = geodesic_path(jnp.asarray(u1), jnp.asarray(u2))
    for t in (0.0, 0.3, 1.0, 1.7):
        np.testing.assert_allclose(
            np.asarray(path.at(t)), np_geodesic(u1, u2, t), rtol=0, atol=1e-12
        )


def test_cayley_space_blocks_closed_form():
    rng = np.random.default_rng(1)
    a1, a2 = (
        rng.normal(size=(3, 4, 4)),
        rng.normal(size=(3, 4, 4)),
    )  # not skew: only the skew part counts
    for t in (0.0, 0.25, 1.0):
        want = np_cayley((1 - t) * np_skew(a1) + t * np_skew(a2))
        np.testing.assert_allclose(
            np.asarray(cayley_space_blocks(jnp.asarray(a1), jnp.asarray(a2), t)), want, atol=1e-13
        )


@pytest.mark.parametrize("p", [0.0, 0.25, 0.6, 1.0])
def test_curve_over_id_angle_map(p):
    """docs/math.md §3.3: a rotation by theta becomes one by 2 arctan(eta sin theta), eta = 0.5 + 2p(1-p)."""
    thetas = np.array([0.1, 0.5, 1.0, 2.5])
    u = np.stack([rot2(th) for th in thetas])
    eta = 0.5 + 2 * p * (1 - p)
    want = np.stack([rot2(2 * np.arctan(eta * np.sin(th))) for th in thetas])
    np.testing.assert_allclose(np.asarray(curve_over_id(jnp.asarray(u), p)), want, atol=1e-14)


@pytest.mark.parametrize("alpha", [0.0, 1.0, 2.0, 3.5])
def test_restore_exact_closed_form(alpha):
    t = 0.3
    f = 1 + 4 * (alpha - 1) * t * (1 - t)
    thetas = np.array([0.0, 0.2, 0.9, 1.4])
    u = np.stack([rot2(th) for th in thetas])
    want = np.stack([rot2(f * th) for th in thetas])
    np.testing.assert_allclose(
        np.asarray(restore_exact(jnp.asarray(u), t, alpha)), want, atol=1e-13
    )


def test_restore_exact_general_blocks_vs_scipy():
    rng = np.random.default_rng(2)
    u = np_cayley(raw_params(rng, (4,), 5, 0.4))
    for t in (0.0, 0.4, 1.0):
        f = 1 + 4 * 1.0 * t * (1 - t)
        np.testing.assert_allclose(
            np.asarray(restore_exact(jnp.asarray(u), t)), np_fpow(u, f), atol=1e-11
        )


def test_block_functions_raise_on_rotation_by_pi():
    u1 = np.eye(3)[None]
    u2 = np.diag([-1.0, -1.0, 1.0])[None]  # a rotation by pi: eigenvalue -1 twice
    with pytest.raises(NegativeEigenvalueError):
        geodesic_blocks(jnp.asarray(u1), jnp.asarray(u2), 0.5)
    with pytest.raises(NegativeEigenvalueError):
        restore_exact(jnp.asarray(u2), 0.5)


# -- adapter level ----------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("restore", ["none", "exact"])
def test_merge_geodesic_endpoints_are_inputs(dtype, restore):
    a1, a2 = make_adapter(1, dtype=dtype), make_adapter(2, dtype=dtype)
    for t, src in ((0.0, a1), (1.0, a2)):
        m = merge([a1, a2], t=t, method="geodesic", restore=restore)
        assert m.orthogonal and m.dtype == dtype
        want = blocks(to_orthogonal(src.astype(np.float64)))
        for name, (L, R) in blocks(m).items():
            np.testing.assert_allclose(L, want[name][0], rtol=0, atol=TOL[dtype], err_msg=name)
            np.testing.assert_allclose(R, want[name][1], rtol=0, atol=TOL[dtype], err_msg=name)


@pytest.mark.parametrize("algorithm,atol", [("auto", 1e-10), ("matmul", 1e-7)])
@pytest.mark.parametrize("method", ["geodesic", "cayley"])
@pytest.mark.parametrize("restore", ["none", "cayley", "exact"])
def test_merge_matches_float64_reference(method, restore, algorithm, atol):
    """Every method/restore combination against a scipy/numpy float64 reference, per layer.

    float64 input: ``auto`` is ``eigh``; ``matmul`` is exact to its polynomial's ~1e-8."""
    a1, a2 = make_adapter(3), make_adapter(4)
    t, alpha = 0.35, 2.5
    f = 1 + 4 * (alpha - 1) * t * (1 - t)
    m = merge([a1, a2], t=t, method=method, restore=restore, alpha=alpha, algorithm=algorithm)
    raw1, raw2 = blocks(a1), blocks(a2)
    for name, got in blocks(m).items():
        for which in (0, 1):
            p1, p2 = raw1[name][which], raw2[name][which]
            if method == "geodesic":
                y = np_geodesic(np_cayley(p1), np_cayley(p2), t)
            else:
                y = np_cayley((1 - t) * p1 + t * p2)
            if restore == "cayley":
                y = np_cayley((f / 2) * y)
            elif restore == "exact":
                y = np_fpow(y, f)
            np.testing.assert_allclose(
                got[which], y, rtol=0, atol=atol, err_msg=f"{name} {'LR'[which]}"
            )


@given(t=st.floats(0.0, 1.0), seed=st.integers(0, 50))
def test_merged_blocks_orthogonal_float32(t, seed):
    a1, a2 = (
        make_adapter(seed, scale=0.3, dtype=np.float32),
        make_adapter(seed + 100, scale=0.3, dtype=np.float32),
    )
    for method in ("geodesic", "cayley"):
        m = merge([a1, a2], t=t, method=method, restore="exact")
        assert merge_report(m).max_error <= 1e-5


def test_merge_accepts_orthogonal_inputs():
    a1, a2 = make_adapter(5), make_adapter(6)
    o1, o2 = to_orthogonal(a1), to_orthogonal(a2)
    for method in ("geodesic", "cayley"):
        raw = blocks(merge([a1, a2], t=0.4, method=method, restore="cayley"))
        orth = blocks(merge([o1, o2], t=0.4, method=method, restore="cayley"))
        for name in raw:
            np.testing.assert_allclose(orth[name][0], raw[name][0], atol=1e-12)
            np.testing.assert_allclose(orth[name][1], raw[name][1], atol=1e-12)


def test_two_adapter_weights_equal_t():
    a1, a2 = make_adapter(7), make_adapter(8)
    for method in ("geodesic", "cayley"):
        by_t = blocks(merge([a1, a2], t=0.3, method=method, restore="exact"))
        by_w = blocks(merge([a1, a2], [0.7, 0.3], method=method, restore="exact"))
        for name in by_t:
            np.testing.assert_allclose(by_w[name][0], by_t[name][0], atol=1e-12)


def test_n_adapter_cayley_mean_closed_form_and_restoration():
    ads = [make_adapter(s) for s in (10, 11, 12)]
    w = np.array([0.2, 0.5, 0.3])
    alpha = 2.0
    f = 1 + 2 * (alpha - 1) * (1 - np.sum(w**2))
    m = merge(ads, w, method="cayley", restore="cayley", alpha=alpha)
    raws = [blocks(a) for a in ads]
    for name, got in blocks(m).items():
        for which in (0, 1):
            y = np_cayley(sum(wi * r[name][which] for wi, r in zip(w, raws)))
            np.testing.assert_allclose(got[which], np_cayley((f / 2) * y), atol=1e-12)


def test_t_outside_unit_interval():
    a1, a2 = make_adapter(1), make_adapter(2)
    with pytest.raises(ValueError, match=r"t = 1\.2 .*extrapolate"):
        merge([a1, a2], t=1.2)
    with pytest.raises(ValueError, match=r"-0\.1"):
        merge([a1, a2], t=-0.1, method="cayley")
    m = merge([a1, a2], t=1.2, extrapolate=True)
    o1, o2 = blocks(to_orthogonal(a1)), blocks(to_orthogonal(a2))
    for name, (L, _) in blocks(m).items():
        np.testing.assert_allclose(L, np_geodesic(o1[name][0], o2[name][0], 1.2), atol=1e-10)


def test_bad_weights_and_options():
    ads = [make_adapter(s) for s in (1, 2, 3)]
    with pytest.raises(ValueError, match="sum to 1"):
        merge(ads, [0.3, 0.3, 0.3])
    with pytest.raises(ValueError, match=r"weights\[1\] = -0\.2"):
        merge(ads, [0.7, -0.2, 0.5])
    with pytest.raises(ValueError, match="shape"):
        merge(ads, [0.5, 0.5])
    with pytest.raises(ValueError, match="method"):
        merge(ads[:2], t=0.5, method="eig")
    with pytest.raises(ValueError, match="restore"):
        merge(ads[:2], t=0.5, restore="curve_over_id")
    with pytest.raises(ValueError, match="scales"):
        merge(ads[:2], t=0.5, scales="max")
    with pytest.raises(ValueError, match=r"algorithm must be one of .*'qr'"):
        merge(ads[:2], t=0.5, algorithm="qr")
    with pytest.raises(ValueError, match=r"algorithm must be one of .*'qr'"):
        sweep(ads[0], ads[1], [0.5], algorithm="qr")
    with pytest.raises(ValueError, match="exactly two"):
        merge(ads, t=0.5)
    with pytest.raises(ValueError, match="not both"):
        merge(ads[:2], [0.5, 0.5], t=0.5)
    merge(ads, [0.2, 0.3, 0.5 + 1e-9], method="cayley")  # within the tolerance


def _pi_pair():
    """Two orthogonal adapters whose layer 'mid.attn' R block 1 differs by a rotation by pi."""
    eye = np.broadcast_to(np.eye(3), (2, 3, 3)).copy()
    flip = eye.copy()
    flip[1] = np.diag([-1.0, -1.0, 1.0])
    layers1 = {"mid.attn": (eye, eye), "up.attn": (eye, eye)}
    layers2 = {"mid.attn": (eye, flip), "up.attn": (eye, eye)}
    return from_layers(layers1, orthogonal=True), from_layers(layers2, orthogonal=True)


def test_merge_error_names_layer_on_eigenvalue_minus_one():
    a1, a2 = _pi_pair()
    with pytest.raises(MergeError, match=r"layer 'mid\.attn': merged R block 1"):
        merge([a1, a2], t=0.5, method="geodesic")
    with pytest.raises(MergeError, match=r"layer 'mid\.attn': merged R block 1"):
        merge([a1, a2], t=0.5, method="geodesic", algorithm="matmul")
    with pytest.raises(MergeError, match=r"mid\.attn"):
        merge([a2, a2], t=0.5, restore="exact", algorithm="matmul")
    # Cayley-space merge of orthogonal inputs needs invCay of the flipped block: undefined too.
    with pytest.raises(MergeError, match=r"mid\.attn"):
        merge([a1, a2], t=0.5, method="cayley")
    # restore='exact' on a merged block that is a rotation by pi (the t = 1 endpoint).
    with pytest.raises(MergeError, match=r"mid\.attn"):
        merge([a2, a2], t=0.5, restore="exact")
    # The geodesic itself is not unique, so every t of a sweep is undefined; the first is named.
    with pytest.raises(MergeError, match=r"mid\.attn.*t = 0\.0"):
        sweep(a1, a2, jnp.asarray([0.0, 0.5]))
    # Under jit: no exception, the undefined blocks are NaN and only those.
    m = jax.jit(functools.partial(merge, method="geodesic"))([a1, a2], t=0.5)
    R = np.asarray(m.stacks[stack_key(2, 3)].R)
    names = m.stacks[stack_key(2, 3)].names
    bad = np.isnan(R).any(axis=(-1, -2))
    assert bad[names.index("mid.attn"), 1] and bad.sum() == 1


@pytest.mark.parametrize("method,restore", [("geodesic", "exact"), ("cayley", "cayley")])
def test_merge_under_jit_equals_eager(method, restore):
    a1, a2 = make_adapter(13), make_adapter(14)
    fn = jax.jit(functools.partial(merge, method=method, restore=restore, scales="linear"))
    got, want = (
        fn([a1, a2], t=0.45),
        merge([a1, a2], t=0.45, method=method, restore=restore, scales="linear"),
    )
    got_b, want_b = blocks(got), blocks(want)
    assert set(got_b) == set(want_b)
    for n, w in want_b.items():
        np.testing.assert_allclose(got_b[n][0], w[0], atol=1e-12)
        np.testing.assert_allclose(got_b[n][1], w[1], atol=1e-12)
    for n in want.scales:
        np.testing.assert_allclose(
            np.asarray(got.scales[n]), np.asarray(want.scales[n]), atol=1e-12
        )


@pytest.mark.parametrize("method", ["geodesic", "cayley"])
@pytest.mark.parametrize("restore", ["none", "cayley", "exact"])
def test_sweep_equals_loop_of_merges(method, restore):
    a1, a2 = make_adapter(15), make_adapter(16)
    ts = np.array([0.0, 0.2, 0.6, 1.0])
    sw = sweep(a1, a2, jnp.asarray(ts), method=method, restore=restore, scales="geometric")
    for key, s in sw.stacks.items():
        assert s.L.shape == (len(ts),) + a1.stacks[key].L.shape
    for i, t in enumerate(ts):
        m = merge([a1, a2], t=float(t), method=method, restore=restore, scales="geometric")
        for key, s in m.stacks.items():
            np.testing.assert_allclose(np.asarray(sw.stacks[key].L[i]), np.asarray(s.L), atol=1e-12)
            np.testing.assert_allclose(np.asarray(sw.stacks[key].R[i]), np.asarray(s.R), atol=1e-12)
        for n, v in m.scales.items():
            np.testing.assert_allclose(np.asarray(sw.scales[n][i]), np.asarray(v), atol=1e-12)


# -- scales -----------------------------------------------------------------------------------


def test_scale_rules_closed_form():
    a1, a2, a3 = make_adapter(20), make_adapter(21), make_adapter(22, with_scales=False)
    w = np.array([0.25, 0.75])
    concept = merge([a1, a2], w, scales="concept", method="cayley")
    linear = merge([a1, a2], w, scales="linear", method="cayley")
    geometric = merge([a1, a2], w, scales="geometric", method="cayley")
    for n in a1.scales:
        s1, s2 = np.asarray(a1.scales[n]), np.asarray(a2.scales[n])
        np.testing.assert_array_equal(np.asarray(concept.scales[n]), s1)
        np.testing.assert_allclose(np.asarray(linear.scales[n]), 0.25 * s1 + 0.75 * s2, atol=1e-14)
        np.testing.assert_allclose(np.asarray(geometric.scales[n]), s1**0.25 * s2**0.75, atol=1e-14)
    # A layer without scales counts as unit scales.
    g = merge([a1, a3], w, scales="geometric", method="cayley")
    for n in a1.scales:
        np.testing.assert_allclose(
            np.asarray(g.scales[n]), np.asarray(a1.scales[n]) ** 0.25, atol=1e-14
        )
    assert merge([a3, a1], w, scales="concept", method="cayley").scales == {}


def test_geometric_scales_reject_non_positive():
    a1, a2 = make_adapter(23), make_adapter(24)
    name = sorted(a2.scales)[1]
    sc = dict(a2.scales)
    sc[name] = sc[name].at[3].set(-0.5)
    a2 = GSAdapter(stacks=a2.stacks, scales=sc, orthogonal=a2.orthogonal)
    with pytest.raises(ValueError, match=rf"layer '{name}'.*non-positive scale -0\.5 at channel 3"):
        merge([a1, a2], t=0.5, scales="geometric")
    merge([a1, a2], t=0.5, scales="linear")  # fine


# -- report and the multiplication baseline -----------------------------------------------------


def test_merge_report_orthogonality_error():
    eye = np.broadcast_to(np.eye(3), (2, 3, 3)).copy()
    bent = eye.copy()
    bent[1, 0, 0] = 1.001  # ||U^T U - I||_max = 1.001^2 - 1
    a = from_layers({"a": (eye, eye), "b": (eye, bent)}, orthogonal=True)
    rep = merge_report(a)
    assert rep.per_layer["a"] == 0.0
    assert rep.per_layer["b"] == pytest.approx(1.001**2 - 1, rel=1e-9)
    assert rep.worst_layer == "b" and rep.max_error == rep.per_layer["b"]


def test_multiply_baseline_is_composition():
    a1, a2 = make_adapter(30), make_adapter(31)
    prod = multiply([a1, a2])
    o1, o2 = blocks(to_orthogonal(a1)), blocks(to_orthogonal(a2))
    x = np.random.default_rng(0).normal(size=(3, 12))
    for name in ("blk0.q", "blk1.q"):
        q = np.asarray(gs_dense(*map(jnp.asarray, o2[name]))) @ np.asarray(
            gs_dense(*map(jnp.asarray, o1[name]))
        )
        np.testing.assert_allclose(np.asarray(prod.dense(name)), q, atol=1e-13)
        np.testing.assert_allclose(
            np.asarray(prod.apply(name, jnp.asarray(x))), x @ q.T, atol=1e-13
        )
        np.testing.assert_allclose(
            np.asarray(prod.scale(name)),
            np.asarray(a1.scales[name]) * np.asarray(a2.scales[name]),
            atol=1e-14,
        )
    # Not itself a single GS matrix in general: differs from the geodesic merge at any t.
    m = blocks(merge([a1, a2], t=0.5))
    q_merge = np.asarray(gs_dense(*map(jnp.asarray, m["blk0.q"])))
    assert np.abs(q_merge - np.asarray(prod.dense("blk0.q"))).max() > 1e-3


# -- SDXL-sized run under a hard timeout (docs/math.md §9: a fused jit with complex eigh once hung) -------

_SDXL_SCRIPT = textwrap.dedent(
    """
    import numpy as np, jax, jax.numpy as jnp
    from orthofuse_jax.fusion import GSAdapter, LayerStack, merge, merge_report, stack_key
    def adapter(seed, sizes):
        r = np.random.default_rng(seed)
        stacks = {}
        for layers, b in sizes:
            def raw():
                a = (r.standard_normal((layers, 32, b, b), dtype=np.float32) * np.float32(0.2 / b))
                return jnp.asarray(a - a.swapaxes(-1, -2))
            names = tuple(f"l{b}_{i}" for i in range(layers))
            stacks[stack_key(32, b)] = LayerStack(L=raw(), R=raw(), names=names)
        return GSAdapter(stacks=stacks, scales={}, orthogonal=False)
    for sizes, method, restore in SPECS:
        a, b = adapter(1, sizes), adapter(2, sizes)
        m = merge([a, b], t=0.6, method=method, restore=restore)
        jax.block_until_ready(m)
        err = merge_report(m).max_error
        assert m.num_layers == sum(n for n, _ in sizes) and err < 1e-4, err
        print("ok", method, restore, err, flush=True)
    """
)

# The fast preset at the full SDXL shape (560 layers: 60 x b20, 360 x b40, 140 x b64); the largest
# fused kernel (geodesic + exact restoration: 2 inverse-Cayley solves and 2 eigh per stack) on
# thousands of blocks of each SDXL block size (the docs/math.md §9 hang appeared from 64 blocks on).
_SDXL_SPECS = [
    ([(60, 20), (360, 40), (140, 64)], "cayley", "cayley"),
    ([(30, 20), (60, 40), (30, 64)], "geodesic", "exact"),
]


@pytest.mark.slow
def test_sdxl_sized_merge_finishes():
    """About 30 s of CPU time on 2 idle cores; the timeout allows for shared CI machines but not a hang."""
    script = _SDXL_SCRIPT.replace("SPECS", repr(_SDXL_SPECS))
    try:
        out = subprocess.run(
            [sys.executable, "-c", script], capture_output=True, text=True, timeout=TIMEOUT_S
        )
    except subprocess.TimeoutExpired as e:
        done = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        pytest.fail(
            f"SDXL-sized merges did not finish in {TIMEOUT_S} s (XLA hang?); finished: {done!r}"
        )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.count("ok") == len(_SDXL_SPECS)


TIMEOUT_S = 300


def _count_eigh(jaxpr) -> int:
    n = 0
    for eqn in jaxpr.eqns:
        n += eqn.primitive.name == "eigh"
        for v in eqn.params.values():
            inner = getattr(v, "jaxpr", None)
            if inner is not None and hasattr(inner, "eqns"):
                n += _count_eigh(inner)
            elif hasattr(v, "eqns"):
                n += _count_eigh(v)
    return n


@pytest.mark.parametrize("n_t", [1, 7])
def test_sweep_decomposes_once(n_t):
    """The geodesic sweep holds one eigh (on the un-batched stack), however many t values."""
    a1, a2 = make_adapter(17), make_adapter(18)
    ts = jnp.linspace(0.0, 1.0, n_t)
    jaxpr = jax.make_jaxpr(lambda x, y, t: sweep(x, y, t, restore="cayley"))(a1, a2, ts).jaxpr
    n_stacks = len(a1.stacks)
    assert _count_eigh(jaxpr) == 2 * n_stacks  # L and R of each stack, independent of n_t


@pytest.mark.parametrize("dtype,tol", [(np.float64, 1e-12), (np.float32, 2e-6)])
def test_cayley_restored_equals_two_step_reference(dtype, tol):
    """One-solve Cay(eta Cay(S)) equals Cayley-space merge then curve_over_id (two numpy solves)."""
    from orthofuse_jax.fusion.maps import cayley_restored

    rng = np.random.default_rng(7)
    a = rng.standard_normal((6, 4, 9, 9))
    s = 0.4 * (a - np.swapaxes(a, -1, -2))
    eta = rng.uniform(0.5, 1.0, size=(6, 4))
    eye = np.eye(9)
    u = np.linalg.solve(eye - s, eye + s)  # Cay(S), float64 numpy
    k = 0.5 * (u - np.swapaxes(u, -1, -2)) * eta[..., None, None]
    ref = np.linalg.solve(eye - k, eye + k)  # Cay(eta U)
    got = np.asarray(cayley_restored(s.astype(dtype), eta.astype(dtype)))
    assert got.dtype == dtype
    np.testing.assert_allclose(got, ref, atol=tol, rtol=0)


# -- chunked CPU merge (peak memory) -----------------------------------------------------------


def _counting_chunk_kernel(monkeypatch, sweep: bool):
    """Set the CPU chunk size of merge (or sweep); returns a function that sets it and counts chunks
    (its ``algorithms`` attribute lists each chunk call's algorithm)."""
    module = sys.modules["orthofuse_jax.fusion._dispatch"]
    kernel, calls, algorithms = module._chunk_kernel, [], []

    def counted(*args, **kwargs):
        opts = kwargs["opts"]
        if opts.sweep == sweep:
            calls.append(opts.chunk)
            algorithms.append(opts.algorithm)
        return kernel(*args, **kwargs)

    monkeypatch.setattr(module, "_chunk_kernel", counted)

    def set_bytes(n):
        monkeypatch.setattr(module, "_CPU_CHUNK_BYTES", n)
        monkeypatch.setattr(module, "_CPU_MERGE_CHUNK_BYTES", n)
        monkeypatch.setattr(module, "_CPU_MIN_CHUNK_BLOCKS", 1)
        calls.clear()
        algorithms.clear()
        return calls

    set_bytes.algorithms = algorithms
    return set_bytes


@pytest.fixture
def chunk_calls(monkeypatch):
    return _counting_chunk_kernel(monkeypatch, sweep=False)


def chunked_cases(test):
    """CPU-only; method/restore pairs x chunks that divide the stack or overlap at its end."""
    test = pytest.mark.parametrize("blocks_per_chunk", [2, 5])(test)
    test = pytest.mark.parametrize(
        "method,restore",
        [("geodesic", "cayley"), ("geodesic", "exact"), ("cayley", "cayley"), ("cayley", "none")],
    )(test)
    return pytest.mark.skipif(
        jax.default_backend() != "cpu", reason="stacks are chunked on CPU only"
    )(test)


def _native_built() -> bool:
    from orthofuse_jax import _native

    return _native.target("cayley", np.dtype("float32")) is not None


def _prime_adapter(seed, dtype=np.float64):
    """7 layers of one 3x3 block: 7 blocks per stack, so chunks of 2 or 5 overlap at the end."""
    rng = np.random.default_rng(seed)
    layers = {
        f"l{i}": (raw_params(rng, (1,), 3, 0.3), raw_params(rng, (1,), 3, 0.3)) for i in range(7)
    }
    return from_layers(layers, dtype=dtype)


@chunked_cases
@pytest.mark.parametrize("algorithm", ["eigh", "matmul"])
def test_chunked_merge_equals_whole_stack(
    chunk_calls, method, restore, blocks_per_chunk, algorithm
):
    """Merging a stack in chunks (divisible and overlapping) gives the whole-stack result: bit for
    bit with ``eigh``; with ``matmul`` to a few ulps (XLA fuses the polynomials' multiply-adds
    differently in the chunk program), and each block takes the eigh fallback or not by itself."""
    dtype = np.float32
    pairs = [
        (make_adapter(31, dtype=dtype), to_orthogonal(make_adapter(32, dtype=dtype))),
        (_prime_adapter(33, dtype), _prime_adapter(34, dtype)),
    ]
    for a1, a2 in pairs:
        chunk_calls(2**30)
        whole = merge([a1, a2], t=0.3, method=method, restore=restore, algorithm=algorithm)
        block_bytes = min(s.b for s in a1.stacks.values()) ** 2 * np.dtype(dtype).itemsize
        calls = chunk_calls(blocks_per_chunk * block_bytes)
        chunked = merge([a1, a2], t=0.3, method=method, restore=restore, algorithm=algorithm)
        # the stacks really were chunked, except for the fast merge of raw parameters and the
        # product-only exact merge, which are one pass of a compiled kernel over the whole stack
        fast = (method, restore) == ("cayley", "cayley") and not a2.orthogonal
        one_pass = (fast or (method, algorithm) == ("geodesic", "matmul")) and _native_built()
        assert bool(calls) != one_pass
        for key, s in whole.stacks.items():
            for got, want in ((chunked.stacks[key].L, s.L), (chunked.stacks[key].R, s.R)):
                if algorithm == "eigh":
                    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
                else:
                    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=0, atol=3e-7)
    # Inputs are not donated: the adapters are intact and usable again.
    again = merge([a1, a2], t=0.3, method=method, restore=restore, algorithm=algorithm)
    np.testing.assert_array_equal(
        np.asarray(again.stacks["nb1_b3"].L), np.asarray(chunked.stacks["nb1_b3"].L)
    )


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="stacks are chunked on CPU only")
def test_chunked_merge_error_names_layer(chunk_calls):
    calls = chunk_calls(1)  # one block per chunk: the pi block is in the second chunk
    a1, a2 = _pi_pair()
    with pytest.raises(MergeError, match=r"layer 'mid\.attn': merged R block 1"):
        merge([a1, a2], t=0.5, method="geodesic")
    with pytest.raises(MergeError, match=r"layer 'mid\.attn': merged R block 1"):
        merge([a1, a2], t=0.5, method="geodesic", algorithm="matmul")
    with pytest.raises(MergeError, match=r"mid\.attn"):
        merge([a2, a2], t=0.5, restore="exact", algorithm="matmul")
    assert calls


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="stacks are chunked on CPU only")
def test_chunked_merge_compiles_once(chunk_calls):
    """The chunk start is an argument, not a static: a chunked stack costs one compilation, reused.
    (``eigh``: with ``matmul`` the second pair's one block beyond 2.4 rad would compile the eigh
    fallback kernel, a data-dependent compilation tested in test_no_recompile.py.)"""
    seen = []

    def listener(event, duration, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration":
            seen.append(kwargs.get("fun_name", "?"))

    a1, a2, b1, b2 = (_prime_adapter(s, np.float32) for s in (41, 42, 43, 44))
    calls = chunk_calls(
        5 * 9 * 4
    )  # 5 blocks of 3x3 float32: 2 chunks (overlapping) of the 7 per stack
    jax.clear_caches()  # earlier tests may have compiled the same chunk kernel
    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        jax.block_until_ready(merge([a1, a2], t=0.3, restore="cayley", algorithm="eigh"))
        assert calls == [5] * 4 and seen  # L and R, 2 chunks each; the first call compiles
        seen.clear()
        jax.block_until_ready(merge([b1, b2], t=0.7, restore="cayley", algorithm="eigh"))
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    assert seen == [], f"recompiled on the second call: {seen}"


@pytest.fixture
def sweep_chunk_calls(monkeypatch):
    return _counting_chunk_kernel(monkeypatch, sweep=True)


@chunked_cases
@pytest.mark.parametrize("algorithm", ["eigh", "matmul"])
def test_chunked_sweep_equals_whole_stack(
    sweep_chunk_calls, method, restore, blocks_per_chunk, algorithm
):
    """A sweep run in chunks of blocks (all t per chunk) gives the whole-stack sweep bit for bit,
    and its t = ts[i] slice equals merge at that t to round-off. The product-only exact sweep is
    one pass of the compiled sweep kernel over the whole stack instead (never chunked)."""
    dtype = np.float32
    ts = np.array([0.0, 0.35, 0.8], dtype)
    for a1, a2 in [
        (make_adapter(35, dtype=dtype), to_orthogonal(make_adapter(36, dtype=dtype))),
        (_prime_adapter(37, dtype), _prime_adapter(38, dtype)),
    ]:
        sweep_chunk_calls(2**40)
        whole = sweep(a1, a2, ts, method=method, restore=restore, algorithm=algorithm)
        block_bytes = min(s.b for s in a1.stacks.values()) ** 2 * np.dtype(dtype).itemsize
        calls = sweep_chunk_calls(blocks_per_chunk * block_bytes * len(ts))
        chunked = sweep(a1, a2, ts, method=method, restore=restore, algorithm=algorithm)
        if (method, algorithm) == ("geodesic", "matmul") and _native_built():
            # one kernel pass; only blocks it declined (an angle above 2.4 rad) are redone, in chunks, with eigh
            assert set(sweep_chunk_calls.algorithms) <= {"eigh"}
        else:
            assert calls and max(calls) <= blocks_per_chunk  # really chunked, all t per chunk
        for key, s in whole.stacks.items():
            assert chunked.stacks[key].L.shape == s.L.shape == (len(ts), *a1.stacks[key].L.shape)
            np.testing.assert_array_equal(np.asarray(chunked.stacks[key].L), np.asarray(s.L))
            np.testing.assert_array_equal(np.asarray(chunked.stacks[key].R), np.asarray(s.R))
        one = merge([a1, a2], t=float(ts[1]), method=method, restore=restore)
        for key, s in one.stacks.items():
            np.testing.assert_allclose(
                np.asarray(chunked.stacks[key].L[1]), np.asarray(s.L), atol=2e-6
            )


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="stacks are chunked on CPU only")
def test_chunked_sweep_error_names_layer_and_t(sweep_chunk_calls):
    calls = sweep_chunk_calls(1)  # one block per chunk
    a1, a2 = _pi_pair()
    with pytest.raises(MergeError, match=r"mid\.attn.*t = 0\.5"):
        sweep(a1, a2, np.array([0.5, 0.7]), method="geodesic")
    assert calls


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="stacks are chunked on CPU only")
def test_chunked_sweep_of_no_t(sweep_chunk_calls):
    """An empty ``ts`` gives empty stacks, as without chunks (it once divided by zero in a reshape)."""
    calls = sweep_chunk_calls(1)
    a1, a2 = _prime_adapter(39, np.float32), _prime_adapter(40, np.float32)
    out = sweep(a1, a2, np.zeros((0,), np.float32), restore="cayley")
    assert {k: s.L.shape for k, s in out.stacks.items()} == {"nb1_b3": (0, 7, 1, 3, 3)}
    assert calls == []


# -- algorithm="matmul": blocks the product-only path declines are redone with eigh -----------


def _wide_pair(dtype=np.float32):
    """Two adapters whose relative rotation is 2.9 rad in block 0 of layer blk0 of each stack
    (beyond the product-only log's 2.4 rad) and 1.5 rad in every other block."""
    rng = np.random.default_rng(40)
    a1, a2 = make_adapter(41, dtype=np.float64), {}
    for name, (L, R) in blocks(a1).items():
        out = []
        for x in (L, R):
            nb, b = x.shape[0], x.shape[-1]
            u1 = np.stack([np_cayley(x[i]) for i in range(nb)])
            gens = [raw_params(rng, (), b, 1.0) for _ in range(nb)]
            angle = [2.9 if i == 0 and name.startswith("blk0") else 1.5 for i in range(nb)]
            out.append(
                u1
                @ np.stack(
                    [scipy.linalg.expm(g * a / np.linalg.norm(g, 2)) for g, a in zip(gens, angle)]
                )
            )
        a2[name] = tuple(out)
    return from_layers(blocks(a1), dtype=dtype), from_layers(a2, orthogonal=True, dtype=dtype)


@pytest.mark.parametrize("restore", ["cayley", "exact"])
def test_matmul_merge_redoes_declined_blocks_with_eigh(restore):
    a1, a2 = _wide_pair()
    u1, u2 = to_orthogonal(a1), a2
    declined = [
        ~np.asarray(log_polynomial(jnp.swapaxes(s.L, -1, -2) @ u2.stacks[k].L)[1])
        for k, s in u1.stacks.items()
    ]
    assert sum(int(d.sum()) for d in declined) == 2  # one block per stack of L: the 2.9 rad ones
    want = blocks(merge([a1, a2], t=0.6, restore=restore, algorithm="eigh"))
    for got in (
        merge([a1, a2], t=0.6, restore=restore, algorithm="matmul"),  # eager: after dispatch
        jax.jit(lambda x, y: merge([x, y], t=0.6, restore=restore, algorithm="matmul"))(a1, a2),
    ):  # cond
        for name, (L, R) in blocks(got).items():
            np.testing.assert_allclose(L, want[name][0], rtol=0, atol=2e-5, err_msg=name)
            np.testing.assert_allclose(R, want[name][1], rtol=0, atol=2e-5, err_msg=name)
    # t far outside [0, 1]: the exponential's squarings do not reach, eigh takes over
    far = merge([a1, a2], t=3.5, extrapolate=True, algorithm="matmul")
    ref = merge([a1, a2], t=3.5, extrapolate=True, algorithm="eigh")
    for name, (L, R) in blocks(far).items():
        np.testing.assert_allclose(L, blocks(ref)[name][0], rtol=0, atol=5e-5, err_msg=name)


def test_matmul_sweep_equals_eigh_sweep_with_declined_blocks():
    """sweep(algorithm="matmul") with per-t declines redone by eigh, eager and under jit."""
    a1, a2 = _wide_pair()
    ts = jnp.asarray([0.0, 0.3, 0.8, 1.0], jnp.float32)
    want = sweep(a1, a2, ts, restore="exact", algorithm="eigh")
    for got in (
        sweep(a1, a2, ts, restore="exact", algorithm="matmul"),
        jax.jit(lambda x, y, t: sweep(x, y, t, restore="exact", algorithm="matmul"))(a1, a2, ts),
    ):
        for key, s in want.stacks.items():
            np.testing.assert_allclose(
                np.asarray(got.stacks[key].L), np.asarray(s.L), rtol=0, atol=3e-5, err_msg=key
            )
            np.testing.assert_allclose(
                np.asarray(got.stacks[key].R), np.asarray(s.R), rtol=0, atol=3e-5, err_msg=key
            )
