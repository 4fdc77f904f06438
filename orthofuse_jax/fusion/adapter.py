"""GS adapters as pytrees: layers of equal block shape stacked for one jitted call.

An adapter holds, per adapted layer (e.g. ``down_blocks.1.attentions.0.transformer_blocks.0.
attn1.processor.to_q_moft``), the two block stacks ``L, R`` of shape ``[nb, b, b]`` and an
optional per-channel scale vector. Layers with the same ``(nb, b)`` are stacked on a leading
axis into a :class:`LayerStack` (``[layers, nb, b, b]``) so a merge of a whole SDXL adapter
(560 layers, block sizes 20/40/64) is three batched calls, not a Python loop per layer.

``L, R`` are either raw Cayley parameters (``orthogonal=False``; what the reference trains and
saves, docs/math.md §1.2/5) or orthogonal blocks (``orthogonal=True``; what merges return).

``side`` says which features of a layer the GS matrix ``Q`` rotates: ``"input"`` (the reference,
PEFT >= 0.14: ``W_eff = diag(s) W Q``) or ``"output"`` (LyCORIS ``diag-oft``, kohya OFT:
``W_eff = diag(s) Q^T W``). Merges act on ``Q`` alone, so they carry the side through unchanged.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from .._safetensors import SCALE_NAME
from ..geometry import cayley, cpu_only, rotation_parameters
from ..geometry._types import Array, Float

__all__ = [
    "SCALE_NAME",
    "SIDES",
    "GSAdapter",
    "LayerStack",
    "check_compatible",
    "from_layers",
    "from_stacks",
    "stack_key",
    "to_cayley_params",
    "to_layers",
    "to_orthogonal",
]


SIDES = ("input", "output")
"""The features an adapter's rotations act on (:attr:`GSAdapter.side`)."""


def stack_key(nb: int, b: int) -> str:
    """Key of the stack holding layers with ``nb`` blocks of size ``b``."""
    return f"nb{nb}_b{b}"


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class LayerStack:
    """Layers of one block shape: ``L, R`` ``[layers, nb, b, b]`` and their names (static)."""

    L: Float[Array, "layers nb b b"]
    R: Float[Array, "layers nb b b"]
    names: tuple[str, ...] = field(metadata=dict(static=True))

    @property
    def nb(self) -> int:
        return self.L.shape[-3]

    @property
    def b(self) -> int:
        return self.L.shape[-1]


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class GSAdapter:
    """A GS adapter: stacks of L/R blocks keyed by :func:`stack_key`, scales keyed by layer name.

    Attributes:
      stacks: ``{stack_key(nb, b): LayerStack}``.
      scales: ``{layer name: scale vector [h]}``; a layer without an entry has unit scales.
      orthogonal: False when L/R are raw Cayley parameters, True when they are orthogonal blocks.
      side: ``"input"`` (``W_eff = diag(s) W Q``) or ``"output"`` (``W_eff = diag(s) Q^T W``).
    """

    stacks: dict[str, LayerStack]
    scales: dict[str, Float[Array, " h"]]
    orthogonal: bool = field(default=False, metadata=dict(static=True))
    side: str = field(default="input", metadata=dict(static=True))

    def __post_init__(self):
        if self.side not in SIDES:
            raise ValueError(f"adapter side {self.side!r} is not one of {SIDES}")

    @property
    def layer_names(self) -> tuple[str, ...]:
        return tuple(n for s in self.stacks.values() for n in s.names)

    @property
    def num_layers(self) -> int:
        return sum(len(s.names) for s in self.stacks.values())

    @property
    def dtype(self):
        return next(iter(self.stacks.values())).L.dtype

    def map_stacks(
        self, fn: Callable[[Array], Array], *, orthogonal: bool | None = None
    ) -> GSAdapter:
        """Apply ``fn`` to every L and R stack (same function for both)."""
        stacks = {k: replace(s, L=fn(s.L), R=fn(s.R)) for k, s in self.stacks.items()}
        return replace(
            self, stacks=stacks, orthogonal=self.orthogonal if orthogonal is None else orthogonal
        )

    def astype(self, dtype) -> GSAdapter:
        stacks = {
            k: replace(s, L=s.L.astype(dtype), R=s.R.astype(dtype)) for k, s in self.stacks.items()
        }
        scales = {k: v.astype(dtype) for k, v in self.scales.items()}
        return replace(self, stacks=stacks, scales=scales)


def from_layers(
    layers: Mapping[str, tuple[ArrayLike, ArrayLike]],
    scales: Mapping[str, ArrayLike] | None = None,
    *,
    orthogonal: bool = False,
    dtype=None,
    side: str = "input",
) -> GSAdapter:
    """Group per-layer ``{name: (L, R)}`` into stacks by block shape; names sorted within a stack."""
    groups: dict[tuple[int, ...], list[str]] = {}
    for name, (L, R) in layers.items():
        L_shape, R_shape = np.shape(L), np.shape(R)
        if len(L_shape) != 3 or L_shape[1] != L_shape[2] or L_shape != R_shape:
            raise ValueError(f"layer {name!r}: L {L_shape} and R {R_shape} must both be [nb, b, b]")
        groups.setdefault(tuple(L_shape), []).append(name)
    stacks = {}
    for names in groups.values():
        names = sorted(names)  # canonical order, so adapters read from different files align
        stacks[tuple(names)] = {
            side: _stack([layers[n][i] for n in names]) for i, side in enumerate("LR")
        }
    return from_stacks(stacks, scales, orthogonal=orthogonal, dtype=dtype, side=side)


