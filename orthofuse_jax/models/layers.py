"""Where the GS layers sit: reference layer names <-> Flax UNet parameter paths (docs/math.md §2, 5).

The reference names a GS layer after its attention processor, e.g.
``down_blocks.1.attentions.0.transformer_blocks.0.attn1.processor.to_q_moft``; the projection it
rotates is the Flax ``Dense`` at ``down_blocks_1/attentions_0/transformer_blocks_0/attn1/to_q``
(``to_out`` -> ``to_out_0``). The table is derived from the UNet config (block types, layers per
block, transformer depth, channels, cross-attention width), never listed per layer.

For every layer the GS size ``n`` is the projection's INPUT width (``cross_attention_dim`` for
to_k/to_v of attn2) and the scale has the OUTPUT width (docs/math.md §2 table).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

__all__ = [
    "PROJECTIONS",
    "AttentionLayer",
    "attention_layers",
    "attention_layers_from_params",
    "layer_name",
    "layer_table",
]

# GS layer suffix -> Flax Dense module name inside a FlaxAttention.
PROJECTIONS = {
    "to_q_moft": "to_q",
    "to_k_moft": "to_k",
    "to_v_moft": "to_v",
    "to_out_moft": "to_out_0",
}


@dataclass(frozen=True)
class AttentionLayer:
    """One adapted projection: reference name, Flax kernel path and kernel shape ``(n_in, n_out)``."""

    name: str
    path: tuple[str, ...]
    n_in: int
    n_out: int

    @property
    def is_output(self) -> bool:
        return self.name.endswith("to_out_moft")


def layer_name(block: str, attention: int, transformer: int, attn: str, projection: str) -> str:
    """Reference name, e.g. ``layer_name("down_blocks.1", 0, 0, "attn1", "to_q_moft")``."""
    return f"{block}.attentions.{attention}.transformer_blocks.{transformer}.{attn}.processor.{projection}"


def _per_block(value, count: int, what: str) -> list:
    if isinstance(value, int):
        return [value] * count
    value = list(value)
    if len(value) != count:
        raise ValueError(f"config {what} has {len(value)} entries, expected {count}")
    return value


def _add_transformer(table, block: str, a: int, k: int, hidden: int, cross: int, only_cross: bool):
    flax_block = block.replace(".", "_")
    for attn in ("attn1", "attn2"):
        ctx = cross if (attn == "attn2" or only_cross) else hidden
        for proj, dense in PROJECTIONS.items():
            n_in = hidden if proj in ("to_q_moft", "to_out_moft") else ctx
            name = layer_name(block, a, k, attn, proj)
            path = (flax_block, f"attentions_{a}", f"transformer_blocks_{k}", attn, dense, "kernel")
            table[name] = AttentionLayer(name, path, n_in, hidden)


def attention_layers(config: Mapping) -> dict[str, AttentionLayer]:
    """Table ``{reference layer name: AttentionLayer}`` of a diffusers UNet2DCondition config.

    For SDXL base this lists 560 layers (140 attentions x q/k/v/out, docs/math.md §2).
    """
    down = list(config["down_block_types"])
    up = list(config["up_block_types"])
    channels = list(config["block_out_channels"])
    nblocks = len(down)
    cross = config.get("cross_attention_dim", 1280)
    if not isinstance(cross, int):
        raise ValueError(f"per-block cross_attention_dim {cross} is not supported")
    layers = _per_block(config.get("layers_per_block", 2), nblocks, "layers_per_block")
    depth = _per_block(
        config.get("transformer_layers_per_block", 1), nblocks, "transformer_layers_per_block"
    )
    only = _per_block(config.get("only_cross_attention", False), nblocks, "only_cross_attention")
    table: dict[str, AttentionLayer] = {}
    for i, kind in enumerate(down):
        if "CrossAttn" in kind:
            for a in range(layers[i]):
                for k in range(depth[i]):
                    _add_transformer(table, f"down_blocks.{i}", a, k, channels[i], cross, only[i])
    if config.get("mid_block_type", "UNetMidBlock2DCrossAttn") == "UNetMidBlock2DCrossAttn":
        for k in range(depth[-1]):
            _add_transformer(table, "mid_block", 0, k, channels[-1], cross, only[-1])
    rchannels, rlayers, rdepth, ronly = channels[::-1], layers[::-1], depth[::-1], only[::-1]
    for i, kind in enumerate(up):
        if "CrossAttn" in kind:
            for a in range(rlayers[i] + 1):
                for k in range(rdepth[i]):
                    _add_transformer(table, f"up_blocks.{i}", a, k, rchannels[i], cross, ronly[i])
    return table


_FLAX_ATTN = re.compile(r"^(down_blocks|up_blocks)_(\d+)$|^mid_block$")


def attention_layers_from_params(params: Mapping) -> dict[str, AttentionLayer]:
    """The same table read off a Flax UNet parameter tree (for callers without the config)."""
    table: dict[str, AttentionLayer] = {}

    def walk(node, path):
        if not isinstance(node, Mapping):
            return
        if (
            len(path) >= 4
            and path[-1] in ("attn1", "attn2")
            and path[-2].startswith("transformer_blocks_")
        ):
            block = path[0]
            m = _FLAX_ATTN.match(block)
            if m is None or len(path) != 4:
                return
            ref_block = "mid_block" if block == "mid_block" else f"{m.group(1)}.{m.group(2)}"
            a = int(path[1].rsplit("_", 1)[1])
            k = int(path[2].rsplit("_", 1)[1])
            for proj, dense in PROJECTIONS.items():
                if dense in node and "kernel" in node[dense]:
                    n_in, n_out = node[dense]["kernel"].shape
                    name = layer_name(ref_block, a, k, path[3], proj)
                    table[name] = AttentionLayer(
                        name, (*path, dense, "kernel"), int(n_in), int(n_out)
                    )
            return
        for key, child in node.items():
            walk(child, (*path, str(key)))

    walk(params, ())
    return table


def layer_table(config_or_table: Mapping) -> dict[str, AttentionLayer]:
    """A ``{name: AttentionLayer}`` table as given, or :func:`attention_layers` of a UNet config."""
    if config_or_table and all(isinstance(v, AttentionLayer) for v in config_or_table.values()):
        return dict(config_or_table)
    return attention_layers(config_or_table)
