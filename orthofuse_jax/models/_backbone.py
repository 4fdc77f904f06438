"""Every diffusers and transformers import of orthofuse-jax lives here, so swapping the backbone
touches one file.

Backbone: diffusers 0.35.2 to 0.39 (0.40 removed the Flax models ``FlaxUNet2DConditionModel`` and
``FlaxAutoencoderKL``), with flax 0.12.8 or later (docs/math.md §9). Weights are read from the
diffusers PyTorch layout (``config.json`` + ``diffusion_pytorch_model.safetensors``) with numpy
only, using diffusers' own rename/transpose rule (``rename_key_and_reshape_tensor``) against the
*shapes* of the Flax parameters (``jax.eval_shape``), so nothing is randomly initialised and torch
is not needed.

Text encoders: transformers 4.57.6 or a later 4.x (5.x dropped Flax CLIP):
``FlaxCLIPTextModel`` / ``FlaxCLIPTextModelWithProjection`` read the PyTorch ``model.safetensors``
of ``text_encoder/`` and ``text_encoder_2/`` (safetensors path, no torch), and ``CLIPTokenizer``
reads ``tokenizer/`` and ``tokenizer_2/``.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator, Mapping

import jax
import numpy as np

__all__ = [
    "MissingModelFileError",
    "build_unet",
    "build_vae",
    "convert_torch_state_dict",
    "iter_safetensors",
    "load_clip_text",
    "load_clip_tokenizer",
    "load_config",
    "load_flax_weights",
    "weight_files",
]

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
WEIGHTS_INDEX_NAME = "diffusion_pytorch_model.safetensors.index.json"
FP16_WEIGHTS_NAME = "diffusion_pytorch_model.fp16.safetensors"
FP16_WEIGHTS_INDEX_NAME = "diffusion_pytorch_model.safetensors.index.fp16.json"
CONFIG_NAME = "config.json"


class MissingModelFileError(FileNotFoundError):
    """A model folder lacks ``config.json`` or its safetensors weights; the message names the file."""


def _quiet_diffusers():
    from diffusers.utils import logging as dlogging

    dlogging.set_verbosity_error()
    logging.getLogger("diffusers").setLevel(logging.ERROR)


def load_config(folder: str | os.PathLike) -> dict:
    """Read ``folder/config.json`` (raises :class:`MissingModelFileError` naming the file)."""
    path = os.path.join(os.fspath(folder), CONFIG_NAME)
    if not os.path.isdir(os.fspath(folder)):
        raise MissingModelFileError(f"model folder {os.fspath(folder)!r} does not exist")
    if not os.path.isfile(path):
        raise MissingModelFileError(f"missing model file {path!r} (diffusers config)")
    with open(path) as f:
        return json.load(f)


def weight_files(folder: str) -> list[str]:
    """The safetensors weight files of a diffusers component folder: the single file, else the
    shards of its index, else the same for the ``fp16`` variant (what a hub download often holds)."""
    for name, index_name in (
        (WEIGHTS_NAME, WEIGHTS_INDEX_NAME),
        (FP16_WEIGHTS_NAME, FP16_WEIGHTS_INDEX_NAME),
    ):
        single = os.path.join(folder, name)
        index = os.path.join(folder, index_name)
        if os.path.isfile(single):
            return [single]
        if os.path.isfile(index):
            try:
                with open(index) as f:
                    shards = sorted(set(json.load(f)["weight_map"].values()))
            except (ValueError, KeyError, TypeError, AttributeError) as e:
                raise ValueError(
                    f"{index}: not a safetensors index ({type(e).__name__}: {e})"
                ) from None
            files = [os.path.join(folder, s) for s in shards]
            for p in files:
                if not os.path.isfile(p):
                    raise MissingModelFileError(f"missing model file {p!r} (listed in {index!r})")
            return files
    raise MissingModelFileError(
        f"missing model file {os.path.join(folder, WEIGHTS_NAME)!r} (no {WEIGHTS_INDEX_NAME} and no "
        f"{FP16_WEIGHTS_NAME} either); expected diffusers-format PyTorch weights in safetensors"
    )


def iter_safetensors(folder: str | os.PathLike) -> Iterator[tuple[str, np.ndarray]]:
    """Yield ``(torch key, numpy array)`` one tensor at a time (keeps peak host memory low)."""
    from safetensors import safe_open

    for path in weight_files(os.fspath(folder)):
        with safe_open(path, framework="numpy") as f:  # type: ignore[attr-defined]
            for key in f.keys():  # noqa: SIM118 (a safe_open handle, not a dict)
                yield key, f.get_tensor(key)


def _flax_config(config: Mapping) -> dict:
    # Torch configs carry keys the Flax class does not know (act_fn, ...); from_config drops them.
    cfg = {k: v for k, v in config.items() if not k.startswith("_")}
    if isinstance(cfg.get("cross_attention_dim"), (list, tuple)):
        raise ValueError("per-block cross_attention_dim is not supported by the Flax UNet")
    return cfg


def build_unet(config: Mapping, dtype=None):
    """``FlaxUNet2DConditionModel`` from a (torch or Flax) diffusers UNet config dict."""
    import jax.numpy as jnp
    from diffusers import FlaxUNet2DConditionModel

    _quiet_diffusers()
    return FlaxUNet2DConditionModel.from_config(_flax_config(config), dtype=dtype or jnp.float32)


def build_vae(config: Mapping, dtype=None):
    """``FlaxAutoencoderKL`` from a diffusers VAE config dict."""
    import jax.numpy as jnp
    from diffusers import FlaxAutoencoderKL

    _quiet_diffusers()
    return FlaxAutoencoderKL.from_config(_flax_config(config), dtype=dtype or jnp.float32)


def convert_torch_state_dict(items, module, *, source: str = "state dict") -> dict:
    """Map diffusers PyTorch ``(key, array)`` pairs to the Flax parameter tree of ``module``.

    Uses diffusers' rename rule (``a.0.b`` -> ``a_0/b``, Linear ``weight`` -> ``kernel`` transposed,
    Conv ``weight`` ``(O, I, kh, kw)`` -> ``(kh, kw, I, O)``, norm ``weight`` -> ``scale``) against the
    Flax shapes from ``jax.eval_shape(module.init_weights)``. Raises ``ValueError`` naming the key on
    a shape mismatch, an unexpected or missing parameter, or non-finite values.
    """
    import jax.numpy as jnp
    from diffusers.models.modeling_flax_pytorch_utils import (
        rename_key,
        rename_key_and_reshape_tensor,
    )
    from flax.traverse_util import flatten_dict, unflatten_dict

    shapes = flatten_dict(jax.eval_shape(module.init_weights, jax.random.PRNGKey(0)))
    flat: dict[tuple[str, ...], jax.Array] = {}
    for pt_key, tensor in items:
        tensor = np.asarray(tensor)
        pt_tuple = tuple(rename_key(pt_key).split("."))
        fkey, ftensor = rename_key_and_reshape_tensor(pt_tuple, tensor, shapes)
        if fkey not in shapes:
            raise ValueError(
                f"{source}: weight {pt_key!r} has no Flax counterpart ({'/'.join(fkey)})"
            )
        if tuple(ftensor.shape) != tuple(shapes[fkey].shape):
            raise ValueError(
                f"{source}: weight {pt_key!r} has shape {tuple(tensor.shape)}, the model expects "
                f"{tuple(shapes[fkey].shape)} at {'/'.join(fkey)} (after transposition)"
            )
        if np.issubdtype(ftensor.dtype, np.floating) and not np.all(np.isfinite(ftensor)):
            raise ValueError(f"{source}: weight {pt_key!r} has non-finite values")
        flat[fkey] = jnp.asarray(np.ascontiguousarray(ftensor))
    missing = sorted(set(shapes) - set(flat))
    if missing:
        raise ValueError(
            f"{source}: {len(missing)} parameters missing, first {'/'.join(missing[0])!r}; "
            "the weights do not belong to this config"
        )
    return unflatten_dict(flat)


def load_flax_weights(folder: str | os.PathLike, *, kind: str = "unet", dtype=None):
    """``(module, params, config)`` from a local diffusers folder (``kind`` = "unet" or "vae")."""
    config = load_config(folder)
    module = build_unet(config, dtype) if kind == "unet" else build_vae(config, dtype)
    files = weight_files(os.fspath(folder))
    params = convert_torch_state_dict(iter_safetensors(folder), module, source=", ".join(files))
    return module, params, config


def _quiet_transformers():
    import warnings

    from transformers.utils import logging as tlogging

    tlogging.set_verbosity_error()
    warnings.filterwarnings("ignore", message=".*TensorFlow and JAX classes are deprecated.*")


def _require_transformers(what: str):
    try:
        import transformers  # noqa: F401
    except ImportError as e:  # pragma: no cover - depends on the installation
        raise MissingModelFileError(
            f"{what} needs the SDXL text encoders, which need transformers 4.57 (install "
            "'orthofuse-jax[sdxl]'), or pass precomputed --embeddings"
        ) from e


CLIP_WEIGHTS = ("model.safetensors", "model.safetensors.index.json")
TOKENIZER_FILES = ("vocab.json", "merges.txt")


def load_clip_text(folder: str | os.PathLike, *, projection: bool):
    """``(FlaxCLIPTextModel[WithProjection], params)`` from a transformers text-encoder folder.

    ``projection=True`` loads ``text_encoder_2`` (pooled output projected, SDXL's ``text_embeds``).
    Reads the PyTorch ``model.safetensors`` without torch. Raises :class:`MissingModelFileError`
    naming a missing file, ``ValueError`` naming a non-finite parameter.
    """
    folder = os.fspath(folder)
    _require_transformers("encoding a prompt")
    if not os.path.isdir(folder):
        raise MissingModelFileError(f"text encoder folder {folder!r} does not exist")
    for name in (CONFIG_NAME,):
        if not os.path.isfile(os.path.join(folder, name)):
            raise MissingModelFileError(
                f"missing model file {os.path.join(folder, name)!r} (text encoder config)"
            )
    if not any(os.path.isfile(os.path.join(folder, w)) for w in CLIP_WEIGHTS):
        raise MissingModelFileError(
            f"missing model file {os.path.join(folder, CLIP_WEIGHTS[0])!r} (text encoder weights in safetensors)"
        )
    _quiet_transformers()
    from flax.traverse_util import flatten_dict
    from transformers import FlaxCLIPTextModel, FlaxCLIPTextModelWithProjection

    cls = FlaxCLIPTextModelWithProjection if projection else FlaxCLIPTextModel
    try:
        model = cls.from_pretrained(folder, from_pt=True, local_files_only=True)
    except (OSError, KeyError, ValueError) as e:
        raise ValueError(
            f"{folder}: cannot load the text encoder: {' '.join(str(e).split())}"
        ) from e
    for key, value in flatten_dict(model.params).items():
        if not bool(np.all(np.isfinite(np.asarray(value)))):
            raise ValueError(
                f"{folder}: text encoder weight {'/'.join(key)!r} has non-finite values"
            )
    return model, model.params


def load_clip_tokenizer(folder: str | os.PathLike):
    """``CLIPTokenizer`` from a tokenizer folder (``vocab.json``, ``merges.txt``, configs)."""
    folder = os.fspath(folder)
    _require_transformers("encoding a prompt")
    for name in TOKENIZER_FILES:
        if not os.path.isfile(os.path.join(folder, name)):
            raise MissingModelFileError(
                f"missing model file {os.path.join(folder, name)!r} (CLIP tokenizer)"
            )
    _quiet_transformers()
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(folder, local_files_only=True)


def download(hub_id: str) -> str:
    """Snapshot a hub repo (UNet, VAE, scheduler, text encoders and tokenizers, safetensors only);
    called only for an explicit hub id."""
    from huggingface_hub import snapshot_download

    return snapshot_download(
        hub_id,
        allow_patterns=[
            "unet/*",
            "vae/*",
            "scheduler/*",
            "model_index.json",
            "text_encoder/*",
            "text_encoder_2/*",
            "tokenizer/*",
            "tokenizer_2/*",
        ],
        ignore_patterns=["*.bin", "*.msgpack", "*fp16*", "*.onnx*"],
    )
