"""``orthofuse-jax generate``: sample an SDXL image with a (fused) GS adapter folded into the UNet.

Importing this module imports neither flax nor diffusers (the CLI lists commands cheaply); the run
function imports them.

What the command needs (text encoders are not run here: their Flax versions need ``transformers``):

* ``--model DIR``: a local diffusers SDXL folder with ``unet/config.json`` and
  ``unet/diffusion_pytorch_model.safetensors`` (or ``.safetensors.index.json`` shards); ``vae/``
  (same layout) to decode to a PNG, otherwise the latents are saved as ``OUT.npy``;
  ``scheduler/scheduler_config.json`` optional (SDXL Euler defaults). No download unless
  ``--hub-id`` is given.
* ``--embeddings FILE.npz``: ``prompt_embeds [77, 2048]`` (penultimate hidden states of both CLIP
  text encoders, concatenated), ``pooled [1280]`` (text_encoder_2 projection); optional
  ``negative_prompt_embeds`` / ``negative_pooled`` (zeros by default, as SDXL's
  ``force_zeros_for_empty_prompt``). ``--prompt`` is recorded in the PNG metadata.
* ``--adapter FILE.safetensors``: reference-format GS adapter (SPEC 5), e.g. a fused one.
"""

from __future__ import annotations

import argparse

__all__ = ["register", "run_generate"]


def register(subparsers) -> argparse.ArgumentParser:
    """Add the ``generate`` subcommand to an ``argparse`` subparsers object."""
    p = subparsers.add_parser(
        "generate",
        help="sample an SDXL image with a GS adapter folded into the UNet",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", required=True, help="local diffusers SDXL folder (unet/, optional vae/)")
    p.add_argument("--hub-id", action="store_true", help="treat --model as a hub id and download it")
    p.add_argument("--adapter", default=None, help="GS adapter .safetensors (reference format); none = base UNet")
    p.add_argument("--prompt", default="", help="prompt text (stored in the PNG; encode it into --embeddings)")
    p.add_argument("--embeddings", required=True, help=".npz with prompt_embeds [77,2048] and pooled [1280]")
    p.add_argument("-o", "--output", required=True, help="output PNG (latents .npy when the model has no vae/)")
    p.add_argument("--steps", type=int, default=50, help="Euler steps (default 50)")
    p.add_argument("--guidance", type=float, default=5.0, help="classifier-free guidance scale (default 5.0)")
    p.add_argument("--height", type=int, default=1024)
    p.add_argument("--width", type=int, default=1024)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32", help="UNet compute dtype (default fp32)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.set_defaults(func=run_generate)
    from .train_commands import register as register_train

    register_train(subparsers)
    return p


def run_generate(args) -> int:
    """Run ``generate`` for parsed ``args``; returns the exit status."""
    import os
    import sys

    import numpy as np

    from .generate import generate, load_embeddings

    try:
        emb = load_embeddings(args.embeddings)
        adapter = None
        if args.adapter:
            from ..fusion.io import load_adapter

            adapter = load_adapter(args.adapter)
        image, latents = generate(
            args.model,
            emb,
            adapter=adapter,
            num_steps=args.steps,
            guidance_scale=args.guidance,
            height=args.height,
            width=args.width,
            seed=args.seed,
            dtype=args.dtype,
            progress=not args.no_progress,
            allow_download=args.hub_id,
        )
    except (FileNotFoundError, ValueError) as e:
        print(f"orthofuse-jax generate: error: {e}", file=sys.stderr)
        return 2
    out = os.fspath(args.output)
    if image is None:
        out = os.path.splitext(out)[0] + ".npy"
        np.save(out, latents)
        print(f"no vae/ in {args.model}: wrote latents {out}")
        return 0
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("prompt", args.prompt)
    info.add_text(
        "orthofuse-jax",
        f"steps={args.steps} guidance={args.guidance} seed={args.seed} dtype={args.dtype} adapter={args.adapter}",
    )
    Image.fromarray(image).save(out, pnginfo=info)
    print(f"wrote {out}")
    return 0


def main(argv=None) -> int:
    """Standalone entry (``python -m orthofuse_jax.models.commands generate ...``)."""
    parser = argparse.ArgumentParser(prog="orthofuse-jax")
    sub = parser.add_subparsers(dest="command", required=True)
    register(sub)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
