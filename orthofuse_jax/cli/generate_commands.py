"""``orthofuse-jax generate``: sample an SDXL image with a (fused) GS adapter folded into the UNet.

Importing this module imports neither flax nor diffusers (the CLI lists commands cheaply); the run
function imports them.

What the command needs:

* ``--model DIR``: a local diffusers SDXL folder with ``unet/config.json`` and
  ``unet/diffusion_pytorch_model.safetensors`` (or ``.safetensors.index.json`` shards); ``vae/``
  (same layout) to decode to a PNG, otherwise the latents are saved as ``OUT.npy``;
  ``scheduler/scheduler_config.json`` optional (SDXL Euler defaults). No download unless
  ``--hub-id`` is given.
* ``--prompt TEXT``: encoded with the folder's ``text_encoder/``, ``text_encoder_2/``,
  ``tokenizer/`` and ``tokenizer_2/`` (Flax CLIP from transformers 4.57, in the ``sdxl`` extra).
  ``--negative-prompt`` as in diffusers: without it the negative embeddings are zeros
  (``force_zeros_for_empty_prompt``, SDXL base).
* or ``--embeddings FILE.npz`` instead of encoding: ``prompt_embeds [77, 2048]`` (penultimate
  hidden states of both CLIP text encoders, concatenated), ``pooled [1280]`` (text_encoder_2
  projection); optional ``negative_prompt_embeds`` / ``negative_pooled``. ``orthofuse-jax
  encode-prompt`` writes such a file.
* ``--adapter FILE.safetensors``: reference-format GS adapter (docs/math.md §5), e.g. a fused one.

* ``--num-images N``: image ``i`` starts from the noise of seed ``--seed + i``, so it is the same
  whatever ``N`` and the device count; with ``N > 1`` image ``i`` goes to ``OUT-i.png`` (the
  index zero-padded to the width of ``N - 1``). ``--mesh data=D`` splits the images over ``D``
  local devices (default: all), UNet and VAE replicated; any ``N`` works.

Each PNG (or ``.npy``) is written atomically; an output path equal to an input is refused.
"""

from __future__ import annotations

import argparse

from ._common import add_model_option

__all__ = ["output_paths", "register", "run_encode_prompt", "run_generate"]


