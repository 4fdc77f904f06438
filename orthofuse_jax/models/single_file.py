"""The original SDXL key layout of a diffusers UNet, derived from diffusers' own conversion.

Single-file SDXL checkpoints (the files A1111 and ComfyUI load) keep the UNet under
``model.diffusion_model.`` with the original names (``input_blocks.4.1.transformer_blocks.0.attn1
.to_q.weight``); diffusers turns them into its own names with
``diffusers.loaders.single_file_utils.convert_ldm_unet_checkpoint``. :func:`original_unet_keys`
inverts that conversion: it proposes an original name for every diffusers key (block arithmetic,
diffusers' resnet renames reversed, diffusers' table ``DIFFUSERS_TO_LDM_MAPPING`` for the rest),
runs diffusers' conversion on the proposals tagged with themselves, and keeps the map only if the
conversion gives back every diffusers key with its proposal. Tensors keep their shapes: diffusers'
UNet conversion reshapes nothing (``proj_in``/``proj_out`` are linear in both layouts when
``use_linear_projection``, 1x1 convolutions in both otherwise).

Needs diffusers (and torch, which diffusers' conversion module imports), imported when called.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

from .._safetensors import AdapterFileError

__all__ = ["UNET_PREFIX", "original_unet_keys"]

UNET_PREFIX = "model.diffusion_model."
"""The prefix of the UNet's keys in an original SDXL single-file checkpoint."""

# diffusers resnet name -> original name: the reverse of update_unet_resnet_ldm_to_diffusers
_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "time_emb_proj": "emb_layers.1",
    "conv_shortcut": "skip_connection",
}
_DOWN = re.compile(r"down_blocks\.(\d+)\.(resnets|attentions|downsamplers)\.(\d+)\.(.+)")
_MID = re.compile(r"mid_block\.(resnets|attentions)\.(\d+)\.(.+)")
_UP = re.compile(r"up_blocks\.(\d+)\.(resnets|attentions|upsamplers)\.(\d+)\.(.+)")


def _conversion():
    """diffusers' original -> diffusers UNet conversion and its renaming table (imported lazily)."""
    try:
        from diffusers.loaders import single_file_utils as sfu
    except ImportError as e:  # keeps the missing module's name: the CLI names its extra
        raise ImportError(
            f"the original SDXL layout (--single-file) uses diffusers' key conversion, which needs "
            f"diffusers and torch: pip install 'orthofuse-jax[sdxl,interop]' ({e})",
            name=e.name,
        ) from None
    return sfu.convert_ldm_unet_checkpoint, sfu.DIFFUSERS_TO_LDM_MAPPING["unet"]


def _resnet(rest: str) -> str:
    head, _, tail = rest.partition(".")
    return f"{_RESNET.get(head, head)}.{tail}"


def _propose(key: str, per: int, up_attn: set[int], top: Mapping[str, str]) -> str | None:
    """The original name of diffusers ``key`` (``per`` = layers_per_block + 1), or None."""
    if key in top:
        return top[key]
    if m := _DOWN.fullmatch(key):
        b, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        if kind == "downsamplers":
            return f"input_blocks.{1 + b * per + per - 1}.0.op.{rest.removeprefix('conv.')}"
        i = 1 + b * per + j
        return (
            f"input_blocks.{i}.0.{_resnet(rest)}"
            if kind == "resnets"
            else f"input_blocks.{i}.1.{rest}"
        )
    if m := _MID.fullmatch(key):
        kind, j, rest = m[1], int(m[2]), m[3]
        if kind == "resnets":
            return f"middle_block.{0 if j == 0 else j + 1}.{_resnet(rest)}"
        return f"middle_block.{j + 1}.{rest}"
    if m := _UP.fullmatch(key):
        b, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        if kind == "upsamplers":
            return f"output_blocks.{b * per + per - 1}.{2 if b in up_attn else 1}.{rest}"
        i = b * per + j
        return (
            f"output_blocks.{i}.0.{_resnet(rest)}"
            if kind == "resnets"
            else f"output_blocks.{i}.1.{rest}"
        )
    return None


def _top_table(config: Mapping, table: Mapping[str, Mapping[str, str]]) -> dict[str, str]:
    """diffusers' top-level names -> original ones, with the embeddings ``config`` enables."""
    top = dict(table["layers"])
    if config.get("class_embed_type") in ("timestep", "projection"):
        top.update(table["class_embed_type"])
    if config.get("addition_embed_type") == "text_time":
        top.update(table["addition_embed_type"])
    if config.get("num_class_embeds") is not None:
        top["class_embedding.weight"] = "label_emb.weight"
    return top


def original_unet_keys(config: Mapping, keys: Iterable[str], source: str) -> dict[str, str]:
    """``{diffusers key: original key}`` (with :data:`UNET_PREFIX`) for the UNet tensors ``keys``.

    Args:
      config: the UNet's diffusers config (its ``config.json``).
      keys: the diffusers state-dict keys of the UNet's weights.
      source: the file or folder the keys come from, named in errors.
    Raises:
      AdapterFileError: one line naming ``source`` and the key that has no original name, or whose
        proposed name diffusers' conversion does not map back to it.
      ImportError: diffusers or torch is missing (names the extras to install).
    """
    convert, table = _conversion()
    per = config.get("layers_per_block")
    if not isinstance(per, int) or isinstance(per, bool) or per < 1:
        raise AdapterFileError(
            f"{source}: config layers_per_block {per!r} is not one positive integer, which the "
            "original SDXL layout needs"
        )
    per += 1
    keys = list(keys)
    up_attn = {int(m[1]) for k in keys if (m := _UP.fullmatch(k)) and m[2] == "attentions"}
    top = _top_table(config, table)
    names: dict[str, str] = {}
    seen: dict[str, str] = {}
    for key in keys:
        orig = _propose(key, per, up_attn, top)
        if orig is None:
            raise AdapterFileError(
                f"{source}: key {key!r} has no place in the original SDXL UNet layout"
            )
        if orig in seen:
            raise AdapterFileError(
                f"{source}: keys {seen[orig]!r} and {key!r} both map to original key {orig!r}"
            )
        seen[orig] = key
        names[key] = orig
    back = convert({UNET_PREFIX + o: o for o in names.values()}, dict(config))
    for key, orig in names.items():
        if back.get(key) != orig:
            raise AdapterFileError(
                f"{source}: key {key!r}: diffusers' conversion does not map original key "
                f"{orig!r} back to it"
            )
    extra = sorted(k for k, v in back.items() if k not in names and v is not None)
    if extra:
        raise AdapterFileError(
            f"{source}: diffusers' conversion makes key {extra[0]!r} (from {back[extra[0]]!r}), "
            "which the UNet does not have"
        )
    return {key: UNET_PREFIX + orig for key, orig in names.items()}