def from_stacks(
    stacks: Mapping[tuple[str, ...], Mapping[str, ArrayLike]],
    scales: Mapping[str, ArrayLike] | None = None,
    *,
    orthogonal: bool = False,
    dtype=None,
    side: str = "input",
) -> GSAdapter:
    """An adapter from already stacked layers: ``{(names...): {"L": [layers, nb, b, b], "R": ...}}``.

    Each stack becomes one device array (one copy from host memory); names must be sorted.
    """
    out = {}
    for names, lr in stacks.items():
        L, R = (jnp.asarray(lr[side], dtype=dtype) for side in ("L", "R"))
        out[stack_key(L.shape[1], L.shape[2])] = LayerStack(L=L, R=R, names=tuple(names))
    sc = {k: jnp.asarray(v, dtype=dtype) for k, v in (scales or {}).items()}
    return GSAdapter(stacks=out, scales=sc, orthogonal=orthogonal, side=side)


def _stack(xs):
    """One array from same-shape arrays: on the host when all are numpy arrays, else with JAX."""
    if all(isinstance(x, np.ndarray) for x in xs):
        return np.stack(xs)
    return jnp.stack([jnp.asarray(x) for x in xs])


def to_layers(adapter: GSAdapter) -> dict[str, tuple[Array, Array]]:
    """Inverse of :func:`from_layers`: ``{name: (L, R)}``."""
    out = {}
    for s in adapter.stacks.values():
        for i, n in enumerate(s.names):
            out[n] = (s.L[i], s.R[i])
    return out


def to_orthogonal(adapter: GSAdapter) -> GSAdapter:
    """Orthogonal blocks ``Cay(L), Cay(R)`` of a raw-parameter adapter (identity if already)."""
    if adapter.orthogonal:
        return adapter
    return adapter.map_stacks(cayley, orthogonal=True)


def to_cayley_params(adapter: GSAdapter) -> GSAdapter:
    """Raw Cayley parameters ``invCay(L), invCay(R)`` such that ``Cay`` of them gives the blocks.

    This is how merged (orthogonal) adapters are stored in the reference format: the reference
    loads them with ``method="cayley"`` and reproduces the blocks. One compiled program for the
    whole adapter (:func:`~orthofuse_jax.geometry.rotation_parameters`: no pivoting).
    """
    if not adapter.orthogonal:
        return adapter
    return _cayley_params(adapter, cpu=on_cpu(adapter))


@functools.partial(jax.jit, static_argnames="cpu")
def _cayley_params(adapter: GSAdapter, cpu: bool) -> GSAdapter:
    with cpu_only(cpu):
        return adapter.map_stacks(rotation_parameters, orthogonal=False)


def on_cpu(tree) -> bool:
    """Whether every array of ``tree`` is a concrete array on the CPU (numpy arrays count as on the
    default backend). Jitted functions take it as a static argument to trace the CPU's kernels alone
    (:func:`~orthofuse_jax.geometry.cpu_only`)."""
    leaves = jax.tree_util.tree_leaves(tree)
    if any(isinstance(x, jax.core.Tracer) for x in leaves):
        return False
    platforms = {d.platform for x in leaves if isinstance(x, jax.Array) for d in x.devices()}
    if not any(isinstance(x, jax.Array) for x in leaves):
        platforms = {jax.default_backend()}
    return platforms == {"cpu"}


def check_compatible(adapters: Iterable[GSAdapter], names: Iterable[str] | None = None) -> None:
    """Raise ``ValueError`` naming the layer when adapters differ in layers or block shapes, or the
    features they rotate (:attr:`GSAdapter.side`)."""
    adapters = list(adapters)
    labels = list(names) if names is not None else [f"adapter {i}" for i in range(len(adapters))]
    ref = adapters[0]
    for a, lab in zip(adapters[1:], labels[1:]):
        if a.side != ref.side:
            raise ValueError(
                f"{lab} rotates the layers' {a.side} features, {labels[0]} their {ref.side} "
                "features; they cannot be merged"
            )
    ref_layers = {n: (k, s.L.shape[1:]) for k, s in ref.stacks.items() for n in s.names}
    for a, lab in zip(adapters[1:], labels[1:]):
        got = {n: (k, s.L.shape[1:]) for k, s in a.stacks.items() for n in s.names}
        missing = sorted(set(ref_layers) - set(got))
        extra = sorted(set(got) - set(ref_layers))
        if missing:
            raise ValueError(
                f"{lab}: layer {missing[0]!r} of {labels[0]} is missing ({len(missing)} missing in all)"
            )
        if extra:
            raise ValueError(
                f"{lab}: layer {extra[0]!r} is not in {labels[0]} ({len(extra)} extra in all)"
            )
        for n, (_, shp) in ref_layers.items():
            if got[n][1] != shp:
                raise ValueError(
                    f"{lab}: layer {n!r} has blocks {tuple(got[n][1])}, {labels[0]} has {tuple(shp)} (nb, b, b)"
                )
        for k, s in ref.stacks.items():
            if a.stacks[k].names != s.names:
                raise ValueError(
                    f"{lab}: layers of shape {k} are in a different order than in {labels[0]}"
                )
