"""Baselines from the paper: multiplying the orthogonal operators (App. H.2) and the LoRA ALS merge (App. H.1).

Multiplication (App. H.2, the reference's unregistered ``MOFTDoubleCrossAttnProcessor``, docs/math.md §2):
the merged operator is ``Q_style Q_concept`` -- the concept rotation applied first -- and the scale
vectors are multiplied. A product of two GS matrices is in general NOT a GS matrix (its sparsity
pattern is denser), so it cannot be stored as one L/R pair. :class:`MultipliedAdapter` is the
composed representation: it keeps both (orthogonal) adapters and applies them in sequence, layer
by layer, with :meth:`MultipliedAdapter.apply`; :meth:`MultipliedAdapter.dense` gives the n x n
matrix for tests and small layers.

LoRA fixed-rank merge (App. H.1, docs/math.md §7): ALS / block subspace iteration for the best rank-r
approximation of ``sum_i c_i dW_i``, ``dW_i = up_i down_i``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import jax
import jax.numpy as jnp

from ..geometry import gs_apply, gs_dense
from ..geometry._linalg import mm
from ..geometry._types import Array, Float
from .adapter import GSAdapter, check_compatible, to_orthogonal

__all__ = ["LoraFactors", "MultipliedAdapter", "lora_merge", "multiply"]


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class MultipliedAdapter:
    """Composition ``Q = Q_{k-1} ... Q_1 Q_0`` of orthogonal GS adapters (``factors[0]`` acts first).

    Attributes:
      factors: the adapters, orthogonal blocks, all with the same layers.
    """

    factors: tuple[GSAdapter, ...]

    @property
    def layer_names(self) -> tuple[str, ...]:
        return self.factors[0].layer_names

    def _blocks(self, a: GSAdapter, name: str):
        for s in a.stacks.values():
            if name in s.names:
                i = s.names.index(name)
                return s.L[i], s.R[i]
        raise KeyError(f"layer {name!r} is not in the adapter")

    def apply(self, name: str, x: Float[Array, "*batch n"]) -> Float[Array, "*batch n"]:
        """``y = x @ Q^T`` for the layer ``name`` (row convention of docs/math.md §1.3): ``Q_0`` first."""
        for a in self.factors:
            L, R = self._blocks(a, name)
            x = gs_apply(x, L, R)
        return x

    def dense(self, name: str) -> Float[Array, "n n"]:
        """Dense ``Q = Q_{k-1} ... Q_0`` of layer ``name`` (tests / small n)."""
        q = None
        for a in self.factors:
            qa = gs_dense(*self._blocks(a, name))
            q = qa if q is None else mm(qa, q)
        assert q is not None, "a LoRA baseline has at least one factor"
        return q

    def scale(self, name: str, h: int | None = None) -> Array | None:
        """Product of the factors' scale vectors for layer ``name`` (None when no factor has one)."""
        vecs = [a.scales[name] for a in self.factors if name in a.scales]
        if not vecs:
            return None
        out = vecs[0]
        for v in vecs[1:]:
            out = out * v
        return out


def multiply(adapters: Sequence[GSAdapter]) -> MultipliedAdapter:
    """The App. H.2 baseline: compose ``adapters`` (concept first, then style): ``Q = Q_style Q_concept``.

    Raw-parameter adapters are mapped through ``Cay``. See :class:`MultipliedAdapter`.
    """
    adapters = list(adapters)
    check_compatible(adapters)
    return MultipliedAdapter(factors=tuple(to_orthogonal(a) for a in adapters))


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class LoraFactors:
    """A merged LoRA layer: ``dW = up @ down`` (``down [r, in]`` with orthonormal rows, ``up [out, r]``).

    ``error`` is the relative change of the ALS output subspace in the last step,
    ``||V_k V_k^T - V_{k-1} V_{k-1}^T||_F / sqrt(2 r)`` (0 when converged).
    """

    down: Float[Array, "r n_in"]
    up: Float[Array, "n_out r"]
    error: Float[Array, ""]


