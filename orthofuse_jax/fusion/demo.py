"""A deterministic built-in concept/style pair of SDXL-shaped GS adapters (for ``orthofuse-jax demo``).

Layer names, block counts and block sizes follow the reference's SDXL configuration (docs/math.md §2, 5):
nb = 32 blocks per layer; ``to_q/to_out`` act on the hidden size h (640 or 1280, b = 20 or 40);
``to_k/to_v`` on h for self-attention (``attn1``) and on the 2048-d text space for
cross-attention (``attn2``, b = 64). Scale vectors have size h.

The small pair has 4 processors (16 layers, block sizes 20/40/64); ``full_sdxl=True`` gives all
140 processors (560 layers). Raw parameters are random skew blocks from a fixed seed, each block
scaled so that its largest rotation angle ``2 arctan(sigma_max)`` is uniform in [0.1, 1] rad.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .adapter import SCALE_NAME, GSAdapter, from_layers

__all__ = ["DEMO_SEED", "demo_pair", "sdxl_layer_shapes", "sdxl_processor_names", "write_demo_pair"]

DEMO_SEED = 20260405
_NB = 32
_TEXT_DIM = 2048

# (block prefix, attentions, transformer blocks per attention, hidden size)   docs/math.md §2
_SDXL_BLOCKS = (
    ("down_blocks.1", 2, 2, 640),
    ("down_blocks.2", 2, 10, 1280),
    ("mid_block", 1, 10, 1280),
    ("up_blocks.0", 3, 10, 1280),
    ("up_blocks.1", 3, 2, 640),
)
_SMALL = (
    "down_blocks.1.attentions.0.transformer_blocks.0.attn1.processor",
    "down_blocks.1.attentions.0.transformer_blocks.0.attn2.processor",
    "mid_block.attentions.0.transformer_blocks.0.attn1.processor",
    "mid_block.attentions.0.transformer_blocks.0.attn2.processor",
)


def sdxl_processor_names(full_sdxl: bool = False) -> list[tuple[str, int]]:
    """``[(processor name, hidden size h)]``: all 140 SDXL attention processors, or the demo's 4."""
    out = []
    for prefix, n_att, n_tb, h in _SDXL_BLOCKS:
        for a in range(n_att):
            for k in range(n_tb):
                for attn in ("attn1", "attn2"):
                    out.append(
                        (f"{prefix}.attentions.{a}.transformer_blocks.{k}.{attn}.processor", h)
                    )
    if not full_sdxl:
        small = set(_SMALL)
        out = [p for p in out if p[0] in small]
    return out


def sdxl_layer_shapes(full_sdxl: bool = False) -> dict[str, tuple[int, int, int]]:
    """``{layer name: (nb, b, h)}`` for the four GS layers of each processor."""
    shapes = {}
    for proc, h in sdxl_processor_names(full_sdxl):
        cross = proc.endswith("attn2.processor")
        for layer in SCALE_NAME:
            n = _TEXT_DIM if cross and layer in ("to_k_moft", "to_v_moft") else h
            shapes[f"{proc}.{layer}"] = (_NB, n // _NB, h)
    return shapes


def _random_rotation_params(rng: np.random.Generator, nb: int, b: int) -> np.ndarray:
    g = rng.standard_normal((nb, b, b))
    s = 0.5 * (g - np.swapaxes(g, -1, -2))
    # sigma_max^2 = largest eigenvalue of -S^2 = S^T S
    sig = np.sqrt(np.linalg.eigvalsh(np.swapaxes(s, -1, -2) @ s)[:, -1])
    theta = rng.uniform(0.1, 1.0, size=nb)
    return (s * (np.tan(theta / 2) / sig)[:, None, None]).astype(np.float32)


def demo_pair(*, full_sdxl: bool = False, seed: int = DEMO_SEED) -> tuple[GSAdapter, GSAdapter]:
    """The built-in (concept, style) pair as raw-parameter float32 adapters."""
    shapes = sdxl_layer_shapes(full_sdxl)
    out = []
    for which in range(2):
        rng = np.random.default_rng([seed, which])
        layers, scales = {}, {}
        for name in sorted(shapes):
            nb, b, h = shapes[name]
            layers[name] = (
                _random_rotation_params(rng, nb, b),
                _random_rotation_params(rng, nb, b),
            )
            scales[name] = (1.0 + 0.05 * rng.standard_normal(h)).astype(np.float32)
        out.append(from_layers(layers, scales, dtype=np.float32))
    return out[0], out[1]


def write_demo_pair(
    directory: str | Path, *, full_sdxl: bool = False, seed: int = DEMO_SEED
) -> tuple[Path, Path]:
    """Write ``concept.safetensors`` and ``style.safetensors`` (reference format) into ``directory``."""
    from .io import save_adapter

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    concept, style = demo_pair(full_sdxl=full_sdxl, seed=seed)
    paths = directory / "concept.safetensors", directory / "style.safetensors"
    save_adapter(paths[0], concept, metadata={"orthofuse_demo": "concept"})
    save_adapter(paths[1], style, metadata={"orthofuse_demo": "style"})
    return paths
