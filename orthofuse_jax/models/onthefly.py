"""On-the-fly GS adapters, as the reference processor applies them (tests and benchmarks only).

Every call of an adapted attention projection ``Dense`` is intercepted
(``flax.linen.intercept_methods``): its input is rotated by the butterfly ``x -> Q x`` and its
output scaled before the bias, ``y = s * (W (Q x)) + b`` (docs/math.md §2). The UNet parameters are not
touched, so this is the independent counterpart of :func:`~orthofuse_jax.models.patch_unet_params`.
"""

from __future__ import annotations

from collections.abc import Mapping

import flax.linen as nn
import jax.numpy as jnp

from ..fusion.adapter import GSAdapter, to_layers, to_orthogonal
from ..geometry import gs_apply
from .layers import attention_layers, attention_layers_from_params

__all__ = ["apply_onthefly", "onthefly_interceptor"]


def onthefly_interceptor(adapter: GSAdapter, table: Mapping):
    """A method interceptor applying ``adapter`` to the Dense projections listed in ``table``."""
    adapter = to_orthogonal(adapter)
    by_path = {}
    for name, (L, R) in to_layers(adapter).items():
        if name not in table:
            raise ValueError(f"adapter layer {name!r} is not an attention projection of this UNet")
        by_path[table[name].path[:-1]] = (L, R, adapter.scales.get(name))

    def interceptor(next_fun, args, kwargs, context):
        mod = context.module
        if context.method_name != "__call__" or not isinstance(mod, nn.Dense):
            return next_fun(*args, **kwargs)
        hit = by_path.get(tuple(mod.path))
        if hit is None:
            return next_fun(*args, **kwargs)
        L, R, s = hit
        x = args[0]
        xq = gs_apply(
            x.astype(jnp.promote_types(x.dtype, L.dtype)), L.astype(x.dtype), R.astype(x.dtype)
        )
        p = mod.variables["params"]
        y = jnp.dot(xq.astype(mod.dtype or x.dtype), p["kernel"].astype(mod.dtype or x.dtype))
        if s is not None:
            y = y * s.astype(y.dtype)
        if "bias" in p:
            y = y + p["bias"].astype(y.dtype)
        return y

    return interceptor


def apply_onthefly(
    unet, params, adapter: GSAdapter, *args, config: Mapping | None = None, **kwargs
):
    """``unet.apply({"params": params}, *args, **kwargs)`` with ``adapter`` applied on the fly."""
    table = attention_layers(config) if config is not None else attention_layers_from_params(params)
    with nn.intercept_methods(onthefly_interceptor(adapter, table)):
        return unet.apply({"params": params}, *args, **kwargs)
