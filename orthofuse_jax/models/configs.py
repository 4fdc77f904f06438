"""UNet configs: SDXL base 1.0, and the tiny / medium SDXL-shaped configs of the tests and benchmarks.

``SDXL_BASE_UNET`` holds the keys of ``stabilityai/stable-diffusion-xl-base-1.0/unet/config.json``
that shape the Flax UNet (the other keys are at diffusers' defaults); with random weights it gives
the SDXL parameter tree (560 GS attention projections, docs/math.md §5) without a download.

``TINY_SDXL_UNET`` and ``MEDIUM_SDXL_UNET`` mirror SDXL where it matters for the adapters:
cross-attention whose context width differs from the hidden widths (so the k/v adapters of attn2 are
"wide"), ``text_time`` added embeddings, attn1/attn2 at two resolutions, linear projections,
transformer depth > 1. Their text widths: context ``cross_attention_dim``, pooled
``projection_class_embeddings_input_dim - 6 * addition_time_embed_dim``.
"""

from __future__ import annotations

__all__ = ["MEDIUM_SDXL_UNET", "SDXL_BASE_UNET", "TINY_SDXL_UNET", "pooled_dim"]

SDXL_BASE_UNET = dict(
    sample_size=128,
    in_channels=4,
    out_channels=4,
    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    mid_block_type="UNetMidBlock2DCrossAttn",
    block_out_channels=[320, 640, 1280],
    layers_per_block=2,
    transformer_layers_per_block=[1, 2, 10],
    attention_head_dim=[5, 10, 20],
    cross_attention_dim=2048,
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
    norm_num_groups=32,
)

TINY_SDXL_UNET = dict(
    sample_size=8,
    in_channels=4,
    out_channels=4,
    down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    mid_block_type="UNetMidBlock2DCrossAttn",
    block_out_channels=[32, 64],
    layers_per_block=1,
    transformer_layers_per_block=[1, 2],
    attention_head_dim=[2, 4],
    cross_attention_dim=48,
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=8,
    projection_class_embeddings_input_dim=32 + 6 * 8,
    norm_num_groups=32,
)

MEDIUM_SDXL_UNET = dict(
    sample_size=32,
    in_channels=4,
    out_channels=4,
    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    mid_block_type="UNetMidBlock2DCrossAttn",
    block_out_channels=[64, 128, 256],
    layers_per_block=2,
    transformer_layers_per_block=[1, 1, 2],
    attention_head_dim=[2, 4, 8],
    cross_attention_dim=320,
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=32,
    projection_class_embeddings_input_dim=128 + 6 * 32,
    norm_num_groups=32,
)


def pooled_dim(config) -> int:
    """Width of the pooled text embedding a ``text_time`` UNet config expects (SDXL: 1280)."""
    return config["projection_class_embeddings_input_dim"] - 6 * config["addition_time_embed_dim"]