def register(subparsers) -> argparse.ArgumentParser:
    """Add the ``generate`` subcommand to an ``argparse`` subparsers object."""
    p = subparsers.add_parser(
        "generate",
        help="sample an SDXL image with a GS adapter folded into the UNet",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_model_option(p, "unet/, optional vae/", hub_id=True)
    p.add_argument(
        "--adapter",
        default=None,
        help="GS adapter .safetensors (reference format); none = base UNet",
    )
    p.add_argument(
        "--prompt", default=None, help="prompt text, encoded with the model's CLIP text encoders"
    )
    p.add_argument(
        "--negative-prompt",
        default=None,
        help="negative prompt (default: zero embeddings, as SDXL)",
    )
    p.add_argument(
        "--embeddings",
        default=None,
        help=".npz with prompt_embeds [77,2048] and pooled [1280] instead of encoding --prompt",
    )
    p.add_argument(
        "-o", "--output", required=True, help="output PNG (latents .npy when the model has no vae/)"
    )
    p.add_argument("--steps", type=int, default=50, help="Euler steps (default 50)")
    p.add_argument(
        "--guidance", type=float, default=5.0, help="classifier-free guidance scale (default 5.0)"
    )
    p.add_argument("--height", type=int, default=1024)
    p.add_argument("--width", type=int, default=1024)
    p.add_argument("--seed", type=int, default=0, help="seed of image 0; image i uses seed + i")
    p.add_argument("--num-images", type=int, default=1, help="images to sample (default 1)")
    p.add_argument(
        "--mesh", default=None, help="data=D: split the images over D local devices (default: all)"
    )
    p.add_argument(
        "--dtype",
        choices=("fp32", "bf16"),
        default="fp32",
        help="UNet compute dtype (default fp32)",
    )
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.set_defaults(func=run_generate)
    e = subparsers.add_parser(
        "encode-prompt",
        help="encode a prompt with SDXL's two CLIP text encoders into an embeddings .npz",
        description="Encode --prompt (and --negative-prompt) with the model folder's text_encoder/ and "
        "text_encoder_2/ as diffusers' StableDiffusionXLPipeline does; the .npz is what generate and "
        "train take as --embeddings, so the text encoders need not be loaded again.",
    )
    add_model_option(e, "text_encoder*/, tokenizer*/")
    e.add_argument("--prompt", required=True)
    e.add_argument("--negative-prompt", default=None, help="also encode a negative prompt")
    e.add_argument("-o", "--output", required=True, help="output .npz")
    e.set_defaults(func=run_encode_prompt)
    return p


def run_encode_prompt(args) -> int:
    """Run ``encode-prompt`` for parsed ``args``; returns the exit status (2 on a bad input)."""
    import os

    from ..fusion.io import check_output_path
    from ..models.text import prompt_embeddings, save_embeddings

    check_output_path(args.output)
    emb = prompt_embeddings(args.model, args.prompt, args.negative_prompt)
    save_embeddings(args.output, emb, prompt=args.prompt)
    shapes = ", ".join(f"{k} {list(v.shape)}" for k, v in emb.items())
    print(f"wrote {os.fspath(args.output)} ({shapes})")
    return 0


def run_generate(args) -> int:
    """Run ``generate`` for parsed ``args``; returns the exit status (2 on a bad input)."""
    import io
    import os

    import numpy as np

    from ..fusion.io import atomic_write_bytes, check_output_path
    from ..models.generate import generate, load_embeddings
    from ..models.mesh import data_mesh

    if args.embeddings is None and args.prompt is None:
        raise ValueError(
            "give --prompt (encoded with the model's text encoders) or --embeddings FILE.npz"
        )
    if args.embeddings is not None and args.negative_prompt is not None:
        raise ValueError(
            "--negative-prompt is encoded with the text encoders; with --embeddings put "
            "negative_prompt_embeds / negative_pooled in the .npz instead"
        )
    if args.num_images < 1:
        raise ValueError(f"--num-images must be >= 1, got {args.num_images}")
    mesh = data_mesh(args.mesh)
    inputs = [x for x in (args.adapter, args.embeddings) if x]
    outs = output_paths(os.fspath(args.output), args.num_images)
    for out in outs:
        check_output_path(out, inputs)
        check_output_path(os.path.splitext(out)[0] + ".npy", inputs)
    adapter = None
    if args.adapter:
        from ..fusion.io import load_adapter

        adapter = load_adapter(args.adapter)
    model = args.model
    if args.hub_id and not os.path.exists(model):
        from ..models import _backbone

        model = _backbone.download(model)
    emb = load_embeddings(args.embeddings) if args.embeddings else args.prompt
    images, latents = generate(
        model,
        emb,
        negative_prompt=args.negative_prompt if args.embeddings is None else None,
        adapter=adapter,
        num_steps=args.steps,
        guidance_scale=args.guidance,
        height=args.height,
        width=args.width,
        seed=args.seed,
        dtype=args.dtype,
        progress=not args.no_progress,
        num_images=args.num_images,
        mesh=mesh,
    )
    if images is None:
        for i, out in enumerate(outs):
            buf = io.BytesIO()
            out = os.path.splitext(out)[0] + ".npy"
            np.save(buf, latents[i : i + 1])
            atomic_write_bytes(out, buf.getvalue())
            print(f"no vae/ in {args.model}: wrote latents {out}")
        return 0
    for i, out in enumerate(outs):
        atomic_write_bytes(out, _png(images[i], args, seed=args.seed + i))
        print(f"wrote {out}")
    return 0


def output_paths(output: str, num_images: int) -> list[str]:
    """``[output]`` for one image, else ``STEM-i.EXT`` with ``i`` zero-padded to the width of ``N - 1``."""
    import os

    if num_images == 1:
        return [output]
    stem, ext = os.path.splitext(output)
    width = len(str(num_images - 1))
    return [f"{stem}-{i:0{width}d}{ext}" for i in range(num_images)]


def _png(image, args, *, seed: int) -> bytes:
    """``image`` as PNG bytes with the prompt and the sampling settings (``seed``: this image's)."""
    import io

    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("prompt", args.prompt or "")
    if args.negative_prompt:
        info.add_text("negative_prompt", args.negative_prompt)
    info.add_text(
        "orthofuse-jax",
        f"steps={args.steps} guidance={args.guidance} seed={seed} dtype={args.dtype} adapter={args.adapter} "
        f"embeddings={args.embeddings}",
    )
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG", pnginfo=info)
    return buf.getvalue()
