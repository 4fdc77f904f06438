"""Flax SDXL integration (optional extra ``orthofuse-jax[sdxl]``).

* :func:`patch_unet_params` / :func:`unpatch_unet_params` -- fold a GS adapter into the attention
  kernels of a Flax UNet (``K_eff = (Q^T K) * s``, docs/math.md §2) and undo it.
* :func:`attention_layers` -- reference layer name -> Flax parameter path table from a UNet config.
* :func:`load_unet` / :func:`load_vae` -- diffusers PyTorch safetensors -> Flax params (no torch).
* :func:`generate` / :func:`denoise` / :func:`euler_schedule` -- SDXL Euler sampling with CFG (docs/math.md §4).
* :func:`data_mesh` -- a ``data`` mesh over local devices; ``generate(..., mesh=)`` splits the
  images over it (one image seed per image: ``seed + i``).
* :func:`prompt_embeddings` / :func:`load_text_encoders` / :func:`encode_prompt` -- SDXL's two
  Flax CLIP text encoders (transformers 4.57), as diffusers' SDXL pipeline encodes prompts.
* :func:`bake_unet` -- fold an adapter into a diffusers UNet folder's torch weights, written as a new
  folder (``W_eff = diag(s) W Q``; numpy and JAX only), and optionally one file in the original
  SDXL key layout (:func:`original_unet_keys`, diffusers' own conversion run backwards).
* :func:`apply_onthefly` -- the reference's per-call application of the adapter (tests, benchmarks).

Only :mod:`._backbone` imports diffusers and transformers (and :mod:`.single_file`, when called, diffusers' key conversion); importing this package imports neither flax nor diffusers.
"""

# generate.py imports only jax/numpy; importing it here also keeps the package attribute
# ``generate`` bound to the function rather than to the submodule of the same name.
from .bake import bake_unet
from .generate import decode, denoise, euler_schedule, generate, load_embeddings
from .layers import AttentionLayer, attention_layers, attention_layers_from_params, layer_name
from .mesh import MeshSpecError, data_mesh
from .patch import fold_plan, patch_unet_params, unpatch_unet_params
from .single_file import original_unet_keys
from .text import encode_prompt, load_text_encoders, prompt_embeddings, save_embeddings
from .weights import MissingModelFileError, load_unet, load_vae, resolve_component

__all__ = [
    "AttentionLayer",
    "MeshSpecError",
    "MissingModelFileError",
    "apply_onthefly",
    "attention_layers",
    "attention_layers_from_params",
    "bake_unet",
    "data_mesh",
    "decode",
    "denoise",
    "encode_prompt",
    "euler_schedule",
    "fold_plan",
    "generate",
    "layer_name",
    "load_embeddings",
    "load_text_encoders",
    "load_unet",
    "load_vae",
    "onthefly_interceptor",
    "original_unet_keys",
    "patch_unet_params",
    "prompt_embeddings",
    "resolve_component",
    "save_embeddings",
    "unpatch_unet_params",
]

_LAZY = {
    "apply_onthefly": "onthefly",
    "onthefly_interceptor": "onthefly",
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(name)
