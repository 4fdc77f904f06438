"""``orthofuse-jax bake``: fold a GS adapter into the torch weights of a diffusers UNet folder.

Importing this module imports no JAX; the run function imports :mod:`orthofuse_jax.models.bake`,
which needs numpy and JAX only (no torch, flax or diffusers).

* ``--model DIR``: a local diffusers model folder with ``unet/``, or a UNet folder itself
  (``config.json`` and ``diffusion_pytorch_model.safetensors``, its shards, or the ``fp16``
  variant ``diffusion_pytorch_model.fp16.safetensors``).
* ``--adapter A``: a reference-format GS adapter (e.g. one ``fuse`` wrote), or a PEFT OFT adapter
  (its folder or ``adapter_model.safetensors``).
* ``-o OUT_DIR``: the diffusers UNet folder to write (``config.json`` and
  ``diffusion_pytorch_model.safetensors``), which ``UNet2DConditionModel.from_pretrained`` loads.
  Each adapted projection's weight becomes ``W_eff = diag(s) W Q`` (docs/math.md §2). The folder
  is written under a temporary name beside OUT_DIR and renamed; an existing OUT_DIR is refused
  unless ``--overwrite`` (and then only a folder holding a config and UNet weights is replaced).
* ``--single-file OUT.safetensors``: also write the same weights as one file in the original SDXL
  key layout (``model.diffusion_model.*``) that single-file loaders read (ComfyUI's "Load
  Diffusion Model", diffusers' ``from_single_file``). It holds the UNet only: no VAE and no text
  encoders, so it is not a full A1111 checkpoint. The key names come from diffusers' own
  conversion tables, so this option needs diffusers and torch. Written under a temporary name and
  renamed; an existing file is replaced only with ``--overwrite``.
"""

from __future__ import annotations

import argparse

from ._common import add_model_option

__all__ = ["register", "run_bake"]


def register(subparsers) -> argparse.ArgumentParser:
    """Add the ``bake`` subcommand to an ``argparse`` subparsers object."""
    p = subparsers.add_parser(
        "bake",
        help="fold a GS adapter into a diffusers UNet folder's weights (W_eff = diag(s) W Q)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_model_option(p, "with unet/, or a UNet folder")
    p.add_argument(
        "--adapter", required=True, help="GS adapter (reference format) or PEFT OFT adapter"
    )
    p.add_argument("-o", "--output", required=True, help="output diffusers UNet folder")
    p.add_argument(
        "--dtype",
        choices=("fp16", "bf16", "fp32"),
        default=None,
        help="dtype of the written weights (default: each input tensor's own)",
    )
    p.add_argument(
        "--single-file",
        default=None,
        metavar="OUT.safetensors",
        help="also write the baked UNet as one .safetensors in the original SDXL key layout "
        "(model.diffusion_model.*; the UNet only, no VAE or text encoders; needs diffusers and torch)",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an existing output folder (one holding only a config and UNet weights) "
        "and an existing --single-file",
    )
    p.set_defaults(func=run_bake)
    return p


def run_bake(args) -> int:
    """Run ``bake`` for parsed ``args``; returns the exit status (2 on a bad input)."""
    import time

    from ..models.bake import bake_unet

    start = time.perf_counter()
    res = bake_unet(
        args.model,
        args.adapter,
        args.output,
        args.dtype,
        overwrite=args.overwrite,
        single_file=args.single_file,
    )
    dtypes = ", ".join(f"{n} {d}" for d, n in sorted(res.dtypes.items()))
    print(
        f"folded {res.layers} adapter layers into {res.unet_dir} ({res.tensors} tensors: {dtypes}) "
        f"in {time.perf_counter() - start:.2f} s; wrote {res.out_dir}"
        + (f" and {res.single_file}" if res.single_file else "")
    )
    return 0
