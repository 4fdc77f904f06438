"""``sweep(..., reuse=earlier)``: the result takes over an earlier sweep's memory (donated), with the
numbers of a float64 scipy reference; a reuse that does not fit is refused before anything is
donated."""

from __future__ import annotations

import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from orthofuse_jax.fusion import GSAdapter, from_layers, sweep

from .geodesic_reference import reference, rotations
from .test_merge import _wide_pair

TS = np.array([0.0, 0.3, 0.7, 1.0], np.float32)
SHAPES = {"q": (3, 2, 8), "k": (2, 3, 5)}  # name prefix: layers, nb, b


def _adapter(seed, angle=0.8):
    rng = np.random.default_rng(seed)
    layers = {
        f"blk{i}.{p}": (rotations(rng, (nb,), b, angle), rotations(rng, (nb,), b, angle))
        for p, (n, nb, b) in SHAPES.items()
        for i in range(n)
    }
    return from_layers(layers, dtype=np.float32)


def _pointers(adapter):
    return {
        (k, w): getattr(s, w).unsafe_buffer_pointer()
        for k, s in adapter.stacks.items()
        for w in ("L", "R")
    }


def _assert_reference(a1, a2, got, restore, atol=2e-5):
    """Every t of ``got`` against float64 ``U1 expm(t logm(U1^T U2))`` + restoration (alpha 2)."""
    for key, s in a1.stacks.items():
        for which in ("L", "R"):
            x1 = np.asarray(getattr(s, which), np.float64)
            x2 = np.asarray(getattr(a2.stacks[key], which), np.float64)
            for i, t in enumerate(TS.astype(np.float64)):
                want = reference(x1, x2, t, 1.0 + 4.0 * t * (1.0 - t), restore, (False, False))
                np.testing.assert_allclose(
                    np.asarray(getattr(got.stacks[key], which)[i]),
                    want,
                    rtol=0,
                    atol=atol,
                    err_msg=f"{key} {which} t={t}",
                )


@pytest.fixture(params=["whole", "chunked"])
def chunking(request, monkeypatch):
    """``chunked``: CPU stacks run in chunks of two blocks (the ``eigh`` path's chunk loop)."""
    if request.param == "chunked":
        module = sys.modules["orthofuse_jax.fusion._dispatch"]
        monkeypatch.setattr(module, "_CPU_CHUNK_BYTES", 2 * 8 * 8 * 4 * len(TS))
    return request.param


@pytest.mark.parametrize("algorithm", ["matmul", "eigh"])
@pytest.mark.parametrize("restore", ["none", "cayley"])
def test_reuse_takes_over_the_memory_with_the_same_numbers(algorithm, restore, chunking):
    a1, a2 = _adapter(1), _adapter(2)
    plain = sweep(a1, a2, TS, restore=restore, algorithm=algorithm)
    earlier = sweep(a1, a2, TS, restore=restore, algorithm=algorithm)
    where = _pointers(earlier)
    got = sweep(a1, a2, TS, restore=restore, algorithm=algorithm, reuse=earlier)
    assert _pointers(got) == where  # written into the donated buffers, no copy
    assert all(getattr(s, w).is_deleted() for s in earlier.stacks.values() for w in ("L", "R"))
    for key, s in plain.stacks.items():  # the same program: the same numbers
        np.testing.assert_array_equal(np.asarray(got.stacks[key].L), np.asarray(s.L))
        np.testing.assert_array_equal(np.asarray(got.stacks[key].R), np.asarray(s.R))
    _assert_reference(a1, a2, got, restore)
    for n, v in plain.scales.items():
        np.testing.assert_array_equal(np.asarray(got.scales[n]), np.asarray(v))


def test_reuse_chain_and_declined_blocks():
    """Each result is reused by the next sweep (the first of other adapters of the same shapes); blocks the
    product-only path declines (2.9 rad) are redone with eigh and still land in the result."""
    a1, a2 = _wide_pair()
    want = sweep(a1, a2, TS, restore="cayley", algorithm="eigh")
    r = sweep(a1, a1, TS, restore="cayley")  # other numbers, same shapes
    for _ in range(3):
        r = sweep(a1, a2, TS, restore="cayley", reuse=r)
    for key, s in want.stacks.items():
        np.testing.assert_allclose(
            np.asarray(r.stacks[key].L), np.asarray(s.L), rtol=0, atol=3e-5, err_msg=key
        )
        np.testing.assert_allclose(
            np.asarray(r.stacks[key].R), np.asarray(s.R), rtol=0, atol=3e-5, err_msg=key
        )


def test_reuse_is_ignored_inside_jit():
    a1, a2 = _adapter(5), _adapter(6)
    earlier = sweep(a1, a2, TS)
    got = jax.jit(lambda x, y, r: sweep(x, y, TS, reuse=r))(a1, a2, earlier)
    assert not earlier.stacks["nb2_b8"].L.is_deleted()  # the trace's own jit decides donation
    _assert_reference(a1, a2, got, "none")


def _intact(adapter):
    return not any(getattr(s, w).is_deleted() for s in adapter.stacks.values() for w in ("L", "R"))


def test_reuse_that_does_not_fit_is_refused_and_kept():
    a1, a2 = _adapter(7), _adapter(8)
    earlier = sweep(a1, a2, TS)
    with pytest.raises(
        ValueError, match=r"stack nb\d_b\d L is float32\[4, .*this sweep's result is float32\[3,"
    ):
        sweep(a1, a2, TS[:3], reuse=earlier)
    with pytest.raises(
        ValueError, match=r"reuse: stack .* is float32\[4, .*result is float64\[4, "
    ):
        sweep(a1.astype(jnp.float64), a2.astype(jnp.float64), TS, reuse=earlier)
    other = from_layers({"x": (np.zeros((1, 4, 4)), np.zeros((1, 4, 4)))}, dtype=np.float32)
    with pytest.raises(
        ValueError, match=r"its stacks \['nb1_b4'\] are not the adapters' \['nb2_b8', 'nb3_b5'\]"
    ):
        sweep(a1, a2, TS, reuse=sweep(other, other, TS))
    with pytest.raises(TypeError, match="reuse must be the GSAdapter an earlier sweep"):
        sweep(a1, a2, TS, reuse={"nb2_b8": earlier.stacks["nb2_b8"]})
    twice = GSAdapter(
        stacks={k: type(s)(L=s.L, R=s.L, names=s.names) for k, s in earlier.stacks.items()},
        scales=earlier.scales,
        orthogonal=True,
    )
    with pytest.raises(ValueError, match=r"reuse: stack nb\d_b\d R is the same array as another"):
        sweep(a1, a2, TS, reuse=twice)
    assert _intact(earlier)  # nothing was donated by the refused calls
    sweep(a1, a2, TS, reuse=earlier)
    with pytest.raises(
        ValueError,
        match=r"reuse: stack nb\d_b\d L was already deleted: an earlier call consumed it",
    ):
        sweep(a1, a2, TS, reuse=earlier)
