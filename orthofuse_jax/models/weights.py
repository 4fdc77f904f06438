"""Load diffusers-format PyTorch SDXL weights (UNet, VAE) into Flax parameters without torch.

A model folder is either a component folder (``config.json`` + ``diffusion_pytorch_model
.safetensors``, or a sharded ``...safetensors.index.json``) or a pipeline root holding ``unet/`` and
``vae/``. Nothing is downloaded unless a hub id is passed explicitly with ``allow_download=True``.
"""

from __future__ import annotations

import os

from . import _backbone
from ._backbone import MissingModelFileError

__all__ = ["MissingModelFileError", "load_unet", "load_vae", "resolve_component"]


def resolve_component(
    model: str | os.PathLike, component: str, *, allow_download: bool = False
) -> str:
    """Local folder of ``component`` ("unet" or "vae") under ``model`` (or ``model`` itself).

    Raises :class:`MissingModelFileError` naming the missing folder or file. With
    ``allow_download=True`` a ``model`` that is not a local path is treated as a hub id.
    """
    path = os.fspath(model)
    if not os.path.exists(path):
        if not allow_download:
            raise MissingModelFileError(
                f"model folder {path!r} does not exist (pass a hub id with allow_download=True / "
                "--hub-id to download)"
            )
        path = _backbone.download(path)
    sub = os.path.join(path, component)
    if os.path.isdir(sub):
        return sub
    if os.path.isfile(os.path.join(path, _backbone.CONFIG_NAME)):
        return path
    raise MissingModelFileError(
        f"model folder {path!r} has neither {component}/ nor {_backbone.CONFIG_NAME} "
        f"(missing {os.path.join(path, component, _backbone.CONFIG_NAME)!r})"
    )


def load_unet(model: str | os.PathLike, *, dtype=None, allow_download: bool = False):
    """``(FlaxUNet2DConditionModel, params, config)`` from a local diffusers folder."""
    folder = resolve_component(model, "unet", allow_download=allow_download)
    return _backbone.load_flax_weights(folder, kind="unet", dtype=dtype)


def load_vae(model: str | os.PathLike, *, dtype=None, allow_download: bool = False):
    """``(FlaxAutoencoderKL, params, config)`` from ``model/vae`` (or a VAE folder)."""
    folder = resolve_component(model, "vae", allow_download=allow_download)
    return _backbone.load_flax_weights(folder, kind="vae", dtype=dtype)