def lora_merge(
    loras: Sequence[tuple[Array, Array]],
    weights,
    *,
    rank: int,
    als_steps: int = 10,
    key: Array,
) -> LoraFactors:
    """Fixed-rank LoRA merge (paper App. H.1, eq. (32); docs/math.md §7): best rank-``r`` approximation of ``sum c_i dW_i``.

    With ``M = sum_i c_i dW_i`` (``dW_i = up_i down_i``, ``[out, in]``) the block subspace (ALS)
    iteration of the reference is, in our orientation,

        D  <- qr(randn(in, r)).Q                                    # seeded by ``key``
        repeat als_steps:   V <- qr(M D).Q ;   D, Rq <- qr(M^T V)
        down = D^T,  up = V Rq^T          =>   up @ down = V V^T M = P_V M

    i.e. ``M`` projected onto its dominant r-dimensional output subspace: the truncated SVD of ``M``
    once the iteration has converged (rate ``(s_{r+1}/s_r)^2`` per step). ``M`` is never formed:
    products use the factors (``M D = sum_i c_i up_i (down_i D)``).

    Differences from the reference (``FixedRankBatch`` / ``riemannian_barycenter_approximation``):
    its random start is unseeded (docs/math.md §8) -- here it is drawn from ``key``; its coefficients
    are ``[t, 1 - t]`` with t weighting the concept (docs/math.md §3.4) -- here ``weights`` are in adapter
    order like every merge; its ``in``/``out`` dimension names are swapped -- here ``down`` and
    ``up`` keep their PEFT/diffusers meaning; and it asserts ``c >= 0``, which is not needed for
    the approximation and not enforced here (the adapter-level t/weight checks belong to callers).

    Args:
      loras: ``[(down_i [r_i, in], up_i [out, r_i]), ...]``.
      weights: ``[k]`` coefficients ``c_i``.
      rank: target rank r (clipped to ``min(in, out)``).
      als_steps: number of ALS sweeps (the reference uses 10).
      key: a ``jax.random`` key for the start subspace.

    Returns:
      :class:`LoraFactors` ``(down [r, in], up [out, r], error)``.
    """
    loras = list(loras)
    c = jnp.asarray(weights)
    if c.shape != (len(loras),):
        raise ValueError(f"weights must have shape ({len(loras)},), got {c.shape}")
    downs = [jnp.asarray(d) for d, _ in loras]
    ups = [jnp.asarray(u) for _, u in loras]
    n_in, n_out = downs[0].shape[1], ups[0].shape[0]
    for i, (d, u) in enumerate(zip(downs, ups)):
        if (
            d.ndim != 2
            or u.ndim != 2
            or d.shape[1] != n_in
            or u.shape[0] != n_out
            or d.shape[0] != u.shape[1]
        ):
            raise ValueError(
                f"LoRA {i}: down {d.shape} and up {u.shape} must be [r, {n_in}] and [{n_out}, r] with equal r"
            )
    dtype = jnp.result_type(*downs, *ups)
    c = c.astype(dtype)
    r = min(int(rank), n_in, n_out)

    def m_times(d):  # M D, [out, r]
        return sum(c[i] * mm(ups[i], mm(downs[i], d)) for i in range(len(loras)))

    def mt_times(v):  # M^T V, [in, r]
        return sum(c[i] * mm(downs[i].T, mm(ups[i].T, v)) for i in range(len(loras)))

    d0, _ = jnp.linalg.qr(jax.random.normal(key, (n_in, r), dtype=dtype))
    v0 = jnp.zeros((n_out, r), dtype)

    def step(_, state):
        d, v_prev, _, _ = state
        v, _ = jnp.linalg.qr(m_times(d))
        d, rq = jnp.linalg.qr(mt_times(v))
        err = jnp.linalg.norm(mm(v, v.T) - mm(v_prev, v_prev.T)) / jnp.sqrt(2.0 * r)
        return d, v, rq, err

    init = (d0, v0, jnp.eye(r, dtype=dtype), jnp.asarray(jnp.inf, dtype))
    d, v, rq, err = jax.lax.fori_loop(0, als_steps, step, init)
    return LoraFactors(down=d.T, up=mm(v, rq.T), error=err)
