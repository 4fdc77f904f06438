"""Fold a GS adapter into Flax UNet attention kernels, and unfold it again (SPEC 2, 9.19).

The reference applies ``W_eff = diag(s) W Q`` at every call. For a Flax ``Dense`` kernel
``K = W^T`` (in x out) the folded kernel is

    K_eff = (Q^T K) * s[None, :]            and back:  K = Q (K_eff / s[None, :]),

computed with the structured GS product on the kernel's columns (``O(n b out)``, never a dense
``n x n`` Q). Layers with equal ``(nb, b, out)`` are folded by one vmapped call; all groups of an
adapter go through one jitted function. Only attention kernels are new arrays in the result; every
other leaf is shared with the input (jax arrays are immutable; dict containers are copied).
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from ..fusion.adapter import GSAdapter, to_orthogonal
from ..geometry import gs_apply, gs_apply_transpose
from .layers import AttentionLayer, attention_layers, attention_layers_from_params

__all__ = ["patch_unet_params", "unpatch_unet_params", "fold_plan"]


def _copy_containers(tree):
    if isinstance(tree, Mapping):
        return {k: _copy_containers(v) for k, v in tree.items()}
    return tree


def _get(tree, path):
    node = tree
    for p in path:
        if not isinstance(node, Mapping) or p not in node:
            return None
        node = node[p]
    return node


def _set(tree, path, value):
    node = tree
    for p in path[:-1]:
        node = node[p]
    node[path[-1]] = value


def _resolve_table(params, config, table) -> dict[str, AttentionLayer]:
    if table is not None:
        return dict(table)
    if config is not None:
        return attention_layers(config)
    return attention_layers_from_params(params)


def fold_plan(params, adapter: GSAdapter, *, config=None, table=None):
    """Validate ``adapter`` against the UNet and group its layers by ``(stack, out width)``.

    Returns ``{(stack key, n_out): [(index in stack, AttentionLayer), ...]}``. Raises ``ValueError``
    naming the layer when it is not an attention projection of this UNet, its kernel is missing,
    the kernel's input width differs from the GS size ``n``, or its scale length differs from the
    kernel's output width.
    """
    tab = _resolve_table(params, config, table)
    groups: dict[tuple[str, int], list[tuple[int, AttentionLayer]]] = {}
    for key, stack in adapter.stacks.items():
        n = stack.nb * stack.b
        for i, name in enumerate(stack.names):
            if name not in tab:
                raise ValueError(f"adapter layer {name!r} is not an attention projection of this UNet")
            spec = tab[name]
            kernel = _get(params, spec.path)
            if kernel is None:
                raise ValueError(f"adapter layer {name!r}: UNet parameter {'/'.join(spec.path)} is missing")
            if kernel.ndim != 2 or kernel.shape[0] != n:
                raise ValueError(
                    f"adapter layer {name!r}: GS size n={n} but kernel {'/'.join(spec.path)} "
                    f"has shape {tuple(kernel.shape)} (in, out)"
                )
            if name in adapter.scales and tuple(np.shape(adapter.scales[name])) != (kernel.shape[1],):
                raise ValueError(
                    f"adapter layer {name!r}: scale has shape {tuple(np.shape(adapter.scales[name]))}, "
                    f"the kernel's output width is {kernel.shape[1]}"
                )
            spec = AttentionLayer(spec.name, spec.path, int(kernel.shape[0]), int(kernel.shape[1]))
            groups.setdefault((key, spec.n_out), []).append((i, spec))
    stray = sorted(set(adapter.scales) - set(adapter.layer_names))
    if stray:
        raise ValueError(f"adapter scale {stray[0]!r} has no GS layer in the adapter")
    return groups


def _check_finite(adapter: GSAdapter):
    for stack in adapter.stacks.values():
        bad = ~(jnp.isfinite(stack.L).all(axis=(1, 2, 3)) & jnp.isfinite(stack.R).all(axis=(1, 2, 3)))
        if bool(bad.any()):
            raise ValueError(f"adapter layer {stack.names[int(jnp.argmax(bad))]!r} has non-finite blocks")
    for name, s in adapter.scales.items():
        if not bool(jnp.isfinite(s).all()):
            raise ValueError(f"adapter layer {name!r} has a non-finite scale")


def _fold_one(K, L, R, s, inverse: bool):
    # K: (n, out). Rows of K^T are the kernel's columns; gs_apply_transpose(x) = x Q = (Q^T x^T)^T.
    if not inverse:
        return gs_apply_transpose(K.T, L, R).T * s[None, :]
    return gs_apply((K / s[None, :]).T, L, R).T


def _fold_groups_impl(kernels, blocks, scales, inverse):
    out = {}
    with jax.default_matmul_precision("highest"):
        for key, ks in kernels.items():
            L, R = blocks[key]
            dtype = jnp.promote_types(ks[0].dtype, jnp.float32)
            K = jnp.stack(ks).astype(dtype)
            res = jax.vmap(lambda k, l, r, s: _fold_one(k, l, r, s, inverse))(
                K, L.astype(dtype), R.astype(dtype), scales[key].astype(dtype)
            )
            out[key] = [res[i].astype(ks[i].dtype) for i in range(len(ks))]
    return out


_fold_groups = jax.jit(_fold_groups_impl, static_argnums=(3,))


def _apply(params, adapter: GSAdapter, *, config, table, inverse: bool):
    groups = fold_plan(params, adapter, config=config, table=table)
    adapter = to_orthogonal(adapter)
    _check_finite(adapter)
    kernels, blocks, scales = {}, {}, {}
    for (key, n_out), members in groups.items():
        gk = f"{key}_out{n_out}"
        stack = adapter.stacks[key]
        idx = np.array([i for i, _ in members])
        kernels[gk] = [_get(params, spec.path) for _, spec in members]
        blocks[gk] = (stack.L[idx], stack.R[idx])
        sc = []
        for _, spec in members:
            s = adapter.scales.get(spec.name)
            s = jnp.ones((n_out,), stack.L.dtype) if s is None else jnp.asarray(s)
            if inverse and not bool(jnp.all(s != 0)):
                raise ValueError(f"adapter layer {spec.name!r} has a zero scale; the fold cannot be undone")
            sc.append(s)
        scales[gk] = jnp.stack(sc)
    folded = _fold_groups(kernels, blocks, scales, inverse)
    new = _copy_containers(params)
    for (key, n_out), members in groups.items():
        for (_, spec), value in zip(members, folded[f"{key}_out{n_out}"]):
            _set(new, spec.path, value)
    return new


def patch_unet_params(params, adapter: GSAdapter, *, config: Mapping | None = None, table=None):
    """Fold ``adapter`` into a copy of the Flax UNet ``params``: ``K_eff = (Q^T K) * s`` (SPEC 2).

    Args:
      params: Flax ``FlaxUNet2DConditionModel`` parameter tree (dict or FrozenDict); not modified.
      adapter: raw (Cayley parameters) or orthogonal :class:`GSAdapter`; layers named as in the
        reference checkpoint (SPEC 5). Layers without a scale use unit scales.
      config: the UNet config; the name -> path table is derived from it (default: read off
        ``params``).
      table: an explicit ``{name: AttentionLayer}`` table (overrides ``config``).
    Returns:
      A new parameter tree (plain dicts) whose attention kernels are folded; all other leaves are
      the input's arrays.
    Raises:
      ValueError: naming the layer on a missing path, a GS size that differs from the kernel's
        input width, a scale of the wrong length, or non-finite adapter values.
    """
    return _apply(params, adapter, config=config, table=table, inverse=False)


def unpatch_unet_params(params, adapter: GSAdapter, *, config: Mapping | None = None, table=None):
    """Undo :func:`patch_unet_params`: ``K = Q (K_eff / s)`` (orthogonal inverse; float error only).

    Needs only the patched tree and the adapter, not a saved copy of the original UNet.
    """
    return _apply(params, adapter, config=config, table=table, inverse=True)
