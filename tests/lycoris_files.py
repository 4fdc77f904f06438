"""Real LyCORIS adapter files of tiny torch models, and this package's bake of them, for tests."""

from __future__ import annotations

import json

import numpy as np
import torch
from lycoris import create_lycoris
from safetensors.torch import load_file, save_file

from orthofuse_jax.models.bake import bake_unet


def make_file(path, model, *, algo, linear_dim, seed, alpha=0.0, rescaled=False, scale=0.3):
    """A random ``algo`` adapter of ``model`` saved by ``lycoris``; returns lycoris's merged weights."""
    net = create_lycoris(
        model, 1.0, linear_dim=linear_dim, algo=algo, constraint=alpha, rescaled=rescaled
    )
    net.apply_to()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if name.endswith("oft_blocks"):
                p.copy_(scale * torch.randn(p.shape, generator=g))
            elif name.endswith("rescale"):
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
    net.save_weights(str(path), torch.float32, None)
    return merged_weights(model, net)


def merged_weights(model, net):
    """``model``'s weights with ``net`` merged in by ``lycoris``, as float64 arrays."""
    net.merge_to(1.0)
    return {k: v.detach().numpy().astype(np.float64) for k, v in model.state_dict().items()}


def unet_folder(tmp_path, model):
    """``model``'s weights as a diffusers-style folder that ``bake_unet`` reads."""
    folder = tmp_path / "unet"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"_class_name": "Tiny"}))
    save_file(
        {k: v.contiguous() for k, v in model.state_dict().items()},
        str(folder / "diffusion_pytorch_model.safetensors"),
    )
    return folder


def baked(tmp_path, folder, adapter, name="out"):
    """The weights ``bake_unet`` writes for ``adapter`` folded into ``folder``, as float64 arrays."""
    bake_unet(folder, adapter, tmp_path / name)
    sd = load_file(str(tmp_path / name / "diffusion_pytorch_model.safetensors"))
    return {k: v.numpy().astype(np.float64) for k, v in sd.items()}
